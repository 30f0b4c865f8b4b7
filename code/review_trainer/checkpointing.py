"""Training-state checkpoints: saved atomically, verified on load, resumed exactly.

A checkpoint is a folder `step-<global step>` in the checkpoint directory:

    state.npz        every variable of the model (weights and dropout seed states) and of the
                     optimizer (iteration count, moments, the loss scale of float16), in the order
                     the rebuilt model lists them
    checkpoint.json  the global step, the fingerprint of the job, the variables' paths and shapes,
                     and the size and SHA-256 of state.npz; written last

The position in the training data is the global step itself: the training stream's batch n is the
same in every run (data.make_training_stream), and the seeds are hyperparameters. A checkpoint is
written into `.tmp-step-<n>`, fsynced, then renamed, so a killed job leaves either a complete
checkpoint or a temporary folder that is ignored and removed. Only the newest `keep` stay (what
SageMaker finds deleted locally it deletes from S3).
"""

import dataclasses
import json
import math
import os
import shutil
import time

import keras
import numpy as np
from review_trainer.data import sha256_file
from review_trainer.errors import CheckpointError

STATE_FILE = "state.npz"
MANIFEST_FILE = "checkpoint.json"
PREFIX = "step-"
TEMPORARY_PREFIX = ".tmp-"
TARGET_SHARE = 0.04  # auto interval: keep checkpointing under 5% of training time, with a margin
ASSUMED_WRITE_BYTES_PER_SECOND = 100e6  # before the first save has been timed

# Hyperparameters that change what training computes; the others (reporting, evaluation,
# checkpointing itself, epochs: a job may be resumed to train longer) may differ on resume.
TRAJECTORY_HYPERPARAMETERS = (
    "learning_rate", "epsilon", "train_batch_size", "train_steps_per_epoch", "seed", "head",
    "max_seq_length", "freeze_bert_layer", "text_column", "label_column", "classes",
)


def fingerprint(hp, train_channel, pretrained_checkpoint, precision):
    """What must be equal for a checkpoint to be resumed, as {component: value}."""
    components = {f"hyperparameter {name}": str(getattr(hp, name)) for name in TRAJECTORY_HYPERPARAMETERS}
    components["precision"] = precision
    components["pretrained weights sha256"] = sha256_file(os.path.join(pretrained_checkpoint.path, "model.safetensors"))
    for f in train_channel.files:
        components[f"train file {os.path.basename(f.path)} sha256"] = f.sha256
    return components


def differences(saved, current):
    """Plain-words list of what differs between two fingerprints."""
    lines = []
    for key in sorted(set(saved) | set(current)):
        if key not in current:
            lines.append(f"{key} was {saved[key]!r}, now absent")
        elif key not in saved:
            lines.append(f"{key} is {current[key]!r}, absent from the checkpoint")
        elif saved[key] != current[key]:
            lines.append(f"{key} was {saved[key]!r}, now {current[key]!r}")
    return lines


@dataclasses.dataclass(frozen=True)
class SavedCheckpoint:
    path: str
    global_step: int
    fingerprint: dict
    variable_shapes: list  # paths are kept for people: auto-named layers differ between processes


class CheckpointStore:
    def __init__(self, directory, keep, print_fn=print):
        self.directory = directory
        self.keep = keep
        self.print_fn = print_fn

    def save(self, variables, global_step, fingerprint_):
        """Writes a complete checkpoint atomically; returns the seconds it took."""
        started = time.perf_counter()
        os.makedirs(self.directory, exist_ok=True)
        name = f"{PREFIX}{global_step:09d}"
        temporary = os.path.join(self.directory, TEMPORARY_PREFIX + name)
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
        state_path = os.path.join(temporary, STATE_FILE)
        with open(state_path, "wb") as f:
            np.savez(f, *[keras.ops.convert_to_numpy(v.value) for v in variables])
            f.flush()
            os.fsync(f.fileno())
        manifest = {
            "global_step": global_step,
            "fingerprint": fingerprint_,
            "variables": [[v.path, list(v.shape)] for v in variables],
            "files": {STATE_FILE: {"size": os.path.getsize(state_path), "sha256": sha256_file(state_path)}},
        }
        with open(os.path.join(temporary, MANIFEST_FILE), "w") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(temporary)
        final = os.path.join(self.directory, name)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(temporary, final)
        _fsync_dir(self.directory)
        for old in self._complete_names()[:-self.keep]:
            shutil.rmtree(os.path.join(self.directory, old), ignore_errors=True)
        return time.perf_counter() - started

    def latest(self):
        """The newest checkpoint that verifies; corrupt ones are reported and skipped."""
        for name in reversed(self._complete_names()):
            path = os.path.join(self.directory, name)
            problem = _verify(path)
            if problem is None:
                with open(os.path.join(path, MANIFEST_FILE)) as f:
                    manifest = json.load(f)
                return SavedCheckpoint(path, manifest["global_step"], manifest["fingerprint"],
                                       [shape for _, shape in manifest["variables"]])
            self.print_fn(f"warning: skipping checkpoint {path}: {problem}")
        return None

    def remove_all(self):
        if os.path.isdir(self.directory):
            for name in os.listdir(self.directory):
                if name.startswith((PREFIX, TEMPORARY_PREFIX)):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def remove_temporary(self):
        """What a job killed while writing left behind."""
        if os.path.isdir(self.directory):
            for name in os.listdir(self.directory):
                if name.startswith(TEMPORARY_PREFIX):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def _complete_names(self):
        if not os.path.isdir(self.directory):
            return []
        return sorted(n for n in os.listdir(self.directory) if n.startswith(PREFIX))


def _verify(path):
    """None when the checkpoint is complete and intact, else what is wrong."""
    try:
        with open(os.path.join(path, MANIFEST_FILE)) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return f"no {MANIFEST_FILE} (incomplete)"
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return f"{MANIFEST_FILE} is corrupt ({error})"
    for name, expected in manifest.get("files", {}).items():
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            return f"{name} is missing"
        size = os.path.getsize(file_path)
        if size != expected["size"]:
            return f"{name} has {size} bytes, expected {expected['size']} (truncated)"
        if sha256_file(file_path) != expected["sha256"]:
            return f"{name} does not match its SHA-256 (corrupt)"
    return None


def training_variables(model):
    """The whole training state, in a fixed order: model variables then optimizer variables."""
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    return list(model.variables) + list(model.optimizer.variables)


def restore(model, saved):
    variables = training_variables(model)
    if [list(v.shape) for v in variables] != saved.variable_shapes:
        raise CheckpointError(
            f"the checkpoint {saved.path} holds {len(saved.variable_shapes)} variables whose shapes do not "
            f"match this model's {len(variables)}; set resume=false to start fresh"
        )
    with np.load(os.path.join(saved.path, STATE_FILE)) as arrays:
        for index, variable in enumerate(variables):
            variable.assign(arrays[f"arr_{index}"])


class Checkpointer(keras.callbacks.Callback):
    """Saves every `every_n_steps` steps (or an interval chosen from timings: "auto") and at each
    epoch end; on SIGTERM/SIGINT saves after the current step and stops the job.

    `store` is None when checkpointing is off: a signal then stops the job without saving. Only
    the chief host writes (`writes`); the others share its checkpoints.
    """

    def __init__(self, store, fingerprint_, global_step, total_steps, every_n_steps, stop_signal,
                 writes=True, print_fn=print):
        super().__init__()
        self.store = store if writes else None
        self.checkpointing_on = store is not None
        self.fingerprint = fingerprint_
        self.global_step = global_step
        self.total_steps = total_steps
        self.every_n_steps = every_n_steps
        self.stop_signal = stop_signal
        self.print_fn = print_fn
        self.last_saved_step = global_step
        self.saves = 0
        self.save_seconds = 0.0
        self.last_save_seconds = None
        self._step_seconds = []
        self._last_step_end = None
        self._state_bytes = None  # measured once: the first interval estimate needs it every step

    def on_train_batch_end(self, batch, logs=None):
        self.global_step += 1
        now = time.perf_counter()
        if self._last_step_end is not None:
            self._step_seconds.append(now - self._last_step_end)
        self._last_step_end = now
        if self.stop_signal.received:
            self._stop()
        if self.store is not None and self.global_step - self.last_saved_step >= self.interval():
            self._save()

    def on_test_batch_end(self, batch, logs=None):
        if self.stop_signal.received:  # during validation: the epoch's steps are done
            self._stop()

    def on_epoch_begin(self, epoch, logs=None):
        self._last_step_end = None  # validation time is not step time

    def on_epoch_end(self, epoch, logs=None):
        if self.store is not None and self.last_saved_step != self.global_step:
            self._save()

    def interval(self):
        """Steps between checkpoints: fixed, or so that saving stays under TARGET_SHARE of time."""
        if self.every_n_steps != "auto":
            return self.every_n_steps
        if len(self._step_seconds) < 3:
            return math.inf  # step time not known yet (the first steps compile)
        step_seconds = float(np.median(self._step_seconds[-50:]))
        save_seconds = self.last_save_seconds
        if save_seconds is None:
            if self._state_bytes is None:
                self._state_bytes = sum(np.prod(v.shape) * 4 for v in training_variables(self.model))
            save_seconds = self._state_bytes / ASSUMED_WRITE_BYTES_PER_SECOND
        return max(1, math.ceil(save_seconds / (TARGET_SHARE * step_seconds)))

    def _save(self):
        seconds = self.store.save(training_variables(self.model), self.global_step, self.fingerprint)
        self.saves += 1
        self.save_seconds += seconds
        self.last_save_seconds = seconds
        self.last_saved_step = self.global_step
        self.print_fn(f"checkpoint step={self.global_step} checkpoint_seconds={seconds:.3f} "
                      f"next_in_steps={self.interval()}")

    def _stop(self):
        if self.store is not None and self.last_saved_step != self.global_step:
            self._save()
        where = f"at step {self.global_step} of {self.total_steps}"
        if not self.checkpointing_on:
            raise self.stop_signal.stopped(
                f"{where}; checkpointing is off, so the progress is lost: set enable_checkpointing=true "
                "(or a CheckpointConfig) to make a stopped job resumable")
        if self.store is None:
            raise self.stop_signal.stopped(f"{where}; the chief host writes the checkpoint")
        raise self.stop_signal.stopped(
            f"{where}; a checkpoint of step {self.last_saved_step} is in {self.store.directory}: run the "
            "job again with the same checkpoint location (a spot job does this itself) to resume from it")


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
