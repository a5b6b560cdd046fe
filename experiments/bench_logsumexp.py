"""The LM head's log-sum-exp: jax.nn.logsumexp against `logprobs.row_sum`, alternating in one run.

  python experiments/bench_logsumexp.py                  # the bench_vs_trl step's head
  python experiments/bench_logsumexp.py --tokens=4096 --vocab=32000

XLA:CPU emits a reduction whose operand is fused elementwise work as a slow loop. The head of
the train step sums `exp(logits − max)` over a 50257-word vocabulary for every token; this times
that log-sum-exp (the forward pass, under `jit`, logits from `[tokens, D] @ [D, V]`: the step's
custom VJP recomputes the logits for its backward pass and keeps only the result) written
plainly (`jax.nn.logsumexp`) and as `dil_jax.logprobs` computes it (max, `exp` written out,
`logprobs.row_sum`).

Printed: milliseconds of the logits matmul alone and of each log-sum-exp (median over
``--rounds``), what each costs beyond the matmul, the speed-up, and the largest difference
between the two (float32 rounding).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from dil_jax import logprobs  # noqa: E402


def _lse_plain(h, w):
    return jax.nn.logsumexp(h @ w, axis=-1)  # [N]


def _lse_rows(h, w):
    logits = h @ w  # [N, V]
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    return m + jnp.log(logprobs.row_sum(jnp.exp(logits - m[:, None])))


def _time(fn, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile, first touch of the buffers
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=2044)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()

    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((args.tokens, args.width), np.float32))
    w = jnp.asarray(rng.standard_normal((args.width, args.vocab), np.float32) * 0.05)
    fns = {
        "matmul only": jax.jit(lambda h, w: h @ w),
        "jax.nn.logsumexp": jax.jit(_lse_plain),
        "row_sum": jax.jit(_lse_rows),
    }
    diff = float(jnp.max(jnp.abs(fns["jax.nn.logsumexp"](h, w) - fns["row_sum"](h, w))))
    times = {name: [] for name in fns}
    for _ in range(args.rounds):  # alternate, so load hits all alike
        for name, fn in fns.items():
            times[name].append(_time(fn, (h, w), args.reps))
    ms = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"{jax.devices()[0].device_kind}: logits [{args.tokens}, {args.vocab}] from width "
        f"{args.width}, median of {args.rounds} rounds"
    )
    print(f"{'':18s} {'ms':>8s} {'beyond the matmul':>18s}")
    for name, t in ms.items():
        extra = "" if name == "matmul only" else f"{t - ms['matmul only']:18.1f}"
        print(f"{name:18s} {t:8.1f} {extra}")
    plain, rows = ms["jax.nn.logsumexp"], ms["row_sum"]
    print(f"speed-up of the log-sum-exp {plain / rows:.2f}x; max |difference| {diff:.2e}")


if __name__ == "__main__":
    main()
