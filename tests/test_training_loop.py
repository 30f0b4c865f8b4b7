"""The training loop's step: stop votes, out-of-memory errors, and a float16 step with loss scaling
(the GPU default, which runs here on the CPU)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from review_trainer.contract.errors import ResourceError, describe_failure
from review_trainer.training import steps as training_steps
from review_trainer.training.stopping import StopSignal
from review_trainer.training.topology import Topology
from review_trainer.training.loop import TrainingLoop


def one_device():
    return Topology(tf.distribute.get_strategy(), "none", "test", ("algo-1",), 0, 1)


def loop_without_model(train_batch_size):
    loop = TrainingLoop.__new__(TrainingLoop)  # _step needs no model
    loop.topology, loop.batch_sizes = one_device(), {"train_batch_size": train_batch_size, "validation_batch_size": 64}
    loop.steps = training_steps.TensorFlowSteps.__new__(training_steps.TensorFlowSteps)
    loop.input_seconds = 0.0
    return loop


def test_out_of_memory_in_a_step_is_a_resource_error_with_the_per_replica_batch():
    loop = loop_without_model(48)

    def step_fn(batch, votes):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[48,12,64,64]")

    with pytest.raises(ResourceError, match="out of memory during training step 3 with train_batch_size=48 examples "
                                            r"per replica \(OOM when allocating tensor with shape\[48,12,64,64\]\); "
                                            "lower train_batch_size or max_seq_length"):
        loop._step(step_fn, iter([None]), StopSignal(), "training step 3")
    with pytest.raises(ResourceError, match="during validation after step 9 with validation_batch_size=64 examples per "
                                            r"replica .*; lower validation_batch_size"):
        loop._step(step_fn, iter([None]), StopSignal(), "validation after step 9", "validation_batch_size")
    kind, message, exit_code = describe_failure(tf.errors.ResourceExhaustedError(None, None, "OOM"))
    assert (kind, exit_code) == ("ResourceError", 5) and message.startswith("out of memory (ResourceExhaustedError)")


def test_out_of_memory_on_jax_is_a_resource_error_in_a_step_and_anywhere_else():
    import jax

    oom = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3.2GiB")
    assert training_steps.JaxSteps.out_of_memory(oom)
    assert not training_steps.JaxSteps.out_of_memory(jax.errors.JaxRuntimeError("INTERNAL: something else"))
    kind, message, exit_code = describe_failure(oom)  # e.g. in the test evaluation, after training
    assert (kind, exit_code) == ("ResourceError", 5) and message.startswith("out of memory (JaxRuntimeError)")
    assert describe_failure(jax.errors.JaxRuntimeError("INTERNAL: x"))[0] == "InternalError"


def test_stop_votes_say_which_signal_this_host_received():
    seen = []
    loop = loop_without_model(8)

    def step_fn(batch, votes):
        seen.append(votes.tolist())
        return np.concatenate([[2.0, 1.0, 4.0, 9.0], votes * [1, 1]]).astype(np.float32)

    stop_signal = StopSignal()
    assert loop._step(step_fn, iter([None]), stop_signal, "a step")[2] is None
    stop_signal.received = "SIGINT"
    totals, gradient_norm, reason = loop._step(step_fn, iter([None]), stop_signal, "a step")
    assert seen == [[0.0, 0.0], [0.0, 1.0]] and reason == "SIGINT"
    assert (totals.loss, totals.accuracy, gradient_norm) == (0.5, 0.25, 3.0)  # the norm: the root of the sum


# The steps of each backend, run in one process per backend (Keras fixes its backend at import):
# {"float16": ..., "three_steps": ..., "norm_float32": ..., "norm_mixed_float16": ...} as JSON.
STEPS_OF_A_BACKEND = """
import json, os, sys
os.environ["KERAS_BACKEND"] = sys.argv[1]
import keras, numpy as np, tensorflow as tf
from review_trainer.training.topology import Topology
from review_trainer.training.loop import TrainingLoop


def loop_for(model, batch_size):
    return TrainingLoop(Topology(tf.distribute.get_strategy(), "none", "test", ("algo-1",), 0, 1), model,
                        jit_compile=False, batch_sizes={"train_batch_size": batch_size}, backend=sys.argv[1])


def compiled(model, learning_rate):
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=learning_rate))
    model.optimizer.build(model.trainable_variables)
    return model


def numpy(value):
    return keras.ops.convert_to_numpy(value)


def float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    inputs = keras.Input((4,), name="token_ids")
    model = compiled(keras.Model(inputs, keras.layers.Dense(3, dtype="float32")(keras.layers.Dense(8)(inputs))), 0.01)
    before = [numpy(w).copy() for w in model.trainable_weights]
    loop = loop_for(model, 16)
    rng = np.random.default_rng(0)
    batch = (rng.normal(size=(16, 4)).astype("float32"), rng.integers(0, 3, 16).astype("int32"))
    sums = loop.steps.train(batch, np.zeros(2, np.float32))
    loop.sync_model()
    steps = [np.abs(numpy(w) - b) for w, b in zip(model.trainable_weights, before)]
    scale = float(numpy(model.optimizer.dynamic_scale))
    after_first = [numpy(w).copy() for w in model.trainable_weights]
    huge = (np.full((16, 4), 1e6, np.float32), batch[1])  # its float16 gradients overflow: the step is skipped
    loop.steps.train(huge, np.zeros(2, np.float32))
    loop.sync_model()
    skipped = all(bool((numpy(w) == a).all()) for w, a in zip(model.trainable_weights, after_first))
    return {"optimizer": type(model.optimizer).__name__, "examples": float(sums[2]), "loss_sum": float(sums[0]),
            "iterations": int(numpy(model.optimizer.iterations)),
            "median_step": float(np.median(np.concatenate([s.ravel() for s in steps]))), "scale": scale,
            "scale_after_overflow": float(numpy(model.optimizer.dynamic_scale)), "skipped": skipped}


def three_steps():
    keras.mixed_precision.set_global_policy("float32")
    rng = np.random.default_rng(7)
    inputs = keras.Input((6,), name="token_ids")
    model = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.Dense(8, activation="tanh")(inputs)))
    model.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in model.get_weights()])
    loop = loop_for(compiled(model, 0.05), 5)
    sums = []
    for size in (5, 5, 3):  # the last batch of a pass is smaller: the mean is over its own examples
        batch = (rng.normal(size=(size, 6)).astype("float32"), rng.integers(0, 4, size).astype("int32"))
        sums.append(loop.steps.train(batch, np.array([0.0, 1.0], np.float32)).tolist())
    loop.sync_model()
    return {"sums": sums, "weights": [w.tolist() for w in model.get_weights()],
            "iterations": int(numpy(model.optimizer.iterations))}


def gradient_norm(policy):
    keras.mixed_precision.set_global_policy(policy)
    rng = np.random.default_rng(3)
    inputs = keras.Input((5,), dtype="int32", name="token_ids")
    hidden = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(10, 4)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, dtype="float32")(keras.layers.Dense(6, activation="tanh")(hidden)))
    model.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in model.get_weights()])
    ids = np.array([[1, 1, 2, 1, 3], [2, 2, 2, 4, 1], [1, 3, 3, 0, 0], [4, 1, 1, 2, 2]], np.int32)  # repeated rows
    labels = np.array([0, 2, 1, 2], np.int32)
    sums = loop_for(compiled(model, 0.01), 4).steps.train((ids, labels), np.zeros(2, np.float32))
    return float(np.sqrt(sums[3]))


print(json.dumps({"float16": float16(), "three_steps": three_steps(), "norm_float32": gradient_norm("float32"),
                  "norm_mixed_float16": gradient_norm("mixed_float16")}))
"""


@pytest.fixture(scope="module")
def steps_of():
    """backend -> what STEPS_OF_A_BACKEND printed, run once per backend when first asked for."""
    results = {}

    def run(backend):
        if backend not in results:
            run = subprocess.run([sys.executable, "-c", STEPS_OF_A_BACKEND, backend], capture_output=True, text=True)
            assert run.returncode == 0, run.stderr[-3000:]
            results[backend] = json.loads(run.stdout.strip().splitlines()[-1])
        return results[backend]

    return run


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_a_float16_step_scales_the_loss_and_applies_unscaled_adam_steps(backend, steps_of):
    step = steps_of(backend)["float16"]
    assert step["optimizer"] == "LossScaleOptimizer" and step["examples"] == 16
    assert 0 < step["loss_sum"] / 16 < 10  # a finite mean cross-entropy of 3 classes
    # Adam's first step moves a weight by lr * g / (|g| + epsilon / sqrt(1 - beta_2)): the learning
    # rate while the gradient g dwarfs 3.2e-6. A loss never multiplied by the scale would have its
    # gradients divided by 2**15 when unscaled, down to that size, and move the median weight about
    # half as far (tried on both backends); a skipped step would not move them.
    assert step["median_step"] == pytest.approx(0.01, rel=0.02)
    # The scale starts at 2**15 and stays after a finite step; an overflowing step is skipped (the
    # weights stay, the iteration count does not advance) and halves it.
    assert step["scale"] == 2.0 ** 15 and step["scale_after_overflow"] == 2.0 ** 14 and step["skipped"] is True
    assert step["iterations"] == 1


FLOAT16_OVERFLOW_ON_ONE_REPLICA = """
import json, keras, numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from review_trainer.training.topology import Topology
from review_trainer.training.loop import TrainingLoop
keras.mixed_precision.set_global_policy("mixed_float16")
strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
with strategy.scope():
    inputs = keras.Input((4,), name="token_ids")
    model = keras.Model(inputs, keras.layers.Dense(3, dtype="float32")(keras.layers.Dense(8)(inputs)))
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.01))
    model.optimizer.build(model.trainable_variables)
topology = Topology(strategy, "mirrored", "test", ("algo-1",), 0, 1)
loop = TrainingLoop(topology, model, jit_compile=False, batch_sizes={"train_batch_size": 4})
labels = np.zeros(4, np.int32)
normal, huge = np.ones((4, 4), np.float32), np.full((4, 4), 1e6, np.float32)  # 1e6 overflows float16
replica_batches = tf.data.Dataset.from_tensor_slices(([normal, huge], [labels, labels]))
batch = next(iter(topology.distribute(lambda: replica_batches)))  # replica 0: normal, replica 1: huge
before = [w.numpy().copy() for w in model.trainable_weights]
loop.steps.train(batch, np.zeros(2, np.float32))
print(json.dumps({
    "unchanged": all(bool((w.numpy() == b).all()) for w, b in zip(model.trainable_weights, before)),
    "finite": all(bool(np.isfinite(w.numpy()).all()) for w in model.trainable_weights),
    "scale": float(model.optimizer.dynamic_scale.numpy()),
}))
"""


def test_float16_overflow_on_one_replica_skips_the_step_on_every_replica():
    result = subprocess.run([sys.executable, "-c", FLOAT16_OVERFLOW_ON_ONE_REPLICA], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    # The loss scale starts at 2**15 and halves on a skipped step.
    assert outcome == {"unchanged": True, "finite": True, "scale": 2.0 ** 14}


def test_the_job_wide_skip_decision_keeps_an_embeddings_gradient_sparse():
    def decide(gradients):
        return tf.distribute.get_strategy().run(lambda: training_steps.TensorFlowSteps._non_finite_everywhere_if_anywhere(
            gradients, tf.distribute.get_replica_context()))

    sparse = tf.IndexedSlices(tf.constant([[1.0, 2.0]]), tf.constant([3]), tf.constant([10, 2]))
    kept = decide([sparse, None, tf.constant([1.0, 2.0])])
    assert isinstance(kept[0], tf.IndexedSlices) and kept[1] is None
    assert kept[0].values.numpy().tolist() == [[1.0, 2.0]] and kept[2].numpy().tolist() == [1.0, 2.0]
    skipped = decide([sparse, None, tf.constant([1.0, float("inf")])])
    assert isinstance(skipped[0], tf.IndexedSlices) and np.isnan(skipped[0].values.numpy()).all()
    assert np.isnan(skipped[2].numpy()).all()


def test_the_jax_step_trains_like_the_tensorflow_step(steps_of):
    """Three Adam steps from the same weights on the same batches: the JAX step (jitted, stateless,
    its state written back by sync_model) must end where TensorFlow's does."""
    tf_run, jax_run = steps_of("tensorflow")["three_steps"], steps_of("jax")["three_steps"]
    assert jax_run["iterations"] == tf_run["iterations"] == 3
    np.testing.assert_allclose(jax_run["sums"], tf_run["sums"], rtol=1e-5, equal_nan=False)
    assert [[s[2], *s[4:]] for s in jax_run["sums"]] == [[5, 0, 1], [5, 0, 1], [3, 0, 1]]  # examples, the votes
    assert all(s[3] > 0 for s in jax_run["sums"])  # the squared gradient norm (its value: the test below)
    initial = np.random.default_rng(7).normal(0, 0.5, 6 * 8).astype("float32")
    trained = np.ravel(jax_run["weights"][0])
    assert np.isfinite(trained).all() and not np.allclose(trained, initial)  # it trained
    for got, expected in zip(jax_run["weights"], tf_run["weights"]):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6, equal_nan=False)


@pytest.mark.parametrize("backend,policy", [("tensorflow", "float32"), ("tensorflow", "mixed_float16"),
                                            ("jax", "float32"), ("jax", "mixed_float16")])
def test_the_gradient_norm_is_that_of_the_mean_loss_unscaled_with_repeated_embedding_rows(backend, policy, steps_of):
    """Against plain float32 autodiff in this process: tf.GradientTape on the same weights and batch,
    the embedding's sparse gradient made dense by TensorFlow (repeated rows summed)."""
    norm = steps_of(backend)[f"norm_{policy}"]
    import keras

    rng = np.random.default_rng(3)
    weights = [tf.Variable(rng.normal(0, 0.5, shape).astype("float32"))
               for shape in ((10, 4), (4, 6), (6,), (6, 3), (3,))]
    ids = np.array([[1, 1, 2, 1, 3], [2, 2, 2, 4, 1], [1, 3, 3, 0, 0], [4, 1, 1, 2, 2]], np.int32)
    labels = np.array([0, 2, 1, 2], np.int32)
    with tf.GradientTape() as tape:
        hidden = tf.reduce_mean(tf.gather(weights[0], ids), axis=1)
        logits = tf.tanh(hidden @ weights[1] + weights[2]) @ weights[3] + weights[4]
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
    expected = float(tf.linalg.global_norm([tf.convert_to_tensor(g) for g in tape.gradient(loss, weights)]))
    assert expected > 0.1
    # float16 computes in half precision: within its rounding; float32 to float rounding
    assert norm == pytest.approx(expected, rel=2e-2 if policy == "mixed_float16" else 1e-5)
