"""The family registry contract: every registered family is complete and self-consistent.

Abstract shapes only (jax.eval_shape), so this runs in seconds for every family.
"""

import json
import re

import jax
import jax.numpy as jnp
import pytest

from dil_jax import models
from dil_jax.models import blocks
from dil_jax.models.family import Family

# One tiny config per family (every registered family must have one here).
TINY = {
    "llama": dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        mlp_bias=True,
        eos_token_id=[1, 2],
    ),
    "gpt_neox": dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
    ),
    "gpt2": dict(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=False
    ),
    "gemma": dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        model_type="gemma2",
        sliding_window=8,
    ),
}


def _path(key_path) -> str:
    return "/".join(str(k.key) for k in key_path)


def test_every_family_has_a_tiny_config():
    assert set(TINY) == set(models.FAMILIES)


@pytest.mark.parametrize("name", sorted(TINY))
def test_family_contract(name):
    family = models.get_family(name)
    assert isinstance(family, Family) and family.name == name and models.FAMILIES[name] is family
    cfg = family.config_cls(**TINY[name])
    # Config: JSON round trip through to_dict / from_dict; unknown keys are named.
    d = json.loads(json.dumps(cfg.to_dict()))
    assert family.config_cls.from_dict(d) == cfg
    with pytest.raises(ValueError, match="bogus"):
        family.config_cls.from_dict({**d, "bogus": 1})
    assert all(models.HF_MODEL_TYPES[t] == name for t in family.hf_model_types)
    assert cfg.to_hf()["model_type"] in family.hf_model_types
    assert models.max_positions(cfg) == family.max_positions(cfg) > 0

    assert issubclass(family.model_cls, blocks.CausalLM)
    for scan in (True, False):
        model = family.model_cls(cfg, scan_layers=scan)
        params = jax.eval_shape(
            lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
        )["params"]
        leaves = {_path(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
        # Every param matches a partition rule of its rank.
        rules = family.partition_rules()
        for path, leaf in leaves.items():
            specs = [spec for pattern, spec in rules if re.search(pattern, path)]
            assert specs, f"{name}: no partition rule for {path}"
            assert len(specs[0]) == leaf.ndim, (path, specs[0], leaf.shape)
        # The HF tensor map names every param exactly once, and nothing else.
        assert set(family.hf_tensor_map(cfg, scan_layers=scan)) == set(leaves)
        # The head: [D, V], and the KV cache needs no params.
        kernel = jax.eval_shape(family.lm_head_kernel, params)
        assert kernel.shape == (cfg.hidden_size, cfg.vocab_size)
        cache = model.init_cache(2, 8)
        assert cache.k.shape == (cfg.num_hidden_layers, 2, 8, cfg.num_key_value_heads, cfg.head_dim)
    assert isinstance(family.ignored_hf_keys(cfg), tuple)
    assert isinstance(family.hf_key_aliases(cfg), tuple)


def test_unknown_family_is_named():
    with pytest.raises(ValueError, match="'nope'"):
        models.get_family("nope")
