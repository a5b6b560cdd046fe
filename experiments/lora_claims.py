"""LoRA training works: gold-task gain over the reference beside full fine-tuning, and the
held-out preference accuracy of SmolLM2-135M on the UltraFeedback subset before/after a short
LoRA DIL-LSIF run.

  python experiments/lora_claims.py --part=gold --seeds=3          # ~15 min on 2 CPU cores
  python experiments/lora_claims.py --part=smollm2                 # needs runs/smollm2_hf
  python experiments/lora_claims.py                                # both, -> experiments/results/

Gold task (dil_jax/data/gold_task.py, the machinery of experiments/dil_claims.py): one base
policy (the quickstart's stage-1 SFT, shortened: ``BASE_STEPS``) is the initial policy and the
reference of every run. Per seed (pairs, per-step randomness and evaluation prompts vary), two
runs of DIL-LSIF from that base on the same pairs: full fine-tuning (AdamW 1e-4, the
quickstart's rate) and LoRA (rank 8, alpha 16 on every attention and MLP projection, AdamW 1e-3:
adapters take a larger step). Statistic per run: the policy's gold reward minus the reference's
on the same held-out prompts (``gold_eval.json``); reported as mean ± 95 % Student-t half-width
over seeds (experiments/stats.py). Learning rates are not tuned (one value per method).

SmolLM2 (configs/dil_smollm2_ultrafeedback_lora.py, one CPU device): a short run (40 steps of
8 pairs, lr 5e-4, inline reference) on the UltraFeedback subset cut to 128 tokens (prompts
to their last 64); on the held-out pairs (all 200 by default), before (adapters at B = 0: the
base) and after, every pair is scored and two accuracies reported with 95 % intervals
(normal approximation over pairs): the share of pairs whose chosen response has the higher
mean per-token log-likelihood under the policy ("likelihood accuracy"), and DIL's
implicit-reward accuracy, TRL's ``rewards/accuracies`` (mean log-ratio to the reference of
chosen > rejected). Ties count one half, so the base (every implicit reward 0) scores 0.5,
chance, rather than TRL's 0.

Outputs: ``<out>/lora_claims.json`` and ``<out>/lora_claims.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dil_claims  # noqa: E402  (experiments/dil_claims.py: the gold-task run helpers)
from stats import fmt, mean_ci  # noqa: E402  (experiments/stats.py)

from dil_jax import checkpointing, config_files, lora, sharding  # noqa: E402
from dil_jax import train as core  # noqa: E402
from dil_jax.data import pipeline  # noqa: E402
from dil_jax.logprobs import sequence_logps  # noqa: E402

BASE_STEPS = 200  # stage-1 SFT steps of the shared base (quickstart: 600)
STEPS = 100  # DIL-LSIF steps of every run (quickstart: 200)
FULL_LR, LORA_LR = 1e-4, 1e-3
LORA = {"lora.enabled": True, "lora.rank": 8, "lora.alpha": 16.0}


# ----------------------------------------------------------------------------- gold task


def gold_part(work: str, seeds: int) -> dict:
    quick, pre = dil_claims.base_config(reduced=False)
    pre.train.steps = BASE_STEPS
    pre.checkpoint.every_steps = pre.eval.every_steps = BASE_STEPS
    base_dir = os.path.join(work, "base")
    if not os.path.isdir(os.path.join(base_dir, "checkpoints")):
        core.train_and_evaluate(pre, base_dir, mesh=dil_claims.mesh()).pop("state", None)
    runs: dict = {"full": [], "lora": []}
    for seed in range(seeds):
        for name, overrides in (
            ("full", {"optim.learning_rate": FULL_LR}),
            ("lora", {**LORA, "optim.learning_rate": LORA_LR}),
        ):
            config = dil_claims.run_config(quick, base_dir, seed, "dil_lsif", False, **overrides)
            config.train.steps = STEPS
            config.checkpoint.every_steps = STEPS
            workdir = os.path.join(work, f"seed{seed}", name)
            dil_claims.one_run(config, workdir)
            gold = json.load(open(os.path.join(workdir, "gold_eval.json")))
            runs[name].append(
                {
                    "seed": seed,
                    "policy_gold": gold["policy"]["gold_reward"],
                    "reference_gold": gold["reference"]["gold_reward"],
                    "gain": gold["policy"]["gold_reward"] - gold["reference"]["gold_reward"],
                    "kl": gold["policy"]["kl"],
                    "win_rate": gold["policy"]["win_rate"],
                }
            )
            logging.warning("seed %d %s: gain %.3f", seed, name, runs[name][-1]["gain"])
    summary = {}
    for name, rows in runs.items():
        gain = [r["gain"] for r in rows]
        m, h = mean_ci(gain)
        summary[name] = {
            "gain": fmt(gain),
            "gain_mean": m,
            "gain_half_width": h,
            "win_rate": fmt([r["win_rate"] for r in rows]),
            "kl": fmt([r["kl"] for r in rows]),
            "runs": rows,
        }
    return summary


# ----------------------------------------------------------------------------- SmolLM2


def smollm2_config(hf_dir: str, steps: int, batch: int, max_length: int):
    mod = config_files.load(os.path.join(REPO, "configs", "dil_smollm2_ultrafeedback_lora.py"))
    config = mod.get_config(hf_dir)
    d = config.data
    d.max_length, d.max_prompt_length, d.buckets = max_length, max_length // 2, (max_length,)
    config.train.steps = steps
    config.train.global_batch_size = batch
    # Inline reference (the base through the same params, adapters off): a short run would
    # otherwise spend most of its time precomputing the reference over all 994 pairs.
    config.reference.mode = "inline"
    config.optim.warmup_ratio = 0.1
    config.optim.learning_rate = 5e-4
    config.eval.every_steps = 0
    config.eval.batch_size = 8
    config.checkpoint.every_steps = steps
    config.checkpoint.async_save = False
    config.train.progress_bar = False
    config.train.tensorboard = False
    config.mesh.shape = (1, 1, 1)
    return config


def pair_scores(trainer, params, batches) -> np.ndarray:
    """[n, 2] mean per-token log-likelihoods of (chosen, rejected) of every held-out pair."""
    fn = jax.jit(lambda p, b: sequence_logps(trainer.model, trainer.family, p, b, **trainer.chunks))
    out = []
    with jax.set_mesh(trainer.mesh):
        for batch in batches:
            r = jax.device_get(fn(params, trainer.put_batch(batch)))
            out.append(r.sum_logps / np.maximum(r.n_tokens, 1.0))
    return np.concatenate(out)


def accuracy(margins: np.ndarray) -> tuple[float, float]:
    """Share of pairs with a positive margin (ties one half) and its 95 % half-width."""
    p = float(np.mean((margins > 0) + 0.5 * (margins == 0)))
    return p, 1.96 * float(np.sqrt(max(p * (1 - p), 1e-12) / len(margins)))


def smollm2_part(args, work: str) -> dict:
    steps, eval_pairs = args.steps, args.eval_pairs
    config = smollm2_config(args.hf_dir, steps, args.batch, args.max_length)
    workdir = os.path.join(work, "smollm2_lora")
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    t0 = time.time()
    core.train_and_evaluate(config, workdir, mesh=mesh).pop("state", None)
    train_s = time.time() - t0
    trainer = core.Trainer(config, mesh=mesh)
    _, eval_data, _ = pipeline.build_datasets(config, workdir=workdir)
    it = pipeline.make_iterator(eval_data, config.eval.batch_size, shuffle=False)
    n_batches = min(it.batches_per_epoch, -(-eval_pairs // config.eval.batch_size))
    batches = [next(it) for _ in range(n_batches)]
    base = trainer.base_params(core._initial_params(trainer, workdir))
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        trainer.abstract_state.params,
        trainer.params_sharding,
    )
    adapters = checkpointing.load_params(workdir, target)
    before = pair_scores(trainer, base, batches)  # adapters off = B = 0: the base
    after = pair_scores(trainer, lora.combine(base, adapters), batches)
    reward = after - before  # DIL's implicit reward (mean reduction), [n, 2]
    lik_before, lik_after = (
        accuracy(before[:, 0] - before[:, 1]),
        accuracy(after[:, 0] - after[:, 1]),
    )
    rew_before, rew_after = accuracy(np.zeros(len(before))), accuracy(reward[:, 0] - reward[:, 1])
    return {
        "pairs": int(len(before)),
        "steps": steps,
        "pairs_per_step": args.batch,
        "max_length": args.max_length,
        "train_seconds": train_s,
        "likelihood_accuracy_before": lik_before,
        "likelihood_accuracy_after": lik_after,
        "implicit_reward_accuracy_before": rew_before,  # every reward is 0 at B = 0: ties
        "implicit_reward_accuracy_after": rew_after,
        "implicit_reward_margin_after": mean_ci(reward[:, 0] - reward[:, 1]),
        "mean_margin_before": float(np.mean(before[:, 0] - before[:, 1])),
        "mean_margin_after": float(np.mean(after[:, 0] - after[:, 1])),
    }


# ----------------------------------------------------------------------------- report


def ci(value) -> str:
    """``(mean, half-width)`` as ``m ± h``."""
    m, h = value
    return f"{m:.3f} ± {h:.3f}"


def write_report(results: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "lora_claims.json"), "w") as f:
        json.dump(results, f, indent=2)
    lines = ["# LoRA claims (experiments/lora_claims.py)", ""]
    if "gold" in results:
        g = results["gold"]
        lines += [
            "## Gold task: DIL-LSIF gold-reward gain over the reference (95 % CI over seeds)",
            "",
            "| method | gain | win rate | KL |",
            "|---|---|---|---|",
        ]
        for name in ("full", "lora"):
            lines.append(
                f"| {name} | {g[name]['gain']} | {g[name]['win_rate']} | {g[name]['kl']} |"
            )
        lines.append("")
    if "smollm2" in results:
        s = results["smollm2"]
        lines += [
            f"## SmolLM2-135M LoRA DIL-LSIF, {s['steps']} steps, {s['pairs']} held-out pairs",
            "",
            f"{s['pairs_per_step']} pairs per step, max length {s['max_length']}; "
            "95 % intervals over pairs; ties count one half",
            "",
            "| accuracy | before | after |",
            "|---|---|---|",
            f"| likelihood | {ci(s['likelihood_accuracy_before'])} | "
            f"{ci(s['likelihood_accuracy_after'])} |",
            f"| implicit reward | {ci(s['implicit_reward_accuracy_before'])} | "
            f"{ci(s['implicit_reward_accuracy_after'])} |",
            "",
            "implicit reward margin (chosen − rejected) after: "
            f"{ci(s['implicit_reward_margin_after'])}",
            "",
        ]
    with open(os.path.join(out, "lora_claims.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "experiments", "results"))
    p.add_argument("--workdir", default="", help="run directories (default <out>/lora_runs)")
    p.add_argument("--part", default="all", choices=("all", "gold", "smollm2"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40, help="SmolLM2 run length")
    p.add_argument("--batch", type=int, default=8, help="SmolLM2 pairs per step")
    p.add_argument("--max_length", type=int, default=128, help="SmolLM2 tokens per response")
    p.add_argument("--eval_pairs", type=int, default=200, help="SmolLM2 held-out pairs scored")
    p.add_argument("--hf_dir", default=os.path.join(REPO, "runs", "smollm2_hf"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = args.workdir or os.path.join(args.out, "lora_runs")
    path = os.path.join(args.out, "lora_claims.json")
    results = json.load(open(path)) if os.path.isfile(path) else {}
    if args.part in ("all", "gold"):
        results["gold"] = gold_part(work, args.seeds)
    if args.part in ("all", "smollm2"):
        results["smollm2"] = smollm2_part(args, work)
    write_report(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
