"""``python -m dil_jax.launch --dry-run``: the exact gcloud/srun commands, and overrides with
spaces and parentheses arriving intact in ``dil_jax.main``'s argv on the host (the printed
commands' inner shell scripts are run with a stub ``python`` that records its arguments)."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from dil_jax import launch

RUN = [
    "--config=configs/dil.py",
    "--workdir=gs://bucket/runs/a b",
    "--config.mesh.shape=(2, 8, 1)",
    "--config.train.wandb_project=it's (quoted)",
]


def dry_run(argv, capsys, env=None, monkeypatch=None):
    if env is not None:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    assert launch.main(["--dry-run", *argv, "--", *RUN]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return [shlex.split(line) for line in lines]


def stub_python(tmp_path):
    """A ``python`` on PATH that writes its argv (after ``-m dil_jax.main``) as JSON."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "python"
    stub.write_text(
        f"#!{sys.executable}\nimport json, sys, os\n"
        "open(os.environ['ARGV_OUT'] + '.' + os.environ.get('SLURM_PROCID', 't'), 'w')"
        ".write(json.dumps(sys.argv[1:]))\nprint('host log line')\n"
    )
    stub.chmod(0o755)
    return str(bin_dir)


def test_tpu_dry_run_prints_the_gcloud_command(capsys, tmp_path):
    [cmd] = dry_run(
        ["tpu", "--name", "my-pod", "--zone", "us-east5-b", "--project", "proj"], capsys
    )
    assert cmd[:8] == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        "my-pod",
        "--zone=us-east5-b",
        "--project=proj",
    ]
    assert cmd[8] == "--worker=all" and cmd[9].startswith("--command=")
    remote = cmd[9][len("--command=") :]
    assert 'pip install -q -e ".[tpu]"' in remote and "cd ~/dil_jax" in remote
    # the remote script, run by a worker's shell, hands main exactly the given flags
    remote = remote.replace("cd ~/dil_jax", f"cd {tmp_path}").replace(
        'pip install -q -e ".[tpu]"', "true"
    )
    env = dict(os.environ, PATH=stub_python(tmp_path) + ":" + os.environ["PATH"])
    env["ARGV_OUT"] = str(tmp_path / "argv")
    env["HOME"] = str(tmp_path)
    subprocess.run(["bash", "-c", remote], check=True, env=env)
    assert json.loads((tmp_path / "argv.t").read_text()) == ["-m", "dil_jax.main", *RUN]
    assert (tmp_path / "dil_jax_run.log").read_text() == "host log line\n"  # each host's log


def test_slurm_dry_run_wires_jax_distributed_from_the_environment(capsys, monkeypatch, tmp_path):
    env = {"SLURM_JOB_NODELIST": "gpu[07-08,10],login1", "SLURM_NTASKS": "4"}
    [cmd] = dry_run(
        ["slurm", "--srun_args=--gpus-per-task=8 --kill-on-bad-exit=1"], capsys, env, monkeypatch
    )
    assert cmd[:5] == ["srun", "--gpus-per-task=8", "--kill-on-bad-exit=1", "bash", "-c"]
    bin_dir = stub_python(tmp_path)
    for procid in ("0", "3"):
        run_env = dict(os.environ, PATH=bin_dir + ":" + os.environ["PATH"])
        run_env.update(SLURM_PROCID=procid, ARGV_OUT=str(tmp_path / "argv"))
        out = subprocess.run(
            ["bash", "-c", cmd[5]], check=True, env=run_env, cwd=tmp_path, capture_output=True
        ).stdout.decode()
        assert out == ("host log line\n" if procid == "0" else "")  # task 0's log streamed
        assert json.loads((tmp_path / f"argv.{procid}").read_text()) == [
            "-m",
            "dil_jax.main",
            *RUN,
            "--config.mesh.coordinator_address=gpu07:8476",
            "--config.mesh.num_processes=4",
            f"--config.mesh.process_id={procid}",
        ]
        assert (tmp_path / f"dil_jax_run.log.{procid}").exists()


def test_slurm_outside_an_allocation_says_so(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    with pytest.raises(SystemExit, match="inside an allocation"):
        launch.main(["--dry-run", "slurm", "--", *RUN])


def test_run_flags_are_required(capsys):
    with pytest.raises(SystemExit):
        launch.main(["--dry-run", "tpu", "--name", "p", "--zone", "z"])
    assert "--config=CONFIG --workdir=WORKDIR" in capsys.readouterr().err


def test_expand_nodelist():
    assert launch.expand_nodelist("a[1-3],b,c[09-10,12]x") == [
        "a1",
        "a2",
        "a3",
        "b",
        "c09x",
        "c10x",
        "c12x",
    ]
