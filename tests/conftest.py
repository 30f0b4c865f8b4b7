"""Shared fixtures: tiny checkpoints, generated reviews, a temporary /opt/ml, and a `train` runner."""

import gzip
import json
import os
import random
import subprocess
import sys

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
    """The Amazon Customer Reviews TSV schema: header, tab-separated, no quoting."""
    lines = ["\t".join(AMAZON_COLUMNS)]
    for i, (text, stars) in enumerate(rows):
        values = {
            "marketplace": "US", "customer_id": str(10000 + i), "review_id": f"R{i:06d}",
            "product_id": "B000TEST", "product_parent": "123", "product_title": 'A "quoted" title',
            "product_category": "Books", "star_rating": str(stars), "helpful_votes": "0",
            "total_votes": "0", "vine": "N", "verified_purchase": "Y", "review_headline": "headline",
            "review_body": text, "review_date": "2015-08-31",
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


def make_opt_ml(base, channels, hyperparameters=None, hosts=("algo-1",), current_host="algo-1"):
    """A SageMaker-style tree: channels maps a channel name to {file name: bytes}."""
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
        json.dump({name: {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated"}
                   for name in channels}, f)
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
    }, {**FAST_HYPERPARAMETERS, "epochs": "2", "use_amp": "auto", "sagemaker_program": "ignored"})
    result = run_train(base, distilbert_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return base, result
