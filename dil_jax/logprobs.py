"""Response-token log-probabilities from final hidden states, without materialising logits.

Preference losses need one number per sequence, `Σ_t log p(y_t | y_<t)` over response tokens,
but the obvious computation builds `[B, N, T, V]` float32 logits: 2·2·2048·32000·4 bytes = 1 GiB
for a small batch, several times over once the backward pass keeps its residuals. This is the
first out-of-memory users hit in DPO. `response_logprobs` fuses the LM head projection with the
log-softmax and the target gather and never holds more than one chunk of logits:

* `seq_chunk`: the (flattened) token axis is split into chunks processed one at a time by
  `lax.scan`; only `[B·N, seq_chunk, V]` logits are live.
* `vocab_chunk`: within a sequence chunk, the log-sum-exp over the vocabulary is computed online
  (a running max and a rescaled running sum, float32, as in flash attention) over vocabulary
  chunks; only `[B·N, seq_chunk, vocab_chunk]` logits are live.

The target's logit is `h · W[:, target]` from a gather of lm_head columns, not a pass over the
logits, and the exponentials are summed with `row_sum` (on CPU, a fused exp-and-sum over the
vocabulary was the slowest op of the step).

Backward pass: a `jax.custom_vjp` that saves only the per-token log-sum-exp `[B·N, T]` and
recomputes each chunk's logits, turning them straight into the two gradient matmuls
(`∂/∂logits = g·(onehot(target) − softmax)`). This is `jax.checkpoint` around each chunk, done by
hand: autodiff of the checkpointed scans (the first version of this module) recomputed the
forward once more, and accumulated lm_head's gradient through a full-size `[D, V]` add at every
vocabulary step; here it accumulates in float32 in place, one chunk slice at a time, and leaves
in lm_head's dtype. See experiments/bench_logprobs_memory.py for the compiled memory.

* `score_buckets`: the head runs at scored positions only (the response tokens; a packed row's
  prompts, padding and empty slots get no logits). Scored positions are gathered per
  data-parallel shard into `[G, K]`, where K is the smallest of `score_buckets` static sizes
  (even steps up to the shard's positions) that holds the shard's count, chosen in the step by
  `lax.switch`: every size is compiled once, so no batch recompiles; log-probs are scattered
  back afterwards.

Both chunkings combine, and uneven sizes are handled: the token axis is padded with masked
positions, and the last vocabulary chunk is shifted back to end at V with the columns the
previous chunk already covered masked to −inf (so lm_head is never padded or copied).

Limits: reverse-mode only (a custom VJP has no JVP rule). Vocabulary chunks are dynamic slices
of lm_head, so with lm_head sharded along V prefer `vocab_chunk=None` (sequence chunks only) to
avoid gathering it.

Precision: matmuls run in the promoted dtype of hidden and lm_head with float32 accumulation
(`preferred_element_type=float32`); softcap, log-sum-exp, the gather and all sums are float32,
because log-softmax in bfloat16 rounds log-probs to ~3 significant digits and sums of hundreds
of them drift (a frequent source of NaNs and bias in low-precision DPO).
`naive_response_logprobs` is the plain reference implementation the tests compare against.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from dil_jax import sharding
from dil_jax.models import attention

Array = jax.Array


class ResponseLogprobs(NamedTuple):
    """Per-sequence sums over response tokens; all leading dims of the inputs are kept."""

    sum_logps: Array  # [...] float32, Σ_t log p(token_t) over response tokens
    n_tokens: Array  # [...] float32, number of response tokens
    sum_mean_logits: Array  # [...] float32, Σ_t mean_v logit_t,v (metrics only, no gradient)


def _softcap(logits: Array, cap: float | None) -> Array:
    """Gemma-2 logit soft-capping, `cap·tanh(logits/cap)`, in float32."""
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def _shift(hidden: Array, input_ids: Array, loss_mask: Array) -> tuple[Array, Array, Array]:
    """Aligns predictions with targets: token t is scored from hidden[t−1]; token 0 never is."""
    h = hidden[..., :-1, :]  # [..., T-1, D]
    targets = input_ids[..., 1:].astype(jnp.int32)  # [..., T-1]
    mask = loss_mask[..., 1:] != 0  # [..., T-1] bool
    return h, targets, mask


def _project(h: Array, w: Array) -> Array:
    # Matmul in the input dtype, accumulated and returned in float32: everything downstream
    # (softcap, log-sum-exp, gathers) must be float32.
    return jnp.einsum("...d,dv->...v", h, w, preferred_element_type=jnp.float32)


def row_sum(x: Array) -> Array:
    """Σ over the last axis in float32: [..., N] -> [...].

    XLA:CPU emits a reduction whose operand is fused elementwise work (`Σ_v exp(z_v − m)`) as a
    slow loop: over the logits of bench_vs_trl's step it cost more than the LM-head matmul
    itself (experiments/bench_logsumexp.py). On CPU the operand is therefore written out and
    contracted with a ones vector (a matrix-vector product, vectorised and multi-threaded, at
    full float32 precision); elsewhere this is `jnp.sum`.
    """
    x = x.astype(jnp.float32)
    if jax.default_backend() != "cpu":
        return jnp.sum(x, axis=-1)
    ones = jnp.ones((x.shape[-1],), jnp.float32)
    return jnp.einsum("...n,n->...", x, ones, precision=lax.Precision.HIGHEST)


def _masked_sum(x: Array, mask: Array, segments: Array | None, num_segments: int, axes) -> Array:
    """Σ of x where mask over `axes`; with `segments` (same shape, −1 = none) one sum per
    segment id in [0, num_segments), as a new last axis (a one-hot contraction, float32)."""
    x = jnp.where(mask, x.astype(jnp.float32), 0.0)
    if segments is None:
        return jnp.sum(x, axis=axes)
    onehot = (segments[..., None] == jnp.arange(num_segments)).astype(jnp.float32)  # [..., S]
    return jnp.sum(x[..., None] * onehot, axis=axes)


def naive_response_logprobs(
    hidden: Array,
    lm_head: Array,
    input_ids: Array,
    loss_mask: Array,
    *,
    seq_chunk: int | None = None,
    vocab_chunk: int | None = None,
    logit_softcap: float | None = None,
    segments: Array | None = None,
    num_segments: int = 0,
) -> ResponseLogprobs:
    """Reference implementation: materialises the full float32 logits `[..., T−1, V]`.

    Same signature as `response_logprobs` so the two are interchangeable; `seq_chunk` and
    `vocab_chunk` are accepted and ignored.
    """
    del seq_chunk, vocab_chunk
    h, targets, mask = _shift(hidden, input_ids, loss_mask)
    seg = None if segments is None else segments[..., 1:]  # [..., T-1], aligned with targets
    logits = _softcap(_project(h, lm_head), logit_softcap)  # [..., T-1, V] f32
    logp = jax.nn.log_softmax(logits, axis=-1)  # [..., T-1, V]
    token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [..., T-1]
    mean_logit = lax.stop_gradient(jnp.mean(logits, axis=-1))  # [..., T-1]
    ax = -2 if seg is not None else -1  # the token axis (before a segment axis)
    return ResponseLogprobs(
        sum_logps=_masked_sum(token_logp, mask, seg, num_segments, ax),
        n_tokens=_masked_sum(jnp.ones_like(token_logp), mask, seg, num_segments, ax),
        sum_mean_logits=_masked_sum(mean_logit, mask, seg, num_segments, ax),
    )


# --- the fused, chunked kernel ----------------------------------------------------------------


class _Chunking(NamedTuple):
    """Static description of the vocabulary loop (hashable: a custom_vjp nondiff argument)."""

    vocab_chunk: int  # Vc ≤ V
    softcap: float | None


def _vocab_slice(w: Array, i: Array, vocab_chunk: int) -> tuple[Array, Array, Array]:
    """Vocabulary chunk i: lm_head columns, their global ids, and which ones are new.

    The last chunk is shifted back to end at V rather than padded (no copy of lm_head); its
    columns that the previous chunk already covered are flagged stale and must be masked.
    Returns w_c [D, Vc], its start index, and `fresh` [Vc] bool.
    """
    v = w.shape[1]
    start = jnp.minimum(i * vocab_chunk, v - vocab_chunk)
    w_c = lax.dynamic_slice_in_dim(w, start, vocab_chunk, axis=1)  # [D, Vc]
    fresh = start + jnp.arange(vocab_chunk) >= i * vocab_chunk  # [Vc]
    return w_c, start, fresh


def _target_logits(h: Array, w: Array, targets: Array, softcap: float | None) -> Array:
    """The target's logit, `h · W[:, target]`, from a gather of lm_head columns (no pass over
    the vocabulary): h [M, C, D], w [D, V], targets [M, C] -> [M, C] float32."""
    w_t = jnp.take(w, targets, axis=1)  # [D, M, C]
    z = jnp.einsum("mcd,dmc->mc", h.astype(jnp.float32), w_t.astype(jnp.float32))
    return _softcap(z, softcap)


def _chunk_forward(h_c: Array, w: Array, t_c: Array, cfg: _Chunking):
    """One sequence chunk, all vocabulary chunks: online log-sum-exp and target logit.

    Args:
      h_c: [M, C, D]; w: [D, V]; t_c: [M, C] int32 targets.
    Returns:
      token log-probs [M, C], log-sum-exp [M, C] and Σ_v logits [M, C] (or zeros when no
      softcap: the caller then computes the mean logit from a cheaper matvec), all float32.
    """
    m_rows, c, _ = h_c.shape
    n_steps = -(-w.shape[1] // cfg.vocab_chunk)

    def step(carry, i):
        run_max, run_sum, logit_sum = carry  # each [M, C] f32
        w_c, _, fresh = _vocab_slice(w, i, cfg.vocab_chunk)
        logits = _softcap(_project(h_c, w_c), cfg.softcap)  # [M, C, Vc] f32
        logits = jnp.where(fresh, logits, -jnp.inf)
        new_max = jnp.maximum(run_max, jnp.max(logits, axis=-1))  # [M, C]
        exp = jnp.exp(logits - new_max[..., None])  # [M, C, Vc]
        run_sum = run_sum * jnp.exp(run_max - new_max) + row_sum(exp)
        if cfg.softcap is not None:
            logit_sum = logit_sum + row_sum(jnp.where(fresh, logits, 0.0))
        return (new_max, run_sum, logit_sum), None

    zeros = jnp.zeros((m_rows, c), jnp.float32)
    init = (jnp.full((m_rows, c), -jnp.inf, jnp.float32), zeros, zeros)
    (run_max, run_sum, logit_sum), _ = lax.scan(step, init, jnp.arange(n_steps))
    lse = run_max + jnp.log(run_sum)  # [M, C]
    return _target_logits(h_c, w, t_c, cfg.softcap) - lse, lse, logit_sum


def _forward(h_chunks: Array, w: Array, t_chunks: Array, cfg: _Chunking):
    def seq_step(_, xs):  # xs: h_c [M, C, D], t_c [M, C]
        return None, _chunk_forward(xs[0], w, xs[1], cfg)

    _, (token_logp, lse, logit_sum) = lax.scan(seq_step, None, (h_chunks, t_chunks))
    return token_logp, lse, logit_sum  # each [nC, M, C]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _token_logps(h_chunks: Array, w: Array, t_chunks: Array, cfg: _Chunking):
    """Per-token log-probs `[nC, M, C]` and Σ_v logits `[nC, M, C]` (no gradient) by chunks.

    h_chunks: [nC, M, C, D]; w: [D, V]; t_chunks: [nC, M, C] int32.
    """
    token_logp, _, logit_sum = _forward(h_chunks, w, t_chunks, cfg)
    return token_logp, logit_sum


def _token_logps_fwd(h_chunks, w, t_chunks, cfg):
    token_logp, lse, logit_sum = _forward(h_chunks, w, t_chunks, cfg)
    return (token_logp, logit_sum), (h_chunks, w, t_chunks, lse)  # residual: lse [nC, M, C]


def _token_logps_bwd(cfg, residuals, cotangents):
    """Recomputes each logits chunk and applies `∂ log p(t)/∂z = onehot(t) − softmax(z)`.

    The Σ-logits output is a metric: its cotangent is ignored (it is stop-gradient'ed outside).
    """
    h_chunks, w, t_chunks, lse = residuals
    g_tok, _ = cotangents  # [nC, M, C]
    compute_dtype = jnp.promote_types(h_chunks.dtype, w.dtype)
    n_steps = -(-w.shape[1] // cfg.vocab_chunk)

    def seq_step(dw, xs):  # dw: [D, V] float32, accumulated in place slice by slice
        h_c, t_c, lse_c, g_c = xs  # [M, C, D], [M, C], [M, C], [M, C]

        def vocab_step(carry, i):
            dw, dh = carry  # [D, V], [M, C, D] float32
            w_c, start, fresh = _vocab_slice(w, i, cfg.vocab_chunk)
            z = _project(h_c, w_c)  # [M, C, Vc] f32, pre-softcap
            logits = _softcap(z, cfg.softcap)
            probs = jnp.where(fresh, jnp.exp(logits - lse_c[..., None]), 0.0)  # [M, C, Vc]
            hit = (jnp.arange(cfg.vocab_chunk) == (t_c - start)[..., None]) & fresh
            dz = g_c[..., None] * (hit.astype(jnp.float32) - probs)  # ∂/∂logits [M, C, Vc]
            if cfg.softcap is not None:
                dz = dz * (1.0 - jnp.square(logits / cfg.softcap))  # d(cap·tanh(z/cap))/dz
            dz = dz.astype(compute_dtype)  # gradient matmuls in the compute dtype, f32 accum
            dh = dh + jnp.einsum(
                "mcv,dv->mcd", dz, w_c.astype(compute_dtype), preferred_element_type=jnp.float32
            )
            dw_c = jnp.einsum(
                "mcd,mcv->dv", h_c.astype(compute_dtype), dz, preferred_element_type=jnp.float32
            )  # [D, Vc]
            # Stale columns of a shifted last chunk have dz = 0: adding keeps earlier values.
            dw = lax.dynamic_update_slice_in_dim(
                dw,
                lax.dynamic_slice_in_dim(dw, start, cfg.vocab_chunk, axis=1) + dw_c,
                start,
                axis=1,
            )
            return (dw, dh), None

        dh0 = jnp.zeros(h_c.shape, jnp.float32)
        (dw, dh), _ = lax.scan(vocab_step, (dw, dh0), jnp.arange(n_steps))
        return dw, dh.astype(h_chunks.dtype)

    dw0 = jnp.zeros(w.shape, jnp.float32)
    dw, dh_chunks = lax.scan(seq_step, dw0, (h_chunks, t_chunks, lse, g_tok))
    return dh_chunks, dw.astype(w.dtype), None  # no cotangent for the integer targets


_token_logps.defvjp(_token_logps_fwd, _token_logps_bwd)


def score_sizes(positions: int, buckets: int) -> tuple[int, ...]:
    """The static numbers of scored positions the head is compiled for: `buckets` even steps
    up to `positions`, rounded up to multiples of 8 (the last one is `positions`)."""
    steps = (-(-positions * i // buckets) for i in range(1, buckets + 1))  # ceil(L·i/buckets)
    return tuple(sorted({min(positions, -(-s // 8) * 8) for s in steps}))


def _batch_groups(rows: int) -> int:
    """Data-parallel shards of the active mesh that split `rows` evenly (1 without a mesh):
    compaction gathers within a shard, so it never moves tokens between devices."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    groups = math.prod(mesh.shape.get(axis, 1) for axis in sharding.BATCH_AXES)
    return groups if rows % groups == 0 else 1


def _scored_token_logps(h, targets, mask, w, cfg: _Chunking, seq_chunk, buckets: int):
    """Token log-probs and Σ_v logits `[M, T]` computed at the scored positions only.

    h [M, T, D], targets/mask [M, T]. Per shard group (G, from the mesh), the L = M/G·T
    positions' scored ones are gathered into the smallest static size K ≥ the largest group's
    count, run through the chunked head (chunks of `seq_chunk` positions per row, as without
    compaction: same live logits), and scattered back; unscored positions hold 0.
    """
    m, t, d = h.shape
    groups = _batch_groups(m)
    length = m // groups * t  # L
    spec = jax.sharding.PartitionSpec(sharding.BATCH_AXES)
    h_g = sharding.constrain(h.reshape(groups, length, d), spec)  # [G, L, D]
    t_g = sharding.constrain(targets.reshape(groups, length), spec)  # [G, L]
    m_g = sharding.constrain(mask.reshape(groups, length), spec)  # [G, L] bool
    count = jnp.sum(m_g, axis=1, dtype=jnp.int32)  # [G]
    sizes = score_sizes(length, buckets)
    which = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), jnp.max(count))
    per_chunk = length if seq_chunk is None else max(1, seq_chunk) * (m // groups)

    def at_size(k: int):
        def run(h_g, t_g, m_g, count):
            idx = jax.vmap(lambda row: jnp.nonzero(row, size=k, fill_value=0)[0])(m_g)  # [G, K]
            h_k = jnp.take_along_axis(h_g, idx[..., None], axis=1)  # [G, K, D]
            t_k = jnp.take_along_axis(t_g, idx, axis=1)  # [G, K]
            c = min(k, per_chunk)
            n_chunks = -(-k // c)

            def to_chunks(x):  # [G, K, ...] -> [nC, G, C, ...], padded with position 0
                x = jnp.pad(x, [(0, 0), (0, n_chunks * c - k)] + [(0, 0)] * (x.ndim - 2))
                return jnp.moveaxis(x.reshape(groups, n_chunks, c, *x.shape[2:]), 1, 0)

            def from_chunks(x):  # [nC, G, C] -> [G, K]
                return jnp.moveaxis(x, 0, 1).reshape(groups, n_chunks * c)[:, :k]

            token_logp, logit_sum = _token_logps(to_chunks(h_k), w, to_chunks(t_k), cfg)
            real = jnp.arange(k) < count[:, None]  # [G, K]: the fill slots hold index 0
            scatter = jax.vmap(lambda i, x: jnp.zeros((length,), jnp.float32).at[i].add(x))
            return tuple(
                scatter(idx, jnp.where(real, from_chunks(x), 0.0)) for x in (token_logp, logit_sum)
            )  # each [G, L]

        return run

    token_logp, logit_sum = lax.switch(which, [at_size(k) for k in sizes], h_g, t_g, m_g, count)
    return token_logp.reshape(m, t), logit_sum.reshape(m, t)


def response_logprobs(
    hidden: Array,
    lm_head: Array,
    input_ids: Array,
    loss_mask: Array,
    *,
    seq_chunk: int | None = None,
    vocab_chunk: int | None = None,
    logit_softcap: float | None = None,
    segments: Array | None = None,
    num_segments: int = 0,
    score_buckets: int = 0,
) -> ResponseLogprobs:
    """Sums of response-token log-probs, chunked over sequence and/or vocabulary.

    Differentiable (reverse mode) w.r.t. `hidden` and `lm_head` through `sum_logps`; works under
    `jit` (bind the keyword arguments with `functools.partial`: they are static) and for any
    leading dims.

    Args:
      hidden: [..., T, D] final hidden states (after the final norm), any compute dtype.
      lm_head: [D, V] output projection (for tied embeddings pass `embedding.T`). Matmuls run
        in the promoted dtype of the two: cast lm_head to the compute dtype for bf16 matmuls.
        Its gradient is accumulated in float32 and returned in its dtype.
      input_ids: [..., T] int token ids, in [0, V).
      loss_mask: [..., T], nonzero where token t is a response token to score. Token t is scored
        from hidden[t−1], so position 0 is never scored whatever its mask.
      seq_chunk: token positions per chunk, over all leading dims at once (None: one chunk).
      vocab_chunk: vocabulary entries per online log-sum-exp step (None: whole vocabulary).
      logit_softcap: Gemma-2 style `cap·tanh(logits/cap)` before the log-softmax, if given.
      segments: optional [..., T] int: packed rows, one sum per segment id in
        [0, num_segments) instead of one per row (token t counts for `segments[t]`; −1: none).
      num_segments: S, the number of sums per row with `segments`.
      score_buckets: > 0: run the head at scored positions only, gathered into one of this
        many static sizes (module docstring); 0: at every position. Needs a chunk size.

    Returns:
      `ResponseLogprobs`, each field shaped like `input_ids.shape[:-1]` (`+ (S,)` with
      `segments`), float32. With neither chunk size set this is `naive_response_logprobs`
      (plain autodiff, full logits).
    """
    if seq_chunk is None and vocab_chunk is None:
        return naive_response_logprobs(
            hidden,
            lm_head,
            input_ids,
            loss_mask,
            logit_softcap=logit_softcap,
            segments=segments,
            num_segments=num_segments,
        )
    h, targets, mask = _shift(hidden, input_ids, loss_mask)
    lead = h.shape[:-2]
    t, d = h.shape[-2:]
    v = lm_head.shape[1]
    m = math.prod(lead)
    h = h.reshape(m, t, d)  # [M, T-1, D], M = prod(leading dims)
    targets = targets.reshape(m, t)  # [M, T-1]
    mask = mask.reshape(m, t)  # [M, T-1]

    c = t if seq_chunk is None else max(1, min(seq_chunk, t))
    n_chunks = -(-t // c)
    pad = n_chunks * c - t  # padded positions are masked out

    def to_chunks(x):  # [M, T-1, ...] -> [nC, M, C, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(m, n_chunks, c, *x.shape[2:]), 1, 0)

    cfg = _Chunking(
        vocab_chunk=v if vocab_chunk is None else max(1, min(vocab_chunk, v)),
        softcap=None if logit_softcap is None else float(logit_softcap),
    )
    seg = None if segments is None else segments[..., 1:].reshape(m, t)  # [M, T-1]
    if score_buckets:
        token_logp, logit_sum = _scored_token_logps(
            h, targets, mask, lm_head, cfg, seq_chunk, score_buckets
        )  # [M, T-1] each
        mask_chunks, seg_chunks, axes = mask, seg, 1
    else:
        token_logp, logit_sum = _token_logps(to_chunks(h), lm_head, to_chunks(targets), cfg)
        mask_chunks = to_chunks(mask)  # [nC, M, C]
        seg_chunks = None if seg is None else to_chunks(seg)  # [nC, M, C]
        axes = (0, 2)
    sum_logps = _masked_sum(token_logp, mask_chunks, seg_chunks, num_segments, axes)  # [M(,S)]

    if logit_softcap is None:
        # Without a softcap the mean logit is linear in h: mean_v(h·W) = h·(Σ_v W)/V.
        w_mean = jnp.mean(lax.stop_gradient(lm_head), axis=1, dtype=jnp.float32)  # [D]
        mean_logit = jnp.einsum(
            "mtd,d->mt", lax.stop_gradient(h).astype(jnp.float32), w_mean
        )  # [M, T-1]
        sum_mean_logits = _masked_sum(mean_logit, mask, seg, num_segments, 1)  # [M(, S)]
    else:
        logit_sum = lax.stop_gradient(logit_sum)  # [nC, M, C]
        sum_mean_logits = _masked_sum(logit_sum, mask_chunks, seg_chunks, num_segments, axes) / v
    out = lead if segments is None else (*lead, num_segments)
    return ResponseLogprobs(
        sum_logps=sum_logps.reshape(out),
        n_tokens=_masked_sum(jnp.ones(mask.shape), mask, seg, num_segments, 1).reshape(out),
        sum_mean_logits=sum_mean_logits.reshape(out),
    )


def chunk_settings(logprobs_config) -> dict[str, int]:
    """`config.logprobs` as the keyword arguments of `sequence_logps`."""
    keys = ("seq_chunk", "vocab_chunk", "score_buckets")
    return {k: int(getattr(logprobs_config, k, 0)) for k in keys}


def sequence_logps(
    model,
    family,
    params,
    batch,
    *,
    seq_chunk: int = 0,
    vocab_chunk: int = 0,
    score_buckets: int = 0,
) -> ResponseLogprobs:
    """Response log-probs of every sequence of a batch in one forward pass.

    Bucketed batches are ``[B, N, T]`` (one example per row) and give ``[B, N]`` sums. Packed
    and prefix-shared batches (``dil_jax.data.batching``) hold ``S`` example slots per row,
    ``[B, R, T]`` tokens (R = N packed, 1 prefix-shared) with ``pair_index`` naming the
    (slot, response) each token scores for; their sums come back per example, ``[B·S, N]``
    (empty slots: zeros; ``slot_mask [B, S, N]`` says which are real).
    """
    ids = batch["input_ids"]  # [B, R, T]
    b, r, t = ids.shape
    flat = {k: batch[k].reshape(b * r, t) for k in ("segment_ids", "positions") if k in batch}
    if "branch_ids" in batch:  # prefix sharing: branch masks and position-measured windows
        flat["segment_ids"] = attention.Segments(
            flat["segment_ids"], batch["branch_ids"].reshape(b * r, t), flat["positions"]
        )
    hidden, _ = model.apply(
        {"params": params},
        ids.reshape(b * r, t),
        batch["attention_mask"].reshape(b * r, t),
        output="hidden",
        **flat,
    )
    hidden = hidden.reshape(b, r, t, -1)  # [B, R, T, D]
    segments = {}
    if "pair_index" in batch:
        slots, num = batch["slot_mask"].shape[1:]  # S, N
        segments = {"segments": batch["pair_index"], "num_segments": slots * num}
    out = response_logprobs(
        hidden,
        family.lm_head_kernel(params).astype(hidden.dtype),
        ids,
        batch["loss_mask"],
        seq_chunk=seq_chunk or None,
        vocab_chunk=vocab_chunk or None,
        logit_softcap=getattr(model, "logit_softcap", None),
        score_buckets=score_buckets if seq_chunk or vocab_chunk else 0,
        **segments,
    )
    if not segments:
        return out
    # [B, R, S·N] -> per example [B·S, N]: a row's R sequences hold disjoint segments.
    return ResponseLogprobs(*(x.sum(axis=1).reshape(b * slots, -1) for x in out))
