"""Benchmark (GPU, not a test): the classifier and checkpoints on the Keras JAX backend.

The GPU machines lent to this project have JAX but no TensorFlow, so this checks there what the
TensorFlow image will do on a GPU, with the same model code (model.py, pretrained.py) and the same
checkpoint code (checkpointing.py):
- training-step speed per precision and XLA setting, DistilBERT-base's shape (random weights:
  no DistilBERT weights can be had here), batch 128, 64 tokens; ratios against float32 + XLA,
  the reference run in the same process;
- a checkpoint saved and restored into a fresh model gives identical variables and the same next
  loss (exact resume on a GPU).

    KERAS_BACKEND=jax PYTHONPATH=code:tests python3 tests/benchmarks/jax_gpu.py [--small] [--out results.json]
"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import tiny_pretrained  # noqa: E402
from review_trainer import checkpointing  # noqa: E402
from review_trainer.model import build_classifier  # noqa: E402
from review_trainer.pretrained import load_backbone, open_checkpoint  # noqa: E402

SETTINGS = [("float32", True), ("mixed_bfloat16", True), ("mixed_float16", True), ("mixed_bfloat16", False)]


def build(folder, policy, jit_compile, length):
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    model = build_classifier(load_backbone(open_checkpoint(folder)), 5, length)
    model.compile(optimizer=keras.optimizers.Adam(5e-5, epsilon=1e-8),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit_compile)
    return model


def batch(batch_size, length, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return ({"token_ids": rng.integers(5, vocab, (batch_size, length)).astype("int32"),
             "padding_mask": np.ones((batch_size, length), "int32")},
            rng.integers(0, 5, batch_size).astype("int32"))


def samples_per_second(model, x, y, steps):
    for _ in range(3):  # compilation and warm-up
        model.train_on_batch(x, y)
    started = time.perf_counter()
    for _ in range(steps):
        loss = model.train_on_batch(x, y)  # returns a Python float: the step has finished
    assert np.isfinite(loss)
    return steps * len(y) / (time.perf_counter() - started)


def checkpoint_round_trip(folder, length, x, y):
    model = build(folder, "mixed_bfloat16", True, length)
    for _ in range(3):
        model.train_on_batch(x, y)
    with tempfile.TemporaryDirectory() as directory:
        store = checkpointing.CheckpointStore(directory, keep=2)
        seconds = store.save(checkpointing.training_variables(model), 3, {})
        fresh = build(folder, "mixed_bfloat16", True, length)
        checkpointing.restore(fresh, store.latest())
    saved = [np.asarray(keras.ops.convert_to_numpy(v.value)) for v in checkpointing.training_variables(model)]
    loaded = [np.asarray(keras.ops.convert_to_numpy(v.value)) for v in checkpointing.training_variables(fresh)]
    identical = all(np.array_equal(a, b) for a, b in zip(saved, loaded))
    next_losses = [float(model.train_on_batch(x, y)), float(fresh.train_on_batch(x, y))]
    return {"save_seconds": round(seconds, 3), "variables": len(saved), "identical_after_restore": identical,
            "next_loss_original": next_losses[0], "next_loss_restored": next_losses[1]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="a tiny model, to try the script on a CPU")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out")
    args = parser.parse_args()
    import jax

    folder = tempfile.mkdtemp(prefix="distilbert-shape-")
    if args.small:
        tiny_pretrained.make_distilbert(folder)
        batch_size, length, vocab = 8, 16, len(tiny_pretrained.VOCAB)
    else:
        tiny_pretrained.make_distilbert(folder, hidden=768, layers=6, heads=12, intermediate=3072, vocab_size=30522)
        batch_size, length, vocab = 128, 64, 30522
    x, y = batch(batch_size, length, vocab)
    results = {"devices": [str(d) for d in jax.devices()], "keras": keras.__version__, "jax": jax.__version__,
               "batch_size": batch_size, "length": length, "samples_per_second": {}}
    for policy, jit_compile in SETTINGS:
        steps = args.steps if jit_compile else max(3, args.steps // 5)
        speed = samples_per_second(build(folder, policy, jit_compile, length), x, y, steps)
        results["samples_per_second"][f"{policy} xla={jit_compile}"] = round(speed, 1)
        reference = results["samples_per_second"]["float32 xla=True"]
        print(f"{policy:<15} xla={jit_compile!s:<5} {speed:9.1f} samples/s  ratio to float32 + XLA: "
              f"{speed / reference:.2f}", flush=True)
    results["checkpoint"] = checkpoint_round_trip(folder, length, x, y)
    print(json.dumps(results["checkpoint"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
