"""The image: Dockerfile and scripts lint clean, IAM policies lint clean, build_and_push.sh does
the right calls against a local ECR API, and the built CPU image trains with no network."""

import base64
import glob
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from conftest import IMAGE, PODMAN, PODMAN_RUN, REPO

# pytest-xdist: the built image (conftest.built_image) and docker/weights/ci-tiny: one worker builds and runs it
pytestmark = pytest.mark.xdist_group("image")

BIN = os.path.dirname(sys.executable)


def tool(name):
    return os.path.join(BIN, name)


def test_dockerfile_is_hadolint_clean_at_every_level():
    result = subprocess.run([tool("hadolint"), "--failure-threshold", "style", "Dockerfile"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "", result.stdout


def test_shell_scripts_are_shellcheck_clean():
    result = subprocess.run([tool("shellcheck"), "build_and_push.sh", ".ci/run", "tests/benchmarks/gpu.sh"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_iam_policies_lint_clean_with_parliament():
    import parliament

    for path in sorted(glob.glob(os.path.join(REPO, "docker", "iam", "*.json"))):
        with open(path) as f:
            text = f.read()
        findings = parliament.analyze_policy_string(text).findings
        if "trust-policy" in path:
            # Parliament reads every policy as an identity policy; a trust policy has a Principal
            # and must not have a Resource, which parliament reports as MALFORMED. Nothing else.
            assert all("Principal" in s for s in json.loads(text)["Statement"])
            findings = [f for f in findings if f.detail != "Statement contains neither Resource nor NotResource"]
        assert [(f.issue, f.detail) for f in findings] == [], path


def test_network_isolation_policy_denies_training_without_it():
    with open(os.path.join(REPO, "docker", "iam", "deny-training-without-network-isolation.json")) as f:
        statements = json.load(f)["Statement"]
    assert all(s["Effect"] == "Deny" and "sagemaker:CreateTrainingJob" in s["Action"] for s in statements)
    conditions = [s["Condition"] for s in statements]
    assert {"Bool": {"sagemaker:NetworkIsolation": "false"}} in conditions
    assert {"Null": {"sagemaker:NetworkIsolation": "true"}} in conditions  # the flag left out


# build_and_push.sh against moto's ECR API on 127.0.0.1, with the real aws CLI and a fake docker.

FAKE_DOCKER = """#!/usr/bin/env bash
# Records each call (and what login reads on stdin), as the real docker would be called.
{ printf '%s' "$*"; if [[ "$1" == login ]]; then printf ' stdin=%s' "$(cat)"; fi; echo; } >> "$FAKE_DOCKER_LOG"
if [[ "$1" == push && -n "${FAKE_DOCKER_REFUSE_PUSH:-}" ]]; then echo "denied: not authorized" >&2; exit 1; fi
exit 0
"""


@pytest.fixture(scope="module")
def moto_ecr():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([tool("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None, f"moto_server exited with {server.returncode}"
            assert time.monotonic() < deadline, "moto_server did not listen within 60 s"
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=10)


def run_build_and_push(tmp_path, endpoint, *args, docker=True, credentials=True, **env_overrides):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    if docker:
        (fake_bin / "docker").write_text(FAKE_DOCKER)
        (fake_bin / "docker").chmod(0o755)
    (fake_bin / "aws").symlink_to(tool("aws")) if not (fake_bin / "aws").exists() else None
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "HOME": str(tmp_path), "AWS_ENDPOINT_URL": endpoint,
           "FAKE_DOCKER_LOG": str(tmp_path / "docker.log"), "AWS_DEFAULT_REGION": "eu-west-1",
           "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    if credentials:
        env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    env.update(env_overrides)
    result = subprocess.run([os.path.join(REPO, "build_and_push.sh"), *args], env=env, capture_output=True,
                            text=True, timeout=120)
    calls = (tmp_path / "docker.log").read_text().splitlines() if (tmp_path / "docker.log").exists() else []
    return result, calls


@pytest.fixture(scope="module")
def local_weights():
    """docker/weights/ci-tiny: a generated checkpoint, as the image build uses it."""
    from tiny_pretrained import make_distilbert

    folder = os.path.join(REPO, "docker", "weights", "ci-tiny")
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        make_distilbert(folder)
    return folder


def test_build_and_push_creates_the_repository_logs_in_builds_tags_and_pushes(tmp_path, moto_ecr, local_weights):
    result, calls = run_build_and_push(tmp_path, moto_ecr, "--name", "review-trainer-test", "--tag", "1.2.3",
                                       "--target", "cpu", "--weights", "local:ci-tiny")
    assert result.returncode == 0, result.stderr
    registry = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"  # region from AWS_DEFAULT_REGION
    image = f"{registry}/review-trainer-test"
    assert result.stdout.strip().splitlines()[-1] == f"{image}:1.2.3"
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip() or "unknown"
    assert [c.split()[0] for c in calls] == ["info", "login", "build", "push", "push"]
    login = calls[1]
    password = base64.b64decode(_ecr_client(moto_ecr).get_authorization_token()["authorizationData"][0]
                                ["authorizationToken"]).decode().split(":", 1)[1]
    assert login == f"login --username AWS --password-stdin {registry} stdin={password}"
    build = calls[2].split()
    assert build[:5] == ["build", "--target", "cpu", "--platform", "linux/amd64"]
    assert "PRETRAINED_SOURCE=local" in build and "PRETRAINED_LOCAL_DIR=ci-tiny" in build
    assert f"{image}:1.2.3" in build and f"{image}:{revision}" in build and "VERSION=1.2.3" in build
    assert calls[3:] == [f"push {image}:1.2.3", f"push {image}:{revision}"]
    repository = _ecr_client(moto_ecr).describe_repositories(repositoryNames=["review-trainer-test"])["repositories"][0]
    assert repository["imageScanningConfiguration"] == {"scanOnPush": True}
    # A second run finds the repository and does not create it again.
    again, _ = run_build_and_push(tmp_path, moto_ecr, "--name", "review-trainer-test", "--tag", "1.2.4")
    assert again.returncode == 0 and "creating ECR repository" not in again.stdout


def test_the_default_weights_have_committed_hashes_and_reach_the_build(tmp_path, moto_ecr):
    sums_file = os.path.join(REPO, "docker", "weights", "distilbert-base-uncased",
                             "12040accade4e8a0f71eabdb258fecc2e7e948be.sha256")
    with open(sums_file) as f:  # the hub's published SHA-256 of each file at that revision
        names = sorted(line.split()[1] for line in f if line.strip())
    assert names == sorted(("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"))
    with open(os.path.join(REPO, ".venv", "pretrained-model", "vocab.txt"), "rb") as f:  # the same uncased vocabulary
        vocab_sha256 = hashlib.sha256(f.read()).hexdigest()
    with open(sums_file) as f:
        assert f"{vocab_sha256}  vocab.txt" in f.read().splitlines()
    result, calls = run_build_and_push(tmp_path, moto_ecr, "--target", "cpu")
    assert result.returncode == 0, result.stderr
    build = calls[2].split()
    assert "PRETRAINED_MODEL_ID=distilbert-base-uncased" in build
    assert "PRETRAINED_REVISION=12040accade4e8a0f71eabdb258fecc2e7e948be" in build


@pytest.mark.parametrize("case", ["hub revision without hashes", "local folder that differs from its sums",
                                  "local folder that is missing", "bad target", "bad tag", "bad platform",
                                  "neuron on arm64", "bad repository name"])
def test_bad_options_and_weights_stop_before_any_aws_call(tmp_path, moto_ecr, local_weights, case):
    name = "review-trainer-" + case.replace(" ", "-")
    if case == "local folder that differs from its sums":
        folder = tmp_path / "weights-copy"
        shutil.copytree(local_weights, folder)
        sums = "".join(f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}\n"
                       for n in ("config.json", "model.safetensors", "vocab.txt"))
        (folder / "SHA256SUMS").write_text(sums)
        (folder / "vocab.txt").write_text((folder / "vocab.txt").read_text() + "tampered\n")
        target = os.path.join(REPO, "docker", "weights", "ci-tampered")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder, target)
    args, expected = {
        "hub revision without hashes": (["--weights", "hub:distilbert-base-uncased@0000000"],
                                        "no recorded hashes for distilbert-base-uncased@0000000: "),
        "local folder that differs from its sums": (["--weights", "local:ci-tampered"],
                                                    "does not match its SHA256SUMS: vocab.txt: FAILED"),
        "local folder that is missing": (["--weights", "local:nowhere"], "docker/weights/nowhere is not a folder"),
        "bad target": (["--target", "tpu"], "--target must be gpu, cpu or neuron, not 'tpu'"),
        "bad tag": (["--tag", "0.1 beta"], "--tag '0.1 beta' is not a Docker tag"),
        "bad platform": (["--platform", "amd64"], "--platform must be linux/amd64 or linux/arm64, not 'amd64'"),
        "neuron on arm64": (["--target", "neuron", "--platform", "linux/arm64"],
                            "--target neuron needs --platform linux/amd64"),
        "bad repository name": (["--name", "Review_Trainer"], "--name 'Review_Trainer' is not an ECR repository name"),
    }[case]
    try:
        result, calls = run_build_and_push(tmp_path, moto_ecr, "--name", name, *args)
    finally:
        shutil.rmtree(os.path.join(REPO, "docker", "weights", "ci-tampered"), ignore_errors=True)
    assert result.returncode != 0 and expected in result.stderr, result.stderr
    assert calls == []  # not even `docker info`
    repositories = _ecr_client(moto_ecr).describe_repositories()["repositories"]
    assert name not in [r["repositoryName"] for r in repositories]  # no empty repository left behind


def test_the_neuron_target_reaches_the_build(tmp_path, moto_ecr, local_weights):
    result, calls = run_build_and_push(tmp_path, moto_ecr, "--target", "neuron", "--weights", "local:ci-tiny")
    assert result.returncode == 0, result.stderr
    assert calls[2].split()[:5] == ["build", "--target", "neuron", "--platform", "linux/amd64"]


def test_dockerfile_targets_parse_and_the_neuron_target_keeps_the_base_jax():
    """The Neuron target cannot be built here (its base image is not reachable): check what can be."""
    with open(os.path.join(REPO, "Dockerfile")) as f:
        dockerfile = f.read()
    stages = [line.split()[-1] for line in dockerfile.splitlines() if line.startswith("FROM ")]
    assert {"cpu", "gpu", "neuron"} <= set(stages)
    assert "ARG NEURON_BASE_IMAGE=public.ecr.aws/neuron/jax-training-neuronx:" in dockerfile
    with open(os.path.join(REPO, "docker", "requirements-neuron.lock")) as f:
        lock = f.read()
    pinned = {line.split("==")[0] for line in lock.splitlines() if "==" in line and not line.startswith(" ")}
    assert "tensorflow-cpu" in pinned and "keras" in pinned
    assert not pinned & {"jax", "jaxlib", "jax-neuronx", "libneuronxla", "tensorflow"}
    with open(os.path.join(REPO, "docker", "requirements-gpu.lock")) as f:
        gpu_pinned = {line.split("==")[0] for line in f if "==" in line and not line.startswith(" ")}
    assert {"tensorflow", "jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "nvidia-cudnn-cu12"} <= gpu_pinned
    cuda_wheels = {name for name in gpu_pinned if name.startswith("nvidia-") and name != "nvidia-ml-py"}  # NVML's
    assert cuda_wheels and all(name.endswith("-cu12") for name in cuda_wheels)  # one CUDA, 12


def test_without_installed_drops_what_the_python_already_has(tmp_path):
    lock = tmp_path / "test.lock"
    lock.write_text("# header\n"
                    "pip==1.0 \\\n    --hash=sha256:aa \\\n    --hash=sha256:bb\n    # via -r x.in\n"
                    "not-a-real-package-xyz==2.0 \\\n    --hash=sha256:cc\n    # via -r x.in\n")
    result = subprocess.run([sys.executable, os.path.join(REPO, "docker", "without_installed.py"), str(lock)],
                            capture_output=True, text=True, check=True)
    assert result.stdout == "not-a-real-package-xyz==2.0 \\\n    --hash=sha256:cc\n"
    assert "kept from the base image: pip " in result.stderr and "(lock: 1.0)" in result.stderr


def test_region_option_wins_over_the_environment(tmp_path, moto_ecr):
    result, _ = run_build_and_push(tmp_path, moto_ecr, "--region", "ap-south-1", AWS_REGION="us-west-2")
    assert result.returncode == 0, result.stderr
    assert ".dkr.ecr.ap-south-1.amazonaws.com/review-trainer:" in result.stdout
    result, _ = run_build_and_push(tmp_path, moto_ecr, AWS_REGION="us-west-2")
    assert ".dkr.ecr.us-west-2.amazonaws.com/review-trainer:" in result.stdout  # AWS_REGION before AWS_DEFAULT_REGION


@pytest.mark.parametrize("case, expected", [
    ("push refused", "docker push of 123456789012.dkr.ecr.eu-west-1.amazonaws.com/review-trainer:0.1.0 was refused"),
    ("no docker", "docker is not installed or not on PATH"),
    ("no credentials", "no usable AWS credentials"),
])
def test_build_and_push_fails_with_a_clear_message(tmp_path, moto_ecr, case, expected):
    kwargs = {"push refused": {"FAKE_DOCKER_REFUSE_PUSH": "1"}, "no docker": {"docker": False},
              "no credentials": {"credentials": False}}[case]
    result, _ = run_build_and_push(tmp_path, moto_ecr, **kwargs)
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr


def _ecr_client(endpoint):
    import boto3

    return boto3.client("ecr", region_name="eu-west-1", endpoint_url=endpoint, aws_access_key_id="testing",
                        aws_secret_access_key="testing")


# The built CPU image (conftest.py's session fixture `built_image`, shared with
# test_sagemaker_local.py), run with podman and --network none.

def podman(*args, **kwargs):
    return subprocess.run([*PODMAN_RUN, *args], capture_output=True, text=True, timeout=600, **kwargs)


def test_cpu_image_is_under_its_size_target(built_image):
    # 2.33 GB before shap (with numba and llvmlite) and smclarify (with pandas), about 0.3 GB (README)
    assert built_image < 2.8e9


def test_image_trains_on_the_fixture_with_no_network(built_image, tmp_path):
    from conftest import FAST_HYPERPARAMETERS, amazon_tsv, gzipped, make_opt_ml, make_reviews

    base = make_opt_ml(str(tmp_path / "opt_ml"), {
        "train": {"train.tsv.gz": gzipped(amazon_tsv(make_reviews(64, 1)))},
        "validation": {"validation.tsv": amazon_tsv(make_reviews(16, 2))},
        "test": {"test.tsv": amazon_tsv(make_reviews(16, 3))},
    }, FAST_HYPERPARAMETERS)
    result = podman("--rm", "-v", f"{base}:/opt/ml", IMAGE, "train")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert os.path.exists(os.path.join(base, "output", "success"))
    assert os.path.exists(os.path.join(base, "model", "tensorflow", "saved_model", "0", "saved_model.pb"))
    with open(os.path.join(base, "output", "data", "evaluation.json")) as f:
        assert "multiclass_classification_metrics" in json.load(f)
    with open(os.path.join(base, "model", "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["image_version"] == "0.1.0-ci"
    assert manifest["pretrained_model"] == {"path": "/opt/pretrained", "model_type": "distilbert"}
    # The image's `predict` reads the model the job left, offline.
    predicted = podman("--rm", "-i", "-v", f"{base}:/opt/ml", IMAGE, "predict", "--model", "/opt/ml/model",
                       input="This is great!\nThis is terrible.\n")
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    results = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert len(results) == 2 and all(sorted(r["probabilities"]) == ["1", "2", "3", "4", "5"] for r in results)


def test_an_outside_connection_fails_inside_the_container(built_image):
    probe = ("import socket\n"
             "try:\n"
             "    socket.create_connection(('1.1.1.1', 443), timeout=5)\n"
             "    print('connected')\n"
             "except OSError as error:\n"
             "    print(f'refused: {error}')\n")
    result = podman("--rm", IMAGE, "python3", "-c", probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("refused: ") and "unreachable" in result.stdout.lower(), result.stdout
    env = podman("--rm", IMAGE, "env").stdout
    assert "HF_HUB_OFFLINE=1" in env and "PRETRAINED_MODEL_DIR=/opt/pretrained" in env


def test_a_malformed_fixture_fails_with_the_failure_file_and_exit_code(built_image, tmp_path):
    from conftest import amazon_tsv, make_opt_ml, make_reviews, read_failure

    base = make_opt_ml(str(tmp_path / "opt_ml"), {"train": {"t.tsv": amazon_tsv(make_reviews(8))}},
                       {"epochs": "zero"})
    result = podman("--rm", "-v", f"{base}:/opt/ml", IMAGE, "train")
    assert result.returncode == 2
    assert read_failure(base).startswith("HyperparameterError: invalid hyperparameters.json: epochs='zero'")
    assert not os.path.exists(os.path.join(base, "model")) or os.listdir(os.path.join(base, "model")) == []


def test_podman_stop_checkpoints_and_a_rerun_resumes(built_image, tmp_path):
    from conftest import amazon_tsv, make_opt_ml, make_reviews, read_failure
    from injection import HOLDING, hold_step
    from test_spot_training import SPOT_HYPERPARAMETERS

    base = make_opt_ml(str(tmp_path / "opt_ml"), {"train": {"t.tsv": amazon_tsv(make_reviews(400))}},
                       {**SPOT_HYPERPARAMETERS, "run_validation": "false"})
    with open(os.path.join(base, "input", "config", "checkpointconfig.json"), "w") as f:
        json.dump({"LocalPath": "/opt/ml/checkpoints"}, f)
    # Step 5 is held until the signal has arrived (injection.HOLD_STEP, mounted into the container)
    hold = hold_step(str(tmp_path / "inject"), 5)
    name = f"review-trainer-stop-{os.getpid()}"
    started = podman("-d", "--name", name, "-v", f"{base}:/opt/ml", "-v", f"{tmp_path / 'inject'}:/inject:ro",
                     "-e", "PYTHONPATH=/inject", "-e", f"REVIEW_TRAINER_TEST_HOLD_STEP={hold['REVIEW_TRAINER_TEST_HOLD_STEP']}",
                     "-e", "PYTHONUNBUFFERED=1", IMAGE, "train")
    assert started.returncode == 0, started.stderr
    try:
        logs = ""
        while HOLDING.format(step=5) not in logs:
            state = subprocess.run([*PODMAN, "inspect", "--format", "{{.State.Running}}", name], capture_output=True,
                                   text=True).stdout.strip()
            assert state == "true", logs[-3000:]  # it ended without reaching step 5
            logs = subprocess.run([*PODMAN, "logs", name], capture_output=True, text=True).stdout
            time.sleep(0.5)
        # A stop is SIGTERM, then SIGKILL after the timeout: exit code 143 says the trainer, PID 1, handled it
        subprocess.run([*PODMAN, "stop", "-t", "300", name], check=True, capture_output=True)
        exit_code = subprocess.run([*PODMAN, "inspect", "--format", "{{.State.ExitCode}}", name],
                                   capture_output=True, text=True).stdout.strip()
    finally:
        subprocess.run([*PODMAN, "rm", "-f", name], capture_output=True)
    assert exit_code == "143"
    assert read_failure(base).startswith("Stopped: the job received SIGTERM at step 5 of ")
    assert [n for n in os.listdir(os.path.join(base, "checkpoints")) if n.startswith("step-")]
    rerun = podman("--rm", "-v", f"{base}:/opt/ml", IMAGE, "train")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resumed from /opt/ml/checkpoints/step-" in rerun.stdout
