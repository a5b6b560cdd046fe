"""The checkpointed loop: exact resume, refusal of incompatible configs, SIGTERM saves."""

import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, one_device_env

from dil_jax import checkpointing, loop, metrics, sharding, train


def params_of(summary):
    return jax.tree.leaves(jax.device_get(summary["state"].params))


def test_interrupted_and_resumed_run_is_bit_identical(tiny_config, tmp_path):
    config = tiny_config(**{"mesh.shape": (2, 2, 2)})
    full = train.train_and_evaluate(config, str(tmp_path / "full"))
    first = train.train_and_evaluate(config, str(tmp_path / "resumed"), max_steps=3)
    assert first["step"] == 3
    # A step logged after the last checkpoint (lost in a crash) is dropped on resume.
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")
    second = train.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert second["step"] == 6
    for a, b in zip(params_of(full), params_of(second), strict=True):
        np.testing.assert_array_equal(a, b)
    # The data position was restored too: the resumed run logged the same losses.
    log = [json.loads(line) for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    ref = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert [r["loss"] for r in log] == [r["loss"] for r in ref]
    meta = json.load(open(tmp_path / "resumed" / "checkpoints" / "6" / "meta" / "metadata"))
    assert meta["data"]["position"] == 6 and meta["config"]["loss"]["name"] == "dil_lsif"


def test_resume_on_a_different_mesh(tiny_config, tmp_path):
    """Interrupted on (8,1,1), resumed on (2,2,2) and on 4 devices: the same losses and params
    as the uninterrupted run on the original mesh (1e-5)."""
    config = tiny_config(**{"mesh.shape": (8, 1, 1)})
    full = train.train_and_evaluate(config, str(tmp_path / "full"))
    train.train_and_evaluate(config, str(tmp_path / "part"), max_steps=3)
    config.mesh.shape = (2, 2, 2)  # resharded on restore
    train.train_and_evaluate(config, str(tmp_path / "part"), max_steps=2)
    config.mesh.shape = (1, 2, 2)  # and onto fewer devices
    out = train.train_and_evaluate(
        config,
        str(tmp_path / "part"),
        mesh=sharding.make_mesh((1, 2, 2), devices=jax.devices()[:4]),
    )
    assert out["step"] == 6

    def losses(run):
        return [r["loss"] for r in metrics.read_metrics(str(tmp_path / run)) if "loss" in r]

    np.testing.assert_allclose(losses("part"), losses("full"), atol=1e-5, rtol=0)
    for a, b in zip(
        jax.tree.leaves(jax.device_get(full["state"].params)),
        jax.tree.leaves(jax.device_get(out["state"].params)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_incompatible_checkpoint_refuses_to_resume(tiny_config, tmp_path):
    train.train_and_evaluate(tiny_config(), str(tmp_path), max_steps=3)
    with pytest.raises(ValueError, match=r"model\.hidden_size: checkpoint has 64, config has 32"):
        train.train_and_evaluate(tiny_config(**{"model.hidden_size": 32}), str(tmp_path))
    with pytest.raises(ValueError, match=r"loss\.name"):
        train.train_and_evaluate(tiny_config(**{"loss.name": "dpo"}), str(tmp_path))
    # Nothing was lost: the original config still resumes.
    assert train.train_and_evaluate(tiny_config(), str(tmp_path))["step"] == 6


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_before_exit(tmp_path):
    workdir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "dil_jax.main",
        f"--config={REPO}/configs/base.py",
        f"--workdir={workdir}",
        "--config.train.steps=100000",
        "--config.train.log_every=1",
        "--config.checkpoint.every_steps=100000",
        "--config.eval.every_steps=0",
        "--config.train.progress_bar=False",
        "--config.data.num_train=256",
        "--config.train.global_batch_size=16",
    ]
    env = one_device_env()
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
        time.sleep(0.5)
    assert metrics.exists(), proc.communicate()[0].decode()[-3000:]
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=240)[0].decode()
    assert proc.returncode == loop.PREEMPTED_EXIT_CODE, out[-3000:]  # not "finished"
    assert "Traceback" not in out, out[-3000:]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and 0 < steps[-1] < 100000
    last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert steps[-1] == last_logged
    assert (workdir / loop.PREEMPTED_MARKER).read_text().strip() == str(steps[-1])


def test_checkpoint_predating_a_field_resumes_only_with_its_old_behaviour():
    old = {"model": {"family": "llama"}, "data": {"max_length": 64}, "seed": 0}
    new = {
        "model": {"family": "llama", "attention": "auto"},
        "data": {"max_length": 64, "prefix_sharing": False},
        "seed": 0,
    }
    assert checkpointing.incompatibilities(old, new) == []
    new["data"]["prefix_sharing"] = True  # a layout the old code never trained
    assert checkpointing.incompatibilities(old, new) == [
        "data.prefix_sharing: checkpoint has None, config has True"
    ]
