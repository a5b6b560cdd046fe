"""Training dynamics of one or more runs (the DIL paper's Figure 2): chosen and rejected
log-likelihood and their margin per step, read from each workdir's ``metrics.jsonl``.

  python experiments/plot_dynamics.py runs/dpo runs/dil_lsif --out=dynamics.png

Each run is labelled by its directory name (or ``label=path``).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from dil_jax.metrics import read_metrics  # noqa: E402

PANELS = (("logps/chosen", "chosen log-likelihood"), ("logps/rejected", "rejected log-likelihood"),
          ("rewards/margins", "reward margin"))


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in rows], [v for _, v in rows]


def plot_runs(runs: dict[str, str], out: str) -> None:
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    for label, workdir in runs.items():
        records = read_metrics(workdir)
        for ax, (key, title) in zip(axes, PANELS, strict=True):
            steps, values = series(records, key)
            ax.plot(steps, values, label=label)
            ax.set_title(title)
            ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+", help="workdirs, optionally as label=path")
    p.add_argument("--out", default="dynamics.png")
    args = p.parse_args()
    runs = {}
    for item in args.runs:
        label, _, path = item.rpartition("=")
        runs[label or pathlib.Path(path).name] = path
    plot_runs(runs, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
