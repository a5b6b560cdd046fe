"""Raw records from local files or the Hugging Face hub, each with its location.

Local files: ``.jsonl`` (one JSON object per line), ``.json`` (one JSON array of objects, e.g.
AlpacaEval's ``model_outputs.json``) and ``.parquet``, each optionally gzipped (``.jsonl.gz``,
``.json.gz``, ``.parquet.gz``). Hub datasets: ``datasets.load_dataset(hub_id, name, split=...,
revision=...)``; a local directory of data files works as a hub id too (the tests use that).

Every record comes with a :class:`~dil_jax.data.report.Location` so that any later rejection
names its file and line. Per-line problems of JSON Lines files (malformed JSON, non-UTF-8
bytes, a value that is not an object) are bad records under ``on_bad_record``. A ``.json`` file
is one document: if it does not parse the whole file is unusable, and that always stops the run
(with the line of the error).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterator

from dil_jax import paths as fs  # `paths` is a common argument name here
from dil_jax.data.report import BadRecord, DataError, Location, SplitReport

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def file_kind(path: str) -> str:
    """'jsonl', 'json' or 'parquet' from the name (a trailing ``.gz`` is allowed)."""
    name = path[:-3] if path.endswith(".gz") else path
    for suffix in FILE_SUFFIXES:
        if name.endswith(suffix):
            return suffix[1:]
    raise DataError(
        f"data file {path}: unsupported name; expected one of "
        f"{', '.join(s + '[.gz]' for s in FILE_SUFFIXES)}"
    )


def require_file(path: str) -> None:
    """DataError saying what is wrong with a data file path: missing, a directory, special."""
    if fs.isdir(path):
        raise DataError(
            f"data file {path} is a directory, expected a file (list the files "
            "inside it, e.g. data.train_files=('dir/a.jsonl', 'dir/b.jsonl'))"
        )
    if not fs.exists(path):
        raise DataError(f"data file {path} does not exist")
    if fs.is_local(path) and not os.path.isfile(path):
        raise DataError(f"data file {path} is not a regular file")


def _read_bytes(path: str) -> bytes:
    require_file(path)
    raw = fs.read_bytes(path)  # local paths and gs:// URLs (dil_jax.paths)
    if path.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"data file {path}: not a valid gzip file ({e})") from e
    return raw


def _jsonl_records(path: str, raw: bytes, report: SplitReport):
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        loc = Location(path, lineno)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            report.reject(
                loc,
                BadRecord(
                    None,
                    "not_utf8",
                    f"bytes {line[e.start : e.end]!r} at column {e.start + 1} are not valid UTF-8",
                ),
            )
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            report.reject(
                loc,
                BadRecord(None, "malformed_json", f"malformed JSON ({e.msg} at column {e.colno})"),
            )
            continue
        if not isinstance(record, dict):
            report.reject(
                loc,
                BadRecord(
                    None, "not_an_object", f"expected a JSON object, got {type(record).__name__}"
                ),
            )
            continue
        yield loc, record


def _json_records(path: str, raw: bytes, report: SplitReport):
    """Elements of a top-level JSON array, each located at the line where it starts."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"data file {path}:{line}: bytes {raw[e.start : e.end]!r} are not valid "
            "UTF-8 (a .json file is read as one document)"
        ) from e
    decoder = json.JSONDecoder()
    idx, n, line, counted_to = 0, len(text), 1, 0

    def skip(i):
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def line_at(i):
        nonlocal line, counted_to
        line += text.count("\n", counted_to, i)
        counted_to = i
        return line

    idx = skip(idx)
    if idx >= n or text[idx] != "[":
        raise DataError(
            f"data file {path}: expected a JSON array of records (use .jsonl for "
            "one object per line)"
        )
    idx = skip(idx + 1)
    if idx < n and text[idx] == "]":
        return
    while True:
        try:
            record, end = decoder.raw_decode(text, idx)
        except json.JSONDecodeError as e:
            raise DataError(
                f"data file {path}:{e.lineno}: malformed JSON ({e.msg} at column "
                f"{e.colno}); a .json file is read as one document"
            ) from e
        loc = Location(path, line_at(idx))
        if isinstance(record, dict):
            yield loc, record
        else:
            report.reject(
                loc,
                BadRecord(
                    None, "not_an_object", f"expected a JSON object, got {type(record).__name__}"
                ),
            )
        idx = skip(end)
        if idx < n and text[idx] == ",":
            idx = skip(idx + 1)
        elif idx < n and text[idx] == "]":
            return
        else:
            raise DataError(
                f"data file {path}:{line_at(min(idx, n))}: malformed JSON array "
                "(expected ',' or ']')"
            )


def _parquet_records(path: str, raw: bytes, report: SplitReport):
    import pyarrow.parquet as pq  # noqa: PLC0415 (a datasets dependency; only parquet needs it)

    try:
        table = pq.read_table(io.BytesIO(raw))
    except Exception as e:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"data file {path}: not a readable parquet file ({e})") from e
    for i, record in enumerate(table.to_pylist(), start=1):
        yield Location(path, i, "row"), record


def read_files(paths, report: SplitReport, max_records: int = 0) -> Iterator[tuple]:
    """Yields ``(location, record dict)`` from local files in order.

    Args:
      paths: file paths; kinds from their names.
      report: receives bad lines (or raises under ``on_bad_record='error'``).
      max_records: stop after this many records (0: all), for quick debug runs.
    """
    readers = {"jsonl": _jsonl_records, "json": _json_records, "parquet": _parquet_records}
    yielded = 0
    for path in paths:
        require_file(path)  # before the name: a directory is not 'an unsupported name'
        reader = readers[file_kind(path)]
        for item in reader(path, _read_bytes(path), report):
            yield item
            yielded += 1
            if max_records and yielded >= max_records:
                return


def read_hub(
    hub_id: str,
    split: str,
    *,
    name: str = "",
    revision: str = "",
    max_records: int = 0,
    data_dir: str = "",
) -> Iterator[tuple]:
    """Yields ``(location, record dict)`` from ``datasets.load_dataset`` (hub id or local dir);
    ``data_dir`` picks a sub-folder of the dataset (``Anthropic/hh-rlhf``: ``helpful-base``)."""
    import datasets  # noqa: PLC0415 (heavy import, only this source needs it)

    try:
        ds = datasets.load_dataset(
            hub_id,
            name or None,
            split=split,
            revision=revision or None,
            data_dir=data_dir or None,
        )
    except Exception as e:  # hub, network and builder errors have no common base class
        raise DataError(
            f"config.data.hub_id={hub_id!r} split={split!r}: could not load "
            f"({type(e).__name__}: {e})"
        ) from e
    if max_records:
        ds = ds.select(range(min(max_records, len(ds))))
    for i, record in enumerate(ds, start=1):
        yield Location(f"{hub_id}[{split}]", i, "row"), record


def files_digest(paths) -> str:
    """sha256 over the names' order and the files' bytes (the cache key's data part)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(os.path.basename(path).encode() + b"\0")
        require_file(path)
        with fs.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def hub_digest(hub_id: str, split: str, name: str, revision: str, data_dir: str = "") -> str:
    """The hub part of a cache key; a local directory used as ``hub_id`` is hashed by content."""
    key = [hub_id, split, name, revision] + ([data_dir] if data_dir else [])
    h = hashlib.sha256(json.dumps(key).encode())
    if os.path.isdir(hub_id):
        files = sorted(os.path.join(root, f) for root, _, fs in os.walk(hub_id) for f in fs)
        h.update(files_digest(files).encode())
    return h.hexdigest()
