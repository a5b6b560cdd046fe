"""Command-line entry point: flags only.

  python -m dil_jax.main --config=configs/quickstart.py --workdir=/tmp/quickstart \
      --config.loss.name=dil_lsif

Runtime guards live here and never on import: threefry-partitionable RNG (identical random
numbers whatever the sharding) and, with ``--debug_nans``, NaN checks.
"""

from __future__ import annotations

import json

import jax
from absl import app, flags
from ml_collections import config_flags

from dil_jax import evaluate, train
from dil_jax.runtime import exit_on_bad_input, parse_flags, quiet_absl_logging

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a get_config() file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, results.")
_DEBUG_NANS = flags.DEFINE_bool("debug_nans", False, "Raise at the first NaN (slow).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_absl_logging()
    jax.config.update("jax_threefry_partitionable", True)
    if _DEBUG_NANS.value:
        jax.config.update("jax_debug_nans", True)
    with exit_on_bad_input():
        summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    summary.pop("state")
    if jax.process_index() == 0:
        if "gold" in summary:
            print(evaluate.format_gold_table(summary["gold"]))
        print(
            json.dumps(
                {"step": summary["step"], "train": summary["train"], "eval": summary["eval"]},
                indent=1,
            )
        )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
