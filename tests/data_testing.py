"""Helpers for the data tests: a tiny trained BPE tokenizer, record files, real-data configs."""

from __future__ import annotations

import gzip
import json
import pathlib

from conftest import make_tiny_config

CORPUS = [
    "Human: hello there, how are you? Assistant: I am fine, thanks for asking.",
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris.",
    "Write a short poem about the sea. The sea is wide and the sea is deep.",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def make_tokenizer(directory: pathlib.Path, *, chat_template: str | None = None) -> str:
    """A byte-level BPE (~330 tokens, specials <pad>=0 <s>=1 </s>=2) saved in ``directory``.

    Without ``chat_template`` only ``tokenizer.json`` is written (like the shared GPT-2 file:
    no declared EOS); with one, a ``tokenizer_config.json`` names the template and specials.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(directory / "tokenizer.json"))
    if chat_template is not None:
        (directory / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "chat_template": chat_template,
                    "bos_token": "<s>",
                    "eos_token": "</s>",
                    "pad_token": "<pad>",
                }
            )
        )
    return str(directory)


def write_jsonl(path: pathlib.Path, records, *, raw_lines=()) -> str:
    """Records as JSON lines (gzipped if the name ends in .gz); ``raw_lines`` appended as bytes."""
    lines = [json.dumps(r).encode() for r in records] + list(raw_lines)
    blob = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(blob) if path.suffix == ".gz" else blob)
    return str(path)


def pairs(n: int, *, prefix: str = "q") -> list[dict]:
    """n distinct prompt/chosen/rejected string records of varied lengths."""
    return [
        {
            "prompt": f"{prefix}{i}: what is the capital of France?" + " the sea" * (i % 7),
            "chosen": "Paris, thanks for asking." + " the fox" * (i % 11),
            "rejected": "I am fine." + " the dog" * (i % 5),
        }
        for i in range(n)
    ]


def files_config(train_files, tokenizer: str, **overrides):
    """The tiny test config reading local files with a real tokenizer, small lengths."""
    defaults = {
        "data.source": "files",
        "data.format": "auto",
        "data.train_files": tuple(train_files),
        "data.tokenizer": tokenizer,
        "data.max_length": 64,
        "data.max_prompt_length": 32,
        "data.buckets": (32, 64),
        "data.num_eval": 0,
        "model.vocab_size": 512,
        "model.max_position_embeddings": 64,
        "train.global_batch_size": 4,
        "eval.every_steps": 0,
    }
    defaults.update(overrides)
    return make_tiny_config(**defaults)
