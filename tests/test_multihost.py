"""Two JAX processes (2 x 4 CPU devices, gloo collectives) train like one 8-device process.

This exercises the real multi-host code paths: ``jax.distributed.initialize`` from config,
per-process data slices assembled with ``make_array_from_process_local_data``, and orbax
checkpoints written cooperatively by both processes.
"""

import json
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO

from dil_jax import train

WORKER = r"""
import os, sys
os.environ["XLA_FLAGS"] = (
    "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
)
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


# Shared start of the workers below: 2 processes x 4 CPU devices, gloo collectives.
PRELUDE = r"""
import os, sys, json
os.environ["XLA_FLAGS"] = (
    "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
)
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
sys.path.insert(0, {tests!r})
from conftest import make_tiny_config
from dil_jax import train
import numpy as np
pid, port, workdir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]

def distributed(config):
    config.mesh.coordinator_address = f"127.0.0.1:{{port}}"
    config.mesh.num_processes = 2
    config.mesh.process_id = pid
    return config
"""

DATA_WORKER = (
    PRELUDE
    + r"""
from data_testing import files_config
from dil_jax import paths
from dil_jax.data import cache, pipeline
saves, built = [], {{}}
save = cache.save
def counting_save(cache_dir, split, *a, **k):
    saves.append(split)
    return save(cache_dir, split, *a, **k)
cache.save = counting_save
ref_saves = []
save_npy = paths.save_npy
def counting_save_npy(path, array):
    ref_saves.append(path)
    return save_npy(path, array)
paths.save_npy = counting_save_npy
build_split = pipeline._build_split
def capturing(split, *a, **k):
    ds, report = build_split(split, *a, **k)
    built[split] = ds
    return ds, report
pipeline._build_split = capturing
tokenised = []
tokenise_split = pipeline._tokenise_split
def counting_tokenise(read, config, tok, report, key):
    tokenised.append(key)
    return tokenise_split(read, config, tok, report, key)
pipeline._tokenise_split = counting_tokenise
config = files_config([sys.argv[5]], sys.argv[6], **{{
    "mesh.shape": (8, 1, 1), "train.global_batch_size": 16, "train.steps": 2,
    "reference.mode": "precomputed", "reference.batch_size": 8,
    "data.cache_dir": sys.argv[7], "reference.cache_dir": sys.argv[8]}})
train.train_and_evaluate(distributed(config), workdir)
ds = built["train"]
np.savez(out + f".{{pid}}.npz", tokens=ds.tokens, starts=ds.starts, lengths=ds.lengths)
print("SAVES", json.dumps({{"data": saves, "reference": len(ref_saves),
                           "tokenised": len(tokenised)}}))
"""
)


@pytest.mark.slow
def test_one_process_tokenises_and_the_other_reads_its_cache(tmp_path):
    """Process 0 tokenises and writes the data cache while process 1 waits at a barrier and
    loads it (no second tokenisation, no second write); the reference log-probs are written once;
    both processes end with the same arrays."""
    from data_testing import CHAT_TEMPLATE, make_tokenizer, pairs, write_jsonl

    tok = make_tokenizer(tmp_path / "tok", chat_template=CHAT_TEMPLATE)
    data = write_jsonl(tmp_path / "train.jsonl", pairs(64))
    script = tmp_path / "worker.py"
    script.write_text(DATA_WORKER.format(tests=str(REPO / "tests")))
    port, out = str(free_port()), str(tmp_path / "arrays")
    data_cache, ref_cache = tmp_path / "data_cache", tmp_path / "ref_cache"
    args = [str(tmp_path / "mh"), out, data, tok, str(data_cache), str(ref_cache)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), port, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=600)[0].decode() for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    saves = [json.loads(log.split("SAVES ")[-1].splitlines()[0]) for log in logs]
    assert saves[0]["data"] == ["train"] and saves[1]["data"] == []  # written once, by 0
    assert saves[0]["reference"] >= 1 and saves[1]["reference"] == 0
    assert saves[0]["tokenised"] == 1 and saves[1]["tokenised"] == 0  # 1 read 0's file
    assert len(list(data_cache.glob("tokens-train-*.npz"))) == 1
    a, b = (np.load(f"{out}.{i}.npz") for i in range(2))
    for k in ("tokens", "starts", "lengths"):
        np.testing.assert_array_equal(a[k], b[k])


STOP_WORKER = (
    PRELUDE
    + r"""
from dil_jax.runtime import exit_on_bad_input
config = make_tiny_config(**{{"mesh.shape": (8, 1, 1), "train.steps": 100000,
                             "checkpoint.every_steps": 100000}})
with exit_on_bad_input():  # SIGTERM -> checkpoint -> exit status 75, as dil_jax.main
    train.train_and_evaluate(distributed(config), workdir)
"""
)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    """SIGTERM reaches process 1 only: both processes agree on the stop, save the same step and
    exit with loop.PREEMPTED_EXIT_CODE."""
    from dil_jax import loop

    script = tmp_path / "worker.py"
    script.write_text(STOP_WORKER.format(tests=str(REPO / "tests")))
    port, workdir = str(free_port()), tmp_path / "mh"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), port, str(workdir), "-"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 400
    metrics = workdir / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == loop.PREEMPTED_EXIT_CODE, log[-4000:]
    stopped = [int(log.split("preempted at step ")[-1].split(";")[0]) for log in logs]
    assert stopped[0] == stopped[1], stopped
    assert (workdir / loop.PREEMPTED_MARKER).read_text() == f"{stopped[0]}\n"
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps == [stopped[0]]
