"""Benchmark (not a test): fine-tune a real checkpoint on movie5 through the real `train` entry.

Prints test accuracy, macro-F1 and training samples per second from the job's own log, and a
TF-IDF + logistic-regression baseline on the same split, fitted in this script.

    .venv/bin/python tests/benchmarks/movie5.py --data ../shared/data/movie5 --pretrained .venv/pretrained-model
    (make benchmark does the same)
"""

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

TRAIN = os.path.join(os.path.dirname(sys.executable), "train")


def read_split(data_dir, split, rows=None):
    """(texts, labels) of a split, or of its first `rows` reviews."""
    with open(os.path.join(data_dir, f"{split}.tsv"), newline="") as f:
        table = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:rows]
    return [r["review_body"] for r in table], [r["star_rating"] for r in table]


def write_split(data_dir, split, folder, rows=None):
    """The split's TSV (or its header and first `rows` reviews) into folder, as a channel."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(data_dir, f"{split}.tsv")) as source:
        lines = source.readlines()
    with open(os.path.join(folder, f"{split}.tsv"), "w") as f:
        f.writelines(lines[:rows + 1] if rows else lines)


def tfidf_baseline(data_dir):
    train_x, train_y = read_split(data_dir, "train")
    test_x, test_y = read_split(data_dir, "test")
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    classifier = LogisticRegression(max_iter=2000, C=4.0)
    classifier.fit(vectorizer.fit_transform(train_x), train_y)
    predicted = classifier.predict(vectorizer.transform(test_x))
    return accuracy_score(test_y, predicted), f1_score(test_y, predicted, average="macro")


def run_job(data_dir, pretrained, hyperparameters, keep=False, splits=("train", "validation", "test"), rows=None,
            echo=True, config_files=None):
    """Runs `train` on the splits as channels (the train split cut to `rows`); returns (log, seconds).
    config_files: {file name: JSON content} written beside hyperparameters.json."""
    base = tempfile.mkdtemp(prefix="movie5-opt-ml-")
    for split in splits:
        write_split(data_dir, split, os.path.join(base, "input", "data", split), rows if split == "train" else None)
    os.makedirs(os.path.join(base, "input", "config"))
    for name, content in {"hyperparameters.json": hyperparameters, **(config_files or {})}.items():
        with open(os.path.join(base, "input", "config", name), "w") as f:
            json.dump(content, f)
    env = dict(os.environ, SAGEMAKER_BASE_DIR=base, PRETRAINED_MODEL_DIR=os.path.abspath(pretrained),
               TF_CPP_MIN_LOG_LEVEL="2")
    started = time.perf_counter()
    job = subprocess.run([TRAIN], env=env, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if echo:
        sys.stdout.write(job.stdout)
    if job.returncode != 0:
        sys.exit(f"train failed with exit code {job.returncode}: {open(os.path.join(base, 'output', 'failure')).read()}")
    if not keep:
        shutil.rmtree(base)
    return job.stdout, seconds


def last(name, log):
    values = re.findall(rf"\b{name}=(\S+)", log)
    return float(values[-1]) if values else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/movie5")
    parser.add_argument("--pretrained", default=".venv/pretrained-model")
    parser.add_argument("--keep", action="store_true", help="keep the /opt/ml tree of the run")
    parser.add_argument("hyperparameters", nargs="*", help="name=value pairs passed to the job")
    args = parser.parse_args()
    hyperparameters = {"epochs": "3", "learning_rate": "0.0001", "train_batch_size": "32",
                       "max_seq_length": "64", "log_every_n_steps": "50", "run_sample_predictions": "false"}
    hyperparameters.update(dict(pair.split("=", 1) for pair in args.hyperparameters))

    log, seconds = run_job(args.data, args.pretrained, hyperparameters, args.keep)
    baseline_accuracy, baseline_f1 = tfidf_baseline(args.data)
    speeds = [float(v) for v in re.findall(r"\btrain_samples_per_second=(\S+)", log)]
    print()
    print(f"hyperparameters: {' '.join(f'{k}={v}' for k, v in hyperparameters.items())}")
    print(f"{'model':<34} {'test accuracy':>13} {'macro-F1':>9}")
    print(f"{'fine-tuned (train entry)':<34} {last('test_accuracy', log):>13.4f} {last('test_macro_f1', log):>9.4f}")
    print(f"{'TF-IDF + logistic regression':<34} {baseline_accuracy:>13.4f} {baseline_f1:>9.4f}")
    print(f"training samples/s per epoch: {', '.join(f'{s:.0f}' for s in speeds)}; whole job {seconds:.0f} s")
    explained = re.search(r"^explanations reviews=(\d+) seconds=(\S+) seconds_per_review=(\S+)", log, re.M)
    if explained:  # step 7, after the model is published: its share of the rest of the job
        reviews, spent, each = int(explained[1]), float(explained[2]), float(explained[3])
        print(f"explanations: {reviews} reviews in {spent:.1f} s, {each:.2f} s a review: {spent / (seconds - spent):.1%} "
              f"on top of the job's other {seconds - spent:.0f} s")
    ratio = last("test_accuracy", log) / baseline_accuracy
    print(f"accuracy ratio fine-tuned / baseline: {ratio:.3f}")
    saves = [float(v) for v in re.findall(r"^checkpoint step=\d+ checkpoint_seconds=(\S+)", log, re.M)]
    if saves:  # with enable_checkpointing=true
        share = re.findall(r"\bcheckpoint_share=(\S+)", log)[-1]
        print(f"checkpoints: {len(saves)} saved, {np.median(saves):.2f} s each (median), "
              f"{share} of training time")


if __name__ == "__main__":
    main()
