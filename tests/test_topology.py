"""The topology's decisions that need no second host: the strategy chosen, TF_CONFIG, the host list,
and how TensorFlow's errors are reported (the multi-host runs are in test_distributed.py)."""

import json
import os

import pytest
import tensorflow as tf
from conftest import (
    FAST_HYPERPARAMETERS,
    amazon_tsv,
    make_opt_ml,
    make_reviews,
    read_failure,
)
from review_trainer.training import topology
from review_trainer.contract.errors import HyperparameterError


@pytest.mark.parametrize("distribution, hosts, gpus, kind, reason", [
    ("auto", 1, 0, "none", "auto: one host with no GPU"),
    ("auto", 1, 1, "none", "auto: one host with one GPU"),
    ("auto", 1, 8, "mirrored", "auto: one host with 8 GPUs"),
    ("auto", 2, 8, "multi_worker", "auto: 2 hosts in resourceconfig.json"),
    ("multi_worker", 1, 0, "multi_worker", "distribution=multi_worker"),
    ("mirrored", 1, 0, "mirrored", "distribution=mirrored"),
    ("none", 3, 0, "none", "distribution=none on 3 hosts: only the chief trains (with ShardedByS3Key, on its own "
                           "files only), the other hosts stop at once"),
])
def test_the_strategy_follows_distribution_hosts_and_gpus(distribution, hosts, gpus, kind, reason):
    chosen, why = topology.choose(distribution, hosts, gpus)
    assert chosen == kind and why.startswith(reason)


def test_mirrored_on_several_hosts_is_refused_with_the_alternative():
    with pytest.raises(HyperparameterError, match="this job has 2 hosts: set distribution=multi_worker"):
        topology.choose("mirrored", 2, 8)


def test_tf_config_lists_the_sorted_hosts_on_the_fixed_port():
    assert topology.tf_config(("algo-1", "algo-2", "algo-3"), 1) == {
        "cluster": {"worker": ["algo-1:2222", "algo-2:2222", "algo-3:2222"]},
        "task": {"type": "worker", "index": 1},
    }


@pytest.mark.parametrize("resource_config, message", [
    ({"current_host": "algo-1", "hosts": []}, "hosts must be a non-empty list of host names, got []"),
    ({"current_host": "algo-1", "hosts": ["algo-1", "algo-2", "algo-1"]}, "hosts lists algo-1 more than once"),
    ({"current_host": "algo-9", "hosts": ["algo-1", "algo-2"]},
     "current_host 'algo-9' is not one of the hosts ['algo-1', 'algo-2']"),
])
def test_a_host_list_that_cannot_be_right_fails_at_the_start(tmp_path, distilbert_dir, resource_config, message,
                                                             run_in_process):
    base = make_opt_ml(str(tmp_path), {"train": {"t.tsv": amazon_tsv(make_reviews(8))}}, FAST_HYPERPARAMETERS)
    with open(os.path.join(base, "input", "config", "resourceconfig.json"), "w") as f:
        json.dump(resource_config, f)
    result = run_in_process(base, distilbert_dir)
    assert result.returncode == 7
    first_line = read_failure(base).splitlines()[0]
    assert first_line.startswith("ClusterError: ") and "resourceconfig.json: " + message in first_line, first_line
    assert not os.path.exists(os.path.join(base, "model")) or os.listdir(os.path.join(base, "model")) == []


def one_device():
    return topology.Topology(tf.distribute.get_strategy(), "none", "test", ("algo-1", "algo-2"), 0, 1)


def test_a_lost_host_is_named_from_tensorflows_task_index():
    two_workers = topology.Topology(tf.distribute.get_strategy(), "multi_worker", "test", ("algo-1", "algo-2"), 0, 2)
    error = tf.errors.UnavailableError(None, None, "{{function_node __inference_step_12}} Collective ops is aborted "
                                       "by: Error reported from /job:worker/task:1: tasks are unhealthy")
    lost = two_workers.lost_host(error, "training step 7")
    assert str(lost).startswith("algo-1 lost host algo-2 during training step 7 (UnavailableError: Collective ops "
                                "is aborted by: Error reported from /job:worker/task:1")
    with pytest.raises(tf.errors.UnavailableError), one_device().collectives("a step"):  # one worker: not a host
        raise error
    timed_out = two_workers.lost_host(tf.errors.DeadlineExceededError(None, None, "Collective timed out"), "a step")
    assert "lost contact with another host (none named by TensorFlow) (a collective outlasted its timeout" in str(timed_out)
    own_error = tf.errors.InternalError(None, None, "cuDNN launch failure")  # this host's own: not a lost host
    with pytest.raises(tf.errors.InternalError), two_workers.collectives("a step"):
        raise own_error
