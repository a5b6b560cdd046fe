"""From ``config.data`` to example arrays and resumable iterators.

A dataset here is a dict of numpy arrays in the trainer's pair layout: ``input_ids``,
``attention_mask``, ``loss_mask`` ``[n, N, T]`` (N = 2: chosen, rejected; N = 1: demonstrations)
and ``example_id [n]``. Loss masks are explicit and never derived from ``ids != pad`` (the pad id
may equal EOS).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from dil_jax.data.gold_task import GoldTask
from dil_jax.data.iterator import BatchIterator

FORMATS = ("preference", "sft")


def build_datasets(config):
    """Returns ``(train_arrays, eval_arrays, task)``; ``task`` is the GoldTask when applicable."""
    data = config.data
    if data.format not in FORMATS:
        raise ValueError(f"config.data.format={data.format!r}: expected one of {FORMATS}")
    if data.source != "gold_task":
        raise ValueError(f"config.data.source={data.source!r}: only 'gold_task' is built in")
    task = GoldTask()
    if task.seq_len > config.model.max_position_embeddings:
        raise ValueError("config.model.max_position_embeddings="
                         f"{config.model.max_position_embeddings} is shorter than the gold task's "
                         f"sequences ({task.seq_len} tokens)")
    if task.vocab_size > config.model.vocab_size:
        raise ValueError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the "
                         f"gold task's vocabulary ({task.vocab_size})")
    make = task.preference_dataset if data.format == "preference" else task.sft_dataset
    # Distinct seeds for train and held-out data: no prompt stream is shared.
    train = make(data.num_train, seed=data.seed, source=data.response_source)
    held_out = make(data.num_eval, seed=data.seed + 1, source=data.response_source)
    return _trainer_arrays(train), _trainer_arrays(held_out), task


def _trainer_arrays(d: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    keys = ("input_ids", "attention_mask", "loss_mask", "example_id")
    return {k: np.asarray(d[k]) for k in keys}


def make_iterator(arrays, global_batch_size: int, *, seed: int = 0,
                  shuffle: bool = True) -> BatchIterator:
    """This process's resumable iterator over ``arrays`` (``jax.process_index`` slice)."""
    return BatchIterator(arrays, global_batch_size, seed=seed, shuffle=shuffle,
                         process_index=jax.process_index(), process_count=jax.process_count())
