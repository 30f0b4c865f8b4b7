"""The SageMaker Python SDK v2's local mode runs the built image (examples/sagemaker_local_v2.py),
through podman-compose (tests/local_mode.py's shims), with no AWS call; and what local mode refuses.

Needs .venv-sagemaker-v2 (`make sagemaker-v2`; `make test` makes it) and the container tools: skipped
without them here, failed in CI (REQUIRE_CONTAINER_TESTS)."""

import collections
import hashlib
import json
import os
import re
import subprocess
import tarfile
import time

import pytest
from conftest import FAST_HYPERPARAMETERS, IMAGE, PODMAN, REPO, TRAIN, amazon_tsv, gzipped, make_reviews, require
from local_mode import write_network_guard, write_shims

# pytest-xdist: the built image (conftest.built_image): one worker builds and runs it
pytestmark = pytest.mark.xdist_group("image")

SDK_VENV = os.path.join(REPO, ".venv-sagemaker-v2")
SDK_PYTHON = os.path.join(SDK_VENV, "bin", "python")
EXAMPLE = os.path.join(REPO, "examples", "sagemaker_local_v2.py")
PREDICT = os.path.join(os.path.dirname(TRAIN), "predict")


@pytest.fixture(scope="module")
def sdk_env(tmp_path_factory):
    """The example's environment: the shims first on PATH, no AWS credentials or config anywhere,
    and the network guard: any outside DNS look-up or connection is refused and logged."""
    installed = os.path.isfile(os.path.join(SDK_VENV, ".installed"))
    require("the SageMaker SDK v2 venv (make sagemaker-v2)", installed)
    root = tmp_path_factory.mktemp("sdk")
    shims = write_shims(str(root / "bin"), os.path.join(SDK_VENV, "bin", "podman-compose"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SAGEMAKER_"))}
    env.update(PATH=f"{shims}:{os.environ['PATH']}", HOME=str(root / "home"),
               AWS_CONFIG_FILE=str(root / "no-aws-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(root / "no-aws-credentials"),
               PYTHONPATH=write_network_guard(str(root / "guard")), NETWORK_GUARD_LOG=str(root / "network.log"))
    # The guard works in the SDK's venv: a look-up it must refuse is refused and logged.
    probe = subprocess.run([SDK_PYTHON, "-c", "import socket; socket.getaddrinfo('sts.us-east-1.amazonaws.com', 443)"],
                           env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "network guard: getaddrinfo" in probe.stderr, probe.stderr
    with open(env["NETWORK_GUARD_LOG"]) as f:
        assert "sts.us-east-1.amazonaws.com" in f.read()
    os.remove(env["NETWORK_GUARD_LOG"])
    return env


def run_example(env, data, output, *hyperparameters):
    return subprocess.run([SDK_PYTHON, EXAMPLE, "--image", IMAGE, "--data", str(data), "--output", str(output),
                           *hyperparameters], env=env, capture_output=True, text=True, timeout=600, check=False)


def containers():
    return set(subprocess.run([*PODMAN, "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True,
                              check=True).stdout.split())


def tar_files(path):
    """{member name: bytes} of the regular files in a .tar.gz."""
    with tarfile.open(path) as tar:
        return {m.name.removeprefix("./"): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_v2_local_mode_trains_the_image_and_leaves_model_and_output_archives(built_image, sdk_env, tmp_path):
    rows = {"train": make_reviews(48, 21), "validation": make_reviews(16, 22), "test": make_reviews(20, 23)}
    # product_category: Books in a third of the rows, Toys in the others (the bias report's facet)

    def with_category(reviews):
        return [(text, stars, {"product_category": "Books" if i % 3 == 0 else "Toys"})
                for i, (text, stars) in enumerate(reviews)]

    files = {"train": ("train.tsv.gz", gzipped(amazon_tsv(with_category(rows["train"])))),
             "validation": ("validation.tsv", amazon_tsv(rows["validation"])),
             "test": ("test.tsv", amazon_tsv(with_category(rows["test"])))}
    for channel, (name, content) in files.items():
        (tmp_path / "data" / channel).mkdir(parents=True)
        (tmp_path / "data" / channel / name).write_bytes(content)
    before = containers()

    started = time.monotonic()
    # With step 7 on: shap and smclarify run in the image, with no network
    hyperparameters = {**FAST_HYPERPARAMETERS, "explain_samples": "2", "explain_max_seconds": "600",
                       "bias_facet": "product_category", "enable_profiler": "true"}
    result = run_example(sdk_env, tmp_path / "data", tmp_path / "out", *(f"{k}={v}" for k, v in hyperparameters.items()))
    print(f"\nSDK v2 local-mode run: {time.monotonic() - started:.1f} s")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # The example says where the SDK put the archives: file:// output_path's folder itself.
    printed = dict(re.findall(r"^(job|model\.tar\.gz|output\.tar\.gz): (\S+)$", result.stdout, re.M))
    out = str(tmp_path / "out")
    assert printed["model.tar.gz"] == f"{out}/model.tar.gz" and printed["output.tar.gz"] == f"{out}/output.tar.gz"
    assert sorted(os.listdir(out)) == ["model.tar.gz", "output.tar.gz"]  # the SDK's working folders are gone
    model, output = tar_files(printed["model.tar.gz"]), tar_files(printed["output.tar.gz"])

    # model.tar.gz is the job's /opt/ml/model: SavedModel, tokenizer, label map, evaluation, manifest.
    for name in ("tensorflow/saved_model/0/saved_model.pb", "tensorflow/saved_model/0/variables/variables.index",
                 "tokenizer/vocab.txt", "label_map.json", "metrics/evaluation.json", "metrics/confusion_matrix.png",
                 "manifest.json"):
        assert name in model, sorted(model)
    assert not any(name.startswith(".partial") for name in model)
    # output.tar.gz is its /opt/ml/output: success, the evaluation, the rules' record, the profile report
    # the explanations of the first test reviews and the bias report.
    assert set(output) == {"success", "data/evaluation.json", "data/rules.json", "data/profile.json",
                           "data/profile.html", "data/explanations/explanations.jsonl",
                           "data/explanations/summary.json", "data/explanations/explanations.html",
                           "data/bias/analysis.json"}, sorted(output)
    assert json.loads(output["data/explanations/summary.json"])["reviews"] == 2
    analysis = json.loads(output["data/bias/analysis.json"])
    [books] = [entry for entry in analysis["pre_training_bias_metrics"]["facets"]["product_category"]
               if entry["value_or_threshold"] == "Books"]
    # CI = (n_a - n_d) / n: 32 Toys and 16 Books rows
    assert {m["name"]: m["value"] for m in books["metrics"]}["CI"] == pytest.approx((32 - 16) / 48)
    assert "post_training_bias_metrics" in analysis
    assert json.loads(output["data/rules.json"])["stopped_by"] is None
    assert output["data/evaluation.json"] == model["metrics/evaluation.json"]

    # The evaluation counts the 20 test rows written above, per star rating.
    scores = json.loads(output["data/evaluation.json"])["multiclass_classification_metrics"]
    stars = collections.Counter(str(s) for _, s in rows["test"])
    expected_support = {str(s): stars[str(s)] for s in range(1, 6)}
    assert {label: c["support"] for label, c in scores["per_class"].items()} == expected_support
    matrix = scores["confusion_matrix"]
    assert {label: sum(row.values()) for label, row in matrix.items()} == expected_support
    correct = sum(matrix[label][label] for label in matrix)
    assert scores["accuracy"]["value"] == pytest.approx(correct / 20)
    assert scores["accuracy_best_constant_classifier"]["value"] == pytest.approx(max(stars.values()) / 20)

    # The manifest: the files the SDK mounted are the bytes written here, the hyperparameters and
    # job name the SDK passed reached the job, and the image's own version and weights were used.
    manifest = json.loads(model["manifest.json"])
    for channel, (name, content) in files.items():
        [entry] = manifest["data"][channel]
        assert entry["path"] == f"/opt/ml/input/data/{channel}/{name}"
        assert entry["sha256"] == hashlib.sha256(content).hexdigest()
        assert entry["good_rows"] == len(rows[channel])
    assert manifest["job_name"] == printed["job"] and printed["job"].startswith("review-trainer-local-")
    assert manifest["hyperparameters"]["epochs"] == 1 and manifest["hyperparameters"]["max_seq_length"] == 16
    assert manifest["image_version"] == "0.1.0-ci"
    assert manifest["pretrained_model"] == {"path": "/opt/pretrained", "model_type": "distilbert"}

    # The metric definitions capture the job's own figures from the log the SDK streamed.
    metrics = dict(re.findall(r"(\w+)=(\S+)", re.search(r"^final metrics .*?: (.*)$", result.stdout, re.M).group(1)))
    assert set(metrics) == {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy",
                            "test_macro_f1", "train_samples_per_second", "input_wait_share"}
    assert float(metrics["test_accuracy"]) == pytest.approx(scores["accuracy"]["value"], abs=5e-5)
    assert float(metrics["test_macro_f1"]) == pytest.approx(scores["macro_f1"]["value"], abs=5e-5)

    # `predict` takes the SDK's model.tar.gz as it is.
    predicted = subprocess.run([PREDICT, "--model", printed["model.tar.gz"]], input="This is great!\nawful\n",
                               capture_output=True, text=True, timeout=300, check=False)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    answers = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert len(answers) == 2 and all(sum(a["probabilities"].values()) == pytest.approx(1, abs=1e-4) for a in answers)

    # No AWS call (nor any other outside connection) from the SDK, and no container left behind.
    assert not os.path.exists(sdk_env["NETWORK_GUARD_LOG"]), open(sdk_env["NETWORK_GUARD_LOG"]).read()
    assert containers() == before


def test_v2_local_mode_reports_a_failed_job_and_keeps_its_failure_file(built_image, sdk_env, tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train" / "t.tsv").write_bytes(amazon_tsv(make_reviews(8)))
    result = run_example(sdk_env, tmp_path / "data", tmp_path / "out", "epochs=zero")
    # The job's exit code 2 reaches the SDK (podman-compose alone would have ended with 0), and the
    # example ends with it and the failure file's first line.
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == (
        "training job failed: HyperparameterError: invalid hyperparameters.json: epochs='zero': expected a number")
    output = tar_files(tmp_path / "out" / "output.tar.gz")
    assert output["failure"].decode().startswith("HyperparameterError: invalid hyperparameters.json: epochs='zero'")
    assert "success" not in output
    assert tar_files(tmp_path / "out" / "model.tar.gz") == {}  # a failed job leaves no model


# What local mode does with spot and checkpoint settings (README: SageMaker Python SDK (local mode)).
REFUSALS = """
import json, os, sys
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"  # as the example: importing sagemaker makes boto3 clients
import boto3
from sagemaker.estimator import Estimator
from sagemaker.local import LocalSession

session = LocalSession(boto_session=boto3.Session(region_name="us-east-1"), sagemaker_config={
    "SchemaVersion": "1.0", "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": True}}}})
session.config = {"local": {"local_code": True}}
estimator = Estimator(image_uri="localhost/review-trainer:ci", role="arn:aws:iam::123456789012:role/r",
                      instance_count=1, instance_type="local", output_path="file://" + sys.argv[1],
                      sagemaker_session=session, **json.loads(sys.argv[2]))
try:
    estimator.fit({"train": "file://" + sys.argv[1]})
except ValueError as error:
    print(f"ValueError: {error}")
"""


@pytest.mark.parametrize("settings, message", [
    ({"use_spot_instances": True, "max_run": 3600, "max_wait": 7200}, "Spot training is not supported in local mode."),
    ({"checkpoint_s3_uri": "s3://bucket/checkpoints/"}, "Setting checkpoint_s3_uri is not supported in local mode."),
    ({"checkpoint_local_path": "/opt/ml/checkpoints"}, "Setting checkpoint_local_path is not supported in local mode."),
])
def test_v2_local_mode_refuses_spot_and_checkpoint_settings_before_running_anything(sdk_env, tmp_path, settings,
                                                                                      message):
    result = subprocess.run([SDK_PYTHON, "-c", REFUSALS, str(tmp_path), json.dumps(settings)], env=sdk_env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.stdout.splitlines()[-1:] == [f"ValueError: {message}"], result.stdout + result.stderr[-2000:]
    assert os.listdir(tmp_path) == []  # refused before any folder or container was made
    assert not os.path.exists(sdk_env["NETWORK_GUARD_LOG"])


def test_the_shims_are_shellcheck_clean(tmp_path):
    shims = write_shims(str(tmp_path), "/opt/podman compose/bin/podman-compose")  # a path that needs quoting
    result = subprocess.run([os.path.join(os.path.dirname(TRAIN), "shellcheck"), "docker", "docker-compose"],
                            cwd=shims, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout
