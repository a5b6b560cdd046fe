"""DIL paper Table 3: TL;DR summarisation and Anthropic-HH dialogue with Pythia-2.8B, per row.

  # full scale: the SFT stage runs first in <workdir>/base, then the row's loss from it
  python -m dil_jax.main --config=configs/dil_table3.py:hh,dil_lsif --workdir=runs/t3/hh_lsif \\
      --config.optim.learning_rate=5e-7 --config.init.pretrain.optim.learning_rate=1e-5
  # or train the SFT stage once and start every row from it:
  python -m dil_jax.main --config=configs/dil_table3.py:tldr,sft --workdir=runs/t3/tldr_sft
  python -m dil_jax.main --config=configs/dil_table3.py:tldr,dpo --workdir=runs/t3/tldr_dpo \\
      --config.init.mode=checkpoint --config.init.checkpoint_dir=runs/t3/tldr_sft
  # debug variant of any row (offline, CPU minutes):
  python -m dil_jax.main --config=configs/dil_table3.py:debug,dil_lsif --workdir=/tmp/t3_debug

The argument is ``<dataset>,<row>``: dataset ``tldr`` | ``hh`` | ``hh_helpful`` | ``hh_harmless``
| ``debug``, row one of ``ROWS`` (``sft`` = the SFT stage alone). Setup (docs/paper-setups.md,
DIL Table 3):

* Policy: ``EleutherAI/pythia-2.8b`` (GPT-NeoX), first fine-tuned on the dataset (``init.mode=
  'pretrain'`` runs ``init.pretrain``, the SFT stage: NLL of the chosen responses of the same
  training pairs, ``loss.name='sft'``), whose result is the row's initial policy and reference.
* TL;DR: ``CarperAI/openai_summarize_comparisons`` (``prompt`` / ``chosen`` / ``rejected``
  strings; splits ``train`` / ``test``), a flat copy of OpenAI's summarize-from-feedback
  comparisons. Anthropic-HH: ``Anthropic/hh-rlhf`` whole transcripts (format
  ``hh_transcripts``); ``hh`` reads every subset the hub's default loads, ``hh_helpful`` /
  ``hh_harmless`` pick ``data.hub_data_dir`` = ``helpful-base`` / ``harmless-base``.
* Rows: DPO, f-DPO, IPO, SLiC, CPO, SimPO, DIL (LSIF; UKL and BCE too), DIL with the mean
  reduction as in Table 2.
* Unpublished (not in the paper or the official code): learning rates, batch sizes, epochs,
  lengths and every baseline's β / γ / λ. They stay ordinary fields at ``UNPUBLISHED`` values
  that are this config's placeholders, named so, not the paper's: set them (e.g. through
  ``experiments/sweep.py``) before reading anything into a result.
* Metric: win rates of the policy's samples against the SFT model's and against the dataset's
  chosen responses, judged by GPT-4 in the paper: ``experiments/evaluate_run.py --winrate``.

Debug variant (``debug,<row>``): HH harmless-base pairs from ``../shared/data`` (the test split,
the one available) with the GPT-2 tokenizer over a tiny 2-layer GPT-NeoX, a 4-step SFT stage,
then 6 steps of the row.
"""

import ml_collections

from dil_jax import config_files

base = config_files.sibling(__file__, "base")
uf = config_files.sibling(__file__, "dil_ultrafeedback_debug")
hh_debug = config_files.sibling(__file__, "dil_hh_harmless_debug")

ROWS = ("sft", "dpo", "fdpo", "ipo", "slic", "cpo", "simpo", "dil_lsif", "dil_ukl", "dil_bce")
DIL_ROWS = ("dil_lsif", "dil_ukl", "dil_bce")
PYTHIA = "EleutherAI/pythia-2.8b"
TLDR = "CarperAI/openai_summarize_comparisons"
DATASETS = {  # dataset -> (hub id, hub data_dir, format, train split, eval split)
    "tldr": (TLDR, "", "prompt_chosen_rejected", "train", "test"),
    "hh": ("Anthropic/hh-rlhf", "", "hh_transcripts", "train", "test"),
    "hh_helpful": ("Anthropic/hh-rlhf", "helpful-base", "hh_transcripts", "train", "test"),
    "hh_harmless": ("Anthropic/hh-rlhf", "harmless-base", "hh_transcripts", "train", "test"),
}
# Placeholders for what the paper does not publish (see the docstring): set them yourself.
UNPUBLISHED = {
    "learning_rate": 5e-7,
    "sft_learning_rate": 1e-5,
    "global_batch_size": 64,
    "steps": 2000,
    "sft_steps": 2000,
    "max_length": 512,
    "max_prompt_length": 384,
}


def parse_arg(arg: str) -> tuple[str, str]:
    parts = [p.strip() for p in arg.split(",")] if arg else []
    if len(parts) != 2:
        raise ValueError(f"config argument {arg!r}: expected '<dataset>,<row>'")
    dataset, row = parts
    if dataset not in (*DATASETS, "debug"):
        raise ValueError(f"dataset {dataset!r}: expected one of {(*DATASETS, 'debug')}")
    if row not in ROWS:
        raise ValueError(f"row {row!r}: expected one of {ROWS}")
    return dataset, row


def set_row(config, row: str) -> None:
    config.loss.name = row
    if row in DIL_ROWS:
        config.loss.reduction = "mean"


def with_sft_stage(config, sft_config, row: str):
    """The row trained from the SFT stage (or, for ``sft``, the SFT stage itself)."""
    if row == "sft":
        return sft_config
    config.init.mode = "pretrain"
    config.init.pretrain = sft_config
    return config


def paper_config(dataset: str, row: str):
    hub_id, data_dir, fmt, train_split, eval_split = DATASETS[dataset]
    u = UNPUBLISHED

    def stage(loss: str, lr: float, steps: int):
        config = base.get_config()
        m = config.model
        m.hf_path = PYTHIA
        m.dtype = "bfloat16"
        m.param_dtype = "float32"
        m.remat = True
        d = config.data
        d.source = "hub"
        d.hub_id = hub_id
        d.hub_data_dir = data_dir
        d.format = fmt
        d.train_split = train_split
        d.eval_split = eval_split
        d.tokenizer = PYTHIA
        d.chat_template = "plain"
        d.max_length = u["max_length"]
        d.max_prompt_length = u["max_prompt_length"]
        d.truncation_mode = "keep_end"
        d.buckets = (256, 512)
        d.on_bad_record = "skip"
        d.num_proc = 8
        set_row(config, loss)
        config.reference.mode = "precomputed"
        config.logprobs.seq_chunk = 1024
        config.optim.learning_rate = lr
        config.optim.schedule = "cosine"
        config.optim.warmup_ratio = 0.1
        config.train.steps = steps
        config.train.global_batch_size = u["global_batch_size"]
        config.eval.every_steps = 200
        config.eval.batch_size = u["global_batch_size"]
        config.eval.num_batches = 8
        config.eval.gold_prompts = 0
        config.checkpoint.every_steps = 500
        config.mesh.shape = (1, -1, 1)
        return config

    sft = stage("sft", u["sft_learning_rate"], u["sft_steps"])
    sft.init.mode = "hf"  # pretrained Pythia weights
    sft.eval.every_steps = 0
    return with_sft_stage(stage(row, u["learning_rate"], u["steps"]), sft, row)


def debug_config(row: str):
    def stage(loss: str, steps: int):
        config = hh_debug.get_config()  # HH harmless pairs, GPT-2 tokenizer, debug schedule
        config.data.max_records = 256
        config.data.num_eval = 32
        config.data.max_length = 128
        config.data.max_prompt_length = 96
        config.data.buckets = (128,)
        m = config.model
        m.family = "gpt_neox"
        m.vocab_size = 50257
        m.hidden_size = 32
        m.intermediate_size = 128
        m.num_hidden_layers = 2
        m.num_attention_heads = 4
        m.num_key_value_heads = 4
        m.max_position_embeddings = 128
        set_row(config, loss)
        config.train.steps = steps
        config.optim.learning_rate = 1e-3
        config.eval.every_steps = 3
        return config

    sft = stage("sft", 4)
    sft.eval.every_steps = 0
    return with_sft_stage(stage(row, 6), sft, row)


def get_config(arg: str = "debug,dil_lsif"):
    dataset, row = parse_arg(arg)
    config = debug_config(row) if dataset == "debug" else paper_config(dataset, row)
    assert isinstance(config, ml_collections.ConfigDict)
    return config
