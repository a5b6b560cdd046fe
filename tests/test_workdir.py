"""One run per workdir (a lock a second real process is refused by) and a writable workdir."""

import errno
import json
import logging
import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO

from dil_jax import workdir as wd
from dil_jax.errors import InputError, WorkdirError

HOLD = (
    "import sys, time\nfrom dil_jax import workdir\n"
    "with workdir.lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(600)\n"
)


def test_second_run_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path, caplog):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        with pytest.raises(
            WorkdirError,
            match=rf"workdir {tmp_path} is in use by another run "
            rf"\(pid {holder.pid} on host ",
        ):
            with wd.lock(str(tmp_path)):
                pass
        assert isinstance(WorkdirError("x"), InputError)  # printed as one line, exit 2
    finally:
        holder.kill()  # SIGKILL: no cleanup, the lock file stays behind
        holder.wait()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder.pid
    with caplog.at_level(logging.WARNING), wd.lock(str(tmp_path)):
        record = json.loads((tmp_path / ".lock").read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert any(f"stale lock of pid {holder.pid}" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / ".lock").exists()
    with wd.lock(str(tmp_path)):  # released: the next run locks without a warning
        pass


def test_without_flock_the_pid_decides(tmp_path, monkeypatch, caplog):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(wd.fcntl, "flock", no_flock)
    lock_file = tmp_path / ".lock"
    host = socket.gethostname()
    lock_file.write_text(json.dumps({"pid": os.getppid(), "host": host}))  # alive
    with pytest.raises(WorkdirError, match=rf"in use by another run \(pid {os.getppid()}"):
        with wd.lock(str(tmp_path)):
            pass
    lock_file.write_text(json.dumps({"pid": 12345, "host": "elsewhere"}))
    with pytest.raises(WorkdirError, match=r"pid 12345 on host elsewhere.*delete .*\.lock"):
        with wd.lock(str(tmp_path)):
            pass
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_file.write_text(json.dumps({"pid": dead.pid, "host": host}))
    with caplog.at_level(logging.WARNING), wd.lock(str(tmp_path)):
        pass
    assert any(f"stale lock of pid {dead.pid}" in r.getMessage() for r in caplog.records)


def test_unwritable_workdirs_are_one_clear_error(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(WorkdirError, match=r"is a file, expected a directory"):
        wd.check_writable(str(a_file))
    with pytest.raises(WorkdirError, match=r"workdir .*/file/run is not writable"):
        wd.check_writable(str(a_file / "run"))
    with pytest.raises(WorkdirError, match=r"MiB free, less than"):
        wd.check_writable(str(tmp_path), min_free_bytes=2**60)
    wd.check_writable(str(tmp_path / "new"))  # created
    assert (tmp_path / "new").is_dir() and not list((tmp_path / "new").iterdir())


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc (read-only)")
def test_read_only_filesystem(tmp_path):
    with pytest.raises(WorkdirError, match=r"workdir /proc/self/dil_jax_run is not writable"):
        wd.check_writable("/proc/self/dil_jax_run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(WorkdirError, match=r"not writable: Permission denied"):
            wd.check_writable(str(tmp_path))
    finally:
        tmp_path.chmod(0o700)
