"""Training tensors in SageMaker Debugger's on-disk layout, written without smdebug.

SageMaker writes /opt/ml/input/config/debughookconfig.json when an estimator has a
`debugger_hook_config` or built-in `rules`; it uploads the folder named by its LocalPath, and its rule
containers read that folder with smdebug. smdebug cannot run beside TensorFlow 2.21, so this module
writes what smdebug 1.0.34's hook writes (smdebug/core/: locations.py, writer.py, tfevent/,
tfrecord/record_writer.py, collection_manager.py, access_layer/utils.py). Under LocalPath:

  collections/000000000/{worker}_collections.json   {"collections": {name: collection}, "_meta": {"num_workers": N}}
  events/{step:012d}/{step:012d}_{worker}.tfevents   one per saved global step: TFRecord-framed Event protos,
                                                     one per tensor (tag = tensor name, a TensorProto,
                                                     plugin_data "mode_step" and "mode")
  index/{step // 1000:09d}/{step:012d}_{worker}.json {"meta": {"mode", "mode_step", "event_file_name"},
                                                      "tensor_payload": [{"tensorname", "start_idx", "length"}],
                                                      "shape_payload": []}: where each record lies in the event file
  training_job_end.ts                                empty: the job has ended (not under SageMaker, as smdebug)

Steps, as smdebug counts them: a mode step counts the steps of one mode (TRAIN, EVAL) from 0, and save
configs apply to it; the global step counts the steps of every mode on one clock, so a global step
belongs to one mode. A job that trains and evaluates passes global step = train steps + evaluations
before it (one evaluation is one EVAL step). The reader asks trial.tensor("loss").value(step, mode=EVAL).
"""

import os
import re
import struct
import time
from dataclasses import asdict, dataclass

import numpy as np
from review_trainer.contract.files import write_bytes, write_json
from review_trainer.contract.hyperparameters import parse_bool
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

CHIEF_WORKER = "worker_0"
MODES = {"TRAIN": 1, "EVAL": 2, "PREDICT": 3, "GLOBAL": 4}  # smdebug's ModeKeys and their values
# smdebug's TensorFlow hooks save these collections whatever the config (tensorflow/base_hook.py).
ALWAYS_SAVED = ("metrics", "losses", "sm_metrics")
# smdebug's hook saves neither outside training (core/hook.py _get_collections_to_save_for_step).
TRAIN_ONLY = ("gradients", "optimizer_variables")

# The tensors the job writes, named as smdebug's TF2 Keras hook named them: the logs' "loss" in
# "losses" and the other logs ("accuracy") in "metrics", in TRAIN and in EVAL mode alike (train loss and
# validation loss are one tensor, two modes). The learning rate is an optimizer variable; the global L2
# norm of the gradients goes where the gradient rules look (VanishingGradient, ExplodingTensor).
LOSS, ACCURACY, LEARNING_RATE, GRADIENT_NORM = "loss", "accuracy", "learning_rate", "gradients/global_norm"
JOB_TENSORS = {LOSS: "losses", ACCURACY: "metrics", LEARNING_RATE: "optimizer_variables", GRADIENT_NORM: "gradients"}


@dataclass(frozen=True)
class SaveConfig:
    """When one collection is saved in one mode (smdebug's SaveConfigMode and its defaults)."""
    save_interval: int = 500
    start_step: int = 0
    end_step: int | None = None
    save_steps: tuple = ()

    @classmethod
    def from_settings(cls, settings):
        steps = settings.get("save_steps", ())
        if int(settings.get("save_interval", 500)) < 1:
            raise ValueError(f"save_interval must be at least 1, got {settings['save_interval']!r}")
        return cls(int(settings.get("save_interval", 500)), int(settings.get("start_step", 0)),
                   None if settings.get("end_step") is None else int(settings["end_step"]),
                   tuple(int(s) for s in (_split(steps) if isinstance(steps, str) else steps)))

    def should_save(self, mode_step):
        in_range = mode_step >= self.start_step and (self.end_step is None or mode_step < self.end_step)
        return mode_step in self.save_steps or (in_range and mode_step % self.save_interval == 0)


@dataclass(frozen=True)
class Collection:
    name: str
    save_configs: dict  # mode name -> SaveConfig
    include_regex: tuple = ()  # it also holds every tensor whose name one of these finds


@dataclass(frozen=True)
class HookConfig:
    """What debughookconfig.json asks for: where to write, which collections, when."""
    local_path: str
    collections: dict  # name -> Collection: the collections saved
    include_workers: str = "one"  # "one": the chief alone writes; "all": every worker

    @classmethod
    def from_json(cls, content, default_local_path):
        """Reads the file's content as smdebug does (core/json_config.py): values may be strings;
        HookParameters set every collection's defaults; a collection's own parameters override them;
        "train."/"eval." prefixed keys apply to one mode. The contract reads the file and says where
        tensors go without a LocalPath (default_local_path: SageMaker's output/tensors)."""
        hook = content.get("HookParameters") or {}
        hook_settings = _settings_by_mode(hook)
        regexes = {}  # smdebug's hook turns these two parameters into the collections "default" and "all"
        if "include_regex" in hook:
            regexes["default"] = _split(hook["include_regex"])
        if parse_bool(hook.get("save_all", False)):
            regexes["all"] = [".*"]
        configured = {}
        for entry in content.get("CollectionConfigurations") or []:
            if "CollectionName" not in entry:
                raise ValueError(f"a CollectionConfiguration without CollectionName: {entry}")
            configured[entry["CollectionName"]] = entry.get("CollectionParameters") or {}
        collections = {}
        for name in dict.fromkeys([*ALWAYS_SAVED, *regexes, *configured]):
            params = configured.get(name, {})
            regex = regexes.get(name, []) + (_split(params["include_regex"]) if "include_regex" in params else [])
            settings = _settings_by_mode(params, hook_settings)
            collections[name] = Collection(name, {m: SaveConfig.from_settings(s) for m, s in settings.items()},
                                           tuple(regex))
        return cls(content.get("LocalPath") or default_local_path, collections,
                   hook.get("include_workers", "one"))


class DebuggerTensorWriter:
    """Writes the declared tensors (name -> collection) of one worker at the steps the config asks for."""

    def __init__(self, config, tensors=JOB_TENSORS, worker=CHIEF_WORKER, num_workers=1, mark_end=True):
        """mark_end: write training_job_end.ts at the end, as smdebug's hook does outside SageMaker;
        under SageMaker the service marks it once the tensors are uploaded (the contract says which)."""
        self.out_dir, self.worker, self.mark_end = config.local_path, worker, mark_end
        # A tensor is saved in its own collection and in every collection whose include_regex finds it.
        self._collections = {name: [c for c in config.collections.values()
                                    if c.name == own or any(re.search(r, name) for r in c.include_regex)]
                             for name, own in tensors.items()}
        # smdebug's default (include_workers "one"): the chief writes, for a job of one worker.
        self.enabled = config.include_workers == "all" or worker == CHIEF_WORKER
        self._last_global_step = -1
        if self.enabled and os.path.exists(os.path.join(self.out_dir, "training_job_end.ts")):
            os.remove(os.path.join(self.out_dir, "training_job_end.ts"))  # an earlier run's: this one has not ended
        if self.enabled:  # now, not at the end: a rule's reader waits for this file before anything
            self._write_collections(config, num_workers if config.include_workers == "all" else 1)

    def should_save(self, name, step, mode="TRAIN"):
        """Whether the config asks for tensor `name` at mode step `step` of `mode`."""
        return self.enabled and any(c.save_configs[mode].should_save(step) for c in self._collections[name]
                                    if mode in ("TRAIN", "GLOBAL") or c.name not in TRAIN_ONLY)

    def write(self, step, values, mode="TRAIN", global_step=None):
        """Writes those of `values` (name -> float or small array) that the config asks for at mode step
        `step`; global_step (default `step`: a job that only trains) must grow from call to call.
        Returns the names written."""
        names = [name for name in values if self.should_save(name, step, mode)]
        if not names:
            return []
        global_step = step if global_step is None else global_step
        if global_step <= self._last_global_step:
            raise ValueError(f"global step {global_step} ({mode} step {step}) is not after the last one written, "
                             f"{self._last_global_step}: one global step is one step of one mode")
        self._last_global_step = global_step
        event_file = os.path.join("events", f"{global_step:012d}", f"{global_step:012d}_{self.worker}.tfevents")
        records, payload, wall_time = [], [], time.time()
        for name in names:
            record = _tfrecord(_event(wall_time, global_step, name, np.asarray(values[name]), mode, step))
            payload.append({"tensorname": name, "start_idx": sum(map(len, records)), "length": len(record)})
            records.append(record)
        write_bytes(os.path.join(self.out_dir, event_file), b"".join(records))
        # The index last: a reader that finds it finds the event file it points into.
        index = {"meta": {"mode": mode, "mode_step": step, "event_file_name": event_file},
                 "tensor_payload": payload, "shape_payload": []}
        index_file = os.path.join(self.out_dir, "index", f"{global_step // 1000:09d}",
                                  f"{global_step:012d}_{self.worker}.json")
        write_json(index, index_file, indent=None)
        return names

    def close(self):
        """Marks the end of the job (mark_end)."""
        if self.enabled and self.mark_end:
            write_bytes(os.path.join(self.out_dir, "training_job_end.ts"), b"")

    def _write_collections(self, config, num_workers):
        collections = {c.name: {"name": c.name, "include_regex": list(c.include_regex), "reduction_config": None,
                                "tensor_names": sorted(n for n, colls in self._collections.items() if c in colls),
                                "save_config": {m: asdict(s) for m, s in c.save_configs.items()},
                                "save_histogram": False} for c in config.collections.values()}
        content = {"collections": collections, "_meta": {"num_workers": num_workers}}
        path = os.path.join(self.out_dir, "collections", "000000000", f"{self.worker}_collections.json")
        write_json(content, path, indent=None)


class TensorHook:
    """A training-loop hook: each training step's loss, accuracy, learning rate and gradient norm
    (TRAIN mode) and each evaluation's loss and accuracy (EVAL mode), at the steps the config asks for.

    The loop's step n (from 1) is TRAIN mode step n - 1; evaluation k (from 0) is EVAL mode step k;
    the global step counts both, so evaluation k after training step n is global step n + k. A
    resumed job had `evaluations_done` evaluations before it."""

    def __init__(self, writer, learning_rate, evaluations_done=0):
        self.writer, self.learning_rate = writer, learning_rate
        self.evaluations = evaluations_done

    def on_step_end(self, step, running, result):
        self.writer.write(step - 1, {LOSS: np.float32(result.loss), ACCURACY: np.float32(result.accuracy),
                                     LEARNING_RATE: np.float32(self.learning_rate),
                                     GRADIENT_NORM: np.float32(result.gradient_norm)},
                          global_step=step - 1 + self.evaluations)

    def on_epoch_end(self, epoch, step, logs):
        if "val_loss" in logs:
            self.writer.write(self.evaluations, {LOSS: np.float32(logs["val_loss"]),
                                                 ACCURACY: np.float32(logs["val_accuracy"])},
                              mode="EVAL", global_step=step + self.evaluations)
            self.evaluations += 1

    def close(self):
        self.writer.close()


def _settings_by_mode(params, base=None):
    """{mode: save settings}: the unprefixed keys, then the mode's prefixed ones ("eval.save_interval"),
    over `base`'s (smdebug's parse_save_config_modes_dict)."""
    def keys(prefix):
        return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix) and k[len(prefix):] in _SAVE_KEYS}
    return {mode: {**(base or {}).get(mode, {}), **keys(""), **keys(mode.lower() + ".")} for mode in MODES}


_SAVE_KEYS = ("save_interval", "start_step", "end_step", "save_steps")


def _split(text):
    return [part.strip() for part in text.split(",")]


# The Event proto, hand-encoded: TensorFlow's SummaryMetadata has one plugin_data, smdebug's (and its
# files) two (mode_step, mode), so TensorFlow's classes cannot write it. Fields: Event{wall_time 1,
# step 2, summary 5}, Summary{value 1}, Value{tag 1, tensor 8, metadata 9}, SummaryMetadata{plugin_data 1},
# PluginData{plugin_name 1, content 2}, TensorProto{dtype 1, tensor_shape 2, tensor_content 4},
# TensorShapeProto{dim 2}, Dim{size 1, name 2}.
_DTYPES = {np.dtype(np.float32): 1, np.dtype(np.float64): 2, np.dtype(np.int32): 3, np.dtype(np.int64): 9,
           np.dtype(np.bool_): 10, np.dtype(np.float16): 19}  # tensorflow/core/framework/types.proto


def _event(wall_time, global_step, name, value, mode, mode_step):
    if value.dtype not in _DTYPES:
        raise TypeError(f"{name}: dtype {value.dtype} is not one smdebug reads")
    shape = b"".join(_bytes(2, _varint_field(1, d) + _bytes(2, f"{name}_{d}".encode())) for d in value.shape)
    content = np.ascontiguousarray(value).tobytes()
    tensor = _varint_field(1, _DTYPES[value.dtype]) + _bytes(2, shape) + _bytes(4, content)
    plugins = [("mode_step", str(mode_step)), ("mode", str(MODES[mode]))]
    metadata = b"".join(_bytes(1, _bytes(1, p.encode()) + _bytes(2, c.encode())) for p, c in plugins)
    summary_value = _bytes(1, name.encode()) + _bytes(8, tensor) + _bytes(9, metadata)
    return b"\x09" + struct.pack("<d", wall_time) + _varint_field(2, global_step) + _bytes(5, _bytes(1, summary_value))


def _varint(n):
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out) + bytes([n])


def _varint_field(number, value):
    return _varint(number << 3) + _varint(value) if value else b""  # proto3 leaves zeros out


def _bytes(number, payload):
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _tfrecord(data):
    """TFRecord framing as smdebug writes it: the length's masked CRC-32C, and in place of the data's
    a fixed one (of b"0x12345678"), which is what smdebug's reader checks."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + _NO_CHECKSUM


_NO_CHECKSUM = struct.pack("<I", masked_crc32c(b"0x12345678"))

