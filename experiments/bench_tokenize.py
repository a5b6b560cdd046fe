"""Tokenisation throughput on the UltraFeedback subset: cold (read, render, tokenise) and cached.

  python experiments/bench_tokenize.py [--repeat 4] [--num_proc 1] [--max_length 1024]

Builds the training split of ``configs/dil_ultrafeedback_debug.py`` (1,000 prompt/chosen/rejected
rows from ``../shared/data``, Mistral-v0.3 chat template, joint prompt+response tokenisation
with the boundary check) twice into a fresh cache directory and prints rows per second for
each: the first build does everything, the second only hashes the inputs and loads the cached
arrays. ``--repeat`` concatenates the file with itself to time a larger dataset. The tokenizer
is loaded once beforehand, so its import time is not counted.
"""

from __future__ import annotations

import argparse
import gzip
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="copies of the 1,000 rows")
    parser.add_argument("--num_proc", type=int, default=1, help="datasets.map processes")
    parser.add_argument("--max_length", type=int, default=1024)
    args = parser.parse_args(argv)

    from dil_jax import config_files
    from dil_jax.data import pipeline, tokenize

    config = config_files.load(REPO / "configs" / "dil_ultrafeedback_debug.py").get_config()
    source = pathlib.Path(config.data.train_files[0])
    if not source.exists():
        sys.exit(f"needs the real data folder: {source} is missing")
    with tempfile.TemporaryDirectory() as tmp:
        data_file = pathlib.Path(tmp) / "train.jsonl.gz"
        raw = gzip.decompress(source.read_bytes())
        data_file.write_bytes(gzip.compress(raw * args.repeat, compresslevel=1))
        d = config.data
        d.train_files, d.eval_files, d.num_eval = (str(data_file),), (), 0
        d.max_length = args.max_length
        d.max_prompt_length = args.max_length // 2
        d.buckets = ()
        d.num_proc = args.num_proc
        d.cache_dir = str(pathlib.Path(tmp) / "cache")
        config.model.vocab_size = 32768
        config.model.max_position_embeddings = args.max_length
        tokenize.load_tokenizer(d.tokenizer)  # warm the imports

        rows = 1000 * args.repeat
        for label in ("cold", "cached"):
            start = time.perf_counter()
            train, _, _ = pipeline.build_datasets(config)
            seconds = time.perf_counter() - start
            counts = train.report["train"]
            print(
                f"{label:>6}: {rows} rows in {seconds:7.2f} s = {rows / seconds:9.0f} rows/s "
                f"({len(train)} kept, {counts['num_bad_records']} skipped, "
                f"{counts.get('tokens', 0) or int(train.lengths.sum())} tokens)"
            )


if __name__ == "__main__":
    main()
