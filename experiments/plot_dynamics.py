"""The DIL paper's Figure 2 from run directories: held-out chosen and rejected log-likelihood
and their margin over training, in one stated reduction, with smoothed training curves below.

  python experiments/plot_dynamics.py runs/dpo runs/dil_lsif --out=figures/dynamics.png
  python experiments/plot_dynamics.py dil=runs/dil_lsif --reduction=sum --smoothing=0.95

Each run is labelled by its directory name (or ``label=path``). ``--reduction``: ``mean`` (the
per-token mean over response tokens, default) or ``sum`` (the per-sequence sum); a run's
``logps/*`` metrics are in its loss's reduction (DIL: mean, DPO: sum, see
``dil_jax.objectives.compute_loss``), read from the config stored with its checkpoints, and a
run logged in the other one is left out with a note instead of sharing an axis with it.
Held-out values need ``config.eval.every_steps > 0``. The output folder is created.

Runs trained with ``config.train.diagnostics=True`` also get ``<out>_diagnostics.png``: the
density-ratio diagnostics (log-ratio quantiles on chosen and rejected, DIL's implied E_ref[r],
the smoothed chosen log-likelihood with the likelihood-collapse alarm marked).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from dil_jax import plots  # noqa: E402
from dil_jax.metrics import read_metrics, read_run_config  # noqa: E402


def load_runs(items: list[str]) -> dict[str, tuple[list[dict], dict]]:
    """``label=path`` or ``path`` -> label -> (metrics records, stored config)."""
    runs = {}
    for item in items:
        label, _, path = item.rpartition("=")
        workdir = pathlib.Path(path)
        if not (workdir / "metrics.jsonl").is_file():
            raise SystemExit(f"{workdir}: no metrics.jsonl (not a run directory?)")
        runs[label or workdir.resolve().name] = (
            read_metrics(str(workdir)),
            read_run_config(str(workdir)),
        )
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+", help="workdirs, optionally as label=path")
    p.add_argument("--out", default="dynamics.png", help="image path (folders are created)")
    p.add_argument(
        "--reduction",
        choices=sorted(plots.REDUCTION_LABELS),
        default="mean",
        help="mean: per-token mean log-likelihood; sum: per-sequence sum",
    )
    p.add_argument(
        "--smoothing", type=float, default=0.9, help="EMA weight of the training curves (0: none)"
    )
    args = p.parse_args()
    if not 0 <= args.smoothing < 1:
        p.error("--smoothing must be in [0, 1)")
    runs = load_runs(args.runs)
    fig, notes = plots.plot_heldout_dynamics(
        runs, reduction=args.reduction, smoothing=args.smoothing
    )
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out} ({plots.REDUCTION_LABELS[args.reduction]})")
    if any(plots.has_diagnostics(records) for records, _ in runs.values()):
        fig, notes = plots.plot_ratio_diagnostics(runs, smoothing=args.smoothing)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        diag = out.with_name(f"{out.stem}_diagnostics{out.suffix}")
        fig.savefig(diag, dpi=120)
        print(f"wrote {diag} (density-ratio diagnostics)")


if __name__ == "__main__":
    main()
