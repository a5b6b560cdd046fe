"""Issue 14 end to end: KTO on labelled completions, listwise losses on N = 4 ranked responses,
the density-ratio diagnostics in metrics.jsonl, and the layout checks that refuse bad mixes."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO
from data_testing import files_config, make_tokenizer, write_jsonl

from dil_jax import sharding, train
from dil_jax.data import pipeline, tokenize
from dil_jax.data.report import DataError
from dil_jax.errors import ConfigError
from dil_jax.train import CollapseMonitor

TINY_MODEL = {
    "model.hidden_size": 16,
    "model.intermediate_size": 32,
    "model.num_hidden_layers": 1,
    "model.num_attention_heads": 2,
    "model.num_key_value_heads": 1,
    "mesh.shape": (1, 1, 1),
    "data.eos_token": "</s>",
    "train.steps": 2,
    "checkpoint.every_steps": 2,
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tok")


def labelled(n: int) -> list[dict]:
    """TRL's unpaired schema: half desirable, half undesirable completions."""
    return [
        {
            "prompt": f"q{i}: what is the capital of France?" + " the sea" * (i % 5),
            "completion": ("Paris, thanks." if i % 2 == 0 else "I am fine.") + " fox" * (i % 7),
            "label": i % 2 == 0,
        }
        for i in range(n)
    ]


def ranked(n: int) -> list[dict]:
    """UltraFeedback-style records: four scored completions (some prompts only three)."""
    out = []
    for i in range(n):
        responses = [
            f"Paris is the capital{' fox' * (i % 3)}.",
            "I am fine.",
            {"text": f"The sea is wide{' dog' * (i % 4)}."},
            "Write a poem.",
        ]
        scores = [4.5, 1.0, 3.0, 2.0]
        if i % 3 == 0:  # a shorter list: padded with an absent response
            responses, scores = responses[:3], scores[:3]
        out.append(
            {
                "prompt": f"q{i}: what is the capital of France?",
                "responses": responses,
                "scores": scores,
            }
        )
    return out


def one_device():
    return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def run_config(path, tok, **overrides):
    return files_config([path], tok, **{**TINY_MODEL, **overrides})


def test_kto_trains_on_labelled_completions(tok, tmp_path):
    path = write_jsonl(tmp_path / "kto.jsonl", labelled(24))
    config = run_config(path, tok, **{"loss.name": "kto", "data.format": "prompt_completion_label"})
    data, _, _ = pipeline.build_datasets(config)
    assert data.num_responses == 1
    np.testing.assert_array_equal(np.sort(np.unique(data.extras["labels"])), [0, 1])
    batch = next(pipeline.make_iterator(data, 4, unpaired=True))
    assert batch["input_ids"].shape[:2] == (4, 2) and batch["labels"].shape == (4,)

    summary = train.train_and_evaluate(config, str(tmp_path / "run"), mesh=one_device())
    assert summary["step"] == 2
    m = summary["train"]
    for key in ("loss", "loss/kto", "kto/reward", "kto/desirable", "kl", "logps/completion"):
        assert np.isfinite(m[key]), key
    assert 0.0 < m["kto/desirable"] < 1.0  # both labels reached the step


def test_kto_refuses_precomputed_reference_and_unlabelled_data(tok, tmp_path):
    path = write_jsonl(tmp_path / "kto.jsonl", labelled(8))
    config = run_config(
        path,
        tok,
        **{
            "loss.name": "kto",
            "reference.mode": "precomputed",
            "data.format": "prompt_completion_label",
        },
    )
    with pytest.raises(ConfigError, match=r"config.reference.mode='precomputed'.*inline"):
        train.Trainer(config, mesh=one_device())
    # KTO needs labels; labelled data trains nothing else
    pairs_path = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 4
    )
    with pytest.raises(ValueError, match="read unpaired labelled completions"):
        pipeline.build_datasets(
            run_config(
                pairs_path, tok, **{"loss.name": "kto", "data.format": "prompt_chosen_rejected"}
            )
        )
    with pytest.raises(ValueError, match="only\\s+KTO trains"):
        pipeline.build_datasets(
            run_config(path, tok, **{"loss.name": "sft", "data.format": "prompt_completion_label"})
        )
    with pytest.raises(ValueError, match="cannot be combined"):
        pipeline.build_datasets(
            run_config(
                path,
                tok,
                **{
                    "loss.name": "kto",
                    "loss.sft_weight": 0.1,
                    "data.format": "prompt_completion_label",
                },
            )
        )


def test_ranked_lists_tokenise_to_the_largest_n(tok, tmp_path):
    path = write_jsonl(tmp_path / "ranked.jsonl", ranked(12))
    config = run_config(
        path, tok, **{"loss.name": "plackett_luce", "data.format": "ranked_responses"}
    )
    data, _, _ = pipeline.build_datasets(config)
    assert data.num_responses == 4
    response_tokens = data.lengths - data.prompt_lengths  # [n, N]
    short = data.example_id % 3 == 0
    assert np.all(response_tokens[short, 3] == 0) and np.all(response_tokens[~short] > 0)
    assert np.all(response_tokens[:, :3] > 0)
    # best first: every top response is the 4.5-scored "Paris ..." completion
    first = data.padded(np.arange(len(data)), data.buckets[-1])
    ids, mask = first["input_ids"][:, 0], first["loss_mask"][:, 0]
    tk = tokenize.load_tokenizer(tok, "</s>")
    assert all(tk.decode(ids[i][mask[i] == 1]).startswith("Paris") for i in range(len(data)))
    # a pair loss cannot read N = 4
    with pytest.raises(DataError, match="N=4 responses.*need exactly 2"):
        pipeline.build_datasets(
            run_config(path, tok, **{"loss.name": "dpo", "data.format": "ranked_responses"})
        )


@pytest.mark.parametrize("loss", ["plackett_luce", "dil_lsif"])
def test_listwise_losses_train_on_four_ranked_responses(tok, tmp_path, loss):
    path = write_jsonl(tmp_path / "ranked.jsonl", ranked(12))
    config = run_config(
        path,
        tok,
        **{"loss.name": loss, "data.format": "ranked_responses", "train.diagnostics": True},
    )
    summary = train.train_and_evaluate(config, str(tmp_path / "run"), mesh=one_device())
    assert summary["step"] == 2
    m = summary["train"]
    for key in (
        "loss",
        f"loss/{loss}",
        "rewards/margins",
        "logps/rejected",
        "ratio/log_r_rejected_q50",
        "ratio/implied_ref_mean_r",
    ):
        assert np.isfinite(m[key]), key


def test_diagnostics_in_metrics_jsonl_of_a_gold_task_run(tiny_config, tmp_path):
    config = tiny_config(
        **{
            "loss.name": "dpo",
            "train.diagnostics": True,
            "train.steps": 3,
            "model.hidden_size": 16,
            "model.intermediate_size": 32,
            "model.num_hidden_layers": 1,
            "model.num_attention_heads": 2,
            "model.num_key_value_heads": 1,
            "data.num_train": 64,
            "data.num_eval": 16,
        }
    )
    train.train_and_evaluate(config, str(tmp_path))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert len(train_records) == 3
    for r in train_records:
        for key in (
            "ratio/log_r_chosen_q10",
            "ratio/log_r_chosen_q50",
            "ratio/log_r_chosen_q90",
            "ratio/log_r_rejected_q50",
            "ratio/implied_ref_mean_r",
            "ratio/log_implied_ref_mean_r",
            "grad_weight/chosen",
            "grad_weight/rejected",
            "grad_weight/top10_share",
            "ema/logps/chosen",
            "ema/rewards/margins",
            "alarm/likelihood_collapse",
        ):
            assert key in r, key
    first = train_records[0]
    # step 1: the policy is the reference, so every log r is 0 and E_ref[r] = 1
    assert abs(first["ratio/log_r_chosen_q50"]) < 1e-5
    assert abs(first["ratio/implied_ref_mean_r"] - 1.0) < 1e-5
    assert first["alarm/likelihood_collapse"] == 0.0
    # DPO's weights: ∂L/∂logp_w = −β σ(−βd) = −0.05 at d = 0, +0.05 on the rejected one
    assert abs(first["grad_weight/chosen"] + 0.05) < 1e-5
    assert abs(first["grad_weight/rejected"] - 0.05) < 1e-5

    # experiments/plot_dynamics.py draws them next to the Figure-2 plot
    out = tmp_path / "figs" / "dyn.png"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "experiments" / "plot_dynamics.py"),
            f"dpo={tmp_path}",
            f"--out={out}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    diag = tmp_path / "figs" / "dyn_diagnostics.png"
    assert diag.stat().st_size > 10_000 and "density-ratio diagnostics" in proc.stdout


def test_diagnostics_off_by_default_keep_the_metrics(tiny_config):
    config = tiny_config(**{"loss.name": "dpo"})
    assert config.train.diagnostics is False
    trainer = train.Trainer(config, mesh=one_device())
    assert trainer.diagnostics is False


def test_collapse_monitor_alarm():
    monitor = CollapseMonitor(decay=0.5)
    assert (
        monitor({"logps/chosen": -10.0, "rewards/margins": 0.0}, 1)["alarm/likelihood_collapse"]
        == 0.0
    )
    out = monitor({"logps/chosen": -12.0, "rewards/margins": 1.0}, 2)  # chosen down, margin up
    assert out["alarm/likelihood_collapse"] == 1.0
    assert out["ema/logps/chosen"] == -11.0 and out["ema/rewards/margins"] == 0.5
    out = monitor({"logps/chosen": -9.0, "rewards/margins": 2.0}, 3)  # chosen up: no alarm
    assert out["alarm/likelihood_collapse"] == 0.0
    assert monitor({"loss": 1.0}, 4) == {}  # losses without rewards (sft): nothing
