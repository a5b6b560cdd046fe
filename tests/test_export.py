"""Export precision (dil_jax.export): the default dtype is the training dtype, and a lower one
warns with the share of weights left bit-identical to the base."""

import json
import logging

import jax
import numpy as np
import pytest
from conftest import make_tiny_config

from dil_jax import export, train


@pytest.fixture(scope="module")
def small_update_run(tmp_path_factory):
    """A base run, then a run from its checkpoint with preference-sized (tiny) updates."""
    root = tmp_path_factory.mktemp("export")
    base = make_tiny_config(
        **{"train.steps": 2, "checkpoint.every_steps": 2, "loss.name": "sft", "data.format": "sft"}
    )
    train.train_and_evaluate(base, str(root / "base"))
    run = make_tiny_config(
        **{
            "train.steps": 2,
            "checkpoint.every_steps": 2,
            "loss.name": "sft",
            "data.format": "sft",
            "init.mode": "checkpoint",
            "init.checkpoint_dir": str(root / "base"),
            "optim.learning_rate": 1e-6,
            "optim.warmup_ratio": 0.0,
        }
    )
    train.train_and_evaluate(run, str(root / "run"))
    return root


def test_lower_precision_warns_with_the_unchanged_fraction(small_update_run, tmp_path, caplog):
    workdir = str(small_update_run / "run")
    with caplog.at_level(logging.WARNING):
        export.main([f"--workdir={workdir}", f"--out={tmp_path / 'bf16'}", "--dtype=bfloat16"])
    (message,) = [r.getMessage() for r in caplog.records if "bit-identical" in r.getMessage()]
    low = float(message.split("float32 params as bfloat16: ")[1].split(" %")[0])
    full = float(message.split("against ")[1].split(" %")[0])
    # 1e-6 steps move float32 weights but mostly vanish below bfloat16's 8-bit mantissa.
    assert low > 50 and full < low, message
    assert "--dtype=float32" in message
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"


def test_default_dtype_is_the_training_dtype(small_update_run, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        export.main([f"--workdir={small_update_run / 'run'}", f"--out={tmp_path / 'out'}"])
    assert not [r for r in caplog.records if "bit-identical" in r.getMessage()]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "float32"  # config.model.param_dtype of the run


def test_unchanged_fraction_counts_bits():
    base = {"w": jax.numpy.ones((4,), np.float32)}
    moved = {"w": jax.numpy.array([1.0, 1.0 + 1e-6, 1.5, 1.0], np.float32)}
    assert export.unchanged_fraction(moved, base, "float32") == 0.5
    assert export.unchanged_fraction(moved, base, "bfloat16") == 0.75
