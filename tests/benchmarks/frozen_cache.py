"""Benchmark (not a test): the frozen encoder's cache (freeze_bert_layer=true), through the real `train` entry.

    .venv/bin/python tests/benchmarks/frozen_cache.py --data ../shared/data/movie5 --pretrained .venv/pretrained-model --rows 3000
    (make benchmark-frozen ROWS=3000 does the same)

For each head, a job with cache_frozen_encoder=true and one with false, on the same movie5 split
(the train split cut to --rows; validation and test whole), batch 32, up to 64 tokens, learning
rate 1e-3 (only the head learns), 3 epochs. Prints each epoch's training samples/s (the epoch
line's train_samples_per_second: the training pass, not validation), how much faster the epochs
after the first are than the first, the test accuracy of both jobs, and the cache's lines (at the
start and per epoch).
"""

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from movie5 import last, run_job  # noqa: E402

HYPERPARAMETERS = {"epochs": "3", "learning_rate": "0.001", "train_batch_size": "32", "max_seq_length": "64",
                   "freeze_bert_layer": "true", "run_sample_predictions": "false", "log_every_n_steps": "1000"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/movie5")
    parser.add_argument("--pretrained", default=".venv/pretrained-model")
    parser.add_argument("--rows", type=int, help="train on the first ROWS training sentences (default: all)")
    parser.add_argument("--heads", default="cls,bilstm")
    parser.add_argument("--caches", default="true,false", help="the cache_frozen_encoder values to run")
    parser.add_argument("hyperparameters", nargs="*", help="name=value pairs passed to the jobs")
    args = parser.parse_args()
    results = []
    for head in args.heads.split(","):
        for cache in args.caches.split(","):
            hyperparameters = {**HYPERPARAMETERS, "head": head, "cache_frozen_encoder": cache,
                               **dict(pair.split("=", 1) for pair in args.hyperparameters)}
            log, seconds = run_job(args.data, args.pretrained, hyperparameters, rows=args.rows, echo=False)
            speeds = [float(v) for v in re.findall(r"\btrain_samples_per_second=(\S+)", log)]
            cache_lines = "\n".join(re.findall(r"^frozen_encoder_cache[= ].*$", log, re.M))
            policy = re.search(r"\bprecision=(\S+)", log).group(1)
            results.append((head, cache, speeds, last("test_accuracy", log), seconds, policy, cache_lines))
            print(f"done: head={head} cache_frozen_encoder={cache} ({seconds:.0f} s)", flush=True)

    print(f"\ntraining rows: {args.rows or 'all'}; {os.cpu_count()} cores; samples/s of each epoch's training pass")
    print(f"{'head':<7} {'cache':<6} {'precision':<15} {'samples/s per epoch':<24} {'later/first':>11} "
          f"{'test accuracy':>13} {'job s':>6}")
    for head, cache, speeds, accuracy, seconds, policy, _ in results:
        later = sum(speeds[1:]) / len(speeds[1:]) if len(speeds) > 1 else float("nan")
        print(f"{head:<7} {cache:<6} {policy:<15} {', '.join(f'{s:.0f}' for s in speeds):<24} "
              f"{later / speeds[0]:>10.1f}x {accuracy:>13.4f} {seconds:>6.0f}")
    for head, cache, *_, cache_lines in results:
        if cache == "true":
            print(f"{head}:\n{cache_lines}")


if __name__ == "__main__":
    main()
