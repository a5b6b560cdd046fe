"""Two JAX processes (2 x 4 CPU devices, gloo collectives) train like one 8-device process.

This exercises the real multi-host code paths: ``jax.distributed.initialize`` from config,
per-process data slices assembled with ``make_array_from_process_local_data``, and orbax
checkpoints written cooperatively by both processes.
"""

import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO

from dil_jax import train

WORKER = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
sys.path.insert(0, {tests!r})
from conftest import make_tiny_config
from dil_jax import train
import numpy as np
pid, port, workdir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
config = make_tiny_config(**{{"mesh.shape": (8, 1, 1)}})
config.mesh.coordinator_address = f"127.0.0.1:{{port}}"
config.mesh.num_processes = 2
config.mesh.process_id = pid
summary = train.train_and_evaluate(config, workdir)
assert jax.process_count() == 2 and len(jax.devices()) == 8
from jax.experimental import multihost_utils
leaves = [np.asarray(multihost_utils.process_allgather(x, tiled=True))
          for x in jax.tree.leaves(summary["state"].params)]
if pid == 0:
    np.savez(out, *leaves, loss=summary["train"]["loss"])
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_a_single_process(tiny_config, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(REPO / "tests")))
    port = str(free_port())
    out = tmp_path / "params.npz"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), port, str(tmp_path / "mh"), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=600)[0].decode() for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    single = train.train_and_evaluate(
        tiny_config(**{"mesh.shape": (8, 1, 1)}), str(tmp_path / "single")
    )
    multi = np.load(out)
    for i, leaf in enumerate(jax.tree.leaves(jax.device_get(single["state"].params))):
        np.testing.assert_allclose(multi[f"arr_{i}"], leaf, atol=1e-5, rtol=0)
    assert abs(float(multi["loss"]) - single["train"]["loss"]) < 1e-5
    steps = sorted(
        int(p.name) for p in (tmp_path / "mh" / "checkpoints").iterdir() if p.name.isdigit()
    )
    assert steps[-1] == 6
