"""f-divergence imitation rewards: the variational f-GAN family as functions of a BCE
discriminator's logit (f-GAIL / f-MAX; Nowozin et al. 2016, Ghasemipour et al. 2019).

An f-divergence ``D_f(P || Q) = E_Q[f(p/q)]`` (P the expert's response distribution, Q the
policy's) has the variational form ``sup_T E_P[T] − E_Q[f*(T)]`` whose maximiser is
``T* = f'(u)`` with ``u = p/q`` the density ratio. A BCE discriminator ``D = σ(ℓ)`` trained
with demonstrations as class 1 and policy samples as class 0 has, at its optimum,
``ℓ* = log p − log q`` (balanced classes), so ``u = exp(ℓ)`` and any member of the family is one
transform of the same logit away. The policy minimises ``−E_Q[f*(T*)]``, i.e. maximises the
reward

    r(ℓ) = f*(f'(u)) = u·f'(u) − f(u),         u = exp(ℓ)

(the policy-side half of the variational bound; by construction
``E_P[T*] − E_Q[r] = D_f(P || Q)`` at the optimal discriminator, which the tests check on a
tabular case). Closed forms, up to nothing:

=============  ==========================  =====================  ===========================
name           D_f(P || Q)                 f(u)                   reward r(ℓ)
=============  ==========================  =====================  ===========================
kl             KL(P || Q) (forward)        u log u                u = e^ℓ
reverse_kl     KL(Q || P)                  −log u                 ℓ − 1
js             2·JS(P, Q) (GAIL)           u log u − (u+1)        softplus(ℓ) − log 2
                                           log((u+1)/2)
chi2           Pearson χ²(P || Q)          (u − 1)²               e^{2ℓ} − 1
hellinger      squared Hellinger           (√u − 1)²              e^{ℓ/2} − 1
tv             total variation             |u − 1| / 2            sign(ℓ) / 2
=============  ==========================  =====================  ===========================

(``js``'s f(u) = u log u − (u+1) log((u+1)/2) gives 2·JS; its reward is GAIL's
``−log(1 − D)`` less log 2.) The
exponential rewards (kl, chi2) are clipped at ``ℓ ≤ max_logit`` before exponentiating so a sure
discriminator cannot overflow float32; the adversarial loop's divergence guard bounds ``|ℓ|``
anyway.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

DIVERGENCES = ("kl", "reverse_kl", "js", "chi2", "hellinger", "tv")
MAX_LOGIT = 30.0  # exp(2·30) ≈ 1e26: finite in float32


def reward(logits: jax.Array, name: str, max_logit: float = MAX_LOGIT) -> jax.Array:
    """The policy reward ``f*(f'(e^ℓ))`` of divergence ``name`` from discriminator logits.

    Args:
      logits: ``[...]`` discriminator logits ℓ = log D − log(1 − D).
      name: one of :data:`DIVERGENCES`.
    Returns:
      ``[...]`` float32 rewards.
    """
    ell = jnp.asarray(logits, jnp.float32)  # reward maths in float32
    capped = jnp.minimum(ell, max_logit)
    if name == "kl":
        return jnp.exp(capped)
    if name == "reverse_kl":
        return ell - 1.0
    if name == "js":
        return jax.nn.softplus(ell) - math.log(2.0)
    if name == "chi2":
        return jnp.exp(2.0 * capped) - 1.0
    if name == "hellinger":
        return jnp.exp(0.5 * capped) - 1.0
    if name == "tv":
        return 0.5 * jnp.sign(ell)
    raise ValueError(f"f-divergence {name!r}: expected one of {DIVERGENCES}")


def critic(logits: jax.Array, name: str, max_logit: float = MAX_LOGIT) -> jax.Array:
    """``T = f'(e^ℓ)``, the f-GAN critic's value on the expert side of the bound (float32)."""
    ell = jnp.minimum(jnp.asarray(logits, jnp.float32), max_logit)
    u = jnp.exp(ell)
    if name == "kl":
        return 1.0 + ell
    if name == "reverse_kl":
        return -jnp.exp(-ell)
    if name == "js":
        return math.log(2.0) + ell - jax.nn.softplus(ell)  # log(2u / (u + 1))
    if name == "chi2":
        return 2.0 * (u - 1.0)
    if name == "hellinger":
        return 1.0 - jnp.exp(-0.5 * ell)
    if name == "tv":
        return 0.5 * jnp.sign(ell)
    raise ValueError(f"f-divergence {name!r}: expected one of {DIVERGENCES}")


def divergence(p: np.ndarray, q: np.ndarray, name: str) -> float:
    """The closed form ``D_f(P || Q) = Σ_x q(x) f(p(x)/q(x))`` of discrete P, Q (q > 0), float64,
    written per divergence in its usual form (the tabular reference for the tests)."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if name == "kl":
        return float(np.sum(p * np.log(p / q)))
    if name == "reverse_kl":
        return float(np.sum(q * np.log(q / p)))
    if name == "js":
        m = 0.5 * (p + q)
        return float(np.sum(p * np.log(p / m)) + np.sum(q * np.log(q / m)))  # 2·JS
    if name == "chi2":
        return float(np.sum((p - q) ** 2 / q))
    if name == "hellinger":
        return float(np.sum((np.sqrt(p) - np.sqrt(q)) ** 2))
    if name == "tv":
        return float(0.5 * np.sum(np.abs(p - q)))
    raise ValueError(f"f-divergence {name!r}: expected one of {DIVERGENCES}")
