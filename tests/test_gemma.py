"""Tests for dil_jax.models.gemma (Gemma 1 and 2): invariances, cache, packing, local
attention, conversion, HF parity."""

import dataclasses

import family_checks as fc
import jax.numpy as jnp
import numpy as np
import pytest

from dil_jax.models import gemma
from dil_jax.models.gemma import GemmaConfig, GemmaForCausalLM

# Gemma 2 with every feature on and a window (4) much shorter than the test sequences (12;
# 38 when generating), so local layers (0 and 2) really drop keys. The same config serves the
# random-param and HF-parity tests (shared jitted forwards).
CFG2 = GemmaConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    model_type="gemma2",
    query_pre_attn_scalar=20,
    attn_logit_softcapping=5.0,
    final_logit_softcapping=10.0,
    sliding_window=4,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=127,
    pad_token_id=0,
)
# Gemma 1 with multi-query attention (one kv head).
CFG1 = GemmaConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=24,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=127,
    pad_token_id=0,
)
SCANNED = "model/layers"


@pytest.fixture(scope="module")
def tiny():
    model = GemmaForCausalLM(CFG2)
    return model, fc.random_params(model)


def test_config_round_trip_and_validation():
    assert GemmaConfig.from_dict(CFG2.to_dict()) == CFG2
    assert CFG2.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert GemmaForCausalLM(CFG2).logit_softcap == 10.0
    assert GemmaForCausalLM(CFG1).logit_softcap is None
    with pytest.raises(ValueError, match="bogus"):
        GemmaConfig.from_dict({**CFG2.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        dataclasses.replace(CFG1, final_logit_softcapping=30.0)  # a Gemma 2 feature
    with pytest.raises(ValueError, match="layer_types"):
        dataclasses.replace(CFG2, layer_types=("full_attention",))
    hf2 = CFG2.to_hf()
    assert GemmaConfig.from_hf(hf2) == CFG2
    with pytest.raises(ValueError, match="model_type"):
        GemmaConfig.from_hf({**hf2, "model_type": "gemma3_text"})
    with pytest.raises(ValueError, match="rope_"):
        GemmaConfig.from_hf({**hf2, "rope_parameters": {"rope_type": "linear", "factor": 8.0}})
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        GemmaConfig.from_hf({**hf2, "use_bidirectional_attention": True})
    # Gemma 1 configs say hidden_act='gelu' and mean the tanh approximation.
    hf1 = {**CFG1.to_hf(), "hidden_act": "gelu"}
    assert GemmaConfig.from_hf(hf1).hidden_activation == "gelu_pytorch_tanh"
    # Fields a hand-written Gemma 2 config leaves out take transformers' defaults.
    sparse = {
        k: hf2[k]
        for k in (
            "model_type",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        )
    }
    full = GemmaConfig.from_hf(sparse)
    assert (full.sliding_window, full.final_logit_softcapping, full.head_dim) == (4096, 30.0, 256)


def test_invariances(tiny):
    """Head contract (with the final softcap), scan == unrolled == remat, cache decode ==
    full (past the window), packing == separate."""
    model, params = tiny
    ref = fc.check_outputs_and_head(gemma.FAMILY, model, params, CFG2.vocab_size, CFG2.hidden_size)
    fc.check_scan_unrolled_remat(
        GemmaForCausalLM,
        CFG2,
        params,
        CFG2.vocab_size,
        SCANNED,
        CFG2.num_hidden_layers,
        ref,
        remat=True,
    )
    fc.check_cache_decode(model, params, CFG2.vocab_size, ref)
    fc.check_segments(model, params, CFG2.vocab_size)
    assert np.abs(ref).max() < CFG2.final_logit_softcapping


def test_sliding_window_is_local(tiny):
    """Changing a token moves a local-only model's outputs only within the window."""
    _, params = tiny
    local = dataclasses.replace(CFG2, layer_types=("sliding_attention",) * 3)
    model = GemmaForCausalLM(local)
    x, mask = fc.batch(CFG2.vocab_size)
    changed = x.copy()
    changed[:, 2] = (x[:, 2] + 1) % CFG2.vocab_size
    a, _ = fc.fwd(model, params, x, mask)
    b, _ = fc.fwd(model, params, changed, mask)
    diff = np.abs(np.asarray(a) - np.asarray(b)).max(axis=(0, 2))  # [T]
    # Causal: nothing before token 2 moves; its own window (positions 2..5) does.
    assert (diff[:2] == 0).all() and (diff[2:6] > 1e-4).all()
    # One local layer of window 4: position 6 no longer sees token 2, so nothing from 6 on
    # moves (three layers would carry the change 3 positions further each).
    one_layer = dataclasses.replace(local, num_hidden_layers=1, layer_types=None)
    p1 = fc.random_params(GemmaForCausalLM(one_layer))
    a, _ = fc.fwd(GemmaForCausalLM(one_layer), p1, x, mask)
    b, _ = fc.fwd(GemmaForCausalLM(one_layer), p1, changed, mask)
    diff = np.abs(np.asarray(a) - np.asarray(b)).max(axis=(0, 2))
    assert (diff[2:6] > 1e-4).all() and (diff[6:] == 0).all() and (diff[:2] == 0).all()


def test_bf16_compute_close(tiny):
    model, params = tiny
    x, mask = fc.batch(CFG2.vocab_size)
    ref, _ = fc.fwd(model, params, x, mask)
    out, _ = fc.fwd(GemmaForCausalLM(CFG2, dtype=jnp.bfloat16), params, x, mask)
    assert out.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out, np.float32) - np.asarray(ref))
    assert err.mean() < 0.03 * np.abs(np.asarray(ref)).mean()
    assert err.max() < 0.1 * np.abs(np.asarray(ref)).max()


def test_partition_rules_cover_every_param():
    fc.check_partition_rules(gemma.FAMILY, GemmaForCausalLM, CFG2)
    fc.check_partition_rules(
        gemma.FAMILY,
        GemmaForCausalLM,
        dataclasses.replace(CFG1, tie_word_embeddings=False, attention_bias=True),
    )


def test_converter_round_trip_and_errors(tiny):
    _, params = tiny
    sd = fc.check_converter(gemma.FAMILY, CFG2, params, SCANNED, CFG2.num_hidden_layers)
    assert "model.layers.2.pre_feedforward_layernorm.weight" in sd
    assert "lm_head.weight" not in sd  # tied
    fc.hf_params(gemma.FAMILY, {**sd, "lm_head.weight": sd["model.embed_tokens.weight"]}, CFG2)


def _hf_model(cfg):
    import torch
    import transformers

    torch.manual_seed(0)
    hf_cfg = transformers.AutoConfig.for_model(**{**cfg.to_hf(), "initializer_range": 0.3})
    cls = transformers.Gemma2ForCausalLM if cfg.is_gemma2 else transformers.GemmaForCausalLM
    hf = cls(hf_cfg).eval().float()
    fc.perturb_torch_params(hf)
    assert GemmaConfig.from_hf(hf_cfg.to_dict()) == cfg
    return hf


@pytest.mark.torch
@pytest.mark.parametrize("cfg", [CFG2, CFG1], ids=["gemma2", "gemma1"])
def test_hf_parity(cfg):
    """Logits on a right-padded batch and 32 greedy tokens on left-padded prompts, with the
    sequences longer than Gemma 2's window."""
    fc.check_hf_parity(
        gemma.FAMILY, GemmaForCausalLM(cfg), _hf_model(cfg), vocab=128, eos=127, pad=0
    )


@pytest.mark.torch
def test_hf_export_loads_in_transformers(tiny, tmp_path):
    model, params = tiny
    fc.check_hf_export("gemma", model, params, tmp_path)


@pytest.mark.torch
def test_to_hf_round_trip():
    untied = dataclasses.replace(CFG1, tie_word_embeddings=False, attention_bias=True)
    no_window = dataclasses.replace(
        CFG2,
        sliding_window=None,
        layer_types=None,
        attn_logit_softcapping=None,
        query_pre_attn_scalar=None,
    )
    assert no_window.query_pre_attn_scalar == CFG2.head_dim
    for cfg in (CFG2, CFG1, untied, no_window):
        fc.check_hf_config_round_trip(gemma.FAMILY, GemmaConfig, GemmaForCausalLM, cfg)
