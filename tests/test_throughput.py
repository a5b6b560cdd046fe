"""Honest throughput metrics: FLOPs counted on real tokens at the mask's density, `mfu` and
`tokens_per_second` in metrics.jsonl, and logging that never waits for the step it logs."""

import json

import numpy as np
import pytest

from dil_jax import flops, loop, train
from dil_jax.data.batching import TokenizedDataset


def two_pairs() -> TokenizedDataset:
    """Example 0: prompt of 4, responses of 3 and 2 tokens; example 1: prompt 2, responses 1, 5."""
    seqs = [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 8, 9], [1, 2, 5], [1, 2, 6, 7, 8, 9, 10]]
    lengths = np.array([[7, 6], [3, 7]], np.int32)
    starts = np.array([[0, 7], [13, 16]])
    return TokenizedDataset(
        np.concatenate(seqs).astype(np.int32),
        starts,
        lengths,
        np.array([[4, 4], [2, 2]], np.int32),
        np.arange(2, dtype=np.int32),
        buckets=(8,),
    )


def causal(n: int) -> int:
    return n * (n + 1) // 2


def test_pairs_follow_each_layouts_mask():
    data = two_pairs()
    rows = np.arange(2)
    want_tokens = int(data.lengths.sum())
    want_pairs = sum(causal(int(n)) for n in data.lengths.ravel())
    assert flops.real_tokens_and_pairs(data.padded(rows, 8)) == (want_tokens, want_pairs)
    assert flops.real_tokens_and_pairs(data.packed([rows], 16)) == (want_tokens, want_pairs)
    # Prefix-shared: the shared prefix (prompt minus its last token: 3 and 1 tokens) once;
    # a branch token at position p sees p + 1 keys exactly as unshared.
    tokens, pairs = flops.real_tokens_and_pairs(data.shared([rows], 32))
    assert tokens == want_tokens - 3 - 1
    assert pairs == want_pairs - causal(3) - causal(1)


def test_batch_flops_counts_matmuls_attention_and_the_head_at_scored_tokens():
    batch = two_pairs().padded(np.arange(2), 8)
    tokens, pairs = flops.real_tokens_and_pairs(batch)
    scored = flops.scored_tokens(batch)
    assert scored == 3 + 2 + 1 + 5  # the four responses
    got = flops.batch_flops(
        batch, n_matmul=1000, head_params=300, layers=2, heads=4, head_dim=8, passes=4
    )
    assert got == 4 * (2 * 700 * tokens + 2 * 300 * scored + 4 * 2 * 4 * 8 * pairs)
    # Every layout scores the same tokens.
    assert flops.scored_tokens(two_pairs().packed([np.arange(2)], 16)) == scored
    assert flops.scored_tokens(two_pairs().shared([np.arange(2)], 32)) == scored


@pytest.mark.slow
def test_metrics_carry_mfu_and_logging_does_not_wait_for_the_logged_step(
    tiny_config, tmp_path, monkeypatch
):
    """log_every=1: step k's record is written only after step k + 1 was dispatched (the
    device is never idle waiting for the host), except at checkpoints and the last step."""
    events = []
    make_step = train._log_memory_once

    def recording_step(trainer, ref_params):
        step_fn = make_step(trainer, ref_params)

        def wrapped(state, batch, step):
            events.append(("dispatch", step))
            return step_fn(state, batch, step)

        return wrapped

    class RecordingWriter(loop.MetricWriter):
        def write(self, step, metrics):
            if "loss" in metrics:
                events.append(("log", step))
            super().write(step, metrics)

    monkeypatch.setattr(train, "_log_memory_once", recording_step)
    monkeypatch.setattr(loop, "MetricWriter", RecordingWriter)
    config = tiny_config(**{"train.steps": 5, "checkpoint.every_steps": 100})
    train.train_and_evaluate(config, str(tmp_path))
    order = [e for e in events if e[0] in ("dispatch", "log")]
    assert order == [
        ("dispatch", 1),
        ("dispatch", 2),
        ("log", 1),
        ("dispatch", 3),
        ("log", 2),
        ("dispatch", 4),
        ("log", 3),
        ("dispatch", 5),
        ("log", 4),
        ("log", 5),
    ]
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5]
    for r in train_records[1:]:  # the first step's time includes compilation
        assert r["tokens_per_second"] > 0 and 0 < r["mfu"] < 2, r
        assert r["flops_per_second"] == pytest.approx(r["mfu"] * flops.device_peak("float32")[0])


@pytest.mark.parametrize(
    "size, n_params",
    [
        # Llama-3.2-1B: 1,235,814,400 with its tied embeddings, + 128256 x 2048 untied here.
        ("1b", 1_235_814_400 + 128256 * 2048),
        # Llama-3-8B: 2 layers of 218,112,000, embedding and head of 128256 x 4096, final norm.
        ("8b_slice", 2 * 218_112_000 + 2 * 128256 * 4096 + 4096),
    ],
)
def test_bench_step_sizes_are_the_published_llama_shapes(size, n_params):
    """The accelerator MFU targets name a Llama-1B-shaped step and a 2-layer Llama-3-8B slice:
    bench_step's sizes have exactly those parameter counts (abstract, nothing allocated)."""
    import argparse
    import sys

    import jax
    from conftest import REPO

    from dil_jax import sharding

    sys.path.insert(0, str(REPO / "experiments"))
    import bench_step

    args = argparse.Namespace(
        size=size, seq=2048, dtype="bfloat16", remat=False, unrolled=False, batch=4, seq_chunk=512
    )
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    trainer = train.Trainer(bench_step.build_config(args), mesh=mesh)
    assert sum(x.size for x in jax.tree.leaves(trainer.abstract_params())) == n_params


def test_device_check_refuses_a_machine_without_an_accelerator(tmp_path):
    """experiments/device_check.sh (the one prepared accelerator run) parses, and on CPU says
    there is nothing to check instead of timing CPU figures as if they were the GPU's."""
    import subprocess
    import sys

    from conftest import REPO, one_device_env

    script = REPO / "experiments" / "device_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = subprocess.run(
        ["bash", str(script), str(tmp_path / "out")],
        cwd=REPO,
        env=one_device_env(PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert "no accelerator visible to JAX (cpu): nothing to check" in out.stdout
