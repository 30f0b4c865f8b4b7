"""Benchmark (not a test): training samples per second with one worker and with two, in one script.

Both runs fine-tune the same checkpoint on the same movie5 sentences through the real `train`
entry with the same per-replica batch: one host, then two hosts (network namespaces `algo-1` and
`algo-2` on this machine, as root; see tests/hosts.py). The hosts share this machine's cores, so
the two-worker figure is for the record, not a target. On a machine with several GPUs, `--gpus`
runs the one-host job with distribution=none and then with distribution=mirrored instead.

    .venv/bin/python tests/benchmarks/distributed.py --data ../shared/data/movie5 --pretrained .venv/pretrained-model
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hosts import Hosts  # noqa: E402

TRAIN = os.path.join(os.path.dirname(sys.executable), "train")


def opt_ml(root, data_dir, hyperparameters, hosts, current_host):
    base = os.path.join(root, current_host)
    os.makedirs(os.path.join(base, "input", "data", "train"))
    shutil.copy(os.path.join(data_dir, "train.tsv"), os.path.join(base, "input", "data", "train"))
    config = os.path.join(base, "input", "config")
    os.makedirs(config)
    with open(os.path.join(config, "hyperparameters.json"), "w") as f:
        json.dump(hyperparameters, f)
    with open(os.path.join(config, "resourceconfig.json"), "w") as f:
        json.dump({"current_host": current_host, "hosts": list(hosts)}, f)
    return base


def env_for(base, pretrained):
    return dict(os.environ, SAGEMAKER_BASE_DIR=base, PRETRAINED_MODEL_DIR=os.path.abspath(pretrained),
                TF_CPP_MIN_LOG_LEVEL="2")


def speeds(log):
    """Samples/s of each epoch after the first (which includes tracing)."""
    return [float(v) for v in re.findall(r"\btrain_samples_per_second=(\S+)", log)][1:]


def one_host(data_dir, pretrained, hyperparameters):
    root = tempfile.mkdtemp(prefix="bench-one-host-")
    base = opt_ml(root, data_dir, hyperparameters, ["algo-1"], "algo-1")
    job = subprocess.run([TRAIN], env=env_for(base, pretrained), stdout=subprocess.PIPE, text=True)
    shutil.rmtree(root)
    if job.returncode:
        sys.exit(f"the one-host job failed:\n{job.stdout[-3000:]}")
    return job.stdout


def two_hosts(data_dir, pretrained, hyperparameters):
    root = tempfile.mkdtemp(prefix="bench-two-hosts-")
    names = ["algo-1", "algo-2"]
    bases = {host: opt_ml(root, data_dir, hyperparameters, names, host) for host in names}
    with Hosts(2) as hosts:
        jobs = {}
        for host, base in bases.items():
            with open(os.path.join(root, f"{host}.log"), "w") as log:
                jobs[host] = hosts.start(host, [TRAIN], env_for(base, pretrained), stdout=log)
        for job in jobs.values():
            job.wait()
    logs = {}
    for host in bases:
        with open(os.path.join(root, f"{host}.log")) as f:
            logs[host] = f.read()
    shutil.rmtree(root)
    if any(job.returncode for job in jobs.values()):
        sys.exit(f"the two-host job failed:\n{logs['algo-1'][-3000:]}\n{logs['algo-2'][-3000:]}")
    return logs["algo-1"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/movie5")
    parser.add_argument("--pretrained", default=".venv/pretrained-model")
    parser.add_argument("--steps", default="40", help="training steps per epoch (3 epochs; the first is not timed)")
    parser.add_argument("--gpus", action="store_true", help="one host: distribution=none, then mirrored")
    args = parser.parse_args()
    hyperparameters = {"epochs": "3", "train_steps_per_epoch": args.steps, "train_batch_size": "32",
                       "max_seq_length": "64", "learning_rate": "0.0001", "log_every_n_steps": "1000",
                       "run_validation": "false", "run_test": "false", "run_sample_predictions": "false"}
    runs = {}
    started = time.perf_counter()
    runs["one worker, one replica"] = one_host(args.data, args.pretrained, {**hyperparameters, "distribution": "none"})
    if args.gpus:
        runs["one host, MirroredStrategy over its GPUs"] = one_host(
            args.data, args.pretrained, {**hyperparameters, "distribution": "mirrored"})
    else:
        runs["two workers (two hosts), one replica each"] = two_hosts(args.data, args.pretrained, hyperparameters)
    print(f"per-replica batch 32, 64 tokens, {args.steps} steps per epoch, epochs 2-3 timed; "
          f"{time.perf_counter() - started:.0f} s in all")
    reference = None
    for name, log in runs.items():
        replicas = re.search(r"\breplicas=(\d+)", log)[1]
        rate = sum(speeds(log)) / len(speeds(log))
        reference = reference or rate
        print(f"{name:<44} replicas={replicas} samples/s={rate:7.1f} ratio={rate / reference:.2f}")


if __name__ == "__main__":
    main()
