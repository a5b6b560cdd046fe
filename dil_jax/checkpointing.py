"""Self-describing orbax checkpoints: params, optimiser state, step, data position, config.

Layout: ``<workdir>/checkpoints/<step>/{params,opt_state,meta}``. ``meta`` is JSON holding the
step, the data iterator's state and the full config, so a checkpoint explains itself and a
resume can refuse an incompatible config instead of silently starting over. Params and optimiser
state are separate items so another run can take the params alone (``init.mode='checkpoint'``,
HF export) without knowing the optimiser that produced them. Restores go straight into the
sharded abstract target of the *current* mesh (resharding on restore is supported).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from dil_jax.errors import ConfigError

# Config sections that must match to resume: they define shapes, data order and the objective.
# Everything else (train.steps, eval, logging, checkpoint cadence, mesh) may change on resume.
RESUME_MUST_MATCH = ("model", "data", "loss", "seed", "train.global_batch_size")


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, ckpt_cfg) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.keep, create=True,
        enable_async_checkpointing=ckpt_cfg.async_save)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                 item_names=("params", "opt_state", "meta"))


def config_to_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


def save(manager: ocp.CheckpointManager, step: int, state, data_state: Mapping, config) -> None:
    """Asynchronous save (returns once the arrays are copied off the devices)."""
    meta = {"step": int(step), "data": dict(data_state), "config": config_to_dict(config)}
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        meta=ocp.args.JsonSave(meta)), force=True)


def _get(d: Mapping, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, Mapping) or part not in d:
            return None
        d = d[part]
    return d


def incompatibilities(saved: Mapping, current: Mapping) -> list[str]:
    """Human-readable differences in the fields that must match for a resume."""
    diffs = []
    for key in RESUME_MUST_MATCH:
        a, b = _get(saved, key), _get(current, key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    diffs.append(f"{key}.{sub}: checkpoint has {a.get(sub)!r}, config has "
                                 f"{b.get(sub)!r}")
        elif a != b:
            diffs.append(f"{key}: checkpoint has {a!r}, config has {b!r}")
    return diffs


def restore_latest(manager: ocp.CheckpointManager, trainer, config):
    """``(state, data_state)`` from the latest checkpoint, or None when there is none.

    Raises:
      ValueError when the checkpoint was written by an incompatible config (listing the fields),
      rather than silently starting over.
    """
    step = manager.latest_step()
    if step is None:
        return None
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    diffs = incompatibilities(meta["config"], config_to_dict(config))
    if diffs:
        raise ConfigError(
            f"refusing to resume from {manager.directory}/{step}: it was written by an "
            "incompatible config (" + "; ".join(diffs) + "). Use a new --workdir, or restore "
            "the original values.")
    target = jax.tree.map(_abstract, trainer.abstract_state, trainer.state_sharding)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target.params),
            opt_state=ocp.args.StandardRestore(target.opt_state)))
    except (ValueError, KeyError) as e:
        raise ValueError(f"checkpoint {manager.directory}/{step} does not fit this run's state "
                         f"(optimizer settings changed?): {e}") from e
    state = type(trainer.abstract_state)(
        step=jax.device_put(jnp.asarray(meta["step"], jnp.int32), trainer.replicated),
        params=restored.params, opt_state=restored.opt_state)
    return state, meta["data"]


def load_params(workdir: str, abstract_params, step: int | None = None):
    """Params of a run's latest (or given) checkpoint, restored into ``abstract_params``."""
    directory = checkpoint_dir(workdir)
    manager = ocp.CheckpointManager(directory, item_names=("params", "opt_state", "meta"))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory} to load params from")
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params)))
    manager.close()
    return restored.params


def _abstract(x, s):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
