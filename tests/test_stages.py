"""Multi-stage runs as explicit stage lists (dil_jax/stages.py)."""

import os

import pytest

from dil_jax import checkpointing, metrics, spec, stages, train
from dil_jax.errors import ConfigError


def pretrain_config(tiny_config):
    config = tiny_config(**{"loss.name": "dpo"})
    pre = tiny_config(**{"loss.name": "sft", "data.format": "sft", "train.steps": 3})
    config.init.mode = "pretrain"
    config.init.pretrain = pre
    return config


def test_plan_unrolls_pretrain_into_stages(tiny_config, tmp_path):
    config = pretrain_config(tiny_config)
    planned = stages.plan(spec.build(config), str(tmp_path))
    assert [(s.name, s.workdir) for s in planned] == [
        ("base", str(tmp_path / "base")),
        ("train", str(tmp_path)),
    ]
    assert planned[0].config.loss.name == "sft"
    last = planned[1].config
    assert (last.init.mode, last.init.checkpoint_dir) == ("checkpoint", str(tmp_path / "base"))
    assert stages.plan(last, str(tmp_path)) == [stages.Stage("train", last, str(tmp_path))]
    config.init.pretrain.model.hidden_size = 32
    with pytest.raises(ConfigError, match="config.init.pretrain.model.*must equal config.model"):
        spec.build(config)


@pytest.mark.slow
def test_stages_run_in_order_and_each_resumes(tiny_config, tmp_path):
    config = pretrain_config(tiny_config)
    out = train.train_and_evaluate(config, str(tmp_path), max_steps=2)
    assert out["step"] == 2
    assert checkpointing.read_meta(str(tmp_path / "base"))["step"] == 3  # base ran to the end
    base_records = len(metrics.read_metrics(str(tmp_path / "base")))
    out = train.train_and_evaluate(config, str(tmp_path))  # base restores, nothing retrained
    assert out["step"] == 6
    assert len(metrics.read_metrics(str(tmp_path / "base"))) == base_records
    assert os.path.isdir(tmp_path / "checkpoints")
