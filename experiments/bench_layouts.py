"""Batch layouts on real pairs: padding, model FLOPs per pair and measured pairs/s, in one run.

  python experiments/bench_layouts.py --data=ultrafeedback --max_length=512 --steps=4
  python experiments/bench_layouts.py --data=hh --max_length=512 --steps=4
  python experiments/bench_layouts.py --data=ultrafeedback --max_length=1024 --steps=0  # padding

For each layout of ``dil_jax.data.batching`` (padded to max_length, bucketed, packed,
prefix-shared, packed + prefix-shared) the same tokenised pairs (GPT-2 tokenizer, ../shared/data)
go through the DIL-LSIF train step (inline reference) of a Llama-shaped model (width 256, 4
layers, GPT-2 vocabulary; ``--width``/``--layers`` change it). Printed per layout:

* ``pad``: padding fraction over one epoch's batches (``pipeline.padding_stats``);
* ``GFLOP/pair``: model FLOPs of a step per pair (``dil_jax.flops``: real tokens, attention at the
  layout's mask density; prefix sharing computes each prompt once), over a whole epoch's plan;
* ``pairs/s`` and ``pair tok/s`` (the tokens of both sequences of the pairs, counted as in the
  padded layout, so layouts compare on equal terms), timed over ``--steps`` steps after every
  shape has compiled, and their ratio to the padded layout;
* ``mfu``: FLOPs / time / the matmul peak (``flops.device_peak``; on a CPU measured again
  after each layout's timing and the highest reading used for every row, since one slow
  reading would inflate the ratios; printed once every layout is timed).

HH's dialogue prompts are long and shared by both replies, which is where prefix sharing saves
most. Rows: bucketed layouts take ``--pairs`` pairs per step, packed ones ``--rows`` rows of
``max_length`` (prefix-shared: ``2 · max_length``) tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from dil_jax import config_files, flops, sharding, train  # noqa: E402
from dil_jax.data import pipeline  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DATA = {
    "ultrafeedback": (
        "prompt_chosen_rejected",
        SHARED / "ultrafeedback-binarized-subset" / "train_clean.jsonl.gz",
    ),
    "hh": ("hh_transcripts", SHARED / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"),
}
# name -> (packing, prefix_sharing, buckets: () = padded to max_length, None = the config's)
LAYOUTS = {
    "padded": (False, False, ()),
    "bucketed": (False, False, None),
    "packed": (True, False, ()),
    "shared": (False, True, None),
    "packed_shared": (True, True, ()),
}


def make_config(args, buckets=None):
    config = config_files.load(REPO / "configs" / "base.py").get_config()
    d = config.data
    d.source, (d.format, path) = "files", DATA[args.data]
    d.train_files = (str(path),)
    d.tokenizer = str(SHARED / "tokenizers" / "gpt2")
    d.eos_token = "<|endoftext|>"
    d.chat_template = "plain"
    d.max_length = args.max_length
    d.max_prompt_length = args.max_length // 2
    d.buckets = tuple(b for b in (128, 256, 512, 1024) if b < args.max_length)
    if buckets is not None:
        d.buckets = buckets
    d.num_eval = 0
    d.on_bad_record = "skip"
    d.max_records = args.max_records
    d.cache_dir = args.cache_dir
    m = config.model
    m.update(
        vocab_size=50257,
        hidden_size=args.width,
        intermediate_size=4 * args.width,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2 * args.max_length,
        dtype=args.dtype,
        attention=args.attention,
    )
    config.loss.name = "dil_lsif"
    config.logprobs.seq_chunk = 512  # no [rows, T, 50257] logits
    config.mesh.shape = (1, 1, 1)
    config.eval.every_steps = 0
    config.train.global_batch_size = args.pairs
    return config


def layout_data(data, packing, shared, buckets):
    data = dataclasses.replace(data, packing=packing, prefix_sharing=shared, _shared_lengths=None)
    if buckets is not None:
        data.buckets = pipeline.normalise_buckets(buckets, data.buckets[-1])
    return data


def epoch_flops_per_pair(trainer, data, batch_size):
    it = pipeline.make_iterator(data, batch_size, seed=0)
    total, pairs = 0.0, 0
    for _ in range(it.batches_per_epoch):
        batch = next(it)
        total += trainer.step_flops(batch)
        pairs += int(np.sum(np.asarray(batch["example_id"]) >= 0))
    return total / max(pairs, 1)


def pair_tokens(data, batch):
    ids = np.asarray(batch["example_id"]).reshape(-1)
    rows = np.searchsorted(data.example_id, ids[ids >= 0])  # example_id is sorted (record order)
    return int(data.lengths[rows].sum()), len(rows)


def time_layout(trainer, data, batch_size, steps):
    """Compiles every shape the layout uses, runs the ``steps`` steps once untimed (first use
    of each buffer size, and of each of the head's scored-position sizes, costs page faults
    that a long run pays once), then times them (one sync at the end)."""
    it = pipeline.make_iterator(data, batch_size, seed=0)
    state = trainer.init_state(0)
    ref = trainer.init_state(0).params
    seen = set()
    for _ in range(it.batches_per_epoch):  # warm-up: one step per shape
        batch = next(it)
        shape = batch["input_ids"].shape
        if shape not in seen:
            seen.add(shape)
            state, metrics = trainer.run_step(state, batch, ref)
            jax.block_until_ready(metrics)
    batches = [next(it) for _ in range(steps)]
    for batch in batches:
        state, metrics = trainer.run_step(state, batch, ref)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for batch in batches:
        state, metrics = trainer.run_step(state, batch, ref)
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - t0
    tokens = pairs = 0
    fl = 0.0
    for batch in batches:
        t, p = pair_tokens(data, batch)
        tokens, pairs, fl = tokens + t, pairs + p, fl + trainer.step_flops(batch)
    return pairs / elapsed, tokens / elapsed, fl / elapsed


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="ultrafeedback", choices=sorted(DATA))
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--max_records", type=int, default=0, help="0: the whole file")
    p.add_argument("--pairs", type=int, default=4, help="pairs per step, bucketed layouts")
    p.add_argument("--rows", type=int, default=0, help="rows per packed step (0: --pairs)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per layout (0: no timing)")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--attention", default="auto")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--cache_dir", default=str(pathlib.Path(tempfile.gettempdir()) / "dil_bench"))
    args = p.parse_args()

    base_config = make_config(args)
    data, _, _ = pipeline.build_datasets(base_config)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    trainer = train.Trainer(base_config, mesh=mesh)
    peak, source = flops.device_peak(args.dtype)
    print(
        f"{args.data}: {len(data)} pairs, max_length {args.max_length}, model width "
        f"{args.width} x {args.layers} layers ({args.dtype}, attention {args.attention}), "
        f"{jax.devices()[0].device_kind}; peak {peak:.3e} FLOP/s ({source})"
    )
    print(
        f"{'layout':14s} {'pad':>6s} {'GFLOP/pair':>11s} {'pairs/s':>8s} {'pair tok/s':>11s} "
        f"{'vs padded':>9s} {'mfu':>6s}"
    )
    first = None
    lines, rates = [], []  # rates: achieved FLOP/s per timed layout, for the mfu column
    cpu = jax.devices()[0].platform == "cpu"
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    for name in args.layouts.split(","):
        packing, shared, buckets = LAYOUTS[name]
        d = layout_data(data, packing, shared, buckets)
        batch_size = (args.rows or args.pairs) if packing else args.pairs
        epoch = pipeline.make_iterator(d, batch_size, seed=0).batches_per_epoch
        stats = pipeline.padding_stats(d, batch_size, epoch, seed=0)  # one whole epoch
        per_pair = epoch_flops_per_pair(trainer, d, batch_size)
        line = f"{name:14s} {stats['padding_fraction']:6.3f} {per_pair / 1e9:11.2f}"
        if args.steps:
            pairs_s, tok_s, flop_s = time_layout(trainer, d, batch_size, args.steps)
            if cpu:  # the peak again, next to each timing: keep the highest reading
                peak = max(peak, flops.matmul_peak(dtype))
            first = first or tok_s
            line += f" {pairs_s:8.2f} {tok_s:11.0f} {tok_s / first:9.2f}"
            rates.append(flop_s)
        lines.append(line)
        print(f"measured {name}", file=sys.stderr, flush=True)
    for i, line in enumerate(lines):
        print(line + (f" {rates[i] / peak:6.3f}" if rates else ""))
    if rates:
        print(f"mfu: achieved FLOP/s over the highest peak reading, {peak:.3e} FLOP/s")


if __name__ == "__main__":
    main()
