"""AfD Harmless setup at debug size: real data, a tiny model, every stage in minutes on a CPU.

  python -m dil_jax.afd_main --config=configs/afd_harmless_gpt2_debug.py --workdir=/tmp/afd_hh
  python -m dil_jax.afd_main --config=configs/afd_harmless_gpt2_debug.py --workdir=/tmp/afd_hh_adv \
      --method=adversarial

The shape of ``afd_harmless_gpt2.py`` with stand-ins that exist offline: the GPT-2 tokenizer
(``../shared/data/tokenizers/gpt2``) over a 1-layer, width-32 Llama; π_0 = a few SFT steps on
the chosen HH harmless replies (``init.mode='pretrain'``); demonstrations = AlpacaEval's GPT-4
outputs (the HH GPT-4 demonstrations of the paper are not public); Bradley–Terry pairs = HH
harmless-base test pairs. There is no golden reward model here, so Best-of-N candidates and each
reward's scores are saved to ``<workdir>/bon_candidates.npz`` for an external judge.
"""

import ml_collections

from dil_jax import afd, config_files

base = config_files.sibling(__file__, "base")
uf = config_files.sibling(__file__, "dil_ultrafeedback_debug")
hh = config_files.sibling(__file__, "dil_hh_harmless_debug")
alpaca = config_files.sibling(__file__, "dil_alpaca_demos_debug")

GPT2_EOS = 50256  # '<|endoftext|>'


def demonstration_data():
    """AlpacaEval GPT-4 outputs as (prompt, response) demonstrations, GPT-2 plain text."""
    d = ml_collections.ConfigDict()
    d.source = "files"
    d.format = "prompt_response"
    d.train_files = (str(alpaca.ALPACA / "gpt4.model_outputs.json.gz"),)
    alpaca.alpaca_text(d)
    return d


def preference_data(config):
    """The HH harmless pairs of the main data section."""
    d = ml_collections.ConfigDict(config.data.to_dict())
    d.format = "hh_transcripts"
    return d


def debug_afd(config, demos, prefs):
    a = afd.default_config()
    a.demonstrations = demos
    a.preferences = prefs
    a.sft.steps, a.sft.global_batch_size, a.sft.learning_rate = 4, 8, 1e-3
    a.rm_prompts = 32
    a.reward_model.steps, a.reward_model.global_batch_size = 4, 8
    a.reward_model.eval_fraction = 0.25
    a.reward_model.checkpoint_every = 2
    a.bon.n_values, a.bon.num_prompts = (1, 2, 4), 8
    a.sampling.max_new_tokens, a.sampling.max_batch = 32, 64
    a.sampling.eos_id = a.sampling.pad_id = GPT2_EOS
    a.adversarial.steps, a.adversarial.prompts_per_step = 2, 8
    a.adversarial.samples_per_prompt = 2
    a.adversarial.checkpoint_every = a.adversarial.log_every = 1
    config.afd = a


def get_config():
    config = hh.get_config()  # HH harmless pairs, GPT-2 tokenizer, tiny Llama, debug schedule
    pre = hh.get_config()
    pre.loss.name = "sft"  # π_0: SFT on the chosen replies (the pairs' first response)
    pre.eval.every_steps = 0
    config.init.mode = "pretrain"
    config.init.pretrain = pre
    config.loss.name = "sft"
    config.eval.every_steps = 0
    debug_afd(config, demonstration_data(), preference_data(config))
    return config
