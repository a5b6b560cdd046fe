"""Command-line entry point for iterative / online alignment: flags only.

  python -m dil_jax.online.main --config=configs/online_gold_ditto.py --workdir=/tmp/ditto

Runs ``dil_jax.online.iterative.run_online`` (rounds of sample → pairs → train, as described by
the config's ``online`` section), resuming from the workdir, and prints the per-round table
(also in ``<workdir>/rounds.jsonl``).
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from dil_jax import loop
from dil_jax.online import iterative
from dil_jax.runtime import exit_on_bad_input, parse_flags, quiet_absl_logging

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a get_config() file with an 'online' section.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
flags.mark_flags_as_required(["config", "workdir"])

COLUMNS = ("round", "gold_reward", "win_rate", "kl", "response_length", "sample_gold_reward")


def rounds_table(rows) -> str:
    """Markdown table of the per-round rows (columns a row lacks are left blank)."""
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_absl_logging()
    jax.config.update("jax_threefry_partitionable", True)
    with exit_on_bad_input():
        try:
            out = iterative.run_online(_CONFIG.value, _WORKDIR.value)
        except loop.Preempted as e:
            print(e, file=sys.stderr)
            sys.exit(loop.PREEMPTED_EXIT_CODE)
    if jax.process_index() == 0:
        print(rounds_table(out["rounds"]))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
