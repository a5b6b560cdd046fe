"""Hugging Face import/export (dil_jax.models.hf, dil_jax.export) and the Llama-family variants.

Parity: tiny random Llama / Mistral / Qwen2 / Qwen3 models built with `transformers` (PyTorch,
float32) are saved, streamed into params sharded over a (2, 2, 2) mesh, compared on logits and
greedy generation, exported back and reloaded by `transformers`. Bad inputs must fail with
messages naming the file and tensor.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dil_jax import sharding
from dil_jax.errors import WeightsError
from dil_jax.models import blocks, hf, llama
from dil_jax.models.llama import LlamaConfig, LlamaForCausalLM

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=127,
    pad_token_id=0,
)
# HF config class, extra kwargs, tied embeddings; each variant exercises different switches.
VARIANTS = {
    "llama": (
        "LlamaConfig",
        dict(
            rope_parameters={"rope_theta": 10000.0, **LLAMA3},
            tie_word_embeddings=True,
            attention_bias=True,
        ),
    ),
    "mistral": (
        "MistralConfig",
        dict(
            sliding_window=256,
            tie_word_embeddings=False,
            rope_parameters={"rope_theta": 1e6, "rope_type": "default"},
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(
            tie_word_embeddings=True,
            use_sliding_window=False,
            rope_parameters={"rope_theta": 1e6, "rope_type": "default"},
        ),
    ),
    "qwen3": (
        "Qwen3Config",
        dict(
            head_dim=24,
            tie_word_embeddings=False,
            attention_bias=False,
            rope_parameters={"rope_theta": 1e6, "rope_type": "default"},
        ),
    ),
}
MESH_SHAPE = (2, 2, 2)


def tiny_arch(**kw) -> LlamaConfig:
    return LlamaConfig(**{**COMMON, "max_position_embeddings": 64, **kw})


def abstract_params(cfg, mesh, *, scan_layers=True, dtype=jnp.float32):
    """Sharded ShapeDtypeStructs, as `train.Trainer.abstract_params()` builds them."""
    model = LlamaForCausalLM(cfg, scan_layers=scan_layers, param_dtype=dtype)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))[
        "params"
    ]
    specs = sharding.match_partition_rules(llama.partition_rules(), shapes, mesh)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        shapes,
        sharding.shardings_from_specs(mesh, specs),
    )


def random_params(cfg, *, scan_layers=True, seed=0):
    """Random numpy params (norm weights near 1, everything else N(0, 0.08^2))."""
    model = LlamaForCausalLM(cfg, scan_layers=scan_layers)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))[
        "params"
    ]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        x = rng.standard_normal(leaf.shape).astype(np.float32)
        return 1.0 + 0.1 * x if path[-1].key == "weight" else 0.08 * x

    return jax.tree_util.tree_map_with_path(draw, shapes)


def host(tree):
    return jax.tree.map(np.asarray, tree)


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(MESH_SHAPE)


# ----------------------------------------------------------------------------- configs


def test_config_variants_round_trip_through_hf():
    import transformers

    for cfg in (
        tiny_arch(rope_scaling=LLAMA3, tie_word_embeddings=True, eos_token_id=[2, 3]),
        tiny_arch(model_type="mistral", sliding_window=64),
        tiny_arch(qkv_bias=True, tie_word_embeddings=True),
        tiny_arch(qk_norm=True, head_dim=24, attention_bias=True),
    ):
        d = cfg.to_hf()
        assert LlamaConfig.from_hf(d) == cfg
        assert LlamaConfig.from_dict(cfg.to_dict()) == cfg
        # transformers reads the same architecture from it.
        hf_cfg = transformers.AutoConfig.for_model(**json.loads(json.dumps(d)))
        assert hf_cfg.model_type == cfg.model_type
        assert type(hf_cfg).__name__.lower().startswith(cfg.model_type)
        for k in ("head_dim", "num_key_value_heads", "tie_word_embeddings", "eos_token_id"):
            want = getattr(cfg, k)
            assert getattr(hf_cfg, k) == (list(want) if isinstance(want, tuple) else want), k
        assert LlamaConfig.from_hf(hf_cfg.to_dict()) == cfg  # transformers' v5 layout too
    assert tiny_arch(qk_norm=True).model_type == "qwen3"
    assert tiny_arch(qkv_bias=True).model_type == "qwen2"


def test_from_hf_rejects_unsupported_features():
    base = {**COMMON, "model_type": "mistral"}
    # Mistral v0.1's window is implemented (tests/test_llama.py checks it against transformers).
    v01 = LlamaConfig.from_hf({**base, "sliding_window": 4096, "max_position_embeddings": 32768})
    assert v01.sliding_window == 4096
    absent = LlamaConfig.from_hf({**base, "max_position_embeddings": 32768})
    assert absent.sliding_window == 4096  # absent: HF's default 4096
    assert LlamaConfig.from_hf({**base, "sliding_window": None}).sliding_window is None
    qwen = {
        **COMMON,
        "model_type": "qwen2",
        "use_sliding_window": True,
        "sliding_window": 32,
        "max_window_layers": 1,
    }
    with pytest.raises(ValueError, match="use_sliding_window"):
        LlamaConfig.from_hf(qwen)
    assert LlamaConfig.from_hf({**qwen, "max_window_layers": 2}).qkv_bias  # no layer slides
    assert LlamaConfig.from_hf({**qwen, "use_sliding_window": False}).sliding_window is None
    with pytest.raises(ValueError, match="rope_scaling"):
        LlamaConfig.from_hf({**COMMON, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="hidden_act"):
        LlamaConfig.from_hf({**COMMON, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="quantization_config"):
        LlamaConfig.from_hf({**COMMON, "quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(ValueError, match="qkv_bias"):
        tiny_arch(model_type="llama", qkv_bias=True)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_tensor_map_covers_every_param_and_inverts(scan_layers):
    for cfg in (
        tiny_arch(),
        tiny_arch(qkv_bias=True),
        tiny_arch(qk_norm=True, head_dim=24, attention_bias=True),
        tiny_arch(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    ):
        params = random_params(cfg, scan_layers=scan_layers)
        flat = hf._flat(params)
        tmap = llama.hf_tensor_map(cfg, scan_layers=scan_layers)
        assert set(tmap) == set(flat)
        keys = [k for p in tmap.values() for k in p.hf_keys]
        assert len(keys) == len(set(keys))
        for path, p in tmap.items():
            per_key = list(flat[path]) if p.stacked else [flat[path]]
            for x in per_key:
                np.testing.assert_array_equal(p.to_ours(p.to_hf(x)), x)
        specs = hf._flat(sharding.match_partition_rules(llama.partition_rules(), params))
        assert all(len(specs[p]) <= flat[p].ndim for p in flat)


# ----------------------------------------------------------------------------- packing


def test_segment_ids_packed_row_matches_separate_sequences():
    cfg = tiny_arch(qk_norm=True, head_dim=24)
    model = LlamaForCausalLM(cfg)
    params = random_params(cfg)
    rng = np.random.default_rng(3)
    a, b = rng.integers(2, 127, 5), rng.integers(2, 127, 4)
    packed = np.concatenate([a, b, np.zeros(3, int)])[None].astype(np.int32)  # [1, 12]
    segments = np.array([[1] * 5 + [2] * 4 + [0] * 3], np.int32)
    separate = np.zeros((2, 5), np.int32)
    separate[0], separate[1, :4] = a, b
    smask = np.array([[1] * 5, [1] * 4 + [0]], np.int32)

    @jax.jit
    def run(params):
        packed_out = model.apply({"params": params}, packed, segment_ids=segments)[0]
        separate_out = model.apply({"params": params}, separate, smask)[0]
        return packed_out, separate_out

    packed_out, separate_out = run(params)
    np.testing.assert_allclose(packed_out[0, :5], separate_out[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(packed_out[0, 5:9], separate_out[1, :4], atol=1e-5, rtol=1e-5)
    positions = blocks.default_positions(jnp.asarray(segments > 0), jnp.asarray(segments))
    np.testing.assert_array_equal(positions[0], [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0])
    with pytest.raises(ValueError, match="segment_ids"):
        model.apply({"params": params}, packed, segment_ids=segments, cache=model.init_cache(1, 16))


# ----------------------------------------------------------------------------- files, no torch


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A sharded checkpoint written by save_pretrained from random params."""
    cfg = tiny_arch(qkv_bias=True)
    params = random_params(cfg)
    out = tmp_path_factory.mktemp("saved")
    hf.save_pretrained(params, "llama", cfg, out, max_shard_bytes=40_000)
    return cfg, params, out


def test_save_load_round_trip_without_torch(saved, mesh, tmp_path):
    cfg, params, out = saved
    index = json.loads((out / hf.SAFE_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert not (out / hf.SAFE_SINGLE).exists()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["torch_dtype"] == "float32"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 127 and gen["bos_token_id"] == 1

    family, loaded_cfg = hf.load_config(out)
    assert (family, loaded_cfg) == ("llama", cfg)
    target = abstract_params(cfg, mesh)
    loaded = hf.load_params(out, family, cfg, target)
    for x, t in zip(jax.tree.leaves(loaded), jax.tree.leaves(target), strict=True):
        assert x.sharding == t.sharding and x.dtype == t.dtype
    jax.tree.map(np.testing.assert_array_equal, host(loaded), params)
    # Unrolled target, bfloat16 target dtype.
    target = abstract_params(cfg, mesh, scan_layers=False, dtype=jnp.bfloat16)
    loaded = hf.load_params(out, family, cfg, target, scan_layers=False)
    np.testing.assert_array_equal(
        loaded["model"]["layers_1"]["self_attn"]["q_proj"]["bias"],
        params["model"]["layers"]["self_attn"]["q_proj"]["bias"][1].astype(jnp.bfloat16),
    )
    # bfloat16 export, single file.
    hf.save_pretrained(params, "llama", cfg, tmp_path, dtype="bfloat16")
    assert (tmp_path / hf.SAFE_SINGLE).is_file() and not (tmp_path / hf.SAFE_INDEX).exists()
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = hf.load_params(tmp_path, family, cfg, abstract_params(cfg, mesh))
    np.testing.assert_array_equal(
        back["lm_head"]["kernel"],
        params["lm_head"]["kernel"].astype(jnp.bfloat16).astype(np.float32),
    )


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_inputs_name_the_file_and_tensor(saved, mesh, tmp_path):
    cfg, _, out = saved
    target = abstract_params(cfg, mesh)
    load = lambda d, c=cfg, t=target: hf.load_params(d, "llama", c, t)  # noqa: E731

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{empty}.*config.json"):
        hf.load_config(empty)
    with pytest.raises(FileNotFoundError, match="/no/such/model"):
        hf.load_config("/no/such/model")

    bert = _copy(out, tmp_path / "bert")
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"config\.json: model_type='bert'"):
        hf.load_config(bert)

    wide = _copy(out, tmp_path / "wide")
    (wide / "config.json").write_text(
        json.dumps({**json.loads((out / "config.json").read_text()), "intermediate_size": 128})
    )
    _, wide_cfg = hf.load_config(wide)
    with pytest.raises(
        ValueError,
        match=r"model-\d+-of-\d+\.safetensors: tensor "
        r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape",
    ):
        load(wide, wide_cfg, abstract_params(wide_cfg, mesh))

    index = json.loads((out / hf.SAFE_INDEX).read_text())["weight_map"]
    shard = index["model.layers.1.mlp.up_proj.weight"]
    truncated = _copy(out, tmp_path / "truncated")
    data = (truncated / shard).read_bytes()
    (truncated / shard).write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=f"{truncated / shard} is not a readable safetensors"):
        load(truncated)

    missing = _copy(out, tmp_path / "missing")
    (missing / shard).unlink()
    with pytest.raises(
        FileNotFoundError,
        match=f"shard {shard}, which is missing.*should hold "
        r"'model\.",
    ):
        load(missing)

    from safetensors.numpy import load_file, save_file

    extra = _copy(out, tmp_path / "extra")
    tensors = load_file(extra / shard)
    save_file(
        {**tensors, "model.layers.0.mystery.weight": np.zeros(3, np.float32)},
        extra / shard,
        metadata={"format": "pt"},
    )
    with pytest.raises(WeightsError, match=f"unused keys.*mystery.*{shard}"):
        load(extra)
    lacking = _copy(out, tmp_path / "lacking")
    tensors = load_file(lacking / shard)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, lacking / shard, metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load(lacking)
    with pytest.raises(ValueError, match="scan_layers"):
        hf.load_params(out, "llama", cfg, target, scan_layers=False)


# ----------------------------------------------------------------------------- torch parity


def _hf_model(variant: str):
    """A tiny random transformers model; norms and biases perturbed so every param matters."""
    import torch
    import transformers

    cls_name, extra = VARIANTS[variant]
    torch.manual_seed(0)
    cfg = getattr(transformers, cls_name)(**COMMON, **extra, initializer_range=0.3)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def _torch_logits(model, ids, mask):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def _padded_batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 127, (3, 20)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 14:] = 0
    mask[2, 7:] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.torch
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_parity_export_and_generation(variant, mesh, tmp_path):
    import torch
    import transformers

    from dil_jax.sampling import make_generate_fn

    torch_model = _hf_model(variant)
    src = tmp_path / "hf"
    # The llama variant is saved in several shards (an index), the others as one file.
    torch_model.save_pretrained(src, max_shard_size="30KB" if variant == "llama" else "5GB")
    assert (src / hf.SAFE_INDEX).is_file() == (variant == "llama")

    family, cfg = hf.load_config(src)
    assert family == "llama" and cfg.model_type == variant
    assert cfg.qk_norm == (variant == "qwen3") and cfg.qkv_bias == (variant == "qwen2")
    params = hf.load_params(src, family, cfg, abstract_params(cfg, mesh))
    model = LlamaForCausalLM(cfg)

    # Logits on a right-padded batch (positions 0.. for real tokens in both implementations).
    ids, mask = _padded_batch()
    want = _torch_logits(torch_model, ids, mask)
    forward = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m)[0])
    got = np.asarray(forward(params, ids.astype(np.int32), mask.astype(np.int32)))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)

    # Export, reload in PyTorch: the same model.
    out = hf.save_pretrained(params, family, cfg, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(torch_model)
    np.testing.assert_allclose(
        _torch_logits(reloaded, ids, mask)[real], want[real], atol=1e-5, rtol=1e-5
    )

    if variant in ("mistral", "qwen2"):
        return  # their switches only change the forward pass, checked above; save compiles
    # Greedy generation on left-padded prompts == transformers generate(do_sample=False).
    rng = np.random.default_rng(1)
    prompts = rng.integers(2, 127, (2, 6)).astype(np.int64)
    pmask = np.ones_like(prompts)
    pmask[1, :2] = 0
    prompts[pmask == 0] = 0
    with torch.no_grad():
        hf_out = torch_model.generate(
            torch.tensor(prompts),
            attention_mask=torch.tensor(pmask),
            do_sample=False,
            max_new_tokens=32,
            eos_token_id=127,
            pad_token_id=0,
        ).numpy()[:, 6:]
    generate = make_generate_fn(model, max_new_tokens=32, temperature=0.0, eos_id=127, pad_id=0)
    tokens = np.asarray(
        generate(params, prompts.astype(np.int32), pmask.astype(np.int32), jax.random.key(0)).tokens
    )
    np.testing.assert_array_equal(tokens[:, : hf_out.shape[1]], hf_out)
    assert (tokens[:, hf_out.shape[1] :] == 0).all()

    if variant == "qwen3":  # a legacy PyTorch .bin checkpoint loads to the same params
        legacy = tmp_path / "bin"
        legacy.mkdir()
        (legacy / "config.json").write_text((src / "config.json").read_text())
        torch.save(torch_model.state_dict(), legacy / hf.BIN_SINGLE)
        from_bin = hf.load_params(legacy, family, cfg, abstract_params(cfg, mesh))
        jax.tree.map(np.testing.assert_array_equal, host(from_bin), host(params))


# ----------------------------------------------------------------------------- export CLI


def _tokenizer_dir(path: pathlib.Path, vocab_size: int) -> str:
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(path)
    return fast.chat_template


@pytest.mark.torch
def test_export_cli_on_a_trained_workdir(tmp_path):
    """Train a few steps from a run whose config.model.hf_path names a HF directory (with a
    tokenizer and chat template), export with the CLI, load with transformers."""
    import torch
    import transformers
    from conftest import make_tiny_config
    from safetensors import safe_open

    from dil_jax import checkpointing, export, train
    from dil_jax.models import architecture_config

    config = make_tiny_config(
        **{"train.steps": 2, "checkpoint.every_steps": 2, "loss.name": "sft"}
    )  # no reference: one forward to compile
    arch = architecture_config(config.model)
    hf_dir = tmp_path / "base_hf"
    template = _tokenizer_dir(tmp_path / "tok", arch.vocab_size)
    hf.save_pretrained(random_params(arch), "llama", arch, hf_dir, tokenizer_dir=tmp_path / "tok")
    config.model.hf_path = str(hf_dir)
    workdir = tmp_path / "run"
    summary = train.train_and_evaluate(config, str(workdir))
    assert summary["step"] == 2

    out = tmp_path / "exported"
    export.main([f"--workdir={workdir}", f"--out={out}"])
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == template  # copied from hf_path by default
    assert (
        tokenizer.apply_chat_template([{"role": "user", "content": "w5 w6"}], tokenize=False)
        == "<user>w5 w6"
    )

    model = LlamaForCausalLM(arch)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))[
        "params"
    ]
    params = checkpointing.load_params(str(workdir), shapes)
    ids = np.random.default_rng(0).integers(3, arch.vocab_size, (2, 12))
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    ours = np.asarray(
        jax.jit(
            lambda p: model.apply({"params": p}, ids.astype(np.int32), mask.astype(np.int32))[0]
        )(params)
    )
    with torch.no_grad():
        theirs = torch_model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
        ).logits.numpy()
    np.testing.assert_allclose(theirs[mask == 1], ours[mask == 1], atol=1e-4, rtol=1e-4)

    # A bfloat16 export of an explicit step, with an explicit tokenizer.
    out16 = tmp_path / "exported16"
    export.main(
        [
            f"--workdir={workdir}",
            f"--out={out16}",
            "--step=2",
            "--dtype=bfloat16",
            f"--tokenizer={tmp_path / 'tok'}",
        ]
    )
    assert json.loads((out16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(out16 / hf.SAFE_SINGLE, "np") as f:
        assert f.get_slice("model.norm.weight").get_dtype() == "BF16"
    with pytest.raises(FileNotFoundError, match="no checkpoint 7"):
        export.export(str(workdir), str(tmp_path / "x"), step=7)


# ----------------------------------------------------------------------------- multi-host

WORKER = r"""
import os, sys
os.environ["XLA_FLAGS"] = (
    "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
)
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, src, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=pid)
import numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_hf import abstract_params
from dil_jax import sharding
from dil_jax.models import hf

read = {}
original = hf._Tensors.read
def spy(self, name, index=None):
    x = original(self, name, index)
    read[name] = read.get(name, 0) + x.size
    return x
hf._Tensors.read = spy

family, cfg = hf.load_config(src)
mesh = sharding.make_mesh((1, 4, 2))  # fsdp spans both processes
params = hf.load_params(src, family, cfg, abstract_params(cfg, mesh))
emb = params["model"]["embed_tokens"]["embedding"]  # [V, D], P('tensor', 'fsdp')
assert not emb.is_fully_addressable
# This process read only its devices' half of the embedding (each block once).
assert read["model.embed_tokens.weight"] == emb.size // 2, (read, emb.size)
hf.save_pretrained(params, family, cfg, out, max_shard_bytes=40_000)
print("worker", pid, "ok")
"""


@pytest.mark.slow
def test_two_process_load_reads_only_local_slices_and_saves(saved, tmp_path):
    import shutil
    import socket
    import subprocess
    import sys

    cfg, params, src = saved
    shutil.copy(pathlib.Path(__file__), tmp_path / "test_hf.py")
    (tmp_path / "worker.py").write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = tmp_path / "out"
    procs = [
        subprocess.Popen(
            [sys.executable, str(tmp_path / "worker.py"), str(i), port, str(src), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    back = hf.load_params(out, "llama", cfg, jax.eval_shape(lambda: params))
    jax.tree.map(np.testing.assert_array_equal, host(back), params)
