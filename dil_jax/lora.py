"""LoRA and QLoRA: low-rank adapters on a frozen (optionally quantised) base model.

A targeted dense layer computes ``y = x W (+ b) + (alpha / r) · drop(x) A B`` with
``A [I, r]`` (PEFT's Kaiming-uniform init) and ``B [r, O]`` (zeros), so at initialisation the
policy is the base model exactly. Only the adapters are trained: the train state's params are
the adapter tree (and the optimiser moments mirror it), while the base weights travel into the
step as the frozen ``ref_params`` argument. The reference model *is* the base with the adapter
path switched off: the same base tree, called without adapter leaves — no second copy of the
weights, in the inline and the precomputed reference modes alike.

How it hooks into the models: every family builds its projections with ``blocks.dense``
(``flax.linen.Dense``). :class:`LoraModel` wraps the family's module and runs ``apply`` under
``nn.intercept_methods``; the interceptor sees each ``Dense.__call__`` with its module path and

* adds ``x A B · scale`` when the params tree it was given holds ``lora_a``/``lora_b`` beside
  that layer's ``kernel`` (the policy: base tree merged with the adapter tree, :func:`combine`);
* computes the layer from a quantised kernel when the base stores ``kernel_q``/``kernel_scale``
  there instead of ``kernel`` (QLoRA), dequantising one layer at a time inside the layer scan.

This is the mechanism qwix uses for linen models; qwix itself (0.1.8 pip-installs) is not used
because its adapters and quantised weights live inside one params tree with its own boxed
types, while here the optimiser must see the adapters alone, the reference must be the very
base tree, the quantised base must shard with each family's partition rules and load from
Hugging Face weights, and the PEFT export needs our parameter names.

Targets are regexes in the partition rules' language (``sharding.match_partition_rules``),
searched in the '/'-joined param path of a kernel, e.g. ``self_attn/(q|v)_proj/kernel``.
Only kernels of dense layers the forward pass calls qualify (the output head is read directly
by the log-prob code, so it cannot carry an adapter).

Quantisation is block-wise along the input axis I (``block_size`` rows share one float32
absmax scale): int8 stores ``round(127 · w / absmax)``; NF4 (QLoRA's 4-bit NormalFloat) stores
the index of the nearest of 16 normal quantiles, two per byte (rows 2i and 2i+1 of a block
share a byte). ``kernel_q`` is [.., I, O] int8 or [.., I/2, O] uint8, ``kernel_scale``
[.., I/block, O]: the kernel's rank, so they shard like the kernel. Double quantisation of the
scales is not implemented.

Shape letters: I a kernel's input width, O its output width, r the rank, L layers (scanned
params carry a leading [L] axis).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dil_jax import sharding
from dil_jax.errors import ConfigError
from dil_jax.models.family import identity, transpose
from dil_jax.reference import params_fingerprint

QUANTIZE = ("none", "int8", "nf4")
ADAPTER_LEAVES = ("lora_a", "lora_b")
QUANT_LEAVES = ("kernel_q", "kernel_scale")

# QLoRA's NF4 code book: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero
# (Dettmers et al. 2023, appendix E; the values bitsandbytes uses).
NF4_CODES = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)


# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """``config.lora`` as read by :func:`settings_from_config` (see configs/base.py)."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    quantize: str  # 'none' | 'int8' | 'nf4'
    block_size: int

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def settings_from_config(section) -> LoraSettings | None:
    """The one reader of ``config.lora``: None when adapters are off, else checked settings.

    Raises:
      ConfigError naming ``config.lora.<field>`` for an invalid value.
    """
    if section is None or not section.get("enabled", False):
        return None
    rank, alpha, dropout = section.get("rank"), section.get("alpha"), section.get("dropout")
    targets = section.get("targets")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"config.lora.rank={rank!r}: expected a positive integer")
    if not alpha or alpha <= 0:
        raise ConfigError(f"config.lora.alpha={alpha!r}: expected a positive number")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"config.lora.dropout={dropout!r}: expected 0 <= dropout < 1")
    if not targets:
        raise ConfigError("config.lora.targets=(): name at least one kernel pattern")
    for pattern in targets:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"config.lora.targets: {pattern!r} is not a regex ({e})") from e
    quantize = section.get("quantize")
    if quantize not in QUANTIZE:
        raise ConfigError(f"config.lora.quantize={quantize!r}: expected one of {QUANTIZE}")
    block = section.get("quant_block_size")
    if not isinstance(block, int) or block < 2 or block % 2:
        raise ConfigError(f"config.lora.quant_block_size={block!r}: expected an even integer >= 2")
    return LoraSettings(
        rank=rank,
        alpha=float(alpha),
        dropout=float(dropout),
        targets=targets,
        quantize=quantize,
        block_size=block,
    )


# ----------------------------------------------------------------------------- trees


def flat(tree) -> dict[str, Any]:
    """{'a/b/c': leaf} of a nested params dict."""
    return {sharding.path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def nest(flat_tree: Mapping[str, Any]) -> dict:
    """Inverse of :func:`flat`."""
    out: dict = {}
    for path, leaf in flat_tree.items():
        *parents, name = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = leaf
    return out


def combine(base, adapters):
    """The policy's params: the base tree with the adapter leaves added beside their kernels.

    A structural merge (no array is copied); ``base`` may be quantised.
    """
    if not isinstance(adapters, Mapping):
        return adapters
    out = dict(base)
    for k, v in adapters.items():
        out[k] = combine(base[k], v) if k in base and isinstance(v, Mapping) else v
    return out


def module_path(kernel_path: str) -> str:
    return kernel_path.rsplit("/", 1)[0]


# ----------------------------------------------------------------------------- quantisation


def quantize_kernel(w: jax.Array, kind: str, block: int) -> dict[str, jax.Array]:
    """w [.., I, O] -> {'kernel_q', 'kernel_scale'} (block-wise absmax along I, float32)."""
    *lead, n_in, n_out = w.shape
    w32 = w.astype(jnp.float32).reshape(*lead, n_in // block, block, n_out)
    absmax = jnp.max(jnp.abs(w32), axis=-2, keepdims=True)  # [.., I/bk, 1, O]
    safe = jnp.where(absmax > 0, absmax, 1.0)
    x = w32 / safe  # in [-1, 1]
    if kind == "int8":
        q = jnp.round(x * 127.0).astype(jnp.int8).reshape(*lead, n_in, n_out)
    else:  # nf4: nearest code, via the midpoints between consecutive codes
        mids = jnp.asarray((NF4_CODES[1:] + NF4_CODES[:-1]) / 2)
        idx = jnp.searchsorted(mids, x).astype(jnp.uint8)  # [.., I/bk, bk, O] in 0..15
        idx = idx.reshape(*lead, n_in // 2, 2, n_out)
        q = idx[..., 0, :] | (idx[..., 1, :] << 4)  # [.., I/2, O]: even row low nibble
    return {"kernel_q": q, "kernel_scale": absmax[..., 0, :]}


def dequantize_kernel(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """{'kernel_q', 'kernel_scale'} -> the kernel [.., I, O] in ``dtype``."""
    n_blocks, n_out = scale.shape[-2:]
    lead = scale.shape[:-2]
    if q.dtype == jnp.int8:
        x = q.astype(jnp.float32) / 127.0  # [.., I, O]
    else:
        lo, hi = q & 0xF, q >> 4  # [.., I/2, O] each
        idx = jnp.stack([lo, hi], axis=-2).reshape(*lead, 2 * q.shape[-2], n_out)
        x = jnp.asarray(NF4_CODES)[idx.astype(jnp.int32)]
    n_in = x.shape[-2]
    x = x.reshape(*lead, n_blocks, n_in // n_blocks, n_out) * scale[..., :, None, :]
    return x.reshape(*lead, n_in, n_out).astype(dtype)


# ----------------------------------------------------------------------------- the model


def _intercept(scale: float, dropout: float, use_rng: bool):
    """The ``nn.intercept_methods`` hook: quantised kernels and adapters on every Dense."""

    def hook(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, nn.Dense) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        (x,) = args  # [.., I]
        if module.has_variable("params", "kernel") or module.is_initializing():
            y = next_fun(*args, **kwargs)
        else:  # QLoRA base: dequantise this layer's kernel only
            q = module.get_variable("params", "kernel_q")
            s = module.get_variable("params", "kernel_scale")
            w = dequantize_kernel(q, s, module.dtype)  # [I, O]
            y = jnp.einsum("...i,io->...o", x.astype(module.dtype), w)
            if module.use_bias:
                y = y + module.get_variable("params", "bias").astype(module.dtype)
        if not module.has_variable("params", "lora_a"):
            return y  # adapters off (the reference), or a layer without one
        a = module.get_variable("params", "lora_a").astype(module.dtype)  # [I, r]
        b = module.get_variable("params", "lora_b").astype(module.dtype)  # [r, O]
        h = x.astype(module.dtype)
        if dropout > 0 and use_rng:
            keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - dropout), 0).astype(module.dtype)
        delta = jnp.einsum("...i,ir->...r", h, a) @ b  # [.., O]
        return y + (delta * scale).astype(y.dtype)

    return hook


@dataclasses.dataclass(frozen=True, eq=False)
class LoraModel:
    """A family's causal LM whose ``apply`` honours adapters and quantised kernels.

    Everything else (``config``, ``init_cache``, ``logit_softcap`` ...) is the wrapped
    module's. ``apply`` with a base tree is the base model; with :func:`combine` of base and
    adapters it is the policy. ``with_dropout_rng`` binds the (traced) key of one micro-batch.
    """

    module: Any
    settings: LoraSettings
    dropout_rng: Any = None

    def __getattr__(self, name):
        return getattr(self.module, name)

    def with_dropout_rng(self, rng) -> LoraModel:
        return dataclasses.replace(self, dropout_rng=rng)

    def apply(self, variables, *args, **kwargs):
        use_rng = self.dropout_rng is not None and self.settings.dropout > 0
        if use_rng:
            kwargs["rngs"] = {"dropout": self.dropout_rng}
        hook = _intercept(self.settings.scale, self.settings.dropout, use_rng)
        with nn.intercept_methods(hook):
            return self.module.apply(variables, *args, **kwargs)

    def init(self, *args, **kwargs):
        return self.module.init(*args, **kwargs)


def dense_kernel_paths(module, max_len: int = 8) -> tuple[str, ...]:
    """Param paths ``.../kernel`` of the Dense layers a forward pass (output='hidden') calls."""
    seen: list[str] = []

    def hook(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            path = "/".join(context.module.path) + "/kernel"
            if path not in seen:
                seen.append(path)
        return next_fun(*args, **kwargs)

    ids = jnp.zeros((1, max_len), jnp.int32)
    with nn.intercept_methods(hook):
        params = jax.eval_shape(module.init, jax.random.key(0), ids)["params"]
        seen.clear()  # init also builds the head; count the calls of the training forward
        jax.eval_shape(lambda p: module.apply({"params": p}, ids, output="hidden"), params)
    return tuple(seen)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class AdapterPlan:
    """Which kernels carry adapters and which are stored quantised, with their shapes."""

    settings: LoraSettings
    targets: tuple[str, ...]  # kernel paths with adapters
    quantized: tuple[str, ...]  # kernel paths stored quantised ('none': empty)
    kernel_shapes: Mapping[str, tuple[int, ...]]  # [.., I, O] of each dense kernel

    def adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        out = {}
        r = self.settings.rank
        for path in self.targets:
            *lead, n_in, n_out = self.kernel_shapes[path]
            out[f"{module_path(path)}/lora_a"] = (*lead, n_in, r)
            out[f"{module_path(path)}/lora_b"] = (*lead, r, n_out)
        return out


def plan(settings: LoraSettings, module, abstract_params) -> AdapterPlan:
    """Resolves ``config.lora.targets`` on a model, checking rank and quantisation blocks.

    Raises:
      ConfigError naming ``config.lora.targets`` (a pattern matching no dense kernel, or one
      matching a kernel no dense layer of the forward pass uses), ``config.lora.rank``
      (larger than a targeted matrix's smaller side) or ``config.lora.quant_block_size``
      (not dividing a quantised kernel's input width).
    """
    shapes = {p: tuple(x.shape) for p, x in flat(abstract_params).items()}
    dense = [p for p in dense_kernel_paths(module) if p in shapes]
    targets = []
    for pattern in settings.targets:
        rx = re.compile(pattern)
        hits = [p for p in shapes if rx.search(p)]
        if not hits:
            raise ConfigError(
                f"config.lora.targets: {pattern!r} matches no parameter (dense kernels: "
                f"{', '.join(dense[:6])}{' ...' if len(dense) > 6 else ''})"
            )
        bad = [p for p in hits if p not in dense]
        if bad:
            raise ConfigError(
                f"config.lora.targets: {pattern!r} matches {bad[0]}, which is not the kernel "
                "of a dense layer of the forward pass (adapters go on layer projections)"
            )
        targets += [p for p in hits if p not in targets]
    for path in targets:
        n_in, n_out = shapes[path][-2:]
        if settings.rank > min(n_in, n_out):
            raise ConfigError(
                f"config.lora.rank={settings.rank} is larger than {path} allows "
                f"(shape {shapes[path][-2:]}; rank <= {min(n_in, n_out)})"
            )
    quantized: list[str] = []
    if settings.quantize != "none":
        head = {p for p in shapes if p.startswith(f"{module.head_name}/")}
        quantized = [p for p in dense if p not in head]
        for path in quantized:
            if shapes[path][-2] % settings.block_size:
                raise ConfigError(
                    f"config.lora.quant_block_size={settings.block_size} does not divide "
                    f"the input width {shapes[path][-2]} of {path}"
                )
    ordered = [p for p in dense if p in targets]
    return AdapterPlan(settings, tuple(ordered), tuple(quantized), shapes)


def init_adapters(plan_: AdapterPlan, rng, dtype=jnp.float32) -> dict:
    """Fresh adapters: A ~ U(±1/sqrt(I)) (PEFT's Kaiming-uniform with a=sqrt(5)), B = 0."""
    out = {}
    for i, (path, shape) in enumerate(sorted(plan_.adapter_shapes().items())):
        if path.endswith("/lora_a"):
            bound = 1.0 / np.sqrt(shape[-2])
            key = jax.random.fold_in(rng, i)
            out[path] = jax.random.uniform(key, shape, dtype, -bound, bound)
        else:
            out[path] = jnp.zeros(shape, dtype)
    return nest(out)


def quantize_base(plan_: AdapterPlan, params) -> dict:
    """The base tree with every planned kernel replaced by ``kernel_q``/``kernel_scale``."""
    if not plan_.quantized:
        return params
    kind, block = plan_.settings.quantize, plan_.settings.block_size
    out = dict(flat(params))
    for path in plan_.quantized:
        w = out.pop(path)
        for name, value in quantize_kernel(w, kind, block).items():
            out[f"{module_path(path)}/{name}"] = value
    return nest(out)


def quantizer(plan_: AdapterPlan, base_shardings):
    """``(path, array) -> array or {'kernel_q', 'kernel_scale'}``: one param of the full model
    as the base stores it (``hf.load_params``'s ``on_param``), quantised on its devices."""
    kind, block = plan_.settings.quantize, plan_.settings.block_size
    shardings = flat(base_shardings)
    quantized = set(plan_.quantized)

    def on_param(path, x):
        if path not in quantized:
            return x
        mp = module_path(path)
        out = {n: shardings[f"{mp}/{n}"] for n in QUANT_LEAVES}
        return jax.jit(lambda w: quantize_kernel(w, kind, block), out_shardings=out)(x)

    return on_param


def fold_quantized(tree) -> dict:
    """The tree ``hf.load_params(on_param=quantizer(...))`` returns, in the base's layout:
    ``.../kernel/{kernel_q, kernel_scale}`` -> ``.../{kernel_q, kernel_scale}``."""
    out = {}
    for path, leaf in flat(tree).items():
        parts = path.split("/")
        if len(parts) >= 2 and parts[-2] == "kernel" and parts[-1] in QUANT_LEAVES:
            parts = parts[:-2] + parts[-1:]
        out["/".join(parts)] = leaf
    return nest(out)


def merge_adapters(plan_: AdapterPlan, base, adapters, dtype) -> dict:
    """A full params tree with ``W + scale · A B`` in every targeted kernel (for export).

    Quantised kernels are dequantised (to ``dtype``) first.
    """
    out = dict(flat(base))
    ad = flat(adapters)
    for path in plan_.quantized:
        mp = module_path(path)
        out[path] = dequantize_kernel(
            out.pop(f"{mp}/kernel_q"), out.pop(f"{mp}/kernel_scale"), jnp.float32
        )
    for path in plan_.targets:
        mp = module_path(path)
        if f"{mp}/lora_a" not in ad:  # merging nothing: a dequantised base
            continue
        a = jnp.asarray(ad[f"{mp}/lora_a"], jnp.float32)
        b = jnp.asarray(ad[f"{mp}/lora_b"], jnp.float32)
        w = jnp.asarray(out[path], jnp.float32)
        out[path] = w + plan_.settings.scale * jnp.einsum("...ir,...ro->...io", a, b)
    return nest({k: jnp.asarray(v).astype(dtype) for k, v in out.items()})


# ----------------------------------------------------------------------------- PEFT format


def peft_adapter(plan_: AdapterPlan, adapters, family, arch_config, scan_layers: bool, dtype):
    """Adapters in PEFT's layout: ``(tensors, target_modules, fan_in_fan_out)``.

    Tensors are keyed ``base_model.model.<HF module>.lora_A.weight`` ([r, I]) and
    ``...lora_B.weight`` ([O, r]), the HF module being the one whose ``.weight`` the family's
    tensor map gives for the kernel. ``target_modules`` are the modules' last names when they
    pick out exactly the adapted modules, else their full names. ``fan_in_fan_out`` is True for
    GPT-2's Conv1D (weights stored [I, O], the identity map).

    Raises:
      ConfigError when a targeted kernel maps to HF tensors by anything but a transpose or the
      identity (a fused or reordered projection PEFT could not address).
    """

    tensor_map = family.hf_tensor_map(arch_config, scan_layers=scan_layers)
    ad = {k: np.asarray(jax.device_get(v), np.float32) for k, v in flat(adapters).items()}
    tensors, modules, kinds = {}, [], set()
    for path in plan_.targets:
        hp = tensor_map[path]
        if hp.to_hf not in (transpose, identity):
            raise ConfigError(
                f"config.lora.targets: {path} is stored in Hugging Face checkpoints through a "
                "reordering transform; PEFT adapters cannot express it (export merged instead)"
            )
        kinds.add(hp.to_hf is identity)
        mp = module_path(path)
        a, b = ad[f"{mp}/lora_a"], ad[f"{mp}/lora_b"]  # [(L,) I, r], [(L,) r, O]
        if not hp.stacked:
            a, b = a[None], b[None]
        for i, key in enumerate(hp.hf_keys):
            if not key.endswith(".weight"):
                raise ConfigError(f"config.lora.targets: {path} maps to {key}, not a .weight")
            module = key[: -len(".weight")]
            modules.append(module)
            tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(
                a[i].T, dtype
            )
            tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(
                b[i].T, dtype
            )
    all_modules = {
        k[: -len(".weight")]
        for hp in tensor_map.values()
        for k in hp.hf_keys
        if k.endswith(".weight")
    }
    short = sorted({m.rsplit(".", 1)[-1] for m in modules})
    covered = {m for m in all_modules if m.rsplit(".", 1)[-1] in short}
    targets = short if covered == set(modules) else sorted(modules)
    return tensors, targets, kinds == {True}


def peft_config(settings: LoraSettings, targets, fan_in_fan_out: bool, base: str) -> dict:
    """``adapter_config.json`` for ``peft.PeftModel.from_pretrained``."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": list(targets),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


# ----------------------------------------------------------------------------- sharding


def _kernel_specs(family, plan_: AdapterPlan, mesh) -> dict[str, P]:
    kernels = {p: jax.ShapeDtypeStruct(plan_.kernel_shapes[p], jnp.float32) for p in plan_.targets}
    kernels.update(
        {p: jax.ShapeDtypeStruct(plan_.kernel_shapes[p], jnp.float32) for p in plan_.quantized}
    )
    specs = sharding.match_partition_rules(family.partition_rules(), nest(kernels), mesh)
    return flat(jax.tree.map(lambda s: s, specs, is_leaf=lambda x: isinstance(x, P)))


def _pad(spec: P, ndim: int) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(spec))


def _tensor_only(axes):
    """Keeps the 'tensor' axis of one dimension's spec entry (adapters replicate over fsdp)."""
    names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    kept = tuple(a for a in names if a == "tensor")
    return kept[0] if len(kept) == 1 else (kept or None)


def adapter_rules(family, plan_: AdapterPlan, mesh=None) -> tuple[tuple[str, P], ...]:
    """Partition rules of the adapter tree (and the optimiser moments mirroring it).

    ``A [.., I, r]`` takes the tensor-axis split of its kernel's input dimension, ``B [.., r,
    O]`` that of the output dimension; rank dimensions, layer axes and fsdp are replicated (an
    adapter is a few MB: splitting it over fsdp would only add gathers).
    """
    specs = _kernel_specs(family, plan_, mesh)
    rules = []
    for path in plan_.targets:
        *lead, d_in, d_out = _pad(specs[path], len(plan_.kernel_shapes[path]))
        lead = [None] * len(lead)
        mp = re.escape(module_path(path))
        rules.append((rf"^{mp}/lora_a$", P(*lead, _tensor_only(d_in), None)))
        rules.append((rf"^{mp}/lora_b$", P(*lead, None, _tensor_only(d_out))))
    return tuple(rules)


def base_rules(family, plan_: AdapterPlan, mesh=None) -> tuple[tuple[str, P], ...]:
    """The family's rules plus, for a quantised base, each ``kernel_q``/``kernel_scale``
    sharded like the kernel it replaces (same rank; uneven splits fall back to replication)."""
    rules = []
    if plan_.quantized:
        specs = _kernel_specs(family, plan_, mesh)
        for path in plan_.quantized:
            mp = re.escape(module_path(path))
            spec = specs[path]
            rules.append((rf"^{mp}/kernel_(q|scale)$", spec))
    return tuple(rules) + tuple(family.partition_rules())


# ----------------------------------------------------------------------------- setup


def with_base_fingerprint(config, base):
    """A copy of the run spec ``config`` whose ``lora.base_fingerprint`` identifies ``base``.

    Recorded in every checkpoint (the resume config); ``checkpointing.restore_latest`` refuses
    adapters whose fingerprint differs from the base this run loaded.
    """

    fingerprint = params_fingerprint(base)
    recorded = dict(config.recorded)
    recorded["lora"] = {**dict(recorded.get("lora", {})), "base_fingerprint": fingerprint}
    lora = dataclasses.replace(config.lora, base_fingerprint=fingerprint)
    return dataclasses.replace(config, lora=lora, recorded=recorded)


@dataclasses.dataclass
class Adapted:
    """What a trainer needs for adapter training, built once from the config."""

    plan: AdapterPlan
    model: LoraModel
    abstract_base: Any  # ShapeDtypeStructs of the (possibly quantised) base tree
    base_specs: Any  # PartitionSpecs of the base tree
    adapter_rules: tuple


def setup(settings: LoraSettings, module, family, mesh) -> Adapted:
    """Plans the adapters for ``module`` and derives the base tree's layout and shardings."""
    ids = jnp.zeros((1, 8), jnp.int32)
    abstract_full = jax.eval_shape(module.init, jax.random.key(0), ids)["params"]
    plan_ = plan(settings, module, abstract_full)
    abstract_base = jax.eval_shape(lambda p: quantize_base(plan_, p), abstract_full)
    specs = sharding.match_partition_rules(base_rules(family, plan_, mesh), abstract_base, mesh)
    return Adapted(
        plan=plan_,
        model=LoraModel(module, settings),
        abstract_base=abstract_base,
        base_specs=specs,
        adapter_rules=adapter_rules(family, plan_, mesh),
    )
