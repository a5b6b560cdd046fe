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
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dil_jax import checkpointing, logprobs, objectives, sharding, validation
from dil_jax.data import pipeline
from dil_jax.metrics import MetricWriter
from dil_jax.models import build_model, max_positions

# Batch keys the step reads; segment_ids/positions [B, N, T] come with packed data.
STEP_KEYS = ("input_ids", "attention_mask", "loss_mask", "ref_logps", "segment_ids", "positions")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32
    params: Any
    opt_state: Any


# ----------------------------------------------------------------------------- optimiser

def make_optimizer(optim_cfg, total_steps: int):
    """AdamW with linear warmup then cosine/linear/constant decay, and global-norm clipping."""
    peak = optim_cfg.learning_rate
    warmup = int(round(optim_cfg.warmup_ratio * total_steps))
    decay_steps = max(total_steps - warmup, 1)
    end = peak * optim_cfg.end_lr_factor
    if optim_cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim_cfg.end_lr_factor)
    elif optim_cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif optim_cfg.schedule == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"config.optim.schedule={optim_cfg.schedule!r}: expected cosine, linear "
                         "or constant")
    schedule = optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])
    parts = [optax.clip_by_global_norm(optim_cfg.grad_clip)] if optim_cfg.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay))
    return optax.chain(*parts), schedule


# ----------------------------------------------------------------------------- log-probs

def sequence_logps(model, family, params, batch, *, seq_chunk: int = 0,
                   vocab_chunk: int = 0) -> logprobs.ResponseLogprobs:
    """Response log-probs of every sequence of a ``[B, N, T]`` batch in one forward pass."""
    ids = batch["input_ids"]  # [B, N, T]
    b, n, t = ids.shape
    # Packed rows: per-example segments (attention stays inside one) and restarting positions.
    packed = {k: batch[k].reshape(b * n, t) for k in ("segment_ids", "positions") if k in batch}
    hidden, _ = model.apply({"params": params}, ids.reshape(b * n, t),
                            batch["attention_mask"].reshape(b * n, t), output="hidden", **packed)
    hidden = hidden.reshape(b, n, t, -1)  # [B, N, T, D]
    return logprobs.response_logprobs(
        hidden, family.lm_head_kernel(params).astype(hidden.dtype), ids, batch["loss_mask"],
        seq_chunk=seq_chunk or None, vocab_chunk=vocab_chunk or None,
        logit_softcap=getattr(model, "logit_softcap", None))


def _pair_stats(model, family, params, batch, ref_params, *, terms, chunks):
    """Policy (and reference) statistics of a batch -> per-example losses [B] and metrics."""
    pol = sequence_logps(model, family, params, batch, **chunks)
    reference = None
    if objectives.needs_reference(terms):
        if "ref_logps" in batch:  # precomputed once, cached on disk
            reference = batch["ref_logps"].astype(jnp.float32)
        else:  # frozen reference evaluated in the step; never differentiated
            ref = sequence_logps(model, family, jax.lax.stop_gradient(ref_params), batch, **chunks)
            reference = ref.sum_logps
    n_tokens = jnp.maximum(pol.n_tokens, 1.0)
    seqs = objectives.SequenceLogps(policy=pol.sum_logps, n_tokens=pol.n_tokens,
                                    reference=reference, mean_logits=pol.sum_mean_logits / n_tokens)
    losses, metrics = objectives.compute_loss(terms, seqs)
    return losses, metrics, jnp.sum(pol.n_tokens)


def _microbatches(batch: Mapping[str, jax.Array], accum: int):
    """[B, ...] -> [A, B/A, ...], interleaved so every device holds rows of every micro-batch."""

    def split(x):
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        return sharding.constrain(x, P(None, sharding.BATCH_AXES))

    return {k: split(v) for k, v in batch.items()}


def train_step(state: TrainState, batch, ref_params, *, model, family, tx, terms, accum_steps,
               chunks) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser update on a global batch, accumulating gradients over micro-batches.

    Args:
      state: params and optimiser state (donated by the jitted wrapper).
      batch: ``input_ids``, ``attention_mask``, ``loss_mask`` ``[B, N, T]``; optionally
        ``ref_logps [B, N]`` (precomputed reference, summed over response tokens).
      ref_params: frozen reference parameters (ignored when ``ref_logps`` is given or no loss
        term needs a reference).
    Returns:
      The updated state and scalar float32 metrics (objectives.md §5 names).
    """
    global_batch = batch["input_ids"].shape[0]

    def micro_loss(params, micro):
        losses, metrics, n_tok = _pair_stats(model, family, params, micro, ref_params,
                                             terms=terms, chunks=chunks)
        # Sum over this micro-batch, normalised by the global batch: exact under accumulation.
        loss = jnp.sum(losses) / global_batch
        sums = {k: jnp.sum(v) / global_batch for k, v in metrics.items()}
        return loss, (sums, n_tok)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def accumulate(carry, micro):
        grads, loss, sums, n_tok = carry
        (l, (s, n)), g = grad_fn(state.params, micro)
        grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
        sums = jax.tree.map(jnp.add, sums, s)
        return (grads, loss + l, sums, n_tok + n), None

    micro = _microbatches(batch, accum_steps)
    first = jax.tree.map(lambda x: x[0], micro)
    zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    metric_shapes = jax.eval_shape(micro_loss, state.params, first)[1][0]
    zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), metric_shapes)
    init = (zero_grads, jnp.float32(0), zero_sums, jnp.float32(0))
    (grads, loss, sums, n_tok), _ = jax.lax.scan(accumulate, init, micro)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # float32 gradients promote bf16 params and moments: cast back so the state's dtypes (and
    # the compiled step) never change from one step to the next.
    params = jax.tree.map(lambda new, old: new.astype(old.dtype), params, state.params)
    opt_state = jax.tree.map(lambda new, old: new.astype(old.dtype), opt_state, state.opt_state)
    metrics = dict(sums, loss=loss, grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(params), response_tokens=n_tok)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, ref_params, *, model, family, terms, chunks) -> dict[str, jax.Array]:
    """Loss and reward metrics on a held-out batch, means over its examples."""
    losses, metrics, _ = _pair_stats(model, family, params, batch, ref_params, terms=terms,
                                     chunks=chunks)
    return dict({k: jnp.mean(v) for k, v in metrics.items()}, loss=jnp.mean(losses))


# ----------------------------------------------------------------------------- setup

class Trainer:
    """Everything a run needs, built from a config: model, mesh, optimiser, shardings, steps.

    Construction validates the config and compiles nothing; ``abstract_state`` is a
    ``jax.eval_shape`` tree, so building a Trainer for a 70B config costs no memory.
    """

    def __init__(self, config, *, mesh=None, total_steps: int | None = None):
        validation.validate_config(config, num_devices=len(jax.devices()) if mesh is None
                                   else mesh.size, process_count=jax.process_count())
        self.config = config
        self.mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh.shape)
        self.model, self.family = build_model(config.model)
        self.terms = validation.loss_terms(config.loss)
        self.needs_reference = objectives.needs_reference(self.terms)
        # Frozen reference params enter the step only in 'inline' mode; otherwise the argument
        # is None and no second model is held on the devices.
        self.reference_inline = self.needs_reference and config.reference.mode == "inline"
        self.tx, self.schedule = make_optimizer(config.optim, total_steps or config.train.steps)
        self.max_positions = max_positions(self.model.config)
        self.chunks = {"seq_chunk": config.logprobs.seq_chunk,
                       "vocab_chunk": config.logprobs.vocab_chunk}
        self.abstract_state = jax.eval_shape(self._init_state, jax.random.key(0))
        specs = sharding.match_partition_rules(self.family.partition_rules(),
                                               self.abstract_state, self.mesh)
        self.state_sharding = sharding.shardings_from_specs(self.mesh, specs)
        self.params_sharding = self.state_sharding.params
        self.replicated = NamedSharding(self.mesh, P())
        self.trace_count = 0  # recompile guard: incremented each time the step is traced
        self._train_step = None
        self._eval_step = None

    def _init_state(self, rng) -> TrainState:
        params = self.init_params(rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.tx.init(params))

    def init_params(self, rng):
        ids = jnp.zeros((1, min(self.max_positions, 8)), jnp.int32)
        return self.model.init(rng, ids)["params"]

    def abstract_params(self):
        """ShapeDtypeStructs with shardings: the restore target for checkpoints and HF weights."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract_state.params, self.params_sharding)

    def init_state(self, seed: int, params=None) -> TrainState:
        """Sharded initial state, never materialised on one device (jit with out_shardings)."""
        if params is None:
            init = jax.jit(self._init_state, out_shardings=self.state_sharding)
            return init(jax.random.key(seed))
        # A fresh copy: the state is donated to the step, while `params` may live on as the
        # frozen reference.
        params = jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                         out_shardings=self.params_sharding)(params)
        opt_init = jax.jit(self.tx.init, out_shardings=self.state_sharding.opt_state)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.replicated)
        return TrainState(step=step, params=params, opt_state=opt_init(params))

    def batch_sharding(self, batch):
        return {k: NamedSharding(self.mesh, sharding.batch_spec(np.ndim(v)))
                for k, v in batch.items()}

    def put_batch(self, batch: Mapping[str, np.ndarray]):
        batch = {k: v for k, v in batch.items() if k in STEP_KEYS}
        return sharding.host_local_to_global(batch, self.mesh)

    @property
    def train_step(self) -> Callable:
        """The jitted step: compiled once per batch shape, state donated, reference not."""
        if self._train_step is None:
            step = functools.partial(
                train_step, model=self.model, family=self.family, tx=self.tx, terms=self.terms,
                accum_steps=self.config.optim.grad_accum_steps, chunks=self.chunks)

            def counted(state, batch, ref_params):
                self.trace_count += 1
                return step(state, batch, ref_params)

            self._train_step = jax.jit(
                counted, in_shardings=(self.state_sharding, None, self._ref_sharding),
                out_shardings=(self.state_sharding, self.replicated), donate_argnums=(0,))
        return self._train_step

    @property
    def eval_step(self) -> Callable:
        if self._eval_step is None:
            step = functools.partial(eval_step, model=self.model, family=self.family,
                                     terms=self.terms, chunks=self.chunks)
            self._eval_step = jax.jit(step, in_shardings=(self.params_sharding, None,
                                                          self._ref_sharding),
                                      out_shardings=self.replicated)
        return self._eval_step

    @property
    def _ref_sharding(self):
        return self.params_sharding if self.reference_inline else None

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


# ----------------------------------------------------------------------------- the loop

class _Preemption:
    """SIGTERM (TPU preemption, ``kill``) -> finish the current step, save, exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint before exiting")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config, workdir: str, *, mesh=None, max_steps: int | None = None) -> dict:
    """Trains the policy described by ``config`` in ``workdir``, resuming if possible.

    Resume order: the latest checkpoint in ``workdir``; else ``config.init.mode`` ('checkpoint':
    params from another workdir, 'hf': Hugging Face weights from ``config.model.hf_path``,
    'pretrain': run ``config.init.pretrain`` in ``<workdir>/base`` first, 'scratch': random init
    by seed).

    Args:
      max_steps: stop after this many steps this call (tests simulate interruption with it); the
        schedule still spans ``config.train.steps``.
    Returns:
      A summary: final step, last train metrics, last eval metrics, gold evaluation if run.
    """
    sharding.maybe_initialize_distributed(config.mesh.coordinator_address,
                                          config.mesh.num_processes, config.mesh.process_id)
    os.makedirs(workdir, exist_ok=True)
    trainer = Trainer(config, mesh=mesh)
    cfg = config
    train_data, eval_data, task = pipeline.build_datasets(cfg, workdir=workdir)
    train_iter = pipeline.make_iterator(train_data, cfg.train.global_batch_size, seed=cfg.data.seed)

    init_params = _initial_params(trainer, workdir)  # the reference, and the policy's start
    ref_params = init_params if trainer.reference_inline else None
    if trainer.needs_reference and not trainer.reference_inline:
        from dil_jax import reference  # noqa: PLC0415 (only this mode needs it)

        def add_reference(arrays):
            return reference.with_reference_logps(trainer, init_params, arrays, cfg, workdir)

        # Tokenised real data goes through the reference one bucket length at a time.
        train_data = pipeline.with_reference(train_data, add_reference)
        if eval_data is not None:
            eval_data = pipeline.with_reference(eval_data, add_reference)
        train_iter = pipeline.make_iterator(train_data, cfg.train.global_batch_size,
                                            seed=cfg.data.seed)

    manager = checkpointing.make_manager(workdir, cfg.checkpoint)
    restored = checkpointing.restore_latest(manager, trainer, cfg)
    if restored is not None:
        state, data_state = restored
        train_iter.set_state(data_state)
        logging.info("resumed from step %d", int(state.step))
    else:
        state = trainer.init_state(cfg.seed, params=init_params)
    if task is None or not cfg.eval.gold_prompts:
        init_params = None  # only the gold-task evaluation needs the initial policy again

    start = int(state.step)
    writer = MetricWriter(workdir, tensorboard=cfg.train.tensorboard, resume_step=start)
    end = cfg.train.steps if max_steps is None else min(cfg.train.steps, start + max_steps)
    last_metrics, eval_metrics = {}, {}
    bar = _progress(start, cfg.train.steps, cfg.train.progress_bar)
    tick, tokens = time.perf_counter(), 0.0
    with _Preemption() as preemption:
        for step in range(start + 1, end + 1):
            batch = next(train_iter)
            state, metrics = trainer.run_step(state, batch, ref_params)
            tokens += float(np.sum(batch["attention_mask"]))
            if step % cfg.train.log_every == 0 or step == end:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - tick
                metrics["tokens_per_second"] = tokens / max(elapsed, 1e-9)
                metrics["lr"] = float(trainer.schedule(step - 1))
                _check_finite(metrics, step)
                writer.write(step, metrics)
                last_metrics = metrics
                tick, tokens = time.perf_counter(), 0.0
                if bar is not None:
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if bar is not None:
                bar.update(1)
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and eval_data:
                eval_metrics = _run_eval(trainer, state, ref_params, eval_data, cfg)
                writer.write(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
            preempted = preemption.requested or manager.reached_preemption(step)
            if step % cfg.checkpoint.every_steps == 0 or step == end or preempted:
                checkpointing.save(manager, step, state, train_iter.get_state(), cfg)
            if preempted:
                logging.warning("stopping at step %d after a preemption signal", step)
                break
    manager.wait_until_finished()
    if bar is not None:
        bar.close()
    summary = {"step": int(state.step), "train": last_metrics, "eval": eval_metrics,
               "workdir": workdir}
    if int(state.step) >= cfg.train.steps and task is not None and cfg.eval.gold_prompts:
        from dil_jax import evaluate  # noqa: PLC0415

        summary["gold"] = evaluate.gold_evaluation(trainer, task, state.params, init_params, cfg)
        with open(os.path.join(workdir, "gold_eval.json"), "w") as f:
            json.dump(summary["gold"], f, indent=2)
    writer.close()
    summary["state"] = state
    return summary


def _initial_params(trainer: Trainer, workdir: str):
    """The run's starting policy params (also the frozen reference), per ``config.init``."""
    init = trainer.config.init
    if init.mode == "scratch":
        return jax.jit(trainer.init_params, out_shardings=trainer.params_sharding)(
            jax.random.key(trainer.config.seed))
    if init.mode == "pretrain":
        base_dir = os.path.join(workdir, "base")
        base = train_and_evaluate(init.pretrain, base_dir)
        del base["state"]
        return checkpointing.load_params(base_dir, trainer.abstract_params())
    if init.mode == "checkpoint":
        return checkpointing.load_params(init.checkpoint_dir, trainer.abstract_params())
    if init.mode == "hf":  # streamed tensor by tensor into the target shardings
        from dil_jax.models import hf  # noqa: PLC0415

        m = trainer.config.model
        return hf.load_params(m.hf_path, m.family, trainer.model.config,
                              trainer.abstract_params(), scan_layers=m.scan_layers)
    raise ValueError(f"config.init.mode={init.mode!r}: expected {validation.INIT_MODES}")


def _run_eval(trainer, state, ref_params, eval_data, cfg) -> dict[str, float]:
    it = pipeline.make_iterator(eval_data, cfg.eval.batch_size, shuffle=False)
    batches = [next(it) for _ in range(min(cfg.eval.num_batches, it.batches_per_epoch))]
    return trainer.evaluate(state.params, ref_params, batches)


def _check_finite(metrics: Mapping[str, float], step: int) -> None:
    bad = [k for k, v in metrics.items() if not np.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite metrics {bad} at step {step}; the last checkpoint "
                                 "in the workdir is the last good state")


def _progress(start: int, total: int, enabled: bool):
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)
