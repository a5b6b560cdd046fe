"""Command-line entry point for alignment from demonstrations: flags only.

  python -m dil_jax.afd.main --config=configs/afd_gold.py --workdir=/tmp/afd_gold
  python -m dil_jax.afd.main --config=configs/afd_gold.py --workdir=/tmp/afd_adv \
      --method=adversarial

``--method=extrapolation`` (default) runs ``extrapolation.run_extrapolation`` (SFT, reward
models, Best-of-N); ``--method=adversarial`` runs reverse-KL adversarial imitation of the
demonstrations (dil_jax.afd.adversarial) from π_0. Each is an explicit stage list
(``extrapolation.plan``) and resumes from the workdir stage by stage.

The results print as markdown tables; the same numbers go to ``<workdir>/afd_summary.json``
(the extrapolation's full results, per-prompt values included, are in ``afd_results.json``).
"""

from __future__ import annotations

import json
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from dil_jax.afd import extrapolation as afd
from dil_jax.runtime import exit_on_bad_input, parse_flags, quiet_absl_logging

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a get_config() file with an 'afd' section.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_METHOD = flags.DEFINE_enum(
    "method",
    "extrapolation",
    ["extrapolation", "adversarial"],
    "Reward-model extrapolation with Best-of-N, or adversarial imitation.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_absl_logging()
    jax.config.update("jax_threefry_partitionable", True)
    config, workdir = _CONFIG.value, _WORKDIR.value
    with exit_on_bad_input():
        if _METHOD.value == "extrapolation":
            results = afd.run_extrapolation(config, workdir)
            summary = {
                "reward_models": results["reward_models"],
                "bon": {
                    k: [
                        {m: v for m, v in row.items() if not m.endswith("per_prompt")}
                        for row in rows
                    ]
                    for k, rows in results["bon"].items()
                },
                **{
                    k: results[k]
                    for k in ("demo_gold", "sft_gold", "init_sample_gold")
                    if k in results
                },
            }
        else:
            summary = afd.run_pipeline(config, workdir, method="adversarial").results
    if jax.process_index() == 0:
        path = os.path.join(workdir, "afd_summary.json")
        with open(path, "w") as f:
            json.dump(summary, f, indent=1)
        print(summary_tables(summary))
        print(f"\n(all of it as JSON: {path})")


def _cell(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def summary_tables(summary: dict) -> str:
    """Markdown tables of ``main``'s summary: reward models and Best-of-N, or the adversarial
    run's last training metrics."""
    if "train" in summary:
        lines = [
            f"adversarial imitation, step {summary['step']}",
            "",
            "| metric | value |",
            "| --- | --- |",
        ]
        lines += [f"| {k} | {_cell(v)} |" for k, v in sorted(summary["train"].items())]
        return "\n".join(lines)
    rms = summary["reward_models"]
    keys = sorted({k for m in rms.values() for k, v in m.items() if isinstance(v, (int, float))})
    lines = [
        "reward models (held-out)",
        "",
        "| reward model | " + " | ".join(keys) + " |",
        "| --- | " + " | ".join("---" for _ in keys) + " |",
    ]
    lines += [
        f"| {name} | " + " | ".join(_cell(m.get(k, "")) for k in keys) + " |"
        for name, m in rms.items()
    ]
    if summary["bon"]:
        cols = ("n", "kl", "gold", "gold_normalised", "win_rate")
        lines += [
            "",
            "Best-of-N from π_SFT (gold reward of the proxy's pick)",
            "",
            "| reward model | " + " | ".join(cols) + " |",
            "| --- | " + " | ".join("---" for _ in cols) + " |",
        ]
        lines += [
            f"| {name} | " + " | ".join(_cell(row.get(c, "")) for c in cols) + " |"
            for name, rows in summary["bon"].items()
            for row in rows
        ]
    extra = {k: summary[k] for k in ("demo_gold", "sft_gold", "init_sample_gold") if k in summary}
    if extra:
        lines += ["", ", ".join(f"{k} = {v:.3f}" for k, v in extra.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
