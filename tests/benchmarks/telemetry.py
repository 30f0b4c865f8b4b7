"""Benchmark (not a test): what watching a job costs, through the real `train` entry on movie5.

    .venv/bin/python tests/benchmarks/telemetry.py --data ../shared/data/movie5 --pretrained .venv/pretrained-model --rows 2000
    (make benchmark-telemetry ROWS=2000 does the same)

The same job (batch 32, up to 64 tokens, 2 epochs, train and validation channels) with all telemetry
on: the Debugger rules (each `log`), the profile report (sampling every 500 ms), TensorBoard and the
progress line every 10 steps, and Debugger tensors (debughookconfig.json: losses, metrics, the
gradient norm and the learning rate every 10 steps, every evaluation); and with all of it off
(rules off but the non-finite loss check, which cannot be). The runs alternate, off first, `--runs`
of each. Prints the second epoch's training samples/s (the epoch line's train_samples_per_second:
the training pass, after compilation) and the whole job's seconds of each run, and the overhead
of telemetry on each (1 - on / off, of the means). Target: under 3%.
"""

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from movie5 import run_job  # noqa: E402

BASE = {"epochs": "2", "learning_rate": "0.0001", "train_batch_size": "32", "max_seq_length": "64",
        "run_sample_predictions": "false"}
RULES = ("loss_not_decreasing", "overtraining", "early_stopping", "exploding_gradient", "vanishing_gradient",
         "class_imbalance")
ON = {**BASE, "enable_profiler": "true", "enable_tensorboard": "true", "log_every_n_steps": "10",
      **{f"rule_{name}": "log" for name in RULES}}
OFF = {**BASE, "enable_profiler": "false", "enable_tensorboard": "false", "log_every_n_steps": "1000000",
       **{f"rule_{name}": "off" for name in RULES}}
HOOK_CONFIG = {"HookParameters": {"save_interval": "10", "eval.save_interval": "1"},
               "CollectionConfigurations": [{"CollectionName": name} for name in
                                            ("losses", "metrics", "gradients", "optimizer_variables")]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/movie5")
    parser.add_argument("--pretrained", default=".venv/pretrained-model")
    parser.add_argument("--rows", type=int, help="train on the first ROWS training sentences (default: all)")
    parser.add_argument("--runs", type=int, default=2, help="jobs of each kind")
    args = parser.parse_args()
    results = {"off": [], "on": []}
    for _ in range(args.runs):
        for kind in ("off", "on"):
            log, seconds = run_job(args.data, args.pretrained, ON if kind == "on" else OFF,
                                   splits=("train", "validation"), rows=args.rows, echo=False,
                                   config_files={"debughookconfig.json": HOOK_CONFIG} if kind == "on" else None)
            speed = float(re.findall(r"\btrain_samples_per_second=(\S+)", log)[-1])
            if kind == "on":
                assert "debugger_tensors=" in log and re.search(r"^profile step_count=", log, re.M), "telemetry is off"
            results[kind].append((speed, seconds))
            print(f"telemetry {kind:<3} second-epoch samples/s {speed:7.1f}  job {seconds:6.1f} s", flush=True)
    mean = {kind: [sum(r[i] for r in runs) / len(runs) for i in (0, 1)] for kind, runs in results.items()}
    print(f"mean: off {mean['off'][0]:.1f} samples/s, {mean['off'][1]:.1f} s; on {mean['on'][0]:.1f} samples/s, "
          f"{mean['on'][1]:.1f} s")
    print(f"overhead of telemetry: training pass {1 - mean['on'][0] / mean['off'][0]:+.1%}, "
          f"whole job {mean['on'][1] / mean['off'][1] - 1:+.1%} (target: under 3%)")


if __name__ == "__main__":
    main()
