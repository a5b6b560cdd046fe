"""SFT on AlpacaEval GPT-4 demonstrations (N = 1), packed rows, GPT-2 tokenizer, debug size.

  python -m dil_jax.main --config=configs/sft_alpaca_gpt4_debug.py --workdir=/tmp/sft_alpaca

Data: ``../shared/data/alpaca-eval-outputs/gpt4.model_outputs.json.gz`` as ``prompt_response``
demonstrations (``instruction`` -> ``output``), rendered like ``dil_alpaca_demos_debug.py``
(instructions longer than 256 tokens are skipped and counted).
Several demonstrations share each 256-token row (``data.packing``: ``segment_ids`` keep
attention inside one example, ``positions`` restart per example), which the per-token SFT loss
allows. Tiny 1-layer Llama, a few steps.
"""

from dil_jax import config_files

base = config_files.sibling(__file__, "base")
uf = config_files.sibling(__file__, "dil_ultrafeedback_debug")
alpaca = config_files.sibling(__file__, "dil_alpaca_demos_debug")


def get_config():
    config = base.get_config()
    d = config.data
    d.source = "files"
    d.format = "prompt_response"
    d.train_files = (str(alpaca.ALPACA / "gpt4.model_outputs.json.gz"),)
    alpaca.alpaca_text(d)
    d.packing = True
    uf.tiny_llama(config, vocab_size=50257, max_length=d.max_length)
    config.loss.name = "sft"
    config.optim.learning_rate = 1e-3
    uf.debug_schedule(config)
    return config
