"""Train-step throughput: tokens/s, achieved FLOP/s, and the ratio to this machine's matmul peak.

  python experiments/bench_step.py                       # 'small' model, CPU-sized
  python experiments/bench_step.py --size=1b --batch=2 --seq=2048 --dtype=bfloat16 --seq_chunk=512
  python experiments/bench_step.py --size=8b_slice --batch=4 --seq=2048 --dtype=bfloat16 \
      --seq_chunk=512                                    # GPU/TPU: the issue-11 MFU targets

Everything is measured in one run on one machine: the DIL-LSIF train step (policy forward and
backward on chosen and rejected, plus the in-step reference forward) is timed after compilation,
and the matmul peak is measured with a square ``jnp.dot`` of the same dtype (on an accelerator,
MFU against the chip's datasheet peak, ``dil_jax.flops.PEAK_FLOPS``, is printed as well).
FLOPs are counted honestly (docs/objectives.md §5): 6·P per policy token (forward + backward),
2·P per reference token, plus attention scores and values (causal, counted at full T² as XLA
computes them); the LM head's V·D of P only at the response half of each sequence when the
head runs at scored positions only (``--seq_chunk`` > 0 with ``logprobs.score_buckets``, the
default), at every token otherwise. XLA's own count of the compiled step is printed beside it.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from dil_jax import config_files, train  # noqa: E402
from dil_jax import flops as flops_lib  # noqa: E402

SIZES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": (64, 256, 2, 4, 2, 32),
    "small": (256, 1024, 4, 8, 4, 8192),
    "base": (768, 3072, 12, 12, 4, 32000),
    "1b": (2048, 8192, 16, 32, 8, 128256),  # Llama-3.2-1B
    "8b_slice": (4096, 14336, 2, 32, 8, 128256),  # Llama-3-8B's layer and vocabulary, 2 layers
}


def build_config(args):
    config = config_files.load(pathlib.Path(__file__).parents[1] / "configs" / "base.py")
    config = config.get_config()
    d, f, layers, heads, kv, vocab = SIZES[args.size]
    config.model.update(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=f,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=args.seq,
        dtype=args.dtype,
        remat=args.remat,
        scan_layers=not args.unrolled,
    )
    config.loss.name = "dil_lsif"
    config.train.global_batch_size = args.batch
    config.mesh.shape = (-1, 1, 1)
    config.logprobs.seq_chunk = args.seq_chunk
    return config


def random_batch(batch, seq, vocab, rng):
    ids = rng.integers(3, vocab, size=(batch, 2, seq), dtype=np.int32)
    attn = np.ones_like(ids)
    loss_mask = np.zeros_like(ids)
    loss_mask[..., seq // 2 :] = 1  # half prompt, half response
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


def step_flops(config, n_params, batch, seq, with_reference=True):
    m = config.model
    tokens = batch * 2 * seq  # chosen and rejected
    head = m.vocab_size * m.hidden_size
    scored_only = config.logprobs.score_buckets and config.logprobs.seq_chunk
    head_tokens = batch * 2 * (seq - seq // 2) if scored_only else tokens  # random_batch's mask
    head_dim = m.hidden_size // m.num_attention_heads
    attn_fwd = 4 * m.num_hidden_layers * seq * seq * m.num_attention_heads * head_dim * batch * 2
    forward = 2 * (n_params - head) * tokens + 2 * head * head_tokens + attn_fwd
    return (3 + int(with_reference)) * forward


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="small", choices=sorted(SIZES))
    p.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--remat", action="store_true")
    p.add_argument(
        "--unrolled",
        action="store_true",
        help="no layer scan (XLA's FLOP count covers a scanned body only once)",
    )
    p.add_argument("--seq_chunk", type=int, default=0)
    p.add_argument("--matmul_n", type=int, default=0, help="0: 2048 on CPU, 8192 on GPU/TPU")
    args = p.parse_args()

    config = build_config(args)
    trainer = train.Trainer(config)
    state = trainer.init_state(0)
    ref = trainer.init_state(0).params
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    # The input embedding is a gather, not a matmul: FLOPs count only matmul parameters
    # (the LM head is a matmul; with tied embeddings the table is counted once, as the head).
    m = config.model
    n_matmul = n_params - (0 if m.tie_word_embeddings else m.vocab_size * m.hidden_size)
    batch = random_batch(args.batch, args.seq, config.model.vocab_size, np.random.default_rng(0))

    with jax.set_mesh(trainer.mesh):
        placed = trainer.put_batch(batch)
        compiled = trainer.train_step.lower(state, placed, ref).compile()
    cost = compiled.cost_analysis()
    xla_flops = float((cost[0] if isinstance(cost, list) else cost).get("flops", float("nan")))
    state, m = trainer.run_step(state, batch, ref)  # warm-up
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, m = trainer.run_step(state, batch, ref)
    jax.block_until_ready(m)
    step_time = (time.perf_counter() - t0) / args.steps

    flops = step_flops(config, n_matmul, args.batch, args.seq)
    platform = jax.devices()[0].platform
    n = args.matmul_n or (2048 if platform == "cpu" else 8192)
    peak = flops_lib.matmul_peak(jnp.dtype(args.dtype), n) * len(jax.devices())
    tokens = args.batch * 2 * args.seq
    print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())} ({platform})")
    print(
        f"model: {args.size}, {n_params / 1e6:.2f}M params, dtype {args.dtype}, "
        f"batch {args.batch} pairs x {args.seq} tokens, remat={args.remat}"
    )
    print(f"step time                 {step_time * 1e3:10.2f} ms")
    print(f"tokens/s (both responses) {tokens / step_time:10.0f}")
    print(
        f"model FLOPs / step        {flops:10.3e}   (XLA's count: {xla_flops:.3e}; "
        "with scanned layers it counts one layer body)"
    )
    print(f"achieved FLOP/s           {flops / step_time:10.3e}")
    print(f"matmul peak FLOP/s        {peak:10.3e}   ({n}x{n} {args.dtype} dot, all devices)")
    print(f"ratio to matmul peak      {flops / step_time / peak:10.3f}")
    if platform != "cpu":  # MFU against the chip's datasheet peak (on CPU that is the above)
        chip, source = flops_lib.device_peak(args.dtype)
        print(f"MFU                       {flops / step_time / chip:10.3f}   ({source})")


if __name__ == "__main__":
    main()
