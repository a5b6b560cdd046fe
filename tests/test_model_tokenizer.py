"""Issue 16 §1: with ``model.hf_path`` the tokenizer defaults to the model directory's own, and a
tokenizer whose ids the model cannot read is refused in one line naming both."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, SHARED_DATA, one_device_env

from dil_jax import config_files
from dil_jax.data import pipeline
from dil_jax.data.report import DataError
from dil_jax.errors import ConfigError

MISTRAL = SHARED_DATA / "tokenizers" / "mistral-v0.3"  # tokenizer + Mistral-7B config.json
GPT2 = SHARED_DATA / "tokenizers" / "gpt2"
UF_EVAL = SHARED_DATA / "ultrafeedback-binarized-subset" / "eval_clean.jsonl.gz"
DEBUG_CONFIG = REPO / "configs" / "dil_ultrafeedback_debug.py"


def gpt2_model_dir(tmp_path):
    """A stand-in model directory: a tiny Llama config.json (vocabulary 50,304) and GPT-2's
    tokenizer; no weights (the data pipeline never reads them)."""
    out = tmp_path / "gpt2_llama"
    out.mkdir()
    shutil.copy(GPT2 / "tokenizer.json", out / "tokenizer.json")
    arch = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 50304,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }
    (out / "config.json").write_text(json.dumps(arch))
    return out


def uf_config(hf_path, tokenizer: str):
    """The debug UltraFeedback config on 16 records, pointed at ``hf_path``."""
    config = config_files.load(DEBUG_CONFIG).get_config()
    config.model.hf_path = str(hf_path)
    config.data.tokenizer = tokenizer
    config.data.train_files = (str(UF_EVAL),)
    config.data.eval_files = ()
    config.data.num_eval = 8
    config.data.max_records = 16
    return config


def test_tokenizer_defaults_to_the_models_own(shared_data, tmp_path):
    config = uf_config(MISTRAL, "")
    train, _, _ = pipeline.build_datasets(config, workdir=str(tmp_path / "run"))
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["tokenizer"]["name"] == str(MISTRAL)
    assert report["tokenizer"]["vocab"] == 32768 and len(train) > 0


def test_same_tokenizer_named_explicitly_is_accepted(shared_data):
    pipeline.build_datasets(uf_config(MISTRAL, str(MISTRAL)))


def test_foreign_tokenizer_of_a_smaller_vocabulary_is_refused(shared_data, tmp_path):
    """The bug of issue 16: Mistral's 32,768 ids fit a 49k/50k embedding table, so only the
    comparison with the model's own tokenizer catches them."""
    model = gpt2_model_dir(tmp_path)
    with pytest.raises(DataError) as e:
        pipeline.build_datasets(uf_config(model, str(MISTRAL)))
    msg = str(e.value)
    assert "\n" not in msg
    assert str(MISTRAL) in msg and str(model) in msg and "own tokenizer" in msg


def test_tokenizer_larger_than_the_model_is_refused(shared_data):
    with pytest.raises(DataError, match="more than model .*mistral-v0.3") as e:
        config = uf_config(MISTRAL, str(GPT2))
        config.data.eos_token = "<|endoftext|>"
        pipeline.build_datasets(config)
    assert str(GPT2) in str(e.value) and "\n" not in str(e.value)


def test_no_tokenizer_and_no_model_directory_is_a_config_error(shared_data):
    config = uf_config(MISTRAL, "")
    config.model.hf_path = None
    with pytest.raises(ConfigError, match="config.data.tokenizer.*hf_path"):
        pipeline.build_datasets(config)


def test_special_token_ids_outside_the_model_are_refused():
    """EOS/BOS/pad ids are checked too (e.g. an EOS override added beyond the embedding rows)."""
    config = config_files.load(REPO / "configs" / "base.py").get_config()
    config.model.vocab_size = 100

    class Tok:
        eos_token_id, bos_token_id, pad_token_id = 7, 1, 100

        def __len__(self):
            return 100

    tok = Tok()
    with pytest.raises(DataError, match="'tok'.s pad id 100 is outside the model"):
        pipeline.check_tokenizer_fits(tok, "tok", config)


def test_cli_refuses_the_debug_configs_tokenizer_on_another_model(shared_data, tmp_path):
    """The issue's command: one line naming both, exit status 2, no traceback."""
    model = gpt2_model_dir(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dil_jax.main",
            f"--config={DEBUG_CONFIG}",
            f"--workdir={tmp_path / 'run'}",
            f"--config.model.hf_path={model}",
            "--config.init.mode=hf",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=one_device_env(),
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert str(MISTRAL) in lines[0] and str(model) in lines[0]
