"""Shared fixtures: tiny checkpoints, generated reviews, a temporary /opt/ml, `train` runners (in a
process of its own, or in-process for start-up failures), and the built CPU image (built once per
run: a session fixture shared by the pytest-xdist workers through a file lock)."""

import contextlib
import glob
import gzip
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from filelock import FileLock

sys.path.insert(0, os.path.dirname(__file__))
import tiny_pretrained  # noqa: E402
from injection import HOLDING, hold_step  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(os.path.dirname(sys.executable), "train")
AMAZON_COLUMNS = [
    "marketplace", "customer_id", "review_id", "product_id", "product_parent", "product_title",
    "product_category", "star_rating", "helpful_votes", "total_votes", "vine", "verified_purchase",
    "review_headline", "review_body", "review_date",
]
_OPINIONS = {
    1: ["terrible", "awful", "worst", "waste of money", "hated it"],
    2: ["bad", "poor", "boring", "dull", "slow"],
    3: ["ok", "okay", "average", "fine"],
    4: ["good", "nice", "fun", "really good"],
    5: ["excellent", "amazing", "wonderful", "loved it", "best ever"],
}
_SUBJECTS = ["this movie", "the book", "this product", "the story", "the acting", "it"]
# Tiny models and a few rows: a fast job that still runs every stage.
FAST_HYPERPARAMETERS = {
    "epochs": "1", "train_batch_size": "8", "validation_batch_size": "8", "test_batch_size": "8",
    "max_seq_length": "16", "learning_rate": "0.001", "log_every_n_steps": "2", "use_amp": "false",
    # shap's first explanation compiles its numba functions (about 6 s): only the tests of the explanations pay it
    "explain_samples": "0",
    # the profile report's sampler thread and plots: only the jobs that check the report pay for them
    "enable_profiler": "false",
}


def pytest_configure(config):
    """Every JAX job of a test run compiles into one persistent cache, shared by the pytest-xdist
    workers (JAX's own, keyed by the program): a job that compiles what an earlier one did loads it
    instead, the same executable (a JAX job of the tests took 24 s without it, 12.5 s with it)."""
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # set by the controller; the workers inherit it
        config.jax_cache = tempfile.mkdtemp(prefix="review-trainer-jax-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = config.jax_cache
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_unconfigure(config):
    if getattr(config, "jax_cache", None):
        shutil.rmtree(config.jax_cache, ignore_errors=True)


def make_reviews(count, seed=0):
    """(text, star_rating) pairs whose words tell the rating."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        stars = rng.randint(1, 5)
        rows.append((f"{rng.choice(_SUBJECTS)} was {rng.choice(_OPINIONS[stars])}!", stars))
    return rows


def amazon_tsv(rows):
    """The Amazon Customer Reviews TSV schema: header, tab-separated, no quoting. A row is (text,
    stars) or (text, stars, {column: value}) for other columns than the defaults below."""
    lines = ["\t".join(AMAZON_COLUMNS)]
    for i, (text, stars, *other) in enumerate(rows):
        values = {
            "marketplace": "US", "customer_id": str(10000 + i), "review_id": f"R{i:06d}",
            "product_id": "B000TEST", "product_parent": "123", "product_title": 'A "quoted" title',
            "product_category": "Books", "star_rating": str(stars), "helpful_votes": "0",
            "total_votes": "0", "vine": "N", "verified_purchase": "Y", "review_headline": "headline",
            "review_body": text, "review_date": "2015-08-31", **(other[0] if other else {}),
        }
        lines.append("\t".join(values[c] for c in AMAZON_COLUMNS))
    return ("\n".join(lines) + "\n").encode()


def gzipped(data):
    return gzip.compress(data, mtime=0)


def require(capability, available):
    """Skips a test that needs `capability` here, but fails it in CI (REQUIRE_CONTAINER_TESTS), which must have it."""
    if available:
        return
    if os.environ.get("REQUIRE_CONTAINER_TESTS"):
        pytest.fail(f"CI requires this test, but it needs {capability}")
    pytest.skip(f"needs {capability} (CI has it: .ci/run)")


def make_opt_ml(base, channels, hyperparameters=None, hosts=("algo-1",), current_host="algo-1", input_modes=None):
    """A SageMaker-style tree: channels maps a channel name to {file name: bytes}; input_modes a
    channel name to its TrainingInputMode (File when absent)."""
    config = os.path.join(base, "input", "config")
    os.makedirs(config, exist_ok=True)
    for name, files in channels.items():
        folder = os.path.join(base, "input", "data", name)
        os.makedirs(folder, exist_ok=True)
        for file_name, content in files.items():
            with open(os.path.join(folder, file_name), "wb") as f:
                f.write(content)
    with open(os.path.join(config, "hyperparameters.json"), "w") as f:
        json.dump({k: str(v) for k, v in (hyperparameters or {}).items()}, f)
    with open(os.path.join(config, "resourceconfig.json"), "w") as f:
        json.dump({"current_host": current_host, "hosts": list(hosts), "network_interface_name": "eth0"}, f)
    with open(os.path.join(config, "inputdataconfig.json"), "w") as f:
        json.dump({name: {"TrainingInputMode": (input_modes or {}).get(name, "File"),
                          "S3DistributionType": "FullyReplicated"} for name in channels}, f)
    return base


def train_env(base, pretrained_dir=None, **extra):
    """The environment `train` runs in: the /opt/ml tree and the baked weights' folder."""
    env = dict(os.environ, SAGEMAKER_BASE_DIR=str(base), TF_CPP_MIN_LOG_LEVEL="2", **extra)
    env.pop("PRETRAINED_MODEL_DIR", None)
    if pretrained_dir:
        env["PRETRAINED_MODEL_DIR"] = str(pretrained_dir)
    return env


def run_train(base, pretrained_dir=None, timeout=600, **extra_env):
    return subprocess.run([TRAIN], env=train_env(base, pretrained_dir, **extra_env), capture_output=True, text=True,
                          timeout=timeout)


def run_until_held_then_signal(base, pretrained_dir, step, signum=signal.SIGTERM, timeout=600, command=None):
    """Runs `train` with training step `step` held until a stop signal (injection.HOLD_STEP), sends
    the signal once the step is held, and returns (exit code, log). Deterministic: the job stops
    after exactly that step, whatever the machine's speed."""
    env = train_env(base, pretrained_dir, PYTHONUNBUFFERED="1", **hold_step(tempfile.mkdtemp(), step))
    process = subprocess.Popen(command or [TRAIN], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines, held = [], False
    for line in process.stdout:
        lines.append(line)
        if not held and line.rstrip("\n") == HOLDING.format(step=step):
            process.send_signal(signum)
            held = True
    exit_code = process.wait(timeout=timeout)
    assert held, "".join(lines)[-3000:]
    return exit_code, "".join(lines)


def train_in_process(base, pretrained_dir=None, **extra_env):
    """The `train` entry run in this process: no interpreter or TensorFlow to start and tear down
    (about 8 s a job), for jobs on this process's backend (TensorFlow) that need no signal and no
    second host. Returns what run_train returns; the environment and Keras's dtype policy are as
    they were after it, and so are the signal handlers (the entry puts them back). Keras's global
    state is cleared first, so that layers and variables get the names they would in a new process."""
    import keras
    from review_trainer.cli import train

    variables = {"SAGEMAKER_BASE_DIR": str(base), "KERAS_BACKEND": keras.backend.backend(),
                 "PRETRAINED_MODEL_DIR": str(pretrained_dir) if pretrained_dir else None, **extra_env}
    saved = {name: os.environ.get(name) for name in variables}
    out, err = io.StringIO(), io.StringIO()
    keras.backend.clear_session()  # Keras's global state as a new process has it: layer names, graphs, memory
    try:
        _set_environment(variables)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            exit_code = train.main()
    finally:
        _set_environment(saved)
        keras.mixed_precision.set_global_policy("float32")
    return subprocess.CompletedProcess([TRAIN], exit_code, out.getvalue(), err.getvalue())


def _set_environment(variables):
    for name, value in variables.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def run_in_process():
    return train_in_process


def shared_folder(tmp_path_factory, name, make):
    """A folder made once per test run by make(folder), whichever pytest-xdist worker asks first;
    the others wait for it (a file lock) and read it as it is."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's temporary folder, above each worker's
    folder = Path(root, name)
    with FileLock(str(folder) + ".lock"):
        if not (folder / ".made").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(str(folder))
            (folder / ".made").touch()
    return str(folder)


def read_failure(base):
    with open(os.path.join(base, "output", "failure")) as f:
        return f.read()


@pytest.fixture(scope="session")
def distilbert_dir(tmp_path_factory):
    return shared_folder(tmp_path_factory, "distilbert", tiny_pretrained.make_distilbert)


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    return shared_folder(tmp_path_factory, "bert", tiny_pretrained.make_bert)


@pytest.fixture(scope="session")
def distilbert_job(tmp_path_factory, distilbert_dir):
    """A finished job on the tiny DistilBERT, with the profile report: its /opt/ml tree and its
    `train` result (one per run, read by every test that uses it)."""
    def train(folder):
        base = make_opt_ml(os.path.join(folder, "opt_ml"), {
            "train": {"part-1.tsv.gz": gzipped(amazon_tsv(make_reviews(96, 1))),
                      "part-2.tsv": amazon_tsv(make_reviews(40, 2))},
            "validation": {"validation.tsv": amazon_tsv(make_reviews(24, 3))},
            "test": {"test.tsv.gz": gzipped(amazon_tsv(make_reviews(30, 4)))},
        }, {**FAST_HYPERPARAMETERS, "epochs": "2", "use_amp": "auto", "enable_profiler": "true",
            "sagemaker_program": "ignored"},
            input_modes={"validation": "FastFile"})  # a folder, as in File mode
        result = train_in_process(base, distilbert_dir)
        with open(os.path.join(folder, "result.json"), "w") as f:
            json.dump({"returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr}, f)

    folder = shared_folder(tmp_path_factory, "distilbert_job", train)
    with open(os.path.join(folder, "result.json")) as f:
        result = subprocess.CompletedProcess([TRAIN], **json.load(f))
    assert result.returncode == 0, result.stderr[-3000:]
    return os.path.join(folder, "opt_ml"), result


# The built CPU image, as CI builds it here: buildah from a local debootstrap base (no registry is
# reachable), a generated checkpoint as the baked weights; run with podman (test_image.py, with
# --network none) and through the SageMaker SDK's local mode (test_sagemaker_local.py). Built once
# per run: a session fixture.

BASE_IMAGE = "localhost/review-trainer-base:bookworm"
IMAGE = "localhost/review-trainer:ci"
CONTAINER_TOOLS = ("buildah", "podman", "debootstrap", "runc")
STORAGE = ["--storage-driver", "overlay"]
PODMAN = ["podman", *STORAGE, "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
PODMAN_RUN = [*PODMAN, "run",
              "--network", "none", "--hostname", "algo-1",
              "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]


def _build_base_image(workdir):
    if subprocess.run(["buildah", *STORAGE, "inspect", BASE_IMAGE], capture_output=True).returncode == 0:
        return  # built earlier in this run (or on this machine)
    mirror = next((line.split()[1] for path in glob.glob("/etc/apt/sources.list.d/*.sources")
                   for line in open(path) if line.startswith("URIs:")), "http://deb.debian.org/debian")
    rootfs = os.path.join(workdir, "rootfs")
    subprocess.run(["debootstrap", "--variant=minbase", "bookworm", rootfs, mirror], check=True,
                   capture_output=True)
    subprocess.run(["tar", "-C", rootfs, "-cf", os.path.join(workdir, "rootfs.tar"), "."], check=True)
    with open(os.path.join(workdir, "Dockerfile"), "w") as f:
        f.write("FROM scratch\nADD rootfs.tar /\n")
    subprocess.run(["buildah", *STORAGE, "bud", "--isolation", "chroot", "-t", BASE_IMAGE, workdir], check=True,
                   capture_output=True)
    shutil.rmtree(rootfs)


@pytest.fixture(scope="session")
def built_image(tmp_path_factory):
    missing = [t for t in CONTAINER_TOOLS if not shutil.which(t)]
    if missing:
        if os.environ.get("REQUIRE_CONTAINER_TESTS"):
            pytest.fail(f"container tests required but {', '.join(missing)} missing")
        pytest.skip(f"needs {', '.join(missing)} (installed by .ci/run)")
    from tiny_pretrained import make_distilbert

    started = time.monotonic()
    _build_base_image(str(tmp_path_factory.mktemp("base")))
    weights = os.path.join(REPO, "docker", "weights", "ci-tiny")
    shutil.rmtree(weights, ignore_errors=True)
    make_distilbert(weights)
    ca_bundle = "/etc/ssl/certs/ca-certificates.crt"
    build = subprocess.run(
        ["buildah", *STORAGE, "bud", "--isolation", "chroot", "--layers", "--target", "cpu",
         "-v", f"{ca_bundle}:/host-ca.crt:ro", "--build-arg", "PIP_CERT=/host-ca.crt",
         "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--build-arg", "PRETRAINED_SOURCE=local",
         "--build-arg", "PRETRAINED_LOCAL_DIR=ci-tiny", "--build-arg", "VERSION=0.1.0-ci",
         "-t", IMAGE, REPO], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    size = int(subprocess.run(["podman", *STORAGE, "image", "inspect", "--format", "{{.Size}}", IMAGE],
                              capture_output=True, text=True, check=True).stdout)
    print(f"\nimage {IMAGE}: {size / 1e9:.2f} GB, base and build {time.monotonic() - started:.0f} s")
    return size
