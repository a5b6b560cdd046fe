"""The rest of the field's losses (TRL's loss types, SimPER, Cal-DPO, KTO, listwise), the
declared hyper-parameter table and the combination rules, each against hand-computed numbers."""

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dil_jax import objectives as obj
from dil_jax import validation
from dil_jax.errors import ConfigError

DW, DL, BETA = 0.6, -0.4, 0.5  # Δ_w, Δ_l; d = 1.0, βd = 0.5


def _arr(*xs):
    return jnp.asarray(xs, jnp.float32)


def _seqs(pw, pl, rw=0.0, rl=0.0, n=(1.0, 1.0), **kw):
    policy = jnp.asarray([[pw, pl]], jnp.float32)
    return obj.SequenceLogps(
        policy=policy,
        n_tokens=jnp.asarray([n], jnp.float32),
        reference=jnp.asarray([[rw, rl]], jnp.float32),
        **kw,
    )


# Values worked out with Python's math module from each paper's formula (see the docstrings).
@pytest.mark.parametrize(
    "fn,kwargs,expected",
    [
        (obj.exo_pair, {"beta": BETA, "label_smoothing": 0.1}, 0.27205483350588544),
        (obj.nca_pair, {"beta": BETA}, 1.2806023013935863),
        (obj.sppo_hard, {"beta": BETA}, 0.52),  # (0.6 − 1)² + (−0.4 + 1)²
        (obj.apo_zero, {"beta": BETA}, 0.8757234858758631),
        (obj.apo_down, {"beta": BETA}, 0.9519831856098045),
        (obj.discopop, {"beta": BETA, "tau": 0.05}, 0.6065246465980625),
        (obj.cal_dpo, {"beta": BETA}, 0.5732616875182228),
    ],
)
def test_pairwise_losses_hand_computed(fn, kwargs, expected):
    assert float(fn(_arr(DW), _arr(DL), **kwargs)[0]) == pytest.approx(expected, rel=1e-5)


def test_exo_pair_is_the_kl_to_the_smoothed_label():
    z = BETA * (DW - DL)
    p = 1 / (1 + math.exp(-z))
    kl = p * math.log(p / 0.9) + (1 - p) * math.log((1 - p) / 0.1)
    assert float(obj.exo_pair(_arr(DW), _arr(DL), beta=BETA, label_smoothing=0.1)[0]) == (
        pytest.approx(kl, rel=1e-5)
    )


def test_simper_is_the_inverse_perplexity_gap():
    # mean log-probs −0.5 (chosen) and −1.5 (rejected): −e^{−0.5} + e^{−1.5}.
    assert float(obj.simper(_arr(-0.5), _arr(-1.5))[0]) == pytest.approx(
        -0.38340049956420363, rel=1e-6
    )
    terms = obj.parse_loss_terms(["simper"])
    assert not obj.needs_reference(terms)
    # Through the combiner on sums of 2 and 3 tokens: means −0.5, −1.5.
    seqs = obj.SequenceLogps(policy=_arr(-1.0, -4.5)[None], n_tokens=_arr(2.0, 3.0)[None])
    loss, _ = obj.compute_loss(terms, seqs)
    assert float(loss[0]) == pytest.approx(-0.38340049956420363, rel=1e-6)


def test_aot_sorts_margins_over_the_batch():
    # policy margins [1.0, −0.5, 2.0], reference margins [0.5, 0.0, −1.0]:
    # sorted differences [−0.5−(−1), 1−0, 2−0.5] = [0.5, 1.0, 1.5], β = 1.
    ref_margin = _arr(0.5, 0.0, -1.0)
    policy_margin = _arr(1.0, -0.5, 2.0)
    dw, dl = policy_margin - ref_margin, jnp.zeros(3)  # any split with Δ_w − Δ_l = pm − rm
    loss = obj.aot(dw, dl, ref_margin, beta=1.0)
    np.testing.assert_allclose(
        loss, [-math.log(1 / (1 + math.exp(-x))) for x in (0.5, 1, 1.5)], rtol=1e-6
    )
    # aot_pair: sort(Δ_w) − sort(Δ_l) = [−0.2, 0.3, 0.9] − [−0.6, 0.0, 0.4] = [0.4, 0.3, 0.5].
    loss = obj.aot_pair(_arr(0.3, -0.2, 0.9), _arr(0.0, 0.4, -0.6), beta=1.0)
    np.testing.assert_allclose(
        loss, [-math.log(1 / (1 + math.exp(-x))) for x in (0.4, 0.3, 0.5)], rtol=1e-6
    )
    # Through compute_loss: the reference margin comes from SequenceLogps.reference.
    seqs = obj.SequenceLogps(
        policy=jnp.stack([policy_margin, jnp.zeros(3)], 1),
        n_tokens=jnp.ones((3, 2)),
        reference=jnp.stack([ref_margin, jnp.zeros(3)], 1),
    )
    loss, _ = obj.compute_loss(obj.parse_loss_terms([{"name": "aot", "beta": 1.0}]), seqs)
    np.testing.assert_allclose(
        jnp.sort(loss), [-math.log(1 / (1 + math.exp(-x))) for x in (1.5, 1.0, 0.5)], rtol=1e-6
    )


@pytest.mark.parametrize(
    "alias,name", [("sigmoid", "dpo"), ("slic", "hinge"), ("pl_dpo", "plackett_luce")]
)
def test_trl_names_are_aliases(alias, name):
    assert obj.LOSSES[alias] is obj.LOSSES[name]


def test_sigmoid_norm_is_dpo_on_length_normalised_log_ratios():
    # Δ sums 3.0 over 3 tokens and −2.0 over 4: means 1.0 and −0.5; −log σ(0.1 · 1.5).
    seqs = _seqs(3.0, -2.0, n=(3.0, 4.0))
    loss, _ = obj.compute_loss(obj.parse_loss_terms(["sigmoid_norm"]), seqs)
    assert float(loss[0]) == pytest.approx(math.log1p(math.exp(-0.15)), rel=1e-6)
    with pytest.raises(ValueError, match="'reduction'"):
        obj.parse_loss_terms([{"name": "sigmoid_norm", "reduction": "sum"}])


def test_bco_pair_is_dil_bce_with_trl_defaults():
    seqs = _seqs(DW, DL)
    bco, _ = obj.compute_loss(obj.parse_loss_terms(["bco_pair"]), seqs)
    bce, _ = obj.compute_loss(
        obj.parse_loss_terms([{"name": "dil_bce", "beta": 0.1, "reduction": "sum"}]), seqs
    )
    np.testing.assert_allclose(bco, bce)
    expected = -math.log(1 / (1 + math.exp(-0.06))) - math.log(1 / (1 + math.exp(-0.04)))
    assert float(bco[0]) == pytest.approx(expected, rel=1e-6)


# --- listwise ---------------------------------------------------------------------------------


def test_plackett_luce_hand_computed_and_reduces_to_dpo():
    deltas = _arr(0.6, -0.4, 0.1)[None]  # best first; β = 0.5 -> z = [0.3, −0.2, 0.05]
    assert float(obj.plackett_luce(deltas, beta=BETA)[0]) == pytest.approx(
        1.6952775042845218, rel=1e-6
    )
    pair = obj.plackett_luce(_arr(DW, DL)[None], beta=BETA)
    np.testing.assert_allclose(pair, obj.dpo(_arr(DW), _arr(DL), beta=BETA), rtol=1e-6)
    # An absent third response changes nothing, and its gradient is exactly 0 (no nan).
    masked = obj.plackett_luce(deltas, _arr(1, 1, 0)[None], beta=BETA)
    np.testing.assert_allclose(masked, pair, rtol=1e-6)
    grad = jax.grad(lambda d: obj.plackett_luce(d, _arr(1, 1, 0)[None], beta=BETA).sum())(deltas)
    assert bool(jnp.all(jnp.isfinite(grad))) and float(grad[0, 2]) == 0.0


def test_dil_listwise_uses_all_lower_ranked_responses_as_reference_samples():
    # LSIF: −e^{Δ_0} + ½·mean_k e^{2Δ_k} over the real lower-ranked responses.
    policy = _arr(0.5, -0.3, 0.2, 9.0)[None]  # the 4th response is absent (n_tokens 0)
    seqs = obj.SequenceLogps(
        policy=policy, n_tokens=_arr(1, 1, 1, 0)[None], reference=jnp.zeros_like(policy)
    )
    loss, m = obj.compute_loss(obj.parse_loss_terms(["dil_lsif"]), seqs)
    expected = -math.exp(0.5) + 0.5 * (math.exp(-0.6) + math.exp(0.4)) / 2
    assert float(loss[0]) == pytest.approx(expected, rel=1e-6)
    assert float(m["rewards/rejected"][0]) == pytest.approx(-0.05, abs=1e-6)  # mean(−0.3, 0.2)
    pl, _ = obj.compute_loss(obj.parse_loss_terms(["plackett_luce"]), seqs)
    assert float(pl[0]) == pytest.approx(
        float(obj.plackett_luce(_arr(0.5, -0.3, 0.2)[None], beta=0.1)[0]), rel=1e-6
    )
    # N = 2 through the listwise feed equals the pair formula exactly.
    pair, _ = obj.compute_loss(obj.parse_loss_terms(["dil_ukl"]), _seqs(DW, DL))
    np.testing.assert_allclose(pair, obj.dil_ukl(_arr(DW), _arr(DL)))


def test_pairwise_losses_refuse_lists():
    seqs = obj.SequenceLogps(
        policy=jnp.zeros((2, 3)), n_tokens=jnp.ones((2, 3)), reference=jnp.zeros((2, 3))
    )
    with pytest.raises(ValueError, match="listwise loss"):
        obj.compute_loss(obj.parse_loss_terms(["dpo"]), seqs)
    assert obj.data_layout(obj.parse_loss_terms(["dil_lsif", {"name": "sft"}])) == "list"
    assert obj.data_layout(obj.parse_loss_terms(["dil_lsif", "dpo"])) == "pair"
    assert obj.data_layout(obj.parse_loss_terms(["sft"])) == "single"
    assert obj.data_layout(obj.parse_loss_terms(["kto"])) == "unpaired"


# --- KTO --------------------------------------------------------------------------------------


def test_kto_hand_computed_with_the_mismatched_reference_point():
    # Own completions Δ = [1.0, −0.5] (desirable, undesirable); mismatched Δ = [0.2, 0.6] ->
    # z = 0.4. β = 0.5, λ_D = 1, λ_U = 2.
    seqs = obj.SequenceLogps(
        policy=jnp.asarray([[1.0, 0.2], [-0.5, 0.6]]),
        n_tokens=jnp.ones((2, 2)),
        reference=jnp.zeros((2, 2)),
        labels=_arr(1, 0),
    )
    terms = obj.parse_loss_terms([{"name": "kto", "beta": 0.5, "undesirable_weight": 2.0}])
    loss, m = obj.compute_loss(terms, seqs)
    np.testing.assert_allclose(loss, [0.42555748318834097, 0.7787215321015559], rtol=1e-6)
    np.testing.assert_allclose(m["kl"], [0.4, 0.4], rtol=1e-6)
    np.testing.assert_allclose(m["kto/reward"], [0.5, -0.25])
    # z is clamped at 0 and carries no gradient: d loss / d (mismatched logps) = 0.
    grad = jax.grad(lambda p: obj.compute_loss(terms, seqs._replace(policy=p))[0].sum())(
        seqs.policy
    )
    np.testing.assert_allclose(grad[:, 1], [0.0, 0.0])
    neg = obj.kto(
        _arr(0.0), _arr(-3.0), _arr(1), beta=1.0, desirable_weight=1.0, undesirable_weight=1.0
    )
    assert float(neg[0]) == pytest.approx(0.5)  # z = max(0, −3) = 0
    with pytest.raises(ValueError, match="labels"):
        obj.compute_loss(terms, seqs._replace(labels=None))


# --- combination rules ------------------------------------------------------------------------


def test_kto_combines_with_nothing():
    with pytest.raises(ValueError, match=r"loss term 0 \('kto'\).*cannot be combined.*'sft'"):
        obj.parse_loss_terms(["kto", "sft"])


@pytest.mark.parametrize(
    "other,ok",
    [
        ("dpo", True),
        ("ipo", True),
        ("simpo", True),
        ("sft", True),
        ("dil_lsif", False),
        ("apo_zero", False),
        ("kto", False),
        ("cal_dpo", False),
    ],
)
def test_non_reverse_kl_divergence_only_with_difference_losses(other, ok):
    spec = [{"name": "fdpo", "divergence": "js"}, {"name": other}]
    if ok:
        obj.parse_loss_terms(spec)
    else:
        with pytest.raises(ValueError):
            obj.parse_loss_terms(spec)
    obj.parse_loss_terms([{"name": "fdpo", "divergence": "reverse_kl"}, {"name": "sft"}])


def test_divergence_rule_message_names_the_terms():
    with pytest.raises(
        ValueError,
        match=r"divergence='forward_kl'.*chosen − rejected "
        r"differences.*\('dil_ukl'\)",
    ):
        obj.parse_loss_terms([{"name": "fdpo", "divergence": "forward_kl"}, "dil_ukl"])


# --- the declared hyper-parameter table -------------------------------------------------------


def _base_config():
    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "base.py"
    spec = importlib.util.spec_from_file_location("base_config_for_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_base_config_loss_fields_are_exactly_the_declared_params():
    loss = _base_config().loss
    fields = set(loss.keys()) - {"name", "weight", "sft_weight", "extra_terms"}
    union = {k for spec in obj.LOSSES.values() for k in spec.defaults}
    assert fields == union == set(obj.PARAMS) == set(validation.LOSS_PARAM_KEYS)
    for key, (typ, _) in obj.PARAMS.items():
        loss[key] = typ("sum" if key == "reduction" else "js" if key == "divergence" else 0.25)


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"name": "dpo", "gamma": 0.5}, "config.loss.gamma"),
        ({"name": "dil_bce", "max_log_ratio": 10.0}, "config.loss.max_log_ratio"),
        ({"name": "dpo", "beta": -1.0}, "config.loss.beta"),
        ({"name": "dpx"}, "config.loss.name"),
        ({"name": "kto", "sft_weight": 0.1}, "config.loss.sft_weight"),
        (
            {"name": "dpo", "extra_terms": ({"name": "ipo", "tau": 1.0},)},
            r"config.loss.extra_terms\[0\].tau",
        ),
    ],
)
def test_config_errors_name_the_loss_field(overrides, field):
    loss = _base_config().loss
    for k, v in overrides.items():
        loss[k] = v
    with pytest.raises(ConfigError, match=field):
        validation.loss_terms(loss)


def test_every_loss_parses_jits_and_differentiates():
    for name, spec in obj.LOSSES.items():
        if spec.layout == "unpaired":
            continue
        terms = obj.parse_loss_terms([name])
        seqs = _seqs(-3.0, -5.0, -3.5, -4.0, n=(3.0, 4.0))

        def total(p, terms=terms, seqs=seqs):
            return obj.compute_loss(terms, seqs._replace(policy=p))[0].sum()

        value, grad = jax.jit(jax.value_and_grad(total))(seqs.policy)
        assert bool(jnp.isfinite(value)) and bool(jnp.all(jnp.isfinite(grad))), name
