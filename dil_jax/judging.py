"""Win rates: sample a policy and a baseline on held-out prompts, judge the pairs, summarise.

AlpacaEval-style evaluation for real-data runs (the DIL paper's Table 3) in three parts:

* **Sampling** (`load_run`, `generate_texts`): a run's trained params and its starting (SFT /
  reference) params are read from the workdir (`checkpoints/`, `config.init`), prompts are
  rendered with the tokenizer's chat template, left-padded and continued by the KV-cache sampler
  (`dil_jax.sampling`) in fixed-size batches (one compilation).
* **Judges**, all with `compare(prompts, a, b) -> outcomes [n]` (1 = `a` better, 0 = `b`
  better, 0.5 = tie):
  - `HFRewardJudge`: a sequence-classification reward model from a Hugging Face directory
    (`transformers` + torch, the offline default); its scalar on (prompt, response) decides.
  - `GoldJudge`: the built-in gold-reward task's exact reward (token arrays, not text).
  - `OpenAIJudge`: any OpenAI-compatible chat-completions endpoint configured by the user (URL,
    model, API key from an environment variable); the two responses are shown in a random
    order per pair (cancelling position bias) and the judge answers "A" or "B".
  Reward judges also give `rewards(prompts, responses)`.
* **Summary** (`summarise`): the win rate (ties count half) with a 95 % Student-t interval
  over prompts, and a length-controlled win rate in the manner of AlpacaEval-LC: a logistic
  regression of each outcome on `tanh(Δlen / sd(Δlen))` (Δlen = response-length difference in
  characters or tokens) with an intercept, whose intercept alone, `σ(θ₀)`, is the win rate
  the judge would give at equal lengths; its interval is a percentile bootstrap over prompts.
  (AlpacaEval-LC also models per-instruction difficulty, which needs many models per prompt;
  with two there is nothing to fit it from, so that term is left out.)

Shape letters: n pairs, P prompt length, M max new tokens.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from dil_jax import checkpointing, export
from dil_jax.data.gold_task import GoldTask
from dil_jax.errors import ConfigError, DataError
from dil_jax.models import build_model
from dil_jax.sampling import make_generate_fn

# ----------------------------------------------------------------------------- judges


class Judge(Protocol):
    name: str

    def compare(self, prompts: Sequence, a: Sequence, b: Sequence) -> np.ndarray:
        """Outcomes [n] float: 1 where `a[i]` is the better answer to `prompts[i]`, 0 where
        `b[i]` is, 0.5 for a tie."""
        ...


def outcomes_from_rewards(r_a: np.ndarray, r_b: np.ndarray) -> np.ndarray:
    """[n] rewards of `a` and `b` -> [n] outcomes, exact ties 0.5."""
    r_a, r_b = np.asarray(r_a, np.float64), np.asarray(r_b, np.float64)
    return (r_a > r_b) + 0.5 * (r_a == r_b)


class GoldJudge:
    """The gold-reward task's own reward (`dil_jax.data.gold_task.GoldTask.gold_reward`):
    prompts [n, P] and responses [n, M] are token arrays."""

    name = "gold"

    def __init__(self, task):
        self.task = task

    def rewards(self, prompts, responses) -> np.ndarray:
        return np.asarray(self.task.gold_reward(np.asarray(prompts), np.asarray(responses)))

    def compare(self, prompts, a, b) -> np.ndarray:
        return outcomes_from_rewards(self.rewards(prompts, a), self.rewards(prompts, b))


class HFRewardJudge:
    """A reward model saved as a Hugging Face sequence-classification directory
    (`AutoModelForSequenceClassification` with one label; torch is needed, as for any
    transformers model). A (prompt, response) pair is rendered as a user/assistant
    conversation with the directory's chat template when it has one, else as
    `prompt + "\\n\\n" + response`, truncated from the left to `max_length` tokens."""

    def __init__(self, path: str, *, batch_size: int = 8, max_length: int = 1024):
        try:
            import torch  # noqa: F401, PLC0415 (optional: the judge's own runtime)
            from transformers import (  # noqa: PLC0415
                AutoModelForSequenceClassification,
                AutoTokenizer,
            )
        except ImportError as e:
            raise ConfigError(
                f"judge hf:{path} needs torch and transformers: pip install -e '.[test]' ({e})"
            ) from None
        if not os.path.isdir(path) and os.sep in path:
            raise ConfigError(f"judge hf:{path}: no such directory")
        try:
            self.tok = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        except (OSError, ValueError) as e:
            raise ConfigError(f"judge hf:{path}: not a sequence-classification model ({e})") from e
        if self.model.config.num_labels != 1:
            raise ConfigError(
                f"judge hf:{path}: num_labels={self.model.config.num_labels}, a reward model "
                "has one output"
            )
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model.config.pad_token_id = self.tok.pad_token_id
        self.tok.truncation_side = "left"
        self.name = f"hf:{path}"
        self.batch_size, self.max_length = batch_size, max_length

    def _text(self, prompt: str, response: str) -> str:
        if getattr(self.tok, "chat_template", None):
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            return self.tok.apply_chat_template(msgs, tokenize=False)
        return f"{prompt}\n\n{response}"

    def rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        import torch  # noqa: PLC0415

        texts = [self._text(p, r) for p, r in zip(prompts, responses, strict=True)]
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tok(
                texts[i : i + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            )
            with torch.no_grad():
                out.append(self.model(**enc).logits[:, 0].float().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def compare(self, prompts, a, b) -> np.ndarray:
        return outcomes_from_rewards(self.rewards(prompts, a), self.rewards(prompts, b))


JUDGE_SYSTEM = (
    "You are a careful evaluator of AI assistants. Given an instruction and two responses, "
    "decide which response follows the instruction better (helpful, correct, harmless). "
    "Answer with a single letter: A or B."
)
JUDGE_USER = "## Instruction\n{instruction}\n\n## Response A\n{a}\n\n## Response B\n{b}\n\nBetter:"


class OpenAIJudge:
    """A judge behind an OpenAI-compatible `POST {base_url}/chat/completions` endpoint.

    Each pair is one request (`model`, `messages` = system + user, `temperature` 0,
    `max_tokens` 1); which response is shown as "A" is drawn per pair from `seed`, and the
    outcome is mapped back. A reply that is neither A nor B counts as a tie and is counted in
    `unparsed`. The API key is read from the environment variable `api_key_env` (none is sent
    when it is unset, for local servers)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        seed: int = 0,
        timeout: float = 60.0,
        retries: int = 2,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"judge endpoint {base_url!r}: expected an http(s):// URL")
        if not model:
            raise ConfigError("judge endpoint: name the judge model (--judge-model)")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.seed, self.timeout, self.retries = seed, timeout, retries
        self.name = f"openai:{model}"
        self.unparsed = 0

    def _request(self, instruction: str, first: str, second: str) -> str:
        body = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": JUDGE_SYSTEM},
                {
                    "role": "user",
                    "content": JUDGE_USER.format(instruction=instruction, a=first, b=second),
                },
            ],
            "temperature": 0,
            "max_tokens": 1,
        }
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env, "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        last = None
        for _ in range(self.retries + 1):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    reply = json.loads(resp.read().decode())
                return str(reply["choices"][0]["message"]["content"] or "")
            except urllib.error.HTTPError as e:
                last = e
                if e.code < 500 and e.code != 429:  # a client error will not heal by retrying
                    break
            except (urllib.error.URLError, TimeoutError, KeyError, IndexError, ValueError) as e:
                last = e
        raise DataError(f"judge endpoint {self.url}: {type(last).__name__}: {last}")

    def compare(self, prompts, a, b) -> np.ndarray:
        rng = random.Random(self.seed)
        out = []
        for prompt, ra, rb in zip(prompts, a, b, strict=True):
            swap = rng.random() < 0.5
            reply = self._request(prompt, rb, ra) if swap else self._request(prompt, ra, rb)
            letter = re.match(r"\s*\(?\s*([AaBb])\b", reply)
            if letter is None:
                self.unparsed += 1
                out.append(0.5)
                continue
            a_first = letter.group(1).upper() == "A"
            out.append(float(a_first != swap))
        return np.asarray(out, np.float64)


def make_judge(spec: str, *, model: str = "", api_key_env: str = "OPENAI_API_KEY", seed: int = 0):
    """A judge from its command-line name: `hf:<directory>` (a reward model), `gold` (the
    gold-reward task; needs the task, see `GoldJudge`), or `openai:<base URL>` with `model`."""
    kind, _, arg = spec.partition(":")
    if kind == "hf" and arg:
        return HFRewardJudge(arg)
    if kind == "openai" and arg:
        return OpenAIJudge(arg, model, api_key_env=api_key_env, seed=seed)
    if kind == "gold":
        return GoldJudge(GoldTask())
    raise ConfigError(
        f"--judge={spec!r}: expected hf:<reward-model dir>, gold, or openai:<base URL>"
    )


# ----------------------------------------------------------------------------- summary


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def fit_length_logistic(outcomes, features, *, iters: int = 50, ridge: float = 1e-3):
    """Logistic regression `logit P(a wins) = θ₀ + θ₁·feature` on fractional outcomes (ties
    are 0.5 targets), by Newton's method with a small ridge on θ₁ only. Returns (θ₀, θ₁);
    θ₀ is clipped to ±20 (all wins or all losses have no finite maximum)."""
    y = np.asarray(outcomes, np.float64)
    x = np.asarray(features, np.float64)
    X = np.stack([np.ones_like(x), x], axis=1)  # [n, 2]
    theta = np.zeros(2)
    reg = np.diag([0.0, ridge])
    for _ in range(iters):
        p = _sigmoid(X @ theta)
        grad = X.T @ (p - y) + reg @ theta
        hess = X.T @ (X * (p * (1 - p))[:, None]) + reg + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta = np.clip(theta - step, -20.0, 20.0)
        if np.max(np.abs(step)) < 1e-10:
            break
    return float(theta[0]), float(theta[1])


def length_feature(len_a, len_b) -> np.ndarray:
    """AlpacaEval-LC's length term: tanh of the length difference over its standard deviation
    (0 where every difference is 0)."""
    d = np.asarray(len_a, np.float64) - np.asarray(len_b, np.float64)
    sd = d.std()
    return np.tanh(d / sd) if sd > 0 else np.zeros_like(d)


def length_controlled_win_rate(outcomes, len_a, len_b) -> float:
    """σ(θ₀) of `fit_length_logistic`: the win rate at equal lengths."""
    theta0, _ = fit_length_logistic(outcomes, length_feature(len_a, len_b))
    return float(_sigmoid(theta0))


def summarise(
    outcomes, len_a=None, len_b=None, *, mean_ci, bootstrap: int = 1000, seed: int = 0
) -> dict:
    """Win rate ± 95 % half-width over prompts (ties as half; `mean_ci(values) -> (mean,
    half-width)`, e.g. experiments/stats.py's Student-t interval), wins/ties/losses, and with
    lengths the length-controlled win rate ± a percentile-bootstrap half-width."""
    y = np.asarray(outcomes, np.float64)
    n = len(y)
    if n == 0:
        raise DataError("no pairs to judge")
    _, half = mean_ci(y)
    out = {
        "n": n,
        "win_rate": float(y.mean()),
        "win_rate_ci": float(half),
        "wins": int(np.sum(y == 1.0)),
        "ties": int(np.sum((y > 0.0) & (y < 1.0))),
        "losses": int(np.sum(y == 0.0)),
    }
    if len_a is not None and len_b is not None:
        len_a, len_b = np.asarray(len_a, np.float64), np.asarray(len_b, np.float64)
        out["lc_win_rate"] = length_controlled_win_rate(y, len_a, len_b)
        rng = np.random.default_rng(seed)
        boots = []
        for _ in range(bootstrap if n > 1 else 0):
            idx = rng.integers(0, n, n)
            boots.append(length_controlled_win_rate(y[idx], len_a[idx], len_b[idx]))
        lo, hi = np.percentile(boots, [2.5, 97.5]) if boots else (np.nan, np.nan)
        out["lc_win_rate_ci"] = float((hi - lo) / 2)
        out["mean_length_a"] = float(len_a.mean())
        out["mean_length_b"] = float(len_b.mean())
    return out


# ----------------------------------------------------------------------------- sampling


def _last_turn(value, role: str):
    """A string, or the content of the last `role` turn of a chat-message list; else None."""
    if isinstance(value, list):
        turns = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == role]
        value = turns[-1] if turns else None
    return value if isinstance(value, str) and value else None


def read_prompts(path: str, limit: int) -> tuple[list[str], list[str] | None]:
    """The first `limit` records of a JSONL(.gz) file: their `prompt` (a string or chat
    messages, whose last user turn is taken) and, when every record has one, their `chosen`
    reply (a string or messages, the last assistant turn) for a win rate against it."""

    opener = gzip.open if path.endswith(".gz") else open
    prompts, chosen = [], []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if len(prompts) >= limit:
                    break
                if not line.strip():
                    continue
                record = json.loads(line)
                prompt = _last_turn(record.get("prompt"), "user")
                if prompt is None:
                    raise DataError(f"{path}:{i + 1}: no string or chat-message field 'prompt'")
                prompts.append(prompt)
                chosen.append(_last_turn(record.get("chosen"), "assistant"))
    except (OSError, ValueError) as e:
        raise DataError(f"prompts file {path!r}: {e}") from e
    if not prompts:
        raise DataError(f"prompts file {path!r} holds no prompts")
    return prompts, (chosen if all(c is not None for c in chosen) else None)


def load_run(workdir: str, step: int | None = None):
    """(module, policy params, starting params, config dict) of a run: the latest (or
    `step`'s) checkpoint and the params it started from (`config.init`: an HF model, a base
    checkpoint or the pretrain stage), all on one device."""

    meta = export.read_meta(workdir, step)
    config = meta["config"]
    module, _ = build_model(ConfigDict(config["model"]))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract["params"]
    )
    policy = checkpointing.load_params(workdir, target, meta["step"])
    start = export.base_params(config, workdir, target, module)
    if start is None:
        raise DataError(f"{workdir}: the run started from scratch; it has no SFT model to beat")
    return module, policy, start, config


def render_prompts(tok, prompts: Sequence[str]) -> list[str]:
    """Prompt texts as the model sees them: the chat template with the generation prompt when
    the tokenizer has one, else the raw text."""
    if getattr(tok, "chat_template", None):
        return [
            tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    return list(prompts)


def encode_left_padded(tok, texts: Sequence[str], max_prompt_tokens: int, pad_id: int):
    """Texts -> (ids [n, P], mask [n, P]) int32, LEFT-padded, keeping each prompt's end."""
    rows = [tok(t, add_special_tokens=False)["input_ids"][-max_prompt_tokens:] for t in texts]
    P = max(len(r) for r in rows)
    ids = np.full((len(rows), P), pad_id, np.int32)
    mask = np.zeros((len(rows), P), np.int32)
    for i, r in enumerate(rows):
        ids[i, P - len(r) :] = r
        mask[i, P - len(r) :] = 1
    return ids, mask


def generate_texts(
    module,
    params,
    tok,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    max_prompt_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
) -> tuple[list[str], np.ndarray]:
    """Samples one response per prompt with the KV-cache sampler; returns the decoded texts and
    their lengths in tokens [n] (EOS excluded). Calls are `batch_size` rows each (the last one
    padded by repetition), so the sampler compiles once."""

    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    ids, mask = encode_left_padded(tok, render_prompts(tok, prompts), max_prompt_tokens, pad)
    gen = make_generate_fn(
        module,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_id=eos,
        pad_id=pad,
    )
    n = len(prompts)
    texts, lengths = [], []
    key = jax.random.key(seed)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size) % n  # the last call repeats rows
        key, sub = jax.random.split(key)
        out = gen(params, jnp.asarray(ids[idx]), jnp.asarray(mask[idx]), sub)
        tokens, tmask = np.asarray(out.tokens), np.asarray(out.mask)
        for row in range(min(batch_size, n - start)):
            kept = tokens[row][tmask[row] > 0].tolist()
            if kept and kept[-1] == eos:
                kept = kept[:-1]
            texts.append(tok.decode(kept, skip_special_tokens=True))
            lengths.append(len(kept))
    return texts, np.asarray(lengths, np.int64)
