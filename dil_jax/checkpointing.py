"""Self-describing orbax checkpoints: params, optimiser state, step, data position, config.

Layout: ``<workdir>/checkpoints/<step>/{params,opt_state,meta}``. ``meta`` is JSON holding the
step, the data iterator's state and the full config, so a checkpoint explains itself and a
resume can refuse an incompatible config instead of silently starting over. Params and optimiser
state are separate items so another run can take the params alone (``init.mode='checkpoint'``,
HF export) without knowing the optimiser that produced them. Restores go straight into the
sharded abstract target of the *current* mesh (resharding on restore is supported).

Damage (a truncated or deleted file, an interrupted copy, garbage JSON) never blocks a resume and
never starts a run over: ``restore_latest`` checks each step before reading it (commit markers,
items, meta), restores the newest good one, and moves the damaged newer ones to
``<workdir>/checkpoints.damaged/<step>-<reason>`` with one warning each. When none is usable it
stops with a ``CheckpointError`` listing what it found, moving nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from dil_jax import paths, reference
from dil_jax.errors import CheckpointError, ConfigError

# Config sections that must match to resume: they define shapes, data order and the objective.
# Everything else (train.steps, eval, logging, checkpoint cadence, mesh) may change on resume.
RESUME_MUST_MATCH = ("model", "data", "loss", "seed", "train.global_batch_size")
# Fields added to those sections after checkpoints were first written, with the values that
# reproduce what the older code did: a checkpoint that predates a field (it records no value)
# resumes when the config holds one of them.
ADDED_FIELDS = {
    "model.attention": ("auto", "xla"),  # the einsum ('auto' picks it on CPU)
    "data.prefix_sharing": (False,),
}

ITEMS = ("params", "opt_state", "meta")
_ARRAY_ITEMS = ("params", "opt_state")
COMMIT_MARKER = "commit_success.txt"  # orbax writes it into each item and the step on commit
DAMAGED_DIRNAME = "checkpoints.damaged"  # sibling of checkpoints/: damaged steps, moved aside


def checkpoint_dir(workdir: str) -> str:
    """``<workdir>/checkpoints``, absolute; a URL workdir (``gs://``) is kept as a URL."""
    return paths.join(paths.absolute(workdir), "checkpoints")


def make_manager(workdir: str, ckpt_cfg) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.keep, create=True, enable_async_checkpointing=ckpt_cfg.async_save
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def config_to_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


def save(manager: ocp.CheckpointManager, step: int, state, data_state: Mapping, config) -> None:
    """Asynchronous save (returns once the arrays are copied off the devices)."""
    meta = {"step": int(step), "data": dict(data_state), "config": config_to_dict(config)}
    manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )


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
                if sub not in a and b.get(sub) in ADDED_FIELDS.get(f"{key}.{sub}", ()):
                    continue  # written before the field existed, by code that behaved so
                if a.get(sub) != b.get(sub):
                    diffs.append(
                        f"{key}.{sub}: checkpoint has {a.get(sub)!r}, config has {b.get(sub)!r}"
                    )
        elif a != b:
            diffs.append(f"{key}: checkpoint has {a!r}, config has {b!r}")
    return diffs


def restore_latest(manager: ocp.CheckpointManager, trainer, config):
    """``(state, data_state)`` from the newest good checkpoint, or None when there is none.

    Damage never blocks a resume and never starts a run over: steps are tried newest first; one
    that fails :func:`check_step` or whose arrays orbax cannot read (a truncated or deleted data
    file, a deleted ``manifest.ocdbt``) gets one warning naming the step and the reason, and,
    once an older step has restored, is moved to ``<workdir>/checkpoints.damaged/<step>-<tag>``
    (user data is moved, never deleted).

    Raises:
      ConfigError: the newest intact checkpoint was written by an incompatible config (listing
        the fields) or its arrays do not fit this run's state; no older step is tried, since
        the mismatch is the config's, not the checkpoint's.
      CheckpointError: checkpoints exist but none is usable (listing each step and its reason);
        nothing is moved, so the run does not start over on the next attempt either.
    """
    damaged: list[tuple[int, Damage]] = []
    restored = None
    for step in sorted(manager.all_steps(), reverse=True):
        step_dir = paths.join(str(manager.directory), str(step))
        meta, damage = _read_checked(step_dir, step, ITEMS)
        if meta is not None:  # another run's checkpoint is refused, whatever else is wrong
            _refuse_other_base(step_dir, meta, config)
            _refuse_incompatible(step_dir, meta, config)
        if damage is None:
            target = jax.tree.map(_abstract, trainer.abstract_state, trainer.state_sharding)
            for item in ("params", "opt_state"):
                _refuse_misfit(step_dir, item, getattr(target, item))
            arrays, damage = _restore_items(
                manager, step, {"params": target.params, "opt_state": target.opt_state}
            )
        if damage is not None:
            damaged.append((step, damage))
            continue
        state = type(trainer.abstract_state)(
            step=jax.device_put(jnp.asarray(meta["step"], jnp.int32), trainer.replicated),
            params=arrays["params"],
            opt_state=arrays["opt_state"],
        )
        restored = state, meta["data"]
        break
    if restored is None and damaged:
        raise CheckpointError(_none_usable(manager.directory, damaged))
    if damaged:
        _move_aside(manager, damaged, int(meta["step"]))
    return restored


def load_params(workdir: str, abstract_params, step: int | None = None):
    """Params of a run's newest good (or the given) checkpoint, restored into ``abstract_params``.

    Reads another run's workdir, so damaged steps are skipped with a warning but left in place.

    Raises:
      CheckpointError: no checkpoint, the given step is missing or damaged, or none is usable.
      ConfigError: the stored params do not fit ``abstract_params``.
    """
    directory = checkpoint_dir(workdir)
    manager = ocp.CheckpointManager(directory, item_names=ITEMS)
    try:
        steps = sorted(manager.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise CheckpointError(
                    f"no checkpoint step {step} in {directory} (steps: {sorted(steps)})"
                )
            steps = [step]
        if not steps:
            raise CheckpointError(f"no checkpoint in {directory} to load params from")
        damaged = []
        for s in steps:
            step_dir = paths.join(directory, str(s))
            _, damage = _read_checked(step_dir, s, ("params", "meta"))
            if damage is None:
                _refuse_misfit(step_dir, "params", abstract_params)
                arrays, damage = _restore_items(manager, s, {"params": abstract_params})
            if damage is None:
                return arrays["params"]
            logging.warning(
                "checkpoint step %d in %s is damaged (%s)%s",
                s,
                directory,
                damage.reason,
                "; trying the previous one" if step is None else "",
            )
            damaged.append((s, damage))
        raise CheckpointError(_none_usable(directory, damaged))
    finally:
        manager.close()


def read_meta(workdir: str, step: int | None = None) -> dict:
    """The ``meta`` dict (step, data state, config) of the newest whole (or the given) step.

    Like :func:`load_params`, damaged steps are skipped with a warning and left in place.

    Raises:
      FileNotFoundError: no checkpoint, or not the given step.
      CheckpointError: the given step is damaged, or no step is whole.
    """
    directory = checkpoint_dir(workdir)
    manager = ocp.CheckpointManager(directory, item_names=ITEMS)
    steps = sorted(manager.all_steps(), reverse=True)
    manager.close()
    if not steps or (step is not None and step not in steps):
        raise FileNotFoundError(
            f"no checkpoint {'' if step is None else step} in {directory} (steps: {sorted(steps)})"
        )
    damaged = []
    for s in [step] if step is not None else steps:
        meta, damage = _read_checked(paths.join(directory, str(s)), s, ("params", "meta"))
        if damage is None:
            return meta
        logging.warning("checkpoint step %d in %s is damaged (%s)", s, directory, damage.reason)
        damaged.append((s, damage))
    raise CheckpointError(_none_usable(directory, damaged))


# ---------------------------------------------------------------------------------------------
# Integrity: what a finished save leaves behind, checked before orbax is asked to read it.


@dataclasses.dataclass(frozen=True)
class Damage:
    """Why a step cannot be restored: ``tag`` names the moved directory, ``reason`` the log."""

    tag: str
    reason: str


def check_step(step_dir: str, step: int, items: Sequence[str] = ITEMS) -> Damage | None:
    """The first integrity problem of a checkpoint step directory, or None when it looks whole.

    Checks what a committed orbax save always leaves: the step's and every item's commit marker,
    each array item's ``manifest.ocdbt`` and parseable ``_METADATA``, no zero-byte files, and a
    ``meta`` JSON that parses and records this step. (``_CHECKPOINT_METADATA`` is not required:
    orbax restores without it.) Damage inside the data files shows only when orbax reads them;
    :func:`restore_latest` catches that too.
    """
    return _read_checked(step_dir, step, items)[1]


def _read_checked(step_dir: str, step: int, items: Sequence[str]):
    """``(meta, Damage or None)`` for one step directory; meta is None unless it parsed."""
    if not paths.isdir(step_dir):
        return None, Damage("missing", f"{step_dir} is not a directory")
    if not paths.listdir(step_dir):
        return None, Damage("empty", "the step directory is empty (an interrupted copy?)")
    for item in items:
        item_dir = paths.join(step_dir, item)
        if not paths.isdir(item_dir):
            return None, Damage(f"no-{item}", f"item {item}/ is missing")
        if not paths.exists(paths.join(item_dir, COMMIT_MARKER)):
            return None, Damage(
                f"uncommitted-{item}", f"{item}/ has no {COMMIT_MARKER}: its save never finished"
            )
        if item in _ARRAY_ITEMS:
            damage = _check_array_item(item_dir, item)
            if damage is not None:
                return None, damage
    if not paths.exists(paths.join(step_dir, COMMIT_MARKER)):
        return None, Damage("uncommitted", f"no {COMMIT_MARKER}: the save never finished")
    meta = None
    if "meta" in items:
        meta_file = paths.join(step_dir, "meta", "metadata")
        try:
            meta = json.loads(paths.read_text(meta_file))
        except (OSError, ValueError) as e:
            return None, Damage(
                "bad-meta",
                f"meta/metadata does not parse as JSON ({type(e).__name__}: {_first_line(e)})",
            )
        if not isinstance(meta, Mapping) or not {"step", "data", "config"} <= set(meta):
            return None, Damage("bad-meta", "meta/metadata lacks step, data or config")
        if meta["step"] != step:
            return meta, Damage(
                "wrong-step",
                f"meta/metadata records step {meta['step']!r}, not the directory's {step}",
            )
    return meta, None


def _check_array_item(item_dir: str, item: str) -> Damage | None:
    if not paths.exists(paths.join(item_dir, "manifest.ocdbt")):
        return Damage(f"no-manifest-{item}", f"{item}/manifest.ocdbt is missing")
    try:
        json.loads(paths.read_text(paths.join(item_dir, "_METADATA")))
    except (OSError, ValueError) as e:
        return Damage(
            f"bad-metadata-{item}",
            f"{item}/_METADATA is missing or unreadable ({type(e).__name__})",
        )
    for path, size in paths.walk_files(item_dir):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name != COMMIT_MARKER and size == 0:
            rel = path[path.rfind(f"/{item}/") + 1 :] if f"/{item}/" in path else name
            return Damage(f"empty-file-{item}", f"{rel} is empty")
    return None


def _refuse_incompatible(step_dir: str, meta: Mapping, config) -> None:
    diffs = incompatibilities(meta["config"], config_to_dict(config))
    if diffs:
        raise ConfigError(
            f"refusing to resume from {step_dir}: it was written by an incompatible config ("
            + "; ".join(diffs)
            + "). Use a new --workdir, or restore the original values."
        )


def _refuse_other_base(step_dir: str, meta: Mapping, config) -> None:
    """CheckpointError when adapters (``config.lora``) were trained on other base weights:
    the run's config carries ``lora.base_fingerprint`` (``dil_jax.lora.with_base_fingerprint``)."""
    want = _get(config_to_dict(config), "lora.base_fingerprint")
    if want is None:
        return
    have = _get(meta["config"], "lora.base_fingerprint")
    if have is not None and not reference.comparable_fingerprints(have, want):
        logging.warning(
            "%s: its lora.base_fingerprint is of an older version and is not checked", step_dir
        )
        return
    if have != want:
        raise CheckpointError(
            f"refusing to resume from {step_dir}: lora.base_fingerprint differs (its adapters "
            f"were trained on base weights {str(have)[:12]}, this run's base, per config.init and "
            f"config.model, is {want[:12]}). Use a new --workdir, or the original base."
        )


def _refuse_misfit(step_dir: str, item: str, target) -> None:
    """ConfigError when the stored tree's paths or shapes differ from ``target``'s.

    Checked before reading so that a config change (another optimiser, model shape) is reported
    as such, and a read failure afterwards can only mean damage.
    """
    handler = ocp.StandardCheckpointHandler()
    try:
        stored = handler.metadata(epath.Path(step_dir) / item)
    except Exception:  # noqa: BLE001 - unreadable metadata is damage, found by the read below
        return
    finally:
        handler.close()
    have, want = _shapes_by_path(stored), _shapes_by_path(target)
    if have == want:
        return
    diffs = [
        f"{p}: checkpoint has {have.get(p, 'nothing')}, run has {want.get(p, 'nothing')}"
        for p in sorted(set(have) | set(want))
        if have.get(p) != want.get(p)
    ]
    raise ConfigError(
        f"checkpoint {step_dir} does not fit this run's state ({len(diffs)} {item} entries "
        f"differ, e.g. {'; '.join(diffs[:3])}): optimizer or model settings changed? Use a new "
        "--workdir, or restore the original settings."
    )


def _shapes_by_path(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(
            str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path
        ): tuple(getattr(leaf, "shape", ()))
        for path, leaf in leaves
    }


def _restore_items(manager, step: int, targets: Mapping):
    """``(restored arrays by item, None)``, or ``(None, Damage)`` when orbax cannot read one."""
    arrays = {}
    for item, target in targets.items():
        try:
            arrays[item] = getattr(
                manager.restore(
                    step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)})
                ),
                item,
            )
        except Exception as e:  # noqa: BLE001 - tensorstore raises bare Exception/ValueError
            return None, Damage(
                f"unreadable-{item}", f"orbax could not read {item}/: {_first_line(e)}"
            )
    return arrays, None


def _first_line(e: BaseException) -> str:
    """The innermost cause's first line: tensorstore names the tensor and the bad byte range."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).split("See full TensorStore details")[0].strip()
    return (text.splitlines() or [type(e).__name__])[0][:400]


def _none_usable(directory, damaged) -> str:
    found = "; ".join(f"step {s}: {d.reason}" for s, d in damaged)
    return (
        f"no usable checkpoint in {directory} ({found}). Nothing was moved or deleted: fix "
        "or remove these step directories to start over, or use a new --workdir."
    )


def damaged_dir(checkpoints: str) -> str:
    """Where damaged steps of ``<workdir>/checkpoints`` are moved: a sibling directory."""
    return paths.sibling(checkpoints, DAMAGED_DIRNAME)


def _move_aside(manager: ocp.CheckpointManager, damaged, resumed: int) -> None:
    """Moves damaged step directories out of orbax's sight (process 0 only), then reloads.

    One warning per step names it, the reason, where it went and the step resumed instead.
    """
    multihost = jax.process_count() > 1
    if multihost:
        multihost_utils.sync_global_devices("dil_jax.checkpointing:move_aside:pre")
    if jax.process_index() == 0:
        aside = damaged_dir(str(manager.directory))
        paths.makedirs(aside)
        for step, damage in damaged:
            dest = paths.join(aside, f"{step}-{damage.tag}")
            n = 1
            while paths.exists(dest):
                n += 1
                dest = paths.join(aside, f"{step}-{damage.tag}-{n}")
            paths.move(paths.join(str(manager.directory), str(step)), dest)
            logging.warning(
                "checkpoint step %d in %s is damaged (%s): moved it to %s and resumed from step %d",
                step,
                manager.directory,
                damage.reason,
                dest,
                resumed,
            )
    if multihost:
        multihost_utils.sync_global_devices("dil_jax.checkpointing:move_aside:post")
    manager.reload()


def _abstract(x, s):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
