"""Reference refresh for iterative alignment: keep π_0, hard-replace it, or soft-mix (TR-DPO).

``fixed`` keeps the initial policy as the reference for the whole run (DITTO, online DPO with a
fixed anchor); ``hard`` replaces the reference with the current policy at the start of every
round (SPIN, iterative DPO); ``soft`` is TR-DPO's update (Gorbatovski et al. 2024)

    π_ref ← α · π_θ + (1 − α) · π_ref        every τ optimiser steps,

applied to the parameters inside the jitted step, so the reference is part of the checkpointed
train state and a resumed run refreshes it exactly as the uninterrupted one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

REFERENCE_MODES = ("fixed", "hard", "soft")


def round_start_reference(mode: str, *, initial, policy, reference):
    """The reference a round starts with: π_0 (``fixed``), the current policy (``hard``) or
    the reference carried over from the previous round (``soft``)."""
    if mode == "fixed":
        return initial
    if mode == "hard":
        return policy
    if mode == "soft":
        return reference
    raise ValueError(f"online.reference={mode!r}: expected one of {REFERENCE_MODES}")


def soft_update(reference, policy, step: jax.Array, *, alpha: float, every: int):
    """TR-DPO's soft update, applied when ``step % every == 0`` (jittable, pure).

    Args:
      reference, policy: params trees of the same structure.
      step: ``[]`` int32, the optimiser step just taken (1-based).
      alpha: weight of the policy in the mix, in [0, 1].
      every: τ >= 1.
    Returns:
      The new reference tree, each leaf in its own dtype (the mix itself in float32).
    """
    do = (step % every) == 0

    def mix(r, p):
        mixed = alpha * p.astype(jnp.float32) + (1.0 - alpha) * r.astype(jnp.float32)
        return jnp.where(do, mixed.astype(r.dtype), r)

    return jax.tree.map(mix, reference, policy)
