"""Iterative and online alignment: sample from the current policy, build pairs, train, repeat.

``pairs`` holds the pure pair builders (DITTO, SPIN, reward-ranked), ``refresh`` the reference
update rules, ``iterative`` the round loop on the one training runtime (dil_jax/loop.py), and
``mixing`` decode-time log-linear mixtures of several policies (MPO-style).
"""
