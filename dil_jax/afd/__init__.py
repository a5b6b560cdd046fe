"""Alignment from demonstrations (Sun & van der Schaar): forward KL is SFT on demonstrations
(the core trainer), reverse KL is adversarial imitation (``adversarial``), and the paper's
practical algorithm is reward-model extrapolation with Best-of-N (``extrapolation``).

Modules: ``reward_model`` (scalar-head reward models and discriminators), ``rollouts`` (policy
samples as training arrays), ``adversarial`` (discriminator vs RLOO policy), ``extrapolation``
(π_0 → π_SFT → classifier reward models → Best-of-N), ``ablation`` (every divergence from one
base policy on the gold task), ``main`` (the ``python -m dil_jax.afd.main`` entry point).
"""
