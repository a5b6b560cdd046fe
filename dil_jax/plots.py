"""Figures a researcher expects from runs: training dynamics, gold reward against KL, modes.

Each function takes result dicts (``dil_jax.afd.ablation.run_method``'s: ``name``, ``dynamics``
= the run's ``metrics.jsonl`` records, ``gold_reward``, ``kl`` and their standard errors,
``mode_1``/``mode_2``, ``entropy``) and returns a matplotlib figure.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np


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
        axes[2].plot(steps, [m["logps/chosen"] - m["logps/rejected"] for m in rows],
                     label=r["name"])
    for ax, title in zip(axes, ("chosen log-likelihood", "rejected log-likelihood",
                                "margin (chosen − rejected)"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_gold_vs_kl(results: Sequence[dict]):
    """Final gold reward against the Monte-Carlo KL to π_0, one point per method."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in results:
        ax.errorbar(r["kl"], r["gold_reward"], xerr=r["kl_se"], yerr=r["gold_reward_se"],
                    marker="o", capsize=3, label=r["name"])
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
