"""TRL's DPOTrainer against dil_jax on the same model, data and batch, alternating in one run.

  pip install -e '.[bench]'      # trl (torch 2.13.0 CPU, as in the test extra)
  python experiments/bench_vs_trl.py --steps=3 --rounds=2                   # fp32, the CPU shape
  python experiments/bench_vs_trl.py --steps=3 --rounds=2 --dtype=bfloat16

The shape of issue 11: a Llama-shaped model (width 256, 4 layers, 8 heads / 4 KV heads, MLP
1024, GPT-2 vocabulary), UltraFeedback pairs (../shared/data) tokenised once with the GPT-2
tokenizer by dil_jax's pipeline (max length 512, prompts cut to their last 256 tokens), 4 pairs
per step, DPO (sigmoid, β = 0.1) with the reference evaluated in the step on both sides.

* Same initial weights: dil_jax initialises the model and exports it with
  ``dil_jax.models.hf.save_pretrained``; TRL loads that directory with ``transformers``.
* Same tokens: TRL's trainer is given the very token ids of dil_jax's pipeline
  (``prompt_ids``/``chosen_ids``/``rejected_ids`` columns, the format its collator reads), so
  neither side tokenises differently; TRL pads each batch to its longest sequence.
* TRL's step is ``DPOTrainer.compute_loss`` + backward + AdamW step, without the HF Trainer
  loop around it (which only adds overhead); bf16 is torch autocast with float32 weights, as
  dil_jax's bf16 compute with float32 master weights.
* dil_jax runs its jitted train step in three layouts: ``padded`` (bucketed, 4 pairs a step),
  ``packed`` and ``packed_shared`` (``--rows`` rows of 512 / 1024 tokens), with the LM head at
  scored positions only (``--score_buckets=8``, the default config) or, for comparison in the
  same run, at every position too (``--score_buckets=8,0``: sides named ``packed/sb8``, ...).

Rounds alternate TRL and each dil_jax layout (``--rounds`` times ``--steps`` timed steps each,
the same steps every round, after a warm-up that compiles every shape and runs the timed steps
once, ``bench_layouts.time_layout``), so machine load hits both alike. Printed: real tokens/s
(both sequences of each pair, the same count for every layout and for TRL) per round and the
median ratio to TRL.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_layouts  # noqa: E402

from dil_jax import sharding, train  # noqa: E402
from dil_jax.data import pipeline  # noqa: E402
from dil_jax.models import hf  # noqa: E402


def trl_side(args, data, model_dir, tokenizer_dir, out_dir):
    """TRL's DPOTrainer on ``data``'s token ids; returns ``step(batch_rows) -> None``."""
    import datasets  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    from trl import DPOConfig, DPOTrainer  # noqa: PLC0415

    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.pad_token = tok.eos_token = "<|endoftext|>"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    text = datasets.Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]})
    config = DPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=args.pairs,
        max_length=args.max_length,
        beta=0.1,
        loss_type=["sigmoid"],
        use_cpu=jax.devices()[0].platform == "cpu",
        report_to=[],
        precompute_ref_log_probs=False,
        learning_rate=1e-5,
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=text, processing_class=tok)
    collator = trainer.data_collator
    model = trainer.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if args.dtype == "bfloat16"
        else contextlib.nullcontext()
    )

    def example(e):
        p = int(data.prompt_lengths[e, 0])
        seq = [
            data.tokens[data.starts[e, j] : data.starts[e, j] + data.lengths[e, j]] for j in (0, 1)
        ]
        return {
            "prompt_ids": seq[0][:p].tolist(),
            "chosen_ids": seq[0][p:].tolist(),
            "rejected_ids": seq[1][int(data.prompt_lengths[e, 1]) :].tolist(),
        }

    def step(rows):
        inputs = collator([example(e) for e in rows])
        with autocast:
            loss = trainer.compute_loss(model, inputs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--max_records", type=int, default=0)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--rows", type=int, default=2, help="rows per packed dil_jax step")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--attention", default="auto")
    p.add_argument("--layouts", default="padded,packed,packed_shared")
    p.add_argument(
        "--seq_chunk",
        type=int,
        default=512,
        help="config.logprobs.seq_chunk (0: full logits, plain autodiff, no head recompute)",
    )
    p.add_argument(
        "--score_buckets",
        default="8",
        help="config.logprobs.score_buckets, comma-separated to time several (0: the LM head at "
        "every position)",
    )
    p.add_argument("--cache_dir", default=str(pathlib.Path(tempfile.gettempdir()) / "dil_bench"))
    args = p.parse_args()
    args.data = "ultrafeedback"

    config = bench_layouts.make_config(args)
    config.loss.name = "dpo"
    config.loss.beta = 0.1
    config.logprobs.seq_chunk = args.seq_chunk
    data, _, _ = pipeline.build_datasets(config)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    buckets = [int(b) for b in args.score_buckets.split(",")]
    trainers = {}
    for b in buckets:
        side_config = config.copy_and_resolve_references()
        side_config.logprobs.score_buckets = b
        trainers[b] = train.Trainer(side_config, mesh=mesh)
    trainer = trainers[buckets[0]]
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_vs_trl_"))
    params = trainer.init_params(jax.random.key(0))
    hf.save_pretrained(
        params, "llama", trainer.model.config, work / "model", tokenizer_dir=config.data.tokenizer
    )

    trl_step = trl_side(args, data, work / "model", config.data.tokenizer, work / "trl")
    order = np.random.default_rng(0).permutation(len(data))
    trl_batches = [order[i : i + args.pairs] for i in range(0, len(order), args.pairs)]

    def trl_round():
        # The same batches every round, as time_layout times the same steps for dil_jax: the
        # ratio then moves with machine load only, not with which pairs a round happened to draw.
        trl_step(trl_batches[0])  # warm-up / allocator
        rows = trl_batches[1 : 1 + args.steps]
        t0 = time.perf_counter()
        for r in rows:
            trl_step(r)
        elapsed = time.perf_counter() - t0
        return sum(int(data.lengths[r].sum()) for r in rows) / elapsed

    ours = {}  # side name -> (trainer, layout data, batch size)
    for name in args.layouts.split(","):
        packing, shared, layout_buckets = bench_layouts.LAYOUTS[name]
        d = bench_layouts.layout_data(data, packing, shared, layout_buckets)
        for b, t in trainers.items():
            side = name if len(trainers) == 1 else f"{name}/sb{b}"
            ours[side] = (t, d, args.rows if packing else args.pairs)

    print(
        f"UltraFeedback {len(data)} pairs, max_length {args.max_length}, {args.pairs} pairs/step "
        f"(packed: {args.rows} rows), width {args.width} x {args.layers}, {args.dtype}, "
        f"{jax.devices()[0].device_kind}"
    )
    rates = {"trl": []} | {name: [] for name in ours}
    for r in range(args.rounds):
        rates["trl"].append(trl_round())
        print(f"round {r}: trl {rates['trl'][-1]:8.0f} tok/s", flush=True)
        for name, (t, d, batch_size) in ours.items():
            _, tok_s, _ = bench_layouts.time_layout(t, d, batch_size, args.steps)
            rates[name].append(tok_s)
            print(f"round {r}: {name} {tok_s:8.0f} tok/s", flush=True)
    base = statistics.median(rates["trl"])
    print(f"{'side':16s} {'median tok/s':>13s} {'x TRL':>7s}")
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"{name:16s} {med:13.0f} {med / base:7.2f}")


if __name__ == "__main__":
    main()
