"""The one training runtime: every trainable thing in dil_jax is a task run by :func:`run`.

Preference training (``dil_jax.train.Trainer``), reward models and discriminators
(``dil_jax.afd.reward_model.RewardModel``) and adversarial imitation
(``dil_jax.afd.adversarial.AdversarialImitation``) differ only in their state, their pure step
and what must match to resume. This module owns everything around the step, once:

* the train state (:class:`TrainState`) and the optimiser factory (:func:`make_optimizer`:
  AdamW, linear warmup then cosine/linear/constant decay, global-norm clipping);
* jitting with a recompile counter (:func:`counted_jit`), the state donated;
* the finiteness policy (:func:`guard_finite`): a flag computed inside the jitted step every
  step, ``on_nonfinite='skip'`` keeps params and optimiser state unchanged for a non-finite step
  and counts it, ``'halt'`` (or ``max_nonfinite`` consecutive skips) stops with one line naming
  the step and the first non-finite quantity; a non-finite state is never checkpointed;
* restore/resume from the workdir's latest good checkpoint, async orbax saves with keep-N,
  SIGTERM/preemption (the current step finishes, a checkpoint is written, :class:`Preempted`
  is raised so every caller — and the scheduler, through the exit status — knows the run
  stopped early), metrics (JSONL + TensorBoard + a progress bar), periodic evaluation.

The loop fetches each step's finiteness flag one step late (after the next step is
dispatched), so checking every step does not serialise the device; at a checkpoint the flag of
the step being saved is read first. Logged metrics are fetched the same way: a logged step's
record is written after the next step is dispatched (``log_every=1`` keeps the device busy),
except at a checkpoint or the last step. Each record carries ``tokens_per_second`` (real,
non-padding tokens) and, for tasks that count their FLOPs (``Task``), ``flops_per_second`` and
``mfu`` (model FLOPs utilisation against ``dil_jax.flops.device_peak``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from dil_jax import checkpointing, paths, sharding
from dil_jax import workdir as workdir_lib
from dil_jax.metrics import MetricWriter, WandbSettings

NONFINITE_POLICIES = ("halt", "skip")
SCHEDULES = ("cosine", "linear", "constant")
PREEMPTED_MARKER = "PREEMPTED"


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32
    params: Any
    opt_state: Any


class NonFiniteError(FloatingPointError):
    """A step produced a non-finite loss, gradient or parameter (the run halted, unsaved)."""


class Preempted(Exception):  # noqa: N818 (a signal, not an error)
    """SIGTERM or orbax's preemption notice stopped the run; the checkpoint of ``step`` is
    written. Entry points exit with :data:`PREEMPTED_EXIT_CODE` so a scheduler can requeue."""

    def __init__(self, step: int, workdir: str):
        super().__init__(
            f"preempted at step {step}; resume by running the same command "
            f"(checkpoint in {workdir})"
        )
        self.step, self.workdir = step, workdir


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: try again later


# ----------------------------------------------------------------------------- optimiser


def make_optimizer(
    *,
    learning_rate: float,
    total_steps: int,
    warmup_ratio: float = 0.0,
    schedule: str = "cosine",
    end_lr_factor: float = 0.0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    grad_clip: float = 0.0,
):
    """AdamW with linear warmup then cosine/linear/constant decay, and global-norm clipping.

    Warmup lasts ``round(warmup_ratio * total_steps)`` steps from 0 to ``learning_rate``; the
    decay spans the remaining steps down to ``learning_rate * end_lr_factor``.

    Returns:
      ``(optax transformation, schedule fn)``.
    """
    peak = learning_rate
    warmup = int(round(warmup_ratio * total_steps))
    decay_steps = max(total_steps - warmup, 1)
    end = peak * end_lr_factor
    if schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end_lr_factor)
    elif schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif schedule == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"schedule={schedule!r}: expected one of {SCHEDULES}")
    sched = optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts), sched


def cast_like(new, old):
    """Casts every leaf of ``new`` to its counterpart's dtype in ``old``: float32 gradients
    promote bf16 params and moments, and the state's dtypes (hence the compiled step) must never
    change from one step to the next."""
    return jax.tree.map(lambda n, o: n.astype(o.dtype), new, old)


# ----------------------------------------------------------------------------- jitting


def counted_jit(owner, fn: Callable, **jit_kwargs) -> Callable:
    """``jax.jit(fn)`` that increments ``owner.trace_count`` each time it is traced (the
    recompile guard the tests assert on)."""

    def counted(*args):
        owner.trace_count += 1
        return fn(*args)

    return jax.jit(counted, **jit_kwargs)


def _all_finite(tree) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def guard_finite(step_fn: Callable, policy: str) -> Callable:
    """Wraps a pure ``(state, *args) -> (state, metrics)`` step with the finiteness policy.

    Adds to the metrics ``finite`` (1.0 / 0.0: metrics and new params all finite),
    ``nonfinite_param`` (index of the first non-finite parameter leaf in flattening order, −1
    if none) and, under ``'skip'``, ``skipped`` (1.0 when this step's update was discarded: the
    returned params and optimiser state are the inputs, the step counter still advances).
    """
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"on_nonfinite={policy!r}: expected one of {NONFINITE_POLICIES}")

    def guarded(state, *args):
        new, metrics = step_fn(state, *args)
        leaves = jax.tree.leaves(new.params)
        leaf_ok = jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])  # [n_leaves]
        finite = jnp.all(leaf_ok) & _all_finite(metrics) & _all_finite(new.opt_state)
        metrics = dict(
            metrics,
            finite=finite.astype(jnp.float32),
            nonfinite_param=jnp.where(jnp.all(leaf_ok), -1, jnp.argmin(leaf_ok)).astype(
                jnp.float32
            ),
        )
        if policy == "skip":
            keep = lambda n, o: jnp.where(finite, n, o)  # noqa: E731
            new = new.replace(
                params=jax.tree.map(keep, new.params, state.params),
                opt_state=jax.tree.map(keep, new.opt_state, state.opt_state),
            )
            metrics["skipped"] = 1.0 - metrics["finite"]
        return new, metrics

    return guarded


# ----------------------------------------------------------------------------- preemption

# SIGTERM is process-wide by nature: one flag, set by the handler, read at every step and at
# the boundaries of the phases before the loop (tokenisation, reference precompute).
_STOP = threading.Event()


def _on_sigterm(signum, frame):
    logging.warning(
        "SIGTERM received: stopping at the next safe point (after the current step "
        "and its checkpoint, or before the next phase)"
    )
    _STOP.set()


@contextlib.contextmanager
def stop_on_sigterm():
    """Turns SIGTERM (TPU preemption, ``kill``, a scheduler) into a stop request for the block.

    Entry points wrap the whole run in it, so a SIGTERM during start-up, tokenisation or the
    reference precompute stops cleanly too; :func:`run` installs it itself when nobody has.
    Nested uses are no-ops. Only the main thread can install signal handlers.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is _on_sigterm
    ):
        yield
        return
    _STOP.clear()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_requested() -> bool:
    return _STOP.is_set()


# Multi-host: SIGTERM may reach one host only (a single VM preempted, `kill` on one node). The
# stop is then agreed: every STOP_SYNC_EVERY steps (and at each phase boundary) the processes
# all-gather their local flags (one int32 scalar each) and all stop at that step if any of them
# was asked to, so every host saves the same step. Orbax's `reached_preemption` (the distributed
# runtime's own notice, already agreed) is honoured every step as well. Between agreements a
# process that got SIGTERM keeps stepping with the others (a few steps at most).
STOP_SYNC_EVERY = 5


def agreed_stop(local: bool | None = None) -> bool:
    """Whether any process has a stop request (this process's alone when single-process).

    Every process must call it at the same point (a collective when ``process_count > 1``).
    """
    local = _STOP.is_set() if local is None else local
    if jax.process_count() == 1:
        return local
    flags = multihost_utils.process_allgather(np.asarray(local, np.int32))
    return bool(np.max(flags))


def mark_preempted(workdir: str, step: int) -> Preempted:
    """Writes ``<workdir>/PREEMPTED`` (process 0) and returns the exception to raise."""
    if jax.process_index() == 0:
        paths.write_atomic(paths.join(workdir, PREEMPTED_MARKER), f"{step}\n")
    return Preempted(step, workdir)


def check_stop(workdir: str, phase: str) -> None:
    """Raises :class:`Preempted` at a phase boundary when SIGTERM has arrived."""
    if agreed_stop():
        ckpt = checkpointing.checkpoint_dir(workdir)
        steps = [int(d) for d in paths.listdir(ckpt) if d.isdigit()]
        logging.warning("stopping before %s after a preemption signal", phase)
        raise mark_preempted(workdir, max(steps, default=0))


# ----------------------------------------------------------------------------- the loop


class Task(Protocol):
    """What :func:`run` needs of a training task besides its step function: the state's
    abstract tree and shardings (restore target, partition rules applied) and the recompile
    counter that :func:`counted_jit` increments."""

    mesh: Any
    abstract_state: TrainState  # jax.eval_shape tree: restore target
    state_sharding: Any  # TrainState of NamedShardings
    replicated: Any
    trace_count: int
    # Optional, for `mfu` in the metrics: `step_flops(host batch) -> model FLOPs of the step`
    # (dil_jax.flops, computed on the host) and `peak_flops() -> FLOP/s of all devices`.


# (state, host batch, 1-based step) -> (state, device metrics); jitted inside (counted_jit,
# guard_finite).
StepFn = Callable[
    [TrainState, Mapping[str, np.ndarray], int], tuple[TrainState, Mapping[str, jax.Array]]
]


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """How a task's steps are driven: length, logging, checkpoints, evaluation, finiteness."""

    steps: int
    log_every: int = 1
    checkpoint_every: int = 100
    keep: int = 3
    async_save: bool = True
    tensorboard: bool = True
    progress_bar: bool = False
    desc: str = "train"
    eval_every: int = 0
    on_nonfinite: str = "halt"
    max_nonfinite: int = 10  # consecutive skipped steps before 'skip' halts too
    wandb: WandbSettings | None = None  # train.wandb_*: a W&B run beside JSONL (process 0)

    @classmethod
    def from_stage(cls, section, desc: str) -> LoopSettings:
        """An AfD stage's section (``steps``, ``log_every``, ``checkpoint_every``, ``keep``,
        ``async_save``, optionally ``on_nonfinite``): metrics to JSONL only, no progress bar."""
        return cls(
            steps=section.steps,
            log_every=section.log_every,
            checkpoint_every=section.checkpoint_every,
            keep=section.keep,
            async_save=section.async_save,
            tensorboard=False,
            desc=desc,
            on_nonfinite=getattr(section, "on_nonfinite", "halt"),
        )


@dataclasses.dataclass
class LoopResult:
    state: TrainState
    train: dict  # last logged metrics
    eval: dict  # last evaluation
    step: int


def param_path(abstract_params, index: int) -> str:
    """The ``a/b/c`` path of leaf ``index`` of a params tree (flattening order)."""
    paths = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    return sharding.path_str(paths[index][0]) if 0 <= index < len(paths) else f"leaf {index}"


def nonfinite_message(metrics: Mapping[str, float], step: int, abstract_params, label: str) -> str:
    """One line naming the step and the first non-finite quantity."""
    order = ("loss", "grad_norm")
    bad = [k for k in order if k in metrics and not np.isfinite(metrics[k])]
    bad += sorted(k for k, v in metrics.items() if k not in order and not np.isfinite(v))
    idx = int(metrics.get("nonfinite_param", -1))
    what = f"first non-finite metric {bad[0]!r}" if bad else "metrics finite"
    if idx >= 0:
        what += f"; first non-finite parameter {param_path(abstract_params, idx)}"
    return (
        f"{label}: step {step} is non-finite ({what}); no checkpoint of it was written, "
        "the workdir's latest checkpoint is the last good state (lower the learning rate, "
        "or set train.on_nonfinite=skip)"
    )


def run(
    task: Task,
    workdir: str,
    *,
    step_fn: StepFn,
    settings: LoopSettings,
    data: Iterator,
    init_state: Callable[[], TrainState],
    resume_config,
    max_steps: int | None = None,
    evaluate: Callable[[TrainState], dict] | None = None,
    schedule: Callable | None = None,
    check: Callable[[Mapping[str, float], int, Any], None] | None = None,
    on_log: Callable[[Mapping[str, float], int], Mapping[str, float]] | None = None,
    label: str = "train",
) -> LoopResult:
    """Drives ``task`` from the workdir's latest checkpoint (or ``init_state()``) to
    ``settings.steps``.

    Args:
      step_fn: one update of ``task``'s state on a host batch.
      data: a batch iterator with ``get_state``/``set_state`` (its position is checkpointed).
      init_state: builds the fresh state when the workdir has no checkpoint.
      resume_config: a ConfigDict recorded in every checkpoint; a resume must match its
        ``checkpointing.RESUME_MUST_MATCH`` fields.
      max_steps: stop after this many steps in this call (tests simulate interruption).
      evaluate: ``state -> metrics`` run every ``settings.eval_every`` steps and at the run's
        last step, ``settings.steps`` (``eval/`` prefix).
      schedule: learning-rate schedule, logged as ``lr``.
      check: ``(host metrics, step, manager)`` called on every step's metrics (fetched every
        step when given); raise to stop before that step is saved.
      on_log: ``(host metrics, step) -> extra metrics`` merged into each logged record (host-side
        statistics across logged steps, e.g. moving averages and alarms).
    The workdir is locked for the call (``dil_jax.workdir.lock``: a second run on it is refused,
    a dead run's lock taken over) and checked writable before anything is restored.

    Raises:
      WorkdirError: another live run holds the workdir, or it cannot be written.
      NonFiniteError: a non-finite step under 'halt' (or too many consecutive skips).
      Preempted: after saving, when SIGTERM or orbax's preemption notice arrived.
    """
    paths.makedirs(workdir)
    with workdir_lib.lock(workdir):
        return _run_locked(
            task,
            workdir,
            step_fn=step_fn,
            settings=settings,
            data=data,
            init_state=init_state,
            resume_config=resume_config,
            max_steps=max_steps,
            evaluate=evaluate,
            schedule=schedule,
            check=check,
            on_log=on_log,
            label=label,
        )


def _run_locked(
    task,
    workdir,
    *,
    step_fn,
    settings,
    data,
    init_state,
    resume_config,
    max_steps,
    evaluate,
    schedule,
    check,
    on_log,
    label,
) -> LoopResult:
    marker = paths.join(workdir, PREEMPTED_MARKER)
    if jax.process_index() == 0 and paths.exists(marker):
        paths.remove(marker)  # this call resumes the preempted run
    ckpt = checkpointing.make_manager(workdir, settings)
    restored = checkpointing.restore_latest(ckpt, task, resume_config)
    if restored is not None:
        state, data_state = restored
        data.set_state(data_state)
        logging.info("%s: resumed from step %d", label, int(state.step))
    else:
        state = init_state()
    start = int(state.step)
    end = settings.steps if max_steps is None else min(settings.steps, start + max_steps)
    writer = MetricWriter(
        workdir,
        tensorboard=settings.tensorboard,
        resume_step=start,
        wandb=settings.wandb,
        config=checkpointing.config_to_dict(resume_config) if settings.wandb else None,
    )
    bar = _progress(start, settings.steps, settings.progress_bar, settings.desc)
    abstract_params = task.abstract_state.params
    last, eval_metrics = {}, {}
    pending = None  # (step, device metrics) whose finiteness is not yet checked
    consecutive_skips = 0
    tick, tokens, flops = time.perf_counter(), 0.0, 0.0
    step_flops = getattr(task, "step_flops", None)
    peak = task.peak_flops() if step_flops is not None else None
    to_log = None  # (step, device metrics, tokens, flops): written after the next dispatch
    # The learning rate of every step, computed once: evaluating the (jnp) schedule while
    # logging would queue behind the step in flight and make log_every=1 serialise the device.
    lrs = None if schedule is None else np.asarray(jax.vmap(schedule)(jnp.arange(max(end, 1))))

    def write_log(step, metrics, host, step_tokens, step_flops_sum) -> None:
        """Writes the record of logged ``step``; rates cover the steps since the last record."""
        nonlocal last, tick, tokens, flops
        host = {k: v for k, v in host.items() if k not in ("finite", "nonfinite_param")}
        # The next record's interval starts now, not after this one is written: writing (and
        # on_log's device work, which waits for the already dispatched next step) would
        # otherwise fall between two intervals, and the next rate would count only the time
        # after the next step had finished (tokens/s of 1e5-1e6 on a CPU).
        now = time.perf_counter()
        elapsed = max(now - tick, 1e-9)
        host["tokens_per_second"] = step_tokens / elapsed
        if step_flops is not None:
            host["flops_per_second"] = step_flops_sum / elapsed
            host["mfu"] = step_flops_sum / elapsed / peak
        if schedule is not None:
            host["lr"] = float(lrs[step - 1])
        if on_log is not None:
            host.update(on_log(host, step))
        writer.write(step, host)
        last = host
        tick, tokens, flops = now, tokens - step_tokens, flops - step_flops_sum
        if bar is not None and "loss" in host:
            bar.set_postfix(loss=f"{host['loss']:.4f}")

    def flush_log() -> None:
        nonlocal to_log
        if to_log is not None:
            step, metrics, step_tokens, step_flops_sum = to_log
            to_log = None
            settle(step, metrics)
            host = {k: float(v) for k, v in jax.device_get(metrics).items()}
            write_log(step, metrics, host, step_tokens, step_flops_sum)

    def settle(step, metrics) -> None:
        """The finiteness policy for ``step`` (reads one scalar when the step is finite)."""
        nonlocal consecutive_skips
        if "finite" in metrics and float(metrics["finite"]) == 1.0:  # one scalar off the device
            consecutive_skips = 0
            return
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if host.get("finite", 1.0) < 1.0:
            if settings.on_nonfinite == "skip":
                consecutive_skips += 1
                logging.warning(
                    "%s: step %d was non-finite and skipped (%d in a row)",
                    label,
                    step,
                    consecutive_skips,
                )
                if consecutive_skips > settings.max_nonfinite:
                    raise NonFiniteError(
                        nonfinite_message(host, step, abstract_params, label)
                        + f"; {consecutive_skips} consecutive skipped steps > "
                        f"train.max_nonfinite={settings.max_nonfinite}"
                    )
            else:
                raise NonFiniteError(nonfinite_message(host, step, abstract_params, label))
        else:
            consecutive_skips = 0

    try:
        with stop_on_sigterm():
            for step in range(start + 1, end + 1):
                batch = next(data)
                state, metrics = step_fn(state, batch, step)
                if "attention_mask" in batch:
                    tokens += float(np.sum(batch["attention_mask"]))
                if step_flops is not None:
                    flops += step_flops(batch)
                log_now = step % settings.log_every == 0 or step == end
                if jax.process_count() == 1:
                    stop = _STOP.is_set()
                else:  # agreed, so that every host stops (and saves) at the same step
                    stop = step % STOP_SYNC_EVERY == 0 and agreed_stop()
                preempted = stop or ckpt.reached_preemption(step)
                save_now = step % settings.checkpoint_every == 0 or step == end or preempted
                if pending is not None:
                    settle(*pending)  # the previous step, now certainly done
                    pending = None
                flush_log()  # the previous logged step, fetched while this one runs
                if save_now or check is not None:
                    settle(step, metrics)
                    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if check is not None:
                        check(host, step, ckpt)
                    if log_now:
                        write_log(step, metrics, host, tokens, flops)
                elif log_now:
                    to_log = (step, metrics, tokens, flops)
                else:
                    pending = (step, metrics)
                if bar is not None:
                    bar.update(1)
                final = step == settings.steps  # the finished run is always evaluated
                if settings.eval_every and (step % settings.eval_every == 0 or final) and evaluate:
                    flush_log()  # the step's record before its evaluation's
                    eval_metrics = evaluate(state)
                    writer.write(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
                if save_now:
                    checkpointing.save(ckpt, step, state, data.get_state(), resume_config)
                if preempted:
                    logging.warning(
                        "%s: stopping at step %d after a preemption signal", label, step
                    )
                    ckpt.wait_until_finished()
                    raise mark_preempted(workdir, step)
            if pending is not None:
                settle(*pending)
            flush_log()
    finally:
        ckpt.wait_until_finished()
        ckpt.close()
        writer.close()
        if bar is not None:
            bar.close()
    return LoopResult(state=state, train=last, eval=eval_metrics, step=int(state.step))


def _progress(start: int, total: int, enabled: bool, desc: str):
    if not enabled or jax.process_index() != 0:
        return None
    return tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)
