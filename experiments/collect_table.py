"""Collects run directories into a table: one row per method, mean ± 95 % interval over seeds.

  python experiments/collect_table.py runs/*/ --metric=policy.gold_reward --metric=eval.loss
  python experiments/collect_table.py runs/*/ --list      # every metric each run can give

Works on every kind of run directory: gold-task runs (``gold_eval.json``), real-data runs
(``metrics.jsonl`` only), AfD runs (adversarial imitation, reward models, the extrapolation
workdir with ``afd_results.json``). Metric names:

  train.<name>   the last ``metrics.jsonl`` record that has ``<name>`` (``train.loss``,
                 ``train.rewards/accuracies``, ``train.disc/auc`` ...)
  eval.<name>    the last held-out value ``eval/<name>`` (``eval.loss``, ``eval.logps/chosen``)
  <a.b.c>        a dotted path into ``gold_eval.json`` (``policy.gold_reward``) or
                 ``afd_results.json`` (``reward_models.init_sft.auc``, ``bon.bt.0.win_rate``)

A run that lacks a metric leaves it out of that row's mean (the cell shows how many seeds had
it) and is named on stderr; nothing raises. A run is grouped by its stored config
(``checkpoints/<last>/meta``): its kind and loss name plus any ``--group-by`` fields; seeds
(``config.seed``) are the replicates. The interval is Student-t over seeds (reviewers of the DIL
paper asked for exactly this). Without ``--metric`` the table shows those of
``DEFAULT_METRICS`` that at least one run has.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import numpy as np
from scipy import stats

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from dil_jax.metrics import read_metrics, read_run_config  # noqa: E402

DEFAULT_METRICS = (
    "policy.gold_reward",
    "policy.win_rate",
    "policy.kl",
    "eval.loss",
    "eval.rewards/accuracies",
    "eval.rewards/margins",
    "train.loss",
)
RESULT_FILES = ("gold_eval.json", "afd_results.json")


def lookup(d, dotted: str):
    """``d['a']['b'][0]`` for ``'a.b.0'``; raises KeyError naming the missing part."""
    for part in dotted.split("."):
        if isinstance(d, list) and part.isdigit() and int(part) < len(d):
            d = d[int(part)]
        elif isinstance(d, dict) and part in d:
            d = d[part]
        else:
            raise KeyError(part)
    return d


def method_label(workdir: pathlib.Path, cfg: dict) -> str:
    """What the run is: its loss name, prefixed by its kind for AfD reward models."""
    loss = cfg.get("loss", {})
    name = loss.get("name") if isinstance(loss, dict) else None
    if "reward_model" in cfg:
        return f"reward_model:{name}"
    if name:
        return str(name)
    if (workdir / "afd_results.json").is_file():
        return "afd_extrapolation"
    return workdir.name


class Run:
    """One run directory's results, loaded once."""

    def __init__(self, workdir: pathlib.Path):
        self.workdir = workdir
        self.config = read_run_config(str(workdir))
        self.label = method_label(workdir, self.config)
        records = read_metrics(str(workdir)) if (workdir / "metrics.jsonl").is_file() else []
        self.train: dict[str, float] = {}
        self.eval: dict[str, float] = {}
        for r in records:  # later records overwrite earlier ones: the last value of each key
            for k, v in r.items():
                if k == "step":
                    continue
                if k.startswith("eval/"):
                    self.eval[k[len("eval/") :]] = v
                else:
                    self.train[k] = v
        self.results = {
            name: json.loads((workdir / name).read_text())
            for name in RESULT_FILES
            if (workdir / name).is_file()
        }

    def metric(self, name: str) -> float | None:
        """The value of ``name`` for this run, or None when the run has no such metric."""
        prefix, _, rest = name.partition(".")
        if prefix == "train" and rest:
            return _number(self.train.get(rest))
        if prefix == "eval" and rest:
            return _number(self.eval.get(rest))
        for result in self.results.values():
            try:
                return _number(lookup(result, name))
            except KeyError:
                continue
        return None

    def available(self) -> list[str]:
        """Every metric name ``metric`` answers for this run."""
        names = [f"train.{k}" for k in sorted(self.train)]
        names += [f"eval.{k}" for k in sorted(self.eval)]
        for result in self.results.values():
            names += _numeric_paths(result)
        return names


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _numeric_paths(d, prefix: str = "") -> list[str]:
    """Dotted paths of the numbers in a JSON tree (long per-prompt number lists left out)."""
    out = []
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else ()
    for k, v in items:
        path = f"{prefix}{k}"
        if _number(v) is not None:
            out.append(path)
        elif isinstance(v, dict) or (isinstance(v, list) and v and isinstance(v[0], dict)):
            out += _numeric_paths(v, path + ".")
    return out


def mean_ci(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean()), float(half)


def group_key(run: Run, group_by: list[str]) -> str:
    parts = [run.label]
    for g in group_by:
        try:
            parts.append(f"{g}={lookup(run.config, g)}")
        except KeyError:
            parts.append(f"{g}=?")
    return " ".join(parts)


def collect(
    workdirs: list[pathlib.Path], metrics: list[str] | None, group_by: list[str], *, log=sys.stderr
) -> str:
    """The markdown table; ``metrics=None`` picks the ``DEFAULT_METRICS`` some run has."""
    runs = [Run(pathlib.Path(w)) for w in workdirs]
    if metrics is None:
        metrics = [m for m in DEFAULT_METRICS if any(r.metric(m) is not None for r in runs)]
        if not metrics:
            raise SystemExit(
                "none of the default metrics is in these runs; pick some with --metric (see --list)"
            )
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(group_key(r, group_by), []).append(r)
    lines = [
        "| method | seeds | " + " | ".join(metrics) + " |",
        "| --- | --- | " + " | ".join("---" for _ in metrics) + " |",
    ]
    for key, members in sorted(groups.items()):
        cells = []
        for m in metrics:
            values = [v for v in (r.metric(m) for r in members) if v is not None]
            missing = [str(r.workdir) for r in members if r.metric(m) is None]
            if missing:
                print(f"note: {m} is absent from {', '.join(missing)}", file=log)
            if not values:
                cells.append("—")
                continue
            mean, half = mean_ci(values)
            cell = f"{mean:.3f}" + ("" if math.isnan(half) else f" ± {half:.3f}")
            if missing:
                cell += f" ({len(values)}/{len(members)})"
            cells.append(cell)
        lines.append(f"| {key} | {len(members)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("workdirs", nargs="+", type=pathlib.Path)
    p.add_argument(
        "--metric",
        action="append",
        default=None,
        help="metric name (repeatable); see the naming above and --list",
    )
    p.add_argument(
        "--group-by",
        action="append",
        default=[],
        help="dotted config field that splits a method's rows, e.g. loss.beta",
    )
    p.add_argument("--list", action="store_true", help="print every metric of every run, exit")
    args = p.parse_args()
    missing = [str(w) for w in args.workdirs if not w.is_dir()]
    if missing:
        p.error(f"not a directory: {', '.join(missing)}")
    if args.list:
        for w in args.workdirs:
            run = Run(w)
            print(f"{w} ({run.label}): " + " ".join(run.available()))
        return
    print(collect(args.workdirs, args.metric, args.group_by))


if __name__ == "__main__":
    main()
