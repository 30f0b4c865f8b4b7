"""backend=jax: the same job on Keras's JAX backend (training/steps.py: JaxSteps), its checkpoints, exact
resume and SavedModel; and which backend `auto` picks on which devices (backend.py)."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import (FAST_HYPERPARAMETERS, amazon_tsv, make_opt_ml, make_reviews, read_failure, run_train,
                      run_until_held_then_signal, train_in_process)
from review_trainer.training import checkpoints
from review_trainer.model.pretrained import ReviewTokenizer, open_checkpoint
from review_trainer.training.backend import choose

# pytest-xdist: the module's uninterrupted run, made once
pytestmark = pytest.mark.xdist_group("jax")

JAX_HYPERPARAMETERS = {
    **FAST_HYPERPARAMETERS, "backend": "jax", "epochs": "2", "log_every_n_steps": "1", "enable_checkpointing": "true",
    "checkpoint_every_n_steps": "100", "run_sample_predictions": "false",
}
STEPS = 16  # 2 epochs of 64 reviews in batches of 8


def jax_job(base, hyperparameters=None):
    return make_opt_ml(str(base), {
        "train": {"train.tsv": amazon_tsv(make_reviews(64, 31))},
        "validation": {"validation.tsv": amazon_tsv(make_reviews(16, 32))},
        "test": {"test.tsv": amazon_tsv(make_reviews(24, 33))},
    }, {**JAX_HYPERPARAMETERS, **(hyperparameters or {})})


def final_state(base):
    saved = checkpoints.CheckpointStore(os.path.join(base, "checkpoints"), keep=2).latest()
    with np.load(os.path.join(saved.path, checkpoints.STATE_FILE)) as arrays:
        return saved, [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, distilbert_dir):
    base = jax_job(tmp_path_factory.mktemp("jax"), {"explain_samples": "3", "explain_max_seconds": "600"})
    result = run_train(base, distilbert_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return base, result


def test_a_jax_job_trains_checkpoints_and_records_its_backend(uninterrupted, distilbert_dir):
    base, result = uninterrupted
    assert re.search(r"^hosts=algo-1 .* backend=jax precision=float32 xla=True backend_reason=backend=jax$",
                     result.stdout, re.M)
    losses = [float(v) for v in re.findall(r"^epoch=\d step=\d+ running_train_loss=(\S+)", result.stdout, re.M)]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    with open(os.path.join(base, "model", "manifest.json")) as f:
        assert json.load(f)["backend"] == "jax"
    saved, weights = final_state(base)
    assert saved.global_step == STEPS and saved.fingerprint["backend"] == "jax"
    # The checkpoint holds the trained state, written back from the jitted step (sync_model): the
    # optimizer's iteration count is the job's step count.
    with open(os.path.join(saved.path, checkpoints.MANIFEST_FILE)) as f:
        paths = [path for path, _ in json.load(f)["variables"]]
    assert int(weights[paths.index(next(p for p in paths if p.endswith("iteration")))]) == STEPS
    assert os.path.exists(os.path.join(base, "output", "success"))
    # Step 7 on JAX (insights.probability_function): the first 3 test reviews explained, each
    # one's attributions adding up to its probability minus the empty review's
    with open(os.path.join(base, "output", "data", "explanations", "explanations.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 3
    serve = tf.saved_model.load(os.path.join(base, "model", "tensorflow", "saved_model", "0")).signatures[
        "serving_default"]
    tokenizer = ReviewTokenizer(open_checkpoint(distilbert_dir), 16)
    served, empty = (serve(**dict(zip(("input_ids", "input_mask"), map(tf.constant, tokenizer(texts)))))[
        "probabilities"].numpy() for texts in ([r["text"] for r in records], [""]))
    for record, probabilities in zip(records, served):  # the JAX model's, as the SavedModel serves them
        assert record["probability"] == pytest.approx(probabilities.max(), abs=1e-4)
        assert record["base_value"] == pytest.approx(empty[0][probabilities.argmax()], abs=1e-4)
        assert sum(record["attributions"]) == pytest.approx(record["probability"] - record["base_value"], abs=1e-4)


def test_a_jax_job_stopped_by_sigterm_resumes_to_the_uninterrupted_weights(tmp_path, uninterrupted, distilbert_dir):
    base = jax_job(tmp_path / "spot")
    exit_code, log = run_until_held_then_signal(base, distilbert_dir, 5)  # mid-epoch: the rerun skips into the pass
    assert exit_code == 143, log[-3000:]
    assert read_failure(base).startswith("Stopped: the job received SIGTERM at step 5 of 16; a checkpoint of step 5")
    result = run_train(base, distilbert_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^resumed from .*/step-0*5: global step 5 of 16$", result.stdout, re.M)
    (_, resumed), (_, expected) = final_state(base), final_state(uninterrupted[0])
    assert len(resumed) == len(expected)
    for got, want in zip(resumed, expected):  # dropout seeds, Adam's moments and the step count included
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, equal_nan=False)


SAVED_MODEL_VERSUS_JAX_MODEL = r"""
import json, os, sys
os.environ["KERAS_BACKEND"] = "jax"
import keras, numpy as np
from review_trainer.training import checkpoints
from review_trainer.model.classifier import build_classifier
from review_trainer.model.pretrained import load_backbone, open_checkpoint
base, pretrained = sys.argv[1], sys.argv[2]
model = build_classifier(load_backbone(open_checkpoint(pretrained)), 5, 16)
model.compile(optimizer=keras.optimizers.Adam())
saved = checkpoints.CheckpointStore(base + "/checkpoints", keep=2).latest()
checkpoints.restore(model, saved)  # the job's final weights, into a model built on JAX
rng = np.random.default_rng(0)
ids = rng.integers(5, 60, (6, 16)).astype("int32")
mask = (np.arange(16) < rng.integers(3, 17, (6, 1))).astype("int32")
ids = ids * mask
jax_probabilities = np.asarray(keras.ops.softmax(model({"token_ids": ids, "padding_mask": mask}, training=False)))
import tensorflow as tf
serve = tf.saved_model.load(base + "/model/tensorflow/saved_model/0").signatures["serving_default"]
served = serve(input_ids=tf.constant(ids), input_mask=tf.constant(mask))["probabilities"].numpy()
print(json.dumps({"keras_backend": keras.backend.backend(), "jax": jax_probabilities.tolist(), "served": served.tolist()}))
"""


def test_the_saved_model_of_a_jax_job_gives_the_jax_models_probabilities(uninterrupted, distilbert_dir):
    base, _ = uninterrupted
    run = subprocess.run([sys.executable, "-c", SAVED_MODEL_VERSUS_JAX_MODEL, base, distilbert_dir],
                         capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["keras_backend"] == "jax"
    jax_probabilities, served = np.array(out["jax"]), np.array(out["served"])
    assert served.shape == (6, 5) and np.isfinite(served).all()
    # Trained weights give distinct rows; equal rows would also match a constant model.
    assert np.ptp(jax_probabilities[:, 0]) > 1e-4
    np.testing.assert_allclose(served, jax_probabilities, rtol=1e-5, atol=1e-6, equal_nan=False)


@pytest.mark.parametrize("hyperparameters, hosts, message", [
    ({"use_xla": "false"}, ("algo-1",), "use_xla=false, but backend=jax always compiles with XLA"),
    ({}, ("algo-1", "algo-2"), "backend=jax trains on one device, but this job would use distribution=multi_worker"),
])
def test_what_the_jax_step_cannot_do_fails_at_the_start_saying_what_to_set(tmp_path, distilbert_dir, hyperparameters,
                                                                           hosts, message, run_in_process):
    base = make_opt_ml(str(tmp_path), {"train": {"t.tsv": amazon_tsv(make_reviews(16))}},
                       {**JAX_HYPERPARAMETERS, **hyperparameters}, hosts=hosts)
    result = run_in_process(base, distilbert_dir)
    assert result.returncode == 2, result.stderr[-2000:]  # HyperparameterError
    assert read_failure(base).startswith(f"HyperparameterError: {message}")


def test_auto_runs_tensorflow_on_a_cpu(distilbert_job):
    _, result = distilbert_job
    assert re.search(r" backend=tensorflow .* backend_reason=auto: a CPU, where TensorFlow was measured faster than "
                     r"JAX \(README\)$",
                     result.stdout, re.M)


@pytest.mark.parametrize("devices, distribution, use_xla, expected", [
    ({"num_hosts": 1, "num_gpus": 0, "num_neurons": 0}, "auto", "auto", "tensorflow"),  # CPU: measured (README)
    ({"num_hosts": 1, "num_gpus": 1, "num_neurons": 0}, "auto", "auto", "jax"),  # one GPU: measured on an H100
    ({"num_hosts": 1, "num_gpus": 1, "num_neurons": 0}, "auto", False, "tensorflow"),  # JAX always compiles
    ({"num_hosts": 1, "num_gpus": 1, "num_neurons": 0}, "mirrored", "auto", "tensorflow"),  # a strategy named
    ({"num_hosts": 1, "num_gpus": 1, "num_neurons": 0}, "multi_worker", "auto", "tensorflow"),
    ({"num_hosts": 1, "num_gpus": 8, "num_neurons": 0}, "auto", "auto", "tensorflow"),  # MirroredStrategy
    ({"num_hosts": 1, "num_gpus": 8, "num_neurons": 0}, "none", "auto", "jax"),  # one of the GPUs
    ({"num_hosts": 2, "num_gpus": 1, "num_neurons": 0}, "auto", "auto", "tensorflow"),  # MultiWorkerMirroredStrategy
    ({"num_hosts": 2, "num_gpus": 1, "num_neurons": 0}, "none", "auto", "jax"),  # only the chief trains, on its GPU
    ({"num_hosts": 1, "num_gpus": 0, "num_neurons": 32}, "auto", "auto", "jax"),  # Trainium: jax-neuronx
])
def test_auto_picks_the_backend_of_the_readmes_table(devices, distribution, use_xla, expected):
    assert choose("auto", distribution=distribution, use_xla=use_xla, **devices)[0] == expected
    for requested in ("tensorflow", "jax"):  # a backend named is a backend used
        assert choose(requested, distribution=distribution, use_xla=use_xla, **devices) == (
            requested, f"backend={requested}")


def test_without_checkpoints_the_jax_job_evaluates_and_exports_its_trained_weights(tmp_path, uninterrupted,
                                                                                     distilbert_dir):
    """The end of training writes the jitted step's state back into the model (sync_model): without a
    checkpoint to do it earlier, the test metrics and the SavedModel must still be those of the
    trained weights, as in the checkpointed run (the same seeds and data, on the same CPU)."""
    base = jax_job(tmp_path / "no-checkpoints", {"enable_checkpointing": "false"})
    result = run_train(base, distilbert_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not os.path.exists(os.path.join(base, "checkpoints"))

    def test_metrics(job):
        with open(os.path.join(job, "output", "data", "evaluation.json")) as f:
            metrics = json.load(f)["multiclass_classification_metrics"]
        return {name: value["value"] for name, value in metrics.items() if isinstance(value, dict) and "value" in value}

    def test_loss(log):
        return float(re.search(r"^test_loss=(\S+)", log, re.M)[1])

    assert test_metrics(base) == test_metrics(uninterrupted[0])
    assert test_loss(result.stdout) == pytest.approx(test_loss(uninterrupted[1].stdout), abs=1e-6)


def test_a_checkpoint_of_the_jax_backend_is_not_resumed_where_auto_picks_tensorflow(tmp_path, uninterrupted,
                                                                                    distilbert_dir):
    """The backends draw different dropout masks: a resume across them would not be exact. Here auto,
    with a setting only the TensorFlow step runs (use_xla=false), picks TensorFlow, in a real job
    (in this process, on its TensorFlow backend)."""
    base = jax_job(tmp_path / "other", {"backend": "auto", "use_xla": "false", "epochs": "3"})
    shutil.copytree(os.path.join(uninterrupted[0], "checkpoints"), os.path.join(base, "checkpoints"))
    result = train_in_process(base, distilbert_dir)
    assert re.search(r" backend=tensorflow .*backend_reason=auto: use_xla=false, which only the TensorFlow step runs$",
                     result.stdout, re.M)
    assert result.returncode == 6, result.stderr[-2000:]  # CheckpointError
    assert "backend was 'jax', now 'tensorflow'" in read_failure(base)
