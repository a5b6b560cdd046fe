"""Reference log-probs precomputed once in a sharded pass and cached on disk.

The alternative to evaluating frozen reference params inside every step (``reference.mode =
'inline'``): one forward pass of the reference over the dataset, stored as ``ref_logps [n, N]``
(summed over response tokens) under a content hash of (token arrays — which capture the data and
its tokenisation —, the reference weights' fingerprint, the architecture). A later run over the
same data and reference reuses the file instead of recomputing, and the step then needs no
reference params at all (half the forward FLOPs, no second model in memory).
"""

from __future__ import annotations

import hashlib
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from dil_jax import paths, progress, scoring, sharding
from dil_jax.logprobs import sequence_logps

TOKEN_KEYS = ("input_ids", "attention_mask", "loss_mask")


FINGERPRINT_VERSION = "v2"  # exact bit sums; v1 (unprefixed) rounded float moments


@jax.jit
def _leaf_fingerprint(x):
    """Two wrapping uint32 sums over a parameter's float32 bits (plain and position-weighted).
    Integer sums are exact in any order, so every mesh (any reduction order, any compilation)
    gives the same pair; v1's rounded float moments flipped a digit when the order changed."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32).ravel(), jnp.uint32)  # [n]
    weights = jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) + 1
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])


def params_fingerprint(params) -> str:
    """Hash of the parameters' exact values, computed on their devices (no host copy of the
    model); ``FINGERPRINT_VERSION``-prefixed."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        sums = np.asarray(jax.device_get(_leaf_fingerprint(leaf)), np.uint32)
        h.update(f"{sharding.path_str(path)}:{leaf.shape}:{leaf.dtype}:{sums.tolist()}".encode())
    return f"{FINGERPRINT_VERSION}-{h.hexdigest()}"


def comparable_fingerprints(a: str | None, b: str | None) -> bool:
    """Whether two recorded fingerprints can be compared: both of the current version (a
    checkpoint written with v1 fingerprints is not checked; its rounded moments were not
    reproducible across meshes)."""
    prefix = f"{FINGERPRINT_VERSION}-"
    return bool(a and b and a.startswith(prefix) and b.startswith(prefix))


def content_key(arrays, params, model_cfg) -> str:
    h = hashlib.sha256()
    for k in TOKEN_KEYS:
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.shape}:{a.dtype}".encode())
        h.update(a.tobytes())
    h.update(params_fingerprint(params).encode())
    h.update(json.dumps(model_cfg.to_dict(), sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def compute_reference_logps(trainer, ref_params, arrays, batch_size: int) -> np.ndarray:
    """[n, N] summed reference log-probs in one sharded pass (``scoring.score_in_batches``)."""
    fn = jax.jit(
        lambda p, b: sequence_logps(trainer.model, trainer.family, p, b, **trainer.chunks).sum_logps
    )
    return scoring.score_in_batches(
        fn,
        ref_params,
        arrays,
        mesh=trainer.mesh,
        batch_size=batch_size,
        keys=TOKEN_KEYS,
        desc="reference log-probs",
    ).astype(np.float32)


def with_reference_logps(trainer, ref_params, arrays, config, workdir: str) -> dict:
    """``arrays`` plus ``ref_logps [n, N]``, from the on-disk cache when present.

    The forward pass is one sharded computation over all processes, so hit or miss is decided
    by process 0 and agreed by all (a cache directory not every process can read would
    otherwise leave some in the forward pass and others not). On a miss process 0 writes the
    file; the others then read it when they can, falling back to the values they computed.
    """
    cache_dir = config.reference.cache_dir or paths.sibling(workdir, "reference_cache")
    key = content_key(arrays, ref_params, config.model)
    path = paths.join(cache_dir, f"ref_logps-{key}.npy")
    expected = arrays["input_ids"].shape[:2]
    hit = paths.exists(path)
    if jax.process_count() > 1:
        hit = bool(multihost_utils.broadcast_one_to_all(np.asarray(hit)))
    ref = _load(path, expected) if hit else None
    if hit and ref is None:  # process 0 sees it, this process does not
        raise FileNotFoundError(
            f"reference cache {path} exists on process 0 but process {jax.process_index()} "
            "cannot read it: put reference.cache_dir on storage every host sees"
        )
    if ref is not None:
        progress.announce(f"reference log-probs: cache hit, loaded {path} (no forward pass)")
    else:
        ref = compute_reference_logps(trainer, ref_params, arrays, config.reference.batch_size)
        if jax.process_index() == 0:
            paths.save_npy(path, ref)  # atomic: a crash never leaves a half-written cache
        logging.info("reference log-probs computed and cached at %s", path)
    return dict(arrays, ref_logps=ref)


def _load(path: str, expected) -> np.ndarray | None:
    if not paths.exists(path):
        return None
    ref = paths.load_numpy(path)
    if ref.shape != expected:
        raise ValueError(f"reference cache {path} has shape {ref.shape}, expected {expected}")
    return ref
