"""AfD reward-model extrapolation: the heterogeneous classifiers see length-matched classes."""

import numpy as np

from dil_jax.afd import extrapolation


def arrays(prompt: int, response: int, width: int, n: int = 2) -> dict[str, np.ndarray]:
    """``[n, 1, width]`` right-padded sequences of ``prompt`` + ``response`` tokens."""
    pos = np.arange(width)
    attn = (pos < prompt + response).astype(np.int32)
    loss = ((pos >= prompt) & (pos < prompt + response)).astype(np.int32)
    ids = np.where(attn == 1, 5, 0).astype(np.int32)
    tile = lambda x: np.tile(x, (n, 1, 1))  # noqa: E731
    return {"input_ids": tile(ids), "attention_mask": tile(attn), "loss_mask": tile(loss)}


def test_demonstrations_cut_to_the_sampling_budget_for_init_demo_and_sft_demo():
    demos = arrays(prompt=2, response=10, width=12)  # longer than the budget of 4
    init, sft = arrays(2, 4, 6), arrays(2, 3, 6)
    pairs = {"input_ids": np.zeros((2, 2, 6), np.int32)}
    sets = extrapolation.classifier_datasets(demos, init, sft, pairs, budget=4)
    for name in ("init_demo", "sft_demo"):
        lengths = sets[name]["loss_mask"].sum(-1)  # [n, 2]: demonstration, sample
        assert np.all(lengths[:, 0] == 4), name
        assert np.array_equal(sets[name]["attention_mask"][:, 0].sum(-1), [6, 6])
    np.testing.assert_array_equal(sets["init_sft"]["loss_mask"].sum(-1), [[3, 4], [3, 4]])
    uncut = extrapolation.classifier_datasets(demos, init, sft, pairs)
    assert np.all(uncut["init_demo"]["loss_mask"][:, 0].sum(-1) == 10)
    stats = extrapolation.classifier_length_stats(demos, init, sft, 4)
    assert stats["init_demo"] == {
        "lengths/demo_mean": 10.0,
        "lengths/sample_mean": 4.0,
        "lengths/demo_over_budget": 1.0,
        "lengths/sample_at_budget": 1.0,
    }
    assert stats["sft_demo"]["lengths/sample_at_budget"] == 0.0
