"""Where every record went: counts, bad-record policy, and the ``data_report.json`` file.

Real data is messy (malformed lines, empty replies, prompts longer than the context). The rule
here is that no record disappears silently: each one is kept, transformed in a counted way
(truncated, EOS appended, token boundary repaired) or rejected with a reason. With
``on_bad_record='error'`` the first rejection stops the run with a message naming the file,
the line and the field; with ``'skip'`` it is counted, and the first few are quoted, in the
report that the trainer writes to ``<workdir>/data_report.json``.
"""

from __future__ import annotations

import collections
import dataclasses
import json

from dil_jax import paths
from dil_jax.errors import ConfigError, DataError

BAD_RECORD_POLICIES = ("error", "skip")
MAX_EXAMPLES = 20  # rejected records quoted verbatim in the report, per split


@dataclasses.dataclass(frozen=True)
class Location:
    """Where a record came from: a file (or hub dataset) and a 1-based line, row or element."""

    source: str
    line: int
    unit: str = "line"  # 'line' (jsonl/json text), 'row' (parquet, hub)

    def __str__(self) -> str:
        return (
            f"{self.source}:{self.line}"
            if self.unit == "line"
            else f"{self.source} {self.unit} {self.line}"
        )


class BadRecord(Exception):
    """Raised by format parsers and the tokeniser for one unusable record.

    Attributes:
      field: the offending field (``None`` when the whole record is unreadable).
      reason: a short code counted in the report (``missing_field``, ``empty_response`` ...).
      detail: a human explanation.
    """

    def __init__(self, field: str | None, reason: str, detail: str):
        super().__init__(detail)
        self.field, self.reason, self.detail = field, reason, detail


@dataclasses.dataclass
class SplitReport:
    """Counts for one split (train or eval); JSON-serialisable through ``to_dict``."""

    name: str
    on_bad_record: str = "error"
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    bad: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    bad_examples: list = dataclasses.field(default_factory=list)
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.on_bad_record not in BAD_RECORD_POLICIES:
            raise ConfigError(
                f"config.data.on_bad_record={self.on_bad_record!r}: expected one "
                f"of {BAD_RECORD_POLICIES}"
            )

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def reject(self, location: Location, err: BadRecord) -> None:
        """Applies the bad-record policy: raise :class:`DataError`, or count and continue."""
        where = f"{location}: " + (f"field {err.field!r}: " if err.field else "")
        message = f"{where}{err.detail} [{err.reason}]"
        if self.on_bad_record == "error":
            raise DataError(
                f"bad {self.name} record at {message}. Fix the data, or set "
                "config.data.on_bad_record='skip' to skip such records and count "
                "them in data_report.json."
            )
        self.bad[err.reason] += 1
        if len(self.bad_examples) < MAX_EXAMPLES:
            self.bad_examples.append(message)

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    def to_dict(self) -> dict:
        return {
            "counts": dict(sorted(self.counts.items())),
            "bad_records": dict(sorted(self.bad.items())),
            "num_bad_records": self.num_bad,
            "bad_record_examples": list(self.bad_examples),
            **self.info,
        }

    @classmethod
    def from_dict(cls, name: str, on_bad_record: str, d: dict) -> SplitReport:
        """Inverse of ``to_dict`` (a cached dataset carries the report of its first build)."""
        known = ("counts", "bad_records", "num_bad_records", "bad_record_examples")
        return cls(
            name,
            on_bad_record,
            collections.Counter(d.get("counts", {})),
            collections.Counter(d.get("bad_records", {})),
            list(d.get("bad_record_examples", [])),
            {k: v for k, v in d.items() if k not in known},
        )


def write_report(workdir: str, report: dict) -> str:
    """Writes ``<workdir>/data_report.json`` atomically; returns its path."""
    path = paths.join(workdir, "data_report.json")
    return paths.write_atomic(path, json.dumps(report, indent=2, sort_keys=True, default=str))
