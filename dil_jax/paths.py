"""One path layer for every file dil_jax reads or writes outside orbax: local paths and URLs.

The workdir, the data and reference caches, data files, HF directories, ``metrics.jsonl``,
markers and reports may be local paths or URLs (``gs://bucket/run``, ``s3://``, whatever
``etils.epath`` resolves; orbax and tensorstore already write ``gs://`` themselves). Every
function here takes and returns plain strings, so callers keep ``str`` paths:

* a local path behaves exactly as with ``os.path`` (``absolute`` is ``os.path.abspath``;
  replacement is an atomic ``os.replace``);
* a URL is never passed through ``os.path.abspath``/``normpath`` (which would turn
  ``gs://b/run`` into ``$PWD/gs:/b/run``), is joined with ``/``, and goes through
  ``epath.Path``. Object stores have no rename; :func:`write_atomic` writes the object in one
  upload instead (an object is visible whole or not at all), and there is no ``flock``
  (:mod:`dil_jax.workdir` skips it with a warning).
"""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import posixpath
import shutil
from collections.abc import Iterator

import numpy as np
from etils import epath


def is_local(path) -> bool:
    """True for a POSIX path (or ``file://`` URL), False for ``gs://``-style URLs."""
    p = os.fspath(path)
    return "://" not in p or p.startswith("file://")


def _local(path) -> str:
    p = os.fspath(path)
    return p[len("file://") :] if p.startswith("file://") else p


def absolute(path) -> str:
    """``os.path.abspath`` for local paths; a URL unchanged (trailing ``/`` dropped)."""
    p = os.fspath(path)
    return os.path.abspath(_local(p)) if is_local(p) else p.rstrip("/")


def join(base, *parts: str) -> str:
    p = os.fspath(base)
    if is_local(p):
        return os.path.join(p, *parts)
    return posixpath.join(p.rstrip("/") or p, *parts)


def dirname(path) -> str:
    p = absolute(path)
    if is_local(p):
        return os.path.dirname(p)
    scheme, rest = p.split("://", 1)
    return f"{scheme}://{posixpath.dirname(rest)}" if "/" in rest else p


def sibling(path, name: str) -> str:
    """``<parent of path>/<name>`` (the default cache directories beside a workdir)."""
    return join(dirname(path), name)


def _epath(path) -> epath.Path:
    return epath.Path(os.fspath(path))


def exists(path) -> bool:
    return os.path.exists(_local(path)) if is_local(path) else _epath(path).exists()


def isdir(path) -> bool:
    return os.path.isdir(_local(path)) if is_local(path) else _epath(path).is_dir()


def isfile(path) -> bool:
    return exists(path) and not isdir(path)


def makedirs(path) -> None:
    if is_local(path):
        os.makedirs(_local(path), exist_ok=True)
    else:
        _epath(path).mkdir(parents=True, exist_ok=True)


def listdir(path) -> list[str]:
    """Entry names (not paths) of a directory; ``[]`` when it does not exist."""
    if not isdir(path):
        return []
    if is_local(path):
        return os.listdir(_local(path))
    return [p.name for p in _epath(path).iterdir()]


def remove(path, *, missing_ok: bool = True) -> None:
    if is_local(path):
        try:
            os.remove(_local(path))
        except FileNotFoundError:
            if not missing_ok:
                raise
    elif not missing_ok or exists(path):
        _epath(path).unlink()


def open(path, mode: str = "r"):  # noqa: A001 - the layer's open, as in epath/gfile
    """A file object for ``path`` (local: the builtin ``open``)."""
    if is_local(path):
        return builtins.open(_local(path), mode)
    return _epath(path).open(mode)


def read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_text(path) -> str:
    with open(path) as f:
        return f.read()


def write_atomic(path, data: bytes | str) -> str:
    """Writes the whole file so that readers see the old content or the new, never a part.

    Local: a temporary file beside it, then ``os.replace``. URL: one object upload (object
    stores publish an object only when its upload completes).
    """
    blob = data.encode() if isinstance(data, str) else data
    makedirs(dirname(path))
    if is_local(path):
        local = _local(path)
        tmp = f"{local}.tmp-{os.getpid()}"
        with builtins.open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, local)
    else:
        with open(path, "wb") as f:
            f.write(blob)
    return os.fspath(path)


def save_npy(path, array) -> str:
    """``np.save`` through :func:`write_atomic`."""
    buf = io.BytesIO()
    np.save(buf, array)
    return write_atomic(path, buf.getvalue())


def load_numpy(path):
    """``np.load`` of a ``.npy``/``.npz`` file anywhere (URLs are read into memory first)."""
    if is_local(path):
        return np.load(_local(path), allow_pickle=False)
    return np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)


def walk_files(path) -> Iterator[tuple[str, int]]:
    """``(path, size in bytes)`` of every file under ``path``."""
    if is_local(path):
        for root, _, files in os.walk(_local(path)):
            for name in files:
                full = os.path.join(root, name)
                yield full, os.path.getsize(full)
        return
    stack = [_epath(path)]  # iterdir keeps the scheme (epath's walk/rglob may not)
    while stack:
        for p in stack.pop().iterdir():
            if p.is_dir():
                stack.append(p)
            else:
                yield os.fspath(p), p.stat().length


def move(src, dst) -> None:
    """Moves a file or directory tree (local: ``shutil.move``; URL: epath rename)."""
    if is_local(src) and is_local(dst):
        shutil.move(_local(src), _local(dst))
    else:
        _epath(src).rename(_epath(dst))


def local_copy(path) -> str:
    """A local path holding the file or directory ``path``: itself when local, else a copy
    downloaded once into ``$DIL_JAX_CACHE`` (default ``~/.cache/dil_jax``)``/remote/<hash>/``.

    For readers that need real files (safetensors memory maps, ``transformers`` tokenizers):
    ``model.hf_path``, ``data.tokenizer``. Files already there with the same size are not
    fetched again; each file is written to a temporary name and renamed, so processes sharing
    a host may copy concurrently.
    """
    p = os.fspath(path)
    if is_local(p):
        return _local(p)
    root = os.environ.get("DIL_JAX_CACHE") or os.path.expanduser("~/.cache/dil_jax")
    url = p.rstrip("/")
    dest = os.path.join(
        root, "remote", hashlib.sha256(url.encode()).hexdigest()[:16], url.rsplit("/", 1)[-1]
    )
    files = list(walk_files(url)) if isdir(url) else [(url, _epath(url).stat().length)]
    for src, size in files:
        rel = src[len(url) :].lstrip("/")
        target = os.path.join(dest, rel) if rel else dest
        if os.path.isfile(target) and os.path.getsize(target) == size:
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.tmp-{os.getpid()}"
        with open(src, "rb") as fin, builtins.open(tmp, "wb") as fout:
            while chunk := fin.read(1 << 24):
                fout.write(chunk)
        os.replace(tmp, target)
    return dest
