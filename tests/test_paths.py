"""The path layer (dil_jax.paths) on a local directory and on a fake ``gs://`` bucket.

The fake bucket is a local directory behind both stacks a real ``gs://`` workdir goes through:
etils.epath's fsspec backend (metrics, markers, caches, reports: dil_jax.paths) and
tensorstore's kvstore (orbax's arrays), so a whole run writes to and resumes from
``gs://bucket/...`` without the network, and nothing may appear as a local ``gs:`` directory.
"""

import json
import os
import pathlib

import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

from dil_jax import checkpointing, loop, paths, train
from dil_jax.data import cache


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """``gs://<bucket>/<path>`` is ``<tmp_path>/gcs/<bucket>/<path>``; returns that root."""
    from etils.epath import backend as epath_backend
    from orbax.checkpoint._src.path import gcs_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

    root = str(tmp_path / "gcs")
    os.makedirs(root)

    def to_local(path: str) -> str:
        rest = path[len("gs://") :]
        # LocalFileSystem lists local paths, which epath's glob prefixes with gs://: keep those
        leaked = "/" + rest.lstrip("/")
        return leaked if leaked.startswith(root) else f"{root}/{rest}".rstrip("/")

    class FakeGCS(LocalFileSystem):
        @classmethod
        def _strip_protocol(cls, path):
            path = os.fspath(path)
            return to_local(path) if path.startswith("gs://") else super()._strip_protocol(path)

    fs = FakeGCS()
    monkeypatch.setattr(epath_backend._FileSystemSpecBackend, "fs", lambda self, path: fs)
    normalize = ts_utils._normalize_path  # tensorstore's kvstore: the file driver under root
    monkeypatch.setattr(
        ts_utils,
        "_normalize_path",
        lambda p: normalize(to_local(p) if p.startswith("gs://") else p),
    )
    # orbax's GCS-only strategies (asking the bucket for its layout, commit files instead of
    # renames, copy-range merges) need the real service: the fake takes the file-system ones
    monkeypatch.setattr(gcs_utils, "is_gcs_path", lambda path: False)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    monkeypatch.chdir(tmp_path)  # a mangled URL would show up as tmp_path/gs:
    return root


@pytest.mark.parametrize("kind", ["local", "gs"])
def test_path_functions(kind, tmp_path, fake_gcs):
    base = str(tmp_path / "local") if kind == "local" else "gs://bucket/dir"
    sub = paths.join(base, "a", "b.txt")
    assert paths.absolute(base) == base and paths.dirname(sub) == paths.join(base, "a")
    assert paths.sibling(base, "cache") == (
        str(tmp_path / "cache") if kind == "local" else "gs://bucket/cache"
    )
    assert not paths.exists(sub) and paths.listdir(base) == []
    paths.write_atomic(sub, "hello")
    assert paths.read_text(sub) == "hello" and paths.isfile(sub) and paths.isdir(paths.dirname(sub))
    paths.save_npy(paths.join(base, "x.npy"), np.arange(3))
    np.testing.assert_array_equal(paths.load_numpy(paths.join(base, "x.npy")), np.arange(3))
    assert sorted(paths.listdir(base)) == ["a", "x.npy"]
    assert [(p.rsplit("/", 1)[-1], n) for p, n in paths.walk_files(paths.join(base, "a"))] == [
        ("b.txt", 5)
    ]
    paths.remove(sub)
    assert not paths.exists(sub)
    arrays = {  # the tokenised-data cache through the layer
        "tokens": np.arange(10, dtype=np.int32),
        "starts": np.array([[0, 3]]),
        "lengths": np.array([[3, 4]]),
        "prompt_lengths": np.array([[1, 1]]),
        "example_id": np.array([0]),
    }
    cache.save(paths.join(base, "cache"), "train", "k", arrays, {"n": 1})
    loaded, report = cache.load(paths.join(base, "cache"), "train", "k")
    np.testing.assert_array_equal(loaded["tokens"], arrays["tokens"])
    assert report == {"n": 1}
    assert not (tmp_path / "gs:").exists()
    if kind == "gs":
        assert open(os.path.join(fake_gcs, "bucket", "dir", "x.npy"), "rb").read(6) == b"\x93NUMPY"


def test_checkpoint_dir_keeps_urls():
    assert checkpointing.checkpoint_dir("gs://b/run/") == "gs://b/run/checkpoints"
    assert checkpointing.checkpoint_dir("rel") == os.path.join(os.getcwd(), "rel", "checkpoints")


def test_run_on_a_gs_workdir_writes_there_and_resumes(tiny_config, tmp_path, fake_gcs):
    """Metrics, checkpoints, the preemption marker and the data report of a tiny run go to the
    fake bucket; a second call resumes from the bucket's checkpoint; nothing lands locally."""
    workdir = "gs://bucket/runs/tiny"
    config = tiny_config(**{"train.tensorboard": True})
    first = train.train_and_evaluate(config, workdir, max_steps=3)
    assert first["step"] == 3
    local = os.path.join(fake_gcs, "bucket", "runs", "tiny")
    assert sorted(os.listdir(os.path.join(local, "checkpoints"))) == ["3"]
    loop.mark_preempted(workdir, 3)  # as a SIGTERM would leave it
    assert open(os.path.join(local, loop.PREEMPTED_MARKER)).read() == "3\n"

    second = train.train_and_evaluate(config, workdir)
    assert second["step"] == 6
    assert not os.path.exists(os.path.join(local, loop.PREEMPTED_MARKER))  # the resume took it
    with open(os.path.join(local, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(os.path.join(local, "checkpoints"))) == ["3", "6"]
    assert checkpointing.read_meta(workdir)["step"] == 6
    # TensorBoard cannot write gs:// without google-cloud-storage: disabled, not a local "gs:"
    assert not (tmp_path / "gs:").exists() and not any("gs:" in p for p in os.listdir(tmp_path))


def test_real_data_from_a_bucket(tmp_path, fake_gcs):
    """Data files read from gs://, the tokenised-data cache written beside a gs:// workdir and
    data_report.json in it; a second build is a cache hit."""
    from data_testing import CHAT_TEMPLATE, files_config, make_tokenizer, pairs, write_jsonl

    from dil_jax.data import pipeline

    os.makedirs(os.path.join(fake_gcs, "bucket", "data"))
    write_jsonl(pathlib.Path(fake_gcs, "bucket", "data", "train.jsonl"), pairs(32))
    tok = make_tokenizer(tmp_path / "tok", chat_template=CHAT_TEMPLATE)
    config = files_config(["gs://bucket/data/train.jsonl"], tok)
    train_ds, _, _ = pipeline.build_datasets(config, workdir="gs://bucket/runs/r")
    assert len(train_ds) == 32
    cached = os.listdir(os.path.join(fake_gcs, "bucket", "runs", "data_cache"))
    assert len(cached) == 1 and cached[0].startswith("tokens-train-")
    report = json.load(open(os.path.join(fake_gcs, "bucket", "runs", "r", "data_report.json")))
    assert report["train"]["cache"]["hit"] is False
    again, _, _ = pipeline.build_datasets(config, workdir="gs://bucket/runs/r")
    np.testing.assert_array_equal(again.tokens, train_ds.tokens)
    assert again.report["train"]["cache"]["hit"] is True
    assert not (tmp_path / "gs:").exists()


def test_hf_and_tokenizer_directories_from_a_bucket(tmp_path, fake_gcs, monkeypatch):
    """A gs:// model/tokenizer directory is copied once into $DIL_JAX_CACHE and read there."""
    from data_testing import CHAT_TEMPLATE, make_tokenizer

    from dil_jax.data import tokenize
    from dil_jax.models import hf

    monkeypatch.setenv("DIL_JAX_CACHE", str(tmp_path / "cache"))
    make_tokenizer(pathlib.Path(fake_gcs, "bucket", "tok"), chat_template=CHAT_TEMPLATE)
    tok = tokenize.load_tokenizer("gs://bucket/tok")
    assert tok.eos_token_id is not None
    local = hf.resolve("gs://bucket/tok")
    assert str(local).startswith(str(tmp_path / "cache")) and (local / "tokenizer.json").is_file()
    assert sorted(p.name for p in local.iterdir()) == sorted(
        os.listdir(os.path.join(fake_gcs, "bucket", "tok"))
    )
