"""The `train` entry point end to end, through a temporary /opt/ml, as SageMaker runs it."""

import json
import os
import re
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from conftest import (FAST_HYPERPARAMETERS, TRAIN, amazon_tsv, gzipped, make_opt_ml,
                      make_reviews, read_failure, require, train_env, train_in_process)
from review_trainer.telemetry.metric_log import METRIC_DEFINITIONS
from review_trainer.training.precision import cpu_has_bf16

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_success_leaves_the_model_evaluation_and_success_file(distilbert_job):
    base, result = distilbert_job
    model = os.path.join(base, "model")
    assert os.path.exists(os.path.join(base, "output", "success"))
    assert not os.path.exists(os.path.join(base, "output", "failure"))
    assert sorted(os.listdir(model)) == ["hf", "label_map.json", "manifest.json", "metrics", "tensorflow", "tokenizer"]
    assert "channel=validation files=1 rows=24 bad_rows=0" in result.stdout  # TrainingInputMode FastFile
    assert os.path.exists(os.path.join(model, "tensorflow", "saved_model", "0", "saved_model.pb"))
    assert sorted(os.listdir(os.path.join(model, "metrics"))) == ["confusion_matrix.png", "evaluation.json"]
    assert {"vocab.txt", "tokenizer_config.json"} <= set(os.listdir(os.path.join(model, "tokenizer")))
    with open(os.path.join(model, "label_map.json")) as f:
        assert json.load(f)["index_to_label"] == {"0": "1", "1": "2", "2": "3", "3": "4", "4": "5"}
    with open(os.path.join(base, "output", "data", "evaluation.json")) as f:
        evaluation = json.load(f)["multiclass_classification_metrics"]
    assert sum(sum(row.values()) for row in evaluation["confusion_matrix"].values()) == 30
    with open(os.path.join(model, "metrics", "evaluation.json")) as f:
        assert json.load(f)["multiclass_classification_metrics"] == evaluation


def test_the_profile_report_and_the_rules_record_are_written(distilbert_job):
    base, result = distilbert_job
    with open(os.path.join(base, "output", "data", "profile.json")) as f:
        profile = json.load(f)
    assert profile["step_count"] == 34 and profile["first_step"] == 1 and profile["first_step_seconds"] > 0
    seconds = profile["step_seconds"]
    assert 0 < seconds["p50"] <= seconds["p90"] <= seconds["p99"] <= seconds["max"]
    assert 0 <= profile["input_wait_share"] < 1 and profile["samples_per_second"] > 0
    assert profile["sample_count"] >= 1 and profile["sampling_errors"] == 0 and profile["memory_max_used_bytes"] > 0
    assert "gpus" not in profile  # no GPU here
    assert profile["epoch_end_steps"] == [17, 34]
    with open(os.path.join(base, "output", "data", "profile.html")) as f:
        page = f.read()
    assert page.count("data:image/png;base64,") >= 2 and "http://" not in page and "https://" not in page
    assert re.search(r"^profile step_count=34 ", result.stdout, re.M)
    with open(os.path.join(base, "output", "data", "rules.json")) as f:
        record = json.load(f)
    assert record["stopped_by"] is None and record["exported"] is None
    assert {r["rule"]: r["action"] for r in record["rules"]} == {
        "loss_not_decreasing": "log", "overtraining": "log", "early_stopping": "off", "exploding_gradient": "log",
        "vanishing_gradient": "log", "class_imbalance": "log", "non_finite_loss": "stop"}


def test_manifest_records_hyperparameters_data_files_and_versions(distilbert_job):
    base, _ = distilbert_job
    with open(os.path.join(base, "model", "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["hyperparameters"]["epochs"] == 2 and manifest["hyperparameters"]["max_seq_length"] == 16
    train_files = manifest["data"]["train"]
    assert [os.path.basename(f["path"]) for f in train_files] == ["part-1.tsv.gz", "part-2.tsv"]
    assert [f["good_rows"] for f in train_files] == [96, 40]
    assert all(len(f["sha256"]) == 64 and f["size_bytes"] > 0 for f in train_files)
    assert {"tensorflow-cpu", "keras", "keras-hub", "python"} <= set(manifest["libraries"])
    assert manifest["pretrained_model"]["model_type"] == "distilbert"


def test_log_has_anchored_metric_lines_per_epoch_and_sample_predictions(distilbert_job):
    _, result = distilbert_job
    epoch_lines = [line for line in result.stdout.splitlines() if re.match(r"epoch=\d+ step=\d+ train_loss=", line)]
    assert len(epoch_lines) == 2 and all("val_loss=" in line and "val_accuracy=" in line for line in epoch_lines)
    assert epoch_lines[-1].startswith("epoch=2 step=34 ")  # 2 epochs of 136 / 8 steps: no epoch ran dry
    assert "ran out of data" not in result.stderr
    assert len(re.findall(r"^epoch=\d+ step=\d+ running_train_loss=", result.stdout, re.M)) >= 4
    # Progress every log_every_n_steps=2 steps: speed, step time, gradient norm, ETAs (17 steps an epoch, 34 in all)
    progress = re.findall(r"^epoch=(\d) step=(\d+) running_train_loss=\S+ running_train_accuracy=\S+ "
                          r"running_samples_per_second=(\d+) step_seconds=(\S+) gradient_norm=(\S+) "
                          r"epoch_eta_seconds=(\d+) job_eta_seconds=(\d+)$", result.stdout, re.M)
    assert [int(p[1]) for p in progress] == list(range(2, 35, 2))
    for epoch, step, samples_per_second, step_seconds, gradient_norm, epoch_eta, job_eta in progress:
        step, step_seconds = int(step), float(step_seconds)
        assert float(gradient_norm) > 0 and step_seconds > 0
        assert int(samples_per_second) == pytest.approx(8 / step_seconds, rel=0.01, abs=1)  # 8 reviews a step
        assert int(epoch_eta) == pytest.approx((int(epoch) * 17 - step) * step_seconds, abs=1)
        assert int(job_eta) == pytest.approx((34 - step) * step_seconds, abs=1)
    for text in ("This is great!", "This is OK.", "This is terrible."):
        assert re.search(rf"sample_prediction label=[1-5] confidence=0\.\d+ text='{re.escape(text)}'", result.stdout)
    assert "channel=test files=1 rows=30 bad_rows=0" in result.stdout
    expected_policy = "mixed_bfloat16" if cpu_has_bf16() else "float32"  # use_amp=auto
    assert f"precision={expected_policy} xla=False" in result.stdout


def test_metric_definition_regexes_capture_their_own_value_in_a_real_log(distilbert_job):
    _, result = distilbert_job
    log = result.stdout
    for definition in METRIC_DEFINITIONS:
        name = definition["Name"]
        matches = re.findall(definition["Regex"], log)
        own_values = re.findall(rf"(?:^| ){name}=(\S+)", log, re.M)
        assert matches and matches == own_values, name
    val_loss = re.findall(r"\bval_loss=(\S+)", log)
    train_loss = re.findall(next(d["Regex"] for d in METRIC_DEFINITIONS if d["Name"] == "train_loss"), log)
    assert train_loss and not set(train_loss) & set(val_loss)
    with open(README) as f:
        readme = f.read()
    for definition in METRIC_DEFINITIONS:  # the README gives users the same regexes
        assert json.dumps(definition["Regex"])[1:-1] in readme, definition["Name"]


def test_saved_model_reloaded_in_a_fresh_process_predicts_like_the_keras_model(distilbert_job, distilbert_dir):
    base, result = distilbert_job
    script = r"""
import json, sys
import numpy as np, tensorflow as tf
from review_trainer import data
base, model_dir = sys.argv[1], sys.argv[1] + "/model"
loaded = tf.saved_model.load(model_dir + "/tensorflow/saved_model/0")
serve = loaded.signatures["serving_default"]
spec = serve.structured_input_signature[1]
assert {k: (v.dtype.name, v.shape.as_list()) for k, v in spec.items()} == {
    "input_ids": ("int32", [None, 16]), "input_mask": ("int32", [None, 16])}, spec
assert list(serve.structured_outputs) == ["probabilities"]
spec = data.RowSpec("review_body", "star_rating", ("1", "2", "3", "4", "5"), 16)
channel = data.scan_channel("test", base + "/input/data/test", spec, 0.01)
from review_trainer.model.pretrained import PretrainedCheckpoint, ReviewTokenizer
tokenizer = ReviewTokenizer(PretrainedCheckpoint(model_dir + "/tokenizer", "distilbert", {}), 16)
labels, probabilities = [], []
for features, label in data.make_dataset(channel, spec, tokenizer, 8):
    out = serve(input_ids=features["token_ids"], input_mask=features["padding_mask"])["probabilities"]
    probabilities.append(out.numpy()); labels.append(label.numpy())
probabilities, labels = np.concatenate(probabilities), np.concatenate(labels)
assert probabilities.dtype == np.float32 and probabilities.shape == (30, 5)
np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-5, equal_nan=False)
samples = ["This is great!", "This is OK.", "This is terrible."]
ids, mask = tokenizer(samples)
sample_probabilities = serve(input_ids=tf.constant(ids), input_mask=tf.constant(mask))["probabilities"].numpy()
print(json.dumps({"accuracy": float((probabilities.argmax(1) == labels).mean()),
                  "confidences": sample_probabilities.max(1).tolist()}))
"""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    fresh = subprocess.run([sys.executable, "-c", script, base], capture_output=True, text=True, env=env)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    reloaded = json.loads(fresh.stdout.strip().splitlines()[-1])
    with open(os.path.join(base, "output", "data", "evaluation.json")) as f:
        keras_accuracy = json.load(f)["multiclass_classification_metrics"]["accuracy"]["value"]
    assert reloaded["accuracy"] == pytest.approx(keras_accuracy, abs=1e-9)
    keras_confidences = [float(c) for c in re.findall(r"sample_prediction label=\d confidence=(\S+)", result.stdout)]
    assert reloaded["confidences"] == pytest.approx(keras_confidences, abs=1.5e-3)


def test_bert_checkpoint_with_csv_jsonl_parquet_and_tfrecord_channels(tmp_path, bert_dir):
    from review_trainer.model.pretrained import ReviewTokenizer, open_checkpoint
    from test_data import tfrecord_bytes

    reviews = make_reviews(40, 5)
    pq.write_table(pa.table({"review_body": [t for t, _ in reviews], "star_rating": [s for _, s in reviews]}),
                   tmp_path / "train.parquet")
    tokenizer = ReviewTokenizer(open_checkpoint(bert_dir), 16)
    ids, mask = tokenizer([t for t, _ in reviews[:10]])
    records = tfrecord_bytes(tmp_path, [(i.tolist(), m.tolist(), s - 1) for i, m, (_, s) in zip(ids, mask, reviews)])
    csv_text = "review_body,star_rating\n" + "".join(f'"{t}",{s}\n' for t, s in make_reviews(16, 6))
    jsonl = "".join(json.dumps({"review_body": t, "star_rating": s}) + "\n" for t, s in make_reviews(16, 7))
    base = make_opt_ml(str(tmp_path / "opt_ml"), {
        "train": {"a.parquet": (tmp_path / "train.parquet").read_bytes(), "b.tfrecord": records},
        "validation": {"validation.jsonl.gz": gzipped(jsonl.encode())},
        "test": {"test.csv": csv_text.encode()},
    }, {**FAST_HYPERPARAMETERS, "head": "bilstm", "run_sample_predictions": "false", "enable_tensorboard": "true",
        "checkpoint_every_n_steps": "7"})  # pinned: `auto` depends on measured step and save times
    with open(os.path.join(base, "input", "config", "checkpointconfig.json"), "w") as f:
        json.dump({"LocalPath": os.path.join(base, "spot-checkpoints")}, f)
    result = train_in_process(base, bert_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "channel=train files=2 rows=50 bad_rows=0" in result.stdout
    assert "format=tfrecord" in result.stdout and "format=parquet" in result.stdout
    assert "format=jsonl+gzip" in result.stdout and "format=csv" in result.stdout
    assert "sample_prediction label=" not in result.stdout
    assert "hf/ skipped: the bilstm head has no transformers architecture" in result.stdout
    assert not os.path.exists(os.path.join(base, "model", "hf"))
    assert os.listdir(os.path.join(base, "spot-checkpoints")) == ["step-000000007"]  # ceil(50 / 8) steps
    assert sorted(os.listdir(os.path.join(base, "output", "tensorboard"))) == ["train", "validation"]
    # TensorBoard's own reader finds the epoch's metrics under Keras's names, equal to the log's.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = re.search(r"^epoch=1 step=7 train_loss=(\S+) train_accuracy=(\S+) val_loss=(\S+) val_accuracy=(\S+) ",
                       result.stdout, re.M)
    for folder, values in (("train", logged.groups()[:2]), ("validation", logged.groups()[2:])):
        events = EventAccumulator(os.path.join(base, "output", "tensorboard", folder)).Reload()
        for tag, value in zip(("epoch_loss", "epoch_accuracy"), values):
            [scalar] = events.Tensors(tag)
            assert scalar.step == 0 and float(tf.make_ndarray(scalar.tensor_proto)) == pytest.approx(float(value), abs=5e-5)
    # Every log_every_n_steps=2 steps: the step's own numbers, with the progress line's gradient norm
    events = EventAccumulator(os.path.join(base, "output", "tensorboard", "train")).Reload()
    assert {"batch_loss", "batch_accuracy", "gradient_norm", "learning_rate", "samples_per_second"} <= set(
        events.Tags()["tensors"])
    assert events.Tags()["graph"]  # the forward pass, on the TensorFlow backend
    progress = dict(re.findall(r"^epoch=1 step=(\d+) running_train_loss=.* gradient_norm=(\S+)", result.stdout, re.M))
    norms = {event.step: float(tf.make_ndarray(event.tensor_proto)) for event in events.Tensors("gradient_norm")}
    assert sorted(norms) == [2, 4, 6] and sorted(map(int, progress)) == [2, 4, 6]
    for step, norm in norms.items():
        assert norm == pytest.approx(float(progress[str(step)]), rel=1e-3) and norm > 0
    assert [float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors("learning_rate")] == [
        pytest.approx(0.001)] * 3
    assert os.path.exists(os.path.join(base, "model", "tensorflow", "saved_model", "0", "saved_model.pb"))


def test_optional_channels_may_be_absent_and_the_log_says_so(tmp_path, distilbert_dir):
    base = make_opt_ml(str(tmp_path), {"train": {"train.tsv": amazon_tsv(make_reviews(16))}},
                       {**FAST_HYPERPARAMETERS, "run_sample_predictions": "false"})
    shutil.rmtree(os.path.join(base, "output"), ignore_errors=True)
    result = train_in_process(base, distilbert_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "channel=validation skipped: no validation channel" in result.stdout
    assert "channel=test skipped: no test channel" in result.stdout
    assert os.path.exists(os.path.join(base, "output", "success"))
    assert not os.path.exists(os.path.join(base, "model", "metrics"))


def assert_failed(base, result, exit_code, first_line_pattern):
    assert result.returncode == exit_code, (result.returncode, result.stderr[-2000:])
    first_line = read_failure(base).splitlines()[0]
    assert re.search(first_line_pattern, first_line), first_line
    assert not os.path.exists(os.path.join(base, "output", "success"))
    model_dir = os.path.join(base, "model")
    assert not os.path.exists(model_dir) or os.listdir(model_dir) == [], os.listdir(model_dir)


# What fails at the start, before training: the first in a process of its own, as SageMaker runs
# `train` (its exit code, and no Keras imported for a mistake in the contract or the settings), the
# others in-process through the same entry (conftest.train_in_process).

KERAS_NOT_IMPORTED = """
import sys
from review_trainer.cli import train
exit_code = train.main()
heavy = sorted(name for name in ("keras", "tensorflow", "jax") if name in sys.modules)
print("imported: " + (",".join(heavy) or "none"))
sys.exit(exit_code)
"""


def test_unknown_hyperparameter_fails_with_the_valid_names_without_importing_keras(tmp_path, distilbert_dir):
    base = make_opt_ml(str(tmp_path), {"train": {"t.tsv": amazon_tsv(make_reviews(8))}}, {"learning_rte": "0.1"})
    shutil.rmtree(os.path.join(base, "output"), ignore_errors=True)  # created when missing
    result = subprocess.run([sys.executable, "-c", KERAS_NOT_IMPORTED], env=train_env(base, distilbert_dir),
                            capture_output=True, text=True, timeout=300)
    assert_failed(base, result, 2,
                  r"^HyperparameterError: invalid hyperparameters.json: unknown hyperparameter\(s\) learning_rte; "
                  r"valid names are: epochs, learning_rate")
    assert result.stdout.splitlines()[-1] == "imported: none"


def test_too_many_bad_rows_fail_with_counts_per_reason(tmp_path, distilbert_dir):
    rows = make_reviews(20) + [("", 3), ("fine", 7), ("ok", 0)]
    base = make_opt_ml(str(tmp_path), {"train": {"t.tsv": amazon_tsv(rows)}}, FAST_HYPERPARAMETERS)
    assert_failed(base, train_in_process(base, distilbert_dir), 3,
                  r"^DataError: channel 'train': 3 of 23 rows are bad \(13\.04%; empty_text: 1, unknown_label: 2\), "
                  r"more than max_bad_row_fraction=0\.01; most in .*t\.tsv")


def test_malformed_hyperparameters_json_fails_naming_the_file(tmp_path, distilbert_dir, run_in_process):
    base = make_opt_ml(str(tmp_path), {"train": {"t.tsv": amazon_tsv(make_reviews(8))}})
    with open(os.path.join(base, "input", "config", "hyperparameters.json"), "w") as f:
        f.write('{"epochs": "1",')
    assert_failed(base, run_in_process(base, distilbert_dir), 2,
                  r"^HyperparameterError: .*hyperparameters.json is not valid JSON")


def test_missing_train_channel_fails(tmp_path, distilbert_dir, run_in_process):
    base = make_opt_ml(str(tmp_path), {"validation": {"v.tsv": amazon_tsv(make_reviews(8))}})
    assert_failed(base, run_in_process(base, distilbert_dir), 3,
                  r"^DataError: the required channel 'train' is missing: expected files under .*/input/data/train "
                  r"\(channels present: validation\)")


def test_tfrecord_of_another_sequence_length_fails_naming_both_lengths(tmp_path, distilbert_dir, run_in_process):
    from test_data import tfrecord_bytes

    records = tfrecord_bytes(tmp_path, [([2] * 64, [1] * 64, 1)] * 4)
    base = make_opt_ml(str(tmp_path / "opt_ml"), {"train": {"train.tfrecord": records}}, FAST_HYPERPARAMETERS)
    assert_failed(base, run_in_process(base, distilbert_dir), 3,
                  r"^DataError: .*train.tfrecord: feature input_ids has length 64 but max_seq_length is 16")


def test_missing_pretrained_model_fails(tmp_path, run_in_process):
    base = make_opt_ml(str(tmp_path), {"train": {"t.tsv": amazon_tsv(make_reviews(8))}}, FAST_HYPERPARAMETERS)
    assert_failed(base, run_in_process(base, None), 4,
                  r"^PretrainedModelError: no pretrained model folder: set the hyperparameter pretrained_model_dir")


def test_a_full_disk_fails_cleanly_without_a_half_written_model(tmp_path, distilbert_dir):
    require("root and unshare, to mount a small tmpfs", os.geteuid() == 0 and shutil.which("unshare"))
    base = make_opt_ml(str(tmp_path), {"train": {"t.tsv": amazon_tsv(make_reviews(16))}},
                       {**FAST_HYPERPARAMETERS, "run_sample_predictions": "false"})
    model_dir = os.path.join(base, "model")
    os.makedirs(model_dir)
    # A private mount namespace: a 32 KiB file system over the model folder only.
    command = f"mount -t tmpfs -o size=32k tmpfs {model_dir} && exec {TRAIN}"
    result = subprocess.run(["unshare", "-m", "sh", "-c", command], env=train_env(base, distilbert_dir),
                            capture_output=True, text=True)
    mounted = not ("mount" in result.stderr and result.returncode == 1
                   and not os.path.exists(os.path.join(base, "output", "failure")))
    require(f"a tmpfs mount ({result.stderr[-300:]})", mounted)
    assert result.returncode == 5, result.stderr[-2000:]
    assert read_failure(base).startswith("ResourceError: no space left on device")
    assert os.listdir(model_dir) == []


@pytest.mark.parametrize("folder", ["model", "output data", "tensorboard"])
def test_a_folder_the_job_writes_that_cannot_be_created_fails_at_the_start_naming_it(tmp_path, distilbert_dir, folder,
                                                                                   run_in_process):
    base = make_opt_ml(str(tmp_path), {"train": {"t.tsv": amazon_tsv(make_reviews(8))}},
                       {**FAST_HYPERPARAMETERS, "enable_tensorboard": "true"})
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    if folder == "model":  # the model folder is itself a file
        os.replace(blocker, os.path.join(base, "model"))
        path, what = os.path.join(base, "model"), "model folder"
    elif folder == "output data":  # output/ is there (the failure file goes in it); output/data is a file
        os.makedirs(os.path.join(base, "output"), exist_ok=True)
        os.replace(blocker, os.path.join(base, "output", "data"))
        path, what = os.path.join(base, "output", "data"), "output data folder"
    else:
        with open(os.path.join(base, "input", "config", "tensorboardoutputconfig.json"), "w") as f:
            json.dump({"LocalPath": str(blocker / "tensorboard"), "S3OutputPath": "s3://bucket/tb"}, f)
        path, what = str(blocker / "tensorboard"), "TensorBoard folder"
    result = run_in_process(base, distilbert_dir)
    assert result.returncode == 5, result.stderr[-2000:]
    first_line = read_failure(base).splitlines()[0]
    assert first_line.startswith(f"ResourceError: the {what} {path} cannot be created or written ("), first_line
    assert "training:" not in result.stdout  # before any training
