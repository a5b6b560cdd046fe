"""Ragged tokenised examples, and their layout into fixed-shape batches.

A :class:`TokenizedDataset` keeps every sequence at its true length (``tokens`` back to back,
with ``starts``/``lengths``/``prompt_lengths [n, N]``), so nothing is padded until a batch is
built. Two layouts turn examples into the trainer's ``[B, N, T]`` arrays:

- **Bucketed** (default): each batch is padded to one of a small fixed set of lengths
  (``config.data.buckets``), so the jitted step compiles at most ``len(buckets)`` times while
  short examples are not padded to the longest. :func:`bucket_plan` walks the epoch's shuffled
  order bucket by bucket, smallest first, and cuts full global batches; the leftover examples of
  a bucket (fewer than a batch) move up into the next larger bucket, so an epoch always has
  ``n // B`` batches and drops only the last ``n mod B`` examples (different ones every epoch).
  The batch order is then shuffled. The plan is a pure function of (lengths, seed, epoch).
- **Packed** (``config.data.packing``): several examples share a row of ``max(buckets)`` tokens,
  with ``segment_ids`` (1, 2, … per example, 0 on padding) and ``positions`` restarting at 0 for
  every example; the pair axis stays aligned (an example's chosen and rejected sequences sit in
  the same row and segment of ``N = 0`` and ``N = 1``). :func:`pack_plan` fills rows first-fit
  in the epoch's order.
- **Prefix-shared** (``config.data.prefix_sharing``, bucketed or packed): an example's ``N``
  sequences become one ``[prompt | response_1 | … | response_N]`` stretch of a single row
  (``R = 1``), each response attending to the prompt and to itself (``branch_ids``), with
  positions restarting at the prompt's end: the prompt is computed once, not ``N`` times.

Arrays of a batch (``B`` rows, int32): ``input_ids``, ``attention_mask``, ``loss_mask``
``[B, R, T]`` (R = N, or 1 prefix-shared; masks from lengths, never from ``ids != pad``);
``example_id [B]`` (bucketed) or ``[B, S]`` with ``-1`` for empty slots (packed / shared); plus,
packed or shared, ``segment_ids``, ``positions``, ``pair_index`` ``[B, R, T]`` (which of the
row's ``S·N`` sequences a token belongs to, ``slot · N + j``) and ``slot_mask [B, S, N]`` (1 on
real examples), ``branch_ids [B, 1, T]`` when shared; and per-example extras such as
``ref_logps``: ``[B, N]`` bucketed, ``[B, S, N]`` per slot otherwise.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class TokenizedDataset:
    """Ragged token sequences of ``n`` examples with ``N`` responses each.

    Attributes:
      tokens: [total] int32, every sequence (prompt + response) back to back.
      starts: [n, N] int64 offset of each sequence in ``tokens``.
      lengths: [n, N] int32 tokens per sequence (prompt + response).
      prompt_lengths: [n, N] int32 prompt tokens per sequence (the loss mask starts there).
      example_id: [n] int32 stable ids (record positions in the source).
      pad_id: filler for padded slots (masks never look at it).
      buckets: padded lengths of the bucketed layout, ascending; the last is the longest allowed.
      packing: use the packed layout (rows of ``buckets[-1]`` tokens; prefix-shared: ``N``
        times that).
      prefix_sharing: lay each example out once as ``[prompt | response_1 | … | response_N]``
        (:meth:`shared`), bucketed by its shared length or packed.
      extras: per-example arrays ``[n, ...]`` carried into batches (e.g. ``ref_logps [n, N]``).
      digest: content hash of the tokenised data (the cache key); iterator states record it.
      report: the build's report (what ``data_report.json`` holds), for programmatic use.
    """

    tokens: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    prompt_lengths: np.ndarray
    example_id: np.ndarray
    pad_id: int = 0
    buckets: tuple[int, ...] = ()
    packing: bool = False
    prefix_sharing: bool = False
    extras: dict = dataclasses.field(default_factory=dict)
    digest: str = ""
    report: dict = dataclasses.field(default_factory=dict, repr=False)
    _shared_lengths: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.example_id)

    @property
    def num_responses(self) -> int:
        return self.lengths.shape[1]

    def select(self, rows: np.ndarray) -> TokenizedDataset:
        """The examples ``rows`` (tokens shared, not copied)."""
        return dataclasses.replace(
            self,
            starts=self.starts[rows],
            lengths=self.lengths[rows],
            prompt_lengths=self.prompt_lengths[rows],
            example_id=self.example_id[rows],
            extras={k: v[rows] for k, v in self.extras.items()},
            _shared_lengths=None,
        )

    @property
    def layout(self) -> str:
        """'bucketed', 'packed', 'shared' or 'packed_shared' (iterator states record it)."""
        if self.prefix_sharing:
            return "packed_shared" if self.packing else "shared"
        return "packed" if self.packing else "bucketed"

    @property
    def row_buckets(self) -> tuple[int, ...]:
        """Padded row lengths of this layout: ``buckets``, or for the prefix-shared layout the
        same plus ``N · buckets[-1]`` (an example's sequences laid out one after another)."""
        if not self.prefix_sharing or not self.buckets:
            return tuple(self.buckets)
        return normalise_buckets(self.buckets, self.num_responses * self.buckets[-1])

    def row_lengths(self) -> np.ndarray:
        """[n, R] tokens each example takes on each row it uses (R = N, or 1 prefix-shared)."""
        if not self.prefix_sharing:
            return self.lengths
        if self._shared_lengths is None:
            self._shared_lengths = self.shared_lengths()
        return self._shared_lengths

    def natural_buckets(self) -> np.ndarray:
        """[n] index of the smallest row bucket that holds each example's longest row."""
        longest = self.row_lengths().max(axis=1)
        return np.searchsorted(np.asarray(self.row_buckets), longest, side="left")

    def batch(self, item, mine: slice = slice(None)) -> dict[str, np.ndarray]:
        """The arrays of one plan entry (``bucket_plan`` / ``pack_plan``), rows ``mine``."""
        if self.packing:
            rows, length = item[mine], self.row_buckets[-1]
            return self.shared(rows, length) if self.prefix_sharing else self.packed(rows, length)
        bucket, rows = item
        length = self.row_buckets[bucket]
        if self.prefix_sharing:
            return self.shared([np.asarray([e]) for e in rows[mine]], length)
        return self.padded(rows[mine], length)

    def padded(self, rows: np.ndarray, length: int) -> dict[str, np.ndarray]:
        """Bucketed-layout arrays of examples ``rows``, right-padded to ``length``."""
        pos = np.arange(length)  # [T]
        lengths = self.lengths[rows][..., None]  # [B, N, 1]
        real = pos < lengths  # [B, N, T]
        index = np.where(real, self.starts[rows][..., None] + pos, 0)
        ids = np.where(real, self.tokens[index], self.pad_id)
        response = real & (pos >= self.prompt_lengths[rows][..., None])
        out = {
            "input_ids": ids.astype(np.int32),
            "attention_mask": real.astype(np.int32),
            "loss_mask": response.astype(np.int32),
            "example_id": self.example_id[rows].astype(np.int32),
        }
        out.update({k: v[rows] for k, v in self.extras.items()})
        return out

    def packed(self, pack_rows: list[np.ndarray], length: int) -> dict[str, np.ndarray]:
        """Packed-layout arrays: row ``b`` holds the examples ``pack_rows[b]`` back to back."""
        b, num = len(pack_rows), self.num_responses
        slots = max(len(r) for r in pack_rows)
        ids = np.full((b, num, length), self.pad_id, np.int32)
        attention, loss, segment, positions = (
            np.zeros((b, num, length), np.int32) for _ in range(4)
        )
        pair_index = np.full((b, num, length), -1, np.int32)
        example_id = np.full((b, slots), -1, np.int32)
        for i, rows in enumerate(pack_rows):
            example_id[i, : len(rows)] = self.example_id[rows]
            for j in range(num):
                offset = 0
                for s, e in enumerate(rows):
                    n_tok, start = int(self.lengths[e, j]), int(self.starts[e, j])
                    span = slice(offset, offset + n_tok)
                    ids[i, j, span] = self.tokens[start : start + n_tok]
                    attention[i, j, span] = 1
                    # A sequence's first token is never scored (as at position 0 of a padded
                    # row): its predecessor in the row belongs to another example.
                    first = offset + max(int(self.prompt_lengths[e, j]), 1)
                    loss[i, j, first : offset + n_tok] = 1
                    segment[i, j, span] = s + 1
                    positions[i, j, span] = np.arange(n_tok)
                    pair_index[i, j, span] = s * num + j
                    offset += n_tok
        out = {
            "input_ids": ids,
            "attention_mask": attention,
            "loss_mask": loss,
            "segment_ids": segment,
            "positions": positions,
            "pair_index": pair_index,
            "slot_mask": np.repeat((example_id >= 0)[..., None], num, axis=2).astype(np.int32),
            "example_id": example_id,
        }
        out.update(self._slot_extras(pack_rows, slots))
        return out

    def _slot_extras(self, pack_rows: list[np.ndarray], slots: int) -> dict[str, np.ndarray]:
        """Per-example extras laid out per slot ``[B, S, ...]`` (zeros in empty slots)."""
        out = {}
        for k, v in self.extras.items():
            arr = np.zeros((len(pack_rows), slots, *v.shape[1:]), v.dtype)
            for i, rows in enumerate(pack_rows):
                arr[i, : len(rows)] = v[rows]
            out[k] = arr
        return out

    def shared_prefix_lengths(self) -> np.ndarray:
        """[n] tokens each example's ``N`` sequences share in the prefix-shared layout.

        The longest common token prefix of the ``N`` sequences, cut so that every sequence
        keeps at least its last prompt token in its own branch: a scored token ``t`` is
        predicted from token ``t − 1``, which must then see exactly the tokens before it.
        """
        n, num = self.lengths.shape
        shared = np.maximum(self.prompt_lengths.min(axis=1).astype(np.int64) - 1, 0)  # [n]
        for e in range(n):
            if num < 2 or shared[e] == 0:
                continue
            seqs = [
                self.tokens[self.starts[e, j] : self.starts[e, j] + shared[e]] for j in range(num)
            ]
            differ = np.flatnonzero(np.any(np.stack(seqs[1:]) != seqs[0], axis=0))
            if len(differ):
                shared[e] = differ[0]
        return shared

    def shared_lengths(self) -> np.ndarray:
        """[n, 1] tokens of each example in the prefix-shared layout (prefix + every branch)."""
        shared = self.shared_prefix_lengths()
        return (self.lengths.sum(axis=1) - (self.num_responses - 1) * shared)[:, None]

    def shared(self, pack_rows: list[np.ndarray], length: int) -> dict[str, np.ndarray]:
        """Prefix-shared arrays ``[B, 1, T]``: row ``b`` holds the examples ``pack_rows[b]``.

        An example is laid out once as ``[prefix | branch_1 | … | branch_N]``: the prefix is its
        sequences' shared start (:meth:`shared_prefix_lengths`), branch ``j`` the rest of
        sequence ``j``. ``branch_ids`` (0 on the prefix, ``j + 1`` on branch ``j``) let a token
        attend to its own branch and the prefix only, and ``positions`` restart at the prefix's
        end in every branch, so each branch computes exactly what its sequence alone computes.
        ``pair_index`` (``slot · N + j``, −1 on padding) names the sequence a token scores for.
        """
        b, num = len(pack_rows), self.num_responses
        slots = max(len(r) for r in pack_rows)
        prefix = self.shared_prefix_lengths()
        ids = np.full((b, 1, length), self.pad_id, np.int32)
        attention, loss, segment, positions, branch = (
            np.zeros((b, 1, length), np.int32) for _ in range(5)
        )
        pair_index = np.full((b, 1, length), -1, np.int32)
        example_id = np.full((b, slots), -1, np.int32)
        for i, rows in enumerate(pack_rows):
            example_id[i, : len(rows)] = self.example_id[rows]
            offset = 0
            for s, e in enumerate(rows):
                p, start0 = int(prefix[e]), int(self.starts[e, 0])
                span = slice(offset, offset + p)
                ids[i, 0, span] = self.tokens[start0 : start0 + p]
                positions[i, 0, span] = np.arange(p)
                attention[i, 0, span], segment[i, 0, span] = 1, s + 1
                offset += p
                for j in range(num):
                    n_tok, start = int(self.lengths[e, j]) - p, int(self.starts[e, j]) + p
                    span = slice(offset, offset + n_tok)
                    ids[i, 0, span] = self.tokens[start : start + n_tok]
                    positions[i, 0, span] = np.arange(p, p + n_tok)
                    attention[i, 0, span], segment[i, 0, span] = 1, s + 1
                    branch[i, 0, span] = j + 1
                    pair_index[i, 0, span] = s * num + j
                    first = max(int(self.prompt_lengths[e, j]), 1) - p  # branch-relative
                    loss[i, 0, offset + first : offset + n_tok] = 1
                    offset += n_tok
        out = {
            "input_ids": ids,
            "attention_mask": attention,
            "loss_mask": loss,
            "segment_ids": segment,
            "positions": positions,
            "branch_ids": branch,
            "pair_index": pair_index,
            "slot_mask": np.repeat((example_id >= 0)[..., None], num, axis=2).astype(np.int32),
            "example_id": example_id,
        }
        out.update(self._slot_extras(pack_rows, slots))
        return out


def normalise_buckets(buckets, max_length: int) -> tuple[int, ...]:
    """Ascending bucket lengths below ``max_length``, then ``max_length`` itself (always last)."""
    return tuple(sorted({int(b) for b in buckets if 0 < int(b) < max_length})) + (max_length,)


def bucket_plan(
    natural: np.ndarray,
    num_buckets: int,
    order: np.ndarray,
    batch_size: int,
    rng: np.random.Generator | None,
) -> list[tuple[int, np.ndarray]]:
    """One epoch of bucketed global batches: ``[(bucket index, example rows [B])]``.

    Args:
      natural: [n] each example's smallest fitting bucket.
      num_buckets: number of buckets.
      order: [n] the epoch's example order.
      batch_size: global batch size B.
      rng: shuffles the batch order (None keeps bucket order: evaluation).
    """
    where = natural[order]
    plan, carry = [], np.zeros(0, dtype=order.dtype)
    for k in range(num_buckets):
        pool = np.concatenate([carry, order[where == k]])
        full = len(pool) // batch_size * batch_size
        plan += [(k, rows) for rows in pool[:full].reshape(-1, batch_size)]
        carry = pool[full:]
    if rng is not None:
        plan = [plan[i] for i in rng.permutation(len(plan))]
    return plan


def pack_plan(
    lengths: np.ndarray,
    order: np.ndarray,
    row_length: int,
    batch_size: int,
    open_rows: int = 64,
) -> list[list[np.ndarray]]:
    """One epoch of packed global batches: each a list of ``B`` rows of example indices.

    First fit over a bounded set of open rows, in the epoch's order: an example joins the first
    open row where every one of its ``R`` sequences still fits beside that row's sequences on
    the same index; else it opens a new row. When ``open_rows`` rows are open, the fullest is
    closed (emitted) first. Short examples so fill the gaps long ones leave, and the plan stays
    a pure function of (lengths, order). The last incomplete batch of rows is dropped.

    Args:
      lengths: [n, R] tokens each example takes on each of a row's R sequences.
      order: [n] the epoch's example order.
      row_length: tokens per row.
      batch_size: rows per global batch.
      open_rows: rows kept open at once (1: next fit).
    """
    num = lengths.shape[1]
    used = np.zeros((0, num), np.int64)  # [open, R] tokens used per open row
    members: list[list[int]] = []
    rows: list[np.ndarray] = []
    for e in order:
        need = lengths[e]
        fits = np.flatnonzero(np.all(used + need <= row_length, axis=1))
        if len(fits):
            i = fits[0]
            used[i] += need
            members[i].append(e)
            continue
        if len(members) >= open_rows:  # close the fullest open row
            i = int(np.argmax(used.sum(axis=1)))
            rows.append(np.asarray(members.pop(i)))
            used = np.delete(used, i, axis=0)
        used = np.concatenate([used, need[None].astype(np.int64)])
        members.append([e])
    rows += [np.asarray(m) for m in members]
    full = len(rows) // batch_size * batch_size
    return [rows[i : i + batch_size] for i in range(0, full, batch_size)]


def kto_pairs(batch: dict[str, np.ndarray], shift: int = 1) -> dict[str, np.ndarray]:
    """KTO's batch layout from a batch of single labelled completions (numpy, host-side).

    Pair index 0 keeps each example's own ``prompt_i + completion_i``; index 1 is the mismatched
    ``prompt_i + completion_{(i + shift) mod B}`` whose log-ratio estimates KTO's reference point
    (Ethayarajh et al. 2024; TRL builds the same KL completions by shifting within the batch).
    Sequences are spliced at the token level (as TRL concatenates prompt and completion ids) and
    right-padded; a mismatched sequence longer than ``T`` loses its response tail, which only
    affects the (gradient-free) KL estimate.

    Args:
      batch: bucketed arrays ``input_ids``, ``attention_mask``, ``loss_mask`` ``[B, 1, T]``
        (prompt then response, right-padded); other keys (``labels [B]``, ``example_id``) pass
        through.
      shift: which other example lends its completion (B >= 2 needs shift mod B != 0).
    Returns:
      The same keys with ``[B, 2, T]`` sequence arrays.
    """
    ids, attn, loss = (np.asarray(batch[k]) for k in ("input_ids", "attention_mask", "loss_mask"))
    if ids.ndim != 3 or ids.shape[1] != 1:
        raise ValueError(f"kto_pairs needs single completions [B, 1, T], got {ids.shape}")
    b, _, t = ids.shape
    if b < 2 or shift % b == 0:
        raise ValueError(
            f"kto_pairs needs a batch of >= 2 examples and shift mod B != 0, got "
            f"B={b}, shift={shift}"
        )
    prompt = (attn[:, 0] != 0) & (loss[:, 0] == 0)  # [B, T]
    response = loss[:, 0] != 0  # [B, T]
    out_ids = np.zeros((b, t), ids.dtype)
    out_attn = np.zeros((b, t), attn.dtype)
    out_loss = np.zeros((b, t), loss.dtype)
    for i in range(b):  # host-side, once per batch
        j = (i + shift) % b
        p_tok, r_tok = ids[i, 0][prompt[i]], ids[j, 0][response[j]]
        r_tok = r_tok[: max(t - len(p_tok), 0)]
        n = len(p_tok) + len(r_tok)
        out_ids[i, :n] = np.concatenate([p_tok, r_tok])
        out_attn[i, :n] = 1
        out_loss[i, len(p_tok) : n] = 1
    out = dict(batch)
    out["input_ids"] = np.concatenate([ids, out_ids[:, None]], axis=1)
    out["attention_mask"] = np.concatenate([attn, out_attn[:, None]], axis=1)
    out["loss_mask"] = np.concatenate([loss, out_loss[:, None]], axis=1)
    return out
