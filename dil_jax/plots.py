"""Figures a researcher expects from runs: training dynamics, gold reward against KL, modes.

``plot_dynamics``, ``plot_gold_vs_kl`` and ``plot_modes`` take result dicts
(``dil_jax.afd.ablation.run_method``'s: ``name``, ``dynamics`` = the run's ``metrics.jsonl``
records, ``gold_reward``, ``kl`` and their standard errors, ``mode_1``/``mode_2``, ``entropy``)
and return a matplotlib figure.

``plot_heldout_dynamics`` is the DIL paper's Figure 2 from run directories: held-out chosen and
rejected log-likelihood and their margin over training, in one stated reduction, with the
smoothed training curves below. Which reduction a run logged is decided by its loss
(``objectives.compute_loss``: the first pair-wise term's ``reduction``; DIL defaults to the
per-token mean, DPO to the per-sequence sum), read from the config stored with its checkpoints;
the two are never drawn on one axis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import ml_collections
import numpy as np

from dil_jax import objectives, validation

REDUCTION_LABELS = {
    "mean": "per-token mean log-likelihood",
    "sum": "per-sequence summed log-likelihood",
}


def plot_dynamics(results: Sequence[dict]):
    """Chosen / rejected log-likelihood and margin per step (preference methods)."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for r in results:
        rows = [m for m in r["dynamics"] if "logps/rejected" in m]
        if not rows:
            continue
        steps = [m["step"] for m in rows]
        axes[0].plot(steps, [m["logps/chosen"] for m in rows], label=r["name"])
        axes[1].plot(steps, [m["logps/rejected"] for m in rows], label=r["name"])
        axes[2].plot(
            steps, [m["logps/chosen"] - m["logps/rejected"] for m in rows], label=r["name"]
        )
    for ax, title in zip(
        axes,
        ("chosen log-likelihood", "rejected log-likelihood", "margin (chosen − rejected)"),
        strict=True,
    ):
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_gold_vs_kl(results: Sequence[dict]):
    """Final gold reward against the Monte-Carlo KL to π_0, one point per method."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in results:
        ax.errorbar(
            r["kl"],
            r["gold_reward"],
            xerr=r["kl_se"],
            yerr=r["gold_reward_se"],
            marker="o",
            capsize=3,
            label=r["name"],
        )
    ax.set_xlabel("KL(π || π_0) per response (nats)")
    ax.set_ylabel("gold reward")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_modes(results: Sequence[dict]):
    """Share of samples in mode A, mode B and neither, with the entropy per response."""
    names = [r["name"] for r in results]
    a = np.array([r["mode_1"] for r in results])
    b = np.array([r["mode_2"] for r in results])
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    x = np.arange(len(results))
    axes[0].bar(x, a, label="mode A (copy)")
    axes[0].bar(x, b, bottom=a, label="mode B (translate)")
    axes[0].set_xticks(x, names, rotation=40, ha="right", fontsize=8)
    axes[0].set_title("mode coverage")
    axes[0].legend(fontsize=8)
    axes[1].bar(x, [r["entropy"] for r in results])
    axes[1].set_xticks(x, names, rotation=40, ha="right", fontsize=8)
    axes[1].set_title("entropy per response (nats)")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- Figure 2


def logged_reduction(config: Mapping) -> str | None:
    """The reduction of a run's ``logps/*`` metrics (the lead loss term's), or None.

    Args:
      config: the run's stored config dict (``checkpoints/<step>/meta``), ``{}`` when unknown.
    """
    loss = config.get("loss") if config else None
    if not loss:
        return None
    try:
        terms = validation.loss_terms(ml_collections.ConfigDict(dict(loss)))
    except (ValueError, KeyError, AttributeError):  # AfD runs: not a core loss
        return None
    lead = next((t for t in terms if objectives.LOSSES[t.name].needs_pairs), terms[0])
    return lead.params["reduction"]


def logps_key(
    records: Sequence[Mapping], split: str, which: str, reduction: str, run_reduction: str | None
) -> str | None:
    """The metrics key holding ``which`` ('chosen'/'rejected') in ``reduction``, or None.

    Prefers keys that name their reduction (``[eval/]logps_mean/chosen``,
    ``[eval/]logps_sum/chosen``); else ``[eval/]logps/chosen`` when the run's loss logged it in
    the requested reduction.
    """
    prefix = "eval/" if split == "eval" else ""
    keys = {k for r in records for k in r}
    explicit = f"{prefix}logps_{reduction}/{which}"
    if explicit in keys:
        return explicit
    plain = f"{prefix}logps/{which}"
    if plain in keys and run_reduction == reduction:
        return plain
    return None


def smooth(values: Sequence[float], weight: float) -> np.ndarray:
    """TensorBoard's debiased exponential moving average (``weight`` 0 = no smoothing)."""
    v = np.asarray(values, np.float64)
    out, acc = np.empty_like(v), 0.0
    for i, x in enumerate(v):
        acc = weight * acc + (1 - weight) * x
        out[i] = acc / (1 - weight ** (i + 1)) if weight > 0 else x
    return out


def _series(records: Sequence[Mapping], key_c: str, key_r: str):
    rows = [r for r in records if key_c in r and key_r in r]
    steps = np.array([r["step"] for r in rows])
    chosen = np.array([r[key_c] for r in rows], np.float64)
    rejected = np.array([r[key_r] for r in rows], np.float64)
    return steps, chosen, rejected


def plot_heldout_dynamics(
    runs: Mapping[str, tuple[Sequence[Mapping], Mapping]],
    *,
    reduction: str = "mean",
    smoothing: float = 0.9,
):
    """The DIL paper's Figure 2 for one or more runs.

    Top row: held-out (``eval/*``) chosen and rejected log-likelihood and the margin
    chosen − rejected per evaluation step; bottom row: the same from the training batches,
    smoothed (raw values faint behind).

    Args:
      runs: label -> (the run's ``metrics.jsonl`` records, its stored config dict).
      reduction: 'mean' (per-token) or 'sum' (per-sequence); every curve is in it.
      smoothing: EMA weight for the training curves.

    Returns:
      ``(figure, notes)``: notes name each run or split left out and why (e.g. a DPO run that
      logged sums when means were asked, and what would have to be logged to draw it).
    """
    if reduction not in REDUCTION_LABELS:
        raise ValueError(f"reduction={reduction!r}: expected one of {sorted(REDUCTION_LABELS)}")
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), sharex="col")
    notes = []
    titles = ("chosen", "rejected", "margin (chosen − rejected)")
    for row, split in enumerate(("eval", "train")):
        for label, (records, config) in runs.items():
            run_red = logged_reduction(config)
            key_c, key_r = (
                logps_key(records, split, w, reduction, run_red) for w in ("chosen", "rejected")
            )
            if key_c is None or key_r is None:
                why = (
                    f"logged {REDUCTION_LABELS[run_red]}s"
                    if run_red
                    else "its loss reduction is unknown (no stored config)"
                )
                if not any(
                    ("eval/" if split == "eval" else "") + "logps/chosen" in r for r in records
                ):
                    why = (
                        "no eval/logps records (set config.eval.every_steps)"
                        if split == "eval"
                        else "no logps records"
                    )
                notes.append(
                    f"{label}: {split} curves left out: {why}; {reduction} needs "
                    f"'{'eval/' if split == 'eval' else ''}logps_{reduction}/chosen' "
                    "and '.../rejected' in metrics.jsonl"
                )
                continue
            steps, chosen, rejected = _series(records, key_c, key_r)
            for ax, values in zip(axes[row], (chosen, rejected, chosen - rejected), strict=True):
                if split == "eval":
                    (line,) = ax.plot(steps, values, marker="o", ms=3, label=label)
                else:
                    (line,) = ax.plot(steps, smooth(values, smoothing), label=label)
                    ax.plot(steps, values, color=line.get_color(), alpha=0.2, lw=0.8)
    for row, split in enumerate(("held-out", f"train (EMA {smoothing:g})")):
        for ax, title in zip(axes[row], titles, strict=True):
            ax.set_title(f"{split}: {title}", fontsize=10)
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel(REDUCTION_LABELS[reduction])
    for ax in axes[1]:
        ax.set_xlabel("step")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.suptitle(f"Log-likelihood dynamics ({REDUCTION_LABELS[reduction]} over response tokens)")
    fig.tight_layout(rect=(0, 0, 0.9, 0.96))
    return fig, notes


# ----------------------------------------------------------------------------- diagnostics

DIAGNOSTIC_KEY = "ratio/log_r_chosen_q50"  # present when config.train.diagnostics was on


def has_diagnostics(records: Sequence[Mapping]) -> bool:
    """Whether a run logged the density-ratio diagnostics (``config.train.diagnostics``)."""
    return any(DIAGNOSTIC_KEY in r for r in records)


def plot_ratio_diagnostics(
    runs: Mapping[str, tuple[Sequence[Mapping], Mapping]], *, smoothing: float = 0.9
):
    """The density-ratio diagnostics of ``dil_jax.diagnostics`` over training, per run.

    Panels: the 10/50/90 % quantiles of log r = log π_θ − log π_ref on chosen and on rejected
    responses (median line, 10–90 % band); DIL's implied E_ref[r] on a log scale (its log,
    ``ratio/log_implied_ref_mean_r``, with the consistent value 0 marked); the smoothed chosen
    log-likelihood (``ema/logps/chosen``) with the steps where the likelihood-collapse alarm
    fired (chosen falling while the margin rises) marked.

    Args:
      runs: label -> (the run's ``metrics.jsonl`` records, its stored config dict).
      smoothing: EMA weight for the log r medians and E_ref[r] (raw values faint behind).

    Returns:
      ``(figure, notes)``; runs without diagnostics are left out with a note.
    """
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.9))
    notes = []
    for label, (records, _) in runs.items():
        rows = [r for r in records if DIAGNOSTIC_KEY in r]
        if not rows:
            notes.append(
                f"{label}: no density-ratio diagnostics in metrics.jsonl (run with "
                "config.train.diagnostics=True, a reference-based pair or list loss)"
            )
            continue
        steps = np.array([r["step"] for r in rows])
        line = None
        for which, style in (("chosen", "-"), ("rejected", "--")):
            q = {
                p: np.array([r[f"ratio/log_r_{which}_q{p}"] for r in rows], np.float64)
                for p in (10, 50, 90)
            }
            kw = {} if line is None else {"color": line.get_color()}
            (line,) = axes[0].plot(
                steps, smooth(q[50], smoothing), style, label=f"{label} {which}", **kw
            )
            axes[0].fill_between(steps, q[10], q[90], color=line.get_color(), alpha=0.12)
        log_mean = np.array([r["ratio/log_implied_ref_mean_r"] for r in rows], np.float64)
        axes[1].plot(steps, smooth(log_mean, smoothing), color=line.get_color(), label=label)
        axes[1].plot(steps, log_mean, color=line.get_color(), alpha=0.2, lw=0.8)
        ema = [r for r in rows if "ema/logps/chosen" in r]
        if ema:
            e_steps = np.array([r["step"] for r in ema])
            axes[2].plot(
                e_steps, [r["ema/logps/chosen"] for r in ema], color=line.get_color(), label=label
            )
            fired = [r for r in ema if r.get("alarm/likelihood_collapse", 0.0) > 0]
            axes[2].scatter(
                [r["step"] for r in fired],
                [r["ema/logps/chosen"] for r in fired],
                color="red",
                marker="v",
                s=18,
                zorder=3,
            )
    axes[0].set_title("log r = log π_θ − log π_ref (median, 10–90 % band)", fontsize=10)
    axes[1].axhline(0.0, color="grey", lw=0.8, ls=":")
    axes[1].set_title("log implied E_ref[r] (0 when consistent)", fontsize=10)
    axes[2].set_title("EMA chosen log-likelihood (▼ collapse alarm)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig, notes
