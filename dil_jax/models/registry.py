"""Every model family by name: `config.model.family` -> its `Family` record.

The trainer, sampler, data pipeline and HF converters look families up here and never
special-case one. Adding a family is a new file ending in `FAMILY = Family(...)` (see
`family.py`) plus one line below.
"""

from __future__ import annotations

from dil_jax.models import gemma, gpt2, gpt_neox, llama
from dil_jax.models.family import Family

FAMILIES: dict[str, Family] = {
    f.name: f for f in (llama.FAMILY, gpt_neox.FAMILY, gpt2.FAMILY, gemma.FAMILY)
}

# Hugging Face config.json `model_type` -> our family (one module where architectures coincide).
HF_MODEL_TYPES: dict[str, str] = {t: f.name for f in FAMILIES.values() for t in f.hf_model_types}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of(arch_config) -> Family:
    """The family whose config class `arch_config` is."""
    for family in FAMILIES.values():
        if isinstance(arch_config, family.config_cls):
            return family
    raise TypeError(f"{type(arch_config).__name__} is not the config of any model family")
