"""Iterative / online alignment on the built-in gold-reward task: DITTO, SPIN, online DIL, mixing.

  nice -n 10 python experiments/online_claims.py --out=experiments/results        # 3 seeds
  python experiments/online_claims.py --reduced --seeds=1 --out=/tmp/online_reduced  # CI smoke

Per seed, from one shared base policy π_0 (the quickstart's SFT on the noisy two-mode base
distribution, trained once in ``<workdir>/base``):

* **O1, DITTO vs SFT with few demonstrations** (Shaikh et al. 2024): SFT of π_0 on
  ``n_demos`` expert demonstrations, then DITTO rounds from that SFT policy on the same
  demonstrations (demonstration ≻ samples, replay, later ≻ earlier; DPO, π_ref = the SFT policy);
  gold reward of both and DITTO's win rate against the SFT policy.
* **O2, SPIN rounds 0–3** (Chen et al. 2024): SFT of π_0 on ``spin_demos`` demonstrations,
  then three SPIN rounds on the same SFT data (SFT response ≻ current sample, DPO, reference
  hard-replaced every round); gold reward per round (round 0 = the SFT policy).
* **O3, online vs offline DIL at equal sample budget**: DIL-LSIF from π_0 on (a) ``budget/2``
  offline Bradley–Terry pairs of base-distribution responses labelled by the gold reward, vs
  (b) the online loop: ``budget`` responses sampled from the current policy over the rounds,
  best ≻ worst by gold reward per prompt; the same number of optimiser steps.
* **O4, mixing weights sweep**: π_A, π_B = SFT of π_0 on mode-A / mode-B experts; samples of
  the log-linear mixture ``π_A^{w} π_B^{1−w}`` for w ∈ {0, .25, .5, .75, 1}: share of each mode
  and gold reward; and weights fitted by mirror descent for the weighted reward
  ``0.75·score_A + 0.25·score_B``.

Output in ``--out``: ``online_claims.json`` (every number, per seed) and ``online_claims.md``
(mean ± 95 % t-interval over seeds via experiments/stats.py, and a verdict per claim computed by
:func:`verdicts`, never edited by hand).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import jax
import numpy as np

from dil_jax import checkpointing, config_files, sharding
from dil_jax import train as core
from dil_jax.data.gold_task import EOS, PAD, GoldTask
from dil_jax.online import iterative, mixing
from dil_jax.runtime import exit_on_bad_input

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stats import claims_main, diff_ci, fmt, mean_ci  # noqa: E402  (experiments/stats.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIX_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
FIT_LAMBDA = (0.75, 0.25)


def scale(reduced: bool) -> dict:
    """Every size of the study; the reduced (CI) scale only checks that it runs."""
    if reduced:
        return dict(
            pretrain_steps=20, eval_prompts=16, n_demos=8, sft_steps=4, ditto_rounds=2,
            ditto_steps=2, k=2, spin_demos=16, spin_rounds=2, spin_steps=2, budget=32,
            dil_rounds=2, dil_steps=2, mode_steps=4, fit_steps=2, fit_prompts=8, batch=8,
        )  # fmt: skip
    return dict(
        pretrain_steps=300, eval_prompts=256, n_demos=16, sft_steps=40, ditto_rounds=3,
        ditto_steps=20, k=4, spin_demos=128, spin_rounds=3, spin_steps=16, budget=512,
        dil_rounds=4, dil_steps=16, mode_steps=60, fit_steps=15, fit_prompts=64, batch=32,
    )  # fmt: skip


def mesh_1():
    return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def base_config(seed: int, reduced: bool):
    """configs/online_gold_ditto.py's model and run settings on one device, for one seed."""
    config = config_files.load(os.path.join(REPO, "configs", "online_gold_ditto.py")).get_config()
    config.seed = seed
    config.data.seed = 1234 + 17 * seed
    config.mesh.shape = (1, 1, 1)
    config.train.progress_bar = config.train.tensorboard = False
    config.train.log_every = 10
    config.checkpoint.async_save = False
    config.eval.every_steps = config.eval.gold_prompts = 0
    config.data.num_eval = 8  # unused (no held-out loss evaluation), kept small
    config.init.mode, config.init.pretrain = "scratch", None  # each run sets its start
    if reduced:
        m = config.model
        m.num_hidden_layers, m.hidden_size, m.intermediate_size = 1, 32, 64
    return config


def pretrain_base(workroot: str, reduced: bool) -> str:
    """π_0: SFT from scratch on the base distribution (the quickstart's stage 1)."""
    s = scale(reduced)
    c = base_config(0, reduced)
    c.loss.name, c.loss.beta = "sft", None
    c.data.format, c.data.response_source, c.data.num_train = "sft", "base", 8192
    c.optim.learning_rate, c.optim.warmup_ratio = 3e-3, 0.05
    c.train.steps, c.train.global_batch_size = s["pretrain_steps"], 128
    c.checkpoint.every_steps = s["pretrain_steps"]
    c.init.mode = "scratch"
    base_dir = os.path.join(workroot, "base")
    del core.train_and_evaluate(c, base_dir, mesh=mesh_1())["state"]
    return base_dir


def core_run(config, workdir, init_dir, *, loss, fmt_, source, num, steps, lr, batch, beta=None):
    """A core-trainer run (SFT or offline preference training) from ``init_dir``'s params."""
    c = type(config)(config.to_dict())
    c.loss.name, c.loss.beta = loss, beta
    c.data.format, c.data.response_source, c.data.num_train = fmt_, source, num
    c.train.steps, c.optim.learning_rate = steps, lr
    c.train.global_batch_size = min(batch, num)
    c.checkpoint.every_steps = steps
    c.init.mode, c.init.checkpoint_dir = "checkpoint", init_dir
    del core.train_and_evaluate(c, workdir, mesh=mesh_1())["state"]
    return workdir


def online_run(config, workdir, init_dir, **online):
    """The iterative loop (dil_jax/online/iterative.py) from ``init_dir``'s params."""
    c = type(config)(config.to_dict())
    c.init.mode, c.init.checkpoint_dir = "checkpoint", init_dir
    for key, value in online.items():
        if key in ("loss", "beta", "lr", "batch"):
            continue
        c.online[key] = value
    c.loss.name, c.loss.beta = online.get("loss", "dpo"), online.get("beta", 0.1)
    c.optim.learning_rate = online.get("lr", 3e-4)
    c.train.global_batch_size = online.get("batch", 32)
    return iterative.run_online(c, workdir, mesh=mesh_1())


class Evaluator:
    """Gold reward, win rate and KL against π_0 of any policy on one seed's held-out prompts."""

    def __init__(self, config, base_dir, n):
        c = type(config)(config.to_dict())
        c.online.eval_prompts = n
        self.run = iterative.OnlineRun(c, mesh=mesh_1())
        self.task = GoldTask()
        self.pi0 = self.load(base_dir)
        self.prompts = self.task.sample_prompts(n, seed=config.data.seed + 2)
        self.seed = config.seed + 101

    def load(self, workdir):
        return checkpointing.load_params(workdir, self.run.trainer.abstract_params())

    def __call__(self, params) -> dict:
        return iterative.evaluate_policy(
            self.run,
            self.task,
            params,
            self.pi0,
            self.prompts,
            np.ones_like(self.prompts),
            seed=self.seed,
        )


def mixture_eval(ev: Evaluator, stacked, weights, prompts, seed):
    """Mode shares, gold and per-mode scores of mixture samples, and their weight scores."""
    out = mixing.generate_mixture(
        ev.run.model,
        stacked,
        weights,
        prompts,
        np.ones_like(prompts),
        jax.random.key(seed),
        max_new_tokens=ev.task.max_response_len,
        eos_id=EOS,
        pad_id=PAD,
    )
    tokens = np.asarray(out.tokens)
    scores = ev.task.mode_scores(prompts, tokens)  # [n, 2]
    modes = ev.task.mode_of(prompts, tokens)
    row = {
        "mode_a": float(np.mean(modes == 1)),
        "mode_b": float(np.mean(modes == 2)),
        "gold": float(np.mean(scores.max(1))),
        "score_a": float(scores[:, 0].mean()),
        "score_b": float(scores[:, 1].mean()),
    }
    return row, scores, np.asarray(out.scores)


def run_seed(seed: int, reduced: bool, workroot: str, base_dir: str) -> dict:
    t0 = time.time()
    s = scale(reduced)
    config = base_config(seed, reduced)
    config.online.eval_prompts = s["eval_prompts"]
    config.online.samples_per_prompt = s["k"]
    wd = os.path.join(workroot, f"seed{seed}")
    ev = Evaluator(config, base_dir, s["eval_prompts"])
    out: dict = {"seed": seed, "pi0": ev(ev.pi0)}

    # O1: DITTO vs SFT on the same few demonstrations.
    sft_dir = core_run(
        config, os.path.join(wd, "sft_few"), base_dir, loss="sft", fmt_="sft",
        source="expert", num=s["n_demos"], steps=s["sft_steps"], lr=1e-3, batch=s["batch"],
    )  # fmt: skip
    out["sft_few"] = ev(ev.load(sft_dir))
    ditto = online_run(
        config, os.path.join(wd, "ditto"), sft_dir, pairs="ditto", reference="fixed",
        rounds=s["ditto_rounds"], steps_per_round=s["ditto_steps"], num_prompts=s["n_demos"],
        demo_source="expert", batch=min(s["batch"], s["n_demos"] * s["k"]),
    )  # fmt: skip
    out["ditto_rounds"] = ditto["rounds"]  # KL / win rate against the SFT policy
    out["ditto"] = ev(ditto["params"])

    # O2: SPIN rounds 0..R from the SFT policy on the SPIN data.
    spin_sft = core_run(
        config, os.path.join(wd, "sft_spin"), base_dir, loss="sft", fmt_="sft",
        source="expert", num=s["spin_demos"], steps=s["sft_steps"], lr=1e-3, batch=s["batch"],
    )  # fmt: skip
    spin = online_run(
        config, os.path.join(wd, "spin"), spin_sft, pairs="spin", reference="hard",
        rounds=s["spin_rounds"], steps_per_round=s["spin_steps"], num_prompts=s["spin_demos"],
        samples_per_prompt=2, demo_source="expert", batch=s["batch"],
    )  # fmt: skip
    out["spin_rounds"] = spin["rounds"]

    # O3: online vs offline DIL-LSIF, equal responses sampled and equal optimiser steps.
    steps = s["dil_rounds"] * s["dil_steps"]
    offline_dir = core_run(
        config, os.path.join(wd, "dil_offline"), base_dir, loss="dil_lsif", fmt_="preference",
        source="base", num=s["budget"] // 2, steps=steps, lr=5e-4, batch=s["batch"],
    )  # fmt: skip
    out["dil_offline"] = ev(ev.load(offline_dir))
    prompts_per_round = s["budget"] // (s["dil_rounds"] * s["k"])
    online = online_run(
        config, os.path.join(wd, "dil_online"), base_dir, pairs="ranked", rank_by="gold",
        reference="fixed", rounds=s["dil_rounds"], steps_per_round=s["dil_steps"],
        num_prompts=prompts_per_round, num_pairs=prompts_per_round, demo_source="base",
        loss="dil_lsif", beta=None, lr=5e-4, batch=min(s["batch"], prompts_per_round),
    )  # fmt: skip
    out["dil_online"] = ev(online["params"])
    out["dil_online_rounds"] = online["rounds"]
    out["budget"] = {"responses": s["budget"], "steps": steps}

    # O4: mixing π_A and π_B.
    modes = {}
    for name, source in (("a", "expert_a"), ("b", "expert_b")):
        d = core_run(
            config, os.path.join(wd, f"sft_mode_{name}"), base_dir, loss="sft", fmt_="sft",
            source=source, num=2048, steps=s["mode_steps"], lr=1e-3, batch=s["batch"],
        )  # fmt: skip
        modes[name] = ev.load(d)
    stacked = mixing.stack_params([modes["a"], modes["b"]])
    out["mixing"] = []
    for w in MIX_WEIGHTS:
        row, _, _ = mixture_eval(ev, stacked, [w, 1.0 - w], ev.prompts, seed + 500)
        out["mixing"].append(dict(row, w_a=w))
    lam = np.asarray(FIT_LAMBDA)
    fit_prompts = GoldTask().sample_prompts(s["fit_prompts"], seed=config.data.seed + 3)

    def sample(weights, step):
        _, scores, wscores = mixture_eval(ev, stacked, weights, fit_prompts, seed + 900 + step)
        return scores @ lam, wscores

    w, history = mixing.fit_weights(sample, 2, steps=s["fit_steps"], lr=2.0)
    fitted, _, _ = mixture_eval(ev, stacked, w.astype(np.float32), ev.prompts, seed + 500)
    out["mixing_fit"] = {
        "lambda": list(FIT_LAMBDA),
        "weights": w.tolist(),
        "history": history,
        "eval": dict(fitted, objective=float(lam @ [fitted["score_a"], fitted["score_b"]])),
    }
    out["seconds"] = time.time() - t0
    logging.warning("seed %d done in %.0f s", seed, out["seconds"])
    return out


# ----------------------------------------------------------------------------- statistics


def _col(runs, *keys):
    vals = []
    for r in runs:
        x = r
        for k in keys:
            x = x[k]
        vals.append(float(x))
    return vals


def verdicts(runs) -> dict[str, tuple[str, str]]:
    """(verdict, reason) per claim from the per-seed numbers (Welch intervals on differences)."""
    v = {}
    d, h = diff_ci(_col(runs, "ditto", "gold_reward"), _col(runs, "sft_few", "gold_reward"))
    win = mean_ci([r["ditto_rounds"][-1]["win_rate"] for r in runs])[0]
    v["O1 DITTO beats SFT with few demonstrations"] = (
        "reproduced" if d - h > 0 else "partially reproduced" if d > 0 else "not reproduced",
        f"gold DITTO − SFT = {d:+.3f} ± {h:.3f}; DITTO's win rate against the SFT policy {win:.2f}",
    )
    spin = np.array([[row["gold_reward"] for row in r["spin_rounds"]] for r in runs])  # [s, R+1]
    d, h = diff_ci(spin[:, -1], spin[:, 0])
    d1 = float(np.mean(spin[:, 1] - spin[:, 0]))
    v["O2 SPIN improves over rounds"] = (
        "reproduced"
        if d - h > 0
        else "partially reproduced"
        if d > 0 or d1 > 0
        else "not reproduced",
        "gold by round: " + ", ".join(f"{i}: {m:.3f}" for i, m in enumerate(spin.mean(0)))
        + f"; last − round 0 = {d:+.3f} ± {h:.3f}",
    )  # fmt: skip
    d, h = diff_ci(
        _col(runs, "dil_online", "gold_reward"), _col(runs, "dil_offline", "gold_reward")
    )
    v["O3 online DIL beats offline DIL at equal sample budget"] = (
        "reproduced" if d - h > 0 else "partially reproduced" if d > 0 else "not reproduced",
        f"gold online − offline = {d:+.3f} ± {h:.3f} "
        f"(KL to π_0: online {np.mean(_col(runs, 'dil_online', 'kl')):.2f}, offline "
        f"{np.mean(_col(runs, 'dil_offline', 'kl')):.2f})",
    )
    a = np.array([[row["mode_a"] for row in r["mixing"]] for r in runs]).mean(0)
    b = np.array([[row["mode_b"] for row in r["mixing"]] for r in runs]).mean(0)
    mono = bool(np.all(np.diff(a) >= -0.02) and np.all(np.diff(b) <= 0.02))
    span = a[-1] - a[0] > 0.2 and b[0] - b[-1] > 0.2
    fit_w = np.mean([r["mixing_fit"]["weights"][0] for r in runs])
    v["O4 mixing weights trace the trade-off between the two modes"] = (
        "reproduced" if mono and span else "partially reproduced" if span else "not reproduced",
        "mode A share by w_A: "
        + ", ".join(f"{w:.2f}: {x:.2f}" for w, x in zip(MIX_WEIGHTS, a, strict=True))
        + "; mode B share: "
        + ", ".join(f"{x:.2f}" for x in b)
        + f"; mirror descent for λ = {FIT_LAMBDA} fits w_A = {fit_w:.2f}",
    )
    return v


def write_report(runs, out_dir: str, reduced: bool) -> str:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "online_claims.json"), "w") as f:
        json.dump(runs, f, indent=1)
    s = scale(reduced)
    lines = [
        f"# Iterative and online alignment on the gold-reward task ({len(runs)} seeds"
        f"{', REDUCED smoke scale: not evidence' if reduced else ''})",
        "",
        "Mean ± 95% t-interval over seeds (experiments/stats.py). Generated by "
        "`experiments/online_claims.py`"
        + (" --reduced" if reduced else "")
        + f"; sizes: {json.dumps(s)}. Win rate and KL are against π_0 (the shared base policy) "
        "unless stated.",
        "",
        "## Policies",
        "",
        "| policy | gold reward | win rate vs π_0 | KL to π_0 | response length | mode A "
        "| mode B |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = {
        "pi0": "π_0 (base)",
        "sft_few": f"SFT on {s['n_demos']} demonstrations",
        "ditto": f"DITTO ({s['ditto_rounds']} rounds) on the same demonstrations",
        "dil_offline": f"DIL-LSIF offline ({s['budget'] // 2} base pairs)",
        "dil_online": f"DIL-LSIF online ({s['budget']} sampled responses)",
    }
    for key, label in names.items():
        col = lambda k: fmt([r[key][k] for r in runs])  # noqa: B023, E731
        lines.append(
            f"| {label} | {col('gold_reward')} | {col('win_rate')} | {col('kl')} | "
            f"{col('response_length')} | {col('mode_1')} | {col('mode_2')} |"
        )
    lines += [
        "",
        "## Rounds",
        "",
        "Gold reward after each round (round 0 = the starting policy; DITTO and SPIN start from "
        "their SFT policy, whose win rate / KL they are measured against):",
        "",
        "| run | "
        + " | ".join(
            f"round {i}"
            for i in range(max(s["spin_rounds"], s["dil_rounds"], s["ditto_rounds"]) + 1)
        )
        + " |",  # noqa: E501
        "| --- |" + " --- |" * (max(s["spin_rounds"], s["dil_rounds"], s["ditto_rounds"]) + 1),
    ]
    for key, label in (
        ("ditto_rounds", "DITTO"),
        ("spin_rounds", "SPIN"),
        ("dil_online_rounds", "online DIL"),
    ):
        n = len(runs[0][key])
        cells = [fmt([r[key][i]["gold_reward"] for r in runs]) for i in range(n)]
        lines.append(f"| {label} gold | " + " | ".join(cells) + " |")
        cells = [fmt([r[key][i]["win_rate"] for r in runs], 2) for i in range(n)]
        lines.append(f"| {label} win rate vs start | " + " | ".join(cells) + " |")
        cells = [fmt([r[key][i]["kl"] for r in runs], 2) for i in range(n)]
        lines.append(f"| {label} KL to start | " + " | ".join(cells) + " |")
        cells = [fmt([r[key][i]["response_length"] for r in runs], 1) for i in range(n)]
        lines.append(f"| {label} response length | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Mixing π_A^w · π_B^(1−w) (decode time)",
        "",
        "| w_A | mode A | mode B | gold | score A | score B |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for i, w in enumerate(MIX_WEIGHTS):
        col = lambda k: fmt([r["mixing"][i][k] for r in runs])  # noqa: B023, E731
        lines.append(
            f"| {w:.2f} | {col('mode_a')} | {col('mode_b')} | {col('gold')} | "
            f"{col('score_a')} | {col('score_b')} |"
        )
    fit = lambda k: fmt([r["mixing_fit"]["eval"][k] for r in runs])  # noqa: E731
    lines += [
        "",
        f"Mirror descent on the weights for {FIT_LAMBDA[0]}·score_A + {FIT_LAMBDA[1]}·score_B "
        f"({s['fit_steps']} steps of {s['fit_prompts']} prompts, η = 2, from w = (0.5, 0.5)): "
        f"w_A = {fmt([r['mixing_fit']['weights'][0] for r in runs])}; objective "
        f"{fit('objective')}, mode A {fit('mode_a')}, mode B {fit('mode_b')}.",
        "",
        "## Verdicts",
        "",
        "| claim | verdict | evidence |",
        "| --- | --- | --- |",
    ]
    for claim, (verdict, reason) in verdicts(runs).items():
        lines.append(f"| {claim} | {verdict} | {reason} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "online_claims.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    return claims_main(
        argv,
        doc=__doc__,
        workdir="/tmp/online_claims_runs",
        pretrain_base=pretrain_base,
        run_seed=run_seed,
        write_report=write_report,
    )


if __name__ == "__main__":
    with exit_on_bad_input():
        sys.exit(main())
