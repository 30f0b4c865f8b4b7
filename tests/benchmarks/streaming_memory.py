"""Benchmark (not a test): reading a large channel streams it; memory does not grow with its size.

Writes Amazon-schema .tsv.gz channels of two sizes, then in a fresh process for each: scans the
channel and reads one full training pass (tokenized batches), and prints the peak resident memory
above the process's memory after start-up (the reference measured in the same process).

    .venv/bin/python tests/benchmarks/streaming_memory.py --pretrained .venv/pretrained-model
"""

import argparse
import gzip
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def write_channel(folder, rows):
    from conftest import AMAZON_COLUMNS, make_reviews

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "reviews.tsv.gz")
    rng = random.Random(0)
    with gzip.open(path, "wt", compresslevel=1) as f:
        f.write("\t".join(AMAZON_COLUMNS) + "\n")
        for start in range(0, rows, 10_000):
            for text, stars in make_reviews(min(10_000, rows - start), seed=start):
                body = " ".join([text] * rng.randint(1, 6))  # 30 to 200 characters, like short reviews
                values = ["US", "1", "R1", "B1", "1", "title", "Books", str(stars), "0", "0", "N", "Y", "h", body,
                          "2015-08-31"]
                f.write("\t".join(values) + "\n")
    return path


def measure(channel_dir, pretrained):
    import tensorflow as tf  # noqa: F401 - imported before the reference reading
    from review_trainer import data
    from review_trainer.model.pretrained import ReviewTokenizer, open_checkpoint

    spec = data.RowSpec("review_body", "star_rating", ("1", "2", "3", "4", "5"), 64)
    tokenizer = ReviewTokenizer(open_checkpoint(pretrained), 64)
    reference = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    channel = data.scan_channel("train", channel_dir, spec, 0.01)
    rows = 0
    one_pass = data.sharding.whole(channel).steps_per_pass(64)
    for _, labels in data.make_training_stream(channel, spec, tokenizer, 64, seed=1).take(one_pass):
        rows += int(labels.shape[0])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rows": rows, "seconds": round(time.perf_counter() - started, 1),
            "peak_above_startup_mb": round((peak - reference) / 1024, 1)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrained", default=".venv/pretrained-model")
    parser.add_argument("--rows", type=int, nargs=2, default=[100_000, 1_000_000])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.pretrained)))
        return
    with tempfile.TemporaryDirectory() as root:
        for rows in args.rows:
            folder = os.path.join(root, f"rows-{rows}")
            path = write_channel(folder, rows)
            with gzip.open(path, "rb") as f:
                uncompressed = sum(len(block) for block in iter(lambda: f.read(1 << 20), b""))
            child = subprocess.run([sys.executable, __file__, "--pretrained", args.pretrained, "--one", folder],
                                   capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
            if child.returncode:
                sys.exit(child.stderr[-2000:])
            result = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"{rows:>9,} rows, {uncompressed / 1e6:7.1f} MB of TSV: read in {result['seconds']:6.1f} s, "
                  f"peak memory above start-up {result['peak_above_startup_mb']:7.1f} MB", flush=True)


if __name__ == "__main__":
    main()
