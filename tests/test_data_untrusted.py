"""Untrusted and damaged data inputs: no repository code runs, damaged caches rebuild, and a
wrong path says what is actually wrong."""

import json
import logging
import os

import numpy as np
import pytest
from data_testing import CHAT_TEMPLATE, files_config, make_tokenizer, pairs, write_jsonl

from dil_jax.data import pipeline, tokenize
from dil_jax.data.report import DataError

EVIL = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


def _evil_dir(root, *, tokenizer_config=None, config=None):
    root.mkdir()
    marker = root.parent / f"{root.name}-ran"
    (root / "evil.py").write_text(EVIL.format(marker=str(marker)))
    if tokenizer_config is not None:
        (root / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    return root, marker


AUTO_MAP = {"AutoTokenizer": ["evil.EvilTokenizer", None]}


@pytest.mark.parametrize(
    "files",
    [
        {"tokenizer_config": {"tokenizer_class": "EvilTokenizer", "auto_map": AUTO_MAP}},
        {"tokenizer_config": {}, "config": {"model_type": "evil", "auto_map": AUTO_MAP}},
    ],
    ids=["tokenizer_config_auto_map", "config_json_auto_map"],
)
def test_tokenizer_code_in_the_directory_never_runs(tmp_path, files):
    directory, marker = _evil_dir(tmp_path / "tok", **files)
    with pytest.raises(DataError, match=r"auto_map .*dil_jax never runs repository code"):
        tokenize.load_tokenizer(str(directory))
    assert not marker.exists()


def test_unknown_tokenizer_class_fails_without_running_code(tmp_path):
    directory, marker = _evil_dir(
        tmp_path / "tok", tokenizer_config={"tokenizer_class": "EvilTokenizer"}
    )
    with pytest.raises(DataError, match=r"could not load"):
        tokenize.load_tokenizer(str(directory))
    assert not marker.exists()


def test_auto_map_next_to_a_tokenizer_json_loads_the_data_only(tmp_path):
    directory = make_tokenizer(tmp_path / "tok", chat_template=CHAT_TEMPLATE)
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    (tmp_path / "tok" / "tokenizer_config.json").write_text(
        json.dumps({**config, "auto_map": AUTO_MAP})
    )
    (tmp_path / "tok" / "evil.py").write_text(EVIL.format(marker=str(tmp_path / "ran")))
    tok = tokenize.load_tokenizer(directory)
    assert tok.eos_token == "</s>" and not (tmp_path / "ran").exists()


@pytest.mark.parametrize(
    "spec", ["/no/such/tokenizer", "./missing-tok", "a/b/c", "missing/tokenizer.json"]
)
def test_missing_local_tokenizer_path_says_so(spec):
    with pytest.raises(DataError, match=r"the path does not exist"):
        tokenize.load_tokenizer(spec)


def test_directory_given_as_a_data_file(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    for name in ("shards.jsonl", "shards"):  # with a data suffix, and without one
        (tmp_path / name).mkdir()
        config = files_config([str(tmp_path / name)], tok, **{"data.eos_token": "</s>"})
        with pytest.raises(DataError, match=rf"{name} is a directory, expected a file"):
            pipeline.build_datasets(config, workdir=str(tmp_path / "run"))


def _truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


def _garble(path):
    blob = bytearray(open(path, "rb").read())
    for i in range(len(blob) // 3, len(blob) // 3 + 64):
        blob[i] ^= 0x5A
    open(path, "wb").write(bytes(blob))


def _zero(path):
    open(path, "wb").close()


@pytest.mark.parametrize(
    "damage", [_truncate, _garble, _zero], ids=["truncated", "garbled", "zero_bytes"]
)
def test_damaged_cache_file_is_rebuilt(tmp_path, damage, caplog):
    tok = make_tokenizer(tmp_path / "tok", chat_template=CHAT_TEMPLATE)
    config = files_config([write_jsonl(tmp_path / "d.jsonl", pairs(20))], tok)
    work = str(tmp_path / "runs" / "a")
    first = pipeline.build_datasets(config, workdir=work)[0]
    path = first.report["train"]["cache"]["file"]
    damage(path)
    with caplog.at_level(logging.WARNING):
        rebuilt = pipeline.build_datasets(config, workdir=work)[0]
    assert rebuilt.report["train"]["cache"]["hit"] is False
    assert any(
        "is damaged" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records
    )
    for key in ("tokens", "starts", "lengths", "prompt_lengths", "example_id"):
        np.testing.assert_array_equal(getattr(rebuilt, key), getattr(first, key))
    again = pipeline.build_datasets(config, workdir=work)[0]  # the rewritten file is whole
    assert again.report["train"]["cache"]["hit"] is True
