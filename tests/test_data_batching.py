"""Bucketed and packed batches; deterministic, exactly resumable, per-process iteration."""

import json

import numpy as np
import pytest

from dil_jax.data import pipeline
from dil_jax.data.batching import TokenizedDataset, bucket_plan, normalise_buckets


def synthetic(
    n=203, num=2, max_length=64, buckets=(16, 32), packing=False, seed=0, prefix_sharing=False
):
    """n examples with N sequences of random lengths; token t of example e is 1000 e + t."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, max_length + 1, size=(n, num)).astype(np.int32)
    lengths[: n // 2] = np.minimum(lengths[: n // 2], 14)  # plenty of short examples
    prompts = np.minimum(rng.integers(1, 8, size=(n, 1)), lengths.min(axis=1, keepdims=True) - 1)
    prompt_lengths = np.repeat(prompts, num, axis=1).astype(np.int32)
    seqs = [1000 * e + np.arange(lengths[e, j]) for e in range(n) for j in range(num)]
    flat = lengths.ravel()
    starts = (np.cumsum(flat) - flat).reshape(n, num)
    return TokenizedDataset(
        np.concatenate(seqs).astype(np.int32),
        starts,
        lengths,
        prompt_lengths,
        np.arange(100, 100 + n, dtype=np.int32),
        pad_id=7,
        buckets=normalise_buckets(buckets, max_length),
        packing=packing,
        prefix_sharing=prefix_sharing,
    )


def test_bucket_plan_covers_each_epoch_and_moves_leftovers_up():
    data = synthetic()
    natural = data.natural_buckets()
    assert data.buckets == (16, 32, 64)
    for epoch in range(3):
        order = np.random.default_rng([0, epoch]).permutation(len(data))
        plan = bucket_plan(natural, 3, order, 8, np.random.default_rng([0, epoch, 1]))
        assert len(plan) == len(data) // 8
        rows = np.concatenate([r for _, r in plan])
        assert len(set(rows.tolist())) == len(rows)  # nothing twice; n mod B left out
        for k, r in plan:  # every example fits the batch's bucket
            assert data.lengths[r].max() <= data.buckets[k]


def test_padded_batch_layout_and_masks():
    data = synthetic()
    batch = data.padded(np.array([3, 150]), 64)
    assert batch["input_ids"].shape == (2, 2, 64)
    for b, e in enumerate((3, 150)):
        for j in range(2):
            n, p = data.lengths[e, j], data.prompt_lengths[e, j]
            assert batch["input_ids"][b, j, :n].tolist() == (1000 * e + np.arange(n)).tolist()
            assert (batch["input_ids"][b, j, n:] == 7).all()
            assert batch["attention_mask"][b, j].tolist() == [1] * n + [0] * (64 - n)
            assert batch["loss_mask"][b, j].tolist() == [0] * p + [1] * (n - p) + [0] * (64 - n)
    assert batch["example_id"].tolist() == [103, 250]


def test_packed_layout_keeps_pairs_aligned_and_segments_apart():
    data = synthetic(packing=True)
    it = pipeline.make_iterator(data, 4, seed=1, process_index=0, process_count=1)
    batch = next(it)
    assert batch["input_ids"].shape == (4, 2, 64) and batch["segment_ids"].shape == (4, 2, 64)
    seen = []
    for b in range(4):
        ids = [e for e in batch["example_id"][b] if e >= 0]
        seen += ids
        for j in range(2):
            seg, pos = batch["segment_ids"][b, j], batch["positions"][b, j]
            offset = 0
            for s, eid in enumerate(ids):
                e = eid - 100
                n, p = data.lengths[e, j], data.prompt_lengths[e, j]
                span = slice(offset, offset + n)
                assert (seg[span] == s + 1).all() and pos[span].tolist() == list(range(n))
                assert batch["input_ids"][b, j, span].tolist() == (1000 * e + np.arange(n)).tolist()
                assert batch["loss_mask"][b, j, span].tolist() == [0] * p + [1] * (n - p)
                offset += n
            assert (seg[offset:] == 0).all() and (batch["attention_mask"][b, j, offset:] == 0).all()
    assert len(seen) > 4 and len(set(seen)) == len(seen)


def consume(data, batch_size, num_procs, steps, interrupt_at=None):
    """Example ids and shapes of ``steps`` global batches, optionally checkpointed and resumed."""

    def fresh():
        return [
            pipeline.make_iterator(
                data, batch_size, seed=5, process_index=p, process_count=num_procs
            )
            for p in range(num_procs)
        ]

    iters, ids, shapes = fresh(), [], []
    for step in range(steps):
        if step == interrupt_at:  # a checkpoint stores each process's JSON state
            states = [json.loads(json.dumps(it.get_state())) for it in iters]
            iters = fresh()
            for it, state in zip(iters, states, strict=True):
                it.set_state(state)
        local = [next(it) for it in iters]
        assert len({b["input_ids"].shape for b in local}) == 1  # processes agree on the shape
        shapes.append(local[0]["input_ids"].shape[-1])
        ids.append([e for b in local for e in b["example_id"].ravel().tolist() if e >= 0])
    return ids, shapes


@pytest.mark.parametrize(
    "packing, shared",
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["bucketed", "packed", "shared", "packed_shared"],
)
def test_resume_equals_uninterrupted_for_one_and_two_processes(packing, shared):
    data = synthetic(packing=packing, prefix_sharing=shared)
    steps = (
        3
        * pipeline.make_iterator(
            data, 8, seed=5, process_index=0, process_count=1
        ).batches_per_epoch
    )  # three epochs
    reference, shapes = consume(data, 8, 1, steps)
    for num_procs in (1, 2):
        for interrupt_at in (1, steps // 3, steps // 2 + 1):
            ids, resumed_shapes = consume(data, 8, num_procs, steps, interrupt_at)
            assert ids == reference, (num_procs, interrupt_at)
            assert resumed_shapes == shapes
    assert set(shapes) <= set(data.row_buckets)
    if not packing:
        assert len(set(shapes)) == len(data.row_buckets)  # all buckets in use, no more shapes
        per_epoch = len(reference) // 3
        first = sum(reference[:per_epoch], [])
        assert len(set(first)) == len(first)  # no example twice within an epoch
        assert reference[:per_epoch] != reference[per_epoch : 2 * per_epoch]  # reshuffled


def test_state_from_other_data_or_layout_is_refused():
    data = synthetic()
    it = pipeline.make_iterator(data, 8, seed=5, process_index=0, process_count=1)
    next(it)
    state = it.get_state()
    other = pipeline.make_iterator(
        synthetic(buckets=(32,)), 8, seed=5, process_index=0, process_count=1
    )
    with pytest.raises(ValueError, match="buckets"):
        other.set_state(state)
    packed = pipeline.make_iterator(
        synthetic(packing=True), 8, seed=5, process_index=0, process_count=1
    )
    with pytest.raises(ValueError, match="layout"):
        packed.set_state(state)


def test_padding_stats_follow_the_run():
    data = synthetic()
    stats = pipeline.padding_stats(data, 8, 30, seed=5)
    assert stats["batches"] == 30
    assert sum(v["batches"] for v in stats["per_bucket"].values()) == 30
    assert 0 < stats["padding_fraction"] < stats["padding_fraction_unbucketed"]
    packed = pipeline.padding_stats(synthetic(packing=True), 8, 10, seed=5)
    assert 0 < packed["padding_fraction"] < packed["padding_fraction_unbucketed"]
    shared = pipeline.padding_stats(synthetic(packing=True, prefix_sharing=True), 8, 10, seed=5)
    assert shared["layout"] == "packed_shared" and 0 < shared["padding_fraction"] < 0.5
