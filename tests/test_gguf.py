"""The GGUF -> Hugging Face converter's command line (dil_jax.models.gguf)."""

import json
import subprocess
import sys

import pytest
from conftest import REPO

from dil_jax.models import gguf


def test_help_names_the_command_and_its_arguments():
    out = subprocess.run(
        [sys.executable, "-m", "dil_jax.models.gguf", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("usage: python -m dil_jax.models.gguf")
    assert "--smollm2" in out and "gguf" in out and "out" in out


def test_missing_file_and_bad_usage_exit_2(tmp_path, capsys):
    assert gguf.main([str(tmp_path / "absent.gguf"), str(tmp_path / "out")]) == 2
    assert "absent.gguf: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        gguf.main([str(tmp_path / "out")])  # neither a path nor --smollm2
    assert e.value.code == 2


@pytest.mark.slow
def test_cli_converts_the_smollm2_gguf(tmp_path, capsys):
    pytest.importorskip("gguf", reason="needs the gguf reader: pip install gguf")
    try:
        gguf.smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    out = tmp_path / "smollm2"
    assert gguf.main(["--smollm2", str(out)]) == 0
    assert "30 layers, width 576, vocabulary 49152" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"], config["tie_word_embeddings"]) == (["LlamaForCausalLM"], True)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file()
