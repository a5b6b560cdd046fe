"""From ``config.data`` to datasets and resumable iterators.

Two kinds of dataset come out of :func:`build_datasets`:

- the built-in gold task (``source='gold_task'``): a dict of fixed-shape numpy arrays in the
  trainer's pair layout, ``input_ids``, ``attention_mask``, ``loss_mask`` ``[n, N, T]``
  (N = 2: chosen, rejected; N = 1: demonstrations) and ``example_id [n]``;
- real data (``source='files'`` or ``'hub'``): a ragged
  :class:`~dil_jax.data.batching.TokenizedDataset` (N = 2 pairs, N = 1 demonstrations or KTO's
  labelled completions with ``extras['labels']``, or ranked lists padded to the largest N),
  read (:mod:`~dil_jax.data.sources`), parsed
  (:mod:`~dil_jax.data.formats`), tokenised (:mod:`~dil_jax.data.tokenize`) and cached on disk
  (:mod:`~dil_jax.data.cache`), whose batches are bucketed or packed at iteration time
  (:mod:`~dil_jax.data.batching`).

:func:`make_iterator` returns the matching resumable iterator for either (for KTO, wrapped so
each batch gains its mismatched completions on the host). :func:`check_layout` refuses data
whose layout the loss terms cannot read (``objectives.data_layout``). Loss masks are
explicit and never derived from ``ids != pad`` (the pad id may equal EOS).

The report. Every real-data build writes ``<workdir>/data_report.json``: per split the records
read, kept and rejected (by reason, with the first few quoted as ``file:line: field``), the
truncations, EOS appends, token-boundary repairs, the HH quirks met, token statistics, the
cache file; and for the run, the padding fraction of exactly the batches its steps will
consume (per bucket and overall), which is also logged.

Multi-process runs: process 0 tokenises and writes the cache while the others wait at a
barrier, then every process loads the same arrays from it (a cache directory that the others
cannot see is warned about, and they tokenise too), so all of them compute the same batch
plan; each then materialises only its own rows of each global batch (``jax.process_index``
/ ``jax.process_count``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import zlib
from collections.abc import Callable, Iterator, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from dil_jax import models, paths, progress, spec
from dil_jax.data import cache, formats, sources, tokenize
from dil_jax.data.batching import TokenizedDataset, kto_pairs, normalise_buckets
from dil_jax.data.checks import SOURCES, check_layout, max_positions, tokenizer_name
from dil_jax.data.gold_task import GoldTask
from dil_jax.data.iterator import BatchIterator, BucketIterator
from dil_jax.data.report import DataError, SplitReport, write_report
from dil_jax.errors import ConfigError

GOLD_FORMATS = ("preference", "sft")


def build_datasets(config, workdir: str | None = None):
    """Returns ``(train, eval, task)``; ``task`` is the GoldTask when applicable.

    Args:
      config: the run config (``config.data`` describes the data; model, loss and train
        sections are checked for consistency with it).
      workdir: where ``data_report.json`` goes (real data); ``None`` writes no report and,
        unless ``config.data.cache_dir`` is set, uses no cache.

    Returns:
      Gold task: dicts of arrays. Real data: :class:`TokenizedDataset` s (eval may be ``None``
      when ``num_eval`` is 0 and there is no eval source).
    """
    config = spec.as_spec(config)
    data = config.data
    if data.source not in SOURCES:
        raise ConfigError(f"config.data.source={data.source!r}: expected one of {SOURCES}")
    if data.source == "gold_task":
        return _gold_task(config)
    tok_name = tokenizer_name(config)
    tok = tokenize.load_tokenizer(tok_name, data.eos_token)
    check_tokenizer_fits(tok, tok_name, config)
    cache_dir = data.cache_dir or (paths.sibling(workdir, "data_cache") if workdir else "")
    tok_digest = tokenize.tokenizer_digest(tok)
    buckets = normalise_buckets(data.buckets, data.max_length)

    train, train_report = _build_split("train", config, tok, tok_digest, cache_dir)
    check_layout(
        config, train_report.info.get("format", data.format), train.num_responses, error=DataError
    )
    has_eval_source = bool(data.eval_files if data.source == "files" else data.eval_split)
    if has_eval_source:
        held_out, eval_report = _build_split("eval", config, tok, tok_digest, cache_dir)
    else:
        train, held_out = _hold_out(train, data.num_eval, data.seed)
        eval_report = None
    train.buckets = buckets
    train.packing, train.prefix_sharing = data.packing, data.prefix_sharing
    if held_out is not None:
        held_out.buckets, held_out.packing = buckets, data.packing
        held_out.prefix_sharing = data.prefix_sharing
        if config.eval.every_steps and len(held_out) < config.eval.batch_size:
            raise DataError(
                f"the evaluation split has {len(held_out)} examples, fewer than "
                f"config.eval.batch_size={config.eval.batch_size}"
            )

    report = {
        "train": train_report.to_dict(),
        "eval": eval_report.to_dict()
        if eval_report
        else {"held_out_from_train": 0 if held_out is None else len(held_out)},
        "tokenizer": {
            "name": tok_name,
            "vocab": len(tok),
            "eos_id": tok.eos_token_id,
            "pad_id": train.pad_id,
        },
        "buckets": list(buckets),
        "packing": bool(data.packing),
        "prefix_sharing": bool(data.prefix_sharing),
    }
    report["train"]["examples"] = len(train)
    if held_out is not None:
        report["eval"]["examples"] = len(held_out)
    run = padding_stats(train, config.train.global_batch_size, config.train.steps, seed=data.seed)
    report["run_padding"] = run
    logging.info(
        "data: %d train / %d eval examples (%d bad records skipped); padding fraction "
        "over the run's %d batches: %.3f (%s layout, buckets %s)",
        len(train),
        0 if held_out is None else len(held_out),
        train_report.num_bad,
        run["batches"],
        run["padding_fraction"],
        run["layout"],
        list(buckets),
    )
    if workdir is not None and jax.process_index() == 0:
        path = write_report(workdir, report)
        logging.info("data report written to %s", path)
    train.report = report
    return train, held_out, None


def make_iterator(
    data,
    global_batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    unpaired: bool = False,
):
    """This process's resumable iterator over ``data`` (``jax.process_index`` slice).

    Args:
      data: a dict of fixed-shape arrays (gold task) or a :class:`TokenizedDataset`.
      unpaired: KTO's layout: every batch of single labelled completions ``[B, 1, T]`` becomes
        ``[B, 2, T]`` on the host, before sharding (:class:`UnpairedIterator`).
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    cls = BucketIterator if isinstance(data, TokenizedDataset) else BatchIterator
    it = cls(
        data,
        global_batch_size,
        seed=seed,
        shuffle=shuffle,
        process_index=process_index,
        process_count=process_count,
    )
    if unpaired:
        if global_batch_size // process_count < 2:
            raise DataError(
                f"KTO pairs each completion with another example's of the same "
                f"batch: each process needs >= 2 rows, got a batch of "
                f"{global_batch_size} over {process_count} processes"
            )
        return UnpairedIterator(it)
    return it


class UnpairedIterator(Iterator[dict[str, np.ndarray]]):
    """KTO's batches: each labelled completion plus a mismatched one (``batching.kto_pairs``).

    Pair index 1 holds ``prompt_i + completion_{i+1}`` of the same batch (this process's rows,
    as TRL shifts within each per-device batch), so it depends on which examples share a batch:
    nothing about it can be precomputed (``reference.mode='precomputed'`` is refused). The
    position (``get_state``/``set_state``) is the wrapped iterator's.
    """

    def __init__(self, inner):
        self.inner = inner
        self.batches_per_epoch = inner.batches_per_epoch

    def __next__(self) -> dict[str, np.ndarray]:
        return kto_pairs(next(self.inner))

    def get_state(self) -> dict:
        return self.inner.get_state()

    def set_state(self, state: Mapping) -> None:
        self.inner.set_state(state)


def with_reference(data, compute: Callable[[dict], dict]):
    """``data`` plus precomputed ``ref_logps [n, N]``.

    Args:
      data: a dict of arrays or a :class:`TokenizedDataset`.
      compute: maps a dict of fixed-shape token arrays to the same dict plus ``ref_logps``
        (``reference.with_reference_logps`` bound to the trainer and params). A tokenised
        dataset is passed to it one natural bucket at a time (a per-example log-prob does not
        depend on the padding), so the reference runs on short arrays for short examples.
    """
    if not isinstance(data, TokenizedDataset):
        return compute(data)
    # Per-example log-probs do not depend on the layout: computed on padded sequences, then
    # laid out per slot by the packed / prefix-shared layouts (``TokenizedDataset.batch``).
    natural = np.searchsorted(np.asarray(data.buckets), data.lengths.max(axis=1), side="left")
    ref = np.zeros(data.lengths.shape, np.float32)  # [n, N]
    for k, length in enumerate(data.buckets):
        rows = np.flatnonzero(natural == k)
        if len(rows):
            arrays = data.padded(rows, length)
            arrays = {key: arrays[key] for key in ("input_ids", "attention_mask", "loss_mask")}
            ref[rows] = compute(arrays)["ref_logps"]
    return dataclasses.replace(data, extras={**data.extras, "ref_logps": ref})


def padding_stats(data: TokenizedDataset, global_batch_size: int, steps: int, *, seed: int) -> dict:
    """Padding of exactly the batches a run of ``steps`` steps consumes, from the batch plan."""
    it = BucketIterator(data, global_batch_size, seed=seed)
    row_lengths = data.row_lengths()  # [n, R]
    num = row_lengths.shape[1]
    slots, real = {}, {}
    epoch, position = 0, 0
    for _ in range(steps):  # the iterator's walk, without materialising any batch
        if position >= len(it.plan(epoch)):
            epoch, position = epoch + 1, 0
        item = it.plan(epoch)[position]
        position += 1
        if data.packing:
            length = data.row_buckets[-1]
            used = sum(int(row_lengths[rows].sum()) for rows in item)
        else:
            length = data.row_buckets[item[0]]
            used = int(row_lengths[item[1]].sum())
        slots[length] = slots.get(length, 0) + global_batch_size * num * length
        real[length] = real.get(length, 0) + used
    total = sum(slots.values())
    return {
        "layout": data.layout,
        "batches": steps,
        "padding_fraction": 1.0 - sum(real.values()) / max(total, 1),
        "per_bucket": {
            str(k): {
                "batches": slots[k] // (global_batch_size * num * k),
                "padding_fraction": 1.0 - real[k] / slots[k],
            }
            for k in sorted(slots)
        },
        # what padding every sequence to max_length would cost, for comparison
        "padding_fraction_unbucketed": 1.0
        - float(data.lengths.sum()) / (data.lengths.size * data.buckets[-1]),
    }


# ----------------------------------------------------------------------------- validation


def _own_vocabulary(hf_path: str) -> dict[str, int] | None:
    """The model directory's own token -> id map, or ``None`` when it ships no tokenizer
    (weights only) or one that does not load (nothing to compare against)."""
    if not hf_path:
        return None
    if paths.exists(paths.join(hf_path, "tokenizer.json")):
        from tokenizers import Tokenizer  # noqa: PLC0415 (heavy import)

        try:  # the vocabulary alone: no EOS or template needed to compare ids
            return Tokenizer.from_file(paths.join(hf_path, "tokenizer.json")).get_vocab(True)
        except Exception:  # noqa: BLE001 (a malformed file: the id checks still apply)
            return None
    if paths.exists(paths.join(hf_path, "tokenizer_config.json")):
        try:
            return tokenize.load_tokenizer(hf_path).get_vocab()
        except DataError:
            return None
    return None


def check_tokenizer_fits(tok, name: str, config) -> None:
    """Refuses a tokenizer whose ids the model cannot read, in one line naming both.

    The model's vocabulary is the resolved one (with ``config.model.hf_path``, that model's
    ``config.json``, never the stale ``config.model.vocab_size``). Checked: every token id and
    the EOS/BOS/pad ids are below the model's vocabulary size; and, when ``name`` is not the
    model directory itself but the directory ships its own tokenizer, that the two map the
    same strings to the same ids (a foreign tokenizer of a smaller vocabulary fits the
    embedding table and would train the model on meaningless ids without a word).

    Raises:
      DataError naming the tokenizer and the model.
    """
    hf_path = config.model.get("hf_path", "") or ""
    vocab_size = models.architecture_config(config.model).vocab_size
    model = (
        f"model {hf_path!r} (vocab_size {vocab_size})"
        if hf_path
        else f"the model (config.model.vocab_size={vocab_size})"
    )
    who = f"tokenizer {name!r}"
    fix = "; set config.data.tokenizer to the model's own tokenizer" + (
        " (or leave it empty: the default with config.model.hf_path)" if hf_path else ""
    )
    if len(tok) > vocab_size:
        raise DataError(f"{who} has {len(tok)} tokens, more than {model} can embed{fix}")
    specials = {"EOS": tok.eos_token_id, "BOS": tok.bos_token_id, "pad": tok.pad_token_id}
    for kind, token_id in specials.items():
        if token_id is not None and token_id >= vocab_size:
            raise DataError(f"{who}'s {kind} id {token_id} is outside {model}'s vocabulary{fix}")
    same_dir = hf_path and paths.absolute(name) == paths.absolute(hf_path)
    if hf_path and not same_dir:
        own = _own_vocabulary(hf_path)
        if own is not None and own != tok.get_vocab():
            raise DataError(
                f"{who} ({len(tok)} tokens) does not match the vocabulary of {model}, whose "
                f"own tokenizer has {len(own)} tokens{fix}"
            )


# ----------------------------------------------------------------------------- building


def _gold_task(config):
    data = config.data
    if data.format not in GOLD_FORMATS:
        raise ConfigError(
            f"config.data.format={data.format!r}: the gold task has formats {GOLD_FORMATS}"
        )
    check_layout(config, data.format, 2 if data.format == "preference" else 1)
    task = GoldTask()
    if task.seq_len > max_positions(config):
        raise ConfigError(
            f"the model's maximum sequence length {max_positions(config)} is "
            f"shorter than the gold task's sequences ({task.seq_len} tokens)"
        )
    if task.vocab_size > config.model.vocab_size:
        raise ConfigError(
            f"config.model.vocab_size={config.model.vocab_size} is smaller than the "
            f"gold task's vocabulary ({task.vocab_size})"
        )
    make = task.preference_dataset if data.format == "preference" else task.sft_dataset
    # Distinct seeds for train and held-out data: no prompt stream is shared.
    train = make(data.num_train, seed=data.seed, source=data.response_source)
    held_out = make(data.num_eval, seed=data.seed + 1, source=data.response_source)
    return _trainer_arrays(train), _trainer_arrays(held_out), task


def _trainer_arrays(d: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    keys = ("input_ids", "attention_mask", "loss_mask", "example_id")
    return {k: np.asarray(d[k]) for k in keys}


def _split_sources(config, split: str) -> tuple[Callable, str, str]:
    """(records factory, cache-key digest of the data, description) of one split."""
    d = config.data
    if d.source == "files":
        paths = tuple(d.train_files if split == "train" else d.eval_files)
        return (
            lambda report: sources.read_files(paths, report, d.max_records),
            sources.files_digest(paths),
            ", ".join(paths),
        )
    hub_split = d.train_split if split == "train" else d.eval_split
    return (
        lambda report: sources.read_hub(
            d.hub_id,
            hub_split,
            name=d.hub_config,
            revision=d.hub_revision,
            max_records=d.max_records,
            data_dir=d.hub_data_dir,
        ),
        sources.hub_digest(d.hub_id, hub_split, d.hub_config, d.hub_revision, d.hub_data_dir),
        f"{d.hub_id}[{hub_split}]",
    )


def _build_split(split: str, config, tok, tok_digest: str, cache_dir: str):
    """The tokenised dataset of one split and its report (from the cache when possible)."""
    d = config.data
    read, data_digest, description = _split_sources(config, split)
    rejected_digest = sources.files_digest(d.rejected_files) if d.rejected_files else ""
    key = cache.content_key(
        {
            "split": split,
            "data": data_digest,
            "rejected": rejected_digest,
            "format": d.format,
            "field_map": dict(d.field_map),
            "tokenizer": tok_digest,
            "eos": d.eos_token,
            "chat_template": d.chat_template,
            "prompt_template": d.prompt_template,
            "response_template": d.response_template,
            "max_length": d.max_length,
            "max_prompt_length": d.max_prompt_length,
            "truncation_mode": d.truncation_mode,
            "too_long": d.too_long,
            "boundary_mismatch": d.boundary_mismatch,
            "on_bad_record": d.on_bad_record,
            "max_records": d.max_records,
            # labelled records keep their labels (cache.OPTIONAL_KEYS): never a label-less hit
            **({"labels": True} if d.format in formats.UNPAIRED_FORMATS else {}),
        }
    )
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    hit = None
    if cache_dir:
        build = lambda: _build_and_save(read, config, tok, split, key, cache_dir, description)  # noqa: E731
        hit = _load_shared(cache_dir, split, key, description, build)
    if hit is not None:
        arrays, report_dict = hit
        report = SplitReport.from_dict(split, d.on_bad_record, report_dict)
        report.info["cache"] = {"file": cache.path_for(cache_dir, split, key), "hit": True}
        progress.announce(
            f"{split} data: tokenised-data cache hit, "
            f"{len(arrays['example_id'])} examples loaded from "
            f"{report.info['cache']['file']} (no tokenisation)"
        )
    else:
        report = SplitReport(split, d.on_bad_record)
        arrays = _tokenise_split(read, config, tok, report, key)
        report.info.update(sources=description, **_token_stats(arrays))
        if cache_dir and len(arrays["example_id"]) and jax.process_index() == 0:
            path = cache.save(
                cache_dir,
                split,
                key,
                arrays,
                {k: v for k, v in report.to_dict().items() if k != "cache"},
            )
            report.info["cache"] = {"file": path, "hit": False}
    if not len(arrays["example_id"]):
        raise DataError(
            f"no {split} examples left after filtering {description}: "
            f"{report.counts.get('records_read', 0)} records read, rejected "
            f"{dict(report.bad)}, other counts {dict(report.counts)}"
        )
    arrays = dict(arrays)
    extras = {k: arrays.pop(k) for k in cache.OPTIONAL_KEYS if k in arrays}  # labels [n]
    return TokenizedDataset(**arrays, pad_id=int(pad_id), extras=extras, digest=key), report


def _load_shared(cache_dir: str, split: str, key: str, description: str, build):
    """The split from the cache; in a multi-process run, process 0 builds it first (``build``,
    which writes the cache) while the others wait at a barrier, then read what it wrote.

    None means this process must tokenise itself: a single-process miss, or a cache directory
    the other processes cannot see (not shared storage; warned, since every host then
    tokenises the whole split).
    """
    if jax.process_count() == 1:
        return cache.load(cache_dir, split, key)
    if jax.process_index() == 0:
        hit = cache.load(cache_dir, split, key)
        if hit is None:
            build()
    multihost_utils.sync_global_devices(f"dil_jax.data:{split}:{key}")
    hit = cache.load(cache_dir, split, key)
    if hit is None and jax.process_index() != 0:
        logging.warning(
            "%s data: process %d cannot read the tokenised-data cache process 0 wrote in %s "
            "(not shared storage?); tokenising %s here too. Put data.cache_dir on storage "
            "every host sees (a gs:// bucket or a shared mount).",
            split,
            jax.process_index(),
            cache_dir,
            description,
        )
    return hit


def _build_and_save(read, config, tok, split, key, cache_dir, description) -> None:
    """Tokenises a split and writes its cache file (process 0 of a multi-process run)."""
    report = SplitReport(split, config.data.on_bad_record)
    arrays = _tokenise_split(read, config, tok, report, key)
    report.info.update(sources=description, **_token_stats(arrays))
    if len(arrays["example_id"]):
        cache.save(cache_dir, split, key, arrays, report.to_dict())


def _tokenise_split(read, config, tok, report: SplitReport, key: str) -> dict:
    d = config.data
    records = read(report)
    first = next(records, None)
    fmt = formats.resolve_format(d.format, first, bool(d.rejected_files))
    report.info["format"] = fmt
    renderer = tokenize.Renderer(
        tok, d.chat_template, fmt, d.prompt_template, d.response_template, tokenizer_name(config)
    )
    report.info["rendering"] = renderer.mode
    field_map = {k: v for k, v in d.field_map.items() if v}
    stream = itertools.chain([first], records) if first is not None else iter(())
    examples = formats.parse_records(stream, fmt, field_map, report)
    if fmt == "demonstration_pairs":
        rejected = formats.parse_records(
            sources.read_files(tuple(d.rejected_files), report, d.max_records),
            fmt,
            field_map,
            report,
            counter="rejected_records_read",
        )
        examples = formats.join_demonstrations(examples, rejected, report)
    return tokenize.tokenize_examples(
        examples,
        tok,
        renderer,
        max_length=d.max_length,
        max_prompt_length=d.max_prompt_length,
        truncation_mode=d.truncation_mode,
        too_long=d.too_long,
        boundary_mismatch=d.boundary_mismatch,
        report=report,
        num_proc=d.num_proc,
        fingerprint=key,
    )


def _token_stats(arrays: dict) -> dict:
    lengths, prompts = arrays["lengths"], arrays["prompt_lengths"]
    if not lengths.size:
        return {}
    responses = lengths - prompts
    return {
        "tokens": int(lengths.sum()),
        "prompt_tokens": {"mean": float(prompts[:, 0].mean()), "max": int(prompts.max())},
        "response_tokens": {"mean": float(responses.mean()), "max": int(responses.max())},
        "sequence_tokens": {"mean": float(lengths.mean()), "max": int(lengths.max())},
    }


def _hold_out(train: TokenizedDataset, num_eval: int, seed: int):
    """Splits ``num_eval`` random examples (by seed) off the training set."""
    if num_eval == 0:
        return train, None
    if num_eval >= len(train):
        raise DataError(
            f"config.data.num_eval={num_eval} leaves no training examples out of {len(train)}"
        )
    perm = np.random.default_rng([seed, zlib.crc32(b"hold_out")]).permutation(len(train))
    return train.select(np.sort(perm[num_eval:])), train.select(np.sort(perm[:num_eval]))
