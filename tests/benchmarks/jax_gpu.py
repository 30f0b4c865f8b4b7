"""Benchmark (GPU, not a test): the product's JAX training step, and its checkpoints, on a GPU.

The GPU machines lent to this project have JAX but no TensorFlow; backend=jax (auto on one GPU)
trains there with training/steps.py's JaxSteps, which this runs on the job's own model code (model/classifier.py,
model/pretrained.py), DistilBERT-base's shape (random weights: no DistilBERT weights can be had there),
batch 128, 64 tokens, per precision:

- `train_on_batch`: Keras's own single-step call, what the first GPU figures used (7,389 samples/s
  bf16, 8,433 fp16 on an H100): it writes the state back into Keras's variables and returns the
  loss as a Python float every step;
- `product step`: JaxSteps.train as the training loop calls it (state kept as arrays, buffers
  donated, the step's sums read back every step: the stop votes and metric lines need them);
- `no readback`: the same step with the sums read only at the end, what asynchronous dispatch could
  add on top;
each as samples/s, ratio to train_on_batch and share of the arithmetic bound (6 x non-embedding
parameters x tokens FLOP per training sample at --peak-tflops). It also saves a checkpoint from the
product step's state (sync_model), restores it into a fresh model and checks the next step's loss.

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
from review_trainer.training import checkpoints  # noqa: E402
from review_trainer.model.classifier import build_classifier  # noqa: E402
from review_trainer.model.pretrained import load_backbone, open_checkpoint  # noqa: E402
from review_trainer.training.steps import JaxSteps  # noqa: E402

POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
NO_VOTES = np.zeros(2, np.float32)


HEAD = "cls"  # --head


def build(folder, policy, length):
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    model = build_classifier(load_backbone(open_checkpoint(folder)), 5, length, head=HEAD)
    model.compile(optimizer=keras.optimizers.Adam(5e-5, epsilon=1e-8),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    model.optimizer.build(model.trainable_variables)
    return model


def batch(batch_size, length, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return ({"token_ids": rng.integers(5, vocab, (batch_size, length)).astype("int32"),
             "padding_mask": np.ones((batch_size, length), "int32")},
            rng.integers(0, 5, batch_size).astype("int32"))


def timed(run_steps, steps, batch_size):
    run_steps(3)  # compilation and warm-up
    started = time.perf_counter()
    run_steps(steps)
    return steps * batch_size / (time.perf_counter() - started)


def train_on_batch_speed(model, x, y, steps):
    def run(n):
        for _ in range(n):
            loss = model.train_on_batch(x, y)  # a Python float: the step has finished
        assert np.isfinite(loss)
    return timed(run, steps, len(y))


def product_step_speed(model, x, y, steps):
    jax_steps = JaxSteps(model)

    def run(n):
        for _ in range(n):
            sums = jax_steps.train((x, y), NO_VOTES)  # NumPy batch in, sums read back: as the loop does
        assert np.isfinite(sums).all()
    return timed(run, steps, len(y))


def no_readback_speed(model, x, y, steps):
    """What JaxSteps.train does, minus reading the sums back every step (the batch already on the device)."""
    import jax

    jax_steps = JaxSteps(model)
    on_device = jax.device_put((x, y))

    def run(n):
        for _ in range(n):
            sums, jax_steps._state = jax_steps._train_step(jax_steps._current_state(), jax_steps._fixed_values,
                                                           *on_device, NO_VOTES)
        assert np.isfinite(np.asarray(sums)).all()
    return timed(run, steps, len(y))


def flop_per_sample(model, length):
    embeddings = sum(int(np.prod(w.shape)) for w in model.weights if "embedding" in w.path)
    return 6 * (model.count_params() - embeddings) * length


def checkpoint_round_trip(folder, length, x, y):
    model = build(folder, "mixed_bfloat16", length)
    jax_steps = JaxSteps(model)
    for _ in range(3):
        jax_steps.train((x, y), NO_VOTES)
    jax_steps.sync_model()
    with tempfile.TemporaryDirectory() as directory:
        store = checkpoints.CheckpointStore(directory, keep=2)
        seconds = store.save(checkpoints.training_variables(model), 3, {})
        fresh = build(folder, "mixed_bfloat16", length)
        checkpoints.restore(fresh, store.latest())
    saved = [np.asarray(keras.ops.convert_to_numpy(v.value)) for v in checkpoints.training_variables(model)]
    loaded = [np.asarray(keras.ops.convert_to_numpy(v.value)) for v in checkpoints.training_variables(fresh)]
    identical = all(np.array_equal(a, b) for a, b in zip(saved, loaded))
    next_loss = [float(JaxSteps(m).train((x, y), NO_VOTES)[0]) for m in (model, fresh)]
    return {"save_seconds": round(seconds, 3), "variables": len(saved), "identical_after_restore": identical,
            "next_loss_original": next_loss[0], "next_loss_restored": next_loss[1]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="a tiny model, to try the script on a CPU")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated Keras dtype policies")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="the card's dense bf16 peak")
    parser.add_argument("--head", default="cls", help="the classifier head: cls or bilstm")
    parser.add_argument("--out")
    args = parser.parse_args()
    import jax

    global HEAD
    HEAD = args.head

    folder = tempfile.mkdtemp(prefix="distilbert-shape-")
    if args.small:
        tiny_pretrained.make_distilbert(folder)
        batch_size, length, vocab = 8, 16, len(tiny_pretrained.VOCAB)
    else:
        tiny_pretrained.make_distilbert(folder, hidden=768, layers=6, heads=12, intermediate=3072, vocab_size=30522)
        batch_size, length, vocab = 128, 64, 30522
    batch_size = args.batch_size or batch_size
    x, y = batch(batch_size, length, vocab)
    results = {"devices": [str(d) for d in jax.devices()], "keras": keras.__version__, "jax": jax.__version__,
               "head": args.head, "batch_size": batch_size, "length": length, "samples_per_second": {}}
    bound = None
    for policy in args.policies.split(","):
        speeds = {
            "train_on_batch": train_on_batch_speed(build(folder, policy, length), x, y, args.steps),
            "product step": product_step_speed(build(folder, policy, length), x, y, args.steps),
            "no readback": no_readback_speed(build(folder, policy, length), x, y, args.steps),
        }
        if bound is None:
            bound = args.peak_tflops * 1e12 / flop_per_sample(build(folder, policy, length), length)
            results["arithmetic_bound_samples_per_second"] = round(bound)
        for name, speed in speeds.items():
            results["samples_per_second"][f"{policy} {name}"] = round(speed, 1)
            print(f"{policy:<15} {name:<15} {speed:9.1f} samples/s  x{speed / speeds['train_on_batch']:.2f} of "
                  f"train_on_batch, {speed / bound:.1%} of the {args.peak_tflops:g} TFLOP/s bound", flush=True)
    results["checkpoint"] = checkpoint_round_trip(folder, length, x, y)
    print(json.dumps(results["checkpoint"]))
    # Which cuDNN files this process mapped (gpu.sh checks the reduced configuration's run with it)
    with open("/proc/self/maps") as maps:
        results["cudnn_libraries"] = sorted({line.split()[-1] for line in maps if "libcudnn" in line})
    print("cudnn libraries mapped:", results["cudnn_libraries"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
