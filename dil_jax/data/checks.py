"""Checks of a run's data section, before any record is read; each error names the field.

``dil_jax.validation`` runs them once per run spec (``dil_jax.spec.build``); the data pipeline
re-checks only what the records themselves reveal (the format found, the number of responses).
"""

from __future__ import annotations

import string

from dil_jax import models, objectives
from dil_jax.data import formats, tokenize
from dil_jax.errors import ConfigError

SOURCES = ("gold_task", "files", "hub")


def _template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def tokenizer_name(config) -> str:
    """The tokenizer a real-data run loads: ``config.data.tokenizer``, else the model's own.

    With ``config.data.tokenizer`` empty and ``config.model.hf_path`` set, the model directory's
    tokenizer (``tokenizer.json`` / ``tokenizer_config.json`` next to its ``config.json``) is
    the one whose ids the model's embedding rows were trained on.
    """
    return config.data.tokenizer or config.model.get("hf_path", "") or ""


def validate_data_config(config) -> None:
    """Checks ``config.data`` of a real-data run; raises ConfigError naming the field."""
    d = config.data

    def require(ok, field, expected):
        if not ok:
            raise ConfigError(f"config.data.{field}={getattr(d, field)!r}: {expected}")

    if d.source == "files":
        require(len(d.train_files) > 0, "train_files", "source 'files' needs at least one file")
    if d.source == "hub":
        require(bool(d.hub_id), "hub_id", "source 'hub' needs a dataset id")
    require(
        d.format in formats.KINDS + formats.FORMATS,
        "format",
        f"expected one of {formats.KINDS + formats.FORMATS}",
    )
    if d.format == "demonstration_pairs" or d.rejected_files:
        require(d.source == "files", "source", "'demonstration_pairs' reads local files")
        require(
            len(d.rejected_files) > 0,
            "rejected_files",
            "'demonstration_pairs' needs the rejected demonstrations",
        )
        require(
            not d.eval_files, "eval_files", "'demonstration_pairs' holds out num_eval pairs instead"
        )
    require(
        bool(tokenizer_name(config)),
        "tokenizer",
        "name a tokenizer directory, file or hub id (or set config.model.hf_path: its "
        "directory's own tokenizer is the default)",
    )
    require(d.max_length > 1, "max_length", "must be > 1")
    require(
        0 < d.max_prompt_length < d.max_length,
        "max_prompt_length",
        f"must be in (0, max_length={d.max_length})",
    )
    require(
        d.truncation_mode in tokenize.TRUNCATION_MODES,
        "truncation_mode",
        f"expected one of {tokenize.TRUNCATION_MODES}",
    )
    require(
        d.too_long in tokenize.TOO_LONG_POLICIES,
        "too_long",
        f"expected one of {tokenize.TOO_LONG_POLICIES}",
    )
    require(
        d.boundary_mismatch in tokenize.BOUNDARY_POLICIES,
        "boundary_mismatch",
        f"expected one of {tokenize.BOUNDARY_POLICIES}",
    )
    require(
        d.chat_template in tokenize.TEMPLATE_MODES,
        "chat_template",
        f"expected one of {tokenize.TEMPLATE_MODES}",
    )
    require(d.on_bad_record in ("error", "skip"), "on_bad_record", "expected 'error' or 'skip'")
    require(
        _template_fields(d.prompt_template) == {"prompt"},
        "prompt_template",
        "must contain exactly the placeholder {prompt}",
    )
    require(
        _template_fields(d.response_template) == {"response"},
        "response_template",
        "must contain exactly the placeholder {response}",
    )
    require(all(int(b) > 0 for b in d.buckets), "buckets", "lengths must be positive")
    require(d.num_eval >= 0 and d.max_records >= 0, "num_eval", "counts must be >= 0")
    unknown = set(d.field_map.keys()) - set(formats.FIELD_MAP_KEYS)
    require(
        not unknown,
        "field_map",
        f"unknown keys {sorted(unknown)}; expected {formats.FIELD_MAP_KEYS}",
    )
    if d.max_length > max_positions(config):
        raise ConfigError(
            f"config.data.max_length={d.max_length} exceeds "
            f"the model's maximum sequence length {max_positions(config)}"
        )
    terms = config.terms
    for field in ("packing", "prefix_sharing"):
        if not getattr(d, field):
            continue
        require(
            objectives.data_layout(terms) != "unpaired",
            field,
            "KTO's unpaired batches pair completions across rows (bucketed layout only)",
        )
        require(
            _accepts_segment_ids(config.model.family),
            field,
            f"model family {config.model.family!r} takes no segment_ids, so packed "
            "examples would attend to each other",
        )
    require(
        not (d.packing or d.prefix_sharing) or not config.train.diagnostics,
        "packing",
        "train.diagnostics' batch quantiles assume one example per row (bucketed layout)",
    )
    check_layout(config, d.format, None, error=ValueError)


def format_kind(fmt: str) -> str:
    """What a data format (or format kind) holds: 'sft' (N = 1 demonstrations), 'preference'
    (N = 2 pairs), 'unpaired' (labelled single completions) or 'list' (N >= 2 ranked)."""
    if fmt in formats.DEMONSTRATION_FORMATS + ("sft",):
        return "sft"
    if fmt in formats.UNPAIRED_FORMATS:
        return "unpaired"
    if fmt in formats.LISTWISE_FORMATS:
        return "list"
    return "preference"


def check_layout(config, fmt: str, num_responses: int | None, *, error=ValueError) -> None:
    """Refuses data whose layout the loss terms cannot read (``objectives.data_layout``).

    'pair' losses need N = 2 (chosen, rejected), 'list' losses N >= 2 ranked responses,
    'unpaired' (KTO) the labelled completions of ``prompt_completion_label``, which in turn only
    KTO may train (an NLL term would imitate the undesirable completions too).

    Args:
      fmt: the data's format (or, before the data is read, the configured kind).
      num_responses: N of the built data; None when not known yet (ranked lists vary).
      error: the exception class raised.
    """
    terms = config.terms
    layout = objectives.data_layout(terms)
    names = [t.name for t in terms]
    kind = format_kind(fmt)
    if layout == "unpaired" and kind != "unpaired":
        raise error(
            f"config.data.format={fmt!r}: loss terms {names} read unpaired labelled "
            f"completions (KTO); use format {formats.UNPAIRED_FORMATS[0]!r} "
            "({prompt, completion, label} records)"
        )
    if kind == "unpaired" and layout != "unpaired":
        raise error(
            f"config.data.format={fmt!r} holds labelled single completions, which only "
            f"KTO trains (loss.name='kto'); loss terms {names} would imitate or rank "
            "undesirable completions"
        )
    if kind == "sft" and layout in ("pair", "list"):
        raise error(
            f"the data holds demonstrations (N=1, format {fmt!r}) but "
            f"config.loss.name={config.loss.name!r} needs chosen/rejected pairs "
            f"(loss terms {names}); use loss.name='sft' or a preference format"
        )
    if layout == "pair" and num_responses is not None and num_responses != 2:
        raise error(
            f"config.data.format={fmt!r} gives N={num_responses} responses per prompt "
            f"but loss terms {names} need exactly 2 (chosen, rejected); for ranked "
            "lists use a listwise loss (plackett_luce, dil_*)"
        )


def _accepts_segment_ids(family: str) -> bool:
    return models.get_family(family).packing


def max_positions(config) -> int:
    """The model's maximum sequence length, whichever family (or HF config.json) defines it."""
    return models.max_positions(models.build_model(config.model)[0].config)
