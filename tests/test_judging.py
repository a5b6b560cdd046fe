"""dil_jax/judging.py and experiments/win_rate.py: the length-controlled win rate, the judges (a
tiny transformers reward model, an OpenAI-compatible endpoint served by a local http.server
stub), and the CLI end to end on a tiny trained run."""

import http.server
import json
import pathlib
import sys
import threading

import numpy as np
import pytest
from conftest import REPO
from data_testing import CHAT_TEMPLATE, files_config, make_tokenizer, pairs, write_jsonl

from dil_jax import judging
from dil_jax.errors import ConfigError, DataError

sys.path.insert(0, str(REPO / "experiments"))
from stats import mean_ci  # noqa: E402


def test_summary_counts_ties_as_half_and_uses_the_t_interval():
    out = judging.summarise([1.0, 0.0, 0.5, 1.0], mean_ci=mean_ci)
    assert out["win_rate"] == pytest.approx(0.625)
    assert (out["wins"], out["ties"], out["losses"], out["n"]) == (2, 1, 1, 4)
    assert out["win_rate_ci"] == pytest.approx(mean_ci([1.0, 0.0, 0.5, 1.0])[1])
    np.testing.assert_array_equal(
        judging.outcomes_from_rewards([1.0, 2.0, 3.0], [2.0, 2.0, 1.0]), [0.0, 0.5, 1.0]
    )
    with pytest.raises(DataError, match="no pairs"):
        judging.summarise([], mean_ci=mean_ci)


def test_length_control_removes_a_pure_length_preference():
    """Outcomes drawn from a judge whose preference is length plus an optional quality edge
    (logit = edge + 4·tanh(Δlen / sd)): a verbose policy's raw win rate is high either way,
    the length-controlled one recovers σ(edge)."""
    rng = np.random.default_rng(0)
    n = 3000
    len_b = rng.integers(50, 150, n)
    len_a = len_b + rng.integers(-40, 120, n)  # the policy is mostly longer
    feature = judging.length_feature(len_a, len_b)
    for edge in (0.0, 1.0):
        wins = (rng.random(n) < 1 / (1 + np.exp(-(edge + 4 * feature)))).astype(float)
        out = judging.summarise(wins, len_a, len_b, mean_ci=mean_ci, bootstrap=50)
        assert out["win_rate"] > 0.7
        assert abs(out["lc_win_rate"] - 1 / (1 + np.exp(-edge))) < 0.05, (edge, out)
        assert 0 < out["lc_win_rate_ci"] < 0.1
    # With equal lengths there is nothing to control: the LC rate is the raw rate.
    same = np.full(n, 100)
    base = (rng.random(n) < 0.7).astype(float)
    assert judging.length_controlled_win_rate(base, same, same) == pytest.approx(base.mean())


def _tiny_reward_model(root: pathlib.Path) -> str:
    """A 1-layer Llama sequence classifier (one label) with the test tokenizer, saved by
    transformers as a judge would be."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok_dir = pathlib.Path(make_tokenizer(root, chat_template=CHAT_TEMPLATE))
    vocab = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=0,
    )
    transformers.LlamaForSequenceClassification(cfg).save_pretrained(root)
    return str(root)


def test_hf_reward_judge_scores_with_the_saved_model(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = _tiny_reward_model(tmp_path / "rm")
    judge = judging.make_judge(f"hf:{path}")
    prompts = ["what is the capital of France?", "write a poem about the sea"]
    a, b = ["Paris, thanks for asking.", "The sea is wide."], ["I am fine.", "the dog"]
    rewards = judge.rewards(prompts, a)
    # The same numbers straight from transformers, one sequence at a time (no padding).
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    for p, r, got in zip(prompts, a, rewards, strict=True):
        text = tok.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
        )
        with torch.no_grad():
            want = model(**tok(text, return_tensors="pt")).logits[0, 0].item()
        assert got == pytest.approx(want, abs=1e-5)
    ab, ba = judge.compare(prompts, a, b), judge.compare(prompts, b, a)
    np.testing.assert_array_equal(ab, 1.0 - ba)
    assert judge.compare(prompts, a, a).tolist() == [0.5, 0.5]
    with pytest.raises(ConfigError, match="judge"):
        judging.make_judge("nonsense")


class _ChatStub(http.server.BaseHTTPRequestHandler):
    """A minimal OpenAI chat-completions server: it prefers the response containing "good"
    (whichever letter it was shown under), answers `reply` when set, fails with `status`."""

    requests: list = []
    reply: str | None = None
    status = 200

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, dict(self.headers), body))
        if type(self).status != 200:
            self.send_response(type(self).status)
            self.end_headers()
            return
        user = body["messages"][-1]["content"]
        shown_a = user.split("## Response A\n")[1].split("## Response B")[0]
        content = type(self).reply or ("A" if "good" in shown_a else "B")
        payload = {
            "id": "stub",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
        }
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    _ChatStub.requests, _ChatStub.reply, _ChatStub.status = [], None, 200
    server = http.server.HTTPServer(("127.0.0.1", 0), _ChatStub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_judge_speaks_the_chat_completions_protocol(chat_server, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    judge = judging.make_judge(
        f"openai:{chat_server}", model="judge-1", api_key_env="TEST_JUDGE_KEY", seed=3
    )
    prompts = [f"question {i}" for i in range(12)]
    good = [f"a good answer {i}" for i in range(12)]
    bad = [f"a poor answer {i}" for i in range(12)]
    # Whatever order each pair is shown in, the better reply wins: the swap is undone.
    assert judge.compare(prompts, good, bad).tolist() == [1.0] * 12
    assert judge.compare(prompts, bad, good).tolist() == [0.0] * 12
    path, headers, body = _ChatStub.requests[0]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "judge-1" and body["messages"][0]["role"] == "system"
    assert "question 0" in body["messages"][1]["content"]
    shown_first = [
        "good" in b["messages"][1]["content"].split("## Response B")[0]
        for _, _, b in _ChatStub.requests[:12]
    ]
    assert 0 < sum(shown_first) < 12  # both orders were used
    # A reply that is neither letter is a tie, and counted.
    _ChatStub.reply = "I cannot decide"
    assert judge.compare(prompts[:2], good[:2], bad[:2]).tolist() == [0.5, 0.5]
    assert judge.unparsed == 2
    # A server error is one clear line naming the endpoint, after the retries.
    _ChatStub.status = 500
    with pytest.raises(DataError, match="chat/completions"):
        judge.compare(prompts[:1], good[:1], bad[:1])
    with pytest.raises(ConfigError, match="http"):
        judging.make_judge("openai:localhost:8000", model="m")


@pytest.mark.slow
def test_win_rate_cli_on_a_tiny_run(tmp_path):
    """Train 2 steps from tiny HF weights, then the CLI samples policy and SFT model on held-out
    prompts with the KV-cache sampler and judges them with the tiny reward model."""
    import jax
    import win_rate

    from dil_jax import sharding, train
    from dil_jax.models import hf

    rm = _tiny_reward_model(tmp_path / "rm")
    tok = make_tokenizer(tmp_path / "tok", chat_template=CHAT_TEMPLATE)
    train_file = write_jsonl(tmp_path / "train.jsonl", pairs(16))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", pairs(6, prefix="h"))
    config = files_config(
        [train_file],
        tok,
        **{"data.eval_files": (eval_file,), "mesh.shape": (1, 1, 1), "loss.name": "dpo"},
    )
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    trainer = train.Trainer(config, mesh=mesh)
    params = jax.device_get(trainer.init_params(jax.random.key(0)))
    hf.save_pretrained(params, "llama", trainer.model.config, tmp_path / "sft")
    config.model.hf_path, config.init.mode = str(tmp_path / "sft"), "hf"
    config.train.steps = config.checkpoint.every_steps = 2
    run = tmp_path / "run"
    train.train_and_evaluate(config, str(run), mesh=mesh)
    argv = [f"--workdir={run}", f"--judge=hf:{rm}", "--num-prompts=5", "--max-new-tokens=6"]
    assert win_rate.main([*argv, "--batch-size=4"]) == 0
    result = json.loads((run / "winrate.json").read_text())
    for key in ("vs_sft", "vs_chosen"):
        r = result[key]
        assert r["n"] == 5 and r["wins"] + r["ties"] + r["losses"] == 5
        assert 0.0 <= r["win_rate"] <= 1.0 and 0.0 <= r["lc_win_rate"] <= 1.0
    samples = [json.loads(x) for x in (run / "winrate_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 5 and samples[0]["prompt"].startswith("h0:")
    assert result["settings"]["policy_tokens_mean"] <= 6
    # Bad input: one line, exit status 2.
    with pytest.raises(SystemExit) as e:
        win_rate.main([f"--workdir={run}", "--judge=hf:/no/such/rm"])
    assert e.value.code == 2
