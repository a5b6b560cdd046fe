"""The iterative (online) alignment loop: rounds of sample → build pairs → train.

Each round ``t`` of ``online.rounds``:

1. **Sample** ``k = online.samples_per_prompt`` responses to each of the round's prompts from the
   current policy with the sharded KV-cache sampler (``dil_jax.afd.rollouts.sample`` over
   ``dil_jax.sampling``), key ``fold_in(key(seed + 11), t)``. The samples are written to
   ``<workdir>/round_<t>/samples.npz`` before training, so a resumed round trains on exactly the
   data the interrupted one drew, and every round's data stays inspectable.
2. **Build pairs** with one of the pure builders of ``dil_jax.online.pairs``
   (``online.pairs``): ``'ditto'`` (demonstration ≻ samples, with replay of earlier rounds and
   later ≻ earlier), ``'spin'`` (SFT response ≻ current sample) or ``'ranked'`` (best ≻ worst of
   the k samples by the gold reward or a trained reward model: online DPO / DIL).
3. **Train** ``online.steps_per_round`` steps of the configured pair objective (any
   ``config.loss``: DPO, DIL, ...) with ``dil_jax.train.train_step`` on the one runtime
   (``dil_jax.loop.run``): checkpoints, preemption, finiteness policy and metrics JSONL in
   ``<workdir>/round_<t>/``. The train state holds ``{'policy', 'reference'}`` params, so the
   reference refresh (``online.reference``: fixed / hard / soft, ``dil_jax.online.refresh``) is
   checkpointed with the policy. The optimiser restarts every round (its schedule spans one
   round).
4. **Evaluate** the round's policy on held-out prompts: gold reward and win rate against π_0
   (gold task), Monte-Carlo KL to π_0 and mean response length; the row goes to
   ``<workdir>/round_<t>/round.json`` (which marks the round done) and the whole table to
   ``<workdir>/rounds.jsonl`` (row 0: π_0 itself).

Resuming: rerunning the same command skips finished rounds, reuses a round's saved samples,
rebuilds its pairs from the same seeded generator and lets ``loop.run`` continue from the
round's latest checkpoint, so an interrupted run ends bit-identical to an uninterrupted one.

Shape letters: n prompts, k samples per prompt, S pool slots, T sequence length.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dil_jax import checkpointing, loop, paths, sharding, spec
from dil_jax import train as core
from dil_jax.afd import extrapolation, reward_model, rollouts
from dil_jax.data import pipeline
from dil_jax.errors import ConfigError
from dil_jax.loop import TrainState
from dil_jax.online import checks as online_checks
from dil_jax.online import pairs as pair_builders
from dil_jax.online import refresh

PAIR_BUILDERS, RANK_BY = online_checks.PAIR_BUILDERS, online_checks.RANK_BY
OnlineSpec = spec.OnlineSpec


# ----------------------------------------------------------------------------- the config


def online_spec(section) -> OnlineSpec:
    """``config.online`` on its own, typed and checked (``spec.build`` does the same for a
    whole run); a bad field raises ConfigError naming it."""
    out = section if isinstance(section, OnlineSpec) else OnlineSpec.from_config(section, "online")
    online_checks.check_online(out, "online")
    return out


# ----------------------------------------------------------------------------- the task


def online_step(state: TrainState, batch, *, inner_step, reference_mode, alpha, every):
    """One preference step of the policy against the state's reference, then (``soft``) the
    TR-DPO refresh of the reference. Pure: ``(state, batch) -> (state, metrics)``; the state's
    params are ``{'policy', 'reference'}``."""
    inner = TrainState(step=state.step, params=state.params["policy"], opt_state=state.opt_state)
    new, metrics = inner_step(inner, batch, state.params["reference"])
    reference = state.params["reference"]
    if reference_mode == "soft":
        reference = refresh.soft_update(reference, new.params, new.step, alpha=alpha, every=every)
    params = {"policy": new.params, "reference": reference}
    return TrainState(step=new.step, params=params, opt_state=new.opt_state), metrics


def round_config(config) -> ml_collections.ConfigDict:
    """The preference run one round trains: ``config`` with ``online.steps_per_round`` steps,
    the reference inline (it lives in the state, refreshable) and ``data.format='preference'``
    (the step trains on the built pairs ``[B, 2, T]``, whatever the data section reads)."""
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.train.steps = int(cfg.online.steps_per_round)
    cfg.reference.mode = "inline"
    cfg.data.format = "preference"
    return cfg


def demonstrations_config(config, spec_: OnlineSpec) -> ml_collections.ConfigDict:
    """How the round prompts are read: ``config.data`` as SFT data (real data as it is; the
    gold task's ``online.num_prompts`` demonstrations from ``online.demo_source``)."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.loss.name = "sft"
    for key in ("beta", "reduction"):
        c.loss[key] = None
    c.loss.extra_terms, c.loss.sft_weight = (), 0.0
    if c.data.source == "gold_task":
        c.data.format = "sft"
        c.data.response_source = spec_.demo_source
        c.data.num_train = spec_.num_prompts
    return c


class OnlineRun:
    """The per-round training task for :func:`dil_jax.loop.run` (its ``Task`` protocol).

    Wraps a :class:`dil_jax.train.Trainer` built from ``config`` with ``train.steps`` set to
    one round and an inline reference; the state's params are ``{'policy', 'reference'}``,
    sharded by the family's partition rules.
    """

    def __init__(self, config, *, mesh=None):
        config = spec.resolve(config)
        self.spec = online_spec(config.online)
        cfg = round_config(config)
        self.config = cfg
        self.trainer = core.Trainer(cfg, mesh=mesh)
        t = self.trainer
        self.mesh, self.model, self.family = t.mesh, t.model, t.family
        inner = t.abstract_state
        self.abstract_state = TrainState(
            step=inner.step,
            params={"policy": inner.params, "reference": inner.params},
            opt_state=inner.opt_state,
        )
        specs = sharding.match_partition_rules(
            self.family.partition_rules(), self.abstract_state, self.mesh
        )
        self.state_sharding = sharding.shardings_from_specs(self.mesh, specs)
        self.params_sharding = self.state_sharding.params
        self.replicated = NamedSharding(self.mesh, P())
        self.trace_count = 0
        self._step = None

    @property
    def step_fn(self):
        if self._step is None:
            t = self.trainer
            inner = functools.partial(
                core.train_step,
                model=t.model,
                family=t.family,
                tx=t.tx,
                terms=t.terms,
                accum_steps=self.config.optim.grad_accum_steps,
                chunks=t.chunks,
                diagnostics=t.diagnostics,
            )
            step = functools.partial(
                online_step,
                inner_step=inner,
                reference_mode=self.spec.reference,
                alpha=self.spec.soft_alpha,
                every=self.spec.soft_every,
            )
            self._step = loop.counted_jit(
                self,
                loop.guard_finite(step, self.config.train.on_nonfinite),
                in_shardings=(self.state_sharding, None),
                out_shardings=(self.state_sharding, self.replicated),
                donate_argnums=(0,),
            )
        return self._step

    def run_step(self, state, batch, step: int):
        with jax.set_mesh(self.mesh):
            return self.step_fn(state, self.trainer.put_batch(batch))

    def init_state(self, policy, reference) -> TrainState:
        """A round's fresh state: copies of ``policy`` and ``reference``, a new optimiser."""

        def build(p, r):
            p, r = jax.tree.map(jnp.copy, p), jax.tree.map(jnp.copy, r)
            return TrainState(
                step=jnp.zeros((), jnp.int32),
                params={"policy": p, "reference": r},
                opt_state=self.trainer.tx.init(p),
            )

        return jax.jit(build, out_shardings=self.state_sharding)(policy, reference)

    def abstract_params(self):
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.abstract_state.params,
            self.params_sharding,
        )


# ----------------------------------------------------------------------------- data


def round_dir(workdir: str, t: int) -> str:
    return os.path.join(workdir, f"round_{t:03d}")


def _save_npz(path: str, arrays) -> None:
    """Atomic ``np.savez`` (a crash never leaves half a file that a resume would trust)."""
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def prompt_source(config, spec_: OnlineSpec):
    """``(demonstrations [n, 1, T], task or None)``: the prompts of every round with their
    demonstration / SFT responses (``online.num_prompts`` of them). The gold task generates them
    from ``online.demo_source``; real data reads ``config.data`` as it is (demonstrations, or
    preference pairs whose chosen response serves as the demonstration)."""
    train, _, task = pipeline.build_datasets(demonstrations_config(config, spec_))
    demos = extrapolation.dense(train)
    demos = {k: v[:, :1] for k, v in demos.items() if k in pair_builders.PAIR_KEYS}  # chosen
    n = len(demos["input_ids"])
    if n < spec_.num_prompts:
        raise ConfigError(
            f"online.num_prompts={spec_.num_prompts}: the data has only {n} demonstrations"
        )
    demos = {k: v[: spec_.num_prompts] for k, v in demos.items() if k in pair_builders.PAIR_KEYS}
    if spec_.match_lengths:
        demos = rollouts.truncate_responses(demos, int(spec_.sampling.max_new_tokens))
    return demos, task


def build_pool(demos, rounds_samples: list[dict]) -> dict[str, np.ndarray]:
    """The pool ``[n, S, T]``: slot 0 the demonstration, then k samples per round so far."""
    parts = [demos] + [{k: s[k] for k in pair_builders.PAIR_KEYS} for s in rounds_samples]
    width = max(p["input_ids"].shape[-1] for p in parts)
    return {
        key: np.concatenate([reward_model.pad_to(np.asarray(p[key]), width) for p in parts], 1)
        for key in pair_builders.PAIR_KEYS
    }


def round_triples(spec_: OnlineSpec, t: int, n: int, rewards, seed: int) -> np.ndarray:
    """The round's pair indices (``dil_jax.online.pairs``), seeded by ``(seed, t)``."""
    rng = np.random.default_rng([seed, t, 7])
    k, m = spec_.samples_per_prompt, spec_.pairs_per_round
    if spec_.pairs == "ditto":
        return pair_builders.ditto_pairs(n, k, t, m, rng, spec_.ditto_mix)
    if spec_.pairs == "spin":
        triples = pair_builders.spin_pairs(n, k, t)
    else:
        triples = pair_builders.ranked_pairs(rewards, t)
    return pair_builders.fill_to(triples, m, rng)


# ----------------------------------------------------------------------------- evaluation


def evaluate_policy(run: OnlineRun, task, params, initial, prompts, masks, *, seed: int) -> dict:
    """One sample per held-out prompt from ``params`` and from π_0: gold reward and win rate
    against π_0 (gold task only), KL(π || π_0) Monte-Carlo per response, mean response length."""
    sampling = run.spec.sampling
    out = rollouts.sample(
        run.model, params, prompts, masks, 1, jax.random.key(seed), sampling, mesh=run.mesh
    )
    logp = extrapolation.sequence_logp_scores(run.trainer, params, out)[:, 0]
    logp0 = extrapolation.sequence_logp_scores(run.trainer, initial, out)[:, 0]
    length = out["response_mask"][:, 0].sum(-1).astype(np.float64)
    row = {
        "kl": float(np.mean(logp - logp0)),
        "entropy": float(-np.mean(logp)),
        "response_length": float(length.mean()),
    }
    if task is not None:
        ref = rollouts.sample(
            run.model, initial, prompts, masks, 1, jax.random.key(seed + 1), sampling, mesh=run.mesh
        )
        gold = task.gold_reward(prompts, out["tokens"][:, 0])
        gold0 = task.gold_reward(prompts, ref["tokens"][:, 0])
        modes = task.mode_of(prompts, out["tokens"][:, 0])
        row.update(
            gold_reward=float(gold.mean()),
            win_rate=float(np.mean((gold > gold0) + 0.5 * (gold == gold0))),
            **{f"mode_{m}": float(np.mean(modes == m)) for m in (0, 1, 2)},
        )
    return row


def eval_prompts(run: OnlineRun, task, demos, seed: int):
    """Held-out prompts: fresh gold-task prompts, or (real data) the round prompts themselves."""
    n = run.spec.eval_prompts
    if task is not None:
        prompts = task.sample_prompts(n, seed=seed + 2)  # the quickstart's held-out stream
        return prompts, np.ones_like(prompts)
    ids, mask = rollouts.prompts_from_arrays(demos)
    return ids[:n], mask[:n]


# ----------------------------------------------------------------------------- the loop


def _latest_step(workdir: str) -> int:
    ckpt = checkpointing.checkpoint_dir(workdir)
    if not paths.exists(ckpt):
        return 0
    return max((int(d) for d in paths.listdir(ckpt) if d.isdigit()), default=0)


def _rewards(run: OnlineRun, task, samples, prompts) -> np.ndarray:
    """``[n, k]`` rewards of a round's samples for ranked pairs."""
    s = run.spec
    if s.rank_by == "gold":
        if task is None:
            raise ConfigError(
                "online.rank_by='gold' needs the gold task (config.data.source='gold_task'); "
                "rank real data with online.rank_by='reward_model'"
            )
        n, k, _ = samples["tokens"].shape
        flat = samples["tokens"].reshape(n * k, -1)
        return task.gold_reward(np.repeat(prompts, k, axis=0), flat).reshape(n, k)
    rm_cfg = reward_model.default_config()
    rm_cfg.level = s.reward_model_level
    rm_cfg.global_batch_size = sharding.data_parallel_size(run.mesh)
    rm = reward_model.RewardModel(
        run.config.model, rm_cfg, mesh=run.mesh, field="online.reward_model"
    )
    params = checkpointing.load_params(s.reward_model_dir, rm.abstract_params())
    return rm.score(params, samples)


def run_online(config, workdir: str, *, mesh=None, max_steps: int | None = None) -> dict:
    """Runs (or resumes) the iterative loop described by ``config.online`` in ``workdir``.

    π_0 comes from ``config.init`` as in every run (``'pretrain'`` trains it first in
    ``<workdir>/base``).

    Args:
      max_steps: stop after this many optimiser steps (over all rounds) in this call; tests
        simulate an interruption with it.
    Returns:
      ``{'rounds': [row per evaluated round, row 0 = π_0], 'params': final policy params,
      'complete': bool}``.
    """
    config = spec.resolve(config)
    if config.init.mode == "pretrain":  # π_0 first, in <workdir>/base (stages.plan's layout)
        base_dir = os.path.join(workdir, "base")
        if config.init.pretrain is None:
            raise ConfigError("config.init.pretrain=None: init.mode='pretrain' needs its config")
        del core.train_and_evaluate(config.init.pretrain, base_dir)["state"]
        config.init.mode, config.init.checkpoint_dir = "checkpoint", base_dir
        config.init.pretrain = None
    run = OnlineRun(config, mesh=mesh)
    s, cfg = run.spec, run.config
    paths.makedirs(workdir)
    initial = core._initial_params(run.trainer, workdir)  # π_0 (noqa: the one init reader)
    demos, task = prompt_source(config, s)  # the data section as the user wrote it
    prompts, prompt_mask = rollouts.prompts_from_arrays(demos)
    e_prompts, e_mask = eval_prompts(run, task, demos, cfg.data.seed)
    eval_seed = cfg.seed + 101

    rows_path = os.path.join(workdir, "initial_eval.json")
    if s.eval_prompts and not os.path.exists(rows_path):
        row = evaluate_policy(run, task, initial, initial, e_prompts, e_mask, seed=eval_seed)
        paths.write_atomic(rows_path, json.dumps(dict(row, round=0)))
    policy, reference = initial, initial
    samples_so_far: list[dict] = []
    budget = max_steps
    complete = True
    for t in range(s.rounds):
        rdir = round_dir(workdir, t)
        paths.makedirs(rdir)
        sample_path = os.path.join(rdir, "samples.npz")
        if os.path.exists(sample_path):
            samples = _load_npz(sample_path)
        else:
            rng = jax.random.fold_in(jax.random.key(cfg.seed + 11), t)
            samples = rollouts.sample(
                run.model,
                policy,
                prompts,
                prompt_mask,
                s.samples_per_prompt,
                rng,
                s.sampling,
                mesh=run.mesh,
                field="online.samples_per_prompt",
            )
            if task is not None:
                n, k = samples["tokens"].shape[:2]
                samples["gold_reward"] = task.gold_reward(
                    np.repeat(prompts, k, axis=0), samples["tokens"].reshape(n * k, -1)
                ).reshape(n, k)
            _save_npz(sample_path, samples)
        samples_so_far.append(samples)
        rewards = _rewards(run, task, samples, prompts) if s.pairs == "ranked" else None
        triples = round_triples(s, t, len(prompts), rewards, cfg.seed)
        pool = build_pool(demos, samples_so_far)
        data = pipeline.make_iterator(
            pair_builders.gather_pairs(pool, triples),
            cfg.train.global_batch_size,
            seed=cfg.data.seed + t,
        )
        start = _latest_step(rdir)
        round_policy, round_reference = (
            policy,
            refresh.round_start_reference(
                s.reference, initial=initial, policy=policy, reference=reference
            ),
        )
        result = loop.run(
            run,
            rdir,
            step_fn=run.run_step,
            settings=dataclasses.replace(core.loop_settings(cfg), desc=f"round {t}"),
            data=data,
            init_state=lambda p=round_policy, r=round_reference: run.init_state(p, r),
            resume_config=cfg,
            max_steps=budget,
            schedule=run.trainer.schedule,
            label=f"online round {t}",
        )
        if budget is not None:
            budget -= result.step - start
        policy = result.state.params["policy"]
        reference = result.state.params["reference"]
        if result.step < s.steps_per_round:
            complete = False
            break
        done_path = os.path.join(rdir, "round.json")
        if not os.path.exists(done_path):
            row = {"round": t + 1}
            if s.eval_prompts:
                row.update(
                    evaluate_policy(run, task, policy, initial, e_prompts, e_mask, seed=eval_seed)
                )
            if "gold_reward" in samples:
                row["sample_gold_reward"] = float(np.mean(samples["gold_reward"]))
            row["sample_length"] = float(np.mean(samples["response_mask"].sum(-1)))
            row["train"] = result.train
            paths.write_atomic(done_path, json.dumps(row))
            logging.info("online round %d: %s", t, row)
        if budget is not None and budget <= 0 and t + 1 < s.rounds:
            complete = False
            break
    rows = _collect_rows(workdir, s.rounds)
    paths.write_atomic(
        os.path.join(workdir, "rounds.jsonl"), "".join(json.dumps(r) + "\n" for r in rows)
    )
    return {"rounds": rows, "params": policy, "reference": reference, "complete": complete}


def _collect_rows(workdir: str, rounds: int) -> list[dict]:
    rows = []
    for path in [os.path.join(workdir, "initial_eval.json")] + [
        os.path.join(round_dir(workdir, t), "round.json") for t in range(rounds)
    ]:
        if os.path.exists(path):
            with open(path) as f:
                rows.append(json.load(f))
    return rows
