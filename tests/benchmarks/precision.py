"""Benchmark (not a test): training-step speed per precision and XLA setting on this machine.

Each setting runs in its own process (the Keras dtype policy is global) on the same model and
batch: a real checkpoint's classifier (default all-MiniLM-L6-v2), batch 32, 64 tokens. Prints
samples per second and the ratio to float32 without XLA, the reference run of the same script.
This is the measurement behind `use_amp=auto` / `use_xla=auto` in precision.py.

    .venv/bin/python tests/benchmarks/precision.py --pretrained .venv/pretrained-model
"""

import argparse
import json
import os
import subprocess
import sys
import time

SETTINGS = [("float32", False), ("mixed_bfloat16", False), ("mixed_float16", False),
            ("float32", True), ("mixed_bfloat16", True)]


def measure(pretrained, policy, jit_compile, steps, batch_size, length):
    import keras
    import numpy as np
    from review_trainer.model.classifier import build_classifier
    from review_trainer.model.pretrained import load_backbone, open_checkpoint

    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    model = build_classifier(load_backbone(open_checkpoint(pretrained)), 5, length)
    model.compile(optimizer=keras.optimizers.Adam(1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit_compile)
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(1000, 20000, (batch_size, length)).astype("int32"),
         "padding_mask": np.ones((batch_size, length), "int32")}
    y = rng.integers(0, 5, batch_size).astype("int32")
    for _ in range(3):  # warm-up and compilation
        model.train_on_batch(x, y)
    started = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return steps * batch_size / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrained", default=".venv/pretrained-model")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: policy,xla
    args = parser.parse_args()
    if args.one:
        policy, xla = args.one.split(",")
        print(json.dumps(measure(args.pretrained, policy, xla == "1", args.steps, args.batch_size, args.length)))
        return
    results = {}
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    for policy, xla in SETTINGS:
        child = subprocess.run([sys.executable, __file__, "--pretrained", args.pretrained, "--steps", str(args.steps),
                                "--batch-size", str(args.batch_size), "--length", str(args.length),
                                "--one", f"{policy},{int(xla)}"], capture_output=True, text=True, env=env)
        if child.returncode != 0:
            print(f"{policy:<15} xla={xla!s:<5} failed: {child.stderr.strip().splitlines()[-1]}")
            continue
        results[policy, xla] = float(child.stdout.strip().splitlines()[-1])
        reference = results.get(("float32", False), results[policy, xla])
        print(f"{policy:<15} xla={xla!s:<5} {results[policy, xla]:8.1f} samples/s  "
              f"ratio to float32 without XLA: {results[policy, xla] / reference:.2f}", flush=True)


if __name__ == "__main__":
    main()
