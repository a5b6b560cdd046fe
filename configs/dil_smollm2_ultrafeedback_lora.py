"""LoRA (or QLoRA) DIL-LSIF on the UltraFeedback subset from SmolLM2-135M-Instruct.

The LoRA variant of configs/dil_smollm2_ultrafeedback.py (same real model, data, loss and
precomputed reference): rank-16 adapters (alpha 32) on every attention and MLP projection of the
frozen model, trained at 1e-4 (a LoRA update needs a larger step than full fine-tuning's 1e-6).
The reference is the base model with the adapters off; checkpoints hold only the adapters.

  python -m dil_jax.models.gguf --smollm2 runs/smollm2_hf       # once (README)
  python -m dil_jax.main --config=configs/dil_smollm2_ultrafeedback_lora.py \\
      --workdir=runs/smollm2_lora
  # QLoRA: the frozen base stored as NF4 (4-bit NormalFloat, blocks of 64)
  python -m dil_jax.main --config=configs/dil_smollm2_ultrafeedback_lora.py \\
      --workdir=runs/smollm2_qlora --config.lora.quantize=nf4
  # the adapters as a PEFT directory, or merged into a full HF model
  python -m dil_jax.export --workdir=runs/smollm2_lora --out=runs/smollm2_lora_peft --adapter
  python -m dil_jax.export --workdir=runs/smollm2_lora --out=runs/smollm2_lora_merged

A short CPU run and the held-out preference accuracy before/after it:
``python experiments/lora_claims.py --part=smollm2`` (README "LoRA and QLoRA").
Another converted directory: ``--config=configs/dil_smollm2_ultrafeedback_lora.py:/path/to/hf``.
"""

from dil_jax import config_files

smollm2 = config_files.sibling(__file__, "dil_smollm2_ultrafeedback")


def get_config(hf_dir: str = ""):
    config = smollm2.get_config(hf_dir)
    lo = config.lora
    lo.enabled = True
    lo.rank = 16
    lo.alpha = 32.0
    lo.dropout = 0.05
    lo.targets = (r"self_attn/(q|k|v|o)_proj/kernel$", r"mlp/(gate|up|down)_proj/kernel$")
    config.optim.learning_rate = 1e-4
    config.optim.weight_decay = 0.0
    return config
