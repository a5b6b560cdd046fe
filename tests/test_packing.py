"""Padding-free pairs and prefix sharing: every layout gives the padded layout's numbers.

The layouts of ``dil_jax.data.batching`` (bucketed, packed, prefix-shared, packed and
prefix-shared) lay the same examples out differently; the per-example log-prob sums, the losses
and their gradients must not notice (1e-5). Checked on real data (UltraFeedback with the GPT-2
tokenizer) through the train step's own statistics, and per model family on random weights
(Gemma 2's sliding window and GPT-2's learned positions included).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_tiny_config
from test_gemma import CFG2 as GEMMA2_CFG
from test_gpt2 import CFG as GPT2_CFG
from test_gpt_neox import CFG as NEOX_CFG
from test_llama import CFG as LLAMA_CFG

from dil_jax import logprobs, sharding, train
from dil_jax.data import pipeline
from dil_jax.data.batching import TokenizedDataset, pack_plan
from dil_jax.models import gemma, gpt2, gpt_neox, llama

LAYOUTS = ("bucketed", "packed", "shared", "packed_shared")


def lay_out(data: TokenizedDataset, rows: np.ndarray, layout: str, max_length: int) -> dict:
    """The examples ``rows`` in one batch of ``layout`` (packed: as many rows as they need)."""
    if layout == "bucketed":
        return data.padded(rows, max_length)
    if layout == "shared":
        return data.shared([np.asarray([e]) for e in rows], 2 * max_length)
    if layout == "packed":
        packs = pack_plan(data.lengths, rows, max_length, 1)
        return data.packed([p[0] for p in packs], max_length)
    packs = pack_plan(data.shared_lengths(), rows, 2 * max_length, 1)
    return data.shared([p[0] for p in packs], 2 * max_length)


def synthetic_pairs(n=6, vocab=96, seed=0) -> TokenizedDataset:
    """n pairs sharing a prompt of 1-9 tokens; one pair whose responses begin alike (the shared
    prefix then stops at the prompt's last token but one)."""
    rng = np.random.default_rng(seed)
    tokens, starts, lengths, prompts = [], [], [], []
    offset = 0
    for e in range(n):
        prompt = rng.integers(1, vocab, rng.integers(1, 10))
        first = rng.integers(1, vocab, 2)
        row_starts, row_lengths = [], []
        for _ in range(2):
            response = rng.integers(1, vocab, rng.integers(1, 9))
            if e == 0:
                response = np.concatenate([first, response])
            seq = np.concatenate([prompt, response])
            tokens.append(seq)
            row_starts.append(offset)
            row_lengths.append(len(seq))
            offset += len(seq)
        starts.append(row_starts)
        lengths.append(row_lengths)
        prompts.append([len(prompt)] * 2)
    return TokenizedDataset(
        np.concatenate(tokens).astype(np.int32),
        np.asarray(starts),
        np.asarray(lengths, np.int32),
        np.asarray(prompts, np.int32),
        np.arange(n, dtype=np.int32),
        buckets=(24,),
    )


def test_shared_layout_puts_prompt_once_and_restarts_positions():
    data = synthetic_pairs()
    batch = data.shared([np.arange(2)], 48)
    prefix = data.shared_prefix_lengths()
    assert (prefix == data.prompt_lengths[:, 0] - 1).all()  # last prompt token per branch
    ids, pos, branch = (batch[k][0, 0] for k in ("input_ids", "positions", "branch_ids"))
    p, (n0, n1) = int(prefix[0]), data.lengths[0]
    assert ids[:p].tolist() == data.tokens[data.starts[0, 0] : data.starts[0, 0] + p].tolist()
    assert pos[:p].tolist() == list(range(p)) and (branch[:p] == 0).all()
    assert pos[p:n0].tolist() == list(range(p, n0)) and (branch[p:n0] == 1).all()
    assert (
        pos[n0 : n0 + n1 - p].tolist() == list(range(p, n1))
        and (branch[n0 : n0 + n1 - p] == 2).all()
    )
    assert data.shared_lengths()[0, 0] == n0 + n1 - p
    assert batch["slot_mask"].shape == (1, 2, 2) and batch["slot_mask"].all()


FAMILIES = {
    "llama": (llama.LlamaForCausalLM, LLAMA_CFG, llama.FAMILY),
    "gpt_neox": (gpt_neox.GPTNeoXForCausalLM, NEOX_CFG, gpt_neox.FAMILY),
    "gpt2": (gpt2.GPT2LMHeadModel, GPT2_CFG, gpt2.FAMILY),
    "gemma2_window4": (gemma.GemmaForCausalLM, GEMMA2_CFG, gemma.FAMILY),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_every_layout_gives_the_padded_logps_for_every_family(name):
    """Per-example log-prob sums of all four layouts agree (1e-5): packed segments and
    prefix-shared branches compute what each sequence alone computes, Gemma 2's window of 4
    counted in positions, GPT-2's learned positions restarting in every branch."""
    import family_checks as fc

    model_cls, cfg, family = FAMILIES[name]
    model = model_cls(cfg)
    params = fc.random_params(model)
    data = synthetic_pairs(vocab=cfg.vocab_size)
    rows = np.arange(len(data))
    want = None
    for layout in LAYOUTS:
        batch = {k: jnp.asarray(v) for k, v in lay_out(data, rows, layout, 24).items()}
        out = logprobs.sequence_logps(model, family, params, batch)
        got = np.asarray(out.sum_logps)  # [B(·S), N]
        if "slot_mask" in batch:  # per slot -> per example, in example_id order
            ids = np.asarray(batch["example_id"]).reshape(-1)
            got = got[ids >= 0][np.argsort(ids[ids >= 0])]
        if want is None:
            want = got
            assert np.all(want < 0)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=layout)


@pytest.fixture(scope="module")
def ultrafeedback(tmp_path_factory):
    """48 UltraFeedback pairs with the GPT-2 tokenizer, max length 128, and a Trainer over a
    tiny Llama on GPT-2's vocabulary (sequence-chunked head: no [B, N, T, V] logits)."""
    from conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the real data folder {SHARED_DATA} (absent in a plain clone)")
    config = make_tiny_config(
        **{
            "data.source": "files",
            "data.format": "prompt_chosen_rejected",
            "data.train_files": (
                str(SHARED_DATA / "ultrafeedback-binarized-subset" / "train_clean.jsonl.gz"),
            ),
            "data.tokenizer": str(SHARED_DATA / "tokenizers" / "gpt2"),
            "data.eos_token": "<|endoftext|>",
            "data.max_records": 48,
            "data.max_length": 128,
            "data.max_prompt_length": 64,
            "data.buckets": (128,),
            "data.num_eval": 0,
            "data.on_bad_record": "skip",
            "data.cache_dir": str(tmp_path_factory.mktemp("cache")),
            "model.vocab_size": 50257,
            "model.hidden_size": 16,
            "model.intermediate_size": 32,
            "model.num_hidden_layers": 1,
            "model.num_attention_heads": 2,
            "model.num_key_value_heads": 1,
            "model.max_position_embeddings": 256,
            "logprobs.seq_chunk": 64,
            "eval.every_steps": 0,
            "mesh.shape": (1, 1, 1),
        }
    )
    data, _, _ = pipeline.build_datasets(config)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    trainer = train.Trainer(config, mesh=mesh)
    params = trainer.init_params(jax.random.key(0))
    # A reference away from the policy, so that log-ratios (and DIL's weights) are not trivial.
    ref = jax.tree.map(lambda p: p + 0.02 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)
    return data, trainer, params, ref


def loss_and_grads(trainer, terms, params, batch, ref_params):
    """The step's objective (sum of per-example losses / examples) and its gradient."""
    batch = {k: jnp.asarray(v) for k, v in batch.items() if k in train.STEP_KEYS}

    def objective(p):
        losses, _, _ = train._pair_stats(
            trainer.model, trainer.family, p, batch, ref_params, terms=terms, chunks=trainer.chunks
        )
        return jnp.sum(losses) / train.num_examples(batch)

    return jax.jit(jax.value_and_grad(objective))(params)


@pytest.mark.parametrize("loss", ["dil_lsif", "dpo"])
def test_packed_and_shared_layouts_give_padded_losses_and_gradients(ultrafeedback, loss):
    """Real pairs: loss and every gradient entry of the four layouts agree (1e-5 of the
    largest), for DIL (inline reference) and DPO (precomputed reference per slot)."""
    from dil_jax import validation

    data, trainer, params, ref = ultrafeedback
    terms = validation.loss_terms(make_tiny_config(**{"loss.name": loss}).loss)
    rows = np.arange(12)
    ref_params = ref
    if loss == "dpo":  # precomputed: reference sums per example, laid out per slot
        padded = data.padded(rows, 128)
        ref_out = logprobs.sequence_logps(
            trainer.model,
            trainer.family,
            ref,
            {k: jnp.asarray(padded[k]) for k in ("input_ids", "attention_mask", "loss_mask")},
            seq_chunk=64,
        )
        extras = np.zeros(data.lengths.shape, np.float32)
        extras[rows] = np.asarray(ref_out.sum_logps)
        data = data.select(np.arange(len(data)))
        data.extras = {"ref_logps": extras}
        ref_params = None
    want_loss, want_grads = loss_and_grads(
        trainer, terms, params, data.padded(rows, 128), ref_params
    )
    assert np.isfinite(float(want_loss))
    want = jax.tree.leaves(want_grads)
    scale = max(float(jnp.max(jnp.abs(g))) for g in want)
    for layout in LAYOUTS[1:]:
        batch = lay_out(data, rows, layout, 128)
        assert int(batch["slot_mask"][..., 0].sum()) == len(rows)
        got_loss, got_grads = loss_and_grads(trainer, terms, params, batch, ref_params)
        np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5, err_msg=layout)
        for g, w in zip(jax.tree.leaves(got_grads), want, strict=True):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * scale, err_msg=layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_head_at_scored_positions_only_gives_every_position_losses_and_gradients(
    ultrafeedback, layout
):
    """`logprobs.score_buckets` (the default, 8) against the head at every position: the same
    DIL loss and gradients (1e-5 of the largest) on real pairs in every layout."""
    import types  # noqa: PLC0415

    from dil_jax import validation  # noqa: PLC0415

    data, trainer, params, ref = ultrafeedback
    assert trainer.chunks["score_buckets"] == 8
    every = types.SimpleNamespace(
        model=trainer.model, family=trainer.family, chunks={**trainer.chunks, "score_buckets": 0}
    )
    terms = validation.loss_terms(make_tiny_config(**{"loss.name": "dil_lsif"}).loss)
    batch = lay_out(data, np.arange(12), layout, 128)
    want_loss, want_grads = loss_and_grads(every, terms, params, batch, ref)
    got_loss, got_grads = loss_and_grads(trainer, terms, params, batch, ref)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
    want = jax.tree.leaves(want_grads)
    scale = max(float(jnp.max(jnp.abs(g))) for g in want)
    for g, w in zip(jax.tree.leaves(got_grads), want, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * scale)


def test_packed_step_accumulates_exactly(ultrafeedback):
    """The jitted train step on packed prefix-shared rows: 2 micro-batches == 1 (loss and
    gradient norm), each normalised by the real examples of the whole global batch."""
    data, trainer, params, ref = ultrafeedback
    packs = pack_plan(data.shared_lengths(), np.arange(len(data)), 256, 4)[0]
    batch = {k: v for k, v in data.shared(packs, 256).items() if k in train.STEP_KEYS}
    results = []
    for accum in (1, 2):
        step = jax.jit(
            lambda s, b, r, a=accum: train.train_step(
                s,
                b,
                r,
                model=trainer.model,
                family=trainer.family,
                tx=trainer.tx,
                terms=trainer.terms,
                accum_steps=a,
                chunks=trainer.chunks,
            )
        )
        state = trainer.init_state(0, params=params)
        with jax.set_mesh(trainer.mesh):
            _, metrics = step(state, batch, ref)
        results.append(jax.device_get(metrics))
    one, two = results
    for key in ("loss", "grad_norm", "response_tokens", "rewards/accuracies"):
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("impl", ["dot_product", "chunked"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_fused_attention_matches_the_einsum_on_every_mask(name, impl, monkeypatch):
    """model.attention='dot_product' (jax.nn.dot_product_attention, XLA path: runs on CPU) and
    'chunked' (blocks of 8 queries here) give the einsum's log-probs and gradients on packed
    prefix-shared rows (causal, padding, segment and branch masks at once)."""
    import family_checks as fc

    from dil_jax.models import attention

    monkeypatch.setattr(attention, "BLOCK", 8)  # rows of 48 tokens: 6 blocks

    model_cls, cfg, family = FAMILIES[name]
    data = synthetic_pairs(vocab=cfg.vocab_size)
    batch = {
        k: jnp.asarray(v)
        for k, v in lay_out(data, np.arange(len(data)), "packed_shared", 24).items()
    }
    params = fc.random_params(model_cls(cfg))
    results = {}
    for kind in ("xla", impl):
        model = model_cls(cfg, attention=kind)

        def total(p, model=model):
            return jnp.sum(logprobs.sequence_logps(model, family, p, batch).sum_logps)

        results[kind] = jax.jit(jax.value_and_grad(total))(params)
    (want, want_g), (got, got_g) = results["xla"], results[impl]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


MISTRAL_CFG = dataclasses.replace(
    LLAMA_CFG, model_type="mistral", sliding_window=3, attention_bias=False
)
SPLASH_FAMILIES = {
    **{k: FAMILIES[k] for k in ("gpt2", "gpt_neox", "gemma2_window4")},
    "mistral_window3": (llama.LlamaForCausalLM, MISTRAL_CFG, llama.FAMILY),
}


@pytest.mark.parametrize("name", SPLASH_FAMILIES)
def test_splash_attention_matches_the_einsum(name):
    """model.attention='splash' (Pallas splash attention, interpret mode on CPU) gives the
    einsum's log-probs and gradients on padded and packed rows (causal + padding + segment ids,
    a sliding window by slot, Gemma 2's score softcap and its per-layer window choice, scanned
    and unrolled), and under an 8-device mesh (shard_map: rows over the batch axes, heads over
    'tensor'). Prefix-shared rows have no segment-id form: splash falls back to 'chunked'."""
    import family_checks as fc

    from dil_jax.models import attention

    model_cls, cfg, family = SPLASH_FAMILIES[name]
    data = synthetic_pairs(vocab=cfg.vocab_size)
    rows = np.arange(len(data))
    params = {scan: fc.random_params(model_cls(cfg, scan_layers=scan)) for scan in (True, False)}
    mesh = sharding.make_mesh((2, 2, 2))
    cases = {  # (layout, scanned layers, mesh): each code path once (interpret mode is slow)
        "gpt2": [("packed", True, None)],
        "gpt_neox": [("padded", True, None), ("packed", True, mesh)],
        "gemma2_window4": [("packed", True, None), ("packed", False, None)],  # traced / static
        "mistral_window3": [("packed", True, None)],
    }[name]
    for layout, scan, case_mesh in cases:
        source = lay_out(data, rows, "bucketed" if layout == "padded" else layout, 24)
        batch = {k: jnp.asarray(v) for k, v in source.items()}
        results = {}
        for kind in ("xla", "splash"):
            model = model_cls(cfg, attention=kind, scan_layers=scan)

            def total(p, model=model, batch=batch):
                return jnp.sum(logprobs.sequence_logps(model, family, p, batch).sum_logps)

            if case_mesh is None:
                results[kind] = jax.jit(jax.value_and_grad(total))(params[scan])
            else:
                with jax.set_mesh(case_mesh):
                    results[kind] = jax.jit(jax.value_and_grad(total))(params[scan])
        (want, want_g), (got, got_g) = results["xla"], results["splash"]
        where = f"{layout}, scan={scan}, mesh={case_mesh is not None}"
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=where)
        largest = max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want_g))
        for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * largest, err_msg=where)
    assert attention.resolve("splash", jnp.float32, None, has_ids=False) == "chunked"


def test_attention_choice_resolves_per_backend():
    from dil_jax.models import attention

    assert attention.resolve("auto", jnp.float32, None) == "xla"  # CPU
    assert attention.resolve("splash", jnp.float32, 5.0) == "splash"  # softcap: in the kernel
    assert attention.resolve("dot_product", jnp.float32, 5.0) == "xla"  # softcap
    assert attention.resolve("chunked", jnp.float32, 5.0) == "chunked"
    with pytest.raises(ValueError, match="needs a GPU"):
        attention.resolve("cudnn", jnp.bfloat16, None)
    with pytest.raises(ValueError, match="config.model.attention='flash'"):
        attention.resolve("flash", jnp.float32, None)


def _bf16_kernel_matches_the_einsum(impl: str, layout: str) -> None:
    """The compiled kernel `impl` (bf16) == the einsum (bf16) on the synthetic pairs in
    `layout`, for the tiny Llama."""
    import family_checks as fc

    model_cls, cfg, family = FAMILIES["llama"]
    data = synthetic_pairs(vocab=cfg.vocab_size)
    batch = {k: jnp.asarray(v) for k, v in lay_out(data, np.arange(len(data)), layout, 24).items()}
    params = fc.random_params(model_cls(cfg))
    out = {}
    for kind in ("xla", impl):
        model = model_cls(cfg, dtype=jnp.bfloat16, attention=kind)
        out[kind] = np.asarray(logprobs.sequence_logps(model, family, params, batch).sum_logps)
    np.testing.assert_allclose(out[impl], out["xla"], rtol=2e-2)


@pytest.mark.gpu
def test_cudnn_attention_matches_the_einsum_on_gpu():
    """On a GPU: cuDNN flash attention on packed prefix-shared rows."""
    _bf16_kernel_matches_the_einsum("cudnn", "packed_shared")


@pytest.mark.tpu
def test_splash_attention_matches_the_einsum_on_tpu():
    """On a TPU: the compiled splash kernel on packed rows, and 'auto' picks it."""
    from dil_jax.models import attention

    assert attention.resolve("auto", jnp.bfloat16, None) == "splash"
    _bf16_kernel_matches_the_einsum("splash", "packed")


def test_layouts_refuse_what_they_cannot_express():
    """KTO pairs completions across rows and the diagnostics' quantiles assume one example per
    row: both are refused with packing or prefix sharing, naming the field."""
    from dil_jax import spec
    from dil_jax.errors import ConfigError

    files = {
        "data.source": "files",
        "data.train_files": ("unused.jsonl",),
        "data.tokenizer": "unused",
        "data.max_length": 64,
        "data.max_prompt_length": 32,
    }
    kto = make_tiny_config(
        **files, **{"loss.name": "kto", "data.format": "prompt_completion_label"}
    )
    kto.data.prefix_sharing = True
    with pytest.raises(ConfigError, match="config.data.prefix_sharing=True: KTO"):
        spec.build(kto)
    diag = make_tiny_config(**files, **{"data.packing": True, "train.diagnostics": True})
    with pytest.raises(ConfigError, match="config.data.packing=True: train.diagnostics"):
        spec.build(diag)
    spec.build(make_tiny_config(**files, **{"data.packing": True}))
