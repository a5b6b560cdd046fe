"""Tests for dil_jax.models.gpt_neox: invariances, cache, packing, conversion, HF parity."""

import dataclasses

import family_checks as fc
import pytest

from dil_jax.models import gpt_neox
from dil_jax.models.gpt_neox import GPTNeoXConfig, GPTNeoXForCausalLM

# Partial rotary (8 of 16 dims per head); the same config serves the random-param and the
# HF-parity tests so their jitted forwards are shared.
CFG = GPTNeoXConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    rotary_pct=0.5,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=127,
    pad_token_id=0,
)
SCANNED = "gpt_neox/layers"


@pytest.fixture(scope="module")
def tiny():
    model = GPTNeoXForCausalLM(CFG)
    return model, fc.random_params(model)


def test_config_round_trip_and_validation():
    assert GPTNeoXConfig.from_dict(CFG.to_dict()) == CFG
    assert CFG.head_dim == 16 and CFG.rotary_ndims == 8
    with pytest.raises(ValueError, match="bogus"):
        GPTNeoXConfig.from_dict({**CFG.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="hidden_act"):
        dataclasses.replace(CFG, hidden_act="swish")
    # transformers v4 (rotary_pct, rotary_emb_base) and v5 (rope_parameters) layouts.
    v4 = {**CFG.to_dict(), "model_type": "gpt_neox", "rotary_pct": 0.25, "rotary_emb_base": 1e4}
    assert GPTNeoXConfig.from_hf(v4).rotary_ndims == 4
    v5 = {k: v for k, v in v4.items() if k not in ("rotary_pct", "rotary_emb_base")}
    v5["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 500.0,
        "partial_rotary_factor": 1.0,
    }
    assert GPTNeoXConfig.from_hf(v5).rotary_emb_base == 500.0
    assert GPTNeoXConfig.from_hf(v5).rotary_ndims == 16
    with pytest.raises(ValueError, match="rope_scaling"):
        GPTNeoXConfig.from_hf({**v4, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="model_type"):
        GPTNeoXConfig.from_hf({**v4, "model_type": "gptj"})


def test_invariances(tiny):
    """Head contract, scan == unrolled, cache decode == full, packing == separate."""
    model, params = tiny
    ref = fc.check_outputs_and_head(gpt_neox.FAMILY, model, params, CFG.vocab_size, CFG.hidden_size)
    fc.check_scan_unrolled_remat(
        GPTNeoXForCausalLM, CFG, params, CFG.vocab_size, SCANNED, CFG.num_hidden_layers, ref
    )
    fc.check_cache_decode(model, params, CFG.vocab_size, ref)
    fc.check_segments(model, params, CFG.vocab_size)


def test_partition_rules_cover_every_param():
    fc.check_partition_rules(gpt_neox.FAMILY, GPTNeoXForCausalLM, CFG)
    fc.check_partition_rules(
        gpt_neox.FAMILY, GPTNeoXForCausalLM, dataclasses.replace(CFG, tie_word_embeddings=True)
    )


def test_converter_round_trip_and_errors(tiny):
    _, params = tiny
    sd = fc.check_converter(gpt_neox.FAMILY, CFG, params, SCANNED, CFG.num_hidden_layers)
    assert "embed_out.weight" in sd  # the hub checkpoints' name
    # transformers v5 calls the head lm_head in memory; old checkpoints carry mask buffers.
    extra = {
        "lm_head.weight": sd.pop("embed_out.weight"),
        "gpt_neox.layers.0.attention.bias": 0,
        "gpt_neox.layers.0.attention.masked_bias": 0,
    }
    fc.hf_params(gpt_neox.FAMILY, {**sd, **extra}, CFG)


def _hf_model(cfg):
    import torch
    import transformers

    torch.manual_seed(0)
    hf_cfg = transformers.AutoConfig.for_model(**{**cfg.to_hf(), "initializer_range": 0.3})
    hf = transformers.GPTNeoXForCausalLM(hf_cfg).eval().float()
    fc.perturb_torch_params(hf)
    assert GPTNeoXConfig.from_hf(hf_cfg.to_dict()) == cfg
    return hf


@pytest.mark.torch
def test_hf_parity():
    """Parallel residual: logits and greedy generation; sequential residual: logits."""
    fc.check_hf_parity(
        gpt_neox.FAMILY, GPTNeoXForCausalLM(CFG), _hf_model(CFG), vocab=128, eos=127, pad=0
    )
    seq = dataclasses.replace(CFG, use_parallel_residual=False)
    fc.check_hf_parity(
        gpt_neox.FAMILY,
        GPTNeoXForCausalLM(seq),
        _hf_model(seq),
        vocab=128,
        eos=127,
        pad=0,
        generate=False,
    )


@pytest.mark.torch
def test_hf_export_loads_in_transformers(tiny, tmp_path):
    """Exported as `embed_out.weight` (the hub name), which transformers v5 renames."""
    model, params = tiny
    fc.check_hf_export("gpt_neox", model, params, tmp_path)


@pytest.mark.torch
def test_to_hf_round_trip():
    for cfg in (
        CFG,
        dataclasses.replace(
            CFG, use_parallel_residual=False, tie_word_embeddings=True, attention_bias=False
        ),
    ):
        hf_cfg = fc.check_hf_config_round_trip(
            gpt_neox.FAMILY, GPTNeoXConfig, GPTNeoXForCausalLM, cfg
        )
        assert hf_cfg.rope_parameters["partial_rotary_factor"] == cfg.rotary_pct
