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


def test_batch_flops_counts_matmuls_and_attention():
    batch = two_pairs().padded(np.arange(2), 8)
    tokens, pairs = flops.real_tokens_and_pairs(batch)
    got = flops.batch_flops(batch, n_matmul=1000, layers=2, heads=4, head_dim=8, passes=4)
    assert got == 4 * (2 * 1000 * tokens + 4 * 2 * 4 * 8 * pairs)


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
