"""Hand-computed checks of every formula in dil_jax.objectives against docs/objectives.md."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dil_jax import objectives as obj

# docs/objectives.md §1 test vectors: mean log-probs (pw, pl, rw, rl) and DPO(β=0.1), LSIF,
# UKL (code form), BCE.
VECTORS = np.array(
    [
        # pw,  pl,   rw,   rl,   dpo,      lsif,      ukl_code, bce
        [-1.0, -1.5, -1.0, -1.5, 0.693147, -0.5, 2.0, 1.386294],
        [-0.8, -1.8, -1.0, -1.5, 0.668460, -0.946997, 1.540818, 1.152494],
        [-1.2, -1.1, -1.0, -1.5, 0.723597, 0.294040, 2.691825, 1.711154],
    ],
    dtype=np.float64,
)


def _seqs(pw, pl, rw, rl, n_tokens=1.0):
    """SequenceLogps for [B] arrays of summed log-probs (n_tokens=1: sums equal means)."""
    policy = jnp.stack([jnp.asarray(pw), jnp.asarray(pl)], axis=1).astype(jnp.float32)
    reference = jnp.stack([jnp.asarray(rw), jnp.asarray(rl)], axis=1).astype(jnp.float32)
    return obj.SequenceLogps(
        policy=policy, n_tokens=jnp.full_like(policy, n_tokens), reference=reference
    )


def _vector_columns():
    pw, pl, rw, rl = (jnp.asarray(VECTORS[:, i], jnp.float32) for i in range(4))
    return pw, pl, rw, rl


# --- test vectors -----------------------------------------------------------------------------


def test_vectors_low_level():
    pw, pl, rw, rl = _vector_columns()
    dw, dl = pw - rw, pl - rl
    np.testing.assert_allclose(obj.dpo(dw, dl, beta=0.1), VECTORS[:, 4], atol=1e-6)
    np.testing.assert_allclose(obj.dil_lsif(dw, dl), VECTORS[:, 5], atol=1e-6)
    # Paper form −Δ_w + r_l = code form −pw + r_l plus logp_ref(y_w).
    np.testing.assert_allclose(obj.dil_ukl(dw, dl) - rw, VECTORS[:, 6], atol=1e-6)
    np.testing.assert_allclose(obj.dil_bce(dw, dl), VECTORS[:, 7], atol=1e-6)


@pytest.mark.parametrize("name,col", [("dpo", 4), ("dil_lsif", 5), ("dil_bce", 7)])
def test_vectors_through_compute_loss(name, col):
    # The vectors are on mean log-probs: feed sums of 3 tokens with the 'mean' reduction.
    pw, pl, rw, rl = _vector_columns()
    seqs = _seqs(3 * pw, 3 * pl, 3 * rw, 3 * rl, n_tokens=3.0)
    terms = obj.parse_loss_terms(
        [{"name": name, "reduction": "mean", "beta": 0.1} if name == "dpo" else {"name": name}]
    )
    loss, metrics = obj.compute_loss(terms, seqs)
    np.testing.assert_allclose(loss, VECTORS[:, col], atol=1e-6)
    np.testing.assert_allclose(metrics[f"loss/{name}"], VECTORS[:, col], atol=1e-6)


def test_ukl_code_form_through_compute_loss():
    pw, pl, rw, rl = _vector_columns()
    loss, _ = obj.compute_loss(obj.parse_loss_terms([{"name": "dil_ukl"}]), _seqs(pw, pl, rw, rl))
    np.testing.assert_allclose(loss - rw, VECTORS[:, 6], atol=1e-6)


# --- generic Bregman form and gradient table --------------------------------------------------

# Generic L_h minus the table's closed form: the constant the table drops.
GENERATORS = [
    ("lsif", obj.lsif_generator(), lambda dw, dl: obj.dil_lsif(dw, dl), 0.5),
    ("ukl", obj.ukl_generator(), lambda dw, dl: obj.dil_ukl(dw, dl), 0.0),
    ("bce", obj.bce_generator(), lambda dw, dl: obj.dil_bce(dw, dl), 0.0),
    ("basu", obj.basu_generator(0.5), lambda dw, dl: obj.dil_basu(dw, dl, alpha=0.5), 2.0),
]


@pytest.mark.parametrize("name,gen,closed,const", GENERATORS, ids=[g[0] for g in GENERATORS])
def test_generic_bregman_equals_closed_form(name, gen, closed, const):
    key_w, key_l = jax.random.split(jax.random.key(0))
    dw = jax.random.uniform(key_w, (64,), minval=-3.0, maxval=3.0)
    dl = jax.random.uniform(key_l, (64,), minval=-3.0, maxval=3.0)
    generic = obj.bregman_ratio_loss(dw, dl, h=gen.h, h_prime=gen.h_prime)
    np.testing.assert_allclose(generic, closed(dw, dl) + const, rtol=1e-5, atol=1e-5)
    g_generic = jax.grad(
        lambda a, b: obj.bregman_ratio_loss(a, b, h=gen.h, h_prime=gen.h_prime).sum(),
        argnums=(0, 1),
    )(dw, dl)
    g_closed = jax.grad(lambda a, b: closed(a, b).sum(), argnums=(0, 1))(dw, dl)
    for a, b in zip(g_generic, g_closed, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


_S = jax.nn.sigmoid
GRADIENT_TABLE = [  # name, loss(dw, dl), ∂/∂Δ_w, ∂/∂Δ_l
    ("lsif", obj.dil_lsif, lambda w, l: -np.exp(w), lambda w, l: np.exp(2 * l)),
    ("ukl", obj.dil_ukl, lambda w, l: -np.ones_like(w), lambda w, l: np.exp(l)),
    ("bce", obj.dil_bce, lambda w, l: -_S(-w), lambda w, l: _S(l)),
    (
        "basu",
        lambda w, l: obj.dil_basu(w, l, alpha=0.7),
        lambda w, l: -1.7 * np.exp(0.7 * w),
        lambda w, l: 1.7 * np.exp(1.7 * l),
    ),
]


@pytest.mark.parametrize("name,loss,gw,gl", GRADIENT_TABLE, ids=[g[0] for g in GRADIENT_TABLE])
def test_gradient_table(name, loss, gw, gl):
    dw = jnp.array([-2.0, -0.3, 0.0, 0.4, 1.5], jnp.float32)
    dl = jnp.array([1.0, -1.2, 0.0, 0.25, -2.0], jnp.float32)
    grad_w, grad_l = jax.grad(lambda a, b: loss(a, b).sum(), argnums=(0, 1))(dw, dl)
    np.testing.assert_allclose(grad_w, gw(dw, dl), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad_l, gl(dw, dl), rtol=1e-6, atol=1e-6)


def test_beta_is_a_temperature_on_delta():
    dw, dl = jnp.array([0.3, -0.5]), jnp.array([-0.2, 0.8])
    for fn in (obj.dil_lsif, obj.dil_ukl, obj.dil_bce):
        np.testing.assert_allclose(fn(dw, dl, beta=0.5), fn(0.5 * dw, 0.5 * dl), atol=1e-7)


# --- propositions (docs/objectives.md §1) -----------------------------------------------------


def _random_dists(seed, k=7):
    rng = np.random.default_rng(seed)
    return [rng.dirichlet(np.ones(k)) for _ in range(3)]


def _kl(p, q):
    return float(np.sum(p * (np.log(p) - np.log(q))))


def test_proposition_1_kl_decomposition():
    for seed in range(5):
        pi, p_ch, p_ref = _random_dists(seed)
        lhs = _kl(pi, p_ch)
        rhs = _kl(pi, p_ref) - float(np.sum(pi * np.log(p_ch / p_ref)))
        assert lhs == pytest.approx(rhs, abs=1e-12)


def test_proposition_2_optimum_is_chosen_distribution():
    _, p_ch, p_ref = _random_dists(1)
    log_r = np.log(p_ch / p_ref)
    # Closed form: π_ref·r, with partition function exactly 1.
    assert float(np.sum(p_ref * np.exp(log_r))) == pytest.approx(1.0, abs=1e-12)

    def objective(logits):  # E_π[log r] − KL(π || π_ref)
        log_pi = jax.nn.log_softmax(logits)
        pi = jnp.exp(log_pi)
        return jnp.sum(pi * log_r) - jnp.sum(pi * (log_pi - jnp.log(p_ref)))

    logits = jnp.zeros(len(p_ch))
    opt = optax.adam(0.1)
    state = opt.init(logits)

    def step(carry, _):
        logits, state = carry
        g = jax.grad(lambda z: -objective(z))(logits)
        updates, state = opt.update(g, state)
        return (optax.apply_updates(logits, updates), state), None

    (logits, _), _ = jax.lax.scan(step, (logits, state), None, length=2000)
    np.testing.assert_allclose(jax.nn.softmax(logits), p_ch, atol=1e-4)
    # The maximum value is log Z = log Σ π_ref·r = 0.
    assert float(objective(jnp.log(p_ch))) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "loss",
    [obj.dil_lsif, obj.dil_ukl, obj.dil_bce, lambda w, l: obj.dil_basu(w, l, alpha=0.5)],
    ids=["lsif", "ukl", "bce", "basu"],
)
def test_proposition_3_population_loss_recovers_ratio(loss):
    _, p_ch, p_ref = _random_dists(2, k=6)
    weights = jnp.asarray(np.outer(p_ch, p_ref), jnp.float32)  # y_w ~ p_ch, y_l ~ p_ref

    def population(theta):  # θ = free tabular log-ratio, one entry per response
        return jnp.sum(weights * loss(theta[:, None], theta[None, :]))

    opt = optax.adam(0.05)
    theta = jnp.zeros(len(p_ch))
    state = opt.init(theta)

    def step(carry, _):
        theta, state = carry
        updates, state = opt.update(jax.grad(population)(theta), state)
        return (optax.apply_updates(theta, updates), state), None

    (theta, _), _ = jax.lax.scan(step, (theta, state), None, length=3000)
    np.testing.assert_allclose(np.exp(theta), p_ch / p_ref, rtol=1e-3)


def test_proposition_4_cpc_with_one_negative_is_dpo():
    key_w, key_l = jax.random.split(jax.random.key(3))
    dw = 5 * jax.random.normal(key_w, (32,))
    dl = 5 * jax.random.normal(key_l, (32,))
    for beta in (0.1, 1.0, 2.5):
        np.testing.assert_allclose(
            obj.cpc_ratio_loss(dw, dl[:, None], beta=beta),
            obj.dpo(dw, dl, beta=beta),
            rtol=1e-5,
            atol=1e-6,
        )


# --- DPO family vs hand computations ----------------------------------------------------------

DW = jnp.array([0.2, -1.0, 3.0], jnp.float32)
DL = jnp.array([-0.3, 0.5, 1.0], jnp.float32)
D = np.array([0.5, -1.5, 2.0])


def _log_sigmoid(z):
    return -np.log1p(np.exp(-z))


def test_dpo_family_hand_computed():
    b, e = 0.1, 0.2
    np.testing.assert_allclose(obj.dpo(DW, DL, beta=b), -_log_sigmoid(b * D), atol=1e-6)
    np.testing.assert_allclose(
        obj.cdpo(DW, DL, beta=b, label_smoothing=e),
        -(1 - e) * _log_sigmoid(b * D) - e * _log_sigmoid(-b * D),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        obj.robust_dpo(DW, DL, beta=b, label_smoothing=e),
        (-(1 - e) * _log_sigmoid(b * D) + e * _log_sigmoid(-b * D)) / (1 - 2 * e),
        atol=1e-6,
    )
    np.testing.assert_allclose(obj.ipo(DW, DL, beta=b), (D - 5.0) ** 2, atol=1e-5)
    np.testing.assert_allclose(obj.hinge(DW, DL, beta=1.0), np.maximum(0, 1 - D), atol=1e-6)
    # First row by hand: d = 0.5, β = 0.1: log(1 + e^{-0.05}).
    assert float(obj.dpo(DW, DL, beta=b)[0]) == pytest.approx(0.6684600, abs=1e-6)
    assert float(obj.hinge(DW, DL, beta=1.0)[0]) == pytest.approx(0.5, abs=1e-7)


def test_fdpo_reverse_kl_is_dpo():
    key_w, key_l = jax.random.split(jax.random.key(4))
    dw, dl = 3 * jax.random.normal(key_w, (64,)), 3 * jax.random.normal(key_l, (64,))
    np.testing.assert_allclose(
        obj.fdpo(dw, dl, beta=0.1, divergence="reverse_kl"), obj.dpo(dw, dl, beta=0.1), atol=1e-6
    )


def test_fdpo_other_divergences_hand_computed():
    b, a = 0.5, 0.3
    dw, dl = np.asarray(DW, np.float64), np.asarray(DL, np.float64)
    rw, rl = np.exp(dw), np.exp(dl)
    cases = {
        "forward_kl": (-1 / rw, -1 / rl),
        "js": (np.log(2 * rw / (1 + rw)), np.log(2 * rl / (1 + rl))),
        "alpha": ((1 - rw**-a) / a, (1 - rl**-a) / a),
    }
    for divergence, (fw, fl) in cases.items():
        np.testing.assert_allclose(
            obj.fdpo(DW, DL, beta=b, divergence=divergence, alpha=a),
            -_log_sigmoid(b * fw - b * fl),
            atol=1e-6,
            err_msg=divergence,
        )


def test_reference_free_losses_hand_computed():
    mw = jnp.array([-0.5, -2.0], jnp.float32)
    ml = jnp.array([-1.0, -1.5], jnp.float32)
    mw64, ml64 = np.asarray(mw, np.float64), np.asarray(ml, np.float64)
    np.testing.assert_allclose(
        obj.simpo(mw, ml, beta=2.0, gamma=0.5), -_log_sigmoid(2.0 * (mw64 - ml64) - 0.5), atol=1e-6
    )
    nll = jnp.array([0.7, 1.1], jnp.float32)
    np.testing.assert_allclose(
        obj.cpo(mw, ml, nll, beta=0.1, lam=1.0),
        -_log_sigmoid(0.1 * (mw64 - ml64)) + np.array([0.7, 1.1]),
        atol=1e-6,
    )

    def odds(m):
        p = np.exp(m)
        return np.log(p / (1 - p))

    np.testing.assert_allclose(
        obj.orpo(mw, ml, lam=0.1), -mw64 - 0.1 * _log_sigmoid(odds(mw64) - odds(ml64)), atol=1e-6
    )
    np.testing.assert_allclose(obj.sft(mw), -mw64, atol=1e-7)


def test_log_odds_is_stable_near_zero_and_far_below():
    x = jnp.array([-1e-9, -1e-5, -0.1, -0.69, -0.7, -5.0, -80.0, -200.0], jnp.float32)
    lo = obj.log_odds(x)
    assert bool(jnp.all(jnp.isfinite(lo)))
    x64 = np.array([-1e-5, -0.1, -0.69, -0.7, -5.0])
    np.testing.assert_allclose(lo[1:6], x64 - np.log(-np.expm1(x64)), rtol=1e-5)
    assert float(lo[-1]) == pytest.approx(-200.0, abs=1e-4)  # odds ≈ p far below 0
    g = jax.grad(lambda m: obj.orpo(m, m - 1.0, lam=0.1).sum())(x)
    assert bool(jnp.all(jnp.isfinite(g)))


# --- overflow safety --------------------------------------------------------------------------

OVERFLOW_CASES = [
    {"name": n}
    for n in [
        "dil_lsif",
        "dil_ukl",
        "dil_bce",
        "dil_basu",
        "dpo",
        "cdpo",
        "robust",
        "ipo",
        "hinge",
        "simpo",
        "cpo",
        "orpo",
    ]
] + [{"name": "fdpo", "divergence": d} for d in obj.FDPO_DIVERGENCES]


@pytest.mark.parametrize("entry", OVERFLOW_CASES, ids=lambda e: "-".join(e.values()))
def test_overflow_safe_with_huge_log_ratios(entry):
    if entry["name"] not in ("simpo", "orpo"):  # the two inherently length-averaged losses
        entry = {**entry, "reduction": "sum"}
    terms = obj.parse_loss_terms([entry])
    big = 1e4
    policy = jnp.array([[big, -big], [-big, big], [big, big], [-big, -big]], jnp.float32)
    reference = jnp.zeros_like(policy)
    n_tokens = jnp.full_like(policy, 500.0)

    def total(p):
        loss, _ = obj.compute_loss(terms, obj.SequenceLogps(p, n_tokens, reference))
        return loss.sum()

    value, grad = jax.value_and_grad(total)(policy)
    assert bool(jnp.isfinite(value)), (entry, value)
    assert bool(jnp.all(jnp.isfinite(grad))), (entry, grad)


def test_guard_is_exact_inside_and_tangent_outside():
    dw = jnp.array([0.5, 30.0], jnp.float32)
    dl = jnp.array([-0.5, 30.0], jnp.float32)
    loss = obj.dil_lsif(dw, dl, max_log_ratio=20.0)
    assert float(loss[0]) == pytest.approx(-math.exp(0.5) + 0.5 * math.exp(-1.0), rel=1e-6)
    # Beyond the guard each exponential follows its tangent: e^m (1 + x − m).
    expected = -math.exp(20.0) * 11.0 + 0.5 * math.exp(40.0) * 21.0
    assert float(loss[1]) == pytest.approx(expected, rel=1e-6)
    grads = jax.grad(lambda a, b: obj.dil_lsif(a, b).sum(), argnums=(0, 1))(dw, dl)
    # Never a dead zero: the tangent's slopes −e^m and ½·2·e^{2m}.
    assert float(grads[0][1]) == pytest.approx(-math.exp(20.0), rel=1e-6)
    assert float(grads[1][1]) == pytest.approx(math.exp(40.0), rel=1e-6)


def _analytic_grads(name, dw, dl, m):
    """docs/objectives.md §1 gradient table, with the tangent slope where β·Δ passes the guard m."""
    e = math.exp
    if name == "dil_lsif":
        return -e(min(dw, m)), e(min(2 * dl, 2 * m))
    if name == "dil_ukl":
        return -1.0, e(min(dl, m))
    if name == "dil_bce":  # −σ(−Δ_w), σ(Δ_l) in a stable form
        sig = lambda x: 1.0 / (1.0 + e(-x)) if x >= 0 else e(x) / (1.0 + e(x))  # noqa: E731
        return -sig(-dw), sig(dl)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["dil_lsif", "dil_ukl", "dil_bce"])
@pytest.mark.parametrize("size", [25.0, 100.0, 1e4])
@pytest.mark.parametrize("signs", [(1, 1), (-1, -1), (1, -1), (-1, 1)])
def test_dil_gradients_at_large_log_ratios_match_the_table(name, size, signs):
    """Issue 14: under `sum` the old clip made ∂L/∂Δ_w = 0 at Δ_w = −25 (true value −1 for UKL)."""
    dw, dl = signs[0] * size, signs[1] * size
    terms = obj.parse_loss_terms([{"name": name, "reduction": "sum"}])
    m = terms[0].params.get("max_log_ratio", obj.DEFAULT_MAX_LOG_RATIO)
    policy = jnp.array([[dw, dl]], jnp.float32)

    def total(p):
        loss, _ = obj.compute_loss(
            terms, obj.SequenceLogps(p, jnp.full_like(p, 300.0), jnp.zeros_like(p))
        )
        return loss.sum()

    grad = jax.grad(total)(policy)[0]
    gw, gl = _analytic_grads(name, dw, dl, m)
    assert bool(jnp.all(jnp.isfinite(grad)))
    np.testing.assert_allclose(np.asarray(grad), [gw, gl], rtol=1e-5, atol=1e-30)
    if name == "dil_ukl":
        assert float(grad[0]) == -1.0  # the chosen term is never clipped


def test_ukl_gradient_exact_at_25_nats_with_a_wide_guard():
    grad = jax.grad(lambda d: obj.dil_ukl(d[0], d[1], max_log_ratio=44.0).sum())(
        jnp.array([[-25.0], [25.0]], jnp.float32)
    )
    np.testing.assert_allclose(np.asarray(grad)[:, 0], [-1.0, math.exp(25.0)], rtol=1e-6)


def test_guarded_exp_value_and_gradient():
    x = jnp.array([-1e4, -3.0, 5.0, 7.0, 1e4], jnp.float32)
    y, g = jax.vmap(jax.value_and_grad(lambda v: obj.guarded_exp(v, 5.0)))(x)
    np.testing.assert_allclose(y[:4], [0.0, math.exp(-3), math.exp(5), 3 * math.exp(5)], rtol=1e-6)
    np.testing.assert_allclose(
        g, [0.0, math.exp(-3), math.exp(5), math.exp(5), math.exp(5)], rtol=1e-6
    )


# --- combiner ---------------------------------------------------------------------------------


def test_combination_weights_and_metrics():
    pw, pl, rw, rl = _vector_columns()
    seqs = _seqs(pw, pl, rw, rl)
    seqs = seqs._replace(mean_logits=jnp.ones_like(seqs.policy) * jnp.array([[0.25, -0.5]]))
    terms = obj.parse_loss_terms([{"name": "dil_lsif"}, {"name": "sft", "weight": 0.1}])
    loss, m = obj.compute_loss(terms, seqs)
    np.testing.assert_allclose(loss, VECTORS[:, 5] + 0.1 * -VECTORS[:, 0], atol=1e-6)
    np.testing.assert_allclose(m["loss/dil_lsif"], VECTORS[:, 5], atol=1e-6)
    np.testing.assert_allclose(m["loss/sft"], -VECTORS[:, 0], atol=1e-6)
    np.testing.assert_allclose(m["loss"], loss)
    # DIL rewards are Δ (β = 1); logps in the term's (mean) reduction.
    np.testing.assert_allclose(m["rewards/chosen"], pw - rw, atol=1e-7)
    np.testing.assert_allclose(m["rewards/rejected"], pl - rl, atol=1e-7)
    np.testing.assert_allclose(m["rewards/margins"], (pw - rw) - (pl - rl), atol=1e-7)
    np.testing.assert_allclose(m["rewards/accuracies"], [0.0, 1.0, 0.0])
    np.testing.assert_allclose(m["logps/chosen"], pw)
    np.testing.assert_allclose(m["logps/rejected"], pl)
    np.testing.assert_allclose(m["logits/chosen"], [0.25] * 3)
    np.testing.assert_allclose(m["logits/rejected"], [-0.5] * 3)
    assert all(v.shape == (3,) for v in m.values())


def test_logits_metrics_average_per_token_like_trl():
    # Two chosen responses: 1 token with mean logit 1.0, 3 tokens with mean logit 3.0. TRL takes
    # the mean over all 4 tokens, (1 + 9) / 4 = 2.5, not the mean of sequence means (2.0).
    seqs = obj.SequenceLogps(
        policy=jnp.zeros((2, 2)),
        n_tokens=jnp.array([[1.0, 2.0], [3.0, 2.0]]),
        reference=jnp.zeros((2, 2)),
        mean_logits=jnp.array([[1.0, -1.0], [3.0, 0.0]]),
    )
    _, m = obj.compute_loss(obj.parse_loss_terms(["dpo"]), seqs)
    np.testing.assert_allclose(m["logits/chosen"], [2.5, 2.5])
    np.testing.assert_allclose(m["logits/rejected"], [-0.5, -0.5])


def test_dpo_rewards_are_beta_delta_on_sums():
    seqs = obj.SequenceLogps(
        policy=jnp.array([[-10.0, -20.0]]),
        n_tokens=jnp.array([[4.0, 5.0]]),
        reference=jnp.array([[-12.0, -18.0]]),
    )
    loss, m = obj.compute_loss(obj.parse_loss_terms([{"name": "dpo"}]), seqs)
    assert float(loss[0]) == pytest.approx(math.log1p(math.exp(-0.1 * 4.0)), abs=1e-6)
    assert float(m["rewards/chosen"][0]) == pytest.approx(0.2, abs=1e-6)
    assert float(m["rewards/rejected"][0]) == pytest.approx(-0.2, abs=1e-6)
    assert float(m["logps/chosen"][0]) == -10.0
    # Mean reduction divides policy and reference by n_tokens.
    _, m = obj.compute_loss(obj.parse_loss_terms([{"name": "dpo", "reduction": "mean"}]), seqs)
    assert float(m["rewards/chosen"][0]) == pytest.approx(0.1 * (-10 / 4 + 12 / 4), abs=1e-6)
    assert float(m["logps/rejected"][0]) == pytest.approx(-4.0)


def test_reference_free_rewards_and_cpo_nll_is_per_token():
    seqs = obj.SequenceLogps(policy=jnp.array([[-10.0, -20.0]]), n_tokens=jnp.array([[4.0, 5.0]]))
    loss, m = obj.compute_loss(obj.parse_loss_terms([{"name": "cpo"}]), seqs)
    expected = math.log1p(math.exp(-0.1 * 10.0)) + 1.0 * 10.0 / 4.0
    assert float(loss[0]) == pytest.approx(expected, abs=1e-6)
    assert float(m["rewards/chosen"][0]) == pytest.approx(-1.0, abs=1e-6)
    loss, m = obj.compute_loss(obj.parse_loss_terms([{"name": "simpo"}]), seqs)
    assert float(loss[0]) == pytest.approx(math.log1p(math.exp(-(2.0 * 1.5 - 0.5))), abs=1e-6)
    assert float(m["rewards/margins"][0]) == pytest.approx(2.0 * 1.5, abs=1e-6)
    assert not obj.needs_reference(obj.parse_loss_terms(["simpo", "orpo", "cpo", "sft"]))
    assert obj.needs_reference(obj.parse_loss_terms(["sft", "dil_bce"]))


def test_demonstrations_only_allow_sft():
    seqs = obj.SequenceLogps(policy=jnp.array([[-6.0], [-3.0]]), n_tokens=jnp.array([[3.0], [0.0]]))
    loss, m = obj.compute_loss(obj.parse_loss_terms(["sft"]), seqs)
    np.testing.assert_allclose(loss, [2.0, 3.0])  # an empty row divides by max(n, 1)
    np.testing.assert_allclose(m["logps/chosen"], [-2.0, -3.0])
    assert "rewards/chosen" not in m
    loss, _ = obj.compute_loss(obj.parse_loss_terms([{"name": "sft", "reduction": "sum"}]), seqs)
    np.testing.assert_allclose(loss, [6.0, 3.0])
    with pytest.raises(ValueError, match="needs \\(chosen, rejected\\) pairs"):
        obj.compute_loss(obj.parse_loss_terms(["sft", "simpo"]), seqs)


def test_missing_reference_is_a_clear_error():
    seqs = obj.SequenceLogps(policy=jnp.zeros((2, 2)), n_tokens=jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="needs reference"):
        obj.compute_loss(obj.parse_loss_terms(["dpo"]), seqs)


def test_compute_loss_jits_and_differentiates():
    terms = obj.parse_loss_terms(
        [{"name": "dil_lsif"}, {"name": "dpo", "weight": 0.5}, {"name": "sft", "weight": 0.1}]
    )
    seqs = _seqs(*_vector_columns())

    @jax.jit
    def f(policy):
        loss, metrics = obj.compute_loss(terms, seqs._replace(policy=policy))
        return loss.mean(), metrics

    (value, metrics), grad = jax.value_and_grad(f, has_aux=True)(seqs.policy)
    assert grad.shape == seqs.policy.shape and bool(jnp.all(jnp.isfinite(grad)))
    assert set(metrics) >= {"loss/dil_lsif", "loss/dpo", "loss/sft", "rewards/chosen"}


# --- parsing ----------------------------------------------------------------------------------


def test_parse_fills_defaults_and_accepts_configdict():
    import ml_collections

    cfg = ml_collections.ConfigDict({"name": "dpo", "beta": 0.2})
    terms = obj.parse_loss_terms([cfg, {"name": "slic"}, "dil_lsif"])
    assert terms[0].params == {"beta": 0.2, "reduction": "sum"}
    assert terms[1].params == {"beta": 0.1, "reduction": "sum"}
    assert terms[2].params["reduction"] == "mean" and terms[2].params["beta"] == 1.0
    assert obj.LOSSES["slic"] is obj.LOSSES["hinge"]
    assert hash(terms[0]) == hash(obj.LossTerm("dpo", 1.0, {"reduction": "sum", "beta": 0.2}))
    assert obj.parse_loss_terms(terms) == terms
    assert obj.LOSSES["ipo"].defaults["reduction"] == "mean"
    assert obj.LOSSES["simpo"].defaults == {"beta": 2.0, "gamma": 0.5, "reduction": "mean"}


@pytest.mark.parametrize(
    "entry,field",
    [
        ({"name": "dpx"}, "'name'"),
        ({"name": "dpo", "betta": 0.1}, "'betta'"),
        ({"name": "dpo", "beta": -1.0}, "'beta'"),
        ({"name": "dil_lsif", "beta": 0.0}, "'beta'"),
        ({"name": "cdpo", "label_smoothing": 0.5}, "'label_smoothing'"),
        ({"name": "robust", "label_smoothing": -0.1}, "'label_smoothing'"),
        ({"name": "fdpo", "alpha": 0.0}, "'alpha'"),
        ({"name": "dil_basu", "alpha": -1.0}, "'alpha'"),
        ({"name": "dil_basu", "alpha": 5.0}, "'alpha'"),
        ({"name": "fdpo", "divergence": "hellinger"}, "'divergence'"),
        ({"name": "dpo", "reduction": "avg"}, "'reduction'"),
        ({"name": "simpo", "reduction": "sum"}, "'reduction'"),
        ({"name": "dpo", "beta": "0.1"}, "'beta'"),
        ({"name": "dpo", "weight": -1.0}, "'weight'"),
        ({"name": "dil_ukl", "max_log_ratio": 100.0}, "'max_log_ratio'"),
        ({"name": "sft", "beta": 0.1}, "'beta'"),
    ],
)
def test_parse_errors_name_the_field(entry, field):
    with pytest.raises(ValueError, match=field):
        obj.parse_loss_terms([{"name": "sft"}, entry])
