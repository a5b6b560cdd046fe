"""Honest step FLOPs and device peaks: what ``metrics.jsonl``'s ``mfu`` divides.

Model FLOPs utilisation counts the work the method needs, not the work a layout wastes: only
real (non-padding) tokens, and attention at the density of the mask the layout uses (a causal
row of ``n`` tokens has ``n(n+1)/2`` query-key pairs; packed examples do not attend to each
other; a prefix-shared response attends to its prompt and itself). Per real token and layer:

* matmuls: ``2·P`` forward FLOPs, ``P`` the matmul parameters of the layers (projections and
  MLP; the input embedding is a gather and costs none);
* the LM head: ``2·V·D`` forward FLOPs per *scored* token only (a response token; a prompt
  token's logits are not needed, and ``logprobs.score_buckets`` does not compute them);
* attention: ``4·H·Dh`` forward FLOPs per allowed query-key pair (scores and values).

A training step runs the policy forward and backward (3 forward-equivalents) and, with the
inline reference, one more forward. Everything is computed on the host from the numpy batch, so
measuring costs no device synchronisation. Sliding-window layers are counted at full causal
density (an over-count for Gemma's local layers).

Peaks: a table of dense bf16 / fp32 matmul peaks per chip (vendor figures, per device); on a CPU
the peak is measured once, a square float32 ``jnp.dot`` timed at start-up (the host's cores).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense matmul peak FLOP/s per device (bf16, fp32), vendor datasheets; matched by substring of
# `jax.devices()[0].device_kind`, first match wins (longer names first). fp32 on GPUs is TF32
# tensor-core math where XLA uses it by default.
PEAK_FLOPS = (
    ("H200", 989e12, 494e12),
    ("H100", 989e12, 494e12),
    ("A100", 312e12, 156e12),
    ("L4", 121e12, 60e12),
    ("TPU v6", 918e12, 918e12 / 4),
    ("TPU v5p", 459e12, 459e12 / 4),
    ("TPU v5 lite", 197e12, 197e12 / 4),
    ("TPU v5e", 197e12, 197e12 / 4),
    ("TPU v4", 275e12, 275e12 / 4),
)


def matmul_params(params, *, tied_embeddings: bool, vocab_size: int, hidden_size: int) -> int:
    """Parameters that take part in a matmul per token: every Dense ``kernel`` (LM head
    included), plus the embedding table once when it is tied (it is then the head)."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if getattr(path[-1], "key", None) == "kernel":
            total += int(np.prod(leaf.shape))
    return total + (vocab_size * hidden_size if tied_embeddings else 0)


def real_tokens_and_pairs(batch) -> tuple[int, int]:
    """(real tokens, allowed query-key pairs) of a batch of any layout.

    A real token at position ``p`` sees ``p + 1`` keys under every layout's mask: positions
    count the keys visible to it (padded: real tokens so far; packed: restarting per example;
    prefix-shared: the prompt, then its own branch).
    """
    mask = np.asarray(batch["attention_mask"]) != 0  # [B, R, T]
    if "positions" in batch:
        positions = np.asarray(batch["positions"])
    else:
        positions = np.cumsum(mask, axis=-1) - 1
    return int(mask.sum()), int(np.sum(np.where(mask, positions + 1, 0), dtype=np.int64))


def scored_tokens(batch) -> int:
    """Tokens whose log-prob a loss reads: the loss mask, less each row's first slot (token 0
    has no prediction)."""
    return int(np.count_nonzero(np.asarray(batch["loss_mask"])[..., 1:]))


def batch_flops(
    batch, *, n_matmul: int, head_params: int, layers: int, heads: int, head_dim: int, passes: int
):
    """Model FLOPs of one step on ``batch``: ``passes`` forward-equivalents (3 for a policy
    forward + backward, +1 for an inline reference forward). ``n_matmul`` counts every matmul
    parameter, ``head_params`` (V·D) of them the LM head's, which is counted at scored tokens."""
    tokens, pairs = real_tokens_and_pairs(batch)
    forward = (
        2.0 * (n_matmul - head_params) * tokens
        + 2.0 * head_params * scored_tokens(batch)
        + 4.0 * layers * heads * head_dim * pairs
    )
    return passes * forward


def matmul_peak(dtype=jnp.float32, n: int = 1024, repeats: int = 8) -> float:
    """Measured FLOP/s of a square ``n × n`` dot on the default device (best of ``repeats``)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


@functools.cache
def device_peak(dtype_name: str = "float32") -> tuple[float, str]:
    """(peak FLOP/s of all devices together, where it came from) for compute ``dtype_name``.

    Accelerators: the table above times the device count. CPU: measured once per process
    (simulated host devices share the same cores, so the measurement is the whole host's).
    """
    devices = jax.devices()
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
        return matmul_peak(dtype), f"measured {dtype_name} matmul on {kind}"
    for name, bf16, fp32 in PEAK_FLOPS:
        if name.lower() in kind.lower():
            per = bf16 if dtype_name == "bfloat16" else fp32
            return per * len(devices), f"table: {name} x{len(devices)}"
    return float("nan"), f"no peak known for {kind!r}"
