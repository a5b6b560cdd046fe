"""Tests for dil_jax.models.gpt2: invariances, cache, packing, conversion, HF parity."""

import dataclasses

import family_checks as fc
import numpy as np
import pytest

from dil_jax.models import gpt2
from dil_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel

# The same config serves the random-param and the HF-parity tests (shared jitted forwards).
CFG = GPT2Config(
    vocab_size=128,
    n_embd=64,
    n_layer=2,
    n_head=4,
    n_positions=48,
    bos_token_id=1,
    eos_token_id=127,
    pad_token_id=0,
)
SCANNED = "transformer/h"


@pytest.fixture(scope="module")
def tiny():
    model = GPT2LMHeadModel(CFG)
    return model, fc.random_params(model)


def test_config_round_trip_and_validation():
    assert GPT2Config.from_dict(CFG.to_dict()) == CFG
    assert (CFG.hidden_size, CFG.num_hidden_layers, CFG.intermediate_size, CFG.head_dim) == (
        64,
        2,
        256,
        16,
    )
    with pytest.raises(ValueError, match="bogus"):
        GPT2Config.from_dict({**CFG.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="activation_function"):
        dataclasses.replace(CFG, activation_function="swiglu")
    hf = {**CFG.to_hf(), "n_ctx": 48}
    assert GPT2Config.from_hf(hf) == CFG
    with pytest.raises(ValueError, match="add_cross_attention"):
        GPT2Config.from_hf({**hf, "add_cross_attention": True})
    with pytest.raises(ValueError, match="model_type"):
        GPT2Config.from_hf({**hf, "model_type": "gpt_bigcode"})
    with pytest.raises(ValueError, match="n_positions"):
        GPT2LMHeadModel(CFG).init_cache(1, CFG.n_positions + 1)


def test_invariances(tiny):
    """Head contract, scan == unrolled == remat, cache decode == full, packing == separate."""
    model, params = tiny
    ref = fc.check_outputs_and_head(gpt2.FAMILY, model, params, CFG.vocab_size, CFG.n_embd)
    fc.check_scan_unrolled_remat(
        GPT2LMHeadModel, CFG, params, CFG.vocab_size, SCANNED, CFG.n_layer, ref
    )
    fc.check_cache_decode(model, params, CFG.vocab_size, ref)
    fc.check_segments(model, params, CFG.vocab_size)


def test_partition_rules_cover_every_param():
    fc.check_partition_rules(gpt2.FAMILY, GPT2LMHeadModel, CFG)
    fc.check_partition_rules(
        gpt2.FAMILY, GPT2LMHeadModel, dataclasses.replace(CFG, tie_word_embeddings=False)
    )


def test_converter_round_trip_and_errors(tiny):
    _, params = tiny
    sd = fc.check_converter(gpt2.FAMILY, CFG, params, SCANNED, CFG.n_layer)
    # Conv1D weights are [in, out]: the same arrays as our kernels, no transpose.
    np.testing.assert_array_equal(
        sd["transformer.h.0.attn.c_attn.weight"],
        params["transformer"]["h"]["attn"]["c_attn"]["kernel"][0],
    )
    # Hub files saved from GPT2Model (openai-community/gpt2) have no `transformer.` prefix and
    # carry the old causal-mask buffers; a tied lm_head.weight is ignored.
    bare = {k.removeprefix("transformer."): v for k, v in sd.items()}
    bare.update(
        {"h.0.attn.bias": 0, "h.1.attn.masked_bias": 0, "lm_head.weight": bare["wte.weight"]}
    )
    got = fc.hf_params(gpt2.FAMILY, bare, CFG)
    np.testing.assert_array_equal(
        got["transformer"]["wpe"]["embedding"], params["transformer"]["wpe"]["embedding"]
    )


def _hf_model(cfg):
    import torch
    import transformers

    torch.manual_seed(0)
    hf_cfg = transformers.AutoConfig.for_model(**{**cfg.to_hf(), "initializer_range": 0.3})
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval().float()
    fc.perturb_torch_params(hf)
    assert GPT2Config.from_hf(hf_cfg.to_dict()) == cfg
    return hf


@pytest.mark.torch
def test_hf_parity():
    """Tied head: logits and greedy generation (left padding indexes wpe by real-token
    count); untied head with 1/(layer+1) score scaling: logits."""
    fc.check_hf_parity(gpt2.FAMILY, GPT2LMHeadModel(CFG), _hf_model(CFG), vocab=128, eos=127, pad=0)
    var = dataclasses.replace(
        CFG,
        tie_word_embeddings=False,
        scale_attn_by_inverse_layer_idx=True,
        activation_function="gelu",
    )
    fc.check_hf_parity(
        gpt2.FAMILY, GPT2LMHeadModel(var), _hf_model(var), vocab=128, eos=127, pad=0, generate=False
    )


@pytest.mark.torch
def test_hf_export_loads_in_transformers(tiny, tmp_path):
    model, params = tiny
    fc.check_hf_export("gpt2", model, params, tmp_path)


@pytest.mark.torch
def test_to_hf_round_trip():
    for cfg in (CFG, dataclasses.replace(CFG, tie_word_embeddings=False, n_inner=96)):
        fc.check_hf_config_round_trip(gpt2.FAMILY, GPT2Config, GPT2LMHeadModel, cfg)
