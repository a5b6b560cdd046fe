"""Checks shared by the model-family tests (test_gpt_neox.py, test_gpt2.py, test_gemma.py).

Every family honours one contract (dil_jax/models/family.py, blocks.CausalLM), so the
invariance, cache, packing, sharding-rule and Hugging Face parity checks are written once
here and called with a family's `FAMILY` record, its model class and a tiny config. Everything runs
jitted on numpy inputs: eager flax on 2 shared cores is far slower than compiling.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from dil_jax.errors import WeightsError


@functools.partial(jax.jit, static_argnums=0, static_argnames="output")
def fwd(
    model, params, ids, mask=None, positions=None, cache=None, segment_ids=None, output="logits"
):
    return model.apply(
        {"params": params}, ids, mask, positions, cache, output=output, segment_ids=segment_ids
    )


def hf_params(family, state_dict, cfg, **kw):
    from dil_jax.models import hf

    return hf.params_from_hf_state_dict(state_dict, family.name, cfg, **kw)


def random_params(model, scale=0.08, seed=0):
    """Random numpy params shaped by an abstract init (no init compile): N(0, scale^2)
    weights (4x HF's 0.02, so logits are far from uniform), norm weights 1 + N(0, 0.1^2)
    (Gemma's zero-centred ones become 1 + (1 + ...): still well-conditioned)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    rng = np.random.default_rng(seed)

    def draw(key_path, leaf):
        x = rng.standard_normal(leaf.shape).astype(np.float32)
        return 1.0 + 0.1 * x if key_path[-1].key == "weight" else scale * x

    return jax.tree_util.tree_map_with_path(draw, shapes["params"])


def ids(shape, vocab, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def path_str(key_path) -> str:
    return "/".join(str(k.key) for k in key_path)


def unstack(params, scanned: str, n_layers: int):
    """Scanned params (`a/b/layers` with a leading [L]) -> unrolled `a/b/layers_<i>`."""
    *parents, name = scanned.split("/")
    out = jax.tree.map(lambda x: x, params)  # copy of the dict structure
    node = out
    for p in parents:
        node[p] = dict(node[p])
        node = node[p]
    stacked = node.pop(name)
    for i in range(n_layers):
        node[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: np.asarray(x)[i], stacked)
    return out


# Every forward check uses this one [2, 12] shape with an explicit mask, so the jitted
# forward compiles once per model and is shared by the reference, packing and parity checks.
B, T = 2, 12


def batch(vocab, seed=1):
    return ids((B, T), vocab, seed), np.ones((B, T), np.int32)


def check_outputs_and_head(family, model, params, vocab, hidden):
    """Shapes; output='hidden' @ lm_head_kernel (then the family's softcap) == logits.
    Returns the reference logits of `batch(vocab)`."""
    x, mask = batch(vocab)
    logits, cache = fwd(model, params, x, mask)
    assert logits.shape == (B, T, vocab) and logits.dtype == jnp.float32 and cache is None
    h, _ = fwd(model, params, x, mask, output="hidden")
    assert h.shape == (B, T, hidden)
    z = np.asarray(h) @ np.asarray(family.lm_head_kernel(params))
    cap = model.logit_softcap
    if cap is not None:
        z = cap * np.tanh(z / cap)
    np.testing.assert_allclose(z, logits, atol=1e-5, rtol=1e-5)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x, output="hidden"))
    assert jax.tree.structure(abstract["params"]) == jax.tree.structure(params)
    return np.asarray(logits)


def check_scan_unrolled_remat(
    model_cls, cfg, params, vocab, scanned, n_layers, ref, *, remat=False
):
    x, mask = batch(vocab)
    out, _ = fwd(model_cls(cfg, scan_layers=False), unstack(params, scanned, n_layers), x, mask)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    if remat:
        out, _ = fwd(model_cls(cfg, remat=True), params, x, mask)
        np.testing.assert_allclose(out, ref, atol=1e-6, rtol=1e-6)


def check_cache_decode(model, params, vocab, ref):
    """Prefill 5 tokens, then 7 single-token steps == the full forward; a left-padded row
    decodes like the unpadded one (same compiled prefill/step: shapes are shared)."""
    x, mask = batch(vocab)
    cache = model.init_cache(B, 16)
    out, cache = fwd(model, params, x[:, :5], mask[:, :5], cache=cache)
    steps = [out]
    for t in range(5, T):
        out, cache = fwd(model, params, x[:, t : t + 1], cache=cache)
        steps.append(out)
    assert int(cache.index) == T
    np.testing.assert_allclose(np.concatenate(steps, axis=1), ref, atol=1e-5, rtol=1e-5)
    # Row 1 = row 0's first 3 tokens left-padded by 2; then each row decodes x[0] onwards.
    padded = np.stack([x[0, :5], np.concatenate([np.zeros(2, np.int32), x[0, :3]])])
    pmask = np.ones_like(padded)
    pmask[1, :2] = 0
    cache = model.init_cache(B, 16)
    out, cache = fwd(model, params, padded, pmask, cache=cache)
    np.testing.assert_allclose(out[1, 2:], ref[0, :3], atol=1e-5, rtol=1e-5)
    for t in range(5):
        out, cache = fwd(model, params, x[:1, [5 + t, 3 + t]].T, cache=cache)
        np.testing.assert_allclose(out[:, 0], ref[0, [5 + t, 3 + t]], atol=1e-5, rtol=1e-5)


def check_segments(model, params, vocab):
    """A row packing [a (5 tokens), b (6 tokens), pad] == a and b run separately (positions
    restart per segment; segment id 0 = padding)."""
    a, b = ids((1, 5), vocab, seed=3), ids((1, 6), vocab, seed=4)
    packed = np.zeros((B, T), np.int32)
    seg = np.zeros((B, T), np.int32)
    packed[0, :11] = np.concatenate([a[0], b[0]])
    seg[0, :11] = [1] * 5 + [2] * 6
    packed[1], seg[1] = packed[0, ::-1], seg[0, ::-1]  # padding first, ids in any order
    out, _ = fwd(model, params, packed, segment_ids=seg)
    sep_ids, sep_mask = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    sep_ids[0, :5], sep_ids[1, :6] = a[0], b[0]
    sep_mask[0, :5], sep_mask[1, :6] = 1, 1
    sep, _ = fwd(model, params, sep_ids, sep_mask)  # right padding leaves real tokens alone
    np.testing.assert_allclose(out[0, :5], sep[0, :5], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out[0, 5:11], sep[1, :6], atol=1e-5, rtol=1e-5)
    assert np.isfinite(np.asarray(out)).all()


def check_partition_rules(family, model_cls, cfg):
    for scan in (True, False):
        shapes = jax.eval_shape(
            lambda s=scan: model_cls(cfg, scan_layers=s).init(
                jax.random.key(0), jnp.zeros((1, 1), jnp.int32)
            )
        )["params"]
        rules = family.partition_rules()
        for key_path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
            path = path_str(key_path)
            specs = [spec for pattern, spec in rules if re.search(pattern, path)]
            assert specs, f"no rule for {path}"
            assert len(specs[0]) == leaf.ndim, (path, specs[0], leaf.shape)


def to_hf_state_dict(family, cfg, params, scan_layers=True):
    """Our params -> HF-named numpy arrays through the map's `to_hf` (the export direction)."""
    flat = {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    sd = {}
    for path, hp in family.hf_tensor_map(cfg, scan_layers=scan_layers).items():
        arrays = list(flat[path]) if hp.stacked else [flat[path]]
        for key, arr in zip(hp.hf_keys, arrays, strict=True):
            sd[key] = hp.to_hf(arr)
    return sd


def check_converter(family, cfg, params, scanned, n_layers):
    """HF state dict <-> params round trip in both layouts; errors name the key."""
    import pytest

    sd = to_hf_state_dict(family, cfg, params)
    unrolled = unstack(params, scanned, n_layers)
    assert to_hf_state_dict(family, cfg, unrolled, scan_layers=False).keys() == sd.keys()
    for scan, want in ((True, params), (False, unrolled)):
        got = hf_params(family, sd, cfg, scan_layers=scan)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        jax.tree.map(np.testing.assert_array_equal, got, want)
    some_key = sorted(k for k in sd if ".1." in k)[0]
    with pytest.raises(WeightsError, match=re.escape(some_key)):
        hf_params(family, {k: v for k, v in sd.items() if k != some_key}, cfg)
    with pytest.raises(WeightsError, match="extra.weight"):
        hf_params(family, {**sd, "extra.weight": np.zeros(3)}, cfg)
    with pytest.raises(ValueError, match=re.escape(some_key)):
        hf_params(family, {**sd, some_key: np.zeros((3, 5), np.float32)}, cfg)
    return sd


def perturb_torch_params(hf_model, seed=0):
    """Move norm weights and biases off their HF init (1 / 0) so every parameter matters."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def check_hf_parity(family, model, hf_model, *, vocab, eos, pad, generate=True, rtol=1e-4):
    """transformers (PyTorch, float32, eval) vs ours on converted weights.

    Logits on a right-padded batch (real positions compared); greedy generation of 32 tokens
    on left-padded prompts == `generate(do_sample=False)`.
    """
    import torch

    from dil_jax.sampling import make_generate_fn

    sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    params = hf_params(family, sd, model.config)
    rng = np.random.default_rng(0)
    x = rng.integers(2, vocab - 1, (B, T)).astype(np.int64)
    mask = np.ones_like(x)
    mask[1, 7:] = 0
    x[mask == 0] = pad
    with torch.no_grad():
        want = hf_model(input_ids=torch.tensor(x), attention_mask=torch.tensor(mask)).logits
    got, _ = fwd(model, params, x.astype(np.int32), mask.astype(np.int32))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], want.numpy()[real], atol=1e-4, rtol=rtol)
    if not generate:
        return params

    prompts = rng.integers(2, vocab - 1, (2, 6)).astype(np.int64)
    pmask = np.ones_like(prompts)
    pmask[1, :2] = 0
    prompts[pmask == 0] = pad
    with torch.no_grad():
        hf_out = hf_model.generate(
            torch.tensor(prompts),
            attention_mask=torch.tensor(pmask),
            do_sample=False,
            max_new_tokens=32,
            eos_token_id=eos,
            pad_token_id=pad,
        ).numpy()[:, 6:]
    gen = make_generate_fn(model, max_new_tokens=32, temperature=0.0, eos_id=eos, pad_id=pad)
    out = gen(params, prompts.astype(np.int32), pmask.astype(np.int32), jax.random.key(0))
    ours = np.asarray(out.tokens)
    np.testing.assert_array_equal(ours[:, : hf_out.shape[1]], hf_out)
    assert (ours[:, hf_out.shape[1] :] == pad).all()
    return params


def check_hf_config_round_trip(family, config_cls, model_cls, cfg, hf_model_cls=None):
    """to_hf -> AutoConfig.for_model -> a transformers model whose (mapped) parameter shapes
    equal ours; from_hf of its config gives back `cfg`."""
    import transformers

    d = cfg.to_hf()
    assert d["model_type"] and d["architectures"] and d["torch_dtype"] == "float32"
    hf_cfg = transformers.AutoConfig.for_model(**d)
    assert type(hf_cfg).__name__.lower().startswith(d["model_type"].replace("_", ""))
    assert config_cls.from_hf(hf_cfg.to_dict()) == cfg
    cls = hf_model_cls or getattr(transformers, d["architectures"][0])
    hf_model = cls(hf_cfg)
    sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    params = hf_params(family, sd, cfg)  # checks every shape, every key
    abstract = jax.eval_shape(
        lambda: model_cls(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    )["params"]
    assert jax.tree.map(np.shape, params) == jax.tree.map(lambda a: a.shape, abstract)
    return hf_cfg


def check_hf_export(family_name, model, params, tmp_path):
    """hf.save_pretrained -> transformers.from_pretrained gives our logits; hf.load_params
    reads the same params back (through the streaming, slice-reading loader)."""
    import torch
    import transformers

    from dil_jax.models import hf

    hf.save_pretrained(params, family_name, model.config, tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval().float()
    x, mask = batch(model.config.vocab_size)
    with torch.no_grad():
        want = loaded(
            input_ids=torch.tensor(x, dtype=torch.long), attention_mask=torch.tensor(mask)
        ).logits.numpy()
    got, _ = fwd(model, params, x, mask)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    name, arch = hf.load_config(tmp_path)
    assert (name, arch) == (family_name, model.config)
    back = hf.load_params(
        tmp_path, name, arch, jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
    )
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), back, params)
