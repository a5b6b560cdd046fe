"""The resolved run spec: a config file's ``ConfigDict`` turned, once, into frozen typed records.

:func:`build` is the one door from configuration into the library. It

1. resolves every model section (:func:`resolve`): with ``model.hf_path`` the architecture comes
   from that model's ``config.json`` and *replaces* the generic fields (``vocab_size``,
   ``hidden_size``, ...), so the data pipeline's vocabulary check, reward heads and checkpoints
   never see a stale Llama-shaped default (``model.family`` is filled in from the checkpoint
   when left at the base default, and must agree otherwise); without it, the generic fields are
   translated to the family's own names (``model.family='gpt2'`` alone trains a GPT-2 of the
   base config's size), and a field the family cannot express is an error naming it;
2. freezes each section into the dataclass below (:class:`RunSpec` and its sections; an unknown
   field or a value of the wrong type is a :class:`~dil_jax.errors.ConfigError` naming it);
3. validates values and their combinations (``dil_jax.validation``, the one place that does),
   including the loss terms (hyper-parameters declared once, in ``objectives.PARAMS``; one the
   chosen loss does not use is an error) and the AfD sections.

Downstream code (``train.Trainer``, the data pipeline, the reference cache, evaluation, the AfD
stages) reads a :class:`RunSpec`; the public entry points also accept a ``ConfigDict`` and
build the spec themselves. The spec keeps the resolved config's plain-dict form
(:meth:`RunSpec.to_dict`) for checkpoint metadata and the resume check.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from dil_jax import validation
from dil_jax.errors import ConfigError
from dil_jax.models import GENERIC_FIELDS, RUNTIME_KEYS, family_kwargs, hf
from dil_jax.models import generic_view as _generic_view

# Model sections nested in a run config (dotted paths), resolved like config.model.
NESTED_MODEL_SECTIONS = ("init.pretrain.model", "afd.adversarial.disc_model")


# ----------------------------------------------------------------------------- resolving


def resolve_model(model_cfg, field: str = "config.model") -> ml_collections.ConfigDict:
    """One model section resolved (see the module doc); returns a new locked ConfigDict."""
    m = ml_collections.ConfigDict(model_cfg.to_dict())
    if m.get("hf_path"):
        try:
            family, arch = hf.load_config(m.hf_path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{field}.hf_path={m.hf_path!r}: {e}") from e
        if family != m.family:
            base_default = m.family == "llama"
            if not base_default:
                raise ConfigError(
                    f"{field}.family={m.family!r}, but {field}.hf_path="
                    f"{m.hf_path!r} is a {family!r} model"
                )
            m.family = family
        for key, value in _generic_view(family, arch).items():
            if key in m:
                m[key] = type(m[key])(value) if m[key] is not None else value
    else:
        family_kwargs(m, field)  # raises on fields the family cannot express
    m.lock()
    return m


def model_spec(model_cfg, field: str = "config.model") -> ModelSpec:
    """A model section (ConfigDict or ModelSpec) resolved and frozen."""
    return ModelSpec.from_config(resolve_model(model_cfg, field), field)


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return None
        node = node[part]
    return node


def resolve(config) -> ml_collections.ConfigDict:
    """A copy of ``config`` with every model section resolved (idempotent)."""
    if isinstance(config, RunSpec):
        raise TypeError("spec.resolve takes a ConfigDict; a RunSpec is already resolved")
    out = ml_collections.ConfigDict(config.to_dict())
    out.model = resolve_model(out.model)
    for dotted in NESTED_MODEL_SECTIONS:
        section = _get(out, dotted)
        if isinstance(section, ml_collections.ConfigDict):
            parent, name = dotted.rsplit(".", 1)
            _get(out, parent)[name] = resolve_model(section, f"config.{dotted}")
    pretrain = _get(out, "init.pretrain")
    if isinstance(pretrain, ml_collections.ConfigDict) and "model" in pretrain:
        out.init.pretrain = resolve(pretrain)
    out.lock()
    return out


# ----------------------------------------------------------------------------- freezing


def frozen(value):
    """A config value made immutable: ConfigDicts/dicts -> read-only mappings, lists -> tuples."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: frozen(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(frozen(v) for v in value)
    return value


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple or hint is tuple:
        return isinstance(value, tuple)
    if origin is Mapping or hint is Mapping:
        return isinstance(value, Mapping)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def freeze_section(cls, section, field: str):
    """``section`` (a ConfigDict or mapping) -> ``cls(...)``, every field checked.

    Raises:
      ConfigError naming ``<field>.<key>``: a key ``cls`` does not declare, a declared field
      without a default that the section lacks, or a value of the wrong type.
    """
    if section is None:
        raise ConfigError(f"{field}: the section is missing")
    items = dict(section.items())
    hints = typing.get_type_hints(cls)
    declared = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(items) - set(declared))
    if unknown:
        raise ConfigError(
            f"{field}.{unknown[0]}: not a field of this section; its fields are {sorted(declared)}"
        )
    kwargs = {}
    for name, f in declared.items():
        if name not in items:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{field}.{name}: missing")
            continue
        value = frozen(items[name])
        if isinstance(hints[name], type) and hints[name] is float and isinstance(value, int):
            value = float(value)
        if not _type_ok(value, hints[name]):
            expected = getattr(hints[name], "__name__", hints[name])
            raise ConfigError(f"{field}.{name}={value!r}: expected {expected}")
        kwargs[name] = value
    return cls(**kwargs)


def thaw(value):
    """The inverse of :func:`frozen` for JSON: mappings -> dicts, tuples -> lists."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


class Section:
    """Mixin of the spec records: ``to_dict()`` as plain JSON-able values."""

    def to_dict(self) -> dict:
        return {
            f.name: thaw(getattr(self, f.name))
            if not dataclasses.is_dataclass(getattr(self, f.name))
            else getattr(self, f.name).to_dict()
            for f in dataclasses.fields(self)
            if f.init
        }


# ----------------------------------------------------------------------------- the sections
# Field meanings are documented once, beside their defaults in configs/base.py.


@dataclasses.dataclass(frozen=True)
class ModelSpec(Section):
    """``config.model``: the architecture to build (after :func:`resolve_model`)."""

    family: str
    dtype: str
    param_dtype: str
    remat: bool = False
    scan_layers: bool = True
    hf_path: str | None = None
    attention: str = "auto"  # the attention kernel (models/attention.IMPLEMENTATIONS)
    # generic architecture fields (family-independent names); None: not given
    vocab_size: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    max_position_embeddings: int | None = None
    rope_theta: float | None = None
    rms_norm_eps: float | None = None
    tie_word_embeddings: bool | None = None
    # fields in the family's own names (GPT-2's n_embd, Gemma's query_pre_attn_scalar ...)
    own: Mapping[str, Any] = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))

    @classmethod
    def from_config(cls, section, field: str = "config.model") -> ModelSpec:
        items = dict(section.items())
        known = {f.name for f in dataclasses.fields(cls)} - {"own"}
        own = {k: v for k, v in items.items() if k not in known}
        base = {k: v for k, v in items.items() if k in known}
        return freeze_section(cls, dict(base, own=own), field)

    def to_dict(self) -> dict:
        d = {k: v for k, v in super().to_dict().items() if k != "own"}
        d.update(thaw(self.own))
        return d

    # The model builders read a section mapping-style; a spec answers like one.
    def get(self, key: str, default=None):
        if key in GENERIC_FIELDS or key in RUNTIME_KEYS:
            value = getattr(self, key)
            return default if value is None else value
        return self.own.get(key, default)

    def items(self):
        return self.to_dict().items()

    def __getitem__(self, key: str):
        value = self.get(key)
        if value is None and key not in self.to_dict():
            raise KeyError(key)
        return value

    def __contains__(self, key: str) -> bool:
        return key in self.to_dict()


@dataclasses.dataclass(frozen=True)
class DataSpec(Section):
    """``config.data``: where examples come from, how they are tokenised and batched."""

    source: str
    format: str
    response_source: str
    num_train: int
    num_eval: int
    seed: int
    train_files: tuple
    eval_files: tuple
    rejected_files: tuple
    hub_id: str
    hub_config: str
    hub_revision: str
    hub_data_dir: str
    train_split: str
    eval_split: str
    max_records: int
    field_map: Mapping[str, str]
    tokenizer: str
    eos_token: str
    chat_template: str
    prompt_template: str
    response_template: str
    max_length: int
    max_prompt_length: int
    truncation_mode: str
    too_long: str
    boundary_mismatch: str
    on_bad_record: str
    buckets: tuple
    packing: bool
    cache_dir: str
    num_proc: int
    prefix_sharing: bool = False  # [prompt | chosen | rejected] rows (data/batching.py)


@dataclasses.dataclass(frozen=True)
class LossSpec(Section):
    """``config.loss`` as written (the validated terms are ``RunSpec.terms``)."""

    name: str
    weight: float
    sft_weight: float
    extra_terms: tuple
    beta: float | None = None
    reduction: str | None = None
    label_smoothing: float | None = None
    gamma: float | None = None
    lam: float | None = None
    alpha: float | None = None
    divergence: str | None = None
    max_log_ratio: float | None = None
    tau: float | None = None
    desirable_weight: float | None = None
    undesirable_weight: float | None = None


@dataclasses.dataclass(frozen=True)
class ReferenceSpec(Section):
    mode: str
    cache_dir: str
    batch_size: int


@dataclasses.dataclass(frozen=True)
class LoraSpec(Section):
    """``config.lora`` (values checked by ``dil_jax.lora.settings_from_config``, which
    ``validation.validate`` calls)."""

    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple = ()
    quantize: str = "none"
    quant_block_size: int = 64
    base_fingerprint: str | None = None  # set by a LoRA run (the base it trains on)

    def get(self, key: str, default=None):
        return getattr(self, key, default)


@dataclasses.dataclass(frozen=True)
class LogprobsSpec(Section):
    seq_chunk: int
    vocab_chunk: int
    # configs/base.py sets 8; a config written before the field existed keeps its old head.
    score_buckets: int = 0


@dataclasses.dataclass(frozen=True)
class OptimSpec(Section):
    learning_rate: float
    schedule: str
    warmup_ratio: float
    end_lr_factor: float
    weight_decay: float
    b1: float
    b2: float
    eps: float
    grad_clip: float
    grad_accum_steps: int


@dataclasses.dataclass(frozen=True)
class MeshSpec(Section):
    shape: tuple
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointSpec(Section):
    every_steps: int
    keep: int
    async_save: bool


@dataclasses.dataclass(frozen=True)
class TrainSpec(Section):
    steps: int
    global_batch_size: int
    log_every: int
    progress_bar: bool
    tensorboard: bool
    on_nonfinite: str
    max_nonfinite: int
    diagnostics: bool
    wandb_project: str = ""
    wandb_entity: str = ""
    wandb_mode: str = ""


@dataclasses.dataclass(frozen=True)
class EvalSpec(Section):
    every_steps: int
    batch_size: int
    num_batches: int
    gold_prompts: int
    temperature: float
    top_p: float
    top_k: int


@dataclasses.dataclass(frozen=True)
class InitSpec(Section):
    mode: str
    checkpoint_dir: str
    pretrain: RunSpec | None = None


# ---- the AfD pipeline (config.afd; defaults in dil_jax/afd/*.default_config)


@dataclasses.dataclass(frozen=True)
class ClassifierSpec(Section):
    """``afd.reward_model`` / ``afd.adversarial.disc``: a reward model or discriminator run."""

    loss: str
    level: str
    init: str
    steps: int
    global_batch_size: int
    learning_rate: float
    warmup_ratio: float
    weight_decay: float
    grad_clip: float
    eval_fraction: float
    log_every: int
    checkpoint_every: int
    keep: int
    async_save: bool
    on_nonfinite: str = "halt"


@dataclasses.dataclass(frozen=True)
class SamplingSpec(Section):
    """``afd.sampling``: the KV-cache sampler's settings for rollouts."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    eos_id: int
    pad_id: int
    max_batch: int


@dataclasses.dataclass(frozen=True)
class SftStageSpec(Section):
    steps: int
    learning_rate: float
    global_batch_size: int
    reduction: str


@dataclasses.dataclass(frozen=True)
class BonSpec(Section):
    n_values: tuple
    num_prompts: int
    subsets: int


@dataclasses.dataclass(frozen=True)
class AdversarialSpec(Section):
    """``afd.adversarial``: reverse-KL imitation by a discriminator and REINFORCE."""

    steps: int
    prompts_per_step: int
    samples_per_prompt: int
    reward: str
    beta: float
    learning_rate: float
    warmup_ratio: float
    grad_clip: float
    max_abs_logit: float
    match_lengths: bool
    checkpoint_every: int
    keep: int
    async_save: bool
    log_every: int
    seed: int
    disc: ClassifierSpec
    disc_model: ModelSpec | None = None  # None: the discriminator has the policy's architecture


@dataclasses.dataclass(frozen=True)
class AfdSpec(Section):
    """``config.afd``: the AfD pipeline's stages (dil_jax/afd/extrapolation.py)."""

    demonstrations: Mapping[str, Any]  # overrides of config.data for the demonstrations
    preferences: Mapping[str, Any]  # ... and for the preference pairs
    sft: SftStageSpec
    rm_prompts: int
    rm_backbone: str
    reward_models: tuple
    reward_model: ClassifierSpec
    bon: BonSpec
    sampling: SamplingSpec
    adversarial: AdversarialSpec

    @classmethod
    def from_config(cls, section, field: str = "config.afd") -> AfdSpec:
        nested = {
            "sft": SftStageSpec,
            "reward_model": ClassifierSpec,
            "bon": BonSpec,
            "sampling": SamplingSpec,
        }
        items = dict(section.items())
        for name, sub in nested.items():
            if name in items:
                items[name] = freeze_section(sub, items[name], f"{field}.{name}")
        adv = dict(items.get("adversarial", {}).items())
        if "disc" in adv:
            adv["disc"] = freeze_section(ClassifierSpec, adv["disc"], f"{field}.adversarial.disc")
        if adv.get("disc_model") is not None:
            adv["disc_model"] = ModelSpec.from_config(
                adv["disc_model"], f"{field}.adversarial.disc_model"
            )
        if "adversarial" in items:
            items["adversarial"] = freeze_section(AdversarialSpec, adv, f"{field}.adversarial")
        return freeze_section(cls, items, field)


# ---- iterative / online alignment (config.online; dil_jax/online/iterative.py)


@dataclasses.dataclass(frozen=True)
class OnlineSpec(Section):
    """``config.online``: rounds of sample -> build pairs -> train (configs/base.py)."""

    rounds: int
    steps_per_round: int
    num_prompts: int
    samples_per_prompt: int
    pairs: str
    ditto_mix: tuple
    num_pairs: int
    rank_by: str
    reward_model_dir: str
    reward_model_level: str
    demo_source: str
    match_lengths: bool
    reference: str
    soft_alpha: float
    soft_every: int
    eval_prompts: int
    sampling: SamplingSpec

    @property
    def pairs_per_round(self) -> int:
        return self.num_pairs or self.num_prompts * self.samples_per_prompt

    @classmethod
    def from_config(cls, section, field: str = "config.online") -> OnlineSpec:
        items = dict(section.items())
        if "sampling" in items:
            items["sampling"] = freeze_section(SamplingSpec, items["sampling"], f"{field}.sampling")
        out = freeze_section(cls, items, field)
        try:  # the DITTO shares as floats, whatever numbers the config wrote
            mix = tuple(float(x) for x in out.ditto_mix)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{field}.ditto_mix={out.ditto_mix!r}: expected numbers") from e
        return dataclasses.replace(out, ditto_mix=mix)


@dataclasses.dataclass(frozen=True)
class RunSpec(Section):
    """A whole run, resolved and validated: what every component reads."""

    seed: int
    model: ModelSpec
    data: DataSpec
    loss: LossSpec
    reference: ReferenceSpec
    logprobs: LogprobsSpec
    optim: OptimSpec
    mesh: MeshSpec
    checkpoint: CheckpointSpec
    train: TrainSpec
    eval: EvalSpec
    init: InitSpec
    afd: AfdSpec | None = None  # the AfD pipeline's sections; None for a preference run
    lora: LoraSpec = dataclasses.field(default_factory=LoraSpec)  # adapters (dil_jax/lora.py)
    online: OnlineSpec | None = None  # the iterative loop's rounds (dil_jax/online/)
    # Derived once: the validated loss terms (objectives.LossTerm) and the resolved config's
    # plain-dict form (checkpoint metadata, the resume check).
    terms: tuple = dataclasses.field(default=(), compare=False)
    recorded: Mapping = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict:
        """The resolved config as plain values (what checkpoints record)."""
        return json.loads(json.dumps(thaw(self.recorded)))

    def to_json_best_effort(self, **kwargs) -> str:
        return json.dumps(thaw(self.recorded), **kwargs)


_SECTIONS = {
    "data": DataSpec,
    "loss": LossSpec,
    "reference": ReferenceSpec,
    "logprobs": LogprobsSpec,
    "optim": OptimSpec,
    "mesh": MeshSpec,
    "checkpoint": CheckpointSpec,
    "train": TrainSpec,
    "eval": EvalSpec,
}


def _freeze_run(config, field: str = "config") -> RunSpec:
    """A resolved ``ConfigDict`` -> :class:`RunSpec` (types checked, values not yet)."""
    top = set(config.keys())
    known = {"seed", "model", "init", "afd", "lora", "online", *_SECTIONS}
    unknown = sorted(top - known)
    if unknown:
        raise ConfigError(f"{field}.{unknown[0]}: not a section of a run config ({sorted(known)})")
    sections = {
        name: freeze_section(cls, config[name], f"{field}.{name}")
        for name, cls in _SECTIONS.items()
    }
    init_cfg = config.init
    pretrain = init_cfg.get("pretrain")
    init = freeze_section(
        InitSpec,
        {"mode": init_cfg.mode, "checkpoint_dir": init_cfg.checkpoint_dir},
        f"{field}.init",
    )
    if isinstance(pretrain, ml_collections.ConfigDict):
        init = dataclasses.replace(init, pretrain=_freeze_run(pretrain, f"{field}.init.pretrain"))
    afd = None
    if config.get("afd") is not None:
        afd = AfdSpec.from_config(config.afd, f"{field}.afd")
    lora = LoraSpec()
    if config.get("lora") is not None:
        lora = freeze_section(LoraSpec, config.lora, f"{field}.lora")
    online = None
    if config.get("online") is not None:
        online = OnlineSpec.from_config(config.online, f"{field}.online")
    return RunSpec(
        lora=lora,
        online=online,
        seed=int(config.seed),
        model=ModelSpec.from_config(config.model, f"{field}.model"),
        init=init,
        afd=afd,
        terms=validation.loss_terms(sections["loss"]),
        recorded=json.loads(config.to_json_best_effort()),
        **sections,
    )


def _process_count(num_devices: int | None, process_count: int | None) -> int:
    """The process count the checks divide by. A host-side build (no device count) must not
    touch jax: the multi-host runtime is initialised after the spec is built, and any backend
    query before ``jax.distributed.initialize`` would start a single-process backend."""
    if process_count is not None:
        return process_count
    return 1 if num_devices is None else jax.process_count()


def build(config, *, num_devices: int | None = None, process_count: int | None = None) -> RunSpec:
    """``ConfigDict`` -> resolved, frozen, validated :class:`RunSpec` (a RunSpec passes through,
    re-validated for the given device count).

    Args:
      num_devices: the mesh's device count, which the batch sizes must divide into; None
        skips those checks (``train.Trainer`` makes them with its mesh).
      process_count: default ``jax.process_count()`` when ``num_devices`` is given, else 1.
    Raises:
      ConfigError naming the first bad field.
    """
    run = config if isinstance(config, RunSpec) else _freeze_run(resolve(config))
    validation.validate(
        run,
        num_devices=num_devices,
        process_count=_process_count(num_devices, process_count),
    )
    return run


def as_spec(config) -> RunSpec:
    """A RunSpec as is; a ConfigDict built into one (:func:`build`): the public entry points
    take either."""
    return config if isinstance(config, RunSpec) else build(config)
