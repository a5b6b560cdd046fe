"""Tests for the built-in gold-reward task (dil_jax/data/gold_task.py); pure numpy, fast."""

import numpy as np
import pytest

from dil_jax.data.gold_task import (
    BOS,
    CONTENT_OFFSET,
    EOS,
    PAD,
    SOURCES,
    STYLE,
    GoldTask,
    bt_probability,
)

TASK = GoldTask()
N = 4000


def _answer(task, prompts, mode):
    """Exact answer rows [n, R]: mode target incl. EOS, then PAD."""
    target = task.mode_targets(prompts)[0 if mode == "a" else 1]  # [n, L+1]
    out = np.full((prompts.shape[0], task.max_response_len), PAD, np.int32)
    out[:, : target.shape[1]] = target
    return out


# ----------------------------------------------------------------------------- geometry


def test_defaults_geometry():
    assert (PAD, BOS, EOS) == (0, 1, 2)
    assert TASK.vocab_size % 8 == 0
    assert TASK.seq_len == TASK.prompt_len + TASK.max_response_len == 20
    assert TASK.num_content == TASK.vocab_size - CONTENT_OFFSET
    assert TASK.style_token == STYLE < CONTENT_OFFSET


@pytest.mark.parametrize(
    "kwargs",
    [
        {"vocab_size": 5},
        {"prompt_len": 1},
        {"max_response_len": 8},  # cannot hold STYLE + 7 tokens + EOS
        {"base_share_a": 0.7, "base_share_b": 0.4},
        {"base_derail_rate": 0.0},
        {"expert_noise": 1.5},
        {"bt_temperature": 0.0},
    ],
)
def test_invalid_config_raises(kwargs):
    with pytest.raises(ValueError):
        GoldTask(**kwargs)


def test_unknown_source_raises():
    with pytest.raises(ValueError, match="unknown source"):
        TASK.sample_responses(TASK.sample_prompts(2, 0), 0, source="human")


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_data_different_seed_different_data():
    for source in SOURCES:
        a = TASK.preference_dataset(64, seed=3, source=source)
        b = TASK.preference_dataset(64, seed=3, source=source)
        c = TASK.preference_dataset(64, seed=4, source=source)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
        assert not np.array_equal(a["input_ids"], c["input_ids"])
        s1, s2 = TASK.sft_dataset(64, 3, source), TASK.sft_dataset(64, 3, source)
        for key in s1:
            np.testing.assert_array_equal(s1[key], s2[key])


def test_streams_do_not_alias():
    prompts = TASK.sample_prompts(N, seed=0)
    # Random responses drawn with the same seed as the prompts are independent of them: a naive
    # shared default_rng(seed) would reproduce the prompt tokens exactly.
    rand = TASK.sample_responses(prompts, seed=0, source="random")
    agree = (rand[:, : TASK.answer_len] == prompts[:, 1:]).mean()
    assert agree < 0.1  # chance is 1/28
    # Preference pairs use their own stream, not a replay of sample_responses with that seed.
    pairs = TASK.preference_dataset(N, seed=0)["input_ids"][:, :, TASK.prompt_len :]  # [n, 2, R]
    single = TASK.sample_responses(prompts, seed=0, source="base")  # [n, R]
    for i in range(2):
        assert (pairs[:, i] == single).all(axis=1).mean() < 0.1  # ~1% from repeated answers
    # Sources have their own streams: expert_a and expert_b noise positions are not the same.
    hit_a = TASK.sample_responses(prompts, 0, "expert_a") != _answer(TASK, prompts, "a")
    hit_b = TASK.sample_responses(prompts, 0, "expert_b") != _answer(TASK, prompts, "b")
    assert hit_a.any() and hit_b.any() and not np.array_equal(hit_a, hit_b)


# ----------------------------------------------------------------------------- formats


def test_prompt_format():
    prompts = TASK.sample_prompts(N, seed=1)
    assert prompts.shape == (N, TASK.prompt_len) and prompts.dtype == np.int32
    assert (prompts[:, 0] == BOS).all()
    content = prompts[:, 1:]
    assert ((content >= CONTENT_OFFSET) & (content < TASK.vocab_size)).all()
    assert len(np.unique(content)) == TASK.num_content  # the whole alphabet is used


@pytest.mark.parametrize("source", SOURCES)
def test_response_format(source):
    prompts = TASK.sample_prompts(N, seed=2)
    resp = TASK.sample_responses(prompts, seed=2, source=source)
    assert resp.shape == (N, TASK.max_response_len) and resp.dtype == np.int32
    is_eos = resp == EOS
    assert (is_eos.sum(axis=1) == 1).all()  # exactly one EOS, always inside the budget
    eos_at = is_eos.argmax(axis=1)
    pos = np.arange(TASK.max_response_len)[None, :]
    before, after = pos < eos_at[:, None], pos > eos_at[:, None]
    assert (resp[after] == PAD).all()
    assert (resp[before] != PAD).all() and (resp[before] != BOS).all()
    lengths = eos_at + 1
    if source in ("base", "random"):
        assert len(np.unique(lengths)) > 5  # responses vary in length


@pytest.mark.parametrize("source", ["base", "expert_styled"])
@pytest.mark.parametrize("num_pairs", [1, 2])
def test_trainer_format_and_masks(source, num_pairs):
    n = 256
    if num_pairs == 1:
        batch = TASK.sft_dataset(n, seed=5, source=source)
    else:
        batch = TASK.preference_dataset(n, seed=5, source=source)
    t, p = TASK.seq_len, TASK.prompt_len
    ids, att, lm = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    for arr in (ids, att, lm):
        assert arr.shape == (n, num_pairs, t) and arr.dtype == np.int32
    np.testing.assert_array_equal(batch["example_id"], np.arange(n, dtype=np.int32))
    assert batch["example_id"].dtype == np.int32
    assert batch["prompt"].shape == (n, p) and batch["prompt"].dtype == np.int32
    np.testing.assert_array_equal(
        ids[:, :, :p], np.broadcast_to(batch["prompt"][:, None], (n, num_pairs, p))
    )
    assert batch["gold_reward"].shape == (n, num_pairs)
    assert batch["gold_reward"].dtype == np.float32

    # loss_mask: exactly the response tokens up to and including EOS.
    assert (lm[:, :, :p] == 0).all()
    resp, resp_lm = ids[:, :, p:], lm[:, :, p:]
    eos_at = (resp == EOS).argmax(axis=2)  # [n, N]
    expected = np.arange(t - p)[None, None, :] <= eos_at[:, :, None]
    np.testing.assert_array_equal(resp_lm, expected.astype(np.int32))
    last = p + lm.sum(axis=2) - 1  # [n, N] index of the last loss token
    assert (np.take_along_axis(ids, last[:, :, None], axis=2) == EOS).all()
    # attention_mask: prompt plus the same response span; PAD everywhere else.
    assert (att[:, :, :p] == 1).all()
    np.testing.assert_array_equal(att[:, :, p:], resp_lm)
    assert (ids[att == 0] == PAD).all()
    # Rewards in the batch are the gold reward of its responses, in (chosen, rejected) order.
    for i in range(num_pairs):
        np.testing.assert_allclose(
            batch["gold_reward"][:, i], TASK.gold_reward(batch["prompt"], resp[:, i])
        )


# ----------------------------------------------------------------------------- the reward


def test_gold_reward_hand_computed():
    prompts = np.array([[BOS, 4, 5, 6, 7, 8, 9, 31]], np.int32)
    ans_a = [4, 5, 6, 7, 8, 9, 31]
    ans_b = [18, 19, 20, 21, 22, 23, 17]  # (x - 4 + 14) % 28 + 4
    ta, tb = TASK.mode_targets(prompts)
    np.testing.assert_array_equal(ta[0], ans_a + [EOS])
    np.testing.assert_array_equal(tb[0], ans_b + [EOS])

    def row(tokens):
        return np.array([tokens + [PAD] * (TASK.max_response_len - len(tokens))], np.int32)

    cases = [  # (response tokens, gold reward, mode)
        (ans_a + [EOS], 1.0, 1),
        (ans_b + [EOS], 1.0, 2),
        ([4, 5, 6, 30, 8, 9, 31, EOS], 7 / 8, 1),  # one wrong token
        (ans_a[:5] + [EOS], 5 / 8, 1),  # early EOS: 5 right, EOS misplaced
        (ans_a + [10, EOS], 7 / 9, 1),  # one token too many
        (ans_a, 7 / 12, 1),  # no EOS: the 5 trailing PADs count as wrong tokens
        ([EOS], 0.0, 0),
        (ans_a[:4] + ans_b[4:] + [EOS], 5 / 8, 1),  # mixed: A 4+EOS, B 3+EOS
        (ans_a[:3] + ans_b[3:] + [EOS], 5 / 8, 2),
        ([STYLE] + ans_b + [EOS], 1.0, 2),  # the style marker is ignored
        (ans_b[:3] + [STYLE, STYLE] + ans_b[3:] + [EOS], 1.0, 2),  # anywhere
        ([STYLE] * 4 + ans_a + [EOS], 1.0, 1),  # fits the budget exactly: free
        ([STYLE] * 5 + ans_a + [EOS], 7 / 8, 1),  # ... but a marker that crowds out EOS costs
        ([PAD] + ans_a[1:] + [EOS], 7 / 8, 1),  # PAD mid-response is a wrong token
        ([BOS] + ans_a + [EOS], 0.0, 0),  # shifted by one: nothing lines up
    ]
    for tokens, reward, mode in cases:
        resp = row(tokens[: TASK.max_response_len])
        np.testing.assert_allclose(TASK.gold_reward(prompts, resp), [reward], rtol=1e-6)
        np.testing.assert_array_equal(TASK.mode_of(prompts, resp), [mode])


def test_gold_reward_robust_to_garbage():
    rng = np.random.default_rng(0)
    n = 512
    prompts = TASK.sample_prompts(n, seed=7)
    garbage = {
        "any_ids": rng.integers(0, TASK.vocab_size, (n, TASK.max_response_len)),
        "no_eos": rng.integers(CONTENT_OFFSET, TASK.vocab_size, (n, TASK.max_response_len)),
        "all_pad": np.zeros((n, TASK.max_response_len), np.int64),
        "all_eos": np.full((n, TASK.max_response_len), EOS),
        "all_style": np.full((n, TASK.max_response_len), STYLE),
        "all_bos": np.full((n, TASK.max_response_len), BOS),
        "short_width": rng.integers(0, TASK.vocab_size, (n, 3)),
        "long_width": rng.integers(0, TASK.vocab_size, (n, 40)),
    }
    for name, resp in garbage.items():
        reward = TASK.gold_reward(prompts, resp)
        assert reward.shape == (n,) and reward.dtype == np.float32, name
        assert np.isfinite(reward).all() and (reward >= 0).all() and (reward <= 1).all(), name
        assert reward.mean() < 0.15, name
        modes = TASK.mode_of(prompts, resp)
        assert modes.shape == (n,) and set(np.unique(modes)) <= {0, 1, 2}, name
    for name in ("all_pad", "all_eos", "all_style", "all_bos"):
        assert (TASK.gold_reward(prompts, garbage[name]) == 0).all(), name
    # A correct answer without EOS, running on into a longer row, is penalised, not crashed.
    long_answer = np.concatenate(
        [TASK.mode_targets(prompts)[0][:, :-1], np.full((n, 33), 9)], axis=1
    )
    assert (TASK.gold_reward(prompts, long_answer) < 0.2).all()


def test_random_scores_low():
    prompts = TASK.sample_prompts(N, seed=8)
    resp = TASK.sample_responses(prompts, seed=8, source="random")
    reward = TASK.gold_reward(prompts, resp)
    assert reward.mean() < 0.1
    assert (TASK.mode_of(prompts, resp) == 0).mean() > 0.99


# ----------------------------------------------------------------------------- experts


@pytest.mark.parametrize("source,mode", [("expert_a", 1), ("expert_b", 2)])
def test_single_mode_experts(source, mode):
    prompts = TASK.sample_prompts(N, seed=9)
    resp = TASK.sample_responses(prompts, seed=9, source=source)
    assert TASK.gold_reward(prompts, resp).mean() >= 0.9
    assert (TASK.mode_of(prompts, resp) == mode).mean() > 0.99
    # Not exactly perfect: demonstrations leave room to be beaten (docs/objectives.md §4 C5).
    assert TASK.gold_reward(prompts, resp).mean() < 1.0


@pytest.mark.parametrize("source", ["expert", "expert_styled"])
def test_mixed_expert_covers_both_modes(source):
    prompts = TASK.sample_prompts(N, seed=10)
    resp = TASK.sample_responses(prompts, seed=10, source=source)
    assert TASK.gold_reward(prompts, resp).mean() >= 0.9
    share = np.bincount(TASK.mode_of(prompts, resp), minlength=3) / N
    assert share[0] < 0.01
    assert abs(share[1] - TASK.expert_share_a) < 0.05 and abs(share[2] - 0.5) < 0.05
    skewed = GoldTask(expert_share_a=0.9)
    modes = skewed.mode_of(prompts, skewed.sample_responses(prompts, 10, source))
    assert abs((modes == 1).mean() - 0.9) < 0.03


def test_style_marker_is_detectable_but_reward_irrelevant():
    prompts = TASK.sample_prompts(N, seed=11)
    styled = TASK.sample_responses(prompts, seed=11, source="expert_styled")
    assert TASK.has_style_marker(styled).all()
    for source in SOURCES:
        if source != "expert_styled":
            resp = TASK.sample_responses(prompts, seed=11, source=source)
            assert not TASK.has_style_marker(resp).any(), source
            assert not (resp == STYLE).any(), source
    # Strip the marker: the same responses without it score identically.
    unstyled = np.concatenate([styled[:, 1:], np.full((N, 1), PAD, np.int32)], axis=1)
    np.testing.assert_array_equal(
        TASK.gold_reward(prompts, styled), TASK.gold_reward(prompts, unstyled)
    )
    np.testing.assert_array_equal(TASK.mode_of(prompts, styled), TASK.mode_of(prompts, unstyled))
    # Styled and unstyled experts are the same quality.
    plain = TASK.sample_responses(prompts, seed=11, source="expert")
    assert (
        abs(TASK.gold_reward(prompts, plain).mean() - TASK.gold_reward(prompts, styled).mean())
        < 0.01
    )


# ----------------------------------------------------------------------------- base


def test_base_distribution_is_modest_graded_and_bimodal():
    prompts = TASK.sample_prompts(N, seed=12)
    resp = TASK.sample_responses(prompts, seed=12, source="base")
    reward = TASK.gold_reward(prompts, resp)
    modes = TASK.mode_of(prompts, resp)
    assert 0.2 <= reward.mean() <= 0.4
    share = np.bincount(modes, minlength=3) / N
    assert share[0] > 0.6  # most base responses are weak ...
    assert 0.05 < share[1] < 0.2 and 0.05 < share[2] < 0.2  # ... a minority in each mode
    for mode in (1, 2):  # near-perfect answers of both modes are inside the base support
        assert ((modes == mode) & (reward >= 0.99)).mean() > 0.03
    assert len(np.unique(np.round(reward, 4))) >= 10  # graded, not 0/1
    # Partial-quality attempts exist for both modes (varying corruption levels).
    partial = (reward > 0.3) & (reward < 0.9)
    scores = TASK.mode_scores(prompts, resp)
    assert (partial & (scores[:, 0] > scores[:, 1])).mean() > 0.02
    assert (partial & (scores[:, 1] > scores[:, 0])).mean() > 0.02


def test_base_knobs_move_the_mixture():
    prompts = TASK.sample_prompts(N, seed=13)

    def mean_reward(task):
        return task.gold_reward(prompts, task.sample_responses(prompts, 13, "base")).mean()

    assert mean_reward(GoldTask(base_derail_rate=0.05)) > mean_reward(TASK) + 0.1
    only_a = GoldTask(base_share_a=0.7, base_share_b=0.0)
    modes = only_a.mode_of(prompts, only_a.sample_responses(prompts, 13, "base"))
    assert (modes == 2).mean() < 0.01 and (modes == 1).mean() > 0.1


# ----------------------------------------------------------------------------- preferences


def test_bt_probability_values():
    np.testing.assert_allclose(bt_probability(0.5, 0.5, 0.1), 0.5)
    np.testing.assert_allclose(bt_probability(1.0, 0.0, 0.1), 1 / (1 + np.exp(-10.0)))
    np.testing.assert_allclose(bt_probability(0.0, 0.3, 0.2), 1 / (1 + np.exp(1.5)))
    assert np.isfinite(bt_probability(np.array([1e6, -1e6]), 0.0, 1e-3)).all()


def test_preference_labels_follow_bradley_terry():
    n = 20000
    batch = TASK.preference_dataset(n, seed=14)
    chosen, rejected = batch["gold_reward"][:, 0], batch["gold_reward"][:, 1]
    assert (chosen > rejected).mean() > 0.6
    assert (chosen > rejected).mean() > 3 * (chosen < rejected).mean()
    # Given the unordered pair, the better one is chosen with probability σ(|Δ| / τ).
    unequal = chosen != rejected
    gap = np.abs(chosen - rejected)[unequal]
    better_chosen = (chosen > rejected)[unequal]
    p = bt_probability(gap, 0.0, TASK.bt_temperature)
    z = (better_chosen.sum() - p.sum()) / np.sqrt((p * (1 - p)).sum())
    assert abs(z) < 4, z
    # ... and calibrated per gap bin, not just on average.
    for lo, hi in [(0.0, 0.1), (0.1, 0.2), (0.2, 0.4)]:
        sel = (gap > lo) & (gap <= hi)
        assert sel.sum() > 500
        z = (better_chosen[sel].sum() - p[sel].sum()) / np.sqrt((p[sel] * (1 - p[sel])).sum())
        assert abs(z) < 4, (lo, hi, z)
    # The mistakes the labels make are real: some pairs are inverted.
    assert (chosen < rejected).mean() > 0.01


def test_bt_temperature_controls_label_noise():
    def accuracy(task):
        g = task.preference_dataset(4000, seed=15)["gold_reward"]
        return (g[:, 0] > g[:, 1]).sum() / (g[:, 0] != g[:, 1]).sum()

    assert accuracy(GoldTask(bt_temperature=0.01)) > 0.99
    assert (
        accuracy(GoldTask(bt_temperature=0.01))
        > accuracy(TASK)
        > accuracy(GoldTask(bt_temperature=1.0))
        > 0.5
    )


def test_other_vocab_sizes():
    task = GoldTask(vocab_size=64, prompt_len=6, max_response_len=10)
    prompts = task.sample_prompts(500, seed=16)
    assert prompts.max() < 64
    for source, mode in [("expert_a", 1), ("expert_b", 2)]:
        resp = task.sample_responses(prompts, 16, source)
        assert task.gold_reward(prompts, resp).mean() >= 0.9
        assert (task.mode_of(prompts, resp) == mode).mean() > 0.99
    batch = task.preference_dataset(500, 16)
    assert batch["input_ids"].shape == (500, 2, 16)
