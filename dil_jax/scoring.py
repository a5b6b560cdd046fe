"""The one batched scorer: any jitted ``(params, batch) -> [B, ...]`` function over whole arrays.

Reference log-prob precompute, held-out log-likelihoods, reward-model scores, the AfD
log-ratio reward and policy rollouts (``dil_jax.afd.rollouts.sample``: the sampler is a
function of the batch and a per-call key) all need the same loop: walk ``[n, ...]`` host
arrays in fixed-size global batches (one compiled shape: the tail wraps around to the first
rows), put each batch on the mesh with every process holding only its own rows, gather the
results back to every host, and drop the wrapped rows. Writing it once keeps the multi-host
rule (each process reads a disjoint slice of each global batch) in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from dil_jax import progress, sharding

TOKEN_KEYS = ("input_ids", "attention_mask", "loss_mask")


def batch_size_for(n: int, requested: int, mesh) -> int:
    """A global batch size for ``n`` rows: at most ``requested`` (and no larger than ``n``
    needs), a positive multiple of the data-parallel size and of the process count."""
    unit = sharding.data_parallel_size(mesh)
    unit = unit * jax.process_count() // np.gcd(unit, jax.process_count())
    return max(unit, min(requested, -(-n // unit) * unit) // unit * unit)


def score_in_batches(
    fn: Callable,
    params,
    arrays: Mapping[str, np.ndarray],
    *,
    mesh,
    batch_size: int,
    keys: Sequence[str] = TOKEN_KEYS,
    desc: str | None = None,
    rng: jax.Array | None = None,
):
    """``fn(params, batch)`` over every row of ``arrays``, concatenated: ``[n, ...]`` numpy.

    Args:
      fn: jitted ``(params, {key: [B, ...]}) -> [B, ...]`` (or a pytree of ``[B, ...]``
        arrays, concatenated leaf by leaf); with ``rng``, ``(params, batch, key)``.
      arrays: host arrays ``[n, ...]`` (every process passes the same full arrays).
      batch_size: requested global batch; rounded by :func:`batch_size_for`.
      keys: the array keys ``fn`` reads.
      desc: a progress bar label (process 0), or None for no bar.
      rng: call ``c`` (the batch starting at row ``c * B``) gets ``fold_in(rng, c)``, so the
        results are a function of the key and the batch size.
    """
    n = len(arrays[keys[0]])
    bs = batch_size_for(n, batch_size, mesh)
    local = bs // jax.process_count()
    lo = jax.process_index() * local
    starts = range(0, n, bs)
    out = []
    with jax.set_mesh(mesh):
        for c, start in enumerate(
            progress.bar(starts, desc=desc, unit="batch") if desc else starts
        ):
            rows = (np.arange(start, start + bs) % n)[lo : lo + local]  # wrap: one shape
            batch = sharding.host_local_to_global({k: arrays[k][rows] for k in keys}, mesh)
            result = (
                fn(params, batch) if rng is None else fn(params, batch, jax.random.fold_in(rng, c))
            )
            result = (
                multihost_utils.process_allgather(result, tiled=True)
                if jax.process_count() > 1
                else jax.device_get(result)
            )
            out.append(jax.tree.map(np.asarray, result))
    return jax.tree.map(lambda *parts: np.concatenate(parts)[:n], *out)
