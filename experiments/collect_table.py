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

Paper layouts (``--layout=table2`` / ``table3``): one row per method (the paper's row order),
one column per benchmark or metric, mean ± 95 % interval over seeds, for each method the
learning rate (``optim.learning_rate``; ``--select-field`` for another) whose mean of the
validation metric ``--select`` is best (default ``eval.rewards/accuracies``: preference accuracy
on the held-out pairs, higher is better; ``--select-mode=min`` for a loss), the paper's
published number beside each cell where ``PUBLISHED`` (or ``--published FILE.json``) has one,
and ``--out=PREFIX`` writes PREFIX.md, PREFIX.csv and PREFIX.tex:

  python experiments/collect_table.py runs/t2_debug/*/* --layout=table2 --out=runs/t2_debug/table

Benchmarks come from the files ``experiments/evaluate_run.py`` writes into the run directory:
``leaderboard.json`` (``v1.ARC`` ... ``v2.MuSR``) and ``winrate.json`` from
``experiments/win_rate.py`` (``vs_sft.win_rate``, ``vs_sft.lc_win_rate``, ``vs_chosen.win_rate``,
``average.win_rate``).

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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from dil_jax.metrics import read_metrics, read_run_config  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from stats import mean_ci  # noqa: E402  (experiments/stats.py, shared with afd_claims.py)

DEFAULT_METRICS = (
    "policy.gold_reward",
    "policy.win_rate",
    "policy.kl",
    "eval.loss",
    "eval.rewards/accuracies",
    "eval.rewards/margins",
    "train.loss",
)
RESULT_FILES = ("gold_eval.json", "afd_results.json", "leaderboard.json", "winrate.json")
# Paper layouts: (row order, columns as (metric, header)).
ROW_ORDER = ("sft", "dpo", "fdpo", "ipo", "slic", "hinge", "cpo", "simpo")
ROW_ORDER += ("dil_lsif", "dil_ukl", "dil_bce")
ROW_NAMES = {
    "sft": "SFT",
    "dpo": "DPO",
    "fdpo": "f-DPO",
    "ipo": "IPO",
    "slic": "SLiC",
    "hinge": "SLiC",
    "cpo": "CPO",
    "simpo": "SimPO",
    "dil_lsif": "DIL (LSIF)",
    "dil_ukl": "DIL (UKL)",
    "dil_bce": "DIL (BCE)",
}
LAYOUTS = {
    "table2": (
        ("eval.rewards/accuracies", "pref. acc."),
        # per token: comparable across rows (eval/logps/* follow each loss's own reduction)
        ("eval.logps_mean/chosen", "log p(chosen)/tok"),
        ("eval.logps_mean/rejected", "log p(rejected)/tok"),
        ("vs_sft.win_rate", "win vs SFT"),
        ("vs_sft.lc_win_rate", "LC win vs SFT"),
        ("v1.ARC", "ARC"),
        ("v1.HellaSwag", "HellaSwag"),
        ("v1.TruthfulQA", "TruthfulQA"),
        ("v1.MMLU", "MMLU"),
        ("v1.Winogrande", "Winogrande"),
        ("v1.GSM8K", "GSM8K"),
        ("v1.Average", "v1 avg"),
        ("v2.MMLU-PRO", "MMLU-PRO"),
        ("v2.IFEval", "IFEval"),
        ("v2.BBH", "BBH"),
        ("v2.GPQA", "GPQA"),
        ("v2.MATH", "MATH lvl5"),
        ("v2.MuSR", "MuSR"),
        ("v2.Average", "v2 avg"),
    ),
    "table3": (
        ("eval.rewards/accuracies", "pref. acc."),
        ("vs_sft.win_rate", "win vs SFT"),
        ("vs_sft.lc_win_rate", "LC win vs SFT"),
        ("vs_chosen.win_rate", "win vs chosen"),
        ("average.win_rate", "avg win"),
        ("policy.gold_reward", "gold reward"),
        ("policy.kl", "KL"),
    ),
}
# The paper's published numbers, {layout: {table: {row: {metric: value}}}}, copied with their
# source. docs/paper-setups.md (the project's record of the DIL paper) states Table 2 and 3
# qualitatively only (DIL-LSIF ahead of DPO and SimPO on nearly every column; > 7.5 % relative
# on Llama-3 maths over SimPO) and no number, so nothing is filled in here rather than
# guessed; pass the paper's values with --published FILE.json in this same shape.
PUBLISHED: dict = {"table2": {}, "table3": {}}


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


def _cell(values: list[float], digits: int = 3) -> tuple[str, float, float]:
    mean, half = mean_ci(values)
    text = f"{mean:.{digits}f}" + ("" if math.isnan(half) else f" ± {half:.{digits}f}")
    return text, mean, half


def paper_table(
    workdirs: list[pathlib.Path],
    layout: str,
    *,
    select: str = "eval.rewards/accuracies",
    select_mode: str = "max",
    select_field: str = "optim.learning_rate",
    published: dict | None = None,
    log=sys.stderr,
) -> dict:
    """The paper layout as a dict: ``columns`` (metric, header) and ``rows`` (one per method,
    with its chosen setting, seeds, and per metric the mean, half-width, n and published value).

    Columns no run has are left out. The setting of each method is the value of
    ``select_field`` whose mean ``select`` over its seeds is best; a method without ``select``
    in any run keeps its only setting, or the first in sorted order (said on ``log``)."""
    runs = [Run(pathlib.Path(w)) for w in workdirs]
    published = (published if published is not None else PUBLISHED).get(layout, {})
    columns = [(m, h) for m, h in LAYOUTS[layout] if any(r.metric(m) is not None for r in runs)]
    by_method: dict[str, dict[str, list[Run]]] = {}
    for r in runs:
        try:
            setting = str(lookup(r.config, select_field))
        except KeyError:
            setting = "?"
        by_method.setdefault(r.label, {}).setdefault(setting, []).append(r)
    order = {name: i for i, name in enumerate(ROW_ORDER)}
    rows = []
    for method in sorted(by_method, key=lambda m: (order.get(m, len(order)), m)):
        settings = by_method[method]
        scores = {}
        for setting, members in settings.items():
            values = [v for v in (r.metric(select) for r in members) if v is not None]
            if values:
                scores[setting] = float(sum(values) / len(values))
        if scores:
            pick = (max if select_mode == "max" else min)(scores, key=scores.get)
        else:
            pick = sorted(settings)[0]
            if len(settings) > 1:
                print(f"note: {method}: no run has {select}; took {select_field}={pick}", file=log)
        members = settings[pick]
        cells = {}
        for m, _ in columns:
            values = [v for v in (r.metric(m) for r in members) if v is not None]
            if not values:
                cells[m] = None
                continue
            text, mean, half = _cell(values)
            cells[m] = {"text": text, "mean": mean, "half": half, "n": len(values)}
            paper = published.get(method, {}).get(m)
            if paper is not None:
                cells[m]["paper"] = paper
        rows.append(
            {
                "method": method,
                "name": ROW_NAMES.get(method, method),
                "setting": pick,
                "seeds": len(members),
                "selection": {k: scores[k] for k in sorted(scores)},
                "cells": cells,
            }
        )
    return {
        "layout": layout,
        "select": select,
        "select_mode": select_mode,
        "select_field": select_field,
        "columns": columns,
        "rows": rows,
    }


def _text(cell) -> str:
    if cell is None:
        return "—"
    text = cell["text"]
    if "paper" in cell:
        text += f" (paper {cell['paper']})"
    return text


def to_markdown(table: dict) -> str:
    heads = ["method", table["select_field"], "seeds"] + [h for _, h in table["columns"]]
    lines = ["| " + " | ".join(heads) + " |", "| " + " | ".join("---" for _ in heads) + " |"]
    for row in table["rows"]:
        cells = [row["name"], row["setting"], str(row["seeds"])]
        cells += [_text(row["cells"][m]) for m, _ in table["columns"]]
        lines.append("| " + " | ".join(cells) + " |")
    best = "highest" if table["select_mode"] == "max" else "lowest"
    lines.append("")
    lines.append(
        f"Mean ± 95 % Student-t interval over seeds; per method the {table['select_field']} "
        f"with the {best} mean {table['select']} (held-out validation metric)."
    )
    return "\n".join(lines)


def to_csv(table: dict) -> str:
    import csv  # noqa: PLC0415
    import io  # noqa: PLC0415

    out = io.StringIO()
    w = csv.writer(out)
    head = ["method", table["select_field"], "seeds"]
    for _, h in table["columns"]:
        head += [f"{h} mean", f"{h} ci95", f"{h} n", f"{h} paper"]
    w.writerow(head)
    for row in table["rows"]:
        line = [row["name"], row["setting"], row["seeds"]]
        for m, _ in table["columns"]:
            c = row["cells"][m] or {}
            line += [c.get("mean", ""), c.get("half", ""), c.get("n", ""), c.get("paper", "")]
        w.writerow(line)
    return out.getvalue()


def _tex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&")):
        text = text.replace(a, b)
    return text


def to_latex(table: dict) -> str:
    cols = table["columns"]
    lines = [
        r"\begin{tabular}{l" + "c" * (len(cols) + 1) + "}",
        r"\toprule",
        " & ".join(["Method", "lr"] + [_tex_escape(h) for _, h in cols]) + r" \\",
        r"\midrule",
    ]
    for row in table["rows"]:
        cells = [_tex_escape(row["name"]), _tex_escape(row["setting"])]
        for m, _ in cols:
            c = row["cells"][m]
            if c is None:
                cells.append("--")
                continue
            text = f"{c['mean']:.3f}"
            if not math.isnan(c["half"]):
                text += rf"$\pm${c['half']:.3f}"
            if "paper" in c:
                text += f" ({c['paper']})"
            cells.append(text)
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


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
    p.add_argument("--layout", choices=sorted(LAYOUTS), help="the paper's table layout")
    p.add_argument("--select", default="eval.rewards/accuracies", help="validation metric")
    p.add_argument("--select-mode", choices=("max", "min"), default="max")
    p.add_argument("--select-field", default="optim.learning_rate", help="setting to choose")
    p.add_argument("--published", type=pathlib.Path, help="JSON {layout: {row: {metric: v}}}")
    p.add_argument("--out", help="layouts: also write OUT.md, OUT.csv and OUT.tex")
    args = p.parse_args()
    missing = [str(w) for w in args.workdirs if not w.is_dir()]
    if missing:
        p.error(f"not a directory: {', '.join(missing)}")
    if args.list:
        for w in args.workdirs:
            run = Run(w)
            print(f"{w} ({run.label}): " + " ".join(run.available()))
        return
    if args.layout:
        published = json.loads(args.published.read_text()) if args.published else None
        table = paper_table(
            args.workdirs,
            args.layout,
            select=args.select,
            select_mode=args.select_mode,
            select_field=args.select_field,
            published=published,
        )
        md = to_markdown(table)
        print(md)
        if args.out:
            pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            pathlib.Path(args.out + ".md").write_text(md + "\n")
            pathlib.Path(args.out + ".csv").write_text(to_csv(table))
            pathlib.Path(args.out + ".tex").write_text(to_latex(table))
        return
    print(collect(args.workdirs, args.metric, args.group_by))


if __name__ == "__main__":
    main()
