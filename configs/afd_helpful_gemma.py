"""AfD Helpful setup at debug size: AlpacaEval demonstrations, a tiny model, CPU minutes.

  python -m dil_jax.afd_main --config=configs/afd_helpful_gemma_debug.py --workdir=/tmp/afd_help

The shape of ``afd_helpful_gemma.py`` with offline stand-ins: the GPT-2 tokenizer (Gemma's is
not in ``../shared/data``) over a 1-layer Llama; demonstrations = AlpacaEval's GPT-4 outputs;
Bradley–Terry pairs = the same instructions answered by GPT-4 (chosen) and text-davinci-003
(rejected), joined by the ``demonstration_pairs`` format; π_0 = a few SFT steps on
text-davinci-003's outputs (the weaker "initial model"). Best-of-N candidates and scores go to
``<workdir>/bon_candidates.npz`` (no golden reward model offline).
"""

import ml_collections

from dil_jax import config_files

alpaca = config_files.sibling(__file__, "dil_alpaca_demos_debug")
harmless = config_files.sibling(__file__, "afd_harmless_gpt2_debug")


def get_config():
    config = alpaca.get_config()  # GPT-4 vs text-davinci-003 pairs, tiny Llama, debug schedule
    pre = alpaca.get_config()
    pre.data.format = "prompt_response"
    pre.data.train_files = (str(alpaca.ALPACA / "text_davinci_003.model_outputs.json.gz"),)
    pre.data.rejected_files = ()
    pre.loss.name = "sft"
    pre.eval.every_steps = 0
    config.init.mode = "pretrain"
    config.init.pretrain = pre
    config.loss.name = "sft"
    config.eval.every_steps = 0
    prefs = ml_collections.ConfigDict(config.data.to_dict())  # demonstration_pairs
    harmless.debug_afd(config, harmless.demonstration_data(), prefs)
    return config
