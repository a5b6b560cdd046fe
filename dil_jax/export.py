"""Export a run's checkpoint as a Hugging Face model directory.

  python -m dil_jax.export --workdir=/tmp/run --out=/tmp/run_hf [--step=N] \
      [--tokenizer=<dir or hub id>] [--dtype=bfloat16] [--adapter]

A LoRA / QLoRA run (``config.lora.enabled``) checkpoints only its adapters. By default they are
merged into the base (``W + (alpha / r) A B``, a quantised base dequantised first, so the
export is the model that was trained) and written as a full HF model; ``--adapter`` writes a
PEFT directory instead (``adapter_config.json``, ``adapter_model.safetensors``) that
``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)`` loads. A
merged export checks the base it loads against the fingerprint recorded in the checkpoint.

``--dtype`` defaults to the training dtype (``config.model.param_dtype``, the stored params'):
a preference run's updates are small (learning rates near 1e-6), and in a lower precision many
of them round away. Exporting below the training precision therefore warns with the fraction
of weights that are bit-identical to the run's base (its initial params, per ``config.init``)
in the exported dtype.

The checkpoint explains itself (``checkpoints/<step>/meta`` holds the run's full config), so
the model is rebuilt from ``config.model`` alone; its params are restored sharded over all
local devices (fsdp) and written with ``hf.save_pretrained`` one param at a time. When the run
started from Hugging Face weights (``config.model.hf_path``), the architecture is that model's
config.json and its tokenizer and chat template are copied by default. The result loads with
``transformers.AutoModelForCausalLM.from_pretrained(out)``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import pathlib
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from dil_jax import checkpointing, lora, paths, reference, sharding
from dil_jax.errors import CheckpointError
from dil_jax.models import build_model, get_family, hf
from dil_jax.runtime import exit_on_bad_input


def read_meta(workdir: str, step: int | None = None) -> dict:
    """The ``meta`` item (step, data state, config dict) of the newest whole or given checkpoint;
    damaged steps are skipped (CheckpointError when none is whole)."""
    return checkpointing.read_meta(workdir, step)


def export(
    workdir: str,
    out_dir: str,
    *,
    step: int | None = None,
    tokenizer: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 2**31,
    adapter: bool = False,
) -> pathlib.Path | str:
    """Write the params of ``workdir``'s latest (or ``step``'s) checkpoint as a HF directory.

    Args:
      workdir: the run directory (``checkpoints/`` inside).
      out_dir: where to write config.json, safetensors, tokenizer files.
      step: checkpoint step; default the latest.
      tokenizer: HF directory or hub id to copy tokenizer files and chat template from;
        default ``config.model.hf_path`` when the run has one, else none.
      dtype: storage dtype ('bfloat16', 'float16', 'float32'); default the training dtype
        (``config.model.param_dtype``). Below it, a warning gives the fraction of weights left
        bit-identical to the base.
      adapter: a LoRA run's adapters as a PEFT directory instead of a merged model.
    """
    meta = read_meta(workdir, step)
    model_cfg = ConfigDict(meta["config"]["model"])
    module, family = build_model(model_cfg)
    hf_path = model_cfg.get("hf_path") or None
    # Shard over every local device (fsdp) so no device needs the whole model.
    mesh = sharding.make_mesh((1, -1, 1))
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))[
        "params"
    ]
    specs = sharding.match_partition_rules(family.partition_rules(), abstract, mesh)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract,
        sharding.shardings_from_specs(mesh, specs),
    )
    settings = lora.settings_from_config(ConfigDict(meta["config"].get("lora", {})))
    if settings is not None:
        return _export_lora(
            meta,
            settings,
            module,
            mesh,
            target,
            workdir,
            out_dir,
            adapter,
            dtype,
            tokenizer or hf_path,
            max_shard_bytes,
        )
    if adapter:
        raise CheckpointError(
            f"--adapter: {workdir} is not a LoRA run (its config.lora.enabled is false)"
        )
    params = checkpointing.load_params(workdir, target, meta["step"])
    stored = np.dtype(jax.tree.leaves(params)[0].dtype)
    dtype = dtype or model_cfg.get("param_dtype") or stored.name
    if np.dtype(jnp.dtype(dtype)).itemsize < stored.itemsize:
        _warn_unchanged(meta["config"], workdir, target, params, module, dtype, stored)
    return _write(params, model_cfg, module, out_dir, tokenizer or hf_path, dtype, max_shard_bytes)


def _write(params, model_cfg, module, out_dir, tokenizer, dtype, max_shard_bytes):
    save = functools.partial(
        hf.save_pretrained,
        params,
        model_cfg.family,
        module.config,
        tokenizer_dir=tokenizer,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
    )
    if paths.is_local(out_dir):
        return save(out_dir)
    # A URL (gs://...): safetensors are written locally, then uploaded file by file.
    with tempfile.TemporaryDirectory(prefix="dil_jax-export-") as tmp:
        local = save(tmp)
        if jax.process_index() == 0:
            for file in sorted(pathlib.Path(local).rglob("*")):
                if file.is_file():
                    rel = file.relative_to(local).as_posix()
                    paths.write_atomic(paths.join(out_dir, rel), file.read_bytes())
    return out_dir


def _export_lora(
    meta, settings, module, mesh, target, workdir, out_dir, adapter, dtype, tokenizer, shard
):
    """A LoRA run's export: its adapters merged into the base, or (``adapter``) PEFT files."""
    model_cfg = ConfigDict(meta["config"]["model"])
    family = get_family(model_cfg.family)
    adapted = lora.setup(settings, module, family, mesh)
    abstract = jax.eval_shape(lambda: lora.init_adapters(adapted.plan, jax.random.key(0)))
    specs = sharding.match_partition_rules(adapted.adapter_rules, abstract, mesh)
    ad_target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract,
        sharding.shardings_from_specs(mesh, specs),
    )
    adapters = checkpointing.load_params(workdir, ad_target, meta["step"])
    dtype = dtype or model_cfg.get("param_dtype") or "float32"
    if adapter:
        tensors, targets, fan_in_fan_out = lora.peft_adapter(
            adapted.plan,
            adapters,
            family,
            module.config,
            model_cfg.get("scan_layers", True),
            np.dtype(jnp.dtype(dtype)),
        )
        config = lora.peft_config(settings, targets, fan_in_fan_out, model_cfg.get("hf_path") or "")
        return _write_peft(out_dir, tensors, config)
    base = base_params(meta["config"], workdir, target, module)
    if base is None:
        raise CheckpointError(
            f"{workdir}: the run's base weights (config.init.mode="
            f"{meta['config'].get('init', {}).get('mode')!r}) are not on disk to merge into; "
            "export the adapters alone with --adapter"
        )
    base_sharding = sharding.shardings_from_specs(mesh, adapted.base_specs)
    base = jax.jit(lambda p: lora.quantize_base(adapted.plan, p), out_shardings=base_sharding)(base)
    recorded = meta["config"].get("lora", {}).get("base_fingerprint")
    have = reference.params_fingerprint(base)
    if reference.comparable_fingerprints(recorded, have) and recorded != have:
        raise CheckpointError(
            f"{workdir}: lora.base_fingerprint differs: the base loaded per config.init is not "
            "the one the adapters were trained on"
        )
    merged = jax.jit(lambda b, a: lora.merge_adapters(adapted.plan, b, a, jnp.dtype(dtype)))(
        base, adapters
    )
    return _write(merged, model_cfg, module, out_dir, tokenizer, dtype, shard)


def _write_peft(out_dir, tensors, config) -> pathlib.Path | str:
    from safetensors.numpy import save_file  # noqa: PLC0415

    if jax.process_index() != 0:
        return out_dir
    with tempfile.TemporaryDirectory(prefix="dil_jax-peft-") as tmp:
        save_file(tensors, str(pathlib.Path(tmp) / "adapter_model.safetensors"))
        (pathlib.Path(tmp) / "adapter_config.json").write_text(json.dumps(config, indent=2))
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            data = (pathlib.Path(tmp) / name).read_bytes()
            paths.write_atomic(paths.join(out_dir, name), data)
    return out_dir


def base_params(config: dict, workdir: str, target, module):
    """The run's starting params (per ``config.init``) in ``target``'s layout, or None for a run
    from scratch (or a base that is no longer on disk)."""
    init, model = config.get("init", {}), config["model"]
    mode = init.get("mode", "scratch")
    if mode == "hf" and model.get("hf_path"):
        return hf.load_params(
            model["hf_path"],
            model["family"],
            module.config,
            target,
            scan_layers=model.get("scan_layers", True),
        )
    source = {
        "checkpoint": init.get("checkpoint_dir"),
        "pretrain": paths.join(workdir, "base"),
    }.get(mode)
    if source and paths.isdir(checkpointing.checkpoint_dir(source)):
        return checkpointing.load_params(source, target)
    return None


def unchanged_fraction(params, base, dtype) -> float:
    """Share of weights whose ``dtype`` bits equal the base's (sharded; nothing gathered)."""
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[jnp.dtype(dtype).itemsize]

    @jax.jit
    def same(p, b):
        cast = lambda x: jax.lax.bitcast_convert_type(x.astype(dtype), bits)  # noqa: E731
        return jnp.sum(cast(p) == cast(b), dtype=jnp.float32)

    leaves, base_leaves = jax.tree.leaves(params), jax.tree.leaves(base)
    equal = sum(float(same(p, b)) for p, b in zip(leaves, base_leaves, strict=True))
    return equal / sum(p.size for p in leaves)


def _warn_unchanged(config, workdir, target, params, module, dtype, stored) -> None:
    base = base_params(config, workdir, target, module)
    if base is None:
        logging.warning(
            "exporting %s params as %s: updates below %s's resolution round away "
            "(no base params to measure how many)",
            stored.name,
            dtype,
            dtype,
        )
        return
    low, full = unchanged_fraction(params, base, dtype), unchanged_fraction(params, base, stored)
    logging.warning(
        "exporting %s params as %s: %.1f %% of the weights are bit-identical to the base "
        "(%s), against %.1f %% in %s; the training updates below %s's resolution round away. "
        "Export with --dtype=%s to keep them.",
        stored.name,
        dtype,
        100 * low,
        config.get("init", {}).get("mode"),
        100 * full,
        stored.name,
        dtype,
        stored.name,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dil_jax.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", required=True, help="run directory with checkpoints/")
    parser.add_argument("--out", required=True, help="output Hugging Face model directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (latest)")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory or hub id (default: config.model.hf_path)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16", "float16"),
        help="storage dtype (default: the training dtype, "
        "config.model.param_dtype; lower ones warn with the share of weights "
        "left bit-identical to the base)",
    )
    parser.add_argument("--max_shard_bytes", type=int, default=2**31)
    parser.add_argument(
        "--adapter",
        action="store_true",
        help="LoRA runs: write the adapters as a PEFT directory (default: merged into the base)",
    )
    args = parser.parse_args(argv)
    out = export(
        args.workdir,
        args.out,
        step=args.step,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        max_shard_bytes=args.max_shard_bytes,
        adapter=args.adapter,
    )
    if jax.process_index() == 0:
        print(f"wrote {out}")


if __name__ == "__main__":
    with exit_on_bad_input():  # a damaged checkpoint or bad path: one line, exit 2
        main()
