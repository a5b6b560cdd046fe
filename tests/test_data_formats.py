"""Sources and formats: every file kind, every record format, every kind of bad input."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_testing import files_config, make_tokenizer, pairs, write_jsonl

from dil_jax.data import formats, pipeline, sources
from dil_jax.data.report import DataError, SplitReport


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    from data_testing import CHAT_TEMPLATE

    return {
        "plain": make_tokenizer(root / "plain"),
        "chat": make_tokenizer(root / "chat", chat_template=CHAT_TEMPLATE),
    }


def build(config):
    train, held_out, _ = pipeline.build_datasets(config)
    return train, held_out


# ----------------------------------------------------------------------------- sources


def test_every_file_kind_reads_the_same_records(tmp_path):
    records = pairs(5)
    paths = [
        write_jsonl(tmp_path / "a.jsonl", records),
        write_jsonl(tmp_path / "a.jsonl.gz", records),
    ]
    (tmp_path / "a.json").write_text(json.dumps(records, indent=2))
    (tmp_path / "a.json.gz").write_bytes(gzip.compress(json.dumps(records).encode()))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "a.parquet")
    paths += [str(tmp_path / n) for n in ("a.json", "a.json.gz", "a.parquet")]
    for path in paths:
        got = list(sources.read_files([path], SplitReport("train")))
        assert [r for _, r in got] == records, path
    # Elements of a pretty-printed .json array are located at the line where they start.
    locs = [
        loc.line for loc, _ in sources.read_files([str(tmp_path / "a.json")], SplitReport("train"))
    ]
    assert locs == [2, 7, 12, 17, 22]
    assert [loc.line for loc, _ in sources.read_files([paths[0]], SplitReport("t"), 3)] == [1, 2, 3]


def test_unreadable_json_document_stops_with_its_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"prompt": "a", "response": "b"},\n  {"prompt": oops}\n]')
    with pytest.raises(DataError, match=r"bad.json:3: malformed JSON"):
        list(sources.read_files([str(path)], SplitReport("train", "skip")))
    with pytest.raises(DataError, match="unsupported name"):
        sources.file_kind("data.csv")


def test_hub_source_through_datasets_load_dataset(tmp_path, tok_dirs):
    """source='hub' runs datasets.load_dataset; a local dataset directory stands in for a hub id."""
    repo = tmp_path / "my_dataset"
    repo.mkdir()
    write_jsonl(repo / "train.jsonl", pairs(12))
    write_jsonl(repo / "test.jsonl", pairs(6, prefix="t"))
    config = files_config(
        (),
        tok_dirs["plain"],
        **{
            "data.source": "hub",
            "data.hub_id": str(repo),
            "data.train_split": "train",
            "data.eval_split": "test",
            "data.eos_token": "</s>",
        },
    )
    train, held_out = build(config)
    assert (len(train), len(held_out)) == (12, 6)
    assert train.report["train"]["format"] == "prompt_chosen_rejected"


# ----------------------------------------------------------------------------- formats


def parse(fmt, record, field_map=None):
    report = SplitReport("train")
    out = formats.parse_records(
        [(sources.Location("f.jsonl", 1), record)], fmt, field_map or {}, report
    )
    return out[0], report


def test_chat_pairs_multi_turn_hub_schema():
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a fruit."},
    ]
    record = {
        "prompt": "Hi",
        "prompt_id": "x",
        "chosen": turns + [{"role": "assistant", "content": "Apple."}],
        "rejected": turns + [{"role": "assistant", "content": "No."}],
        "score_chosen": 8.0,
        "score_rejected": 2.0,
    }
    assert formats.detect_format(record, None, "auto") == "chat_pairs"
    ex, _ = parse("chat_pairs", record)
    assert ex.prompt_messages == tuple(turns)
    assert ex.chat_responses == ("Apple.", "No.")
    # Assistant-only responses with the prompt as its own message list (TRL's layout).
    ex, _ = parse(
        "chat_pairs",
        {"prompt": turns, "chosen": [record["chosen"][-1]], "rejected": [record["rejected"][-1]]},
    )
    assert ex.prompt_messages == tuple(turns) and ex.chat_responses == ("Apple.", "No.")
    with pytest.raises(DataError, match=r"f.jsonl:1: field 'rejected'.*prompt_mismatch"):
        parse(
            "chat_pairs", dict(record, rejected=[turns[0], {"role": "assistant", "content": "x"}])
        )


def test_hh_transcripts_common_prefix_and_messages():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Help me?\n\nAssistant: Sure."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Help me?\n\nAssistant: No."
    ex, report = parse("hh_transcripts", {"chosen": chosen, "rejected": rejected})
    assert ex.prompt_text == "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Help me?\n\nAssistant:"
    assert ex.responses == (" Sure.", " No.")
    assert [m["role"] for m in ex.prompt_messages] == ["user", "assistant", "user"]
    assert ex.chat_responses == ("Sure.", "No.")
    assert not report.counts["hh_marker_inside_reply"]
    # A reply with its own marker: the own-last-marker split would give two prompts.
    glued = rejected + "\n\nAssistant: And more."
    ex, report = parse("hh_transcripts", {"chosen": chosen, "rejected": glued})
    assert ex.responses[1] == " No.\n\nAssistant: And more."
    assert report.counts["hh_marker_inside_reply"] == 1


def test_real_hh_quirks_are_handled_and_counted(shared_data):
    path = str(shared_data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz")
    report = SplitReport("train", "skip")
    examples = formats.parse_records(
        sources.read_files([path], report), "hh_transcripts", {}, report
    )
    assert report.counts["records_read"] == 2312
    assert report.counts["hh_marker_inside_reply"] == 5
    assert dict(report.bad) == {"empty_response": 4}  # indexes 86, 516, 925, 1103
    assert {int(m.split(":")[1]) - 1 for m in report.bad_examples} == {86, 516, 925, 1103}
    assert len(examples) == 2308
    for ex in examples:  # every prompt is a real prefix of both transcripts
        assert ex.prompt_text.endswith("\n\nAssistant:")


def test_comparison_via_field_map():
    record = {
        "info": {"post": "My cat ate my homework.", "title": "help"},
        "summaries": [{"text": " Cat ate homework."}, {"text": " A story."}],
        "choice": 1,
    }
    fmap = {
        "prompt": "info.post",
        "responses": "summaries",
        "response_text": "text",
        "choice": "choice",
    }
    ex, _ = parse("comparison", record, fmap)
    assert ex.prompt_text == "My cat ate my homework."
    assert ex.responses == (" A story.", " Cat ate homework.")
    with pytest.raises(DataError, match=r"field 'choice'.*wrong_type"):
        parse("comparison", dict(record, choice=2), fmap)


def test_demonstrations_and_sft_messages():
    ex, _ = parse("prompt_response", {"instruction": "Say hi", "output": "Hi", "generator": "g"})
    assert (ex.prompt_text, ex.responses) == ("Say hi", ("Hi",))
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    ex, _ = parse("chat_messages", {"messages": msgs})
    assert ex.prompt_messages == tuple(msgs[:2]) and ex.chat_responses == ("Hello",)
    assert ex.prompt_text is None


def test_demonstration_pairs_join_by_prompt():
    strong = [
        formats.Example(i, sources.Location("a", i + 1), p, None, (r,), (r,))
        for i, (p, r) in enumerate([("p1", "good1"), ("p2", "good2"), ("p3", "same")])
    ]
    weak = [
        formats.Example(i, sources.Location("b", i + 1), p, None, (r,), (r,))
        for i, (p, r) in enumerate([("p2", "weak2"), ("p1", "weak1"), ("p9", "x"), ("p3", "same")])
    ]
    report = SplitReport("train", "skip")
    out = formats.join_demonstrations(strong, weak, report)
    assert [(e.prompt_text, e.responses) for e in out] == [
        ("p1", ("good1", "weak1")),
        ("p2", ("good2", "weak2")),
    ]
    assert report.counts["demonstration_pairs/unpaired_rejected"] == 1
    assert report.bad["identical_responses"] == 1


def test_format_detection_and_declared_kind():
    assert formats.detect_format(pairs(1)[0], None, "preference") == "prompt_chosen_rejected"
    assert (
        formats.detect_format({"instruction": "a", "output": "b"}, None, "sft") == "prompt_response"
    )
    with pytest.raises(DataError, match="could not detect a preference format.*prompt_response"):
        formats.detect_format({"instruction": "a", "output": "b"}, "f:1", "preference")


# ----------------------------------------------------------------------------- bad input

GOOD = pairs(6)
BAD_CASES = {  # reason: (raw line, field named in the error)
    "malformed_json": (b'{"prompt": "a", "chosen": ', None),
    "missing_field": (json.dumps({"prompt": "a", "chosen": "b"}).encode(), "rejected"),
    "wrong_type": (json.dumps({"prompt": "a", "chosen": 5, "rejected": "b"}).encode(), "chosen"),
    "empty_response": (
        json.dumps({"prompt": "a", "chosen": "  ", "rejected": "b"}).encode(),
        "chosen",
    ),
    "identical_responses": (
        json.dumps({"prompt": "a", "chosen": "b", "rejected": "b"}).encode(),
        "rejected",
    ),
    "not_utf8": (b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}', None),
    "not_an_object": (b'["a", "b"]', None),
}


@pytest.mark.parametrize("reason", sorted(BAD_CASES))
def test_bad_record_stops_naming_file_line_and_field(tmp_path, tok_dirs, reason):
    line, field = BAD_CASES[reason]
    path = write_jsonl(tmp_path / "data.jsonl", GOOD[:2], raw_lines=[line])
    config = files_config(
        [path],
        tok_dirs["plain"],
        **{"data.eos_token": "</s>", "data.format": "prompt_chosen_rejected"},
    )
    expected = r"data.jsonl:3: " + (f"field '{field}': " if field else "")
    with pytest.raises(DataError, match=expected) as err:
        build(config)
    assert f"[{reason}]" in str(err.value)
    assert "on_bad_record='skip'" in str(err.value)


def test_file_with_every_bad_case_is_counted_under_skip(tmp_path, tok_dirs):
    lines = [json.dumps(GOOD[0]).encode()] + [line for line, _ in BAD_CASES.values()]
    lines += [b"", json.dumps(GOOD[1]).encode()]  # a blank line is not a record
    path = tmp_path / "every_case.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n".join(lines)))
    work = tmp_path / "work"
    config = files_config(
        [str(path)],
        tok_dirs["plain"],
        **{"data.eos_token": "</s>", "data.on_bad_record": "skip", "train.global_batch_size": 2},
    )
    train, _, _ = pipeline.build_datasets(config, workdir=str(work))
    assert len(train) == 2
    report = json.loads((work / "data_report.json").read_text())["train"]
    assert report["bad_records"] == {reason: 1 for reason in BAD_CASES}
    assert report["num_bad_records"] == len(BAD_CASES)
    assert any("every_case.jsonl.gz:2" in m for m in report["bad_record_examples"])
    assert report["examples"] == 2


def test_empty_dataset_after_filtering_and_missing_template_stop(tmp_path, tok_dirs):
    path = write_jsonl(tmp_path / "bad.jsonl", [], raw_lines=[BAD_CASES["missing_field"][0]])
    config = files_config(
        [path],
        tok_dirs["plain"],
        **{
            "data.eos_token": "</s>",
            "data.on_bad_record": "skip",
            "data.format": "prompt_chosen_rejected",
        },
    )
    with pytest.raises(DataError, match=r"no train examples left.*missing_field"):
        build(config)
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                ]
            }
        ],
    )
    config = files_config(
        [chat], tok_dirs["plain"], **{"data.eos_token": "</s>", "loss.name": "sft"}
    )
    with pytest.raises(DataError, match="no chat template, which format 'chat_messages' needs"):
        build(config)
    config = files_config([write_jsonl(tmp_path / "p.jsonl", pairs(4))], tok_dirs["plain"])
    with pytest.raises(DataError, match="defines no EOS token; set config.data.eos_token"):
        build(config)
    demos = write_jsonl(tmp_path / "demos.jsonl", [{"instruction": "a", "output": "b"}] * 4)
    config = files_config([demos], tok_dirs["plain"], **{"data.eos_token": "</s>"})
    with pytest.raises(DataError, match="holds demonstrations.*needs chosen/rejected pairs"):
        build(config)
