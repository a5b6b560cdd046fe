"""Sampler throughput: generated tokens/s of our KV-cache sampler vs ``transformers.generate``.

  python experiments/bench_sampler.py                         # 'small' Llama, CPU, batch 8
  python experiments/bench_sampler.py --size=base --batch=32 --new=128   # on an accelerator

One random Llama of the chosen size is written as a Hugging Face directory (``transformers``,
safetensors), then loaded by both sides from that same directory: PyTorch's
``LlamaForCausalLM.generate`` and dil_jax (``models/hf.py`` weights, ``sampling.generate``).
Both sample the same batch of random prompts (``--prompt`` tokens each) at temperature 1 for
exactly ``--new`` tokens (no EOS stops either side), float32. Timings exclude compilation
(ours: one warm-up call first) and are the best of ``--repeats`` calls; the figure is
``batch × new / seconds``. The torch side needs the test extra (``pip install torch``). On a
shared, loaded CPU the numbers swing with the load: run both sides in one call (this script
does) and report them together.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from dil_jax import config_files, sampling, sharding  # noqa: E402
from dil_jax import train as core  # noqa: E402

SIZES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": (64, 256, 2, 4, 2, 256),
    "small": (256, 1024, 4, 8, 4, 8192),
    "base": (768, 3072, 12, 12, 4, 32000),
}


def write_hf_model(size: str, out: str, max_positions: int) -> None:
    import torch  # noqa: PLC0415 (test extra)
    import transformers  # noqa: PLC0415

    d, f, layers, heads, kv, vocab = SIZES[size]
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=f,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)


def bench_ours(hf_dir, prompts, new, repeats) -> float:
    config = config_files.load(pathlib.Path(__file__).parents[1] / "configs" / "base.py")
    config = config.get_config()
    config.model.hf_path = hf_dir
    config.init.mode = "hf"
    config.mesh.shape = (1, 1, 1)
    config.train.global_batch_size = 1
    trainer = core.Trainer(config, mesh=sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    params = core._initial_params(trainer, hf_dir)  # the weights of the HF directory
    fn = sampling.make_generate_fn(
        trainer.model, max_new_tokens=new, temperature=1.0, eos_id=-1, pad_id=0
    )
    ids, mask = jnp.asarray(prompts), jnp.ones(prompts.shape, jnp.int32)
    jax.block_until_ready(fn(params, ids, mask, jax.random.key(0)))  # compile
    best = float("inf")
    for r in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(params, ids, mask, jax.random.key(r + 1)))
        best = min(best, time.perf_counter() - t0)
    assert int(np.asarray(out.mask).sum()) == prompts.shape[0] * new
    return prompts.shape[0] * new / best


def bench_transformers(hf_dir, prompts, new, repeats, threads) -> float:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    if threads:
        torch.set_num_threads(threads)

    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    model.eval()
    ids = torch.as_tensor(prompts, dtype=torch.long)
    kwargs = dict(
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        pad_token_id=0,
        eos_token_id=None,
    )
    best = float("inf")
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            best = min(best, time.perf_counter() - t0)
    assert out.shape[1] == prompts.shape[1] + new
    return prompts.shape[0] * new / best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch intra-op threads (0: torch's default); on a loaded CPU 1 avoids "
        "OpenMP spin-waiting under oversubscription",
    )
    args = parser.parse_args(argv)
    vocab = SIZES[args.size][-1]
    prompts = np.random.default_rng(0).integers(3, vocab, (args.batch, args.prompt), np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "model")
        write_hf_model(args.size, hf_dir, args.prompt + args.new)
        ours = bench_ours(hf_dir, prompts, args.new, args.repeats)
        theirs = bench_transformers(hf_dir, prompts, args.new, args.repeats, args.torch_threads)
    import torch  # noqa: PLC0415

    device = jax.devices()[0].device_kind
    print(
        f"{args.size} Llama, batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, "
        f"float32, JAX on {device}, torch on CPU ({torch.get_num_threads()} threads):"
    )
    print(f"  dil_jax sampling.generate   {ours:10.1f} generated tokens/s")
    print(f"  transformers .generate      {theirs:10.1f} generated tokens/s")
    print(f"  ratio                       {ours / theirs:10.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
