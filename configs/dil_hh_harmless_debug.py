"""DIL-LSIF on Anthropic HH-RLHF harmless-base (test split) with the GPT-2 tokenizer, debug size.

  python -m dil_jax.main --config=configs/dil_hh_harmless_debug.py --workdir=/tmp/dil_hh_debug

Data: ``../shared/data/hh-rlhf/harmless-base/test.jsonl.gz`` (2,312 whole-dialogue pairs), the
only split available; 256 pairs are held out for evaluation. The prompt is the longest common
prefix of the two transcripts cut after its last ``"\\n\\nAssistant:"`` (5 records have markers
inside a reply, counted as ``hh_marker_inside_reply``), rendered as plain text (GPT-2 has no
chat template) with the reply's own leading space, then EOS (``<|endoftext|>``, which the bare
``tokenizer.json`` does not declare, hence ``data.eos_token``). The 4 records with an empty
chosen reply are skipped and counted (``empty_response``). Prompts keep their last 192 tokens.
A tiny 1-layer Llama over GPT-2's 50,257 tokens trains a few steps (plumbing, not results).
"""

from dil_jax import config_files

base = config_files.sibling(__file__, "base")
uf = config_files.sibling(__file__, "dil_ultrafeedback_debug")


def get_config():
    config = base.get_config()
    d = config.data
    d.source = "files"
    d.format = "hh_transcripts"
    d.train_files = (str(uf.SHARED / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"),)
    d.num_eval = 256
    d.tokenizer = str(uf.SHARED / "tokenizers" / "gpt2" / "tokenizer.json")
    d.eos_token = "<|endoftext|>"
    d.chat_template = "plain"
    d.max_length = 256
    d.max_prompt_length = 192
    d.truncation_mode = "keep_end"
    d.buckets = (128, 256)
    d.on_bad_record = "skip"
    uf.tiny_llama(config, vocab_size=50257, max_length=d.max_length)
    config.loss.name = "dil_lsif"
    config.optim.learning_rate = 1e-3
    uf.debug_schedule(config)
    return config
