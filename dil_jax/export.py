"""Export a run's checkpoint as a Hugging Face model directory.

  python -m dil_jax.export --workdir=/tmp/run --out=/tmp/run_hf [--step=N] \
      [--tokenizer=<dir or hub id>] [--dtype=bfloat16]

The checkpoint explains itself (``checkpoints/<step>/meta`` holds the run's full config), so
the model is rebuilt from ``config.model`` alone; its params are restored sharded over all
local devices (fsdp) and written with ``hf.save_pretrained`` one param at a time. When the run
started from Hugging Face weights (``config.model.hf_path``), the architecture is that model's
config.json and its tokenizer and chat template are copied by default. The result loads with
``transformers.AutoModelForCausalLM.from_pretrained(out)``.
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

from dil_jax import checkpointing, sharding
from dil_jax.models import build_model, hf


def read_meta(workdir: str, step: int | None = None) -> dict:
    """The ``meta`` item (step, data state, config dict) of the latest or given checkpoint."""
    directory = checkpointing.checkpoint_dir(workdir)
    manager = ocp.CheckpointManager(directory, item_names=("params", "opt_state", "meta"))
    try:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise FileNotFoundError(f"no checkpoint {'' if step is None else step} in "
                                    f"{directory} (steps: {list(manager.all_steps())})")
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    finally:
        manager.close()


def export(workdir: str, out_dir: str, *, step: int | None = None, tokenizer: str | None = None,
           dtype: str | None = None, max_shard_bytes: int = 2**31) -> pathlib.Path:
    """Write the params of ``workdir``'s latest (or ``step``'s) checkpoint as a HF directory.

    Args:
      workdir: the run directory (``checkpoints/`` inside).
      out_dir: where to write config.json, safetensors, tokenizer files.
      step: checkpoint step; default the latest.
      tokenizer: HF directory or hub id to copy tokenizer files and chat template from;
        default ``config.model.hf_path`` when the run has one, else none.
      dtype: storage dtype ('bfloat16', 'float16', 'float32'); default the params' own.
    """
    meta = read_meta(workdir, step)
    model_cfg = ConfigDict(meta["config"]["model"])
    module, family = build_model(model_cfg)
    hf_path = model_cfg.get("hf_path") or None
    # Shard over every local device (fsdp) so no device needs the whole model.
    mesh = sharding.make_mesh((1, -1, 1))
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0),
                                                  jnp.zeros((1, 1), jnp.int32)))["params"]
    specs = sharding.match_partition_rules(family.partition_rules(), abstract, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, sharding.shardings_from_specs(mesh, specs))
    params = checkpointing.load_params(workdir, target, meta["step"])
    return hf.save_pretrained(params, model_cfg.family, module.config, out_dir,
                              tokenizer_dir=tokenizer or hf_path, dtype=dtype,
                              max_shard_bytes=max_shard_bytes)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dil_jax.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="run directory with checkpoints/")
    parser.add_argument("--out", required=True, help="output Hugging Face model directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (latest)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory or hub id (default: config.model.hf_path)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="storage dtype (default: the params' own)")
    parser.add_argument("--max_shard_bytes", type=int, default=2**31)
    args = parser.parse_args(argv)
    out = export(args.workdir, args.out, step=args.step, tokenizer=args.tokenizer,
                 dtype=args.dtype, max_shard_bytes=args.max_shard_bytes)
    if jax.process_index() == 0:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
