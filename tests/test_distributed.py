"""Scale-out: MirroredStrategy over two logical CPU devices, MultiWorkerMirroredStrategy over two hosts
(network namespaces, see hosts.py), stops that agree, lost hosts, and the checkpoint's world size.

The checkpoint of these jobs has no dropout (tiny_pretrained.make_distilbert(dropout=0)), so a job
is determined by its data: one that splits each step's global batch over replicas or hosts must end
with the weights of a one-device job with the same global batch. 108 rows in batches of 16 leave
a last batch of 12, split 8 + 4 over two replicas: the loss must be a mean over the global batch,
not over each replica's part, for the weights to agree.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (FAST_HYPERPARAMETERS, TRAIN, amazon_tsv, make_opt_ml, make_reviews, read_failure, require,
                      train_env, train_in_process)
from hosts import Hosts
from injection import HOLDING, hold_step
from review_trainer.training import checkpoints

# pytest-xdist: network namespaces and the module's reference runs: one worker
pytestmark = pytest.mark.xdist_group("hosts")

TRAIN_ROWS = make_reviews(108, 21)
DISTRIBUTED_HYPERPARAMETERS = {
    **FAST_HYPERPARAMETERS, "epochs": "2", "log_every_n_steps": "1", "enable_checkpointing": "true",
    "checkpoint_every_n_steps": "4", "run_sample_predictions": "false",
}
STEPS = 14  # 2 epochs of ceil(108 / 16)
TWO_CPU_DEVICES = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from review_trainer.cli.train import main
sys.exit(main())
"""


def job(base, hyperparameters, hosts=("algo-1",), current_host="algo-1", train=None):
    return make_opt_ml(str(base), {
        "train": train or {"part-0.tsv": amazon_tsv(TRAIN_ROWS)},
        "validation": {"validation.tsv": amazon_tsv(make_reviews(20, 22))},
        "test": {"test.tsv": amazon_tsv(make_reviews(10, 23))},
    }, {**DISTRIBUTED_HYPERPARAMETERS, **hyperparameters}, hosts, current_host)


def model_weights(base):
    """The final checkpoint's step and {path: array} of the model's weights (not the optimizer's).

    Attention key biases are left out: their gradient is zero in exact arithmetic (a softmax ignores
    a constant added to every score), so Adam turns its rounding noise into steps of about the
    learning rate, different for every order of summation."""
    saved = checkpoints.CheckpointStore(os.path.join(base, "checkpoints"), keep=2).latest()
    with open(os.path.join(saved.path, checkpoints.MANIFEST_FILE)) as f:
        paths = [path for path, _ in json.load(f)["variables"]]
    with np.load(os.path.join(saved.path, checkpoints.STATE_FILE)) as arrays:
        return saved.global_step, {path: arrays[f"arr_{i}"] for i, path in enumerate(paths)
                                   if not path.startswith("adam/") and not path.endswith("/key/bias")}


def assert_same_weights(base, reference_base):
    step, weights = model_weights(base)
    reference_step, reference_weights = model_weights(reference_base)
    assert step == reference_step == STEPS
    assert weights.keys() == reference_weights.keys() and len(weights) > 20
    for path, expected in reference_weights.items():
        np.testing.assert_allclose(weights[path], expected, rtol=1e-5, atol=1e-6, err_msg=path, equal_nan=False)


def epoch_metrics(log):
    """[(epoch, step, train_loss, train_accuracy, val_loss, val_accuracy), ...] from the epoch lines."""
    return [tuple(float(v) for v in found) for found in re.findall(
        r"^epoch=(\d+) step=(\d+) train_loss=(\S+) train_accuracy=(\S+) val_loss=(\S+) val_accuracy=(\S+) ", log, re.M)]


def assert_same_metrics(log, reference_log):
    """The metrics of the whole global batch: as printed (4 decimals), summed in another order."""
    metrics, reference = epoch_metrics(log), epoch_metrics(reference_log)
    assert len(metrics) == len(reference) == 2
    for got, expected in zip(metrics, reference):
        assert got == pytest.approx(expected, abs=2e-4)


@pytest.fixture(scope="module")
def deterministic_dir(tmp_path_factory):
    from tiny_pretrained import make_distilbert

    return make_distilbert(str(tmp_path_factory.mktemp("no-dropout")), dropout=0.0)


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory, deterministic_dir):
    """The reference: one device, the global batch of 16."""
    base = job(tmp_path_factory.mktemp("one-device"), {"train_batch_size": "16", "distribution": "none"})
    result = train_in_process(base, deterministic_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distribution=none replicas=1 workers=1" in result.stdout
    return base, result.stdout


def run_on_two_cpu_devices(base, pretrained):
    return subprocess.run([sys.executable, "-c", TWO_CPU_DEVICES], env=train_env(base, pretrained),
                          capture_output=True, text=True, timeout=600)


def test_mirrored_on_two_devices_ends_with_the_weights_of_one_device_with_the_same_global_batch(
        tmp_path, deterministic_dir, one_device_run):
    # Half the one-device job's learning rate, scaled by the 2 replicas (scale_learning_rate): the same
    # optimizer steps, so the same weights
    base = job(tmp_path, {"train_batch_size": "8", "distribution": "mirrored", "learning_rate": "0.0005",
                          "scale_learning_rate": "true"})
    result = run_on_two_cpu_devices(base, deterministic_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("distribution=mirrored replicas=2 workers=1 worker_index=0 per_replica_batch=8 global_batch=16 "
            "reason=distribution=mirrored learning_rate=0.001 (scale_learning_rate: 0.0005 x 2 replicas)") in result.stdout
    assert f"training: 2 epoch(s) of {STEPS // 2} steps" in result.stdout
    saved = checkpoints.CheckpointStore(os.path.join(base, "checkpoints"), keep=2).latest()
    with open(os.path.join(saved.path, checkpoints.MANIFEST_FILE)) as f:
        paths = [path for path, _ in json.load(f)["variables"]]
    with np.load(os.path.join(saved.path, checkpoints.STATE_FILE)) as arrays:
        rates = [float(arrays[f"arr_{i}"]) for i, path in enumerate(paths) if path.endswith("learning_rate")]
    assert rates == [pytest.approx(0.001)]  # the optimizer's
    assert_same_weights(base, one_device_run[0])
    assert_same_metrics(result.stdout, one_device_run[1])
    with open(os.path.join(base, "model", "manifest.json")) as f:
        assert json.load(f)["distribution"] == {"strategy": "mirrored", "workers": 1, "replicas": 2}


# Several hosts: network namespaces, as root (CI runs as root).
@pytest.fixture(scope="module")
def two_hosts():
    require("root and iproute2, for network namespaces", Hosts.available())
    with Hosts(2) as hosts:
        yield hosts


def run_hosts(hosts, bases, pretrained, until=None, then=None, timeout=300, extra_env=None):
    """Runs `train` on each host (with extra_env[host] added to its environment); once until(host,
    log) holds, calls then(host). Returns {host: (exit code, log)}."""
    logs = {host: os.path.join(base, "train.log") for host, base in bases.items()}
    processes = {}
    for host, base in bases.items():
        env = train_env(base, pretrained, PYTHONUNBUFFERED="1", **(extra_env or {}).get(host, {}))
        with open(logs[host], "w") as log:
            processes[host] = hosts.start(host, [TRAIN], env, stdout=log, stderr=subprocess.STDOUT)
    acted, deadline = False, time.monotonic() + timeout
    while any(p.poll() is None for p in processes.values()) and time.monotonic() < deadline:
        if until and not acted:
            for host in bases:
                with open(logs[host]) as f:
                    if until(host, f.read()):
                        then(host)
                        acted = True
                        break
        time.sleep(0.05)
    for process in processes.values():
        if process.poll() is None:
            process.kill()
    results = {}
    for host, process in processes.items():
        with open(logs[host]) as f:
            results[host] = (process.wait(), f.read())
    return results


def two_host_bases(root, hyperparameters=None, trains=None):
    hosts = ("algo-1", "algo-2")
    return {host: job(os.path.join(root, host), {"train_batch_size": "8", **(hyperparameters or {})}, hosts, host,
                      train=(trains or {}).get(host)) for host in hosts}


@pytest.fixture(scope="module")
def two_host_run(tmp_path_factory, two_hosts, deterministic_dir):
    bases = two_host_bases(str(tmp_path_factory.mktemp("two-hosts")))
    results = run_hosts(two_hosts, bases, deterministic_dir)
    for host, (exit_code, log) in results.items():
        assert exit_code == 0, (host, log[-3000:])
    return bases, results


def test_two_hosts_train_one_model_with_the_weights_of_one_device_and_the_same_global_batch(
        two_host_run, one_device_run):
    bases, results = two_host_run
    chief, worker = results["algo-1"][1], results["algo-2"][1]
    for index, log in enumerate((chief, worker)):
        assert (f"distribution=multi_worker replicas=2 workers=2 worker_index={index} per_replica_batch=8 "
                f"global_batch=16 reason=auto: 2 hosts in resourceconfig.json") in log
        assert "channel=train sharding=record files=1 rows=108 job_rows=108 reason=FullyReplicated with 1 file(s) " \
               "for 2 workers: fewer files than workers, by record" in log
        assert_same_metrics(log, one_device_run[1])
    assert_same_weights(bases["algo-1"], one_device_run[0])
    assert os.path.exists(os.path.join(bases["algo-1"], "model", "tensorflow", "saved_model", "0", "saved_model.pb"))
    assert os.path.exists(os.path.join(bases["algo-1"], "output", "data", "evaluation.json"))
    assert "host algo-2 is done: the chief host algo-1 evaluates and exports" in worker
    # Only the chief writes: nothing in the worker's model, checkpoint and output data folders.
    for folder in ("model", "checkpoints", os.path.join("output", "data")):
        path = os.path.join(bases["algo-2"], folder)
        assert not os.path.exists(path) or os.listdir(path) == [], (folder, os.listdir(path))
    assert os.path.exists(os.path.join(bases["algo-2"], "output", "success"))


def test_two_hosts_in_pipe_mode_read_by_record_and_end_with_the_one_device_weights(
        tmp_path, two_hosts, deterministic_dir, one_device_run):
    """Pipe mode, FullyReplicated: each host streams the whole channel from its own FIFOs and keeps
    its share of each global batch; both reach the end of every pass at the same step."""
    from test_pipe_mode import as_pipe_job

    bases = two_host_bases(str(tmp_path))
    writers = []
    for base in bases.values():
        with open(os.path.join(base, "input", "config", "inputdataconfig.json")) as f:
            channels = {name: {} for name in json.load(f)}
        for name in channels:
            folder = os.path.join(base, "input", "data", name)
            channels[name] = {file: Path(folder, file).read_bytes() for file in os.listdir(folder)}
        writers += as_pipe_job(base, channels, "RecordIO", {"train": 2, "validation": 2, "test": 1})
    try:
        results = run_hosts(two_hosts, bases, deterministic_dir)
    finally:
        for writer in writers:
            writer.close()
    for host, (exit_code, log) in results.items():
        assert exit_code == 0, (host, log[-3000:])
        assert "channel=train input_mode=Pipe sharding=record" in log
        assert len(re.findall(r"^channel=train pipe=\S+/train_[01] objects=1 rows=108 bad_rows=0$", log, re.M)) == 2
        assert_same_metrics(log, one_device_run[1])
    assert_same_weights(bases["algo-1"], one_device_run[0])


def test_sigterm_to_one_host_stops_both_after_the_same_step_and_the_rerun_resumes_exactly(
        tmp_path, two_hosts, two_host_run, deterministic_dir):
    # algo-2 holds step 3 until its signal (injection.HOLD_STEP): both hosts stop after exactly that step
    bases = two_host_bases(str(tmp_path))
    results = run_hosts(two_hosts, bases, deterministic_dir,
                        until=lambda host, log: host == "algo-2" and HOLDING.format(step=3) in log,
                        then=lambda host: two_hosts.kill(host, signal.SIGTERM),
                        extra_env={"algo-2": hold_step(str(tmp_path / "inject"), 3)})
    assert [results[host][0] for host in ("algo-1", "algo-2")] == [143, 143], results
    chief = re.match(rf"Stopped: the job received SIGTERM \(on another host\) at step (\d+) of {STEPS}; a "
                     rf"checkpoint of step (\d+) is in .*/algo-1/checkpoints: run the job again", read_failure(bases["algo-1"]))
    worker = re.match(rf"Stopped: the job received SIGTERM at step (\d+) of {STEPS}; this host is not the chief",
                      read_failure(bases["algo-2"]))
    assert chief and worker, (read_failure(bases["algo-1"]), read_failure(bases["algo-2"]))
    stop_step = int(chief[1])
    assert int(chief[2]) == int(worker[1]) == stop_step == 3
    assert sorted(os.listdir(os.path.join(bases["algo-1"], "checkpoints")))[-1] == f"step-{stop_step:09d}"
    assert not os.path.exists(os.path.join(bases["algo-2"], "checkpoints"))

    results = run_hosts(two_hosts, bases, deterministic_dir)
    assert [results[host][0] for host in ("algo-1", "algo-2")] == [0, 0], results
    assert f"resumed from the chief's checkpoint (sent by algo-1): global step {stop_step} of {STEPS}" in results["algo-2"][1]
    assert_same_weights(bases["algo-1"], two_host_run[0]["algo-1"])


def test_a_rule_stops_every_host_after_the_same_step_and_the_chief_exports(tmp_path, two_hosts, deterministic_dir):
    # Every host evaluates the rules on the same job-wide sums of each step: no message is needed for
    # all of them to stop after the same one. A learning rate this high makes the loss rise.
    bases = two_host_bases(str(tmp_path), {"learning_rate": "0.9", "rule_loss_not_decreasing": "stop",
                                           "loss_not_decreasing_num_steps": "2"})
    results = run_hosts(two_hosts, bases, deterministic_dir)
    assert [results[host][0] for host in ("algo-1", "algo-2")] == [0, 0], results
    stops = [re.findall(r"^training stopped by rule loss_not_decreasing after step (\d+):", results[host][1], re.M)
             for host in ("algo-1", "algo-2")]
    assert len(stops[0]) == 1 and stops[0] == stops[1] and int(stops[0][0]) < STEPS, stops
    assert os.path.exists(os.path.join(bases["algo-1"], "model", "tensorflow", "saved_model", "0", "saved_model.pb"))
    with open(os.path.join(bases["algo-1"], "output", "data", "rules.json")) as f:
        assert json.load(f)["stopped_by"]["step"] == int(stops[0][0])
    assert "host algo-2 is done: the chief host algo-1 evaluates and exports" in results["algo-2"][1]
    assert not os.path.exists(os.path.join(bases["algo-2"], "model", "tensorflow"))


def test_a_lost_host_found_by_tensorflows_heartbeats_fails_the_other_naming_it(tmp_path, two_hosts, deterministic_dir):
    # ShardedByS3Key: each host has its own files (60 and 48 rows); an epoch is the steps of the larger.
    trains = {"algo-1": {"a.tsv": amazon_tsv(TRAIN_ROWS[:60])}, "algo-2": {"b.tsv": amazon_tsv(TRAIN_ROWS[60:])}}
    # A collective timeout longer than the harness waits (300 s): the loss must be found by TensorFlow's
    # heartbeats, and the message then names no timeout.
    bases = two_host_bases(str(tmp_path), {"epochs": "50", "collective_timeout_seconds": "600"}, trains)
    for base in bases.values():
        config = os.path.join(base, "input", "config", "inputdataconfig.json")
        with open(config, "w") as f:
            json.dump({name: {"TrainingInputMode": "File", "S3DistributionType": "ShardedByS3Key"}
                       for name in ("train", "validation", "test")}, f)
    results = run_hosts(two_hosts, bases, deterministic_dir,
                        until=lambda host, log: host == "algo-2" and "step=3 " in log,
                        then=lambda host: two_hosts.kill(host, signal.SIGKILL))
    assert results["algo-2"][0] == -signal.SIGKILL
    assert results["algo-1"][0] == 7, results["algo-1"][1][-3000:]
    failure = read_failure(bases["algo-1"])
    assert re.match(r"ClusterError: algo-1 lost host algo-2 during (training step \d+|validation after step \d+) ",
                    failure), failure
    assert "outlasted its timeout" not in failure
    assert ("sharding=channel files=1 rows=60 job_rows=108 rows_per_worker=60,48 "
            "reason=S3DistributionType=ShardedByS3Key") in results["algo-1"][1]
    assert "rows=48 job_rows=108 rows_per_worker=60,48 (this worker ends each pass with empty batches)" in \
        results["algo-2"][1]
    assert "training: 50 epoch(s) of 8 steps" in results["algo-1"][1]  # ceil(60 / 8): the host with more rows
    assert not os.path.exists(os.path.join(bases["algo-1"], "model", "tensorflow"))


def test_a_host_that_never_comes_up_is_named_within_host_wait_seconds(tmp_path, two_hosts, deterministic_dir):
    bases = two_host_bases(str(tmp_path), {"host_wait_seconds": "2"})
    results = run_hosts(two_hosts, {"algo-1": bases["algo-1"]}, deterministic_dir, timeout=120)
    assert results["algo-1"][0] == 7  # not killed by the harness after 120 s
    assert read_failure(bases["algo-1"]).startswith(
        "ClusterError: host(s) algo-2 did not answer on port 2222 within host_wait_seconds=2")


def test_resuming_with_another_number_of_hosts_fails_with_what_differs(tmp_path, two_host_run, deterministic_dir):
    base = str(tmp_path / "one-host")
    shutil.copytree(two_host_run[0]["algo-1"], base)
    with open(os.path.join(base, "input", "config", "resourceconfig.json"), "w") as f:
        json.dump({"current_host": "algo-1", "hosts": ["algo-1"]}, f)
    result = train_in_process(base, deterministic_dir)
    assert result.returncode == 6, result.stderr[-2000:]
    assert re.match(r"CheckpointError: the checkpoint .*/step-0+14 was written by a different job: replicas was '2', "
                    r"now '1'; workers was '2', now '1'\. .*set resume=false", read_failure(base)), read_failure(base)
