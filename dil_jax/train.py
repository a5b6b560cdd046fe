"""Train state, the sharded train/eval steps, and the checkpointed training loop.

The step is a pure ``(state, batch, ref_params) -> (state, metrics)`` function (big_vision's
``update_fn``): model, optimiser and loss terms are bound with ``functools.partial``, and it is
jitted once with explicit in/out shardings and a donated state. Chosen and rejected responses
travel on an explicit pair axis ``[B, N, T]`` and go through the model in one forward pass.

Loss scaling under gradient accumulation: every micro-batch loss is a *sum* of per-example
losses divided by the number of examples in the whole global batch, so accumulating gradients
over micro-batches gives exactly the gradient of the global-batch mean (no 1/A fudge factors).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dil_jax import (
    checkpointing,
    evaluate,
    flops,
    logprobs,
    loop,
    lora,
    objectives,
    paths,
    progress,
    reference,
    sharding,
    spec,
    stages,
    validation,
)
from dil_jax.data import pipeline
from dil_jax.diagnostics import density_ratio_diagnostics, likelihood_collapse_alarm
from dil_jax.errors import ConfigError
from dil_jax.loop import TrainState
from dil_jax.metrics import WandbSettings
from dil_jax.models import build_model, hf, max_positions

# Batch keys the step reads; segment_ids/positions/pair_index [B, R, T] and slot_mask [B, S, N]
# come with packed and prefix-shared data (branch_ids [B, 1, T] with the latter), labels [B]
# with KTO's unpaired data (1 desirable, 0 undesirable).
STEP_KEYS = (
    "input_ids",
    "attention_mask",
    "loss_mask",
    "ref_logps",
    "segment_ids",
    "positions",
    "pair_index",
    "slot_mask",
    "branch_ids",
    "labels",
)


def num_examples(batch) -> jax.Array | int:
    """Examples in a batch: its rows, or the real slots of a packed / prefix-shared batch."""
    if "slot_mask" in batch:
        return jnp.sum(batch["slot_mask"][..., 0], dtype=jnp.float32)
    return batch["input_ids"].shape[0]


def make_optimizer(optim_cfg, total_steps: int):
    """``config.optim`` -> ``loop.make_optimizer`` (the one optimiser factory)."""
    o = optim_cfg
    return loop.make_optimizer(
        learning_rate=o.learning_rate,
        total_steps=total_steps,
        warmup_ratio=o.warmup_ratio,
        schedule=o.schedule,
        end_lr_factor=o.end_lr_factor,
        weight_decay=o.weight_decay,
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        grad_clip=o.grad_clip,
    )


# ----------------------------------------------------------------------------- the step


def _pair_stats(
    model,
    family,
    params,
    batch,
    ref_params,
    *,
    terms,
    chunks,
    diagnostics: bool = False,
    adapters: bool = False,
    dropout_rng=None,
):
    """Policy (and reference) statistics of a batch -> per-example losses [B] and metrics.

    With ``adapters`` (LoRA, ``dil_jax.lora``), ``params`` are the adapters and ``ref_params``
    the frozen base: the policy is their combination, the reference the base alone (the adapter
    path off), and ``dropout_rng`` (when given) drives the adapters' dropout.

    With ``diagnostics`` (``config.train.diagnostics``), a reference and N >= 2 responses, the
    density-ratio diagnostics of the batch (``dil_jax.diagnostics``) join the metrics: their
    ``[B]`` arrays as they are, their batch scalars broadcast to ``[B]`` so that the step's
    average over rows returns them (under accumulation: their mean over micro-batches).
    """
    policy_model = model if dropout_rng is None else model.with_dropout_rng(dropout_rng)
    if adapters:
        params = lora.combine(ref_params, params)
    pol = logprobs.sequence_logps(policy_model, family, params, batch, **chunks)  # [B(·S), N]
    reference = None
    if objectives.needs_reference(terms):
        if "ref_logps" in batch:  # precomputed once, cached on disk
            reference = batch["ref_logps"].astype(jnp.float32).reshape(pol.sum_logps.shape)
        else:  # frozen reference evaluated in the step; never differentiated
            ref = logprobs.sequence_logps(
                model, family, jax.lax.stop_gradient(ref_params), batch, **chunks
            )
            reference = ref.sum_logps
    n_tokens = jnp.maximum(pol.n_tokens, 1.0)
    seqs = objectives.SequenceLogps(
        policy=pol.sum_logps,
        n_tokens=pol.n_tokens,
        reference=reference,
        mean_logits=pol.sum_mean_logits / n_tokens,
        labels=batch.get("labels"),
    )
    losses, metrics = objectives.compute_loss(terms, seqs)
    # Both reductions of the response log-likelihood, whatever the loss's own (`logps/*`):
    # Figure 2 compares DIL (per-token means) and DPO (per-sequence sums) on one axis.
    for j, name in enumerate(("chosen", "rejected")[: pol.sum_logps.shape[1]]):
        metrics[f"logps_sum/{name}"] = pol.sum_logps[:, j]
        metrics[f"logps_mean/{name}"] = pol.sum_logps[:, j] / n_tokens[:, j]
    if diagnostics and reference is not None and seqs.policy.shape[1] >= 2:
        rows = losses.shape[0]
        diag = density_ratio_diagnostics(terms, seqs)  # scalars and [B] arrays
        metrics.update({k: jnp.broadcast_to(v, (rows,)) for k, v in diag.items()})
    if "slot_mask" in batch:  # packed / prefix-shared: empty slots count for nothing
        real = batch["slot_mask"][..., 0].reshape(-1).astype(jnp.float32)  # [B·S]
        losses = losses * real
        metrics = {k: v * real for k, v in metrics.items()}
    return losses, metrics, jnp.sum(pol.n_tokens)


def _microbatches(batch: Mapping[str, jax.Array], accum: int):
    """[B, ...] -> [A, B/A, ...], interleaved so every device holds rows of every micro-batch."""

    def split(x):
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        return sharding.constrain(x, P(None, sharding.BATCH_AXES))

    return {k: split(v) for k, v in batch.items()}


def train_step(
    state: TrainState,
    batch,
    ref_params,
    *,
    model,
    family,
    tx,
    terms,
    accum_steps,
    chunks,
    diagnostics: bool = False,
    adapters: bool = False,
    dropout_seed: int | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser update on a global batch, accumulating gradients over micro-batches.

    Args:
      state: params and optimiser state (donated by the jitted wrapper).
      batch: ``input_ids``, ``attention_mask``, ``loss_mask`` ``[B, N, T]``; optionally
        ``ref_logps [B, N]`` (precomputed reference, summed over response tokens).
      ref_params: frozen reference parameters (ignored when ``ref_logps`` is given or no loss
        term needs a reference).
      diagnostics: add the density-ratio diagnostics to the metrics (see ``_pair_stats``).
      adapters: ``state.params`` are LoRA adapters on the base ``ref_params`` (``_pair_stats``);
      dropout_seed: with adapters, adapter dropout keyed by (seed, step, micro-batch).
    Returns:
      The updated state and scalar float32 metrics (docs/objectives.md §5 names).
    """
    global_batch = num_examples(batch)  # rows, or real examples of packed rows

    def micro_loss(params, micro, index=0):
        rng = None
        if dropout_seed is not None:
            rng = jax.random.fold_in(jax.random.key(dropout_seed), state.step)
            rng = jax.random.fold_in(rng, index)
        losses, metrics, n_tok = _pair_stats(
            model,
            family,
            params,
            micro,
            ref_params,
            terms=terms,
            chunks=chunks,
            diagnostics=diagnostics,
            adapters=adapters,
            dropout_rng=rng,
        )
        # Sum over this micro-batch, normalised by the global batch: exact under accumulation.
        loss = jnp.sum(losses) / global_batch
        sums = {k: jnp.sum(v) / global_batch for k, v in metrics.items()}
        return loss, (sums, n_tok)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def accumulate(carry, xs):
        micro, index = xs
        grads, loss, sums, n_tok = carry
        (l, (s, n)), g = grad_fn(state.params, micro, index)
        grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
        sums = jax.tree.map(jnp.add, sums, s)
        return (grads, loss + l, sums, n_tok + n), None

    micro = _microbatches(batch, accum_steps)
    first = jax.tree.map(lambda x: x[0], micro)
    zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    metric_shapes = jax.eval_shape(micro_loss, state.params, first)[1][0]
    zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), metric_shapes)
    init = (zero_grads, jnp.float32(0), zero_sums, jnp.float32(0))
    xs = (micro, jnp.arange(accum_steps))
    (grads, loss, sums, n_tok), _ = jax.lax.scan(accumulate, init, xs)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = loop.cast_like(optax.apply_updates(state.params, updates), state.params)
    opt_state = loop.cast_like(opt_state, state.opt_state)
    metrics = dict(
        sums,
        loss=loss,
        grad_norm=optax.tree.norm(grads),
        param_norm=optax.tree.norm(params),
        response_tokens=n_tok,
    )
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(
    params, batch, ref_params, *, model, family, terms, chunks, adapters: bool = False
) -> dict[str, jax.Array]:
    """Loss and reward metrics on a held-out batch, means over its examples."""
    losses, metrics, _ = _pair_stats(
        model, family, params, batch, ref_params, terms=terms, chunks=chunks, adapters=adapters
    )
    count = num_examples(batch)
    return dict({k: jnp.sum(v) / count for k, v in metrics.items()}, loss=jnp.sum(losses) / count)


# ----------------------------------------------------------------------------- setup


class Trainer:
    """Everything a run needs, built from a config: model, mesh, optimiser, shardings, steps.

    Construction validates the config and compiles nothing; ``abstract_state`` is a
    ``jax.eval_shape`` tree, so building a Trainer for a 70B config costs no memory.
    """

    def __init__(self, config, *, mesh=None, total_steps: int | None = None):
        # The resolved, validated spec (a ConfigDict is built into one here).
        config = spec.build(config, num_devices=len(jax.devices()) if mesh is None else mesh.size)
        self.config = config
        self.mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh.shape)
        self.model, self.family = build_model(config.model)
        # LoRA: the state holds the adapters; the frozen (maybe quantised) base is the step's
        # ref_params in every reference mode (dil_jax/lora.py).
        self.adapted = None
        lora_settings = lora.settings_from_config(config.lora)
        if lora_settings is not None:
            self.adapted = lora.setup(lora_settings, self.model, self.family, self.mesh)
            self.model = self.adapted.model
        self.terms = config.terms
        self.needs_reference = objectives.needs_reference(self.terms)
        self.layout = objectives.data_layout(self.terms)  # 'single' | 'pair' | 'list' | 'unpaired'
        # Density-ratio diagnostics: KTO's index 1 is a mismatched completion, no sample of
        # π_ref, so they are computed for pair and list layouts only.
        self.diagnostics = bool(
            config.train.diagnostics and self.needs_reference and self.layout in ("pair", "list")
        )
        # Frozen reference params enter the step only in 'inline' mode; otherwise the argument
        # is None and no second model is held on the devices.
        self.reference_inline = self.needs_reference and config.reference.mode == "inline"
        self.tx, self.schedule = make_optimizer(config.optim, total_steps or config.train.steps)
        self.max_positions = max_positions(self.model.config)
        self.chunks = logprobs.chunk_settings(config.logprobs)
        self.abstract_state = jax.eval_shape(self._init_state, jax.random.key(0))
        rules = (
            self.family.partition_rules() if self.adapted is None else self.adapted.adapter_rules
        )
        specs = sharding.match_partition_rules(rules, self.abstract_state, self.mesh)
        self.state_sharding = sharding.shardings_from_specs(self.mesh, specs)
        self.params_sharding = self.state_sharding.params
        # The full-precision model's params (checkpoint and HF restore target) and, with
        # adapters, the base as the step holds it (quantised under QLoRA).
        self._full_abstract, self.full_params_sharding = (
            self.abstract_state.params,
            self.params_sharding,
        )
        self.base_sharding = None
        if self.adapted is not None:
            self._full_abstract = jax.eval_shape(self.init_params, jax.random.key(0))
            full_specs = sharding.match_partition_rules(
                self.family.partition_rules(), self._full_abstract, self.mesh
            )
            self.full_params_sharding = sharding.shardings_from_specs(self.mesh, full_specs)
            self.base_sharding = sharding.shardings_from_specs(self.mesh, self.adapted.base_specs)
        self.replicated = NamedSharding(self.mesh, P())
        self.trace_count = 0  # recompile guard: incremented each time the step is traced
        self._n_matmul = None  # matmul parameters, for step_flops
        self._train_step = None
        self._eval_step = None

    def _init_state(self, rng) -> TrainState:
        if self.adapted is None:
            params = self.init_params(rng)
        else:  # fresh adapters (B = 0: the policy starts as the base)
            params = lora.init_adapters(self.adapted.plan, rng)
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params)
        )

    def init_params(self, rng):
        ids = jnp.zeros((1, min(self.max_positions, 8)), jnp.int32)
        return self.model.init(rng, ids)["params"]

    def abstract_params(self):
        """ShapeDtypeStructs with shardings: the restore target for checkpoints and HF weights."""
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self._full_abstract,
            self.full_params_sharding,
        )

    def base_params(self, params):
        """The step's frozen base from full params: quantised per ``config.lora`` (sharded);
        params already quantised (loaded with ``lora.quantizer``) are returned as they are."""
        plan = self.adapted.plan
        if not plan.quantized or plan.quantized[0] not in lora.flat(params):
            return params
        fn = jax.jit(lambda p: lora.quantize_base(plan, p), out_shardings=self.base_sharding)
        return fn(params)

    def init_state(self, seed: int, params=None) -> TrainState:
        """Sharded initial state, never materialised on one device (jit with out_shardings)."""
        if params is None:
            init = jax.jit(self._init_state, out_shardings=self.state_sharding)
            return init(jax.random.key(seed))
        # A fresh copy: the state is donated to the step, while `params` may live on as the
        # frozen reference.
        params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=self.params_sharding)(
            params
        )
        opt_init = jax.jit(self.tx.init, out_shardings=self.state_sharding.opt_state)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.replicated)
        return TrainState(step=step, params=params, opt_state=opt_init(params))

    def step_flops(self, batch) -> float:
        """Model FLOPs of a train step on host ``batch`` (``dil_jax.flops``: real tokens,
        attention at the layout's mask density; policy forward + backward, and the inline
        reference's forward)."""
        if self._n_matmul is None:
            m = self.model.config
            self._n_matmul = flops.matmul_params(
                self.abstract_state.params,
                tied_embeddings=bool(m.tie_word_embeddings),
                vocab_size=m.vocab_size,
                hidden_size=m.hidden_size,
            )
        m = self.model.config
        return flops.batch_flops(
            batch,
            n_matmul=self._n_matmul,
            head_params=m.vocab_size * m.hidden_size,
            layers=m.num_hidden_layers,
            heads=m.num_attention_heads,
            head_dim=m.head_dim,
            passes=3 + int(self.reference_inline),
        )

    def peak_flops(self) -> float:
        """Peak FLOP/s of this run's devices in its compute dtype (measured once on CPU)."""
        return flops.device_peak(str(self.config.model.dtype))[0]

    def batch_sharding(self, batch):
        return {
            k: NamedSharding(self.mesh, sharding.batch_spec(np.ndim(v))) for k, v in batch.items()
        }

    def put_batch(self, batch: Mapping[str, np.ndarray]):
        batch = {k: v for k, v in batch.items() if k in STEP_KEYS}
        return sharding.host_local_to_global(batch, self.mesh)

    @property
    def train_step(self) -> Callable:
        """The jitted step: compiled once per batch shape, state donated, reference not."""
        if self._train_step is None:
            step = functools.partial(
                train_step,
                model=self.model,
                family=self.family,
                tx=self.tx,
                terms=self.terms,
                accum_steps=self.config.optim.grad_accum_steps,
                chunks=self.chunks,
                diagnostics=self.diagnostics,
                adapters=self.adapted is not None,
                dropout_seed=self._dropout_seed,
            )

            self._train_step = loop.counted_jit(
                self,
                loop.guard_finite(step, self.config.train.on_nonfinite),
                in_shardings=(self.state_sharding, None, self._ref_sharding),
                out_shardings=(self.state_sharding, self.replicated),
                donate_argnums=(0,),
            )
        return self._train_step

    @property
    def eval_step(self) -> Callable:
        if self._eval_step is None:
            step = functools.partial(
                eval_step,
                model=self.model,
                family=self.family,
                terms=self.terms,
                chunks=self.chunks,
                adapters=self.adapted is not None,
            )
            self._eval_step = jax.jit(
                step,
                in_shardings=(self.params_sharding, None, self._ref_sharding),
                out_shardings=self.replicated,
            )
        return self._eval_step

    @property
    def _ref_sharding(self):
        if self.adapted is not None:  # the base enters every step
            return self.base_sharding
        return self.params_sharding if self.reference_inline else None

    @property
    def _dropout_seed(self) -> int | None:
        if self.adapted is None or self.adapted.plan.settings.dropout == 0:
            return None
        return int(self.config.seed)

    def policy_params(self, params, base):
        """The policy's full params tree: ``params`` itself, or base and adapters combined."""
        return params if self.adapted is None else lora.combine(base, params)

    def run_step(self, state, batch, ref_params):
        with jax.set_mesh(self.mesh):
            return self.train_step(state, self.put_batch(batch), ref_params)

    def evaluate(self, params, ref_params, batches) -> dict[str, float]:
        totals: dict[str, float] = {}
        count = 0
        with jax.set_mesh(self.mesh):
            for batch in batches:
                m = jax.device_get(self.eval_step(params, self.put_batch(batch), ref_params))
                for k, v in m.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
                count += 1
        return {k: v / max(count, 1) for k, v in totals.items()}


# ----------------------------------------------------------------------------- the run


class CollapseMonitor:
    """``loop.run``'s ``on_log`` hook: smoothed chosen log-likelihood and margin, and the alarm.

    Keeps exponential moving averages (weight ``decay`` on the past) of ``logps/chosen`` and
    ``rewards/margins`` over the logged steps and reports, per logged step, ``ema/logps/chosen``,
    ``ema/rewards/margins`` and ``alarm/likelihood_collapse`` (1.0 when the smoothed chosen
    log-likelihood fell while the smoothed margin rose since the previous logged step:
    ``diagnostics.likelihood_collapse_alarm``, the DPO failure DIL targets, docs/objectives.md
    §4 D1). The averages live on the host and restart with the process (a resumed run's first
    logged step has no previous snapshot and reports 0).
    """

    KEYS = ("logps/chosen", "rewards/margins")

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.ema: dict[str, float] | None = None

    def __call__(self, host: Mapping[str, float], step: int) -> dict[str, float]:
        if not all(k in host for k in self.KEYS):
            return {}
        current = {k: float(host[k]) for k in self.KEYS}
        previous = self.ema
        if previous is None:
            self.ema = current
        else:
            self.ema = {
                k: self.decay * previous[k] + (1 - self.decay) * current[k] for k in self.KEYS
            }
        alarm = previous is not None and likelihood_collapse_alarm(previous, self.ema)
        return {
            **{f"ema/{k}": v for k, v in self.ema.items()},
            "alarm/likelihood_collapse": float(alarm),
        }


def loop_settings(cfg) -> loop.LoopSettings:
    """The core run's ``train``/``checkpoint``/``eval`` sections as loop settings."""
    return loop.LoopSettings(
        steps=cfg.train.steps,
        log_every=cfg.train.log_every,
        checkpoint_every=cfg.checkpoint.every_steps,
        keep=cfg.checkpoint.keep,
        async_save=cfg.checkpoint.async_save,
        tensorboard=cfg.train.tensorboard,
        progress_bar=cfg.train.progress_bar,
        desc="train",
        eval_every=cfg.eval.every_steps,
        on_nonfinite=cfg.train.on_nonfinite,
        max_nonfinite=cfg.train.max_nonfinite,
        wandb=WandbSettings(cfg.train.wandb_project, cfg.train.wandb_entity, cfg.train.wandb_mode),
    )


def train_and_evaluate(config, workdir: str, *, mesh=None, max_steps: int | None = None) -> dict:
    """Trains the policy described by ``config`` in ``workdir``, resuming if possible.

    Multi-stage configs (``init.mode='pretrain'``) run as the explicit stage list of
    ``stages.plan``: the base policy in ``<workdir>/base``, then this run from its checkpoint.
    Resume order of a stage: the latest checkpoint in its workdir; else ``config.init.mode``
    ('checkpoint': params from another workdir, 'hf': Hugging Face weights from
    ``config.model.hf_path``, 'scratch': random init by seed).

    Args:
      max_steps: stop after this many steps of the last stage in this call (tests simulate
        interruption with it); the schedule still spans ``config.train.steps``.
    Returns:
      The last stage's summary: final step, last train metrics, last eval metrics, gold
      evaluation if run.
    Raises:
      loop.Preempted after saving, when SIGTERM arrived; loop.NonFiniteError on a non-finite
      step under ``train.on_nonfinite='halt'``.
    """
    planned = stages.plan(spec.as_spec(config), workdir)
    for stage in planned[:-1]:
        summary = train_stage(stage.config, stage.workdir)
        del summary["state"]
    return train_stage(planned[-1].config, workdir, mesh=mesh, max_steps=max_steps)


def train_stage(config, workdir: str, *, mesh=None, max_steps: int | None = None) -> dict:
    """One stage of :func:`train_and_evaluate` (its ``init.mode`` is not 'pretrain')."""
    config = spec.as_spec(config)
    sharding.maybe_initialize_distributed(
        config.mesh.coordinator_address, config.mesh.num_processes, config.mesh.process_id
    )
    paths.makedirs(workdir)
    trainer = Trainer(config, mesh=mesh)
    config = trainer.config  # validated for the mesh
    cfg = config
    train_data, eval_data, task = pipeline.build_datasets(cfg, workdir=workdir)
    loop.check_stop(workdir, "loading the initial policy")

    init_params = _initial_params(trainer, workdir)  # the reference, and the policy's start
    ref_params = init_params if trainer.reference_inline else None
    resume_config = cfg
    if trainer.adapted is not None:  # the frozen base: the step's ref_params in every mode
        init_params = trainer.base_params(init_params)
        ref_params = init_params
        resume_config = lora.with_base_fingerprint(cfg, init_params)
    if trainer.needs_reference and not trainer.reference_inline:

        def add_reference(arrays):
            return reference.with_reference_logps(trainer, init_params, arrays, cfg, workdir)

        # Tokenised real data goes through the reference one bucket length at a time.
        train_data = pipeline.with_reference(train_data, add_reference)
        if eval_data is not None:
            eval_data = pipeline.with_reference(eval_data, add_reference)
    loop.check_stop(workdir, "training")
    train_iter = pipeline.make_iterator(
        train_data,
        cfg.train.global_batch_size,
        seed=cfg.data.seed,
        unpaired=trainer.layout == "unpaired",
    )

    # With a precomputed reference (and no gold evaluation) the initial params are needed only
    # to start the policy, which takes its own copy: drop them then, not after the loop (one
    # model's worth of host/device memory, 0.5 GB for a 135M model in float32).
    keep_init = (
        trainer.reference_inline
        or trainer.adapted is not None
        or (task is not None and bool(cfg.eval.gold_prompts))
    )

    def init_state():
        nonlocal init_params
        start = None if trainer.adapted is not None else init_params  # fresh adapters
        state = trainer.init_state(cfg.seed, params=start)
        if not keep_init:
            init_params = None
        return state

    def run_eval(state):
        return _run_eval(trainer, state, ref_params, eval_data, cfg)

    result = loop.run(
        trainer,
        workdir,
        settings=loop_settings(cfg),
        data=train_iter,
        step_fn=_log_memory_once(trainer, ref_params),
        init_state=init_state,
        resume_config=resume_config,
        max_steps=max_steps,
        evaluate=run_eval if eval_data else None,
        schedule=trainer.schedule,
        on_log=CollapseMonitor() if trainer.diagnostics else None,
    )
    state = result.state
    summary = {"step": result.step, "train": result.train, "eval": result.eval, "workdir": workdir}
    if result.step >= cfg.train.steps and task is not None and cfg.eval.gold_prompts:
        policy = trainer.policy_params(state.params, init_params)
        summary["gold"] = evaluate.gold_evaluation(trainer, task, policy, init_params, cfg)
        if jax.process_index() == 0:
            paths.write_atomic(
                paths.join(workdir, "gold_eval.json"), json.dumps(summary["gold"], indent=2)
            )
    summary["state"] = state
    return summary


def _initial_params(trainer: Trainer, workdir: str):
    """The run's starting policy params (also the frozen reference), per ``config.init``."""
    init = trainer.config.init
    if init.mode == "scratch":
        return jax.jit(trainer.init_params, out_shardings=trainer.full_params_sharding)(
            jax.random.key(trainer.config.seed)
        )
    if init.mode == "checkpoint":
        return checkpointing.load_params(init.checkpoint_dir, trainer.abstract_params())
    if init.mode == "hf":  # streamed tensor by tensor into the target shardings
        m = trainer.config.model
        quantize = trainer.adapted is not None and trainer.adapted.plan.quantized
        params = hf.load_params(
            m.hf_path,
            m.family,
            trainer.model.config,
            trainer.abstract_params(),
            scan_layers=m.scan_layers,
            # QLoRA: each kernel quantised as it arrives (never the whole model in bf16/f32)
            on_param=lora.quantizer(trainer.adapted.plan, trainer.base_sharding)
            if quantize
            else None,
        )
        return lora.fold_quantized(params) if quantize else params
    raise ConfigError(f"config.init.mode={init.mode!r}: expected {validation.INIT_MODES}")


def _log_memory_once(trainer: Trainer, ref_params) -> Callable:
    """The loop's step function; before the first step it logs the compiled step's memory.

    ``lower(...).compile()`` on the step's exact arguments is the compilation the first call
    needs anyway: jax caches the trace and the executable, so the call after it neither
    retraces (``trainer.trace_count`` stays 1) nor recompiles.
    """
    logged = []

    def step_fn(state, batch, step):
        if not logged:
            logged.append(step)
            with jax.set_mesh(trainer.mesh):
                compiled = trainer.train_step.lower(
                    state, trainer.put_batch(batch), ref_params
                ).compile()
            mem = compiled.memory_analysis()
            if mem is not None:  # None on backends without the analysis
                gib = 2.0**30
                progress.announce(
                    f"compiled train step, per device ({trainer.mesh.size} devices, mesh "
                    f"{dict(trainer.mesh.shape)}): arguments "
                    f"{mem.argument_size_in_bytes / gib:.2f} GiB, outputs "
                    f"{mem.output_size_in_bytes / gib:.2f} GiB "
                    f"({mem.alias_size_in_bytes / gib:.2f} GiB aliased to arguments), "
                    f"temporaries {mem.temp_size_in_bytes / gib:.2f} GiB"
                )
        return trainer.run_step(state, batch, ref_params)

    return step_fn


def _run_eval(trainer, state, ref_params, eval_data, cfg) -> dict[str, float]:
    it = pipeline.make_iterator(
        eval_data, cfg.eval.batch_size, shuffle=False, unpaired=trainer.layout == "unpaired"
    )
    batches = [next(it) for _ in range(min(cfg.eval.num_batches, it.batches_per_epoch))]
    return trainer.evaluate(state.params, ref_params, batches)
