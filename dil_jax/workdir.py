"""One run per workdir, and a workdir the run can write: checked once, before any work.

``lock(workdir)`` holds ``<workdir>/.lock`` (pid, host, start time, command line) for the run's
lifetime. The lock is a kernel ``flock`` on that file, so it dies with its process: a second run
on the same workdir is refused with the holder's pid and host, while a lock file left by a killed
run is taken over with a warning. Where the filesystem has no ``flock`` (some network mounts),
the pid in the file is checked instead (same host only; another host's lock is refused, naming
it). ``check_writable(workdir)`` turns a read-only, full or misnamed workdir into one line at
start instead of a traceback at the first save.

Multi-host runs share one workdir: only process 0 takes the lock (the others get a no-op).

A workdir on object storage (``gs://``, any URL :mod:`dil_jax.paths` handles) cannot be
flocked and has no pids: ``lock`` only warns there (and ``check_writable`` writes and deletes
one object). Two runs on one bucket path are then not detected: give each run its own workdir.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time

import jax

from dil_jax import paths
from dil_jax.errors import WorkdirError

LOCK_NAME = ".lock"


@contextlib.contextmanager
def lock(workdir: str):
    """Holds ``<workdir>/.lock`` while the block runs; removes it on exit.

    Raises:
      WorkdirError: another live process holds the lock (the message names the workdir, pid and
        host), or the lock file cannot be created.
    """
    if jax.process_index() != 0:
        yield
        return
    if not paths.is_local(workdir):
        check_writable(workdir)
        logging.warning(
            "workdir %s is on object storage, which has no file locks: a second run on the same "
            "workdir would not be refused (give each run its own workdir)",
            workdir,
        )
        yield
        return
    workdir = os.path.abspath(workdir)
    path = os.path.join(workdir, LOCK_NAME)
    check_writable(workdir)
    fd = _acquire(path, workdir)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)  # before the flock is released, so nobody reads our stale record
        os.close(fd)


def _acquire(path: str, workdir: str) -> int:
    """An open, flocked descriptor of ``path`` carrying this process's record."""
    for _ in range(10):  # retries only when a releasing holder unlinked the file under us
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_record(fd)
            os.close(fd)
            raise WorkdirError(
                f"workdir {workdir} is in use by another run ({_describe(holder)} holds "
                f"{path}); wait for it to finish, stop it, or use another --workdir"
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            _check_pid_only(fd, path, workdir)  # no flock here: fall back to the pid
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                previous = _read_record(fd)
                if previous and (previous.get("pid"), previous.get("host")) != _me():
                    logging.warning(
                        "workdir %s: taking over the stale lock of %s, which no longer runs",
                        workdir,
                        _describe(previous),
                    )
                _write_record(fd)
                return fd
        os.close(fd)  # the file was replaced between open and flock: try again
    raise WorkdirError(f"could not lock {path}: it keeps being replaced by another process")


def _check_pid_only(fd: int, path: str, workdir: str) -> None:
    holder = _read_record(fd)
    if not holder or (holder.get("pid"), holder.get("host")) == _me():
        return
    if holder.get("host") != socket.gethostname():
        os.close(fd)
        raise WorkdirError(
            f"workdir {workdir} is locked by {_describe(holder)} and this filesystem cannot "
            f"tell whether that run is alive; delete {path} if it is not"
        )
    if _pid_alive(holder.get("pid")):
        os.close(fd)
        raise WorkdirError(
            f"workdir {workdir} is in use by another run ({_describe(holder)} "
            f"holds {path}); wait for it to finish, stop it, or use another "
            "--workdir"
        )


def _me() -> tuple[int, str]:
    return os.getpid(), socket.gethostname()


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _read_record(fd: int) -> dict | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        record = json.loads(os.read(fd, 65536).decode() or "null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_record(fd: int) -> None:
    pid, host = _me()
    record = {
        "pid": pid,
        "host": host,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
    }
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(record) + "\n").encode())
    os.fsync(fd)


def _describe(record: dict | None) -> str:
    if not record:
        return "a process that left no record"
    return (
        f"pid {record.get('pid')} on host {record.get('host')}, started "
        f"{record.get('started', '?')}"
    )


def check_writable(workdir: str, *, min_free_bytes: int = 0) -> None:
    """Creates ``workdir`` if needed and proves a file can be written there.

    Args:
      min_free_bytes: also refuse when the filesystem has less free space than this (e.g. a
        few checkpoints' worth); 0 checks writability only.
    Raises:
      WorkdirError: naming the workdir and what is wrong (not a directory, read-only, no
        permission, no space).
    """
    if not paths.is_local(workdir):
        probe = paths.join(workdir, f".write-check-{socket.gethostname()}-{os.getpid()}")
        try:
            paths.write_atomic(probe, b"x")
            paths.remove(probe)
        except OSError as e:
            raise WorkdirError(f"workdir {workdir} is not writable: {e}") from None
        return
    workdir = os.path.abspath(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"workdir {workdir} is a file, expected a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-check-") as f:
            f.write(b"x")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise WorkdirError(f"workdir {workdir} is not writable: {e.strerror or e}") from None
    if min_free_bytes:
        free = shutil.disk_usage(workdir).free
        if free < min_free_bytes:
            raise WorkdirError(
                f"workdir {workdir} has {free / 2**20:.0f} MiB free, less than "
                f"the {min_free_bytes / 2**20:.0f} MiB this run needs"
            )
