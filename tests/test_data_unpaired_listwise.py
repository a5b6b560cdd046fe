"""KTO's unpaired format and batch layout, and ranked (listwise) records."""

import numpy as np
import pytest

from dil_jax.data import batching, formats
from dil_jax.data.report import Location, SplitReport


def _parse(records, fmt):
    report = SplitReport("train", on_bad_record="skip")
    locs = [(Location("mem.jsonl", i + 1), r) for i, r in enumerate(records)]
    return formats.parse_records(locs, fmt, {}, report), report


def test_prompt_completion_label_keeps_the_label():
    examples, _ = _parse(
        [
            {"prompt": "p", "completion": "good", "label": True},
            {"prompt": "q", "completion": "bad", "label": False},
            {"prompt": "r", "completion": "x", "label": "yes"},
        ],
        "prompt_completion_label",
    )
    assert [(e.responses, e.label) for e in examples] == [(("good",), True), (("bad",), False)]
    assert formats.num_responses("prompt_completion_label") == 1


def test_ranked_responses_sorted_best_first():
    examples, _ = _parse(
        [
            {"prompt": "p", "responses": ["a", {"text": "b"}, "c"], "scores": [1.0, 3.5, 2]},
            {"prompt": "q", "responses": ["a"], "scores": [1.0]},
            {"prompt": "q", "responses": ["a", "b"], "scores": [1.0]},
        ],
        "ranked_responses",
    )
    assert [e.responses for e in examples] == [("b", "c", "a")]
    assert formats.num_responses("ranked_responses") is None


def test_kto_pairs_splices_mismatched_completions():
    # rows: [prompt | response | pad], T = 6
    batch = {
        "input_ids": np.array([[[1, 2, 7, 8, 0, 0]], [[3, 9, 9, 9, 9, 0]]]),
        "attention_mask": np.array([[[1, 1, 1, 1, 0, 0]], [[1, 1, 1, 1, 1, 0]]]),
        "loss_mask": np.array([[[0, 0, 1, 1, 0, 0]], [[0, 1, 1, 1, 1, 0]]]),
        "labels": np.array([1, 0]),
    }
    out = batching.kto_pairs(batch)
    assert out["input_ids"].shape == (2, 2, 6)
    np.testing.assert_array_equal(out["input_ids"][:, 0], batch["input_ids"][:, 0])
    # example 0: its prompt [1, 2] + example 1's response [9, 9, 9, 9] (fits exactly)
    np.testing.assert_array_equal(out["input_ids"][0, 1], [1, 2, 9, 9, 9, 9])
    np.testing.assert_array_equal(out["loss_mask"][0, 1], [0, 0, 1, 1, 1, 1])
    # example 1: its prompt [3] + example 0's response [7, 8]
    np.testing.assert_array_equal(out["input_ids"][1, 1], [3, 7, 8, 0, 0, 0])
    np.testing.assert_array_equal(out["attention_mask"][1, 1], [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(out["labels"], [1, 0])
    with pytest.raises(ValueError, match="B=1"):
        batching.kto_pairs({k: v[:1] for k, v in batch.items()})


def test_ranked_lists_pad_absent_responses_with_zero_tokens():
    # TokenizedDataset already carries any N: an absent third response has no response tokens,
    # so its n_tokens (loss_mask sum) is 0 and objectives leaves it out.
    tokens = np.array([5, 6, 5, 7, 5], np.int32)
    ds = batching.TokenizedDataset(
        tokens=tokens,
        starts=np.array([[0, 2, 4]]),
        lengths=np.array([[2, 2, 1]], np.int32),
        prompt_lengths=np.array([[1, 1, 1]], np.int32),
        example_id=np.array([0], np.int32),
        buckets=(4,),
    )
    arrays = ds.padded(np.array([0]), 4)
    np.testing.assert_array_equal(arrays["loss_mask"].sum(-1), [[1, 1, 0]])
