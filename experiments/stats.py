"""Mean ± 95 % Student-t interval over seeds: the one helper every experiment script uses.

``experiments/afd_claims.py``, ``experiments/collect_table.py`` and ``experiments/dil_claims.py``
report seeds as replicates with these functions, so a table and a claims report computed from
the same runs agree to the last digit.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
from collections.abc import Callable

import numpy as np

# Two-sided 95 % quantiles of Student's t by degrees of freedom (scipy's t.ppf(0.975, df)).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def t_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom."""
    try:
        from scipy import stats  # noqa: PLC0415 (optional: the table covers df < 10)

        return float(stats.t.ppf(0.975, df))
    except ImportError:
        return T_975.get(df, 1.96 + 2.5 / df)  # within 1e-2 of the exact value for df >= 10


def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of the 95 % Student-t interval; NaN half-width for one value."""
    x = np.asarray(values, np.float64)
    if len(x) < 2:
        return float(x.mean()) if len(x) else float("nan"), float("nan")
    half = t_975(len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(half)


def diff_ci(a, b) -> tuple[float, float]:
    """Mean difference ``a − b`` and its 95 % half-width (Welch: unpaired, unequal variances)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        return float(a.mean() - b.mean()), float("nan")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return float(a.mean() - b.mean()), 0.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return float(a.mean() - b.mean()), t_975(max(1, round(df))) * se


def fmt(values, digits: int = 3) -> str:
    """``'mean ± half'`` (or just the mean for one value)."""
    m, h = mean_ci(values)
    return f"{m:.{digits}f}" if not np.isfinite(h) else f"{m:.{digits}f} ± {h:.{digits}f}"


def run_seeds(seeds: int, workdir: str, run_one: Callable[[int], dict]) -> list[dict]:
    """``run_one(seed)`` for seeds ``0 .. seeds-1``, each result kept in
    ``<workdir>/seed<k>/result.json``: a rerun reads finished seeds instead of recomputing them."""
    runs = []
    for seed in range(seeds):
        path = os.path.join(workdir, f"seed{seed}", "result.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(path):
            with open(path) as f:
                runs.append(json.load(f))
            continue
        result = run_one(seed)
        with open(path, "w") as f:
            json.dump(result, f)
        runs.append(result)
    return runs


def claims_main(
    argv,
    *,
    doc: str,
    workdir: str,
    pretrain_base: Callable[[str, bool], str],
    run_seed: Callable[[int, bool, str, str], dict],
    write_report: Callable[[list[dict], str, bool], str],
) -> int:
    """The command line of a claims script (afd_claims.py, online_claims.py): one shared base
    policy, then ``run_seed`` per seed (:func:`run_seeds`), then the printed report."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--workdir", default=workdir)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--reduced", action="store_true", help="CI smoke scale (not evidence)")
    parser.add_argument("--fresh", action="store_true", help="delete --workdir first")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.fresh:
        shutil.rmtree(args.workdir, ignore_errors=True)
    base_dir = pretrain_base(args.workdir, args.reduced)
    runs = run_seeds(
        args.seeds, args.workdir, lambda seed: run_seed(seed, args.reduced, args.workdir, base_dir)
    )
    print(write_report(runs, args.out, args.reduced))
    return 0
