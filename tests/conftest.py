"""Shared fixtures: tiny checkpoints, generated reviews, a temporary /opt/ml, a `train` runner, and the
built CPU image (session-scoped: built once per run)."""

import glob
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import tiny_pretrained  # noqa: E402

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
    # shap's first explanation compiles its numba functions (about 6 s): only the tests of step 7 pay it
    "explain_samples": "0",
}


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


def run_train(base, pretrained_dir=None, timeout=600):
    return subprocess.run([TRAIN], env=train_env(base, pretrained_dir), capture_output=True, text=True,
                          timeout=timeout)


def read_failure(base):
    with open(os.path.join(base, "output", "failure")) as f:
        return f.read()


@pytest.fixture(scope="session")
def distilbert_dir(tmp_path_factory):
    return tiny_pretrained.make_distilbert(str(tmp_path_factory.mktemp("distilbert")))


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    return tiny_pretrained.make_bert(str(tmp_path_factory.mktemp("bert")))


@pytest.fixture(scope="session")
def distilbert_job(tmp_path_factory, distilbert_dir):
    """A finished job on the tiny DistilBERT: its /opt/ml tree and its `train` result (shared)."""
    base = make_opt_ml(str(tmp_path_factory.mktemp("opt_ml")), {
        "train": {"part-1.tsv.gz": gzipped(amazon_tsv(make_reviews(96, 1))),
                  "part-2.tsv": amazon_tsv(make_reviews(40, 2))},
        "validation": {"validation.tsv": amazon_tsv(make_reviews(24, 3))},
        "test": {"test.tsv.gz": gzipped(amazon_tsv(make_reviews(30, 4)))},
    }, {**FAST_HYPERPARAMETERS, "epochs": "2", "use_amp": "auto", "sagemaker_program": "ignored"},
        input_modes={"validation": "FastFile"})  # a folder, as in File mode
    result = run_train(base, distilbert_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return base, result


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
