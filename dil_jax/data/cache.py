"""On-disk cache of tokenised datasets, keyed by a content hash of everything that shapes them.

The key covers the data (the files' bytes, or hub id + split + config + revision), the
tokenizer's content (vocabulary, merges, normaliser, chat template, special tokens), the
rendering options (template mode, prompt/response templates), the lengths and truncation
policy, the format options (format, field map) and the bad-record policy; a change to any of
them is a different file, so a stale cache cannot be read. Bucket lengths and packing are not in
the key: they are applied to the cached ragged arrays at batching time.

One ``.npz`` per split holds the ragged arrays and the JSON report of the build that produced
them, so a cache hit reproduces the counts of ``data_report.json`` without re-reading anything.
Writes are atomic (temporary file then rename; one object upload on a URL cache_dir, through
:mod:`dil_jax.paths`): a reader never sees a half-written file. In a multi-process run process 0
builds and writes, the others wait for it and read the file (``pipeline._build_split``).
Loads verify the file (zip CRCs, array consistency); a damaged one is rebuilt with a warning.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging

import numpy as np

from dil_jax import paths

CACHE_VERSION = 2  # bump when the tokenisation changes what it produces (2: long prompts cut)
ARRAY_KEYS = ("tokens", "starts", "lengths", "prompt_lengths", "example_id")
OPTIONAL_KEYS = ("labels",)  # [n] per-example arrays some formats add (KTO's labels)


def content_key(parts: dict) -> str:
    """A short sha256 of JSON-serialisable ``parts`` (plus the cache version)."""
    blob = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def path_for(cache_dir: str, split: str, key: str) -> str:
    return paths.join(cache_dir, f"tokens-{split}-{key}.npz")


def load(cache_dir: str, split: str, key: str) -> tuple[dict, dict] | None:
    """``(arrays, report dict)`` from the cache, or None on a miss or a damaged file.

    A damaged file (truncated, garbled: the zip's CRC-32 catches flipped bytes; arrays that do
    not fit together) is a miss with a warning, so the caller rebuilds and overwrites it: a bad
    cache file never blocks the runs that share it.
    """
    path = path_for(cache_dir, split, key)
    if not paths.exists(path):
        return None
    try:
        with paths.load_numpy(path) as f:
            present = tuple(k for k in OPTIONAL_KEYS if k in f.files)
            arrays = {k: f[k] for k in ARRAY_KEYS + present}
            report = json.loads(str(f["report"]))
        _check(arrays, report)
    except Exception as e:  # noqa: BLE001 - zip, npy, JSON and shape errors share no base
        logging.warning(
            "tokenised-data cache %s is damaged (%s: %s); rebuilding it",
            path,
            type(e).__name__,
            str(e)[:200],
        )
        return None
    return arrays, report


def _check(arrays: dict, report) -> None:
    """Raises ValueError unless the ragged arrays index each other consistently."""
    tokens, starts, lengths = arrays["tokens"], arrays["starts"], arrays["lengths"]
    if not isinstance(report, dict):
        raise ValueError("the stored report is not a JSON object")
    if (
        tokens.ndim != 1
        or starts.ndim != 2
        or starts.shape != lengths.shape
        or (
            arrays["prompt_lengths"].shape != starts.shape
            or arrays["example_id"].shape != starts.shape[:1]
        )
    ):
        raise ValueError("array shapes do not fit together")
    if any(arrays[k].shape != starts.shape[:1] for k in OPTIONAL_KEYS if k in arrays):
        raise ValueError("per-example arrays do not fit the number of examples")
    if starts.size and (
        starts.min() < 0 or lengths.min() < 0 or (starts + lengths).max() > tokens.size
    ):
        raise ValueError("starts/lengths point outside the token array")


def save(cache_dir: str, split: str, key: str, arrays: dict, report: dict) -> str:
    path = path_for(cache_dir, split, key)
    buf = io.BytesIO()
    np.savez(
        buf,
        report=np.array(json.dumps(report)),
        **{k: arrays[k] for k in ARRAY_KEYS + OPTIONAL_KEYS if k in arrays},
    )
    return paths.write_atomic(path, buf.getvalue())
