"""Scale check by compilation: per-device memory of the DIL train step at published model sizes.

  python experiments/scale_check.py                        # every (model, mesh) case below
  python experiments/scale_check.py --cases llama3_8b      # some of them
  python experiments/scale_check.py --cases llama3_8b --param_dtype bfloat16 --reference precomputed

No weights are materialised: the train state, batch and reference are `jax.ShapeDtypeStruct`s
carrying their shardings, the step is lowered and compiled ahead of time
(`trainer.train_step.lower(state, batch, ref).compile()`), and `compiled.memory_analysis()`
gives per-device argument, output, alias and temporary bytes of the SPMD-partitioned program.
Each (model, mesh) runs in its own subprocess because the simulated device count
(`XLA_FLAGS=--xla_force_host_platform_device_count=N JAX_PLATFORMS=cpu`) must be set before
jax is imported.

The step measured is the real one (`dil_jax.train.train_step`): DIL-LSIF on chosen/rejected
pairs at sequence 2048, policy forward+backward, the frozen reference forward inside the step
(`--reference inline`, its params an extra sharded argument) or read from the batch
(`--reference precomputed`), AdamW with global-norm clipping, gradients accumulated in float32.
Defaults: bfloat16 compute with float32 master weights (so Adam moments are float32 too: optax
keeps them in the params' dtype), remat of every layer, scanned layers, log-prob chunking
(seq 512 x vocab 16384), a pure FSDP mesh (1, N, 1), one preference pair (two sequences) per
device.

Targets: Llama-3-8B fits 16 GiB/device on 16 devices (TPU v5e-16); Llama-3-70B fits 95 GiB/device
on 64 devices (TPU v5p-64 chips). The other models are checked on the v5e-16 setup.

Caveats: this is XLA:CPU's buffer assignment; TPU's differs in detail (layouts, fusion, its own
rematerialisation), and CPU may keep float32 copies around bfloat16 dots. "total" is
argument + output - alias + temp, the bytes live at the peak of the step as XLA plans them;
it excludes the compiled code and the runtime's own reserve.

Measured at commit c482616 (XLA:CPU, GiB per device, seq 2048, one pair per device):

  model        params  mesh     reference    args   temp  total  target
  llama3_8b     8.03B  1x16x1   inline       7.48   8.53  16.01  16  (over by 0.01)
  llama3_8b     8.03B  1x16x1   precomputed  5.61   8.53  14.14  16  fits
  mistral_7b    7.25B  1x16x1   inline       6.75   8.39  15.14  16  fits
  pythia_2_8b   2.78B  1x16x1   inline       2.60   7.17   9.77  16  fits
  gemma_2b      2.51B  1x16x1   inline       2.34   3.87   6.21  16  fits
  llama3_70b   70.55B  1x64x1   inline      16.45  25.28  41.73  95  fits

LoRA / QLoRA rows (``--param_dtype bfloat16 --cases llama3_8b_lora_1x16,...``; rank 16 on all
seven projections of every layer, 42M float32 adapters + Adam moments; the frozen base in
bfloat16 or NF4 is the step's reference argument, the reference = the base with adapters off),
XLA:CPU, GiB per device, seq 2048:

  case                  base  mesh    pairs  args   temp   total  target
  llama3_8b_lora_1x16   bf16  1x1x1   1     15.43  34.31  49.73  16  NO
  llama3_8b_qlora_1x16  nf4   1x1x1   1      6.08   8.31  14.39  16  fits
  llama3_8b_lora_1x80   bf16  1x1x1   4     15.43  54.62  70.05  80  fits
  llama3_8b_qlora_1x80  nf4   1x1x1   4      6.08  28.62  34.71  80  fits
  llama3_8b_lora_8x16   bf16  1x8x1   8      2.34   9.97  12.31  16  fits
  llama3_8b_qlora_8x16  nf4   1x8x1   8      1.17   6.72   7.89  16  fits

The bf16 base alone (15 GiB) rules out one 16 GiB device; its 34 GiB of temporaries on one
device (against 8.3 GiB with NF4, which is dequantised one layer at a time inside the layer
scan) are consistent with XLA:CPU holding float32 copies of the bfloat16 kernels (8B x 4 bytes
= 30 GiB; the caveat above), not verified on an accelerator.

The largest temporaries are the float32 attention scores/probabilities [B, K, G, T, S] (1 GiB
each at T = 2048 for 32 heads, several live in the backward pass) and the gathered float32
layer weights; without remat Llama-3-8B needs 137 GiB.

With ``--attention chunked`` (``config.model.attention``: the same einsum over blocks of 512
queries, each block recomputed in the backward pass, so one block's scores are live; 'auto'
picks it on TPU) the inline-reference 8B fits (issue 11):

  python experiments/scale_check.py --cases llama3_8b --attention chunked
  python experiments/scale_check.py --cases llama3_70b --attention chunked

  model        params  mesh     reference    args   temp  total  target
  llama3_8b     8.03B  1x16x1   inline       7.48   6.42  13.91  16  fits (2.1 GiB spare)
  llama3_70b   70.55B  1x64x1   inline      16.45  21.70  38.14  95  fits

70B plan: FSDP over 64 chips of 95 GiB (v5p-64), one pair per chip at T = 2048, inline
reference (a second sharded copy of the params), remat, chunked attention:
38.1 GiB per chip as compiled above. Its float32 params, gradients and two Adam moments are
16 bytes per parameter (1.13 TB), so 16 GiB chips would need more than 66 of them before any
activation; the 64 x 95 GiB mesh is the plan.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB = 2**30

# Published config.json values (Hugging Face hub), architecture fields only.
HF_CONFIGS = {
    "llama3_8b": {  # meta-llama/Meta-Llama-3-8B
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    "llama3_70b": {  # meta-llama/Meta-Llama-3-70B
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    "mistral_7b": {  # mistralai/Mistral-7B-v0.3 (v0.1: vocab 32000, theta 1e4, window 4096)
        "model_type": "mistral",
        "vocab_size": 32768,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "pythia_2_8b": {  # EleutherAI/pythia-2.8b
        "model_type": "gpt_neox",
        "vocab_size": 50304,
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "rotary_pct": 0.25,
        "rotary_emb_base": 10000,
        "max_position_embeddings": 2048,
        "layer_norm_eps": 1e-5,
        "hidden_act": "gelu",
        "use_parallel_residual": True,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    "gemma_2b": {  # google/gemma-2b
        "model_type": "gemma",
        "vocab_size": 256000,
        "hidden_size": 2048,
        "intermediate_size": 16384,
        "num_hidden_layers": 18,
        "num_attention_heads": 8,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "hidden_act": "gelu",
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
    },
}

# name -> (model, devices, per-device target GiB, hardware the target stands for[, Setup
# overrides]). The LoRA rows: rank-16 adapters on every attention and MLP projection, the base
# frozen in bfloat16 ('bf16') or NF4 (QLoRA, block 64), adapters and Adam moments float32.
LORA_BF16 = {"lora": "bf16", "param_dtype": "bfloat16"}
LORA_NF4 = {"lora": "nf4", "param_dtype": "bfloat16"}
CASES = {
    "llama3_8b": ("llama3_8b", 16, 16.0, "v5e-16"),
    "mistral_7b": ("mistral_7b", 16, 16.0, "v5e-16"),
    "pythia_2_8b": ("pythia_2_8b", 16, 16.0, "v5e-16"),
    "gemma_2b": ("gemma_2b", 16, 16.0, "v5e-16"),
    "llama3_70b": ("llama3_70b", 64, 95.0, "v5p-64"),
    "llama3_8b_lora_1x16": ("llama3_8b", 1, 16.0, "1x16 GiB", LORA_BF16),
    "llama3_8b_qlora_1x16": ("llama3_8b", 1, 16.0, "1x16 GiB", LORA_NF4),
    "llama3_8b_lora_1x80": ("llama3_8b", 1, 80.0, "1x80 GiB", {**LORA_BF16, "pairs_per_device": 4}),
    "llama3_8b_qlora_1x80": ("llama3_8b", 1, 80.0, "1x80 GiB", {**LORA_NF4, "pairs_per_device": 4}),
    "llama3_8b_lora_8x16": ("llama3_8b", 8, 16.0, "8x16 GiB", LORA_BF16),
    "llama3_8b_qlora_8x16": ("llama3_8b", 8, 16.0, "8x16 GiB", LORA_NF4),
}
DEFAULT_CASES = ("llama3_8b", "mistral_7b", "pythia_2_8b", "gemma_2b", "llama3_70b")


@dataclasses.dataclass
class Setup:
    """One compiled step: the model, the mesh and the memory levers."""

    model: str
    devices: int
    seq: int = 2048
    pairs_per_device: int = 1  # preference pairs (2 sequences each) per device per micro-batch
    grad_accum: int = 1
    dtype: str = "bfloat16"  # compute
    param_dtype: str = "float32"  # master weights (and, through optax, the Adam moments)
    remat: bool = True
    reference: str = "inline"  # 'inline' (params in the step) | 'precomputed' (log-probs in batch)
    seq_chunk: int = 512
    vocab_chunk: int = 16384
    mesh: tuple[int, int, int] | None = None  # default (1, devices, 1): pure FSDP
    num_layers: int | None = None  # override (cheap tests: a full-width model with few layers)
    attention: str = "xla"  # config.model.attention ('chunked': one query block's scores live)
    lora: str = ""  # '' full fine-tuning | 'bf16' LoRA on the param_dtype base | 'nf4' QLoRA
    lora_rank: int = 16


# ----------------------------------------------------------------------------- in the worker


def build_config(setup: Setup, hf_dir: str):
    """configs/base.py with the published architecture as `model.hf_path` (a config.json dir).

    The architecture goes through dil_jax's own HF config mapping (`models.hf.load_config`),
    exactly as for a downloaded checkpoint; only the file is written here.
    """
    from dil_jax import config_files  # noqa: PLC0415 (jax is imported after XLA_FLAGS is set)
    from dil_jax.models import HF_MODEL_TYPES  # noqa: PLC0415

    hf_config = dict(HF_CONFIGS[setup.model])
    if setup.num_layers is not None:
        hf_config["num_hidden_layers"] = setup.num_layers
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(hf_config, f)
    config = config_files.load(REPO / "configs" / "base.py").get_config()
    config.model.family = HF_MODEL_TYPES[hf_config["model_type"]]
    config.model.hf_path = hf_dir
    config.model.max_position_embeddings = setup.seq
    config.model.dtype = setup.dtype
    config.model.param_dtype = setup.param_dtype
    config.model.remat = setup.remat
    config.model.scan_layers = True
    config.model.attention = setup.attention
    config.loss.name = "dil_lsif"
    config.reference.mode = setup.reference
    config.logprobs.seq_chunk = setup.seq_chunk
    config.logprobs.vocab_chunk = setup.vocab_chunk
    config.optim.grad_accum_steps = setup.grad_accum
    config.mesh.shape = setup.mesh or (1, setup.devices, 1)
    dp = config.mesh.shape[0] * config.mesh.shape[1]
    config.train.global_batch_size = dp * setup.pairs_per_device * setup.grad_accum
    config.reference.batch_size = dp
    config.eval.every_steps = 0
    if setup.lora:
        config.lora.enabled = True
        config.lora.rank = setup.lora_rank
        config.lora.alpha = 2.0 * setup.lora_rank
        config.lora.quantize = "nf4" if setup.lora == "nf4" else "none"
    return config


def measure(setup: Setup) -> dict:
    """Lowers and compiles the train step on abstract inputs; returns its memory analysis."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from jax.sharding import NamedSharding  # noqa: PLC0415

    from dil_jax import sharding, train  # noqa: PLC0415

    if len(jax.devices()) != setup.devices:
        raise RuntimeError(
            f"expected {setup.devices} devices, jax sees {len(jax.devices())}: set "
            "XLA_FLAGS before jax is imported (use run_case)"
        )
    with tempfile.TemporaryDirectory() as hf_dir:
        config = build_config(setup, hf_dir)
        trainer = train.Trainer(config)  # reads config.json here, builds nothing big

    def sds(a, s):
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)

    state = jax.tree.map(sds, trainer.abstract_state, trainer.state_sharding)
    # The frozen reference is a step argument only in inline mode (None otherwise).
    ref = trainer.abstract_params() if trainer.reference_inline else None
    if trainer.adapted is not None:  # LoRA: the frozen (quantised) base is the step's argument
        ref = jax.tree.map(sds, trainer.adapted.abstract_base, trainer.base_sharding)
    b, t = config.train.global_batch_size, setup.seq
    batch_sharding = {r: NamedSharding(trainer.mesh, sharding.batch_spec(r)) for r in (2, 3)}
    batch = {
        k: jax.ShapeDtypeStruct((b, 2, t), jnp.int32, sharding=batch_sharding[3])
        for k in ("input_ids", "attention_mask", "loss_mask")
    }
    if setup.reference == "precomputed":
        batch["ref_logps"] = jax.ShapeDtypeStruct((b, 2), jnp.float32, sharding=batch_sharding[2])

    t0 = time.perf_counter()
    with jax.set_mesh(trainer.mesh):
        lowered = trainer.train_step.lower(state, batch, ref)
        compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params)))
    param_bytes = int(
        sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state.params))
    )
    state_bytes = int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state)))
    base_bytes = 0
    if ref is not None:
        base_bytes = int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(ref)))
    out = {
        "setup": dataclasses.asdict(setup),
        "base_bytes_per_device": base_bytes / setup.devices,
        "family": config.model.family,
        "mesh": list(trainer.mesh.devices.shape),
        "global_batch": b,
        "n_params": n_params,
        "state_bytes_per_device": state_bytes / setup.devices,
        "param_bytes_per_device": param_bytes / setup.devices,
        "argument": ma.argument_size_in_bytes,
        "output": ma.output_size_in_bytes,
        "alias": ma.alias_size_in_bytes,
        "temp": ma.temp_size_in_bytes,
        "code": ma.generated_code_size_in_bytes,
        "compile_s": compile_s,
    }
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


# ----------------------------------------------------------------------------- in the parent


def run_case(setup: Setup, timeout: float | None = None) -> dict:
    """`measure(setup)` in a fresh interpreter with `setup.devices` simulated CPU devices.

    Returns the measurement, or {'setup': ..., 'error': last lines of stderr} on failure.
    """
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={setup.devices}",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [
        sys.executable,
        str(pathlib.Path(__file__).resolve()),
        "--worker",
        json.dumps(dataclasses.asdict(setup)),
    ]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"setup": dataclasses.asdict(setup), "error": f"timed out after {timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = "\n".join(proc.stderr.strip().splitlines()[-6:])
    return {"setup": dataclasses.asdict(setup), "error": tail or f"exit {proc.returncode}"}


def _gib(x: float) -> str:
    return f"{x / GIB:7.2f}"


def format_table(rows: list[tuple[dict, float, str]]) -> str:
    head = (
        f"{'model':<12} {'family':<9} {'params':>7} {'mesh':<10} {'batch':>5} {'levers':<36} "
        f"{'args':>7} {'out':>7} {'alias':>7} {'temp':>7} {'total':>7} {'target':>7}  "
        f"{'fits':<4} {'compile':>7}"
    )
    lines = [head, "-" * len(head)]
    for r, target, _ in rows:
        s = r["setup"]
        levers = (
            f"{s['param_dtype'][:4]}/{s['dtype'][:4]} ref={s['reference'][:6]}"
            + (f" acc{s['grad_accum']}" if s["grad_accum"] > 1 else "")
            + ("" if s["remat"] else " noremat")
            + (f" {s['attention']}" if s.get("attention", "xla") != "xla" else "")
            + (f" lora{s.get('lora_rank', '')}:{s['lora']}" if s.get("lora") else "")
        )
        if "error" in r:
            lines.append(
                f"{s['model']:<12} {'':<9} {'':>7} {'x'.join([str(s['devices'])]):<10} "
                f"{'':>5} {levers:<36} FAILED: {r['error'].splitlines()[-1][:90]}"
            )
            continue
        lines.append(
            f"{s['model']:<12} {r['family']:<9} {r['n_params'] / 1e9:6.2f}B "
            f"{'x'.join(map(str, r['mesh'])):<10} {r['global_batch']:>5} {levers:<36} "
            f"{_gib(r['argument'])} {_gib(r['output'])} {_gib(r['alias'])} {_gib(r['temp'])} "
            f"{_gib(r['total'])} {target:7.1f}  {'yes' if r['total'] <= target * GIB else 'NO':<4} "
            f"{r['compile_s']:6.0f}s"
        )
    lines.append(
        "GiB per device; mesh (data x fsdp x tensor); batch = preference pairs per step "
        f"(2 sequences each) at seq {rows[0][0]['setup']['seq'] if rows else ''}; "
        "total = args + out - alias + temp; target hardware: "
        + ", ".join(sorted({f"{t:.0f} GiB {hw}" for _, t, hw in rows}))
    )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--cases", default=",".join(DEFAULT_CASES), help=f"comma list of {sorted(CASES)}"
    )
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--pairs_per_device", type=int, default=1)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--param_dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--reference", default="inline", choices=["inline", "precomputed"])
    p.add_argument("--no_remat", action="store_true")
    p.add_argument("--attention", default="xla", help="config.model.attention (e.g. chunked)")
    p.add_argument("--json", default="", help="also write the raw measurements here")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:  # inside the subprocess: XLA_FLAGS is already set
        result = measure(
            Setup(
                **{
                    k: (tuple(v) if k == "mesh" and v else v)
                    for k, v in json.loads(args.worker).items()
                }
            )
        )
        print("RESULT " + json.dumps(result), flush=True)
        return

    rows = []
    for name in args.cases.split(","):
        model, devices, target, hw, *extra = CASES[name]
        fields = dict(
            model=model,
            devices=devices,
            seq=args.seq,
            pairs_per_device=args.pairs_per_device,
            grad_accum=args.grad_accum,
            param_dtype=args.param_dtype,
            reference=args.reference,
            remat=not args.no_remat,
            attention=args.attention,
        )
        setup = Setup(**{**fields, **(extra[0] if extra else {})})
        print(f"compiling {name} on {devices} simulated devices ...", file=sys.stderr, flush=True)
        rows.append((run_case(setup), target, hw))
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r for r, _, _ in rows], f, indent=2)


if __name__ == "__main__":
    main()
