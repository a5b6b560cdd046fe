"""DIL-LSIF on the UltraFeedback-binarized subset with the Mistral-v0.3 tokenizer, debug size.

  python -m dil_jax.main --config=configs/dil_ultrafeedback_debug.py --workdir=/tmp/dil_uf_debug

Data: ``../shared/data/ultrafeedback-binarized-subset/{train,eval}_clean.jsonl.gz`` (1,000 / 200
single-turn ``{prompt, chosen, rejected}`` rows), rendered with Mistral's chat template
(``[INST] prompt[/INST] reply</s>``), cut to 256 tokens with prompts kept to their last 128
(also the 23 % of prompts longer than the whole 256-token budget: cut, not dropped). Empty
replies and the few pairs whose chosen equals rejected are skipped; all of it is counted in
``<workdir>/data_report.json``. A tiny 1-layer Llama
(width 32, vocabulary = the tokenizer's 32,768) trains a few steps: this checks the plumbing,
not the method. For a real run, point ``config.model`` at a pretrained model and raise
``data.max_length`` and ``train.steps``; the Mistral tokenizer named here is then refused
unless the model reads Mistral's ids, so give the model's own (empty: the default with
``hf_path``):

  python -m dil_jax.main --config=configs/dil_ultrafeedback_debug.py --workdir=/tmp/dil_uf_smol \
      --config.model.hf_path=runs/smollm2_hf --config.init.mode=hf --config.data.tokenizer= \
      --config.reference.mode=precomputed --config.model.remat=True

(runs/smollm2_hf from ``python -m dil_jax.models.gguf --smollm2 runs/smollm2_hf``; run it on one
CPU device, ``XLA_FLAGS`` unset: README "Memory").
"""

import pathlib

from dil_jax import config_files

base = config_files.sibling(__file__, "base")
SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_llama(config, vocab_size: int, max_length: int):
    """A 1-layer, width-32 Llama over the real tokenizer's vocabulary."""
    m = config.model
    m.vocab_size = vocab_size
    m.hidden_size = 32
    m.intermediate_size = 64
    m.num_hidden_layers = 1
    m.num_attention_heads = 2
    m.num_key_value_heads = 1
    m.max_position_embeddings = max_length


def debug_schedule(config):
    """A few steps, small batches, frequent checkpoints, cheap evaluation."""
    config.train.steps = 6
    config.train.global_batch_size = 8
    config.train.log_every = 1
    config.eval.every_steps = 3
    config.eval.batch_size = 8
    config.eval.num_batches = 1
    config.eval.gold_prompts = 0  # real data has no gold reward
    config.checkpoint.every_steps = 3
    # Chunk the LM head over tokens: never [B, N, T, V] logits for a 32k-50k vocabulary.
    config.logprobs.seq_chunk = 1024


def get_config():
    config = base.get_config()
    d = config.data
    d.source = "files"
    d.format = "prompt_chosen_rejected"
    d.train_files = (str(SHARED / "ultrafeedback-binarized-subset" / "train_clean.jsonl.gz"),)
    d.eval_files = (str(SHARED / "ultrafeedback-binarized-subset" / "eval_clean.jsonl.gz"),)
    d.tokenizer = str(SHARED / "tokenizers" / "mistral-v0.3")
    d.chat_template = "chat"
    d.max_length = 256
    d.max_prompt_length = 128
    d.truncation_mode = "keep_end"
    d.buckets = (128, 256)
    d.on_bad_record = "skip"
    tiny_llama(config, vocab_size=32768, max_length=d.max_length)
    config.loss.name = "dil_lsif"
    config.optim.learning_rate = 1e-3
    debug_schedule(config)
    return config
