"""Tokenisation: joint prompt+response tokens, boundary repair, EOS, masks, truncation, cache."""

import json

import numpy as np
import pytest
from data_testing import CHAT_TEMPLATE, files_config, make_tokenizer, pairs, write_jsonl

from dil_jax.data import formats, pipeline, tokenize
from dil_jax.data.report import DataError, Location, SplitReport


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {
        "plain": make_tokenizer(root / "plain"),
        "chat": make_tokenizer(root / "chat", chat_template=CHAT_TEMPLATE),
    }


def example(prompt, *responses, messages=None):
    chat = messages or ({"role": "user", "content": prompt},)
    return formats.Example(0, Location("f", 1), prompt, chat, responses, responses)


def run(
    tok,
    examples,
    *,
    mode="auto",
    prompt_template="{prompt}",
    response_template="{response}",
    boundary="repair",
    max_length=64,
    max_prompt=32,
    truncation="keep_end",
    too_long="truncate",
    policy="error",
):
    report = SplitReport("train", policy)
    renderer = tokenize.Renderer(
        tok, mode, "prompt_chosen_rejected", prompt_template, response_template
    )
    arrays = tokenize.tokenize_examples(
        examples,
        tok,
        renderer,
        max_length=max_length,
        max_prompt_length=max_prompt,
        truncation_mode=truncation,
        too_long=too_long,
        boundary_mismatch=boundary,
        report=report,
    )
    return arrays, report


def sequences(arrays):
    out = []
    for i in range(len(arrays["example_id"])):
        row = []
        for j in range(arrays["lengths"].shape[1]):
            s, n = arrays["starts"][i, j], arrays["lengths"][i, j]
            row.append((arrays["tokens"][s : s + n].tolist(), int(arrays["prompt_lengths"][i, j])))
        out.append(row)
    return out


def test_joint_tokens_prefix_eos_and_explicit_masks(tok_dirs):
    tok = tokenize.load_tokenizer(tok_dirs["plain"], eos_token="</s>")
    eos = tok.eos_token_id
    arrays, report = run(
        tok,
        [example("Human: hello there?", " I am fine.", " Paris.")],
        prompt_template="{prompt} Assistant:",
    )
    (chosen, p), (rejected, _) = sequences(arrays)[0]
    prompt_ids = tok("Human: hello there? Assistant:", add_special_tokens=False)["input_ids"]
    assert chosen[:p] == prompt_ids and rejected[:p] == prompt_ids
    full = tok("Human: hello there? Assistant: I am fine.", add_special_tokens=False)["input_ids"]
    assert chosen == full + [eos]  # joint tokenisation, then EOS
    assert report.counts["eos_appended"] == 2 and not report.counts["token_boundary_repaired"]
    # Pad id == EOS id: the masks still come from lengths, so the EOS is a scored token.
    data = pipeline.TokenizedDataset(**arrays, pad_id=eos, buckets=(64,))
    batch = data.padded(np.array([0]), 64)
    n = len(chosen)
    assert batch["loss_mask"][0, 0].tolist() == [0] * p + [1] * (n - p) + [0] * (64 - n)
    assert batch["attention_mask"][0, 0].sum() == n
    assert batch["input_ids"][0, 0, n - 1] == eos == batch["input_ids"][0, 0, n]


def test_boundary_mismatch_is_repaired_or_rejected_never_mislabelled(tok_dirs):
    tok = tokenize.load_tokenizer(tok_dirs["plain"], eos_token="</s>")
    # The prompt ends in a space that BPE merges into the reply's first token (' I').
    ex = example("Human: hello there?", "I am fine.", "Paris.")
    arrays, report = run(tok, [ex], prompt_template="{prompt} Assistant: ")
    assert report.counts["token_boundary_repaired"] == 2
    (chosen, p), _ = sequences(arrays)[0]
    prompt_ids = tok("Human: hello there? Assistant: ", add_special_tokens=False)["input_ids"]
    reply_ids = tok("I am fine.", add_special_tokens=False)["input_ids"]
    assert chosen == prompt_ids + reply_ids + [tok.eos_token_id] and p == len(prompt_ids)
    with pytest.raises(DataError, match=r"field 'chosen'.*token_boundary_mismatch"):
        run(tok, [ex], prompt_template="{prompt} Assistant: ", boundary="reject")


def test_chat_template_rendering_and_its_eos(tok_dirs):
    tok = tokenize.load_tokenizer(tok_dirs["chat"])
    msgs = (
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "how are you?"},
    )
    arrays, report = run(
        tok, [example(None, "fine", "bad", messages=msgs)], max_length=128, max_prompt=100
    )
    (chosen, p), _ = sequences(arrays)[0]
    text = tok.decode(chosen)
    assert text.startswith("<s>user: hello</s><s>assistant: hi</s><s>user: how are you?</s>")
    assert tok.decode(chosen[p:]) == " fine</s>"  # the template's own EOS, none appended
    assert not report.counts["eos_appended"]


def test_truncation_modes_and_drop_policy(tok_dirs):
    tok = tokenize.load_tokenizer(tok_dirs["plain"], eos_token="</s>")
    prompt = "the quick brown fox " * 6
    ex = example(prompt, " the sea is wide" * 8, " no")
    full_prompt = tok(prompt, add_special_tokens=False)["input_ids"]
    assert 12 < len(full_prompt) <= 40
    for mode, expected in (("keep_end", full_prompt[-12:]), ("keep_start", full_prompt[:12])):
        arrays, report = run(tok, [ex], max_length=40, max_prompt=12, truncation=mode)
        (chosen, p), (rejected, _) = sequences(arrays)[0]
        assert p == 12 and chosen[:12] == expected
        assert len(chosen) == 40 and chosen[-1] != tok.eos_token_id  # cut reply: no EOS
        assert rejected[-1] == tok.eos_token_id
        assert report.counts["prompt_truncated"] == 1 and report.counts["chosen_truncated"] == 1
    arrays, report = run(tok, [ex], max_length=40, max_prompt=12, too_long="drop", policy="skip")
    assert len(arrays["example_id"]) == 0 and report.counts["dropped_too_long"] == 1


def test_prompt_longer_than_max_length_is_cut_not_dropped(tok_dirs):
    """Issue 17: such prompts were rejected (``prompt_too_long``), 23-25 % of UltraFeedback."""
    tok = tokenize.load_tokenizer(tok_dirs["plain"], eos_token="</s>")
    prompt = "the quick brown fox jumps " * 20
    full_prompt = tok(prompt, add_special_tokens=False)["input_ids"]
    assert len(full_prompt) > 40
    for mode, expected in (("keep_end", full_prompt[-12:]), ("keep_start", full_prompt[:12])):
        # on_bad_record='error': the run would have stopped here before.
        arrays, report = run(
            tok, [example(prompt, " yes", " no")], max_length=40, max_prompt=12, truncation=mode
        )
        (chosen, p), (rejected, _) = sequences(arrays)[0]
        assert p == 12 and chosen[:12] == expected and rejected[:12] == expected
        assert chosen[-1] == tok.eos_token_id  # short replies keep their EOS
        assert report.counts["prompt_truncated"] == 1
        assert report.counts["prompt_longer_than_max_length"] == 1
        assert not report.bad


def test_record_with_no_room_for_a_response_is_dropped_and_counted(tok_dirs):
    tok = tokenize.load_tokenizer(tok_dirs["plain"], eos_token="</s>")
    # max_prompt_length == max_length leaves no room (the config check forbids it; the
    # tokeniser still never emits a sequence without a response token).
    arrays, report = run(
        tok, [example("the quick brown fox " * 10, " yes", " no")], max_length=12, max_prompt=12
    )
    assert len(arrays["example_id"]) == 0
    assert report.counts["dropped_no_room_for_response"] == 1


def test_real_tokenizers_load(shared_data):
    gpt2 = tokenize.load_tokenizer(
        str(shared_data / "tokenizers" / "gpt2" / "tokenizer.json"), eos_token="<|endoftext|>"
    )
    assert (len(gpt2), gpt2.eos_token_id, gpt2.chat_template) == (50257, 50256, None)
    mistral = tokenize.load_tokenizer(str(shared_data / "tokenizers" / "mistral-v0.3"))
    assert (len(mistral), mistral.eos_token_id, mistral.bos_token_id) == (32768, 2, 1)
    renderer = tokenize.Renderer(mistral, "auto", "prompt_chosen_rejected")
    prompt, (full,) = renderer.render(example("Hi there", "Hello!"))
    assert (prompt, full) == ("<s>[INST] Hi there[/INST]", "<s>[INST] Hi there[/INST] Hello!</s>")
    with pytest.raises(DataError, match="not a token"):
        tokenize.load_tokenizer(str(shared_data / "tokenizers" / "gpt2"), eos_token="<eos>")


def test_cache_second_build_loads_and_key_tracks_inputs(tmp_path, tok_dirs, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", pairs(20))
    work = tmp_path / "runs" / "a"
    config = files_config([path], tok_dirs["chat"], **{"data.num_eval": 4})
    first, held_first, _ = pipeline.build_datasets(config, workdir=str(work))
    assert first.report["train"]["cache"]["hit"] is False
    assert (tmp_path / "runs" / "data_cache").is_dir()

    def no_tokenising(*args, **kwargs):
        raise AssertionError("a cached split must not be tokenised again")

    monkeypatch.setattr(tokenize, "tokenize_examples", no_tokenising)
    second, held_second, _ = pipeline.build_datasets(config, workdir=str(work))
    assert second.report["train"]["cache"]["hit"] is True
    assert second.report["train"]["counts"] == first.report["train"]["counts"]
    for key in ("tokens", "starts", "lengths", "prompt_lengths", "example_id"):
        np.testing.assert_array_equal(getattr(second, key), getattr(first, key))
    np.testing.assert_array_equal(held_second.example_id, held_first.example_id)
    # Bucket lengths are applied after the cache; lengths, data bytes and templates are keyed.
    config.data.buckets = (16, 64)
    pipeline.build_datasets(config, workdir=str(work))
    for change in (
        {"data.max_length": 48},
        {"data.chat_template": "plain", "data.eos_token": "</s>"},
    ):
        changed = files_config([path], tok_dirs["chat"], **{"data.num_eval": 4, **change})
        with pytest.raises(AssertionError, match="must not be tokenised"):
            pipeline.build_datasets(changed, workdir=str(work))
    write_jsonl(tmp_path / "d.jsonl", pairs(21))
    with pytest.raises(AssertionError, match="must not be tokenised"):
        pipeline.build_datasets(config, workdir=str(work))
    report = json.loads((work / "data_report.json").read_text())
    assert report["train"]["cache"]["hit"] is True and report["eval"]["held_out_from_train"] == 4
