"""Deterministic, resumable, per-process batch iteration over in-memory example arrays.

The iterator's whole state is ``(epoch, position)``: the order of epoch ``e`` is a pure function of
``(seed, e)``, so resuming from a checkpoint jumps straight to the next unseen batch without
re-reading anything, and no example is seen twice or skipped (a pain point of peer trainers).
Each process materialises only its own rows of each global batch (``process_index`` slice of the
global batch), ready for ``jax.make_array_from_process_local_data``.

Two iterators share this contract: :class:`BatchIterator` over fixed-shape arrays (the gold
task) and :class:`BucketIterator` over a ragged :class:`~dil_jax.data.batching.TokenizedDataset`
(real data), whose batches take one of a few padded lengths or the packed layout. For both, the
plan of an epoch (which examples form which global batch, and in what order) is a pure function
of ``(seed, epoch)``, computed identically by every process; a process then materialises only
its own rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import numpy as np

from dil_jax.data.batching import TokenizedDataset, bucket_plan, pack_plan
from dil_jax.errors import ConfigError, DataError


@dataclasses.dataclass
class BatchIterator(Iterator[dict[str, np.ndarray]]):
    """Yields this process's rows of successive global batches, forever, epoch after epoch.

    Attributes:
      arrays: example arrays with a common leading dimension ``n`` (e.g. ``input_ids [n, N, T]``).
      global_batch_size: rows per global batch (over all processes); the trailing partial batch
        of an epoch is dropped so every step has the same shape (one compilation).
      seed: shuffling seed; ``shuffle=False`` keeps the stored order (evaluation).
      process_index, process_count: this process's slice of each global batch.
    """

    arrays: Mapping[str, np.ndarray]
    global_batch_size: int
    seed: int = 0
    shuffle: bool = True
    process_index: int = 0
    process_count: int = 1
    epoch: int = 0
    position: int = 0  # global batches already consumed in this epoch

    def __post_init__(self):
        sizes = {k: len(v) for k, v in self.arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"dataset arrays disagree on the number of examples: {sizes}")
        self.num_examples = next(iter(sizes.values()))
        if self.global_batch_size % self.process_count:
            raise ConfigError(
                f"global batch size {self.global_batch_size} is not divisible by "
                f"the process count {self.process_count}"
            )
        if self.num_examples < self.global_batch_size:
            raise DataError(
                f"the dataset has {self.num_examples} examples, fewer than one "
                f"global batch of {self.global_batch_size}"
            )
        self.batches_per_epoch = self.num_examples // self.global_batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """[n] permutation of example indices for ``epoch`` (a pure function of seed and epoch)."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def __next__(self) -> dict[str, np.ndarray]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.global_batch_size
        rows = self.epoch_order(self.epoch)[start : start + self.global_batch_size]
        local = self.global_batch_size // self.process_count
        rows = rows[self.process_index * local : (self.process_index + 1) * local]
        self.position += 1
        return {k: np.asarray(v[rows]) for k, v in self.arrays.items()}

    def get_state(self) -> dict:
        """JSON-serialisable position, stored in every checkpoint."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_examples": self.num_examples,
            "global_batch_size": self.global_batch_size,
        }

    def set_state(self, state: Mapping) -> None:
        """Resumes at a saved position; refuses a state saved over different data or batching."""
        for key in ("seed", "num_examples", "global_batch_size"):
            if int(state[key]) != getattr(self, key):
                raise ConfigError(
                    f"data iterator state was saved with {key}={state[key]} but "
                    f"this run has {key}={getattr(self, key)}: the data or "
                    "batching changed"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


@dataclasses.dataclass
class BucketIterator(Iterator[dict[str, np.ndarray]]):
    """Like :class:`BatchIterator`, over ragged examples laid out by bucket or packed.

    Attributes:
      data: the tokenised examples; ``data.buckets`` and ``data.packing`` choose the layout.
      global_batch_size: rows per global batch over all processes (packed: rows of packs).
      seed, shuffle, process_index, process_count, epoch, position: as in BatchIterator.
    """

    data: TokenizedDataset
    global_batch_size: int
    seed: int = 0
    shuffle: bool = True
    process_index: int = 0
    process_count: int = 1
    epoch: int = 0
    position: int = 0  # global batches already consumed in this epoch

    def __post_init__(self):
        if self.global_batch_size % self.process_count:
            raise ConfigError(
                f"global batch size {self.global_batch_size} is not divisible by "
                f"the process count {self.process_count}"
            )
        self.num_examples = len(self.data)
        if self.num_examples < self.global_batch_size:
            raise DataError(
                f"the dataset has {self.num_examples} examples, fewer than one "
                f"global batch of {self.global_batch_size}"
            )
        if not self.data.buckets:
            raise ConfigError("the dataset has no bucket lengths")
        self._natural = self.data.natural_buckets()  # [n]
        self._plans: dict[int, list] = {}
        self.batches_per_epoch = len(self.plan(0))
        if not self.batches_per_epoch:
            raise DataError(
                f"{self.num_examples} examples pack into fewer than one global "
                f"batch of {self.global_batch_size} rows"
            )

    @property
    def layout(self) -> str:
        return self.data.layout

    def epoch_order(self, epoch: int) -> np.ndarray:
        """[n] permutation of example indices for ``epoch`` (a pure function of seed and epoch)."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def plan(self, epoch: int) -> list:
        """The epoch's global batches: ``(bucket, rows [B])`` or lists of ``B`` packed rows."""
        if epoch not in self._plans:
            order = self.epoch_order(epoch)
            if self.data.packing:
                plan = pack_plan(
                    self.data.row_lengths(),
                    order,
                    self.data.row_buckets[-1],
                    self.global_batch_size,
                )
            else:
                rng = np.random.default_rng([self.seed, epoch, 1]) if self.shuffle else None
                plan = bucket_plan(
                    self._natural, len(self.data.row_buckets), order, self.global_batch_size, rng
                )
            self._plans = {epoch: plan}  # keep one epoch: plans are cheap to rebuild
        return self._plans[epoch]

    def __next__(self) -> dict[str, np.ndarray]:
        if self.position >= len(self.plan(self.epoch)):
            self.epoch, self.position = self.epoch + 1, 0
        item = self.plan(self.epoch)[self.position]
        self.position += 1
        local = self.global_batch_size // self.process_count
        mine = slice(self.process_index * local, (self.process_index + 1) * local)
        return self.data.batch(item, mine)

    def get_state(self) -> dict:
        """JSON-serialisable position, stored in every checkpoint."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_examples": self.num_examples,
            "global_batch_size": self.global_batch_size,
            "layout": self.layout,
            "buckets": list(self.data.buckets),
            "digest": self.data.digest,
        }

    def set_state(self, state: Mapping) -> None:
        """Resumes at a saved position; refuses a state saved over different data or batching."""
        mine = self.get_state()
        for key in ("seed", "num_examples", "global_batch_size", "layout", "buckets", "digest"):
            if key not in state or state[key] != mine[key]:
                raise ConfigError(
                    f"data iterator state was saved with {key}={state.get(key)!r} "
                    f"but this run has {key}={mine[key]!r}: the data or batching "
                    "changed"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
