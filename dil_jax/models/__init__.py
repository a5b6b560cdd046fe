"""Flax ports of Hugging Face causal LMs, one family per file.

Layering, bottom up: `family.py` (the `Family` record and HF tensor-map vocabulary) and
`blocks.py` (the shared decoder skeleton); one file per family (llama.py, gpt_neox.py, gpt2.py,
gemma.py), each ending in `FAMILY = Family(...)`; `registry.py` (families by name and by HF
`model_type`); `hf.py` (HF config mapping, safetensors import/export). This module builds a
model from `config.model` on top of them, so the trainer, sampler and converters never
special-case a family.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax.numpy as jnp

from dil_jax.errors import ConfigError
from dil_jax.models import hf
from dil_jax.models.family import GENERIC_FIELDS, Family
from dil_jax.models.registry import FAMILIES, HF_MODEL_TYPES, family_of, get_family

__all__ = [
    "DTYPES",
    "FAMILIES",
    "GENERIC_FIELDS",
    "HF_MODEL_TYPES",
    "RUNTIME_KEYS",
    "Family",
    "architecture_config",
    "build_model",
    "family_kwargs",
    "family_of",
    "generic_view",
    "get_family",
    "max_positions",
]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# config.model keys that are not architecture fields
RUNTIME_KEYS = ("family", "dtype", "param_dtype", "remat", "scan_layers", "hf_path", "attention")


def family_kwargs(model_cfg, field: str = "config.model") -> dict:
    """``config.model`` without ``hf_path`` -> keyword arguments of the family's config class.

    Generic names are translated (GPT-2's ``n_embd`` ...); a generic field the family has no
    counterpart is ignored (RoPE constants by the learned-position families; a
    ``num_key_value_heads`` below ``num_attention_heads`` with a warning, since GPT-2 and
    GPT-NeoX have no grouped-query attention); any other key must be a field of the family's
    config class (a ConfigError naming it).
    """
    family = model_cfg.family
    if family not in FAMILIES:
        raise ConfigError(f"{field}.family={family!r}: expected one of {sorted(FAMILIES)}")
    cls = get_family(family).config_cls
    names = get_family(family).generic_to_own()
    known = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in model_cfg.items():
        if key in RUNTIME_KEYS or value is None:
            continue
        if key in GENERIC_FIELDS:
            if key in names:
                out[names[key]] = value
            elif key == "num_key_value_heads" and value != model_cfg.get("num_attention_heads"):
                logging.warning(
                    "%s.num_key_value_heads=%s is ignored: family %r has no "
                    "grouped-query attention (every head has its own keys/values)",
                    field,
                    value,
                    family,
                )
            continue
        if key not in known:
            raise ConfigError(
                f"{field}.{key}: not a field of {cls.__name__} (family "
                f"{family!r}); its fields are {sorted(known)}"
            )
        out[key] = value
    return out


def generic_view(family: str, arch) -> dict:
    """The generic fields of a built architecture (``arch``: a family config dataclass)."""
    out = {}
    for generic, own in get_family(family).generic_to_own().items():
        value = getattr(arch, own, None)
        if generic == "intermediate_size" and value is None and family == "gpt2":
            value = 4 * arch.n_embd  # GPT-2's n_inner=None means 4·n_embd
        if value is not None:
            out[generic] = value
    if "num_key_value_heads" not in out and "num_attention_heads" in out:
        out["num_key_value_heads"] = out["num_attention_heads"]
    return out


def architecture_config(model_cfg) -> Any:
    """``config.model`` -> the family's frozen config dataclass (unknown keys raise).

    When ``config.model.hf_path`` is set (a HF model directory or hub id), the architecture is
    that model's config.json (``dil_jax.spec.resolve`` has copied its values into the generic
    fields); ``config.model.family`` must name the same family. Otherwise the generic fields
    are translated to the family's names (:func:`family_kwargs`).
    """
    hf_path = model_cfg.get("hf_path")
    if hf_path:
        family, arch = hf.load_config(hf_path)
        if family != model_cfg.family:
            raise ValueError(
                f"config.model.family={model_cfg.family!r}, but config.model."
                f"hf_path={hf_path!r} is a {family!r} model"
            )
        return arch
    family = get_family(model_cfg.family)
    try:
        return family.config_cls(**family_kwargs(model_cfg))
    except (TypeError, ValueError) as e:  # the family's own checks, e.g. heads vs KV heads
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config.model ({family.name}): {e}") from e


def build_model(model_cfg) -> tuple[Any, Family]:
    """Returns ``(module, family)`` for ``config.model``."""
    for key in ("dtype", "param_dtype"):
        if model_cfg[key] not in DTYPES:
            raise ValueError(
                f"config.model.{key}={model_cfg[key]!r} is not one of {sorted(DTYPES)}"
            )
    family = get_family(model_cfg.family)
    module = family.model_cls(
        architecture_config(model_cfg),
        dtype=DTYPES[model_cfg.dtype],
        param_dtype=DTYPES[model_cfg.param_dtype],
        remat=model_cfg.remat,
        scan_layers=model_cfg.scan_layers,
        attention=model_cfg.get("attention", "auto"),
    )
    return module, family


def max_positions(arch_config) -> int:
    """The longest sequence a family's config supports (GPT-2 calls it ``n_positions``)."""
    return family_of(arch_config).max_positions(arch_config)
