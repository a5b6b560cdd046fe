"""Win rate of a trained run against its SFT (starting) model, and against the data's chosen
replies, judged by a pluggable judge (dil_jax/judging.py), with 95 % intervals.

  # offline: a reward model saved as a HF sequence-classification directory
  python experiments/win_rate.py --workdir=runs/t2_debug/dpo/seed=0 --judge=hf:/path/to/rm
  # a judge behind any OpenAI-compatible endpoint (key from $OPENAI_API_KEY, or --api-key-env)
  python experiments/win_rate.py --workdir=RUN --judge=openai:https://api.openai.com/v1 \\
      --judge-model=gpt-4o-mini --num-prompts=256 --max-new-tokens=512

The policy (the run's latest checkpoint) and the SFT model (the params the run started from:
``config.init``'s HF model, base checkpoint or pretrain stage) each sample one reply per
held-out prompt with the KV-cache sampler (``--temperature``, ``--max-new-tokens``); prompts
come from ``--prompts`` (JSONL with a ``prompt`` string or chat messages) or the run's
``config.data.eval_files[0]``. When those records carry a ``chosen`` reply, the policy is also
judged against it (Table 3's "vs chosen"). Output: ``<workdir>/winrate.json``

  {"vs_sft": {"win_rate", "win_rate_ci", "lc_win_rate", "lc_win_rate_ci", "wins", "ties",
              "losses", "n", "mean_length_a", "mean_length_b"},
   "vs_chosen": {...}, "average": {"win_rate"}, "judge", "settings"}

and the samples to ``<workdir>/winrate_samples.jsonl``. Ties count half; ``win_rate_ci`` is
the 95 % Student-t half-width over prompts (experiments/stats.py); the length-controlled rate
is the win rate at equal reply lengths (in characters) from a logistic regression on the length
difference, as AlpacaEval-LC (dil_jax/judging.py says exactly what is fitted), with a bootstrap
interval. ``experiments/collect_table.py`` reads ``winrate.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from stats import mean_ci  # noqa: E402  (experiments/stats.py)

from dil_jax import judging  # noqa: E402
from dil_jax.errors import ConfigError  # noqa: E402
from dil_jax.runtime import exit_on_bad_input  # noqa: E402


def prompts_file(args, config: dict) -> str:
    if args.prompts:
        return args.prompts
    files = list(config.get("data", {}).get("eval_files") or ())
    if not files:
        raise ConfigError(
            f"{args.workdir}: the run has no config.data.eval_files; name held-out prompts "
            "with --prompts=FILE.jsonl"
        )
    return files[0]


def tokenizer_for(args, config: dict):
    from dil_jax.data.tokenize import load_tokenizer  # noqa: PLC0415

    data, model = config.get("data", {}), config.get("model", {})
    spec = args.tokenizer or data.get("tokenizer") or model.get("hf_path") or ""
    return load_tokenizer(spec, data.get("eos_token", ""))


def judge_pairs(judge, prompts, a, b, seed: int) -> dict:
    outcomes = judge.compare(prompts, a, b)
    return judging.summarise(
        outcomes, [len(x) for x in a], [len(x) for x in b], mean_ci=mean_ci, seed=seed
    )


def evaluate(args) -> dict:
    judge = judging.make_judge(
        args.judge, model=args.judge_model, api_key_env=args.api_key_env, seed=args.seed
    )
    t0 = time.time()
    module, policy, sft, config = judging.load_run(args.workdir, args.step)
    tok = tokenizer_for(args, config)
    prompts, chosen = judging.read_prompts(prompts_file(args, config), args.num_prompts)
    sample = dict(
        max_new_tokens=args.max_new_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.batch_size,
    )
    pol, pol_len = judging.generate_texts(module, policy, tok, prompts, seed=args.seed, **sample)
    ref, ref_len = judging.generate_texts(module, sft, tok, prompts, seed=args.seed + 1, **sample)
    result = {"vs_sft": judge_pairs(judge, prompts, pol, ref, args.seed)}
    if chosen is not None:
        result["vs_chosen"] = judge_pairs(judge, prompts, pol, chosen, args.seed)
    rates = [result[k]["win_rate"] for k in ("vs_sft", "vs_chosen") if k in result]
    result["average"] = {"win_rate": sum(rates) / len(rates)}
    result["judge"] = judge.name
    if getattr(judge, "unparsed", 0):
        result["judge_unparsed_replies"] = judge.unparsed
    result["settings"] = {
        **sample,
        "num_prompts": len(prompts),
        "seed": args.seed,
        "policy_tokens_mean": float(pol_len.mean()),
        "sft_tokens_mean": float(ref_len.mean()),
        "seconds": round(time.time() - t0, 1),
    }
    work = pathlib.Path(args.workdir)
    with open(work / "winrate_samples.jsonl", "w") as f:
        for i, p in enumerate(prompts):
            row = {"prompt": p, "policy": pol[i], "sft": ref[i]}
            if chosen is not None:
                row["chosen"] = chosen[i]
            f.write(json.dumps(row) + "\n")
    (work / "winrate.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", required=True, help="the trained run (results are written here)")
    p.add_argument(
        "--judge", required=True, help="hf:<reward-model dir> | openai:<base URL> | gold"
    )
    p.add_argument("--judge-model", default="", help="model name for an openai: judge")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="env var holding the key")
    p.add_argument("--prompts", default="", help="JSONL(.gz) of held-out prompts")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokenizer", default="", help="default: the run's data.tokenizer")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.judge == "gold":
        p.error("--judge=gold scores token arrays of the gold task: dil_jax.evaluate does that")
    if not os.path.isdir(args.workdir):
        p.error(f"--workdir={args.workdir!r}: no such directory")
    with exit_on_bad_input():
        result = evaluate(args)
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
