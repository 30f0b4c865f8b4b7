"""Training-state checkpoints: saved atomically, verified on load, resumed exactly.

A checkpoint is a folder `step-<global step>` in the checkpoint directory:

    state.npz        every variable of the model (weights and dropout seed states) and of the
                     optimizer (iteration count, moments, the loss scale of float16), in the order
                     the rebuilt model lists them
    checkpoint.json  the global step, the fingerprint of the job, the variables' paths and shapes,
                     and the size and SHA-256 of state.npz; written last

The position in the training data is the global step itself: the training stream's batch n is the
same in every run (data/stream.py), and the seeds are hyperparameters. A checkpoint is
written into `.tmp-step-<n>`, fsynced, then renamed, so a killed job leaves either a complete
checkpoint or a temporary folder that is ignored and removed. Only the newest `keep` stay (what
SageMaker finds deleted locally it deletes from S3).
"""

import dataclasses
import errno
import json
import math
import os
import shutil
import time
import zipfile

import keras
import numpy as np
from review_trainer.contract.environment import make_writable_folder
from review_trainer.contract.errors import CheckpointError
from review_trainer.contract.files import sha256_file

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
    "max_seq_length", "freeze_bert_layer", "text_column", "label_column", "classes", "scale_learning_rate",
    "bucket_by_length",
)


def fingerprint(hp, train_channel, pretrained_checkpoint, precision, topology):
    """What must be equal for a checkpoint to be resumed, as {component: value}; the train channel
    gives its own part (its files' hashes, or how its passes stream: data/channels.py)."""
    components = {f"hyperparameter {name}": str(getattr(hp, name)) for name in TRAJECTORY_HYPERPARAMETERS}
    components["precision"] = precision
    components["backend"] = keras.backend.backend()  # the steps' random numbers differ between backends
    # The data each step reads and the global batch follow from these (train_batch_size is per replica).
    components["workers"] = str(topology.num_workers)
    components["replicas"] = str(topology.replicas)
    for name in ("config.json", "model.safetensors"):  # the config holds the dropout rates
        components[f"pretrained {name} sha256"] = sha256_file(os.path.join(pretrained_checkpoint.path, name))
    components.update(train_channel.fingerprint())
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
    position: dict = dataclasses.field(default_factory=dict)  # see Checkpointer.position


class CheckpointStore:
    def __init__(self, directory, keep, print_fn=print):
        self.directory = directory
        self.keep = keep
        self.print_fn = print_fn

    def save(self, variables, global_step, fingerprint_, position=None):
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
            "position": position or {},
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
                                       [shape for _, shape in manifest["variables"]], manifest.get("position", {}))
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


def open_store(directory, keep, resume, print_fn=print):
    """The chief's checkpoint folder, without what a killed job left half-written; one that cannot
    be created or written fails now, named, rather than at the first save."""
    try:
        make_writable_folder(directory)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise  # a full disk: ResourceError
        raise CheckpointError(
            f"the checkpoint folder {directory} cannot be created or written ({error.strerror or error}); "
            "set checkpointconfig.json's LocalPath (the Estimator's checkpoint_local_path) to a writable folder"
        ) from error
    store = CheckpointStore(directory, keep, print_fn)
    if not resume:
        print_fn(f"resume=false: deleting the checkpoints in {directory}")
        store.remove_all()
    store.remove_temporary()
    return store


_FRESH, _RESUMED, _FAILED = 0, 1, 2  # the chief's decision, as the other hosts receive it


def resume(store, model, fingerprint_, topology, total_steps, print_fn=print):
    """(global step, position) to start from: the newest checkpoint written by this same job, restored.

    Only the chief reads checkpoints (`store` is None on the other hosts). With several workers it
    sends its decision and the restored state to them, so its checkpoint folder is the only one
    that needs them (SageMaker restores the S3 checkpoints on every host; none but the chief's
    copy is read).
    """
    saved, error = None, None
    if store is not None:
        saved = store.latest()
        mismatch = saved and differences(saved.fingerprint, fingerprint_)
        if mismatch:
            error = CheckpointError(
                f"the checkpoint {saved.path} was written by a different job: {'; '.join(mismatch)}. Run with "
                "the original settings and data to resume, or set resume=false to delete the checkpoints and "
                "start fresh"
            )
        elif saved is not None:
            try:
                restore(model, saved)
            except CheckpointError as unusable:  # the other hosts are told below, then it is raised
                error = unusable
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as unreadable:
                error = CheckpointError(f"the checkpoint {saved.path} could not be read ({type(unreadable).__name__}: "
                                        f"{unreadable}); delete it, or set resume=false to start fresh")
    outcome = _FAILED if error else _RESUMED if saved else _FRESH
    position = saved.position if outcome == _RESUMED else {}
    decision = np.array([outcome, saved.global_step if outcome == _RESUMED else 0,
                         position.get("epochs_done", 0), position.get("epoch_start_step", 0)])
    if topology.num_workers > 1:
        decision = topology.broadcast_from_chief([decision])[0]
        if decision[0] == _RESUMED:
            variables = training_variables(model)
            values = topology.broadcast_from_chief([np.asarray(v.numpy()) for v in variables])
            for variable, value in zip(variables, values):
                variable.assign(value)
    if decision[0] == _FAILED:
        raise error or CheckpointError(
            f"the chief host {topology.hosts[0]} could not resume from its checkpoint; its failure file says why")
    if decision[0] == _RESUMED:
        where = saved.path if saved else f"the chief's checkpoint (sent by {topology.hosts[0]})"
        print_fn(f"resumed from {where}: global step {decision[1]} of {total_steps or '? (Pipe mode)'}")
    return int(decision[1]), {"epochs_done": int(decision[2]), "epoch_start_step": int(decision[3])}


class Checkpointer:
    """A training-loop hook: saves every `every_n_steps` steps (or at an interval chosen from
    timings: "auto"), at each epoch end, and when the job stops.

    `store` is None when checkpointing is off, and on every host but the chief: only the chief
    writes; the other hosts resume from the chief's checkpoint (see resume).
    """

    def __init__(self, store, fingerprint_, model, start_step, every_n_steps, checkpointing_on=True, print_fn=print,
                 position=None, resume_by_position=False, sync_model=None):
        self.store = store
        self.sync_model = sync_model or (lambda: None)  # TrainingLoop.sync_model: JAX trains outside the variables
        # Where the last epoch's training pass ended: a Pipe-mode job, whose epochs' lengths are
        # only known once read, resumes in epoch epochs_done + 1, skipping step - epoch_start_step
        # steps of its pass. (A stop during validation resumes in the next epoch, as in File mode.)
        self.position = position or {"epochs_done": 0, "epoch_start_step": 0}
        self._saved_position = self.position
        self.resume_by_position = resume_by_position  # the train passes say (data/channels.py): Pipe mode
        self.checkpointing_on = checkpointing_on
        self.fingerprint = fingerprint_
        self.model = model
        self.every_n_steps = every_n_steps
        self.print_fn = print_fn
        self.last_saved_step = start_step
        self.saves = 0
        self.save_seconds = 0.0
        self.last_save_seconds = None
        self._step_seconds = []
        self._last_step_end = None
        self._state_bytes = None  # measured once: the first interval estimate needs it every step

    def on_epoch_begin(self, epoch):
        self._last_step_end = None  # validation time is not step time

    def on_step_end(self, step, running=None, result=None):
        now = time.perf_counter()
        if self._last_step_end is not None:
            self._step_seconds.append(now - self._last_step_end)
        self._last_step_end = now
        if result is not None and not math.isfinite(result.loss):
            return  # weights after a non-finite loss are not worth resuming from (telemetry/rules.py stops the run)
        if self.store is not None and step - self.last_saved_step >= self.interval():
            self._save(step)

    def on_epoch_trained(self, epoch, step):
        """The epoch's training pass has ended (before validation)."""
        self.position = {"epochs_done": epoch, "epoch_start_step": step}

    def on_epoch_end(self, epoch, step, logs=None):
        if self.store is not None and (self.last_saved_step != step or self._position_unsaved()):
            self._save(step)

    def on_stop(self, step):
        """Saves the step the job stops at; returns what became of the progress."""
        if self.store is not None and (self.last_saved_step != step or self._position_unsaved()):
            self._save(step)
        if not self.checkpointing_on:
            return ("checkpointing is off, so the progress is lost: set enable_checkpointing=true "
                    "(or a CheckpointConfig) to make a stopped job resumable")
        if self.store is None:
            return "this host is not the chief; the chief host writes the checkpoint"
        return (f"a checkpoint of step {self.last_saved_step} is in {self.store.directory}: run the job again "
                "with the same checkpoint location (a spot job does this itself) to resume from it")

    def _position_unsaved(self):
        """A save at this very step (by interval) may hold the previous epoch's position: in Pipe
        mode it is saved again, since a resume would otherwise read a whole pass for nothing."""
        return self.resume_by_position and self._saved_position != self.position

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

    def _save(self, step):
        self.sync_model()
        seconds = self.store.save(training_variables(self.model), step, self.fingerprint, self.position)
        self._saved_position = self.position
        self.saves += 1
        self.save_seconds += seconds
        self.last_save_seconds = seconds
        self.last_saved_step = step
        self.print_fn(f"checkpoint step={step} checkpoint_seconds={seconds:.3f} next_in_steps={self.interval()}")


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
