"""Damaged checkpoints never block a resume: the newest good step restores, the bad ones move.

Each case damages a copy of one finished run (steps 3 and 6) the way the issue-10 probe did, then
restores: the expected step comes back with params equal to that step's, one warning names the
step and the reason, and the damaged step directory sits intact under ``checkpoints.damaged/``.
"""

import glob
import logging
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import make_tiny_config

from dil_jax import checkpointing, train
from dil_jax.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny run (checkpoints at steps 3 and 6), shared by every case of the module."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    out = train.train_and_evaluate(make_tiny_config(), str(workdir))
    assert out["step"] == 6
    return workdir, jax.tree.leaves(jax.device_get(out["state"].params))


@pytest.fixture(scope="module")
def trainer():
    return train.Trainer(make_tiny_config())


@pytest.fixture
def run_copy(finished_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run[0], workdir)
    return workdir


def _largest_data_file(step_dir, item):
    files = glob.glob(str(step_dir / item / "ocdbt.process_*" / "d" / "*"))
    return max(files, key=os.path.getsize)


def truncate_params_data(c):
    path = _largest_data_file(c / "6", "params")
    os.truncate(path, os.path.getsize(path) // 2)


def delete_params_manifest(c):
    os.remove(c / "6" / "params" / "manifest.ocdbt")


def delete_opt_state_data(c):
    os.remove(_largest_data_file(c / "6", "opt_state"))


def garbage_meta(c):
    (c / "6" / "meta" / "metadata").write_text("{not json")


def zero_byte_meta(c):
    (c / "6" / "meta" / "metadata").write_text("")


def delete_meta(c):
    shutil.rmtree(c / "6" / "meta")


def empty_latest_step(c):
    shutil.rmtree(c / "6")
    (c / "6").mkdir()


def empty_newer_step(c):  # what an interrupted copy leaves
    (c / "9").mkdir()


def partial_newer_step_without_opt_state(c):
    shutil.copytree(c / "6", c / "9")
    shutil.rmtree(c / "9" / "opt_state")


def newer_step_with_another_steps_meta(c):
    shutil.copytree(c / "6", c / "9")


def delete_step_commit_marker(c):
    os.remove(c / "6" / "commit_success.txt")


def partial_orbax_tmp_dir(c):  # orbax itself ignores these
    shutil.copytree(c / "6", c / "9.orbax-checkpoint-tmp-123")
    shutil.rmtree(c / "9.orbax-checkpoint-tmp-123" / "opt_state")


def delete_checkpoint_metadata(c):  # orbax restores without it
    os.remove(c / "6" / "_CHECKPOINT_METADATA")


# (damage, step restored, moved-aside name or None, words the warning must contain)
CASES = [
    (truncate_params_data, 3, "6-unreadable-params", "OUT_OF_RANGE"),
    (delete_params_manifest, 3, "6-no-manifest-params", "manifest.ocdbt is missing"),
    (delete_opt_state_data, 3, "6-unreadable-opt_state", "could not read opt_state"),
    (garbage_meta, 3, "6-bad-meta", "does not parse as JSON"),
    (zero_byte_meta, 3, "6-bad-meta", "does not parse as JSON"),
    (delete_meta, 3, "6-no-meta", "meta/ is missing"),
    (empty_latest_step, 3, "6-empty", "step directory is empty"),
    (empty_newer_step, 6, "9-empty", "step directory is empty"),
    (partial_newer_step_without_opt_state, 6, "9-no-opt_state", "opt_state/ is missing"),
    (newer_step_with_another_steps_meta, 6, "9-wrong-step", "records step 6"),
    (delete_step_commit_marker, 3, "6-uncommitted", "commit_success.txt"),
    (partial_orbax_tmp_dir, 6, None, None),
    (delete_checkpoint_metadata, 6, None, None),
]


@pytest.mark.parametrize("damage,step,moved,reason", CASES, ids=[c[0].__name__ for c in CASES])
def test_damaged_latest_falls_back_to_the_newest_good_step(
    damage, step, moved, reason, run_copy, trainer, caplog
):
    ckpts = run_copy / "checkpoints"
    damage(ckpts)
    config = make_tiny_config()
    manager = checkpointing.make_manager(str(run_copy), config.checkpoint)
    with caplog.at_level(logging.WARNING):
        state, data_state = checkpointing.restore_latest(manager, trainer, config)
    assert int(state.step) == step and data_state["position"] == step
    expected = checkpointing.load_params(str(run_copy), _abstract_params(trainer), step)
    for a, b in zip(
        jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(expected), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "is damaged (" in r.getMessage()
    ]
    if moved is None:
        assert not warnings and not (run_copy / "checkpoints.damaged").exists()
        return
    assert len(warnings) == 1, warnings
    assert f"step {moved.split('-')[0]} " in warnings[0] and reason in warnings[0]
    assert f"resumed from step {step}" in warnings[0]
    aside = run_copy / "checkpoints.damaged" / moved
    assert aside.is_dir() and not (ckpts / moved.split("-")[0]).exists()
    # The manager no longer sees the moved step: the next save of that number is a fresh one.
    assert manager.latest_step() == step
    manager.close()


def _abstract_params(trainer):
    return jax.tree.map(
        checkpointing._abstract, trainer.abstract_state.params, trainer.state_sharding.params
    )


def test_rerun_after_damage_finishes_bit_identical(finished_run, run_copy):
    truncate_params_data(run_copy / "checkpoints")
    out = train.train_and_evaluate(make_tiny_config(), str(run_copy))
    assert out["step"] == 6
    for a, b in zip(
        jax.tree.leaves(jax.device_get(out["state"].params)), finished_run[1], strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert (run_copy / "checkpoints" / "6" / "commit_success.txt").exists()
    assert (run_copy / "checkpoints.damaged" / "6-unreadable-params").is_dir()


def test_no_usable_checkpoint_stops_listing_each_step_and_moves_nothing(run_copy, trainer):
    ckpts = run_copy / "checkpoints"
    zero_byte_meta(ckpts)
    os.remove(ckpts / "3" / "params" / "manifest.ocdbt")
    config = make_tiny_config()
    manager = checkpointing.make_manager(str(run_copy), config.checkpoint)
    with pytest.raises(
        CheckpointError,
        match=r"step 6: meta/metadata does not parse.*step 3: "
        r"params/manifest.ocdbt is missing",
    ):
        checkpointing.restore_latest(manager, trainer, config)
    assert sorted(p.name for p in ckpts.iterdir()) == ["3", "6"]
    assert not (run_copy / "checkpoints.damaged").exists()
    # The training loop stops too instead of starting over.
    with pytest.raises(CheckpointError):
        train.train_and_evaluate(config, str(run_copy))


def test_checkpoint_from_another_run_is_refused_not_skipped(run_copy, trainer, tmp_path):
    other = tmp_path / "other"
    train.train_and_evaluate(
        make_tiny_config(**{"model.hidden_size": 32, "train.steps": 3}), str(other)
    )
    ckpts = run_copy / "checkpoints"
    shutil.rmtree(ckpts / "6")
    shutil.copytree(other / "checkpoints" / "3", ckpts / "6")  # renumbered by the copy
    config = make_tiny_config()
    manager = checkpointing.make_manager(str(run_copy), config.checkpoint)
    with pytest.raises(ConfigError, match=r"model\.hidden_size: checkpoint has 32, config has 64"):
        checkpointing.restore_latest(manager, trainer, config)
    assert (ckpts / "6").is_dir() and not (run_copy / "checkpoints.damaged").exists()


def test_state_that_does_not_fit_is_a_config_error_not_damage(run_copy):
    # A run whose state shapes differ (here: a narrower model, as an optimiser change would
    # change opt_state) while the recorded config passes the RESUME_MUST_MATCH comparison.
    config = make_tiny_config()
    trainer = train.Trainer(make_tiny_config(**{"model.hidden_size": 32}))
    manager = checkpointing.make_manager(str(run_copy), config.checkpoint)
    with pytest.raises(
        ConfigError,
        match=r"does not fit this run's state .*params entries "
        r"differ.*checkpoint has \(64",
    ):
        checkpointing.restore_latest(manager, trainer, config)
    assert not (run_copy / "checkpoints.damaged").exists()


def test_load_params_skips_damage_without_moving_it(run_copy, trainer, caplog):
    truncate_params_data(run_copy / "checkpoints")
    abstract = _abstract_params(trainer)
    with caplog.at_level(logging.WARNING):
        params = checkpointing.load_params(str(run_copy), abstract)
    step3 = checkpointing.load_params(str(run_copy), abstract, 3)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(step3), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any("step 6" in r.getMessage() for r in caplog.records)
    assert (run_copy / "checkpoints" / "6").is_dir()
    with pytest.raises(CheckpointError, match=r"step 6: orbax could not read params"):
        checkpointing.load_params(str(run_copy), abstract, 6)
    with pytest.raises(CheckpointError, match=r"no checkpoint step 7"):
        checkpointing.load_params(str(run_copy), abstract, 7)


def test_read_meta_for_export_skips_a_damaged_latest(run_copy):
    zero_byte_meta(run_copy / "checkpoints")
    assert checkpointing.read_meta(str(run_copy))["step"] == 3
    with pytest.raises(CheckpointError, match=r"step 6: meta/metadata does not parse"):
        checkpointing.read_meta(str(run_copy), 6)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint 7"):
        checkpointing.read_meta(str(run_copy), 7)
