"""Spot-safe training: checkpoints, exact resume, and a clean stop on SIGTERM.

The stop tests hold the step they name until the signal has arrived (conftest.run_until_held_then_signal),
so each stops after exactly that step."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import (FAST_HYPERPARAMETERS, amazon_tsv, make_opt_ml, make_reviews, read_failure,
                      run_until_held_then_signal, train_in_process)
from review_trainer.training import checkpoints

# pytest-xdist: the module's uninterrupted run, made once
pytestmark = pytest.mark.xdist_group("spot")

SPOT_HYPERPARAMETERS = {
    **FAST_HYPERPARAMETERS, "epochs": "2", "log_every_n_steps": "1", "checkpoint_every_n_steps": "4",
    "run_sample_predictions": "false", "run_test": "false",
}


def spot_job(base, hyperparameters=None):
    """A job with a CheckpointConfig, as managed spot training sets one: 12 steps per epoch."""
    make_opt_ml(base, {
        "train": {"train.tsv": amazon_tsv(make_reviews(96, 11))},
        "validation": {"validation.tsv": amazon_tsv(make_reviews(16, 12))},
    }, hyperparameters or SPOT_HYPERPARAMETERS)
    with open(os.path.join(base, "input", "config", "checkpointconfig.json"), "w") as f:
        json.dump({"LocalPath": os.path.join(base, "checkpoints"), "S3Uri": "s3://bucket/checkpoints"}, f)
    return base


def final_state(base):
    store = checkpoints.CheckpointStore(os.path.join(base, "checkpoints"), keep=2)
    saved = store.latest()
    with np.load(os.path.join(saved.path, checkpoints.STATE_FILE)) as arrays:
        return saved.global_step, [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, distilbert_dir):
    base = spot_job(str(tmp_path_factory.mktemp("uninterrupted")))
    result = train_in_process(base, distilbert_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return base, result


def test_checkpoints_every_n_steps_and_at_epoch_end_keeping_the_last_two(uninterrupted):
    base, result = uninterrupted
    saved_steps = [int(s) for s in re.findall(r"^checkpoint step=(\d+) checkpoint_seconds=", result.stdout, re.M)]
    assert saved_steps == [4, 8, 12, 16, 20, 24]  # every 4 steps; 12 and 24 are also epoch ends
    assert sorted(os.listdir(os.path.join(base, "checkpoints"))) == ["step-000000020", "step-000000024"]
    assert re.search(r"^checkpoints=6 checkpoint_seconds_total=\S+ training_seconds=\S+ checkpoint_share=\S+%$",
                     result.stdout, re.M)
    with open(os.path.join(base, "checkpoints", "step-000000024", checkpoints.MANIFEST_FILE)) as f:
        manifest = json.load(f)
    assert manifest["global_step"] == 24
    assert manifest["fingerprint"]["hyperparameter learning_rate"] == "0.001"
    assert any(path.endswith("seed_generator_state") for path, _ in manifest["variables"])  # dropout RNG
    assert any("adam/" in path or "iteration" in path for path, _ in manifest["variables"])  # optimizer


def test_sigterm_at_random_points_then_resume_ends_with_the_uninterrupted_weights(tmp_path, uninterrupted,
                                                                                   distilbert_dir):
    base = spot_job(str(tmp_path / "spot"))
    rng = random.Random(os.environ.get("SPOT_TEST_SEED", "3"))
    points = [rng.randint(1, 12), rng.randint(13, 23)]  # one in each of the 2 epochs of 12 steps
    for point in points:  # each run resumes from the last one's checkpoint and stops at the next point
        exit_code, log = run_until_held_then_signal(base, distilbert_dir, point)
        assert exit_code == 143, log[-3000:]
        failure = read_failure(base)
        assert re.match(rf"Stopped: the job received SIGTERM at step {point} of 24; a checkpoint of step {point} is "
                        r"in .*/checkpoints: run the job again with the same checkpoint location", failure), failure
        assert not os.path.exists(os.path.join(base, "model", "tensorflow"))
    result = train_in_process(base, distilbert_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^resumed from .*/checkpoints/step-\d+: global step \d+ of 24$", result.stdout, re.M)
    step, weights = final_state(base)
    expected_step, expected_weights = final_state(uninterrupted[0])
    assert step == expected_step == 24
    assert len(weights) == len(expected_weights)
    for got, expected in zip(weights, expected_weights):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, equal_nan=False)
    assert os.path.exists(os.path.join(base, "output", "success"))


def test_sigint_with_checkpointing_off_stops_with_its_own_exit_code_and_says_the_progress_is_lost(tmp_path,
                                                                                                  distilbert_dir):
    # SIGTERM with a checkpoint: the test above. Step 13 is epoch 2's first: the stop comes after it,
    # not at the end of epoch 1, where the training pass has ended and validation runs
    base = make_opt_ml(str(tmp_path), {"train": {"t.tsv": amazon_tsv(make_reviews(96))},
                                       "validation": {"v.tsv": amazon_tsv(make_reviews(16, 12))}}, SPOT_HYPERPARAMETERS)
    exit_code, log = run_until_held_then_signal(base, distilbert_dir, 13, signal.SIGINT)
    assert exit_code == 130, log[-3000:]
    assert re.match(r"Stopped: the job received SIGINT at step 13 of 24; checkpointing is off, so the "
                    r"progress is lost: set enable_checkpointing=true", read_failure(base))


def test_a_checkpoint_of_another_job_fails_with_what_differs_and_resume_false_starts_fresh(tmp_path, uninterrupted,
                                                                                            distilbert_dir):
    base = str(tmp_path / "job")
    shutil.copytree(uninterrupted[0], base)  # its checkpoints of steps 20 and 24, and its data
    with open(os.path.join(base, "input", "config", "checkpointconfig.json"), "w") as f:
        json.dump({"LocalPath": os.path.join(base, "checkpoints")}, f)  # the copy's own
    with open(os.path.join(base, "input", "data", "train", "train.tsv"), "ab") as f:
        f.write(amazon_tsv(make_reviews(8, 99)).split(b"\n", 1)[1])
    spot_job_config = os.path.join(base, "input", "config", "hyperparameters.json")
    with open(spot_job_config, "w") as f:
        json.dump({**SPOT_HYPERPARAMETERS, "learning_rate": "0.002"}, f)
    result = train_in_process(base, distilbert_dir)
    assert result.returncode == 6
    failure = read_failure(base).splitlines()[0]
    assert re.match(r"CheckpointError: the checkpoint .*/step-000000024 was written by a different job: "
                    r"hyperparameter learning_rate was '0.001', now '0.002'; train file train.tsv sha256 was "
                    r"'[0-9a-f]{64}', now '[0-9a-f]{64}'\. .*set resume=false", failure), failure
    with open(spot_job_config, "w") as f:
        json.dump({**SPOT_HYPERPARAMETERS, "learning_rate": "0.002", "resume": "false", "epochs": "1"}, f)
    result = train_in_process(base, distilbert_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resume=false: deleting the checkpoints" in result.stdout and "resumed from" not in result.stdout


def _tiny_model():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dropout(0.5)(inputs)))
    model.compile(optimizer="adam", loss="mse")
    model.train_on_batch(np.ones((2, 3)), np.ones((2, 2)))
    return model


def test_a_corrupt_or_truncated_checkpoint_is_skipped_with_a_warning(tmp_path):
    model = _tiny_model()
    warnings = []
    store = checkpoints.CheckpointStore(str(tmp_path), keep=3, print_fn=warnings.append)
    fingerprint = {"hyperparameter seed": "1"}
    for step in (1, 2, 3):
        store.save(checkpoints.training_variables(model), step, fingerprint)
    assert store.latest().global_step == 3
    state = tmp_path / "step-000000003" / checkpoints.STATE_FILE
    state.write_bytes(state.read_bytes()[:-10])
    assert store.latest().global_step == 2
    data = bytearray((tmp_path / "step-000000002" / checkpoints.STATE_FILE).read_bytes())
    data[-20] ^= 0xFF
    (tmp_path / "step-000000002" / checkpoints.STATE_FILE).write_bytes(bytes(data))
    assert store.latest().global_step == 1
    assert any("step-000000003: state.npz has" in w and "(truncated)" in w for w in warnings)
    assert any("step-000000002: state.npz does not match its SHA-256 (corrupt)" in w for w in warnings)


def test_restore_brings_back_weights_optimizer_state_and_dropout_seeds(tmp_path):
    model = _tiny_model()
    store = checkpoints.CheckpointStore(str(tmp_path), keep=2)
    store.save(checkpoints.training_variables(model), 1, {})
    expected = [keras.ops.convert_to_numpy(v.value).copy() for v in checkpoints.training_variables(model)]
    model.train_on_batch(np.ones((2, 3)), np.zeros((2, 2)))  # moves weights, moments, iterations, seeds
    fresh = _tiny_model()
    checkpoints.restore(fresh, store.latest())
    restored = [keras.ops.convert_to_numpy(v.value) for v in checkpoints.training_variables(fresh)]
    for got, want in zip(restored, expected):
        assert np.isfinite(want).all()
        np.testing.assert_array_equal(got, want)


KILL_WHILE_WRITING = r"""
import os, signal, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from test_spot_training import _tiny_model
from review_trainer.training import checkpoints
model = _tiny_model()
store = checkpoints.CheckpointStore(sys.argv[1], keep=2)
store.save(checkpoints.training_variables(model), 1, {})
real_savez = np.savez
def savez_then_die(file, *arrays):
    real_savez(file, *arrays)
    file.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # the state file is written, the manifest is not
np.savez = savez_then_die
store.save(checkpoints.training_variables(model), 2, {})
"""


def test_sigkill_while_writing_leaves_the_previous_checkpoint_intact_and_used(tmp_path):
    killed = subprocess.run([sys.executable, "-c", KILL_WHILE_WRITING, str(tmp_path), os.path.dirname(__file__)],
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert sorted(os.listdir(tmp_path)) == [".tmp-step-000000002", "step-000000001"]
    store = checkpoints.CheckpointStore(str(tmp_path), keep=2)
    assert store.latest().global_step == 1
    store.remove_temporary()
    assert os.listdir(tmp_path) == ["step-000000001"]


def test_auto_interval_keeps_saving_under_five_percent_of_step_time():
    checkpointer = checkpoints.Checkpointer(None, {}, None, 0, "auto")
    assert checkpointer.interval() == float("inf")  # step time not measured yet
    checkpointer._step_seconds = [0.5] * 10
    checkpointer.last_save_seconds = 2.0
    assert checkpointer.interval() == 100  # 2 s / (4% x 0.5 s): saving takes 4% of the time
    checkpointer.every_n_steps = 7
    assert checkpointer.interval() == 7


def test_the_position_of_an_epochs_end_is_saved_even_when_its_step_was_saved_before(tmp_path):
    """Pipe mode resumes from the position (an epoch's length is known only once its pass ended):
    a save at the pass's last step by interval, or a stop there, must not keep the previous epoch's."""
    store = checkpoints.CheckpointStore(str(tmp_path), keep=2)
    checkpointer = checkpoints.Checkpointer(store, {}, _tiny_model(), 0, 7, print_fn=lambda _: None,
                                              resume_by_position=True)
    checkpointer.on_step_end(7)  # the pass's last step, saved by interval before anyone knows
    assert store.latest().position == {"epochs_done": 0, "epoch_start_step": 0}
    checkpointer.on_epoch_trained(1, 7)
    checkpointer.on_epoch_end(1, 7)
    assert (store.latest().global_step, store.latest().position) == (7, {"epochs_done": 1, "epoch_start_step": 7})
    checkpointer.on_step_end(9)
    checkpointer.on_epoch_trained(2, 9)  # a stop during validation: resumes in epoch 3
    checkpointer.on_stop(9)
    assert (store.latest().global_step, store.latest().position) == (9, {"epochs_done": 2, "epoch_start_step": 9})
    assert checkpointer.saves == 3  # step 7 twice (interval, then its epoch end), step 9 at the stop


def test_a_host_without_a_store_saves_nothing_and_says_the_chief_writes():
    worker = checkpoints.Checkpointer(None, {}, _tiny_model(), 5, 1, checkpointing_on=True)
    worker.on_step_end(6)
    worker.on_epoch_end(1, 6)
    assert worker.on_stop(6) == "this host is not the chief; the chief host writes the checkpoint"
    assert worker.saves == 0  # the two-host run checks the worker's folders (test_distributed.py)


def test_a_checkpoint_folder_that_cannot_be_created_is_a_checkpoint_error_naming_it(tmp_path, distilbert_dir,
                                                                                     run_in_process):
    base = spot_job(str(tmp_path / "job"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with open(os.path.join(base, "input", "config", "checkpointconfig.json"), "w") as f:
        json.dump({"LocalPath": str(blocker / "checkpoints")}, f)
    result = run_in_process(base, distilbert_dir)
    assert result.returncode == 6, result.stderr[-2000:]
    assert read_failure(base).splitlines()[0] == (
        f"CheckpointError: the checkpoint folder {blocker}/checkpoints cannot be created or written (Not a directory); "
        "set checkpointconfig.json's LocalPath (the Estimator's checkpoint_local_path) to a writable folder")
