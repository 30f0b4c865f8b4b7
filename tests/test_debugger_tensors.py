"""SageMaker Debugger's tensors (review_trainer.telemetry.debugger_tensors): debughookconfig.json read as smdebug
reads it, and the files read back by smdebug's own reader (tests/smdebug_reader.py in .venv-smdebug;
`make smdebug`, `make test` makes it: skipped without it here, failed in CI)."""

import json
import os
import subprocess

import numpy as np
import pytest
from conftest import REPO, require
from local_mode import write_network_guard
from review_trainer.telemetry.debugger_tensors import JOB_TENSORS, DebuggerTensorWriter, HookConfig, SaveConfig

SMDEBUG_PYTHON = os.path.join(REPO, ".venv-smdebug", "bin", "python")
READER = os.path.join(REPO, "tests", "smdebug_reader.py")


SAGEMAKER_DEFAULT = "/opt/ml/output/tensors"  # where SageMaker's tensors go without a LocalPath


def hook_config(content, default_local_path=SAGEMAKER_DEFAULT):
    return HookConfig.from_json(content, default_local_path)


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, _, names in os.walk(folder) for name in names)


# debughookconfig.json

def test_defaults_are_smdebugs_every_500_steps_into_opt_ml_output_tensors():
    config = hook_config({"S3OutputPath": "s3://bucket/debug"})
    assert config.local_path == "/opt/ml/output/tensors" and config.include_workers == "one"
    # smdebug's TensorFlow hooks save these whatever the file says; nothing else without a CollectionConfiguration.
    assert set(config.collections) == {"losses", "metrics", "sm_metrics"}
    for collection in config.collections.values():
        assert collection.save_configs == dict.fromkeys(["TRAIN", "EVAL", "PREDICT", "GLOBAL"],
                                                        SaveConfig(500, 0, None, ()))
    assert hook_config({"HookParameters": None, "CollectionConfigurations": None}) == config


def test_string_values_and_collection_settings_over_hook_settings_per_mode():
    config = hook_config({
        "LocalPath": "/tmp/tensors",
        "HookParameters": {"save_interval": "10", "eval.save_interval": "1", "start_step": "5",
                           "include_workers": "all"},
        "CollectionConfigurations": [
            {"CollectionName": "gradients",
             "CollectionParameters": {"save_interval": "3", "end_step": "30", "save_steps": "1, 2"}},
            {"CollectionName": "losses", "CollectionParameters": {"train.save_interval": "4"}},
            {"CollectionName": "weights"},
        ]})
    assert config.local_path == "/tmp/tensors" and config.include_workers == "all"
    assert set(config.collections) == {"losses", "metrics", "sm_metrics", "gradients", "weights"}
    gradients = config.collections["gradients"].save_configs
    # The collection's own unprefixed interval beats the hook's "eval." one; the rest comes from the hook.
    assert gradients["TRAIN"] == gradients["EVAL"] == SaveConfig(3, 5, 30, (1, 2))
    losses = config.collections["losses"].save_configs
    assert [losses[mode] for mode in ("TRAIN", "EVAL", "PREDICT")] == [SaveConfig(4, 5), SaveConfig(1, 5),
                                                                       SaveConfig(10, 5)]
    assert config.collections["weights"].save_configs["TRAIN"] == SaveConfig(10, 5)


def test_save_steps_start_and_end():
    save = SaveConfig(save_interval=3, start_step=5, end_step=30, save_steps=(1, 2))
    assert [step for step in range(40) if save.should_save(step)] == [1, 2, 6, 9, 12, 15, 18, 21, 24, 27]


def test_include_regex_puts_tensors_in_more_collections_and_save_all_in_every_one(tmp_path):
    config = hook_config({
        "LocalPath": str(tmp_path), "HookParameters": {"save_interval": "100"},
        "CollectionConfigurations": [{"CollectionName": "schedule", "CollectionParameters": {
            "include_regex": "learning_rate,^nothing$", "save_interval": "7"}}]})
    writer = DebuggerTensorWriter(config)
    assert [s for s in range(15) if writer.should_save("learning_rate", s)] == [0, 7, 14]  # not its own collection's
    assert [s for s in range(15) if writer.should_save("loss", s)] == [0]
    with open(tmp_path / "collections" / "000000000" / "worker_0_collections.json") as f:
        assert json.load(f)["collections"]["schedule"]["tensor_names"] == ["learning_rate"]

    everything = hook_config({"LocalPath": str(tmp_path / "all"),
                                       "HookParameters": {"save_all": "true", "save_interval": "2"}})
    assert everything.collections["all"].include_regex == (".*",)
    assert [s for s in range(5) if DebuggerTensorWriter(everything).should_save("learning_rate", s)] == [0, 2, 4]
    with pytest.raises(ValueError, match="true or false"):
        hook_config({"HookParameters": {"save_all": "maybe"}})


def test_a_collection_without_a_name_is_refused():
    with pytest.raises(ValueError, match="CollectionName"):
        hook_config({"CollectionConfigurations": [{"CollectionParameters": {"save_interval": "1"}}]})


def test_local_path_defaults_to_the_jobs_own_output_folder():
    config = hook_config({"HookParameters": {"save_interval": "9"}}, "/base/output/tensors")
    assert config.local_path == "/base/output/tensors" and config.collections["losses"].save_configs["EVAL"] == SaveConfig(9)
    assert hook_config({"LocalPath": "/x"}, "/base/output/tensors").local_path == "/x"


# The writer

def test_gradients_and_optimizer_variables_are_saved_in_training_only(tmp_path):
    config = hook_config({"LocalPath": str(tmp_path), "HookParameters": {"save_interval": "1"},
                                   "CollectionConfigurations": [{"CollectionName": "gradients"},
                                                                {"CollectionName": "optimizer_variables"}]})
    writer = DebuggerTensorWriter(config)
    assert all(writer.should_save(name, 3) for name in JOB_TENSORS)
    assert [name for name in JOB_TENSORS if writer.should_save(name, 3, mode="EVAL")] == ["loss", "accuracy"]


def test_a_global_step_is_one_step_of_one_mode(tmp_path):
    config = hook_config({"LocalPath": str(tmp_path), "HookParameters": {"save_interval": "1"}})
    writer = DebuggerTensorWriter(config)
    writer.write(0, {"loss": 1.0})
    with pytest.raises(ValueError, match="global step 0 .EVAL step 0. is not after the last one written, 0"):
        writer.write(0, {"loss": 2.0}, mode="EVAL")
    assert writer.write(0, {"loss": 2.0}, mode="EVAL", global_step=1) == ["loss"]


def test_only_the_chief_writes_unless_every_worker_is_asked_for(tmp_path):
    one = hook_config({"LocalPath": str(tmp_path / "one"), "HookParameters": {"save_interval": "1"}})
    worker = DebuggerTensorWriter(one, worker="worker_1", num_workers=2)
    assert worker.write(0, {"loss": 1.0}) == []
    worker.close()
    assert not os.path.exists(tmp_path / "one")

    every = hook_config({"LocalPath": str(tmp_path / "all"),
                                  "HookParameters": {"save_interval": "1", "include_workers": "all"}})
    worker = DebuggerTensorWriter(every, worker="worker_1", num_workers=2)
    worker.write(0, {"loss": 1.0})
    assert files_under(tmp_path / "all") == ["collections/000000000/worker_1_collections.json",
                                             "events/000000000000/000000000000_worker_1.tfevents",
                                             "index/000000000/000000000000_worker_1.json"]
    with open(tmp_path / "all" / "collections" / "000000000" / "worker_1_collections.json") as f:
        assert json.load(f)["_meta"] == {"num_workers": 2}


def test_no_end_marker_under_sagemaker_which_marks_the_end_itself(tmp_path):
    writer = DebuggerTensorWriter(hook_config({"LocalPath": str(tmp_path)}), mark_end=False)
    writer.close()
    assert files_under(tmp_path) == ["collections/000000000/worker_0_collections.json"]


def test_records_are_tensorflow_events_where_the_index_points(tmp_path):
    """Read with TensorFlow, not with the module: its TFRecord framing and its Event proto."""
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    def tf_record(data):  # one record as tf.io.TFRecordWriter frames it
        path = str(tmp_path / "tf.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            writer.write(data)
        with open(path, "rb") as f:
            return f.read()

    kernel = np.arange(6, dtype=np.float32).reshape(2, 3)
    config = hook_config({"LocalPath": str(tmp_path / "tensors"), "HookParameters": {"save_interval": "1"},
                                   "CollectionConfigurations": [{"CollectionName": "weights"}]})
    writer = DebuggerTensorWriter(config, tensors={**JOB_TENSORS, "dense/kernel": "weights"})
    values = {"loss": 0.25, "accuracy": np.float32(0.5), "learning_rate": 0.1, "dense/kernel": kernel}
    assert writer.write(1001, values) == ["loss", "accuracy", "dense/kernel"]  # no optimizer_variables asked for
    writer.close()
    event_file = "events/000000001001/000000001001_worker_0.tfevents"
    assert files_under(tmp_path / "tensors") == ["collections/000000000/worker_0_collections.json", event_file,
                                                 "index/000000001/000000001001_worker_0.json", "training_job_end.ts"]
    with open(tmp_path / "tensors" / "index" / "000000001" / "000000001001_worker_0.json") as f:
        index = json.load(f)
    assert index["meta"] == {"mode": "TRAIN", "mode_step": 1001, "event_file_name": event_file}
    assert [t["tensorname"] for t in index["tensor_payload"]] == ["loss", "accuracy", "dense/kernel"]
    assert index["shape_payload"] == []
    with open(tmp_path / "tensors" / event_file, "rb") as f:
        content = f.read()
    assert sum(t["length"] for t in index["tensor_payload"]) == len(content)
    for entry in index["tensor_payload"]:
        record = content[entry["start_idx"]:entry["start_idx"] + entry["length"]]
        data = record[12:-4]
        assert record[:12] == tf_record(data)[:12]  # the length and its masked CRC-32C
        assert record[-4:] == tf_record(b"0x12345678")[-4:]  # smdebug's fixed checksum in place of the data's
        event = event_pb2.Event.FromString(data)
        (value,) = event.summary.value
        assert (event.step, value.tag) == (1001, entry["tensorname"])
        array = tf.make_ndarray(value.tensor)
        expected = np.asarray(values[entry["tensorname"]])
        assert array.dtype == expected.dtype and np.array_equal(array, expected)


# smdebug's reader, the oracle

STEPS_PER_EPOCH, EPOCHS = 4, 2
KERNEL = np.arange(6, dtype=np.float32).reshape(2, 3)


def train_values(step):
    return {"loss": 1 / (step + 1), "accuracy": np.float32((step + 1) / 8), "learning_rate": 0.001 * (step + 1),
            "gradients/global_norm": 2.0 ** -step, "weights/dense/kernel": KERNEL * step}


def eval_values(evaluation):
    return {"loss": 0.5 + evaluation / 4, "accuracy": 0.6 + evaluation / 10}


def test_smdebugs_reader_reads_what_was_written(tmp_path):
    require("the smdebug venv (make smdebug)", os.path.isfile(os.path.join(REPO, ".venv-smdebug", ".installed")))
    out_dir = tmp_path / "tensors"
    config = hook_config({
        "S3OutputPath": "s3://bucket/debug-output", "LocalPath": str(out_dir),
        "HookParameters": {"save_interval": "2"},
        "CollectionConfigurations": [  # optimizer_variables left out: the learning rate is not written
            {"CollectionName": "losses", "CollectionParameters": {"eval.save_interval": "1"}},
            {"CollectionName": "gradients", "CollectionParameters": {"save_interval": "3"}},
            {"CollectionName": "weights", "CollectionParameters": {"save_steps": "5"}},
        ]})
    writer = DebuggerTensorWriter(config, tensors={**JOB_TENSORS, "weights/dense/kernel": "weights"})
    for epoch in range(EPOCHS):
        for step in range(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH):
            writer.write(step, train_values(step), global_step=step + epoch)  # after `epoch` evaluations
        writer.write(epoch, eval_values(epoch), mode="EVAL", global_step=(epoch + 1) * (STEPS_PER_EPOCH + 1) - 1)
    writer.close()

    guard = write_network_guard(str(tmp_path / "guard"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TRAINING_JOB_NAME"))}
    env.update(PYTHONPATH=guard, NETWORK_GUARD_LOG=str(tmp_path / "network.log"),
               SMDEBUG_TRAINING_END_DELAY_REFRESH="0")  # its wait before the last refresh of an ended job
    # A reader that never sees the collections file or the end marker waits forever: the timeout says so.
    result = subprocess.run([SMDEBUG_PYTHON, READER, str(out_dir), str(tmp_path / "read.json")], env=env, check=False,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not os.path.exists(tmp_path / "network.log")  # no AWS call for a local folder
    with open(tmp_path / "read.json") as f:
        read = json.load(f)

    # Saved mode steps, by hand: TRAIN every 2 (losses, metrics), every 3 (gradients), every 2 and 5 (weights);
    # EVAL every evaluation (losses) or every 2 (metrics); gradients not outside training.
    train_steps = {"loss": [0, 2, 4, 6], "accuracy": [0, 2, 4, 6], "gradients/global_norm": [0, 3, 6],
                   "weights/dense/kernel": [0, 2, 4, 5, 6]}
    eval_steps = {"loss": [0, 1], "accuracy": [0]}
    # Global steps: a train step after e evaluations is step + e; evaluation e comes after (e + 1) * 4 train steps.
    train_global = {0: 0, 2: 2, 3: 3, 4: 5, 5: 6, 6: 7}
    eval_global = {0: 4, 1: 9}

    assert read["tensor_names"] == sorted(train_steps)
    assert read["collections"] == {"losses": ["loss"], "metrics": ["accuracy"], "sm_metrics": [],
                                   "gradients": ["gradients/global_norm"], "weights": ["weights/dense/kernel"]}
    assert read["losses_collection"] == ["loss"]
    assert (read["num_workers"], read["workers"], read["ended"]) == (1, ["worker_0"], True)
    assert read["steps"] == {"TRAIN": sorted(train_global), "EVAL": sorted(eval_global),
                             "GLOBAL": sorted([*train_global.values(), *eval_global.values()])}
    assert read["global_steps"] == {"TRAIN": {str(s): g for s, g in train_global.items()},
                                    "EVAL": {str(s): g for s, g in eval_global.items()}}
    expected_values = {name: {"TRAIN": {str(s): np.asarray(train_values(s)[name]).tolist() for s in steps}}
                       for name, steps in train_steps.items()}
    for name, steps in eval_steps.items():
        expected_values[name]["EVAL"] = {str(e): eval_values(e)[name] for e in steps}
    assert read["values"] == expected_values
    assert read["dtypes"] == {"loss": {"TRAIN": "float64", "EVAL": "float64"},
                              "accuracy": {"TRAIN": "float32", "EVAL": "float64"},
                              "gradients/global_norm": {"TRAIN": "float64"},
                              "weights/dense/kernel": {"TRAIN": "float32"}}
    # Each event carries its own mode and mode step too (smdebug's plugin_data), as the index says.
    expected_events = [[name, train_global[s], "TRAIN", s] for name, steps in train_steps.items() for s in steps]
    expected_events += [[name, eval_global[e], "EVAL", e] for name, steps in eval_steps.items() for e in steps]
    assert sorted(read["events"]) == sorted(expected_events)
    # A rule invoked at every global step sees each written step once and stops at the end of the job.
    assert read["rule_ended"] == "NoMoreData"
    assert [step[:3] for step in read["rule_steps"]] == sorted(
        [[g, "TRAIN", s] for s, g in train_global.items()] + [[g, "EVAL", e] for e, g in eval_global.items()])


def test_the_tensor_hook_counts_mode_steps_and_one_global_clock_also_after_a_resume(tmp_path):
    from review_trainer.telemetry.debugger_tensors import TensorHook
    from review_trainer.training.loop import StepResult

    config = hook_config({"LocalPath": str(tmp_path), "HookParameters": {"save_interval": "1"},
                                   "CollectionConfigurations": [{"CollectionName": "gradients"}]})
    written = []

    class Recorder(DebuggerTensorWriter):
        def write(self, step, values, mode="TRAIN", global_step=None):
            written.append((mode, step, global_step, sorted(values)))
            return super().write(step, values, mode, global_step)

    # resumed after 2 epochs of 3 steps, each followed by an evaluation: the next step is step 7
    hook = TensorHook(Recorder(config), learning_rate=0.01, evaluations_done=2)
    for step in (7, 8, 9):
        hook.on_step_end(step, None, StepResult(step, 3, 0.5, 0.5, 8.0, 2.0, 0.1, 0.0))
    hook.on_epoch_end(3, 9, {"train_loss": 0.5, "val_loss": 0.6, "val_accuracy": 0.4})
    hook.on_step_end(10, None, StepResult(10, 4, 0.4, 0.5, 8.0, 2.0, 0.1, 0.0))
    # TRAIN mode step = step - 1; EVAL mode step = evaluations before; global = train steps + evaluations
    train = ["accuracy", "gradients/global_norm", "learning_rate", "loss"]
    assert [w[:3] for w in written] == [("TRAIN", 6, 8), ("TRAIN", 7, 9), ("TRAIN", 8, 10), ("EVAL", 2, 11),
                                        ("TRAIN", 9, 12)]
    assert written[0][3] == train and written[3][3] == ["accuracy", "loss"]


def test_a_save_interval_below_one_is_refused():
    with pytest.raises(ValueError, match="save_interval must be at least 1"):
        hook_config({"HookParameters": {"save_interval": "0"}})


# A whole job, configured by the book's Estimator code
BOOK_HOOK_CONFIG = """
import json, sys, boto3, sagemaker
from sagemaker.debugger import CollectionConfig, DebuggerHookConfig, Rule, rule_configs
from sagemaker.estimator import Estimator, _TrainingJob
session = sagemaker.Session(boto_session=boto3.Session(region_name="us-east-1", aws_access_key_id="x",
                                                       aws_secret_access_key="x"))
# The book's chapter: built-in rules that stop the job, losses and metrics saved every 10 steps
actions = rule_configs.ActionList(rule_configs.StopTraining())
estimator = Estimator(
    image_uri="111111111111.dkr.ecr.us-east-1.amazonaws.com/review-trainer:gpu",
    role="arn:aws:iam::111111111111:role/SageMakerRole", instance_count=1, instance_type="ml.g5.xlarge",
    output_path="s3://bucket/output", sagemaker_session=session,
    rules=[Rule.sagemaker(base_config=rule_configs.loss_not_decreasing(), actions=actions),
           Rule.sagemaker(base_config=rule_configs.overtraining(), actions=actions)],
    debugger_hook_config=DebuggerHookConfig(s3_output_path="s3://bucket/debug", collection_configs=[
        CollectionConfig(name="losses", parameters={"save_interval": "10"}),
        CollectionConfig(name="metrics", parameters={"save_interval": "10"})]))
estimator._prepare_for_training(job_name="book-job")
# The request's DebugHookConfig: what SageMaker writes as /opt/ml/input/config/debughookconfig.json
print(json.dumps(_TrainingJob._get_train_args(estimator, inputs=None, experiment_config=None)["debugger_hook_config"]))
"""


def test_a_job_with_the_books_debugger_config_writes_what_smdebug_reads(tmp_path, distilbert_dir):
    from conftest import FAST_HYPERPARAMETERS, amazon_tsv, make_opt_ml, make_reviews, train_in_process

    sdk_python = os.path.join(REPO, ".venv-sagemaker-v2", "bin", "python")
    require("the SageMaker SDK v2 venv (make sagemaker-v2)", os.path.isfile(sdk_python))
    require("the smdebug venv (make smdebug)", os.path.isfile(os.path.join(REPO, ".venv-smdebug", ".installed")))
    sdk = subprocess.run([sdk_python, "-c", BOOK_HOOK_CONFIG], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")})
    assert sdk.returncode == 0, sdk.stderr[-3000:]
    hook_config = json.loads(sdk.stdout.strip().splitlines()[-1])
    # The rules bring their own losses config (every 500 steps), in the SDK's set order (random, by
    # hash): as in smdebug, the last config of a collection counts.
    configs = hook_config["CollectionConfigurations"]
    assert sorted(c["CollectionName"] for c in configs) == ["losses", "losses", "metrics"]
    losses_interval = int([c for c in configs if c["CollectionName"] == "losses"][-1]["CollectionParameters"][
        "save_interval"])
    assert losses_interval in (10, 500)
    base = make_opt_ml(str(tmp_path / "opt_ml"), {
        "train": {"train.tsv": amazon_tsv(make_reviews(96, 1))},
        "validation": {"validation.tsv": amazon_tsv(make_reviews(24, 3))}},
        {**FAST_HYPERPARAMETERS, "epochs": "2", "enable_tensorboard": "true", "log_every_n_steps": "1"})
    with open(os.path.join(base, "input", "config", "debughookconfig.json"), "w") as f:
        json.dump(hook_config, f)
    result = train_in_process(base, distilbert_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    tensors_dir = os.path.join(base, "output", "tensors")  # no LocalPath in the request: SageMaker's default
    assert f"debugger_tensors={tensors_dir} " in result.stdout

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TRAINING_JOB_NAME"))}
    env["SMDEBUG_TRAINING_END_DELAY_REFRESH"] = "0"
    read = subprocess.run([SMDEBUG_PYTHON, READER, tensors_dir, str(tmp_path / "read.json")], env=env,
                          capture_output=True, text=True, timeout=180)
    assert read.returncode == 0, read.stdout[-3000:] + read.stderr[-3000:]
    with open(tmp_path / "read.json") as f:
        seen = json.load(f)
    # 2 epochs of 12 steps (TRAIN mode steps 0-23) and 2 evaluations (EVAL mode steps 0-1): metrics every
    # 10 mode steps, losses every 10 or 500; the gradient norm and learning rate were not asked for.
    loss_steps = [s for s in range(24) if s % losses_interval == 0]
    assert sorted(seen["tensor_names"]) == ["accuracy", "loss"] and seen["ended"]
    assert seen["steps"]["TRAIN"] == [0, 10, 20] and seen["steps"]["EVAL"] == [0]
    assert sorted(map(int, seen["values"]["accuracy"]["TRAIN"])) == [0, 10, 20]
    assert sorted(map(int, seen["values"]["loss"]["TRAIN"])) == loss_steps
    assert list(seen["values"]["loss"]["EVAL"]) == ["0"]
    # The values are the job's own, as TensorBoard has them: TRAIN mode step s is the job's step s + 1.
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator

    def scalars(run, tag):  # every one: by default the reader keeps a sample of 10 per tag
        events = EventAccumulator(os.path.join(base, "output", "tensorboard", run), size_guidance={TENSORS: 0}).Reload()
        return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)}

    batch_accuracy, batch_loss = scalars("train", "batch_accuracy"), scalars("train", "batch_loss")
    assert {int(s): v for s, v in seen["values"]["accuracy"]["TRAIN"].items()} == {
        s - 1: batch_accuracy[s] for s in (1, 11, 21)}
    assert {int(s): v for s, v in seen["values"]["loss"]["TRAIN"].items()} == {s: batch_loss[s + 1] for s in loss_steps}
    assert seen["values"]["loss"]["EVAL"]["0"] == scalars("validation", "epoch_loss")[0]
    assert seen["values"]["accuracy"]["EVAL"]["0"] == scalars("validation", "epoch_accuracy")[0]
