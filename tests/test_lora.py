"""LoRA / QLoRA (dil_jax/lora.py): adapters on a frozen (quantised) base, the reference as the base
with the adapters off, sharding, adapter-only checkpoints with the base fingerprint, PEFT export."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_tiny_config

from dil_jax import checkpointing, export, lora, metrics, reference, sharding, train
from dil_jax.errors import CheckpointError, ConfigError
from dil_jax.logprobs import sequence_logps
from dil_jax.models import build_model, hf
from dil_jax.runtime import exit_on_bad_input


def lora_config(**overrides):
    return make_tiny_config(**{"lora.enabled": True, **overrides})


def pair_batch(vocab=32, b=4, t=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (b, 2, t)).astype(np.int32)
    loss_mask = np.zeros((b, 2, t), np.int32)
    loss_mask[..., t // 2 :] = 1
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask}


def logps_fn(model, family):
    return jax.jit(lambda p, b: sequence_logps(model, family, p, b).sum_logps)


@functools.partial(jax.jit, static_argnums=(0,))
def init_adapters(plan, seed):
    return lora.init_adapters(plan, jax.random.key(seed))


@functools.partial(jax.jit, static_argnums=(0,))
def random_adapters(plan, seed=3, scale=0.2):
    """Adapters as if trained: B no longer zero."""
    ad = lora.init_adapters(plan, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    return jax.tree.map(lambda x: x + scale * jax.random.normal(next(keys), x.shape), ad)


# ----------------------------------------------------------------------------- quantisation


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantised_kernels_round_trip_within_their_resolution(kind):
    w = jax.random.normal(jax.random.key(0), (2, 64, 24)) * 0.05  # [L, I, O]
    q = lora.quantize_kernel(w, kind, 16)
    assert q["kernel_scale"].shape == (2, 4, 24)
    assert q["kernel_q"].shape == ((2, 64, 24) if kind == "int8" else (2, 32, 24))
    back = lora.dequantize_kernel(q["kernel_q"], q["kernel_scale"], jnp.float32)
    absmax = jnp.repeat(q["kernel_scale"], 16, axis=1)  # [L, I, O]
    # int8: half a step of 1/127; NF4: half the widest gap between codes (0.304 / 2).
    bound = 0.5 / 127 if kind == "int8" else 0.5 * np.max(np.diff(lora.NF4_CODES))
    assert float(jnp.max(jnp.abs(back - w) / absmax)) <= bound + 1e-6
    # Values on the grid come back exactly (block maxima included).
    codes = jnp.asarray(lora.NF4_CODES if kind == "nf4" else np.arange(-127, 128) / 127.0)
    grid = codes[jax.random.randint(jax.random.key(1), (1, 32, 8), 0, len(codes))]
    grid = grid.at[:, 0].set(1.0).at[:, 16].set(1.0)
    q = lora.quantize_kernel(grid, kind, 16)
    np.testing.assert_allclose(
        lora.dequantize_kernel(q["kernel_q"], q["kernel_scale"], jnp.float32), grid, atol=1e-7
    )


# ----------------------------------------------------------------------------- the reference


def test_policy_equals_the_base_at_init_and_the_reference_is_the_base():
    """B = 0: the policy's log-probs are the base model's, exactly. With trained (random)
    adapters, the loss's reference log-probs — inline and precomputed — are those of a
    separately built base model on the same weights."""
    config = lora_config()
    trainer = train.Trainer(config)
    base = jax.jit(trainer.init_params)(jax.random.key(0))
    plain, family = build_model(config.model)  # a separate, adapter-free model
    batch = {k: jnp.asarray(v) for k, v in pair_batch().items()}
    base_logps = logps_fn(plain, family)(base, batch)
    lora_logps = logps_fn(trainer.model, family)
    adapters = init_adapters(trainer.adapted.plan, 1)
    np.testing.assert_array_equal(lora_logps(lora.combine(base, adapters), batch), base_logps)

    adapters = random_adapters(trainer.adapted.plan)
    moved = lora_logps(lora.combine(base, adapters), batch)
    assert float(jnp.max(jnp.abs(moved - base_logps))) > 1e-2  # the adapters do act
    kw = dict(terms=trainer.terms, chunks=trainer.chunks, adapters=True)
    stats = jax.jit(lambda a, b, p: train._pair_stats(trainer.model, family, a, b, p, **kw)[:2])
    inline, m_inline = stats(adapters, batch, base)
    from_base, m_given = stats(adapters, dict(batch, ref_logps=base_logps), base)
    np.testing.assert_allclose(inline, from_base, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m_inline["rewards/margins"], m_given["rewards/margins"], atol=1e-6)
    # The precompute pass uses the trainer's model on the base tree: adapters off.
    pre = reference.compute_reference_logps(trainer, base, pair_batch(), batch_size=8)
    np.testing.assert_allclose(pre, base_logps, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_qlora_reference_is_the_dequantised_base(kind):
    config = lora_config(**{"lora.quantize": kind, "lora.quant_block_size": 32})
    trainer = train.Trainer(config)
    full = jax.jit(trainer.init_params)(jax.random.key(0))
    base = trainer.base_params(full)
    leaves = lora.flat(base)
    assert "model/layers/mlp/down_proj/kernel" not in leaves
    code_dtype = jnp.int8 if kind == "int8" else jnp.uint8
    assert leaves["model/layers/mlp/down_proj/kernel_q"].dtype == code_dtype
    assert "lm_head/kernel" in leaves  # the head is read directly: never quantised
    plain, family = build_model(config.model)
    dequantised = lora.merge_adapters(trainer.adapted.plan, base, {}, jnp.float32)
    batch = {k: jnp.asarray(v) for k, v in pair_batch().items()}
    want = logps_fn(plain, family)(dequantised, batch)
    got = logps_fn(trainer.model, family)(base, batch)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(want - logps_fn(plain, family)(full, batch)))) > 0


# ----------------------------------------------------------------------------- state, sharding


def test_only_adapters_are_trained_and_they_shard_on_the_tensor_axis():
    config = lora_config(
        **{"mesh.shape": (2, 2, 2), "lora.quantize": "nf4", "lora.quant_block_size": 32}
    )
    trainer = train.Trainer(config)
    paths = [
        sharding.path_str(p)
        for p, _ in jax.tree_util.tree_leaves_with_path(trainer.abstract_state.opt_state)
        if _.ndim
    ]
    assert paths and all(p.endswith(("lora_a", "lora_b")) for p in paths)
    state_specs = lora.flat(jax.tree.map(lambda s: s.spec, trainer.state_sharding.params))
    assert state_specs["model/layers/self_attn/q_proj/lora_a"] == jax.P(None, None, None)
    assert state_specs["model/layers/self_attn/q_proj/lora_b"] == jax.P(None, None, "tensor")
    assert state_specs["model/layers/self_attn/o_proj/lora_a"] == jax.P(None, "tensor", None)
    base_specs = lora.flat(jax.tree.map(lambda s: s.spec, trainer.base_sharding))
    assert base_specs["model/layers/self_attn/q_proj/kernel_q"] == jax.P(None, "fsdp", "tensor")
    assert base_specs["model/layers/self_attn/q_proj/kernel_scale"] == jax.P(None, "fsdp", "tensor")
    assert base_specs["model/embed_tokens/embedding"] == jax.P("tensor", "fsdp")


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lora.targets": ("nonexistent_proj/kernel",)}, "config.lora.targets: 'nonexistent"),
        ({"lora.targets": ("embed_tokens",)}, "not the kernel of a dense layer"),
        ({"lora.rank": 65}, r"config.lora.rank=65 is larger than"),
        ({"lora.quantize": "nf4", "lora.quant_block_size": 48}, "config.lora.quant_block_size"),
        ({"lora.quantize": "int4"}, "config.lora.quantize='int4'"),
        ({"lora.alpha": 0.0}, "config.lora.alpha"),
    ],
)
def test_bad_lora_settings_are_one_line_naming_the_field(overrides, message, capsys):
    with pytest.raises(ConfigError, match=message):
        train.Trainer(lora_config(**overrides))
    with pytest.raises(SystemExit) as exit_info, exit_on_bad_input():
        train.Trainer(lora_config(**overrides))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "config.lora." in err and "\n" not in err and "Traceback" not in err


# ----------------------------------------------------------------------------- runs


def _hf_base(tmp_path, seed):
    """A tiny llama written as a HF directory (the base a LoRA run starts from)."""
    config = make_tiny_config()
    model, _ = build_model(config.model)
    params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    params = jax.tree.map(lambda x: x * 4.0 if x.ndim > 1 else x, params)  # confident outputs
    hf.save_pretrained(params, "llama", model.config, tmp_path)
    return params


def test_qlora_base_is_quantised_while_streaming_from_hf(tmp_path):
    """init.mode=hf with NF4: each kernel is quantised as it is loaded; the result equals
    loading the whole model first and quantising it after."""
    _hf_base(tmp_path / "base", seed=0)
    config = lora_config(
        **{
            "model.hf_path": str(tmp_path / "base"),
            "init.mode": "hf",
            "lora.quantize": "nf4",
            "lora.quant_block_size": 32,
        }
    )
    trainer = train.Trainer(config)
    streamed = train._initial_params(trainer, str(tmp_path / "run"))
    full = hf.load_params(
        str(tmp_path / "base"), "llama", trainer.model.config, trainer.abstract_params()
    )
    after = trainer.base_params(full)
    assert trainer.base_params(streamed) is streamed  # already the base's layout
    got, want = lora.flat(streamed), lora.flat(after)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
        assert got[k].sharding == want[k].sharding, k


def _losses(workdir):
    return [r["loss"] for r in metrics.read_metrics(str(workdir)) if "loss" in r]


@pytest.mark.slow
def test_adapter_checkpoints_resume_bit_identically_and_refuse_another_base(tmp_path):
    _hf_base(tmp_path / "base", seed=0)
    config = lora_config(
        **{
            "model.hf_path": str(tmp_path / "base"),
            "init.mode": "hf",
            "train.steps": 4,
            "checkpoint.every_steps": 2,
            "lora.dropout": 0.1,
            "optim.learning_rate": 1e-3,
        }
    )
    full = train.train_and_evaluate(config, str(tmp_path / "full"))
    train.train_and_evaluate(config, str(tmp_path / "part"), max_steps=2)
    resumed = train.train_and_evaluate(config, str(tmp_path / "part"))
    assert resumed["step"] == 4
    for a, b in zip(
        jax.tree.leaves(jax.device_get(full["state"])),
        jax.tree.leaves(jax.device_get(resumed["state"])),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    # The checkpoint holds the adapters and their moments only, and the base's fingerprint.
    meta = checkpointing.read_meta(str(tmp_path / "full"))
    assert meta["config"]["lora"]["base_fingerprint"].startswith("v2-")
    abstract = lora.flat(full["state"].params)
    assert abstract and all(k.endswith(("lora_a", "lora_b")) for k in abstract)
    # The base changes under the same path: resuming the adapters onto it is refused.
    _hf_base(tmp_path / "base", seed=1)
    config.train.steps = 6
    with pytest.raises(CheckpointError, match=r"lora\.base_fingerprint differs"):
        train.train_and_evaluate(config, str(tmp_path / "part"))


@pytest.mark.slow
def test_qlora_training_matches_across_meshes():
    """1 device vs (2, 2, 2): the same losses (1e-5) for NF4-base QLoRA with adapter dropout."""
    import tempfile

    config = lora_config(
        **{
            "lora.quantize": "nf4",
            "lora.quant_block_size": 32,
            "lora.dropout": 0.1,
            "train.steps": 2,
            "checkpoint.every_steps": 2,
            "optim.learning_rate": 1e-3,
        }
    )
    losses = []
    for shape, devices in (((1, 1, 1), jax.devices()[:1]), ((2, 2, 2), jax.devices())):
        config.mesh.shape = shape
        workdir = tempfile.mkdtemp(prefix="lora-mesh-")
        mesh = sharding.make_mesh(shape, devices=devices)
        train.train_and_evaluate(config, workdir, mesh=mesh)
        losses.append(_losses(workdir))
    assert len(losses[0]) == 2 and losses[0][0] != losses[0][-1]
    np.testing.assert_allclose(losses[0], losses[1], atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.torch
def test_peft_and_merged_exports_load_in_transformers_with_our_logits(tmp_path, shared_data):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    _hf_base(tmp_path / "base", seed=0)
    # The merged export copies the base's tokenizer (any will do for this check).
    hf.copy_tokenizer_files(shared_data / "tokenizers" / "gpt2", tmp_path / "base")
    config = lora_config(
        **{
            "model.hf_path": str(tmp_path / "base"),
            "init.mode": "hf",
            "train.steps": 2,
            "checkpoint.every_steps": 2,
            "optim.learning_rate": 5e-2,
            "lora.targets": (r"self_attn/(q|v|o)_proj/kernel$", r"mlp/down_proj/kernel$"),
        }
    )
    run = train.train_and_evaluate(config, str(tmp_path / "run"))
    trainer = train.Trainer(config)
    base = hf.load_params(
        str(tmp_path / "base"), "llama", trainer.model.config, trainer.abstract_params()
    )
    policy = lora.combine(base, jax.device_get(run["state"].params))
    ids = np.random.default_rng(0).integers(0, 32, (2, 10)).astype(np.int32)
    ours = np.asarray(trainer.model.apply({"params": policy}, jnp.asarray(ids))[0])
    theirs_base = np.asarray(trainer.model.apply({"params": base}, jnp.asarray(ids))[0])
    assert np.max(np.abs(ours - theirs_base)) > 1e-3  # the adapters moved the model

    export.main([f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'peft'}", "--adapter"])
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["down_proj", "o_proj", "q_proj", "v_proj"]
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    peft_model = peft.PeftModel.from_pretrained(hf_base, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        got = peft_model(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(got, ours, atol=1e-4, rtol=0)

    export.main([f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'merged'}"])
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        got = merged(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(got, ours, atol=1e-4, rtol=0)


def test_base_fingerprint_is_exact_and_the_same_on_every_mesh():
    """Bit sums, not rounded float moments: a sharded copy (another reduction order) gives the
    same fingerprint, a one-ulp change a different one."""
    w = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
    one = reference.params_fingerprint({"w": jax.device_put(w, jax.devices()[0])})
    mesh = sharding.make_mesh((2, 2, 2))
    spec = jax.sharding.PartitionSpec(("data", "fsdp"), "tensor")
    sharded = jax.device_put(w, jax.sharding.NamedSharding(mesh, spec))
    assert reference.params_fingerprint({"w": sharded}) == one
    bumped = w.copy()
    bumped[3, 5] = np.nextafter(bumped[3, 5], np.float32(np.inf))
    assert reference.params_fingerprint({"w": jnp.asarray(bumped)}) != one
    assert not reference.comparable_fingerprints("a" * 64, one)  # a v1 value is not compared
