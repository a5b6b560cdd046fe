"""dil_jax: LLM alignment from preferences and demonstrations as imitation learning, in JAX.

Importing the package has no side effects: no jax config changes, no device initialisation.
"""

__version__ = "0.1.0"
