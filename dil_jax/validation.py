"""Value checks of a run spec, before anything is compiled; each error names the field.

``dil_jax.spec.build`` calls :func:`validate` once per run spec: unknown keys and wrong types
are already refused there (and by ``ml_collections``' locked ConfigDicts and the
``--config.a.b=value`` flag parser); this module checks values and their combinations.
"""

from __future__ import annotations

from dil_jax import loop, lora, metrics, objectives, sharding
from dil_jax.afd import checks as afd_checks
from dil_jax.data import checks
from dil_jax.errors import ConfigError
from dil_jax.models import DTYPES, FAMILIES
from dil_jax.online import checks as online_checks

# The loss hyper-parameters are declared once, in dil_jax/objectives.py (PARAMS / LOSSES);
# configs/base.py has exactly these `config.loss` fields (tests/test_objectives_trl.py checks).
LOSS_PARAM_KEYS = objectives.LOSS_PARAM_KEYS
REFERENCE_MODES = ("inline", "precomputed")
INIT_MODES = ("scratch", "pretrain", "checkpoint", "hf")


def loss_terms(loss_cfg) -> tuple[objectives.LossTerm, ...]:
    """``config.loss`` -> validated loss terms (primary + optional sft + extra terms).

    Raises:
      ConfigError naming ``config.loss.<field>`` (or ``config.loss.extra_terms[i].<field>``):
      an unknown loss, a parameter the chosen loss does not use, an invalid value or a
      combination ``objectives.check_combination`` refuses.
    """
    primary = {"name": loss_cfg.name, "weight": loss_cfg.weight}
    primary.update(
        {k: getattr(loss_cfg, k) for k in LOSS_PARAM_KEYS if getattr(loss_cfg, k, None) is not None}
    )
    terms, fields = [primary], ["config.loss"]
    if loss_cfg.sft_weight:
        terms.append({"name": "sft", "weight": loss_cfg.sft_weight})
        fields.append("config.loss.sft_weight")
    for i, t in enumerate(loss_cfg.extra_terms):
        terms.append(dict(t))
        fields.append(f"config.loss.extra_terms[{i}]")
    try:
        return objectives.parse_loss_terms(terms, fields=fields)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _require(ok: bool, field: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"config.{field}={value!r}: {expected}")


def validate(run, *, num_devices: int | None, process_count: int = 1) -> None:
    """Checks a ``spec.RunSpec``; raises ConfigError naming the field of the first bad value.

    ``num_devices=None`` skips what depends on the mesh (host-side uses such as the data
    pipeline); the trainer checks again with its mesh's size.
    """
    try:
        _validate(run, num_devices=num_devices, process_count=process_count)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _validate(config, *, num_devices: int | None, process_count: int) -> None:
    m = config.model
    _require(m.family in FAMILIES, "model.family", m.family, f"expected one of {sorted(FAMILIES)}")
    for key in ("dtype", "param_dtype"):
        value = getattr(m, key)
        _require(value in DTYPES, f"model.{key}", value, f"expected one of {sorted(DTYPES)}")
    terms = config.terms
    dp = 1  # data-parallel size: checked against the mesh when the device count is known
    if num_devices is not None:
        mesh_shape = sharding.resolve_mesh_shape(config.mesh.shape, num_devices)
        dp = mesh_shape[0] * mesh_shape[1]

    _require(
        config.data.source in checks.SOURCES,
        "data.source",
        config.data.source,
        f"expected one of {checks.SOURCES}",
    )
    if config.data.source != "gold_task":
        checks.validate_data_config(config)
    t, o = config.train, config.optim
    _require(t.steps > 0, "train.steps", t.steps, "must be positive")
    _require(o.grad_accum_steps >= 1, "optim.grad_accum_steps", o.grad_accum_steps, "must be >= 1")
    unit = dp * o.grad_accum_steps
    _require(
        t.global_batch_size > 0 and t.global_batch_size % unit == 0,
        "train.global_batch_size",
        t.global_batch_size,
        f"must be a positive multiple of data-parallel size ({dp} = mesh data x fsdp) times "
        f"optim.grad_accum_steps ({o.grad_accum_steps})",
    )
    _require(
        t.global_batch_size % process_count == 0,
        "train.global_batch_size",
        t.global_batch_size,
        f"must divide evenly over {process_count} processes",
    )
    _require(o.learning_rate > 0, "optim.learning_rate", o.learning_rate, "must be positive")
    _require(0 <= o.warmup_ratio < 1, "optim.warmup_ratio", o.warmup_ratio, "must be in [0, 1)")
    _require(
        o.schedule in ("cosine", "linear", "constant"),
        "optim.schedule",
        o.schedule,
        "expected cosine, linear or constant",
    )
    _require(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables)")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _require(
        config.reference.mode in REFERENCE_MODES,
        "reference.mode",
        config.reference.mode,
        f"expected one of {REFERENCE_MODES}",
    )
    if objectives.data_layout(terms) == "unpaired":
        _require(
            config.reference.mode == "inline",
            "reference.mode",
            config.reference.mode,
            "KTO's mismatched completions depend on which examples share a batch, so "
            "their reference log-probs cannot be precomputed; use 'inline'",
        )
    if objectives.needs_reference(terms) and config.reference.mode == "precomputed":
        _require(
            config.reference.batch_size % dp == 0,
            "reference.batch_size",
            config.reference.batch_size,
            f"must be a multiple of data-parallel size {dp}",
        )
    for key in ("seq_chunk", "vocab_chunk", "score_buckets"):
        value = getattr(config.logprobs, key)
        _require(value >= 0, f"logprobs.{key}", value, "must be >= 0")
    _require(
        t.on_nonfinite in loop.NONFINITE_POLICIES,
        "train.on_nonfinite",
        t.on_nonfinite,
        f"expected one of {loop.NONFINITE_POLICIES}",
    )
    _require(t.max_nonfinite >= 0, "train.max_nonfinite", t.max_nonfinite, "must be >= 0")
    _require(
        isinstance(t.diagnostics, bool),
        "train.diagnostics",
        t.diagnostics,
        "expected True or False",
    )
    _require(
        t.wandb_mode in metrics.WANDB_MODES,
        "train.wandb_mode",
        t.wandb_mode,
        f"expected one of {metrics.WANDB_MODES}",
    )
    c = config.checkpoint
    _require(c.every_steps > 0, "checkpoint.every_steps", c.every_steps, "must be positive")
    _require(c.keep >= 1, "checkpoint.keep", c.keep, "must be >= 1")
    e = config.eval
    if e.every_steps:
        _require(
            e.batch_size % dp == 0,
            "eval.batch_size",
            e.batch_size,
            f"must be a multiple of data-parallel size {dp}",
        )
    _require(e.temperature >= 0, "eval.temperature", e.temperature, "must be >= 0")
    _require(0 < e.top_p <= 1, "eval.top_p", e.top_p, "must be in (0, 1]")
    i = config.init
    _require(i.mode in INIT_MODES, "init.mode", i.mode, f"expected one of {INIT_MODES}")
    if i.mode == "pretrain":
        _require(
            i.pretrain is not None,
            "init.pretrain",
            i.pretrain,
            "init.mode='pretrain' needs the pretraining run's config",
        )
        _validate(i.pretrain, num_devices=num_devices, process_count=process_count)
        _require(
            i.pretrain.model == m,
            "init.pretrain.model",
            "(differs)",
            "must equal config.model: the pretrained params become the policy",
        )
    if i.mode == "hf":
        _require(
            bool(m.hf_path),
            "model.hf_path",
            m.hf_path,
            "init.mode='hf' needs a Hugging Face model directory or hub id",
        )
    if i.mode == "checkpoint":
        _require(
            bool(i.checkpoint_dir),
            "init.checkpoint_dir",
            i.checkpoint_dir,
            "init.mode='checkpoint' needs a workdir to load params from",
        )
    lora.settings_from_config(config.lora)  # None when off; else every field checked
    if config.afd is not None:
        afd_checks.check_afd(config.afd, m, "config.afd")
    if config.online is not None:
        online_checks.check_online(config.online, "config.online")
