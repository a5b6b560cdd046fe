"""Record formats: from a raw JSON record to a prompt and its N responses.

Every format normalises to an :class:`Example`: a prompt (as plain text and/or as chat
messages ending in a user turn) and a tuple of responses, ``(chosen, rejected)`` for preference
formats (N = 2) or ``(response,)`` for demonstrations (N = 1).

Preference formats (N = 2):

- ``prompt_chosen_rejected``: ``{"prompt": str, "chosen": str, "rejected": str}`` (e.g. the
  UltraFeedback-binarized subset).
- ``chat_pairs``: ``chosen`` / ``rejected`` are chat message lists ``[{"role", "content"}]``.
  Either whole conversations that include the user turns (the HuggingFaceH4/
  ultrafeedback_binarized hub schema, multi-turn allowed; the prompt is everything before the
  final assistant message and must be the same on both sides), or assistant-only lists with
  the prompt in ``prompt`` (a string or a message list).
- ``hh_transcripts``: Anthropic HH-RLHF, ``{"chosen": transcript, "rejected": transcript}``
  where both transcripts repeat the dialogue. The prompt is the longest common prefix of the two
  texts, cut after its last ``"\\n\\nAssistant:"``; splitting each text at its *own* last marker
  would give two different prompts for records whose reply contains a marker (counted as
  ``hh_marker_inside_reply``).
- ``comparison``: one prompt, a list of two candidate responses and the index of the preferred
  one, e.g. the OpenAI TL;DR comparisons ``{"info": {"post", ...}, "summaries": [{"text"},
  {"text"}], "choice": 0}``. Declare the format and map the fields with ``config.data.field_map``:
  ``prompt='info.post'``, ``responses='summaries'``, ``response_text='text'`` (the key inside
  each element when the elements are objects), ``choice='choice'``; turn the post
  into a prompt with ``config.data.prompt_template='{prompt}\\n\\nTL;DR:'``.
- ``demonstration_pairs``: two demonstration files answering the same prompts, e.g. AlpacaEval's
  GPT-4 outputs (chosen, ``config.data.train_files``) and text-davinci-003 outputs (rejected,
  ``config.data.rejected_files``), joined on the exact prompt text.

Demonstration formats (N = 1):

- ``prompt_response``: a prompt string (``prompt`` or ``instruction``) and a response string
  (``response``, ``output`` or ``completion``), e.g. AlpacaEval ``model_outputs.json``.
- ``chat_messages``: SFT-style ``{"messages": [...]}``; the final message must be the assistant's
  and is the response, everything before it the prompt.

Unpaired feedback (KTO; one labelled response per record, N = 1 at parse time; the step's
``[B, 2]`` layout pairs each completion with a mismatched one, ``batching.kto_pairs``):

- ``prompt_completion_label``: TRL's unpaired schema ``{"prompt": str, "completion": str,
  "label": bool}`` (true: desirable); the label lands in ``Example.label``.

Listwise feedback (N >= 2 ranked responses, best first, a variable number per record):

- ``ranked_responses``: ``{"prompt": str, "responses": [str | {"text": str}, ...],
  "scores": [float, ...]}`` (e.g. UltraFeedback's four scored completions); sorted by score,
  highest first (a stable sort: ties keep their order). Two or more distinct responses needed.

Field names: the defaults above, or any dotted path given in ``config.data.field_map`` (e.g.
``prompt='info.post'``). Problems with one record (a missing or mistyped field, an empty
response, chosen identical to rejected) raise :class:`~dil_jax.data.report.BadRecord` naming
the field; the caller applies ``on_bad_record``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping

from dil_jax.data.report import BadRecord, DataError, Location, SplitReport

PREFERENCE_FORMATS = (
    "prompt_chosen_rejected",
    "chat_pairs",
    "hh_transcripts",
    "comparison",
    "demonstration_pairs",
)
DEMONSTRATION_FORMATS = ("prompt_response", "chat_messages")
UNPAIRED_FORMATS = ("prompt_completion_label",)
LISTWISE_FORMATS = ("ranked_responses",)
FORMATS = PREFERENCE_FORMATS + DEMONSTRATION_FORMATS + UNPAIRED_FORMATS + LISTWISE_FORMATS
CHAT_FORMATS = ("chat_pairs", "chat_messages")  # prompts exist only as messages: need a template
# config.data.format may also name a kind, detected within it, or 'auto'.
KINDS = ("preference", "sft", "auto")

# canonical field -> default source names, tried in order (config.data.field_map overrides)
DEFAULT_FIELDS = {
    "prompt": ("prompt", "instruction"),
    "chosen": ("chosen",),
    "rejected": ("rejected",),
    "response": ("response", "output", "completion"),
    "messages": ("messages",),
    "responses": ("summaries", "responses", "completions"),
    "response_text": ("text",),
    "choice": ("choice",),
    "label": ("label",),
    "scores": ("scores",),
}
FIELD_MAP_KEYS = tuple(DEFAULT_FIELDS)

HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclasses.dataclass(frozen=True)
class Example:
    """One prompt with its responses, before tokenisation.

    Attributes:
      index: stable id, the record's 0-based position among the records read from its source.
      location: file and line, for error messages.
      prompt_text: the prompt as plain text (plain rendering), None for chat-only formats.
      prompt_messages: the prompt as chat messages ending in a user turn (chat rendering).
      responses: N response strings for plain rendering (chosen first).
      chat_responses: the same responses as assistant message contents (chat rendering).
      label: unpaired formats only: True for a desirable response, False for an undesirable
        one (KTO); None elsewhere.
    """

    index: int
    location: Location
    prompt_text: str | None
    prompt_messages: tuple[dict, ...] | None
    responses: tuple[str, ...]
    chat_responses: tuple[str, ...]
    label: bool | None = None


def num_responses(fmt: str) -> int | None:
    """N, the pair axis: 2 for preference formats, 1 for demonstrations and unpaired records
    (KTO's mismatched completion is added at batching), None (varies) for ranked lists."""
    if fmt in LISTWISE_FORMATS:
        return None
    return 2 if fmt in PREFERENCE_FORMATS else 1


# ----------------------------------------------------------------------------- field access


def _lookup(record: Mapping, path: str):
    node = record
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def _field(record: Mapping, name: str, field_map: Mapping[str, str], types, what: str):
    """The value of canonical field ``name`` and the source path it was found at."""
    mapped = field_map.get(name) or ""
    candidates = (mapped,) if mapped else DEFAULT_FIELDS[name]
    for path in candidates:
        try:
            value = _lookup(record, path)
        except KeyError:
            continue
        allowed = types if isinstance(types, tuple) else (types,)
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise BadRecord(path, "wrong_type", f"expected {what}, got {type(value).__name__}")
        return value, path
    raise BadRecord(
        candidates[0],
        "missing_field",
        "missing" + (f" (looked for {', '.join(candidates)})" if len(candidates) > 1 else ""),
    )


def _text(record, name, field_map) -> tuple[str, str]:
    return _field(record, name, field_map, str, "a string")


def _nonempty(value: str, path: str, what: str = "response") -> str:
    if not value.strip():
        raise BadRecord(path, f"empty_{what}", f"the {what} is empty")
    return value


def _messages(value, path: str) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        raise BadRecord(path, "wrong_type", "expected a non-empty list of chat messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise BadRecord(f"{path}[{i}]", "wrong_type", "expected a {role, content} object")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise BadRecord(
                    f"{path}[{i}].{key}",
                    "missing_field" if key not in m else "wrong_type",
                    "expected a string",
                )
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _split_conversation(msgs, path: str):
    """(prompt messages, final assistant content) of a whole conversation."""
    if msgs[-1]["role"] != "assistant":
        raise BadRecord(
            f"{path}[-1].role",
            "wrong_type",
            f"the final message must be the assistant's, got {msgs[-1]['role']!r}",
        )
    if len(msgs) < 2 or msgs[-2]["role"] not in ("user", "system", "tool"):
        raise BadRecord(path, "missing_field", "no user turn before the final assistant message")
    return msgs[:-1], _nonempty(msgs[-1]["content"], f"{path}[-1].content")


# ----------------------------------------------------------------------------- parsers


def _user(prompt: str) -> tuple[dict, ...]:
    return ({"role": "user", "content": prompt},)


def _distinct(chosen: str, rejected: str, path: str) -> None:
    if chosen == rejected:
        raise BadRecord(path, "identical_responses", "chosen and rejected are identical")


def parse_prompt_chosen_rejected(record, field_map, report):
    prompt, p_path = _text(record, "prompt", field_map)
    chosen, c_path = _text(record, "chosen", field_map)
    rejected, r_path = _text(record, "rejected", field_map)
    _nonempty(prompt, p_path, "prompt")
    _nonempty(chosen, c_path)
    _nonempty(rejected, r_path)
    _distinct(chosen, rejected, r_path)
    return prompt, _user(prompt), (chosen, rejected), (chosen, rejected)


def parse_chat_pairs(record, field_map, report):
    chosen_raw, c_path = _field(record, "chosen", field_map, list, "a list of chat messages")
    rejected_raw, r_path = _field(record, "rejected", field_map, list, "a list of chat messages")
    chosen, rejected = _messages(chosen_raw, c_path), _messages(rejected_raw, r_path)
    if chosen[0]["role"] != "assistant":  # whole conversations (hub schema)
        prompt_c, resp_c = _split_conversation(chosen, c_path)
        prompt_r, resp_r = _split_conversation(rejected, r_path)
        if prompt_c != prompt_r:
            raise BadRecord(
                r_path,
                "prompt_mismatch",
                "chosen and rejected conversations differ before the final reply",
            )
        prompt = prompt_c
    else:  # assistant-only responses, prompt in its own field
        value, p_path = _field(
            record, "prompt", field_map, (str, list), "a string or a list of chat messages"
        )
        prompt = (
            _user(_nonempty(value, p_path, "prompt"))
            if isinstance(value, str)
            else _messages(value, p_path)
        )
        for msgs, path in ((chosen, c_path), (rejected, r_path)):
            if len(msgs) != 1:
                raise BadRecord(
                    path, "wrong_type", f"expected one assistant message, got {len(msgs)}"
                )
        resp_c = _nonempty(chosen[0]["content"], f"{c_path}[0].content")
        resp_r = _nonempty(rejected[0]["content"], f"{r_path}[0].content")
    if prompt[-1]["role"] != "user":
        raise BadRecord(c_path, "wrong_type", "the prompt must end with a user message")
    _distinct(resp_c, resp_r, r_path)
    return None, prompt, (resp_c, resp_r), (resp_c, resp_r)


def hh_messages(prompt_text: str) -> tuple[dict, ...]:
    """An HH ``"\\n\\nHuman: … \\n\\nAssistant:"`` prompt as chat messages (for chat templates)."""
    parts = _HH_TURN.split(prompt_text)  # ['', 'Human', ' …', 'Assistant', ' …', …]
    msgs = [
        {"role": "user" if role == "Human" else "assistant", "content": text.strip()}
        for role, text in zip(parts[1::2], parts[2::2], strict=True)
    ]
    if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
        msgs.pop()  # the open assistant turn the prompt ends with
    return tuple(msgs)


def parse_hh_transcripts(record, field_map, report):
    chosen, c_path = _text(record, "chosen", field_map)
    rejected, r_path = _text(record, "rejected", field_map)
    _distinct(chosen, rejected, r_path)
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(HH_ASSISTANT)
    if cut < 0:
        raise BadRecord(
            c_path,
            "no_assistant_turn",
            f"chosen and rejected share no prefix ending in {HH_ASSISTANT!r}",
        )
    end = cut + len(HH_ASSISTANT)
    if chosen.rfind(HH_ASSISTANT) != cut or rejected.rfind(HH_ASSISTANT) != cut:
        report.count("hh_marker_inside_reply")  # the own-last-marker split would disagree
    prompt, reply_c, reply_r = chosen[:end], chosen[end:], rejected[end:]
    _nonempty(reply_c, c_path)
    _nonempty(reply_r, r_path)
    messages = hh_messages(prompt)
    return prompt, messages, (reply_c, reply_r), (reply_c.strip(), reply_r.strip())


def parse_comparison(record, field_map, report):
    prompt, p_path = _text(record, "prompt", field_map)
    _nonempty(prompt, p_path, "prompt")
    candidates, path = _field(record, "responses", field_map, list, "a list of two responses")
    if len(candidates) != 2:
        raise BadRecord(path, "wrong_type", f"expected two responses, got {len(candidates)}")
    key = field_map.get("response_text") or DEFAULT_FIELDS["response_text"][0]
    texts = []
    for i, c in enumerate(candidates):
        if isinstance(c, Mapping) and key:
            c = c.get(key)
        if not isinstance(c, str):
            raise BadRecord(
                f"{path}[{i}]" + (f".{key}" if key else ""), "wrong_type", "expected a string"
            )
        texts.append(_nonempty(c, f"{path}[{i}]"))
    choice, ch_path = _field(record, "choice", field_map, int, "0 or 1")
    if choice not in (0, 1):
        raise BadRecord(ch_path, "wrong_type", f"expected 0 or 1, got {choice}")
    chosen, rejected = texts[choice], texts[1 - choice]
    _distinct(chosen, rejected, path)
    return prompt, _user(prompt), (chosen, rejected), (chosen, rejected)


def parse_prompt_response(record, field_map, report):
    prompt, p_path = _text(record, "prompt", field_map)
    response, r_path = _text(record, "response", field_map)
    _nonempty(prompt, p_path, "prompt")
    _nonempty(response, r_path)
    return prompt, _user(prompt), (response,), (response,)


def parse_chat_messages(record, field_map, report):
    value, path = _field(record, "messages", field_map, list, "a list of chat messages")
    prompt, response = _split_conversation(_messages(value, path), path)
    return None, prompt, (response,), (response,)


def parse_prompt_completion_label(record, field_map, report):
    """TRL's unpaired format -> (prompt, (completion,), label); see :func:`parse_records`."""
    prompt, p_path = _text(record, "prompt", field_map)
    completion, c_path = _text(record, "response", field_map)
    label, _ = _field(record, "label", field_map, bool, "true (desirable) or false")
    _nonempty(prompt, p_path, "prompt")
    _nonempty(completion, c_path)
    report.count("labels/desirable" if label else "labels/undesirable")
    return prompt, _user(prompt), (completion,), (completion,), label


def parse_ranked_responses(record, field_map, report):
    """A prompt, N >= 2 responses and their scores -> the responses sorted best first."""
    prompt, p_path = _text(record, "prompt", field_map)
    _nonempty(prompt, p_path, "prompt")
    candidates, path = _field(record, "responses", field_map, list, "a list of responses")
    scores, s_path = _field(record, "scores", field_map, list, "a list of numbers")
    if len(candidates) < 2:
        raise BadRecord(
            path, "wrong_type", f"expected at least two responses, got {len(candidates)}"
        )
    if len(scores) != len(candidates):
        raise BadRecord(
            s_path,
            "wrong_type",
            f"expected {len(candidates)} scores (one per response), got {len(scores)}",
        )
    key = field_map.get("response_text") or DEFAULT_FIELDS["response_text"][0]
    texts = []
    for i, c in enumerate(candidates):
        if isinstance(c, Mapping) and key:
            c = c.get(key)
        if not isinstance(c, str):
            raise BadRecord(
                f"{path}[{i}]" + (f".{key}" if key else ""), "wrong_type", "expected a string"
            )
        texts.append(_nonempty(c, f"{path}[{i}]"))
    for i, v in enumerate(scores):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise BadRecord(f"{s_path}[{i}]", "wrong_type", "expected a number")
    if len(set(texts)) < len(texts):
        raise BadRecord(path, "identical_responses", "two responses are identical")
    order = sorted(range(len(texts)), key=lambda i: -float(scores[i]))  # stable: ties keep order
    ranked = tuple(texts[i] for i in order)
    return prompt, _user(prompt), ranked, ranked


PARSERS = {
    "prompt_chosen_rejected": parse_prompt_chosen_rejected,
    "chat_pairs": parse_chat_pairs,
    "hh_transcripts": parse_hh_transcripts,
    "comparison": parse_comparison,
    "prompt_response": parse_prompt_response,
    "demonstration_pairs": parse_prompt_response,  # each side; joined by join_demonstrations
    "chat_messages": parse_chat_messages,
    "prompt_completion_label": parse_prompt_completion_label,
    "ranked_responses": parse_ranked_responses,
}


# ----------------------------------------------------------------------------- detection


def detect_format(record: Mapping, location: Location, kind: str) -> str:
    """The format of ``record`` by its keys, restricted to ``kind`` ('preference', 'sft', 'auto').

    Raises:
      DataError when no format fits (declare ``config.data.format``).
    """
    found = None
    if "chosen" in record and "rejected" in record:
        if isinstance(record["chosen"], list):
            found = "chat_pairs"
        elif "prompt" in record:
            found = "prompt_chosen_rejected"
        elif isinstance(record["chosen"], str) and record["chosen"].startswith("\n\nHuman:"):
            found = "hh_transcripts"
    elif isinstance(record.get("messages"), list):
        found = "chat_messages"
    elif any(k in record for k in DEFAULT_FIELDS["prompt"]) and any(
        k in record for k in DEFAULT_FIELDS["response"]
    ):
        found = "prompt_response"
    elif "summaries" in record and "choice" in record:
        found = "comparison"
    wanted = {"preference": PREFERENCE_FORMATS, "sft": DEMONSTRATION_FORMATS}.get(kind, FORMATS)
    if found is None or found not in wanted:
        what = f"a {kind} format" if kind != "auto" else "any format"
        raise DataError(
            f"{location}: could not detect {what} from the record's keys {sorted(record)}"
            + (f" (it looks like {found})" if found else "")
            + f"; set config.data.format to one of {FORMATS} (and config.data.field_map for "
            "other field names)"
        )
    return found


def resolve_format(
    declared: str, first: tuple[Location, Mapping] | None, has_rejected_files: bool
) -> str:
    """``config.data.format`` -> a concrete format name."""
    if declared in FORMATS:
        return declared
    if declared not in KINDS:
        raise DataError(f"config.data.format={declared!r}: expected one of {KINDS + FORMATS}")
    if has_rejected_files and declared in ("preference", "auto"):
        return "demonstration_pairs"
    if first is None:
        raise DataError("the data source is empty: no record to detect the format from")
    return detect_format(first[1], first[0], declared)


# ----------------------------------------------------------------------------- driving


def parse_records(
    records: Iterable[tuple[Location, Mapping]],
    fmt: str,
    field_map: Mapping[str, str],
    report: SplitReport,
    counter: str = "records_read",
) -> list[Example]:
    """Examples from ``(location, record)`` pairs; bad records go through ``report.reject``."""
    parser = PARSERS[fmt]
    out = []
    for index, (loc, record) in enumerate(records):
        report.count(counter)
        try:
            prompt_text, messages, responses, chat, *label = parser(record, field_map, report)
        except BadRecord as err:
            report.reject(loc, err)
            continue
        out.append(
            Example(
                index,
                loc,
                prompt_text,
                messages,
                tuple(responses),
                tuple(chat),
                label[0] if label else None,
            )
        )
    return out


def join_demonstrations(
    chosen: list[Example], rejected: list[Example], report: SplitReport
) -> list[Example]:
    """Preference pairs from two demonstration sets answering the same prompts.

    Joined on the exact prompt text; the chosen side's order and ids are kept. Prompts without
    a partner, and repeated prompts (first occurrence wins), are counted, not errors.
    """
    by_prompt: dict[str, Example] = {}
    for ex in rejected:
        if ex.prompt_text in by_prompt:
            report.count("demonstration_pairs/duplicate_rejected_prompt")
            continue
        by_prompt[ex.prompt_text] = ex
    out, used = [], set()
    for ex in chosen:
        other = by_prompt.get(ex.prompt_text)
        if other is None:
            report.count("demonstration_pairs/unpaired_chosen")
            continue
        if ex.prompt_text in used:
            report.count("demonstration_pairs/duplicate_chosen_prompt")
            continue
        used.add(ex.prompt_text)
        if ex.responses[0] == other.responses[0]:
            report.reject(
                ex.location,
                BadRecord(
                    "response",
                    "identical_responses",
                    f"identical to the rejected demonstration at {other.location}",
                ),
            )
            continue
        out.append(
            dataclasses.replace(
                ex,
                responses=(ex.responses[0], other.responses[0]),
                chat_responses=(ex.chat_responses[0], other.chat_responses[0]),
            )
        )
    report.count("demonstration_pairs/unpaired_rejected", len(set(by_prompt) - used))
    return out
