"""Pair builders of iterative alignment (dil_jax/online/pairs.py), by hand-counted indices."""

import numpy as np
import pytest

from dil_jax.online import pairs


def test_sample_slots():
    assert pairs.sample_slot(0, 0, 3) == 1
    assert pairs.sample_slot(2, 1, 3) == 8  # 1 + 2·3 + 1


def test_spin_pairs_demo_beats_every_current_sample():
    t = pairs.spin_pairs(num_prompts=2, k=3, round_index=1)
    np.testing.assert_array_equal(
        t, [[0, 0, 4], [0, 0, 5], [0, 0, 6], [1, 0, 4], [1, 0, 5], [1, 0, 6]]
    )


def test_ditto_round0_is_all_online():
    t = pairs.ditto_pairs(5, 4, 0, 40, np.random.default_rng(0))
    assert t.shape == (40, 3)
    assert (t[:, 1] == 0).all()
    assert ((t[:, 2] >= 1) & (t[:, 2] <= 4)).all()  # round 0 samples only


def test_ditto_replay_mix():
    k, r, n = 4, 2, 1000
    t = pairs.ditto_pairs(7, k, r, n, np.random.default_rng(1), mix=(0.7, 0.2, 0.1))
    current = lambda s: (s >= pairs.sample_slot(r, 0, k)) & (s < pairs.sample_slot(r + 1, 0, k))  # noqa: E731
    earlier = lambda s: (s >= 1) & (s < pairs.sample_slot(r, 0, k))  # noqa: E731
    online = (t[:, 1] == 0) & current(t[:, 2])
    replay = (t[:, 1] == 0) & earlier(t[:, 2])
    inter = current(t[:, 1]) & earlier(t[:, 2])
    assert (online.sum(), replay.sum(), inter.sum()) == (700, 200, 100)
    assert (online | replay | inter).all()
    assert (t[:, 0] < 7).all()
    # every earlier round is replayed
    assert set((t[replay, 2] - 1) // k) == {0, 1}


def test_ditto_rejects_bad_mix():
    with pytest.raises(ValueError, match="mix"):
        pairs.ditto_pairs(2, 2, 1, 4, np.random.default_rng(0), mix=(1.0, -0.5, 0.0))


def test_ranked_pairs_best_over_worst_and_ties_dropped():
    rewards = np.array([[0.1, 0.9, 0.5], [0.3, 0.3, 0.3], [0.8, 0.2, 0.4]])
    t = pairs.ranked_pairs(rewards, round_index=1)  # slots of round 1 start at 4
    np.testing.assert_array_equal(t, [[0, 5, 4], [2, 4, 5]])


def test_fill_to_fixed_size():
    t = np.array([[0, 1, 2], [1, 2, 1]], np.int32)
    out = pairs.fill_to(t, 5, np.random.default_rng(0))
    assert out.shape == (5, 3)
    assert {tuple(r) for r in out} == {(0, 1, 2), (1, 2, 1)}
    assert pairs.fill_to(t, 1, np.random.default_rng(0)).shape == (1, 3)
    with pytest.raises(ValueError, match="tied"):
        pairs.fill_to(t[:0], 3, np.random.default_rng(0))


def test_gather_pairs_layout():
    n, s, width = 2, 4, 3
    ids = np.arange(n * s * width).reshape(n, s, width)
    pool = {"input_ids": ids, "attention_mask": ids * 0 + 1, "loss_mask": ids % 2}
    out = pairs.gather_pairs(pool, np.array([[1, 0, 3]]))
    assert out["input_ids"].shape == (1, 2, width)
    np.testing.assert_array_equal(out["input_ids"][0, 0], ids[1, 0])
    np.testing.assert_array_equal(out["input_ids"][0, 1], ids[1, 3])
    np.testing.assert_array_equal(out["loss_mask"][0, 1], ids[1, 3] % 2)
