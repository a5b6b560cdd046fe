"""Divergence ablation on the gold-reward task: every objective from one base policy, compared.

What notebooks/divergence_ablation.ipynb shows, as library code (the notebook only calls these;
its figures are dil_jax/plots.py):
from one base policy π_0 (the quickstart's base-distribution SFT), each method trains with the
same budget, then is sampled on held-out prompts:

* preference objectives on base Bradley–Terry pairs (docs/objectives.md §1–2): the DIL generators
  (LSIF, UKL, BCE, Basu α), DPO and f-DPO with each divergence;
* demonstration objectives on the two-mode expert (§3): forward KL = SFT, reverse KL =
  adversarial imitation (dil_jax/afd/adversarial.py).

Reported per method: the training dynamics of the chosen / rejected log-likelihood and their
margin (``metrics.jsonl``, docs/objectives.md §5 names), gold reward and KL to π_0 of the final
policy's samples, entropy, and the share of samples in each gold mode (mode coverage).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import ml_collections

from dil_jax import checkpointing, sharding
from dil_jax import train as core
from dil_jax.afd import adversarial
from dil_jax.afd import extrapolation as afd
from dil_jax.data.gold_task import GoldTask
from dil_jax.metrics import read_metrics

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


# Training budget per method: (steps, global batch, preference lr, sft lr). The reduced budget
# (a 1-layer width-32 model, a few CPU minutes for the whole notebook) has a raised lr so the
# methods still move away from π_0 and from each other; it is a smoke test, not evidence.
BUDGET = {False: (200, 64, 1e-4, 1e-3), True: (30, 16, 2e-3, 3e-3)}


def make_config(config, reduced: bool):
    """``config`` (configs/afd_gold.py's) on one device; ``reduced`` shrinks it to a smoke test.

    The caller loads the config file, so the library never reads repository-relative paths.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    for c in (config, config.init.pretrain):
        c.mesh.shape = (1, 1, 1)
        c.train.progress_bar = c.train.tensorboard = c.checkpoint.async_save = False
        c.eval.every_steps = c.eval.gold_prompts = 0
        c.train.log_every = 1 if reduced else 10  # reduced: every step, so curves have points
    config.eval.gold_prompts = 32 if reduced else 256
    a = config.afd.adversarial
    a.steps, a.prompts_per_step, a.samples_per_prompt = (10, 8, 2) if reduced else (100, 16, 4)
    a.learning_rate = a.disc.learning_rate = 3e-3 if reduced else 3e-4
    a.log_every, a.checkpoint_every = (1, 10) if reduced else (10, 50)
    if reduced:
        for m in (config.model, config.init.pretrain.model):
            m.num_hidden_layers, m.hidden_size, m.intermediate_size = 1, 32, 64
        p = config.init.pretrain
        p.train.steps, p.data.num_train, p.train.global_batch_size = 60, 512, 32
        p.checkpoint.every_steps = 60
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
    steps, batch, pref_lr, sft_lr = BUDGET[reduced]
    workdir = os.path.join(workroot, name.replace(" ", "_").replace("(", "_").replace(")", ""))
    trainer = core.Trainer(config, mesh=_mesh())
    init_params = checkpointing.load_params(base_dir, trainer.abstract_params())
    data = dict(data, num_train=256 if reduced else 2048)
    if loss["name"] == "adversarial":
        cfg = afd.stage_config(
            config,
            data=data,
            loss="sft",
            steps=1,
            learning_rate=1e-3,
            batch_size=8,
            init_dir=base_dir,
        )
        demos, _ = afd.demonstration_arrays(cfg)
        out = adversarial.train_adversarial(
            config, workdir, init_params=init_params, demos=demos, mesh=_mesh()
        )
        params = out["policy_params"]
    else:
        lr = sft_lr if loss["name"] == "sft" else pref_lr
        cfg = afd.stage_config(
            config,
            data=data,
            loss=loss["name"],
            steps=steps,
            learning_rate=lr,
            batch_size=batch,
            init_dir=base_dir,
        )
        for key, value in loss.items():
            if key != "name":
                cfg.loss[key] = value
        summary = core.train_and_evaluate(cfg, workdir, mesh=_mesh())
        params = summary.pop("state").params
    ev = afd.gold_policy_eval(
        trainer,
        _task(),
        params,
        init_params,
        num_prompts=config.eval.gold_prompts,
        seed=config.data.seed + 2,
        sampling=config.afd.sampling,
    )
    return {"name": name, "workdir": workdir, "dynamics": read_metrics(workdir), **ev}


def _task():
    return GoldTask()


def run_ablation(
    config, workroot: str, *, reduced: bool, methods: Sequence[str] | None = None
) -> list[dict]:
    """Every method of ``methods`` (default: all, or ``REDUCED_METHODS``) from one π_0.

    Args:
      config: the gold-task AfD config (configs/afd_gold.py's ``get_config()``).
    """
    config = make_config(config, reduced)
    base_dir = train_base(config, workroot)
    config.init.mode, config.init.checkpoint_dir = "checkpoint", base_dir
    names = methods or (REDUCED_METHODS if reduced else tuple(METHODS))
    return [run_method(n, config, base_dir, workroot, reduced=reduced) for n in names]


def summary_table(results: Sequence[dict]) -> str:
    """A markdown table of the final metrics."""
    lines = [
        "| method | gold reward | KL to π_0 | entropy | mode A | mode B |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['gold_reward']:.3f} ± {r['gold_reward_se']:.3f} | "
            f"{r['kl']:.2f} | {r['entropy']:.2f} | {r['mode_1']:.2f} | "
            f"{r['mode_2']:.2f} |"
        )
    return "\n".join(lines)
