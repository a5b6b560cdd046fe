"""DIL-LSIF on AlpacaEval demonstrations: GPT-4 (chosen) vs text-davinci-003 (rejected), debug.

  python -m dil_jax.main --config=configs/dil_alpaca_demos_debug.py --workdir=/tmp/dil_alpaca

Data: ``../shared/data/alpaca-eval-outputs/{gpt4,text_davinci_003}.model_outputs.json.gz``, the
same 805 instructions answered by a strong and a weaker model; the ``demonstration_pairs``
format joins them on the instruction text into preference pairs (the natural
demonstration-to-preference setup), 64 of which are held out. Skipped and counted in
``data_report.json`` (``data.on_bad_record='skip'``): 2 empty text-davinci-003 outputs, 10 pairs
where both models wrote the same answer; instructions longer than the prompt budget are cut,
keeping their end, and counted. Rendered as plain text for GPT-2
(``\\n\\nHuman: <instruction>\\n\\nAssistant: <output><|endoftext|>``). For supervised training on
the GPT-4 outputs alone see ``sft_alpaca_gpt4_debug.py``. Tiny 1-layer Llama, a few steps.
"""

from dil_jax import config_files

base = config_files.sibling(__file__, "base")
uf = config_files.sibling(__file__, "dil_ultrafeedback_debug")
ALPACA = uf.SHARED / "alpaca-eval-outputs"


def alpaca_text(d):
    """GPT-2 plain-text rendering of an instruction and its answer."""
    d.tokenizer = str(uf.SHARED / "tokenizers" / "gpt2" / "tokenizer.json")
    d.eos_token = "<|endoftext|>"
    d.chat_template = "plain"
    d.prompt_template = "\n\nHuman: {prompt}\n\nAssistant:"
    d.response_template = " {response}"
    d.max_length = 256
    d.max_prompt_length = 128
    d.buckets = (128, 256)
    d.num_eval = 64
    d.on_bad_record = "skip"  # a few instructions are longer than max_length: counted, skipped


def get_config():
    config = base.get_config()
    d = config.data
    d.source = "files"
    d.format = "demonstration_pairs"
    d.train_files = (str(ALPACA / "gpt4.model_outputs.json.gz"),)
    d.rejected_files = (str(ALPACA / "text_davinci_003.model_outputs.json.gz"),)
    alpaca_text(d)
    uf.tiny_llama(config, vocab_size=50257, max_length=d.max_length)
    config.loss.name = "dil_lsif"
    config.optim.learning_rate = 1e-3
    uf.debug_schedule(config)
    return config
