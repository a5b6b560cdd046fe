"""Real data through the trainer: bounded compiles, reference cache, resume, the debug configs."""

import json

import jax
import numpy as np
import pytest
from conftest import REPO
from data_testing import CHAT_TEMPLATE, files_config, make_tokenizer, pairs, write_jsonl

from dil_jax import checkpointing, config_files, logprobs, sharding, train
from dil_jax.data import pipeline


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    tok = make_tokenizer(root / "tok", chat_template=CHAT_TEMPLATE)
    return tok, write_jsonl(root / "train.jsonl.gz", pairs(48))


def one_device():
    return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def small_run(config, *, tiny_model: bool = True, **overrides):
    """One device, no progress bar or tensorboard, synchronous saves; a width-16 model."""
    defaults = {
        "mesh.shape": (1, 1, 1),
        "train.progress_bar": False,
        "train.tensorboard": False,
        "checkpoint.async_save": False,
    }
    if tiny_model:
        defaults.update(
            {
                "model.hidden_size": 16,
                "model.intermediate_size": 32,
                "model.num_hidden_layers": 1,
                "model.num_attention_heads": 2,
                "model.num_key_value_heads": 1,
            }
        )
    for dotted, value in {**defaults, **overrides}.items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def test_step_compiles_once_per_bucket(chat_files):
    tok, path = chat_files
    config = small_run(files_config([path], tok, **{"data.buckets": (32, 48)}))
    data, _, _ = pipeline.build_datasets(config)
    trainer = train.Trainer(config, mesh=one_device())
    it = pipeline.make_iterator(data, 4, seed=0)
    state = trainer.init_state(0)
    ref = trainer.init_state(0).params
    shapes, steps = set(), 0
    while len(shapes) < 2 or steps < 3:  # until two buckets have come up, and a repeat
        batch = next(it)
        shapes.add(batch["input_ids"].shape)
        state, _ = trainer.run_step(state, batch, ref)
        steps += 1
    assert trainer.trace_count == len(shapes) == 2 < steps


def test_precomputed_reference_per_bucket_matches_inline(chat_files, tmp_path):
    tok, path = chat_files
    config = small_run(
        files_config(
            [path],
            tok,
            **{
                "data.buckets": (32, 48),
                "reference.mode": "precomputed",
                "reference.batch_size": 8,
            },
        )
    )
    data, _, _ = pipeline.build_datasets(config)
    trainer = train.Trainer(config, mesh=one_device())
    params = trainer.init_state(0).params
    from dil_jax import reference

    with_ref = pipeline.with_reference(
        data,
        lambda a: reference.with_reference_logps(trainer, params, a, config, str(tmp_path / "run")),
    )
    assert with_ref.extras["ref_logps"].shape == (len(data), 2)
    # Each example's reference was computed at its own bucket length; padding it to the longest
    # bucket must not change it.
    rows = np.arange(8)
    batch = with_ref.padded(rows, 64)
    with jax.set_mesh(trainer.mesh):
        logps = jax.jit(
            lambda p, b: logprobs.sequence_logps(trainer.model, trainer.family, p, b).sum_logps
        )(params, {k: batch[k] for k in ("input_ids", "attention_mask", "loss_mask")})
    np.testing.assert_allclose(np.asarray(logps), batch["ref_logps"], atol=1e-4)


def test_interrupted_real_data_run_resumes_at_the_saved_data_position(chat_files, tmp_path):
    """The bucketed iterator's state goes into the orbax checkpoint and comes back exactly."""
    tok, path = chat_files
    config = small_run(
        files_config(
            [path], tok, **{"data.buckets": (32, 48), "train.steps": 3, "checkpoint.every_steps": 1}
        )
    )
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir, mesh=one_device(), max_steps=2)  # interrupted
    data, _, _ = pipeline.build_datasets(config)
    expected = pipeline.make_iterator(data, config.train.global_batch_size, seed=config.data.seed)
    for _ in range(2):
        next(expected)
    manager = checkpointing.make_manager(workdir, config.checkpoint)
    assert manager.latest_step() == 2
    trainer = train.Trainer(config, mesh=one_device())
    _, saved = checkpointing.restore_latest(manager, trainer, config)
    assert saved == expected.get_state()
    resumed = pipeline.make_iterator(data, config.train.global_batch_size, seed=config.data.seed)
    resumed.set_state(saved)
    np.testing.assert_array_equal(next(resumed)["example_id"], next(expected)["example_id"])
    summary = train.train_and_evaluate(config, workdir, mesh=one_device())  # resumes, step 3
    assert summary["step"] == 3
    manager = checkpointing.make_manager(workdir, config.checkpoint)  # sees the new steps
    _, final = checkpointing.restore_latest(manager, trainer, config)
    assert final == expected.get_state()
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["train"]["cache"]["hit"] is True  # the resumed run read the cached tokens
    assert 0 <= report["run_padding"]["padding_fraction"] < 1


REAL_CONFIGS = [
    "dil_ultrafeedback_debug.py",
    "dil_hh_harmless_debug.py",
    "dil_alpaca_demos_debug.py",
    "sft_alpaca_gpt4_debug.py",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_debug_config_trains_on_real_data(shared_data, tmp_path, name):
    """Each real-data config for 2 steps and one evaluation.

    To save CPU time: batches of 4 and one padded length (max_length) so the step compiles
    once; the bucketed compiles are checked by test_step_compiles_once_per_bucket.
    """
    config = config_files.load(REPO / "configs" / name).get_config()
    small_run(
        config,
        tiny_model=False,
        **{
            "train.steps": 2,
            "train.global_batch_size": 4,
            "eval.every_steps": 2,
            "eval.batch_size": 4,
            "eval.num_batches": 1,
            "data.buckets": (),
            "data.cache_dir": str(tmp_path / "cache"),
        },
    )
    summary = train.train_and_evaluate(config, str(tmp_path / "run"), mesh=one_device())
    assert summary["step"] == 2 and np.isfinite(summary["train"]["loss"])
    assert np.isfinite(summary["eval"]["loss"])
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["train"]["examples"] >= 64 and report["eval"]["examples"] >= 8
    assert 0 <= report["run_padding"]["padding_fraction"] < 1
    # Prompts longer than the whole budget are cut to max_prompt_length, never dropped.
    assert "prompt_too_long" not in report["train"]["bad_records"]
    if name == "dil_hh_harmless_debug.py":
        assert report["train"]["counts"]["prompt_longer_than_max_length"] == 278
        assert report["train"]["counts"]["hh_marker_inside_reply"] == 5
        assert report["train"]["bad_records"]["empty_response"] == 4
    if name == "dil_alpaca_demos_debug.py":
        assert report["train"]["format"] == "demonstration_pairs"
        # 2 empty text-davinci-003 outputs, 10 identical to GPT-4's (long prompts are cut)
        assert report["train"]["bad_records"]["empty_response"] == 2
        assert report["train"]["bad_records"]["identical_responses"] == 10
