"""The optional Weights & Biases writer (train.wandb_project), in offline mode: a run and its
resume log to one W&B run id, kept in the workdir. Needs no network and no account."""

import importlib.util
import os

import pytest

from dil_jax import metrics, train

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None,
    reason="wandb is not installed (pip install 'dil_jax[wandb]')",
)


def test_a_run_and_its_resume_write_to_one_wandb_run(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    config = tiny_config(**{"train.wandb_project": "dil-jax-test"})
    workdir = str(tmp_path / "run")
    assert train.train_and_evaluate(config, workdir, max_steps=3)["step"] == 3
    run_id = open(os.path.join(workdir, metrics.WANDB_ID_FILE)).read().strip()
    assert run_id
    assert train.train_and_evaluate(config, workdir)["step"] == 6
    assert open(os.path.join(workdir, metrics.WANDB_ID_FILE)).read().strip() == run_id
    runs = sorted(d for d in os.listdir(tmp_path / "wb" / "wandb") if d.startswith("offline-run"))
    assert len(runs) == 2, runs
    assert all(d.endswith(f"-{run_id}") for d in runs), (runs, run_id)
    for d in runs:  # each session's data file exists and is non-empty
        [data] = [f for f in os.listdir(tmp_path / "wb" / "wandb" / d) if f.endswith(".wandb")]
        assert os.path.getsize(tmp_path / "wb" / "wandb" / d / data) > 0


def test_wandb_mode_is_validated(tiny_config):
    from dil_jax import spec
    from dil_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="train.wandb_mode"):
        spec.build(tiny_config(**{"train.wandb_mode": "sometimes"}), num_devices=8)
