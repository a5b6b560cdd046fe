"""AfD on Anthropic HH-RLHF Harmless with GPT-2 (paper setup), and its debug variant.

  # the paper's setup (GPT-2 weights and tokenizer from the hub, your demonstration file):
  python -m dil_jax.afd.main --config=configs/afd_harmless_gpt2.py:paper --workdir=/tmp/afd_hh \
      --config.afd.demonstrations.train_files="('/data/hh_harmless_gpt4_demos.jsonl',)"
  # debug variant (the default; offline, CPU minutes):
  python -m dil_jax.afd.main --config=configs/afd_harmless_gpt2.py --workdir=/tmp/afd_hh_debug
  python -m dil_jax.afd.main --config=configs/afd_harmless_gpt2.py --workdir=/tmp/afd_hh_adv \
      --method=adversarial

Paper setup (docs/paper-setups.md, AfD): π_0 = pretrained GPT-2 (``init.mode='hf'``); forward KL =
SFT on GPT-4 demonstrations to the HH Harmless prompts for 2 epochs (the demonstrations are not
public: ``afd.demonstrations.train_files`` is left empty and must be given, records
``{"prompt": ..., "response": ...}``); Init-SFT / Init-Demo / SFT-Demo classifiers and a
Bradley–Terry RM on the HH harmless-base pairs (``data.train_files``: the anthropics/hh-rlhf
``harmless-base/train.jsonl.gz``; the test split evaluates); Best-of-N from π_SFT with
N ∈ {1, 5, 10, 30, 50}; sampling temperature 1.0, top-p 0.95, up to 128 new tokens (the authors'
later code on the same data, orientation only). Unpublished hyper-parameters (learning rates,
batch sizes, reward-model steps) keep the library defaults and are named fields. The default
variant builds offline, so the config test checks it; the paper variant reads GPT-2's config
from ``model.hf_path``.

Debug variant: the same shape with stand-ins that exist offline: the GPT-2 tokenizer
(``../shared/data/tokenizers/gpt2``) over a 1-layer, width-32 Llama; π_0 = a few SFT steps on
the chosen HH harmless replies (``init.mode='pretrain'``); demonstrations = AlpacaEval's GPT-4
outputs (the HH GPT-4 demonstrations of the paper are not public); Bradley–Terry pairs = HH
harmless-base test pairs. There is no golden reward model here, so Best-of-N candidates and each
reward's scores are saved to ``<workdir>/bon_candidates.npz`` for an external judge.
"""

import ml_collections

from dil_jax import config_files
from dil_jax.afd import extrapolation as afd

base = config_files.sibling(__file__, "base")
uf = config_files.sibling(__file__, "dil_ultrafeedback_debug")
hh = config_files.sibling(__file__, "dil_hh_harmless_debug")
alpaca = config_files.sibling(__file__, "dil_alpaca_demos_debug")

GPT2_EOS = 50256  # '<|endoftext|>'
HH_HARMLESS = "hh-rlhf/harmless-base"  # a local copy of anthropics/hh-rlhf's folder


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


def paper_config():
    """The paper's Harmless / GPT-2 setup (needs the hub or a local GPT-2 directory)."""
    config = base.get_config()
    m = config.model
    m.family = "gpt2"
    m.hf_path = "openai-community/gpt2"  # architecture from its config.json; weights for init
    m.dtype = "bfloat16"
    config.init.mode = "hf"
    d = config.data
    d.source = "files"
    d.format = "hh_transcripts"
    d.train_files = (HH_HARMLESS + "/train.jsonl.gz",)
    d.eval_files = (HH_HARMLESS + "/test.jsonl.gz",)
    d.tokenizer = "openai-community/gpt2"
    d.eos_token = "<|endoftext|>"
    d.chat_template = "plain"
    d.max_length = 512
    d.max_prompt_length = 384
    d.buckets = (256, 512)
    d.on_bad_record = "skip"
    config.loss.name = "sft"
    config.logprobs.seq_chunk = 1024
    config.eval.gold_prompts = 0
    a = afd.default_config()
    a.demonstrations = ml_collections.ConfigDict(d.to_dict())
    a.demonstrations.format = "prompt_response"
    a.demonstrations.train_files = ()  # GPT-4 demonstrations to the HH prompts: not public
    a.demonstrations.eval_files = ()
    a.demonstrations.num_eval = 256
    a.preferences = ml_collections.ConfigDict(d.to_dict())
    a.sft.steps = 0  # set to 2 epochs: 2 * len(demonstrations) / sft.global_batch_size
    a.sft.global_batch_size = 64
    a.sft.learning_rate = 1e-5
    a.sampling.temperature, a.sampling.top_p, a.sampling.max_new_tokens = 1.0, 0.95, 128
    a.sampling.max_batch = 256
    a.sampling.eos_id = a.sampling.pad_id = GPT2_EOS
    a.reward_model.learning_rate = 1e-5
    a.bon.num_prompts = 500
    config.afd = a
    return config


def get_config(variant: str = "debug"):
    if variant == "paper":
        return paper_config()
    if variant != "debug":
        raise ValueError(f"variant {variant!r}: expected 'debug' or 'paper'")
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
