"""Reverse-KL adversarial imitation (AfD, docs/objectives.md §3): alternating discriminator/policy.

Every iteration, for a batch of demonstration prompts:

1. **Sample** k responses per prompt from the current policy with the KV-cache sampler
   (dil_jax/afd/rollouts.py).
2. **Discriminator update**: one BCE step of ``D_φ = σ(f_φ)`` (dil_jax/afd/reward_model.py),
   demonstrations labelled 1, the k policy samples 0, class-balanced. At the optimum
   ``f* = log d_expert(y|x) − log d_π(y|x)``.
3. **Policy update**: REINFORCE with the leave-one-out baseline (RLOO, Kool et al. 2019; Ahmadian
   et al. 2024) on the k samples of each prompt, rewards from the *updated* discriminator:

       A_i = r̃_i − 1/(k−1) Σ_{j≠i} r̃_j,      loss = −1/(Bk) Σ_i A_i · log π_θ(y_i|x),
       r̃_i = r(f_φ(x, y_i)) − β · (log π_θ(y_i|x) − log π_ref(y_i|x))     (no gradient)

   The optional KL term is folded into the reward, the standard RLOO form: its score-function
   gradient is the gradient of ``β·KL(π_θ || π_ref)``. The Monte-Carlo ``kl`` metric is logged
   whatever β (the reference forward always runs).

   The score function ``∇ log π_θ(y|x)`` is only unbiased when the samples come from π_θ itself,
   so ``afd.sampling`` must be unfiltered here (temperature 1, top_p 1, top_k 0): a filtered
   sampler (e.g. the HH config's top-p 0.95) draws from another distribution, and the
   constructor refuses it with a ConfigError naming the field.

Length matching (``adversarial.match_lengths``, default on): samples stop at
``afd.sampling.max_new_tokens``, demonstrations do not, so response length alone would separate
the classes (91 % of the debug demonstrations exceed a 32-token budget). Each demonstration's
response is cut to the same budget before the discriminator sees it, and the length statistics
of both classes are logged (``lengths/*``, :func:`dil_jax.afd.rollouts.length_stats`).

Reward choices (``adversarial.reward``), all functions of the same discriminator logit f:

* ``'logit'`` — ``r = f = log D − log(1 − D)``: the reverse-KL reward; maximising
  ``E_π[f*]`` minimises ``KL(d_π || d_expert)`` (docs/objectives.md §3). This is also AIRL's reward.
* ``'gail'`` — ``r = −log(1 − D) = softplus(f)``: GAIL's original reward for the Jensen–Shannon
  minimax game ``min_π max_D E_expert[log D] + E_π[log(1 − D)]``. Always positive (a survival
  bonus); it saturates weakly where the discriminator is sure a sample is fake.
* ``'log_d'`` — ``r = log D = −softplus(−f)``: the non-saturating generator loss of GANs for the
  same JS game; always negative.
* ``'f_kl'``, ``'f_reverse_kl'``, ``'f_js'``, ``'f_chi2'``, ``'f_hellinger'``, ``'f_tv'`` — the
  variational f-GAN rewards ``f*(f'(e^f))`` (f-GAIL / f-MAX): the policy then minimises that
  f-divergence between the expert's and its own response distributions
  (dil_jax/afd/f_divergence.py).

The whole update (discriminator step, rewards, policy step) is one jitted, sharded function of
``(state, demo batch, sample batch, ref params)`` with the state donated; the policy and the
discriminator live in one ``AdversarialState`` whose params and optimiser states are
``{'policy': ..., 'disc': ...}``, sharded by the families' partition rules (head replicated), and
checkpointed by dil_jax/checkpointing.py exactly like the core loop (resume from the workdir's
latest checkpoint; the data position and the per-step sampling keys ``fold_in(key, step)`` make a
resumed run repeat the uninterrupted one).

Divergence guard: after every step the host checks that the metrics are finite and that the
largest discriminator logit stays within ``adversarial.max_abs_logit``. Otherwise the loop stops
with :class:`AdversarialDivergence` naming the step and the offending metrics, without saving
that state: the workdir's latest checkpoint is the last good one.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dil_jax import checkpointing, logprobs, loop, sharding, spec
from dil_jax.afd import f_divergence, reward_model, rollouts
from dil_jax.afd.checks import REWARDS, check_adversarial, check_compatible
from dil_jax.data import pipeline
from dil_jax.errors import ConfigError, DataError
from dil_jax.models import build_model

# 'f_<name>': the f-GAN reward of divergence <name> (dil_jax/afd/f_divergence.py).
RESUMABLE_FIELDS = ("steps", "max_abs_logit", "log_every", "checkpoint_every", "keep", "async_save")


class AdversarialDivergence(FloatingPointError):
    """The adversarial loop diverged (NaN, or discriminator logits beyond the bound)."""


def default_config() -> ml_collections.ConfigDict:
    """The ``config.afd.adversarial`` section."""
    c = ml_collections.ConfigDict()
    c.steps = 200  # alternating iterations (one discriminator and one policy update each)
    c.prompts_per_step = 32  # B demonstration prompts per iteration
    c.samples_per_prompt = 4  # k >= 2 policy samples per prompt (RLOO needs a baseline)
    # 'logit' (reverse KL / AIRL), 'gail' (−log(1−D)), 'log_d' (log D), or an f-divergence
    # 'f_kl' | 'f_reverse_kl' | 'f_js' | 'f_chi2' | 'f_hellinger' | 'f_tv' (f_divergence.py)
    c.reward = "logit"
    c.beta = 0.0  # weight of the KL(π || π_ref) penalty folded into the reward
    c.learning_rate = 1e-4  # policy AdamW (warmup + cosine over `steps`)
    c.warmup_ratio = 0.05
    c.grad_clip = 1.0
    c.max_abs_logit = 50.0  # divergence guard on |f| of the discriminator
    # Cut demonstrations to the sampler's budget (afd.sampling.max_new_tokens) so that length
    # alone cannot separate them from policy samples.
    c.match_lengths = True
    c.checkpoint_every = 50
    c.keep = 2  # checkpoints kept (orbax keep-N)
    c.async_save = True
    c.log_every = 10
    c.seed = 0
    c.disc = reward_model.default_config()  # the discriminator (loss must be 'bce')
    c.disc.learning_rate = 3e-4
    c.disc.init = "policy"  # backbone starts from the initial policy's weights
    return c


def rl_reward(logits: jax.Array, kind: str) -> jax.Array:
    """The policy's reward from discriminator logits ``f`` (see module doc), float32."""
    f = jnp.asarray(logits, jnp.float32)
    if kind == "logit":
        return f
    if kind == "gail":
        return jax.nn.softplus(f)  # −log(1 − σ(f))
    if kind == "log_d":
        return -jax.nn.softplus(-f)  # log σ(f)
    if kind.startswith("f_") and kind[2:] in f_divergence.DIVERGENCES:
        return f_divergence.reward(f, kind[2:])
    raise ValueError(f"adversarial.reward={kind!r}: expected one of {REWARDS}")


def rloo_advantages(rewards: jax.Array) -> jax.Array:
    """Leave-one-out advantages over the last axis: ``r_i − mean_{j≠i} r_j``.

    Args:
      rewards: [B, k] float, k >= 2.
    Returns:
      [B, k] float32; each row sums to zero.
    """
    r = jnp.asarray(rewards, jnp.float32)
    k = r.shape[-1]
    if k < 2:
        raise ValueError(f"RLOO needs k >= 2 samples per prompt, got {k}")
    baseline = (jnp.sum(r, axis=-1, keepdims=True) - r) / (k - 1)
    return r - baseline


def reinforce_loss(logps: jax.Array, advantages: jax.Array) -> jax.Array:
    """``−mean(A · log π)``: its gradient is the REINFORCE estimate of ``−∇ E_π[r]``."""
    return -jnp.mean(jax.lax.stop_gradient(advantages) * logps)


def check_unfiltered_sampling(sampling_cfg, field: str = "afd.sampling") -> None:
    """REINFORCE needs samples from π_θ itself: refuse temperature ≠ 1, top-p < 1 or top-k > 0.

    The policy gradient uses ``∇ log π_θ(y|x)`` and the KL uses ``log π_θ``; under a filtered
    sampler the samples follow another distribution and both are biased.

    Raises:
      ConfigError naming ``<field>.temperature``, ``<field>.top_p`` or ``<field>.top_k``.
    """
    bad = []
    if float(sampling_cfg.temperature) != 1.0:
        bad.append(f"{field}.temperature={sampling_cfg.temperature} (need 1.0)")
    if float(sampling_cfg.top_p) < 1.0:
        bad.append(f"{field}.top_p={sampling_cfg.top_p} (need 1.0)")
    if int(sampling_cfg.top_k) > 0:
        bad.append(f"{field}.top_k={sampling_cfg.top_k} (need 0)")
    if bad:
        raise ConfigError(
            f"{'; '.join(bad)}: adversarial imitation's policy gradient and KL use log π_θ, so its "
            "samples must come from π_θ itself, not a filtered sampler; set these fields for the "
            "adversarial run (Best-of-N may keep its own filtered sampling)"
        )


# The runtime's state: params and opt_state are {'policy': ..., 'disc': ...}.
AdversarialState = loop.TrainState


def adversarial_step(
    state: AdversarialState,
    demo,
    samples,
    ref_params,
    *,
    policy_model,
    policy_family,
    disc_model,
    policy_tx,
    disc_tx,
    cfg,
    chunks,
) -> tuple[AdversarialState, dict[str, jax.Array]]:
    """One discriminator update, then one RLOO policy update (pure; see module doc).

    Args:
      demo: ``input_ids``, ``attention_mask``, ``loss_mask`` ``[B, 1, T]`` demonstrations.
      samples: the same keys ``[B, k, T]``: policy samples for the same prompts.
      ref_params: frozen reference policy (the KL penalty when ``cfg['beta'] > 0``; the ``kl``
        metric always).
      cfg: hashable dict items: reward, beta, level.
    """
    cfg = dict(cfg)
    keys = ("input_ids", "attention_mask", "loss_mask")
    b, k, _ = samples["input_ids"].shape
    disc_batch = {key: jnp.concatenate([demo[key], samples[key]], axis=1) for key in keys}
    disc_batch["labels"] = jnp.broadcast_to(
        (jnp.arange(k + 1) == 0).astype(jnp.float32), (b, k + 1)
    )
    params, opt = state.params, state.opt_state

    # 1. discriminator: class-balanced BCE, demonstrations 1, samples 0.
    def disc_loss(p):
        return reward_model.rm_loss_and_metrics(
            disc_model, p, disc_batch, level=cfg["level"], loss="bce"
        )

    (_, dmetrics), dgrads = jax.value_and_grad(disc_loss, has_aux=True)(params["disc"])
    dupdates, disc_opt = disc_tx.update(dgrads, opt["disc"], params["disc"])
    disc_params = optax.apply_updates(params["disc"], dupdates)

    # 2. rewards of the samples under the updated discriminator (no gradient).
    f = reward_model.reward_scores(
        disc_model, jax.lax.stop_gradient(disc_params), samples, level=cfg["level"]
    ).logits  # [B, k]
    reward = rl_reward(f, cfg["reward"])  # [B, k]

    # 3. policy: RLOO on log π of whole responses, KL penalty folded into the reward. The
    # reference runs whatever β, so that the `kl` metric is always the policy's drift.
    ref_logp = logprobs.sequence_logps(
        policy_model, policy_family, jax.lax.stop_gradient(ref_params), samples, **chunks
    ).sum_logps  # [B, k]

    def policy_loss(p):
        logp = logprobs.sequence_logps(
            policy_model, policy_family, p, samples, **chunks
        ).sum_logps  # [B, k]
        kl = jax.lax.stop_gradient(logp) - ref_logp  # [B, k] Monte-Carlo KL(π || π_ref)
        shaped = reward - cfg["beta"] * kl if cfg["beta"] > 0 else reward
        adv = rloo_advantages(shaped)
        return reinforce_loss(logp, adv), (logp, kl, adv)

    (ploss, (logp, kl, adv)), pgrads = jax.value_and_grad(policy_loss, has_aux=True)(
        params["policy"]
    )
    pupdates, policy_opt = policy_tx.update(pgrads, opt["policy"], params["policy"])
    policy_params = optax.apply_updates(params["policy"], pupdates)

    new_params = jax.tree.map(
        lambda new, old: new.astype(old.dtype),
        {"policy": policy_params, "disc": disc_params},
        params,
    )
    n_tok = jnp.maximum(jnp.sum(samples["loss_mask"] != 0, axis=-1), 1)  # [B, k]
    metrics = {f"disc/{name}": v for name, v in dmetrics.items()}
    metrics.update(
        {
            "disc/grad_norm": optax.tree.norm(dgrads),
            "policy/loss": ploss,
            "policy/grad_norm": optax.tree.norm(pgrads),
            "reward/mean": jnp.mean(reward),
            "reward/std": jnp.std(reward),
            "reward/logit_mean": jnp.mean(f),
            "advantage/abs_mean": jnp.mean(jnp.abs(adv)),
            "kl": jnp.mean(kl),
            "entropy": -jnp.mean(logp),  # per response, Monte-Carlo
            "response_tokens": jnp.mean(n_tok.astype(jnp.float32)),
        }
    )
    return AdversarialState(
        step=state.step + 1, params=new_params, opt_state={"policy": policy_opt, "disc": disc_opt}
    ), metrics


class AdversarialImitation:
    """The adversarial run: policy and discriminator, mesh, optimisers, the jitted update.

    Args:
      config: a run config (configs/base.py derived) with ``afd.adversarial`` and
        ``afd.sampling`` sections; the policy is ``config.model``, the discriminator's backbone
        ``afd.adversarial.disc_model`` when present, else the same architecture.
      mesh: defaults to ``sharding.make_mesh(config.mesh.shape)``.
    """

    def __init__(self, config, *, mesh=None):
        config = spec.as_spec(config)
        adv = config.afd.adversarial
        check_adversarial(adv)
        check_unfiltered_sampling(config.afd.sampling)
        self.config, self.cfg = config, adv
        self.mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh.shape)
        dp = sharding.data_parallel_size(self.mesh)
        if adv.prompts_per_step % dp:
            raise ConfigError(
                f"afd.adversarial.prompts_per_step={adv.prompts_per_step} must be a "
                f"multiple of the data-parallel size {dp}"
            )
        self.policy_model, self.family = build_model(config.model)
        disc_model_cfg = adv.disc_model or config.model
        check_compatible(config.model, disc_model_cfg, field="afd.adversarial.disc_model")
        self.disc_model_cfg = disc_model_cfg
        disc_cfg = dataclasses.replace(
            adv.disc, global_batch_size=adv.prompts_per_step, steps=adv.steps
        )
        self.disc = reward_model.RewardModel(
            disc_model_cfg, disc_cfg, mesh=self.mesh, seed=adv.seed, field="afd.adversarial.disc"
        )
        self.policy_tx, _ = loop.make_optimizer(
            learning_rate=adv.learning_rate,
            total_steps=adv.steps,
            warmup_ratio=adv.warmup_ratio,
            grad_clip=adv.grad_clip,
        )
        self.chunks = logprobs.chunk_settings(config.logprobs)
        self.abstract_state = jax.eval_shape(self._init_state, jax.random.key(0))
        rules = tuple(self.family.partition_rules()) + reward_model.partition_rules(
            self.disc.family
        )
        specs = sharding.match_partition_rules(rules, self.abstract_state, self.mesh)
        self.state_sharding = sharding.shardings_from_specs(self.mesh, specs)
        self.policy_sharding = self.state_sharding.params["policy"]
        self.replicated = NamedSharding(self.mesh, P())
        self.trace_count = 0
        self._step = None

    def _init_state(self, rng, policy=None, disc_backbone=None) -> AdversarialState:
        k_policy, k_disc = jax.random.split(rng)
        if policy is None:
            policy = self.policy_model.init(k_policy, jnp.zeros((1, 8), jnp.int32))["params"]
        disc = self.disc._init_params(k_disc, disc_backbone)
        params = {"policy": policy, "disc": disc}
        opt = {"policy": self.policy_tx.init(policy), "disc": self.disc.tx.init(disc)}
        return AdversarialState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt)

    def init_state(self, policy_params) -> AdversarialState:
        """Policy copied from ``policy_params``; discriminator backbone too (disc.init='policy')."""
        reward_model.check_tree_matches(
            policy_params, self.abstract_state.params["policy"], where="initial policy"
        )
        backbone = policy_params if self.cfg.disc.init == "policy" else None
        if backbone is not None:
            reward_model.check_tree_matches(
                backbone,
                self.abstract_state.params["disc"]["backbone"],
                where="afd.adversarial.disc_model backbone",
            )
        fn = jax.jit(self._init_state, out_shardings=self.state_sharding)
        return fn(jax.random.key(self.cfg.seed), policy_params, backbone)

    @property
    def step_fn(self):
        if self._step is None:
            cfg = (
                ("beta", float(self.cfg.beta)),
                ("level", self.cfg.disc.level),
                ("reward", self.cfg.reward),
            )
            step = functools.partial(
                adversarial_step,
                policy_model=self.policy_model,
                policy_family=self.family,
                disc_model=self.disc.model,
                policy_tx=self.policy_tx,
                disc_tx=self.disc.tx,
                cfg=cfg,
                chunks=self.chunks,
            )

            self._step = loop.counted_jit(
                self,
                loop.guard_finite(step, "halt"),
                in_shardings=(self.state_sharding, None, None, self.policy_sharding),
                out_shardings=(self.state_sharding, self.replicated),
                donate_argnums=(0,),
            )
        return self._step

    def sample(self, state, demo_batch: Mapping[str, np.ndarray], step: int):
        """k policy samples for the prompts of a demonstration batch, as ``[B, k, T]`` arrays."""
        prompt_ids, prompt_mask = rollouts.prompts_from_arrays(demo_batch)
        rng = jax.random.fold_in(jax.random.key(self.cfg.seed + 1), step)
        return rollouts.sample(
            self.policy_model,
            state.params["policy"],
            prompt_ids,
            prompt_mask,
            self.cfg.samples_per_prompt,
            rng,
            self.config.afd.sampling,
            mesh=self.mesh,
            field="afd.adversarial.samples_per_prompt",
        )

    def run_step(self, state, demo_batch, ref_params, step: int):
        samples = self.sample(state, demo_batch, step)
        budget = int(self.config.afd.sampling.max_new_tokens)
        lengths = rollouts.length_stats(demo_batch, samples, budget)
        if self.cfg.match_lengths:
            demo_batch = rollouts.truncate_responses(demo_batch, budget)
        keys = ("input_ids", "attention_mask", "loss_mask")
        t = max(demo_batch["input_ids"].shape[-1], samples["input_ids"].shape[-1])
        demo = {k: reward_model.pad_to(demo_batch[k], t) for k in keys}
        smp = {k: reward_model.pad_to(samples[k], t) for k in keys}
        with jax.set_mesh(self.mesh):
            demo = sharding.host_local_to_global(demo, self.mesh)
            smp = sharding.host_local_to_global(smp, self.mesh)
            state, metrics = self.step_fn(state, demo, smp, ref_params)
        return state, dict(metrics, **lengths), samples

    def checkpoint_config(self) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.model = ml_collections.ConfigDict(self.config.model.to_dict())
        c.data = ml_collections.ConfigDict(self.config.data.to_dict())
        # Fields that may change on resume (length, logging, the guard) are left out.
        fixed = {
            k: v
            for k, v in self.cfg.to_dict().items()
            if k not in RESUMABLE_FIELDS and not (k == "disc_model" and v is None)
        }
        c.loss = ml_collections.ConfigDict({"name": "adversarial_imitation", **fixed})
        c.seed = self.cfg.seed
        c.train = ml_collections.ConfigDict({"global_batch_size": self.cfg.prompts_per_step})
        return c


def check_demonstrations(demos: Mapping[str, np.ndarray], name: str = "demonstrations") -> None:
    """Clear errors for an empty set or prompts without a demonstration."""
    if "input_ids" not in demos or len(demos["input_ids"]) == 0:
        raise DataError(f"{name}: the demonstration set is empty")
    resp = np.asarray(demos["loss_mask"]).reshape(len(demos["loss_mask"]), -1).sum(-1)
    if (resp == 0).any():
        raise DataError(
            f"{name}: example {int(np.argmin(resp))} has no response tokens "
            "(loss_mask all zero): a prompt without a demonstration"
        )


def train_adversarial(
    config,
    workdir: str,
    *,
    init_params,
    demos: Mapping[str, np.ndarray],
    mesh=None,
    max_steps: int | None = None,
) -> dict:
    """Adversarial imitation of ``demos`` from ``init_params``, checkpointed and resumable.

    Args:
      config: run config with ``afd.adversarial`` and ``afd.sampling`` (see default_config).
      init_params: the initial policy (also the frozen reference of the KL penalty).
      demos: demonstration arrays ``input_ids``, ``attention_mask``, ``loss_mask`` ``[n, 1, T]``.
      max_steps: stop after this many iterations in this call.
    Returns:
      ``{'step', 'policy_params', 'disc_params', 'train': last logged metrics}``.
    Raises:
      AdversarialDivergence when a step yields non-finite metrics or discriminator logits
      beyond ``afd.adversarial.max_abs_logit``; that state is not saved.
    """
    check_demonstrations(demos)
    adv_run = AdversarialImitation(config, mesh=mesh)
    cfg = adv_run.cfg
    if len(demos["input_ids"]) < cfg.prompts_per_step:
        raise ConfigError(
            f"demonstrations: {len(demos['input_ids'])} examples is fewer than "
            f"afd.adversarial.prompts_per_step={cfg.prompts_per_step}"
        )
    keys = ("input_ids", "attention_mask", "loss_mask", "example_id")
    demo_arrays = {k: np.asarray(demos[k]) for k in keys if k in demos}
    it = pipeline.make_iterator(demo_arrays, cfg.prompts_per_step, seed=cfg.seed)
    ref_params = jax.device_put(init_params, adv_run.policy_sharding)
    settings = loop.LoopSettings.from_stage(cfg, desc="adversarial")

    def step_fn(state, batch, step):
        state, metrics, _ = adv_run.run_step(state, batch, ref_params, step)
        return state, metrics

    result = loop.run(
        adv_run,
        workdir,
        step_fn=step_fn,
        settings=settings,
        data=it,
        init_state=lambda: adv_run.init_state(init_params),
        resume_config=adv_run.checkpoint_config(),
        max_steps=max_steps,
        check=functools.partial(_check_divergence, bound=cfg.max_abs_logit),
        label="adversarial imitation",
    )
    state, last = result.state, result.train
    return {
        "step": int(state.step),
        "policy_params": state.params["policy"],
        "disc_params": state.params["disc"],
        "train": last,
        "runner": adv_run,
    }


def load_last_good(config, workdir: str, *, mesh=None) -> tuple[int, dict]:
    """``(step, {'policy', 'disc'} params)`` of the latest checkpoint, e.g. after a divergence."""
    run = AdversarialImitation(config, mesh=mesh)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        run.abstract_state.params,
        run.state_sharding.params,
    )
    step = checkpointing.read_meta(workdir)["step"]  # the newest whole step (damage skipped)
    return step, checkpointing.load_params(workdir, abstract, step)


def _check_divergence(metrics: Mapping[str, float], step: int, manager, *, bound: float) -> None:
    bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
    big = metrics.get("disc/max_abs_logit", 0.0)
    if bad or big > bound:
        last_good = manager.latest_step()
        where = (
            f"the last good checkpoint is step {last_good} in {manager.directory}"
            if last_good is not None
            else "no checkpoint was written yet"
        )
        reason = (
            f"non-finite metrics {bad}"
            if bad
            else f"discriminator logits reached |f| = {big:.3g} > afd.adversarial.max_abs_logit"
            f" = {bound:g} (the discriminator separates demonstrations from samples "
            "perfectly: lower its learning rate, raise beta, or stop earlier)"
        )
        raise AdversarialDivergence(
            f"adversarial imitation diverged at step {step}: {reason}; "
            f"{where}; that state was not saved"
        )
