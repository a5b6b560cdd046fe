"""Compile-time memory of response log-probs: full logits vs sequence/vocabulary chunking.

Ahead-of-time compiles `jax.value_and_grad` of the summed response log-probs with respect to
(hidden, lm_head) — the part of a DPO/DIL step that owns the `[B, N, T, V]` logits — once with
`naive_response_logprobs` and once per chunking of `response_logprobs`, and prints XLA's
`compiled.memory_analysis()`: temporary, argument and output bytes, and the naive/chunked ratio
of temporaries. Nothing is executed or allocated, so full-size shapes are fine on a laptop CPU
(seconds). Numbers are per device for the default (single-device) placement and are measured
in this one run; other backends fuse differently. On CPU, XLA has no native bfloat16 matmul and
keeps float32 copies of bf16 operands (about 4·D·V bytes for lm_head), which inflates the
chunked bf16 rows; `--dtype float32` shows the algorithmic picture without that artefact.

From the repository root (or anywhere after `pip install -e .`):

    python -m experiments.bench_logprobs_memory
    python -m experiments.bench_logprobs_memory --batch 2 --seq 2048 --hidden 2048 \
        --vocab 32000 --seq-chunk 512 --vocab-chunk 8192 --dtype float32
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp

from dil_jax.logprobs import naive_response_logprobs, response_logprobs


def compile_value_and_grad(fn, *, batch, pairs, seq, hidden, vocab, dtype):
    """AOT-compiles value_and_grad of Σ sum_logps w.r.t. (hidden, lm_head); returns compiled."""
    h = jax.ShapeDtypeStruct((batch, pairs, seq, hidden), dtype)  # [B, N, T, D]
    w = jax.ShapeDtypeStruct((hidden, vocab), dtype)  # [D, V]
    ids = jax.ShapeDtypeStruct((batch, pairs, seq), jnp.int32)  # [B, N, T]

    def loss(h, w, input_ids, loss_mask):
        return jnp.sum(fn(h, w, input_ids, loss_mask).sum_logps)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(h, w, ids, ids).compile()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="B, prompts per batch")
    parser.add_argument("--pairs", type=int, default=2, help="N, responses per prompt")
    parser.add_argument("--seq", type=int, default=2048, help="T, tokens per sequence")
    parser.add_argument("--hidden", type=int, default=2048, help="D, model width")
    parser.add_argument("--vocab", type=int, default=32000, help="V, vocabulary size")
    parser.add_argument("--seq-chunk", type=int, default=512)
    parser.add_argument("--vocab-chunk", type=int, default=8192)
    parser.add_argument("--dtype", default="bfloat16", help="dtype of hidden and lm_head")
    args = parser.parse_args()
    shape = dict(
        batch=args.batch,
        pairs=args.pairs,
        seq=args.seq,
        hidden=args.hidden,
        vocab=args.vocab,
        dtype=jnp.dtype(args.dtype),
    )

    variants = {
        "naive (full logits)": naive_response_logprobs,
        f"seq_chunk={args.seq_chunk}": functools.partial(
            response_logprobs, seq_chunk=args.seq_chunk
        ),
        f"vocab_chunk={args.vocab_chunk}": functools.partial(
            response_logprobs, vocab_chunk=args.vocab_chunk
        ),
        f"seq_chunk={args.seq_chunk}, vocab_chunk={args.vocab_chunk}": functools.partial(
            response_logprobs, seq_chunk=args.seq_chunk, vocab_chunk=args.vocab_chunk
        ),
    }
    logits_bytes = args.batch * args.pairs * (args.seq - 1) * args.vocab * 4
    print(
        f"backend={jax.default_backend()} jax={jax.__version__} B={args.batch} N={args.pairs} "
        f"T={args.seq} D={args.hidden} V={args.vocab} dtype={args.dtype}; one f32 copy of "
        f"the logits is {logits_bytes / 2**30:.2f} GiB"
    )
    header = (
        f"{'variant':<40} {'temp MiB':>10} {'args MiB':>10} {'out MiB':>10} "
        f"{'naive/this temp':>16} {'compile s':>10}"
    )
    print(header)
    print("-" * len(header))
    naive_temp = None
    for name, fn in variants.items():
        start = time.perf_counter()
        stats = compile_value_and_grad(fn, **shape).memory_analysis()
        seconds = time.perf_counter() - start
        temp = stats.temp_size_in_bytes
        naive_temp = temp if naive_temp is None else naive_temp
        print(
            f"{name:<40} {temp / 2**20:>10.1f} {stats.argument_size_in_bytes / 2**20:>10.1f} "
            f"{stats.output_size_in_bytes / 2**20:>10.1f} {naive_temp / max(temp, 1):>16.1f} "
            f"{seconds:>10.1f}"
        )


if __name__ == "__main__":
    main()
