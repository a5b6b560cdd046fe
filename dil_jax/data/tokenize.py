"""Tokenisation of examples: tokenizer loading, chat templates, joint prompt+response tokens.

Loading: ``config.data.tokenizer`` is a local directory with a ``tokenizer_config.json``
(``AutoTokenizer``), a directory or file holding only a ``tokenizer.json`` (wrapped in
``PreTrainedTokenizerFast``; such files often carry no special-token roles, so name the EOS
with ``config.data.eos_token``), or a hub id.

Rendering (``config.data.chat_template``): ``'chat'`` applies the tokenizer's chat template
(the prompt with ``add_generation_prompt=True``, the full sequence with the assistant reply);
``'plain'`` concatenates ``prompt_template.format(prompt=...)`` and
``response_template.format(response=...)`` after the tokenizer's BOS if it adds one; ``'auto'``
is ``'chat'`` when the tokenizer has a template. Chat-only formats (message lists) need a
template and stop with an error when the tokenizer has none.

Joint tokenisation and the boundary check. The prompt and the full sequence are tokenised
separately (batched, fast tokenizer, through ``datasets.map``) and the prompt's tokens must be
a prefix of the full sequence's: BPE merges across the prompt/response boundary (a prompt
ending in a space, a template that glues the reply to the marker) would otherwise shift the
loss mask by a token and silently train on a prompt token, or skip a response token. On a
mismatch, ``boundary_mismatch='repair'`` re-tokenises the response text alone and concatenates
it to the prompt's tokens; ``'reject'`` treats the record as bad. Both are counted.

EOS: appended when the rendered response does not already contain the tokenizer's EOS (plain
rendering never does; Mistral's template does). Loss masks are built from lengths (response =
the tokens after the prompt, EOS included), never from ``ids != pad``.

Truncation, per example, in this order: a prompt longer than ``max_prompt_length`` is cut to
it, keeping its end (``truncation_mode='keep_end'``, the DIL/TRL recipes: the last turn and the
generation marker survive) or its start (``'keep_start'``), however long it was (a prompt longer
than the whole ``max_length`` is cut like any other, and counted again as
``prompt_longer_than_max_length``); each response is then cut from its end to fit
``max_length`` (a cut response loses its EOS, correctly: it did not end there). Only a record
with no room left for a single response token is dropped (``no_room_for_response``; impossible
while ``max_prompt_length < max_length``, which the config check enforces).
``too_long='drop'`` drops records that would need any cut instead. All of it is counted in
``data_report.json``.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from dil_jax import paths, progress
from dil_jax.data.formats import CHAT_FORMATS, Example
from dil_jax.data.report import BadRecord, DataError, SplitReport

TEMPLATE_MODES = ("auto", "chat", "plain")
TRUNCATION_MODES = ("keep_end", "keep_start")
TOO_LONG_POLICIES = ("truncate", "drop")
BOUNDARY_POLICIES = ("repair", "reject")
RESPONSE_NAMES = {1: ("response",), 2: ("chosen", "rejected")}


def response_names(num: int) -> tuple[str, ...]:
    """Field names of N responses in reports: response; chosen, rejected; responses[j]."""
    return RESPONSE_NAMES.get(num, tuple(f"responses[{j}]" for j in range(num)))


def load_tokenizer(spec: str, eos_token: str = ""):
    """A fast ``transformers`` tokenizer from a directory, a ``tokenizer.json`` or a hub id.

    Args:
      spec: local directory, path of a ``tokenizer.json``, or hub id.
      eos_token: overrides (or supplies) the EOS token; must be one token of the vocabulary.
    """
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415 (heavy import)

    if not spec:
        raise DataError(
            "config.data.tokenizer is empty: name a tokenizer directory, "
            "tokenizer.json file or hub id"
        )
    spec = paths.local_copy(spec) if not paths.is_local(spec) else spec  # gs://: local copy
    _check_local_tokenizer(spec)
    try:
        has_json = os.path.exists(os.path.join(spec, "tokenizer.json"))
        has_config = os.path.exists(os.path.join(spec, "tokenizer_config.json"))
        if os.path.isfile(spec):
            tok = PreTrainedTokenizerFast(tokenizer_file=spec)
        elif os.path.isdir(spec) and has_json and not has_config:
            tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(spec, "tokenizer.json"))
        elif os.path.isdir(spec) and has_json:
            # The generic fast class reads tokenizer.json + tokenizer_config.json (template,
            # special tokens) exactly as AutoTokenizer does, without importing torch (~4 s),
            # and never the directory's auto_map code.
            tok = PreTrainedTokenizerFast.from_pretrained(spec)
        elif os.path.isdir(spec) and not has_config:
            raise DataError(
                f"config.data.tokenizer={spec!r}: the directory has neither "
                "tokenizer_config.json nor tokenizer.json"
            )
        else:  # a hub id, or a directory that needs its tokenizer class (e.g. sentencepiece)
            from transformers import AutoTokenizer  # noqa: PLC0415 (imports torch when present)

            # Never run repository code (auto_map): transformers would otherwise ask on stdin.
            tok = AutoTokenizer.from_pretrained(spec, trust_remote_code=False)
    except DataError:
        raise
    except Exception as e:  # hub/network/format errors have no common base class
        if "trust_remote_code" in str(e):
            raise DataError(
                f"config.data.tokenizer={spec!r} needs its repository's own Python "
                "code to load, and dil_jax never runs repository code: use a "
                "tokenizer with a tokenizer.json"
            ) from e
        where = "" if os.path.exists(spec) else f" (no local path {os.path.abspath(spec)!r} either)"
        raise DataError(
            f"config.data.tokenizer={spec!r}: could not load{where} ({type(e).__name__}: {e})"
        ) from e
    if not getattr(tok, "is_fast", False):
        raise DataError(f"config.data.tokenizer={spec!r} has no fast (Rust) tokenizer")
    if eos_token:
        if eos_token not in tok.get_vocab():
            raise DataError(
                f"config.data.eos_token={eos_token!r} is not a token of tokenizer {spec!r}"
            )
        tok.eos_token = eos_token
    if tok.eos_token_id is None:
        raise DataError(
            f"tokenizer {spec!r} defines no EOS token; set config.data.eos_token "
            "(e.g. '<|endoftext|>' for GPT-2)"
        )
    return tok


def _check_local_tokenizer(spec: str) -> None:
    """Refuses what must not reach ``from_pretrained``: a missing local path (instead of the hub's
    "Repo id must be in the form" error) and a directory whose tokenizer is Python code it ships
    (``auto_map`` with no ``tokenizer.json``), which dil_jax never executes."""
    # Hub ids are "name" or "org/name"; anything else that does not exist was meant as a path.
    looks_local = (
        os.path.isabs(spec)
        or spec.startswith((".", "~"))
        or spec.count("/") > 1
        or spec.endswith(".json")
    )
    if not os.path.exists(spec):
        if looks_local:
            raise DataError(
                f"config.data.tokenizer={spec!r}: the path does not exist "
                f"({os.path.abspath(os.path.expanduser(spec))})"
            )
        return  # a hub id
    if not os.path.isdir(spec) or os.path.exists(os.path.join(spec, "tokenizer.json")):
        return  # tokenizer.json is data: loaded without the directory's code
    for name, key in (("tokenizer_config.json", None), ("config.json", "AutoTokenizer")):
        try:
            with open(os.path.join(spec, name)) as f:
                auto_map = json.load(f).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):
            continue  # absent or unreadable: from_pretrained reports it
        if auto_map and (key is None or key in auto_map):
            raise DataError(
                f"config.data.tokenizer={spec!r}: {name} maps the tokenizer to Python code "
                f"shipped in the directory (auto_map {json.dumps(auto_map)}) and there is no "
                "tokenizer.json; dil_jax never runs repository code. Provide a tokenizer.json "
                "(e.g. saved by tokenizer.save_pretrained in a trusted environment)"
            )


def tokenizer_digest(tok) -> str:
    """Content hash of a loaded tokenizer: vocabulary/merges/normaliser, template, specials."""
    h = hashlib.sha256(tok.backend_tokenizer.to_str().encode())
    h.update(str(tok.chat_template).encode())
    h.update(repr((tok.bos_token, tok.eos_token, tok.eos_token_id)).encode())
    return h.hexdigest()


class Renderer:
    """Text of the prompt and of each full sequence (prompt + response) of an example."""

    def __init__(
        self,
        tok,
        mode: str,
        fmt: str,
        prompt_template: str = "{prompt}",
        response_template: str = "{response}",
        tokenizer_name: str = "",
    ):
        if mode not in TEMPLATE_MODES:
            raise DataError(f"config.data.chat_template={mode!r}: expected one of {TEMPLATE_MODES}")
        has_template = bool(getattr(tok, "chat_template", None))
        if fmt in CHAT_FORMATS:
            if mode == "plain":
                raise DataError(
                    f"format {fmt!r} holds chat messages, which only a chat template "
                    "can render; config.data.chat_template='plain' cannot"
                )
            if not has_template:
                raise DataError(
                    f"tokenizer {tokenizer_name!r} has no chat template, which "
                    f"format {fmt!r} needs; use a tokenizer with one"
                )
            mode = "chat"
        elif mode == "auto":
            mode = "chat" if has_template else "plain"
        elif mode == "chat" and not has_template:
            raise DataError(
                f"tokenizer {tokenizer_name!r} has no chat template "
                "(config.data.chat_template='chat'); use a tokenizer with one or "
                "config.data.chat_template='plain'"
            )
        self.tok, self.mode = tok, mode
        self.prompt_template, self.response_template = prompt_template, response_template
        probe = tok("a")["input_ids"]
        adds_bos = tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id]
        self.bos = tok.bos_token if adds_bos else ""

    def render(self, ex: Example) -> tuple[str, tuple[str, ...]]:
        if self.mode == "plain":
            prompt = self.bos + self.prompt_template.format(prompt=ex.prompt_text)
            return prompt, tuple(
                prompt + self.response_template.format(response=r) for r in ex.responses
            )
        msgs = list(ex.prompt_messages)
        try:
            prompt = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            fulls = tuple(
                self.tok.apply_chat_template(
                    msgs + [{"role": "assistant", "content": r}], tokenize=False
                )
                for r in ex.chat_responses
            )
        except Exception as e:  # jinja's raise_exception and template errors vary in type
            raise BadRecord(
                "prompt", "template_error", f"the chat template failed: {type(e).__name__}: {e}"
            ) from e
        names = response_names(len(fulls))
        for name, full in zip(names, fulls, strict=True):
            if not full.startswith(prompt):
                raise BadRecord(
                    name,
                    "template_prefix_mismatch",
                    "the chat template renders the prompt differently with and "
                    "without the reply, so the reply cannot be located",
                )
        return prompt, fulls


def _batch_tokenize(tok, columns: dict[str, list[str]], num_proc: int, fingerprint: str):
    """``datasets.map`` over text columns with the batched fast tokenizer -> flat numpy."""
    import datasets  # noqa: PLC0415 (heavy import)

    ds = datasets.Dataset.from_dict(columns)

    def encode(batch):
        return {f"{k}_ids": tok(batch[k], add_special_tokens=False)["input_ids"] for k in columns}

    # Declared output types: datasets would otherwise infer them value by value (~25% of the
    # time on long responses).
    features = datasets.Features(
        {f"{k}_ids": datasets.List(datasets.Value("int32")) for k in columns}
    )
    # datasets draws its own bar ("tokenising"); only process 0 shows it.
    quiet = not progress.is_chief() and datasets.is_progress_bar_enabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        ds = ds.map(
            encode,
            batched=True,
            batch_size=1000,
            remove_columns=list(columns),
            features=features,
            num_proc=num_proc if num_proc > 1 else None,
            keep_in_memory=True,
            new_fingerprint=fingerprint,
            desc="tokenising",
        )
    finally:
        if quiet:
            datasets.enable_progress_bars()
    table = ds.with_format("arrow")[:]
    out = {}
    for k in columns:
        col = table.column(f"{k}_ids").combine_chunks()
        out[k] = (
            col.values.to_numpy(zero_copy_only=False).astype(np.int32),
            col.offsets.to_numpy().astype(np.int64),
        )
    return out


def _cut_prompt(
    prompt: np.ndarray,
    max_prompt_length: int,
    max_length: int,
    truncation_mode: str,
    report: SplitReport,
) -> np.ndarray:
    """The prompt cut to ``max_prompt_length`` tokens per ``truncation_mode`` (counted)."""
    if len(prompt) <= max_prompt_length:
        return prompt
    report.count("prompt_truncated")
    if len(prompt) > max_length:  # longer than the whole budget: once dropped, now cut too
        report.count("prompt_longer_than_max_length")
    if truncation_mode == "keep_end":
        return prompt[-max_prompt_length:]
    if truncation_mode == "keep_start":
        return prompt[:max_prompt_length]
    raise DataError(
        f"config.data.truncation_mode={truncation_mode!r}: expected one of {TRUNCATION_MODES}"
    )


def tokenize_examples(
    examples: list[Example],
    tok,
    renderer: Renderer,
    *,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str,
    too_long: str,
    boundary_mismatch: str,
    report: SplitReport,
    num_proc: int = 1,
    fingerprint: str = "",
) -> dict[str, np.ndarray]:
    """Token sequences of every example, checked, EOS-terminated and truncated.

    Ranked lists (a variable number of responses per example) are padded to the largest N of
    ``examples``: an absent response's slot holds the prompt alone (zero response tokens, so
    its loss mask is empty and the objectives leave it out).

    Returns:
      Ragged arrays: ``tokens`` int32 (all sequences back to back), ``starts`` int64 ``[n, N]``,
      ``lengths`` and ``prompt_lengths`` int32 ``[n, N]``, ``example_id`` int32 ``[n]``; and
      ``labels`` int32 ``[n]`` (1 desirable, 0 undesirable) when the examples carry labels.
    """
    num = max((len(ex.responses) for ex in examples), default=1)
    names = response_names(num)
    has_labels = any(ex.label is not None for ex in examples)
    rendered, kept = [], []
    for ex in progress.bar(
        examples, desc=f"{report.name} records: reading, rendering", unit="rec", leave=False
    ):
        try:
            rendered.append(renderer.render(ex))
            kept.append(ex)
        except BadRecord as err:
            report.reject(ex.location, err)
    columns = {"prompt": [p for p, _ in rendered]}
    for j in range(num):  # "" stands in for an absent response of a shorter ranked list
        columns[f"full_{j}"] = [f[j] if j < len(f) else "" for _, f in rendered]
    flat = _batch_tokenize(tok, columns, num_proc, fingerprint or "dil_jax") if kept else {}
    eos = tok.eos_token_id

    def row(col, i):
        values, offsets = flat[col]
        return values[offsets[i] : offsets[i + 1]]

    seqs, plens, ids, labels = [], [], [], []
    for i, ex in enumerate(
        progress.bar(
            kept, desc=f"{report.name} examples: checking, cutting", unit="ex", leave=False
        )
    ):
        prompt_text, fulls = rendered[i]
        prompt = row("prompt", i)
        try:
            responses = []
            for j in range(len(fulls)):
                full = row(f"full_{j}", i)
                if len(full) >= len(prompt) and np.array_equal(full[: len(prompt)], prompt):
                    response = full[len(prompt) :]
                elif boundary_mismatch == "repair":
                    report.count("token_boundary_repaired")
                    text = fulls[j][len(prompt_text) :]
                    response = np.asarray(
                        tok(text, add_special_tokens=False)["input_ids"], np.int32
                    )
                else:
                    raise BadRecord(
                        names[j],
                        "token_boundary_mismatch",
                        "the prompt's tokens are not a prefix of prompt+response's "
                        "(a token merges across the boundary)",
                    )
                if eos not in response:
                    response = np.append(response, np.int32(eos))
                    report.count("eos_appended")
                responses.append(response)
        except BadRecord as err:
            report.reject(ex.location, err)
            continue
        needs_cut = len(prompt) > max_prompt_length or any(
            len(prompt) + len(r) > max_length for r in responses
        )
        if needs_cut and too_long == "drop":
            report.count("dropped_too_long")
            continue
        prompt = _cut_prompt(prompt, max_prompt_length, max_length, truncation_mode, report)
        budget = max_length - len(prompt)
        if budget < 1:  # nothing of the response would fit: the one case that must drop
            report.count("dropped_no_room_for_response")
            continue
        for j, r in enumerate(responses):
            if len(r) > budget:
                report.count(f"{names[j]}_truncated")
                responses[j] = r[:budget]
        seqs.extend(np.concatenate([prompt, r]) for r in responses)
        seqs.extend(prompt for _ in range(num - len(responses)))  # absent: no response tokens
        plens.append([len(prompt)] * num)
        ids.append(ex.index)
        labels.append(int(bool(ex.label)))
    n = len(ids)
    lengths = np.array([len(s) for s in seqs], np.int32).reshape(n, num)
    starts = (np.cumsum(lengths.ravel()) - lengths.ravel()).reshape(n, num).astype(np.int64)
    tokens = np.concatenate(seqs).astype(np.int32) if seqs else np.zeros(0, np.int32)
    out = {
        "tokens": tokens,
        "starts": starts,
        "lengths": lengths,
        "prompt_lengths": np.array(plens, np.int32).reshape(n, num),
        "example_id": np.array(ids, np.int32),
    }
    if has_labels:
        out["labels"] = np.array(labels, np.int32)
    return out
