"""Long phases show progress on process 0, and cache hits say so (dil_jax.progress)."""

import jax
import pytest
from data_testing import CHAT_TEMPLATE, files_config, make_tokenizer, pairs, write_jsonl
from test_data_train import one_device, small_run

from dil_jax import progress, reference, train
from dil_jax.data import pipeline


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    tok = make_tokenizer(root / "tok", chat_template=CHAT_TEMPLATE)
    return tok, write_jsonl(root / "train.jsonl.gz", pairs(24))


def test_tokenisation_and_reference_show_bars_then_announce_cache_hits(chat_files, tmp_path, capfd):
    tok, path = chat_files
    config = small_run(
        files_config(
            [path],
            tok,
            **{
                "reference.mode": "precomputed",
                "reference.batch_size": 8,
                "data.cache_dir": str(tmp_path / "cache"),
                "reference.cache_dir": str(tmp_path / "ref"),
            },
        )
    )
    data, _, _ = pipeline.build_datasets(config, workdir=str(tmp_path / "a"))
    err = capfd.readouterr().err
    assert "tokenising" in err and "train records: reading, rendering" in err
    assert "cache hit" not in err
    trainer = train.Trainer(config, mesh=one_device())
    params = trainer.init_state(0).params
    arrays = data.padded(list(range(len(data))), data.buckets[-1] if data.buckets else 64)
    arrays = {k: arrays[k] for k in reference.TOKEN_KEYS}
    reference.with_reference_logps(trainer, params, arrays, config, str(tmp_path / "a"))
    err = capfd.readouterr().err
    assert "reference log-probs: 100%" in err and "cache hit" not in err

    pipeline.build_datasets(config, workdir=str(tmp_path / "b"))
    reference.with_reference_logps(trainer, params, arrays, config, str(tmp_path / "b"))
    err = capfd.readouterr().err
    assert "train data: tokenised-data cache hit, 24 examples loaded from" in err
    assert "reference log-probs: cache hit, loaded" in err
    assert "tokenising" not in err and "reference log-probs: 100%" not in err


def test_only_process_zero_draws_or_announces(monkeypatch, capfd):
    monkeypatch.setattr(progress, "is_chief", lambda: False)
    assert list(progress.bar(range(3), desc="hidden")) == [0, 1, 2]
    progress.announce("hidden too")
    assert "hidden" not in capfd.readouterr().err
    monkeypatch.setattr(progress, "is_chief", lambda: jax.process_index() == 0)
    list(progress.bar(range(3), desc="shown"))
    progress.announce("said")
    err = capfd.readouterr().err
    assert "shown: 100%" in err and "dil_jax: said" in err


def test_gold_evaluation_sampling_shows_a_bar(capfd):
    from conftest import make_tiny_config

    from dil_jax import evaluate
    from dil_jax.data.gold_task import GoldTask

    config = make_tiny_config(**{"eval.gold_prompts": 8, "mesh.shape": (1, 1, 1)})
    trainer = train.Trainer(config, mesh=one_device())
    params = trainer.init_state(0).params
    out = evaluate.gold_evaluation(trainer, GoldTask(), params, params, config)
    assert out["num_prompts"] == 8
    assert "gold evaluation (8 prompts): 100%" in capfd.readouterr().err
