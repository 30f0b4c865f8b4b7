"""Benchmark (not a test): review-trainer's training speed against Hugging Face transformers in PyTorch,
on this machine, the same checkpoint folder and the same real sentences.

    .venv/bin/python tests/benchmarks/speed.py --data ../shared/data/movie5 --pretrained .venv/pretrained-model
    (make benchmark-speed does the same; --rows N trains on the first N training sentences)

Both train batch 32, up to 64 tokens, learning rate 1e-4, 2 epochs; samples/s are the second
epoch's (the first includes compilation and warm-up):
- review-trainer: the real `train` entry, data pipeline included (its epoch line's
  train_samples_per_second), with bucket_by_length (the default) and without (every batch padded
  to max_seq_length), on the backend `auto` picks here, and with buckets on the other backend
  (tensorflow or jax: the measurement behind backend=auto on CPUs);
- the reference: transformers' AutoModelForSequenceClassification in PyTorch, AdamW, dynamic
  padding (each batch padded to its longest review), torch.set_num_threads(os.cpu_count()).
It also prints the product tokenizer's throughput (reviews/s) and the mean padded length of each
(the product's measured on its own training stream).
torch and transformers are test and benchmark dependencies only (Makefile, dev lock).
"""

import argparse
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from movie5 import read_split, run_job, write_split  # noqa: E402

BATCH, MAX_LENGTH, LEARNING_RATE, EPOCHS = 32, 64, 1e-4, 2


def product(data_dir, pretrained, rows, extra):
    """The second epoch's samples/s of the real `train` entry, the job's seconds, its precision and
    the second epoch's share of training time spent waiting for input."""
    hyperparameters = {"epochs": str(EPOCHS), "learning_rate": str(LEARNING_RATE), "train_batch_size": str(BATCH),
                       "max_seq_length": str(MAX_LENGTH), "run_sample_predictions": "false",
                       "log_every_n_steps": "1000", **extra}
    log, seconds = run_job(data_dir, pretrained, hyperparameters, splits=("train",), rows=rows, echo=False)
    speeds = [float(v) for v in re.findall(r"\btrain_samples_per_second=(\S+)", log)]
    waits = [float(v) for v in re.findall(r"\binput_wait_share=(\S+)", log)]
    policy = re.search(r"\bprecision=(\S+)", log).group(1)
    backend = re.search(r"\bbackend=(\S+) precision=", log).group(1)
    return speeds[-1], seconds, f"{backend}, {policy}", waits[-1]


def reference(texts, labels, pretrained, classes):
    """The second epoch's samples/s of transformers in PyTorch, and its mean padded length."""
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    tokenizer = transformers.AutoTokenizer.from_pretrained(pretrained)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(pretrained, num_labels=len(classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    targets = torch.tensor([classes.index(label) for label in labels])
    rng = np.random.default_rng(0)
    speeds, padded = [], []
    model.train()
    for _ in range(EPOCHS):
        order = rng.permutation(len(texts))
        started, seen = time.perf_counter(), 0
        for start in range(0, len(order), BATCH):
            index = order[start:start + BATCH]
            batch = tokenizer([texts[i] for i in index], padding="longest", truncation=True, max_length=MAX_LENGTH,
                              return_tensors="pt")
            padded.append(batch["input_ids"].shape[1])
            loss = model(**batch, labels=targets[index]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            seen += len(index)
        speeds.append(seen / (time.perf_counter() - started))
    return speeds[-1], float(np.mean(padded))


def product_padded_length(data_dir, pretrained, rows):
    """The mean width of one pass of the product's bucketed training batches."""
    from review_trainer import data
    from review_trainer.model.pretrained import ReviewTokenizer, open_checkpoint

    folder = tempfile.mkdtemp(prefix="speed-channel-")
    try:
        write_split(data_dir, "train", folder, rows)
        spec = data.RowSpec("review_body", "star_rating", ("1", "2", "3", "4", "5"), MAX_LENGTH)
        channel = data.scan_channel("train", folder, spec, 0.01)
        steps = -(-channel.good_rows // BATCH)
        stream = data.make_training_stream(channel, spec, ReviewTokenizer(open_checkpoint(pretrained), MAX_LENGTH),
                                           BATCH, 42, bucket_by_length=True)
        return float(np.mean([x["token_ids"].shape[1] for x, _ in stream.take(steps)]))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def tokenizer_throughput(texts, pretrained):
    from review_trainer.model.pretrained import ReviewTokenizer, open_checkpoint

    tokenizer = ReviewTokenizer(open_checkpoint(pretrained), MAX_LENGTH)
    started = time.perf_counter()
    for start in range(0, len(texts), 512):  # the stream's chunk
        tokenizer(texts[start:start + 512])
    return len(texts) / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/movie5")
    parser.add_argument("--pretrained", default=".venv/pretrained-model")
    parser.add_argument("--rows", type=int, help="train on the first ROWS training sentences (default: all)")
    parser.add_argument("hyperparameters", nargs="*", help="name=value pairs passed to the job")
    args = parser.parse_args()
    extra = dict(pair.split("=", 1) for pair in args.hyperparameters)
    texts, labels = read_split(args.data, "train", args.rows)
    classes = sorted(set(labels))

    bucketed_speed, bucketed_seconds, policy, bucketed_wait = product(args.data, args.pretrained, args.rows,
                                                                      {"bucket_by_length": "true", **extra})
    padded_speed, padded_seconds, _, padded_wait = product(args.data, args.pretrained, args.rows,
                                                           {"bucket_by_length": "false", **extra})
    other_backend = "jax" if policy.startswith("tensorflow") else "tensorflow"
    other_speed, other_seconds, other_policy, other_wait = product(
        args.data, args.pretrained, args.rows, {"bucket_by_length": "true", **extra, "backend": other_backend})
    reference_speed, reference_padded = reference(texts, labels, args.pretrained, classes)
    bucketed_width = product_padded_length(args.data, args.pretrained, args.rows)
    reviews_per_second = tokenizer_throughput(texts, args.pretrained)
    print(f"{len(texts)} training sentences, batch {BATCH}, up to {MAX_LENGTH} tokens, {EPOCHS} epochs, "
          f"{os.cpu_count()} cores; samples/s of the second epoch")
    print(f"review-trainer, bucket_by_length=true ({policy}, mean batch width {bucketed_width:.1f} tokens): "
          f"{bucketed_speed:.1f} samples/s, {bucketed_wait:.1%} of it waiting for input (whole job {bucketed_seconds:.0f} s)")
    print(f"review-trainer, bucket_by_length=false ({policy}, every batch {MAX_LENGTH} tokens): "
          f"{padded_speed:.1f} samples/s, {padded_wait:.1%} of it waiting for input (whole job {padded_seconds:.0f} s)")
    print(f"review-trainer, bucket_by_length=true, backend={other_backend} ({other_policy}): {other_speed:.1f} "
          f"samples/s, {other_wait:.1%} of it waiting for input (whole job {other_seconds:.0f} s)")
    print(f"transformers PyTorch (float32, AdamW, dynamic padding: mean batch width {reference_padded:.1f} tokens): "
          f"{reference_speed:.1f} samples/s")
    print(f"ratio review-trainer / transformers: {bucketed_speed / reference_speed:.2f} with buckets, "
          f"{padded_speed / reference_speed:.2f} without, {other_speed / reference_speed:.2f} on {other_backend}")
    print(f"review-trainer tokenizer: {reviews_per_second:,.0f} reviews/s")


if __name__ == "__main__":
    main()
