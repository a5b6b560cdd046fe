"""Divergence ablation on the gold-reward task: every objective from one base policy, compared.

What notebooks/divergence_ablation.ipynb shows, as library code (the notebook only calls these):
from one base policy π_0 (the quickstart's base-distribution SFT), each method trains with the
same budget, then is sampled on held-out prompts:

* preference objectives on base Bradley–Terry pairs (objectives.md §1–2): the DIL generators
  (LSIF, UKL, BCE, Basu α), DPO and f-DPO with each divergence;
* demonstration objectives on the two-mode expert (§3): forward KL = SFT, reverse KL =
  adversarial imitation (dil_jax/adversarial.py).

Reported per method: the training dynamics of the chosen / rejected log-likelihood and their
margin (``metrics.jsonl``, objectives.md §5 names), gold reward and KL to π_0 of the final
policy's samples, entropy, and the share of samples in each gold mode (mode coverage).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np

from dil_jax import adversarial, afd, config_files, sharding
from dil_jax import train as core
from dil_jax.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (data overrides, loss fields); preference methods learn from base pairs.
PAIRS = {"format": "preference", "response_source": "base"}
DEMOS = {"format": "sft", "response_source": "expert"}
METHODS: dict[str, tuple[dict, dict]] = {
    "dil_lsif": (PAIRS, {"name": "dil_lsif"}),
    "dil_ukl": (PAIRS, {"name": "dil_ukl"}),
    "dil_bce": (PAIRS, {"name": "dil_bce"}),
    "dil_basu(α=0.5)": (PAIRS, {"name": "dil_basu", "alpha": 0.5}),
    "dpo": (PAIRS, {"name": "dpo"}),
    "fdpo(forward_kl)": (PAIRS, {"name": "fdpo", "divergence": "forward_kl"}),
    "fdpo(js)": (PAIRS, {"name": "fdpo", "divergence": "js"}),
    "fdpo(α=0.5)": (PAIRS, {"name": "fdpo", "divergence": "alpha", "alpha": 0.5}),
    "sft (forward KL)": (DEMOS, {"name": "sft"}),
    "adversarial (reverse KL)": (DEMOS, {"name": "adversarial"}),
}
REDUCED_METHODS = ("dil_lsif", "dpo", "fdpo(js)", "sft (forward KL)", "adversarial (reverse KL)")


def make_config(reduced: bool):
    """configs/afd_gold.py on one device; ``reduced`` shrinks it to a smoke test."""
    config = config_files.load(os.path.join(REPO, "configs", "afd_gold.py")).get_config()
    for c in (config, config.init.pretrain):
        c.mesh.shape = (1, 1, 1)
        c.train.progress_bar = c.train.tensorboard = c.checkpoint.async_save = False
        c.eval.every_steps = c.eval.gold_prompts = 0
        c.train.log_every = 5 if reduced else 10
    config.eval.gold_prompts = 32 if reduced else 256
    a = config.afd.adversarial
    a.steps, a.prompts_per_step, a.samples_per_prompt = (2, 8, 2) if reduced else (100, 16, 4)
    a.learning_rate = a.disc.learning_rate = 3e-4
    a.log_every, a.checkpoint_every = (1, 2) if reduced else (10, 50)
    if reduced:
        for m in (config.model, config.init.pretrain.model):
            m.num_hidden_layers, m.hidden_size, m.intermediate_size = 1, 32, 64
        p = config.init.pretrain
        p.train.steps, p.data.num_train, p.train.global_batch_size = 20, 256, 32
        p.checkpoint.every_steps = 20
        config.data.num_eval = 32
    return config


def train_base(config, workroot: str) -> str:
    """π_0 in ``<workroot>/base`` (resumable); returns the directory."""
    base_dir = os.path.join(workroot, "base")
    summary = core.train_and_evaluate(config.init.pretrain, base_dir, mesh=_mesh())
    summary.pop("state")
    return base_dir


def _mesh():
    return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def run_method(name: str, config, base_dir: str, workroot: str, *, reduced: bool) -> dict:
    """Trains one method from π_0 and evaluates it; returns metrics and the dynamics."""
    data, loss = METHODS[name]
    steps, batch = (5, 16) if reduced else (200, 64)
    workdir = os.path.join(workroot, name.replace(" ", "_").replace("(", "_").replace(")", ""))
    trainer = core.Trainer(config, mesh=_mesh())
    from dil_jax import checkpointing  # noqa: PLC0415

    init_params = checkpointing.load_params(base_dir, trainer.abstract_params())
    data = dict(data, num_train=256 if reduced else 2048)
    if loss["name"] == "adversarial":
        cfg = afd.stage_config(config, data=data, loss="sft", steps=1, learning_rate=1e-3,
                               batch_size=8, init_dir=base_dir)
        demos, _ = afd.demonstration_arrays(cfg)
        out = adversarial.train_adversarial(config, workdir, init_params=init_params,
                                            demos=demos, mesh=_mesh())
        params = out["policy_params"]
    else:
        lr = 1e-3 if loss["name"] == "sft" else 1e-4
        cfg = afd.stage_config(config, data=data, loss=loss["name"], steps=steps,
                               learning_rate=lr, batch_size=batch, init_dir=base_dir)
        for key, value in loss.items():
            if key != "name":
                cfg.loss[key] = value
        summary = core.train_and_evaluate(cfg, workdir, mesh=_mesh())
        params = summary.pop("state").params
    ev = afd.gold_policy_eval(trainer, _task(), params, init_params,
                              num_prompts=config.eval.gold_prompts, seed=config.data.seed + 2,
                              sampling=config.afd.sampling)
    return {"name": name, "workdir": workdir, "dynamics": read_metrics(workdir), **ev}


def _task():
    from dil_jax.data.gold_task import GoldTask  # noqa: PLC0415

    return GoldTask()


def run_ablation(workroot: str, *, reduced: bool, methods: Sequence[str] | None = None
                 ) -> list[dict]:
    """Every method of ``methods`` (default: all, or ``REDUCED_METHODS``) from one π_0."""
    config = make_config(reduced)
    base_dir = train_base(config, workroot)
    config.init.mode, config.init.checkpoint_dir = "checkpoint", base_dir
    names = methods or (REDUCED_METHODS if reduced else tuple(METHODS))
    return [run_method(n, config, base_dir, workroot, reduced=reduced) for n in names]


# ----------------------------------------------------------------------------- figures

def plot_dynamics(results: Sequence[dict]):
    """Chosen / rejected log-likelihood and margin per step (preference methods)."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

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
    import matplotlib.pyplot as plt  # noqa: PLC0415

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
    import matplotlib.pyplot as plt  # noqa: PLC0415

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


def summary_table(results: Sequence[dict]) -> str:
    """A markdown table of the final metrics."""
    lines = ["| method | gold reward | KL to π_0 | entropy | mode A | mode B |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['name']} | {r['gold_reward']:.3f} ± {r['gold_reward_se']:.3f} | "
                     f"{r['kl']:.2f} | {r['entropy']:.2f} | {r['mode_1']:.2f} | "
                     f"{r['mode_2']:.2f} |")
    return "\n".join(lines)
