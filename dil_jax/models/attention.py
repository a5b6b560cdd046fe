"""Attention masks and the attention kernels every model family calls.

`make_masks` turns a call's layout (padding, packed `segment_ids`, prefix-sharing `Segments`,
a KV cache, a sliding window) into `Masks`: dense [B, T, S] booleans that every kernel can use,
plus the same layout as per-token segment ids where it has that form. `attend` runs the
grouped-query attention core with the kernel `config.model.attention` selects:

  kernel        runs on         masks it expresses itself                 otherwise
  'xla'         any (reference) every (the dense mask), Gemma 2's softcap  -
  'dot_product' any             every (the dense mask)                     softcap -> 'xla'
  'cudnn'       GPU, bf16/fp16  every (the dense mask)                     softcap -> 'xla'
  'chunked'     any             every (the dense mask), softcap            -
  'splash'      TPU (elsewhere  causal + padding + packed segments +       prefix sharing or a
                Pallas interpret sliding window (by slot), softcap         KV cache -> 'chunked'
                mode: tests)
  'auto'        cudnn on a GPU in bf16/fp16 without a softcap; splash on TPU; else xla.

Prefix sharing's branch mask (a rejected response sees the prompt but not the chosen one) is
not a segment-id mask, and neither is a cache's; splash falls back to 'chunked' there (the
same numbers; only one query block's scores live at a time).

Shape letters as in `blocks`: B batch, T queries, S keys, H query heads, K kv heads,
G = H // K, Dh head width (`d` in einsums).
"""

from __future__ import annotations

import contextvars
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dil_jax import sharding

MASKED = -1e30  # the einsum's score for a masked key: finite, so no inf − inf in the softmax


class Segments(NamedTuple):
    """Packed rows with prefix sharing: what `segment_ids` may be instead of an array.

    ids: [B, T] example per token (0 = padding), as plain `segment_ids`;
    branch: [B, T] 0 on an example's shared prefix, j + 1 on its response j: a token attends
      to keys of its own example on the prefix or on its own branch;
    positions: [B, T] the tokens' positions, which restart at the prefix's end in every
      branch, so the sliding window is measured in positions, not slots.
    """

    ids: jax.Array
    branch: jax.Array
    positions: jax.Array


class Masks(NamedTuple):
    """Attention masks for one call; full/local: [B, T, S] bool (True = may attend)."""

    full: jax.Array
    local: jax.Array | None  # full & within the sliding window; None without a window
    key_mask: jax.Array  # [B, S] int32, 1 where a key slot holds a real token
    index: jax.Array  # [] int32, slot of this call's first token
    # [B, T] int32: the same layout as segment ids (0 = padding, S = T), for kernels that
    # build causal/window masks themselves (splash); None where only the dense mask expresses
    # it (prefix-sharing branches, a KV cache).
    segments: jax.Array | None


def make_masks(
    attention_mask: jax.Array,
    segment_ids: jax.Array | Segments | None,
    cache=None,
    sliding_window: int | None = None,
) -> Masks:
    """Causal (by slot), key-padding, packing and optional sliding-window masks.

    Query t sits at slot index + t. Slot distance equals position distance for real tokens
    (padding is only at the ends of a row or segment), so the window `q - k < sliding_window`
    (HF's `kv_idx > q_idx - sliding_window`) is applied on slots.

    Args:
      attention_mask: [B, T], 1 = real token.
      segment_ids: [B, T] or None; tokens attend only to keys with an equal id. Or a
        `Segments` (prefix sharing; the window then counts positions). Not supported
        together with a cache (packing is a training-time layout).
      cache: None or a `blocks.KVCache`; its mask gets this call's `attention_mask` written in.
      sliding_window: if given, also build the local mask.
    """
    B, T = attention_mask.shape
    segments = None
    if cache is None:
        index = jnp.zeros((), jnp.int32)
        key_mask = attention_mask.astype(jnp.int32)  # [B, S=T]
        if segment_ids is None:
            segments = key_mask  # one segment per row, padding 0
        elif not isinstance(segment_ids, Segments):
            segments = segment_ids.astype(jnp.int32)
    else:
        if segment_ids is not None:
            raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
        index = cache.index
        key_mask = jax.lax.dynamic_update_slice(
            cache.mask, attention_mask.astype(cache.mask.dtype), (0, index)
        )  # [B, S]
    S = key_mask.shape[1]
    distance = index + jnp.arange(T)[:, None] - jnp.arange(S)[None, :]  # [T, S] q slot - k slot
    full = (distance >= 0)[None] & (key_mask[:, None, :] > 0)  # [B, T, S]
    if isinstance(segment_ids, Segments):  # prefix sharing: own example, prefix or own branch
        seg, branch = segment_ids.ids, segment_ids.branch  # [B, T]
        full = full & (seg[:, :, None] == seg[:, None, :])
        full = full & ((branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :]))
        pos = segment_ids.positions
        distance = pos[:, :, None] - pos[:, None, :]  # [B, T, S]: positions, not slots
    elif segment_ids is not None:
        full = full & (segment_ids[:, :, None] == segment_ids[:, None, :])
    local = None
    if sliding_window is not None:
        window = distance < sliding_window  # [T, S], or [B, T, S] by positions
        local = full & (window if window.ndim == 3 else window[None])
    return Masks(full, local, key_mask, index, segments)


IMPLEMENTATIONS = ("auto", "xla", "dot_product", "cudnn", "chunked", "splash")
BLOCK = 512  # queries per block of 'chunked'
SPLASH_BLOCK = 128  # splash's query/key tile; sequences are padded up to a multiple of it
_CURRENT = contextvars.ContextVar("dil_jax_attention", default="xla")


def _low_precision(dtype) -> bool:
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def resolve(requested: str, dtype, logit_softcap: float | None, *, has_ids: bool = True) -> str:
    """The kernel that runs for `requested` on this backend: 'xla', 'dot_product', 'cudnn',
    'chunked' or 'splash'. `has_ids`: the call's layout has a segment-id form
    (`Masks.segments`); without one splash falls back to 'chunked'."""
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"config.model.attention={requested!r}: expected one of {IMPLEMENTATIONS}")
    backend = jax.default_backend()
    if requested == "auto":
        if backend == "gpu" and _low_precision(dtype) and logit_softcap is None:
            return "cudnn"
        if backend == "tpu":
            return "splash" if has_ids else "chunked"
        return "xla"
    if requested == "splash" and not has_ids:
        return "chunked"  # prefix-sharing branches or a KV cache: no segment-id form
    if logit_softcap is not None and requested in ("dot_product", "cudnn"):
        return "xla"  # no fused kernel takes a softcap on the scores
    if requested == "cudnn" and (backend != "gpu" or not _low_precision(dtype)):
        raise ValueError(
            "config.model.attention='cudnn' needs a GPU and model.dtype bfloat16/float16 "
            f"(backend {backend!r}, dtype {jnp.dtype(dtype).name})"
        )
    return requested


class use:  # noqa: N801 (a context manager, used like a function)
    """Within the block, `attend` runs the kernel `name` (`config.model.attention`)."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self._token = _CURRENT.set(self.name)

    def __exit__(self, *exc):
        _CURRENT.reset(self._token)


def attend(
    q,
    k,
    v,
    masks: Masks,
    *,
    scale: float,
    window: int | None = None,
    sliding=True,
    logit_softcap: float | None = None,
    dtype=jnp.float32,
) -> jax.Array:
    """Grouped-query attention core.

    q [B, T, H, Dh]; k, v [B, S, K, Dh]; masks from `make_masks`. Returns [B, T, H * Dh] in
    dtype. `window`: this layer's sliding window (used when `masks.local` exists); `sliding`:
    whether this layer uses it, a bool or a traced [] bool (Gemma's per-layer choice under
    `nn.scan`). Scores, softcap and softmax run in float32; a finite large negative (not -inf)
    keeps fully masked rows (queries at padding) NaN-free. The kernel is the one `use`
    selected (`resolve`).
    """
    if isinstance(sliding, (bool, np.bool_)):
        sliding = bool(sliding)  # static (an unrolled stack); traced under nn.scan
    local = masks.local is not None and window is not None and sliding is not False
    impl = resolve(_CURRENT.get(), dtype, logit_softcap, has_ids=masks.segments is not None)
    if impl == "splash":
        return _splash(
            q,
            k,
            v,
            masks.segments,
            scale=scale,
            window=window if local else None,
            sliding=sliding,
            logit_softcap=logit_softcap,
            dtype=dtype,
        )
    mask = masks.full
    if local:
        mask = masks.local if sliding is True else jnp.where(sliding, masks.local, masks.full)
    if impl == "chunked":
        return _chunked(q, k, v, mask, scale=scale, logit_softcap=logit_softcap, dtype=dtype)
    if impl != "xla":
        return _fused(q, k, v, mask, scale=scale, implementation=impl, dtype=dtype)
    return _einsum(q, k, v, mask, scale=scale, logit_softcap=logit_softcap, dtype=dtype)


def _fused(q, k, v, mask, *, scale: float, implementation: str, dtype) -> jax.Array:
    """jax.nn.dot_product_attention on q [B, T, H, Dh], k, v [B, S, K, Dh], mask [B, T, S]."""
    B, T, H, Dh = q.shape
    # A query with no allowed key (padding) attends to its own slot instead: its output is
    # ignored, and no row of the softmax is empty (NaN-free in every implementation).
    empty = ~jnp.any(mask, axis=-1, keepdims=True)  # [B, T, 1]
    own = jnp.arange(T)[:, None] == jnp.arange(mask.shape[-1])[None, :]  # [T, S]
    mask = mask | (empty & own[None])
    out = jax.nn.dot_product_attention(
        q.astype(dtype),
        k.astype(dtype),
        v.astype(dtype),
        mask=mask[:, None],  # [B, 1, T, S]
        scale=scale,
        implementation="cudnn" if implementation == "cudnn" else "xla",
    )  # [B, T, H, Dh]
    return out.reshape(B, T, H * Dh).astype(dtype)


def _chunked(q, k, v, mask, *, scale, logit_softcap, dtype) -> jax.Array:
    """The einsum over blocks of `BLOCK` queries, one at a time, each block recomputed in the
    backward pass (`jax.checkpoint`): only one block's float32 scores [B, K, G, Tq, S] are ever
    live, instead of the whole [B, K, G, T, S]. Same numbers as 'xla'; a sequence that is not
    a multiple of the block (or is one block) runs the einsum."""
    B, T, H, Dh = q.shape
    n = T // BLOCK
    if n < 2 or T % BLOCK:
        return _einsum(q, k, v, mask, scale=scale, logit_softcap=logit_softcap, dtype=dtype)
    qb = q.reshape(B, n, BLOCK, H, Dh).swapaxes(0, 1)  # [n, B, Tq, H, Dh]
    mb = mask.reshape(B, n, BLOCK, mask.shape[-1]).swapaxes(0, 1)  # [n, B, Tq, S]

    @jax.checkpoint
    def block(xs):
        q_c, m_c = xs
        return _einsum(
            q_c, k, v, m_c, scale=scale, logit_softcap=logit_softcap, dtype=dtype
        )  # [B, Tq, H * Dh]

    out = jax.lax.map(block, (qb, mb))  # [n, B, Tq, H * Dh]
    return out.swapaxes(0, 1).reshape(B, T, H * Dh)


def _einsum(q, k, v, mask, *, scale, logit_softcap, dtype) -> jax.Array:
    """The float32 einsum core ('xla'): q [B, T, H, Dh]; k, v [B, S, K, Dh]; mask [B, T, S]."""
    B, T, H, Dh = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, H // K, Dh)
    scores = jnp.einsum("BTKGd,BSKd->BKGTS", q, k, preferred_element_type=jnp.float32)
    scores = scores * scale
    if logit_softcap is not None:
        scores = logit_softcap * jnp.tanh(scores / logit_softcap)  # Gemma 2, before the mask
    # The mask as an additive bias rather than a select: the same scores where allowed and
    # exactly −1e30 elsewhere (so exactly zero probability, and a uniform row at padding
    # queries), with nothing saved for the backward pass, which a select of [B, K, G, T, S]
    # needs (its mask, broadcast).
    bias = jnp.where(mask, 0.0, MASKED).astype(jnp.float32)  # [B, T, S]
    scores = scores + bias[:, None, None]
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)  # [B, K, G, T, S]
    out = jnp.einsum("BKGTS,BSKd->BTKGd", probs, v.astype(dtype))
    return out.reshape(B, T, H * Dh)


def _splash_kernel(T: int, G: int, window: int | None, softcap: float | None, interpret: bool):
    """Pallas splash attention for one kv head of one row: q [G, T, Dh], k/v [T, Dh]: causal,
    or causal within `window` slots (HF's `q - k < window`), with an optional score softcap."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask

    if window is None:
        one = mask.CausalMask((T, T))
    else:
        one = mask.LocalMask((T, T), window_size=(window - 1, 0), offset=0)
    with jax.ensure_compile_time_eval():  # its block tables are constants, not this trace's
        return kernel.make_splash_mqa(
            mask.MultiHeadMask([one] * G),
            head_shards=1,
            q_seq_shards=1,
            attn_logits_soft_cap=softcap,
            interpret=interpret,
        )


def _splash(q, k, v, segments, *, scale, window, sliding, logit_softcap, dtype) -> jax.Array:
    """Splash attention (Pallas; TPU, interpret mode elsewhere): q [B, T, H, Dh], k, v
    [B, T, K, Dh], segments [B, T] (tokens attend to keys with an equal id, causally; padding
    is segment 0). The sequence is padded to a multiple of `SPLASH_BLOCK` with segment -1
    (the padding attends only to itself). Under a mesh it runs per device in `shard_map`: rows
    over the batch axes, heads over 'tensor' when both head counts divide."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel,
    )

    B, T, H, Dh = q.shape
    K = k.shape[2]
    G = H // K
    pad = -T % SPLASH_BLOCK
    interpret = jax.default_backend() != "tpu"
    softcap = None if logit_softcap is None else float(logit_softcap)
    window_kernel = _splash_kernel(T + pad, G, window, softcap, interpret) if window else None
    full_kernel = _splash_kernel(T + pad, G, None, softcap, interpret)

    def run(q, k, v, segments, sliding):  # one device's rows and heads
        b, _, h, _ = q.shape
        kv = k.shape[2]
        q = (q.astype(jnp.float32) * scale).astype(dtype)
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        q = q.reshape(b, T + pad, kv, h // kv, Dh).transpose(0, 2, 3, 1, 4)  # [b, kv, G, T, Dh]
        k, v = (
            jnp.pad(x.astype(dtype), ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
            for x in (k, v)
        )  # [b, kv, T, Dh]
        ids = jnp.pad(segments, ((0, 0), (0, pad)), constant_values=-1)  # [b, T]

        def row(q1, k1, v1, ids1):
            def head(kern, qh, kh, vh):
                return kern(qh, kh, vh, kernel.SegmentIds(ids1, ids1))

            def heads(kern):
                return jax.vmap(functools.partial(head, kern))(q1, k1, v1)  # [kv, G, T, Dh]

            if window_kernel is None:
                return heads(full_kernel)
            if sliding is True:
                return heads(window_kernel)
            return jax.lax.cond(sliding, lambda: heads(window_kernel), lambda: heads(full_kernel))

        out = jax.vmap(row)(q, k, v, ids)  # [b, kv, G, T + pad, Dh]
        out = out[:, :, :, :T].transpose(0, 3, 1, 2, 4)  # [b, T, kv, G, Dh]
        return out.reshape(b, T, h * Dh).astype(dtype)

    if sliding is True:
        run = functools.partial(run, sliding=True)
    mesh = jax.sharding.get_abstract_mesh()
    operands = (q, k, v, segments) if sliding is True else (q, k, v, segments, sliding)
    if mesh.empty:
        return run(*operands)
    rows = sharding.fit_spec(sharding.batch_spec(1), (B,), mesh)[0]
    tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if tensor > 1 and H % tensor == 0 and K % tensor == 0 else None
    P = jax.sharding.PartitionSpec
    specs = (P(rows, None, heads), P(rows, None, heads), P(rows, None, heads), P(rows), P())
    return jax.shard_map(
        run, in_specs=specs[: len(operands)], out_specs=P(rows, None, heads), check_vma=False
    )(*operands)
