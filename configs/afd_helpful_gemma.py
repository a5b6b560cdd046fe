"""AfD on Anthropic HH-RLHF Helpful with Gemma-2B (paper setup), and its debug variant.

  # the paper's setup (Gemma-2B weights and tokenizer from the hub, your demonstration file):
  python -m dil_jax.afd.main --config=configs/afd_helpful_gemma.py:paper --workdir=/tmp/afd_help \
      --config.afd.demonstrations.train_files="('/data/hh_helpful_gpt4_demos.jsonl',)"
  # debug variant (the default; offline, CPU minutes):
  python -m dil_jax.afd.main --config=configs/afd_helpful_gemma.py --workdir=/tmp/afd_help_dbg

Paper setup: as configs/afd_harmless_gpt2.py with π_0 = Gemma-2B (``google/gemma-2b``, its
tokenizer and chat-free plain rendering) on the HH helpful-base pairs
(``hh-rlhf/helpful-base/{train,test}.jsonl.gz``); demonstrations = GPT-4 answers to the Helpful
prompts (not public; the field must be set).

Debug variant: offline stand-ins: the GPT-2 tokenizer (Gemma's is
not in ``../shared/data``) over a 1-layer Llama; demonstrations = AlpacaEval's GPT-4 outputs;
Bradley–Terry pairs = the same instructions answered by GPT-4 (chosen) and text-davinci-003
(rejected), joined by the ``demonstration_pairs`` format; π_0 = a few SFT steps on
text-davinci-003's outputs (the weaker "initial model"). Best-of-N candidates and scores go to
``<workdir>/bon_candidates.npz`` (no golden reward model offline).
"""

import ml_collections

from dil_jax import config_files

alpaca = config_files.sibling(__file__, "dil_alpaca_demos_debug")
harmless = config_files.sibling(__file__, "afd_harmless_gpt2")


def paper_config():
    """The paper's Helpful / Gemma-2B setup (needs the hub or a local Gemma-2B directory)."""
    config = harmless.paper_config()
    config.model.family = "gemma"
    config.model.hf_path = "google/gemma-2b"
    helpful = "hh-rlhf/helpful-base"
    for d in (config.data, config.afd.preferences):
        d.train_files = (helpful + "/train.jsonl.gz",)
        d.eval_files = (helpful + "/test.jsonl.gz",)
    for d in (config.data, config.afd.preferences, config.afd.demonstrations):
        d.tokenizer = "google/gemma-2b"
        d.eos_token = ""  # Gemma's tokenizer declares <eos>
    config.afd.sampling.eos_id, config.afd.sampling.pad_id = 1, 0  # Gemma <eos>, <pad>
    return config


def get_config(variant: str = "debug"):
    if variant == "paper":
        return paper_config()
    if variant != "debug":
        raise ValueError(f"variant {variant!r}: expected 'debug' or 'paper'")
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
