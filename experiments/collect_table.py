"""Collects run directories into a table: one row per method, mean ± 95 % interval over seeds.

  python experiments/collect_table.py runs/*/ --metric=policy.gold_reward --metric=policy.kl

A run is grouped by its stored config (``checkpoints/<last>/meta``): the loss name plus any
``--group-by`` fields; seeds (``config.seed``) are the replicates. Metrics are dotted paths into
the run's ``gold_eval.json`` (or ``train.<name>`` for the last ``metrics.jsonl`` record). The
interval is Student-t over seeds (reviewers of the DIL paper asked for exactly this).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np
from scipy import stats

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from dil_jax.metrics import read_metrics  # noqa: E402


def run_config(workdir: pathlib.Path) -> dict:
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    if not steps:
        raise FileNotFoundError(f"{workdir} has no checkpoint to read its config from")
    with open(workdir / "checkpoints" / str(steps[-1]) / "meta" / "metadata") as f:
        return json.load(f)["config"]


def lookup(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def run_metrics(workdir: pathlib.Path, metrics: list[str]) -> dict[str, float]:
    gold = json.loads((workdir / "gold_eval.json").read_text()) if (
        workdir / "gold_eval.json").exists() else {}
    last = read_metrics(str(workdir))[-1] if (workdir / "metrics.jsonl").exists() else {}
    out = {}
    for m in metrics:
        if m.startswith("train."):
            out[m] = float(last[m[len("train."):]])
        else:
            out[m] = float(lookup(gold, m))
    return out


def mean_ci(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean()), float(half)


def collect(workdirs: list[pathlib.Path], metrics: list[str], group_by: list[str]) -> str:
    groups: dict[str, list[dict]] = {}
    for w in workdirs:
        cfg = run_config(w)
        key = " ".join([cfg["loss"]["name"]] + [f"{g}={lookup(cfg, g)}" for g in group_by])
        groups.setdefault(key, []).append(run_metrics(w, metrics))
    lines = ["| method | seeds | " + " | ".join(metrics) + " |",
             "| --- | --- | " + " | ".join("---" for _ in metrics) + " |"]
    for key, rows in sorted(groups.items()):
        cells = []
        for m in metrics:
            mean, half = mean_ci([r[m] for r in rows])
            cells.append(f"{mean:.3f} ± {half:.3f}")
        lines.append(f"| {key} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("workdirs", nargs="+", type=pathlib.Path)
    p.add_argument("--metric", action="append", default=None)
    p.add_argument("--group-by", action="append", default=[])
    args = p.parse_args()
    metrics = args.metric or ["policy.gold_reward", "policy.win_rate", "policy.kl"]
    print(collect(args.workdirs, metrics, args.group_by))


if __name__ == "__main__":
    main()
