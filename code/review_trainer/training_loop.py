"""The training loop: one step clock for every strategy, one device or many hosts.

Keras 3's `fit` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585), so every run goes
through this loop, read top to bottom like nanoGPT's. A step runs on every replica under
`strategy.run` and all-reduces, besides the gradients (Keras's optimizer sums them), a few numbers:

    examples   the global batch: each replica's loss is its sum over the global count, so the summed
               gradients are those of the mean over the global batch (the last batch of a pass is smaller)
    loss, correct   for the metric lines, over the whole job
    stop votes      one per stop reason (SIGTERM, SIGINT): a host that received the signal votes, and
               every host sees the same sum, so all stop after the same step

Hooks (metric lines, TensorBoard, checkpoints) are plain objects with any of on_epoch_begin,
on_step_end, on_epoch_trained (the training pass ended; validation comes next), on_epoch_end and
on_stop; on_stop returns what became of the progress.
"""

import dataclasses
import time

import numpy as np
from review_trainer.errors import ResourceError

STOP_REASONS = ("SIGTERM", "SIGINT")


@dataclasses.dataclass
class Totals:
    """Sums over the job's replicas since the start of an epoch (or of an evaluation)."""

    loss_sum: float = 0.0
    correct: float = 0.0
    examples: float = 0.0

    def add(self, other):
        self.loss_sum += other.loss_sum
        self.correct += other.correct
        self.examples += other.examples

    @property
    def loss(self):
        return self.loss_sum / self.examples if self.examples else float("nan")

    @property
    def accuracy(self):
        return self.correct / self.examples if self.examples else float("nan")


class TrainingLoop:
    def __init__(self, topology, model, *, jit_compile, batch_sizes):
        import keras
        import tensorflow as tf

        self.topology = topology
        self.model = model
        self.batch_sizes = batch_sizes  # {"train_batch_size": n, "validation_batch_size": n}: per replica
        self._loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        # XLA compiles the replica's own computation; the collectives stay outside it.
        self._forward_backward = tf.function(self._forward_backward_fn, jit_compile=jit_compile)
        self._train_step = tf.function(lambda batch, votes: self._run(self._train_replica, batch, votes))
        self._eval_step = tf.function(lambda batch, votes: self._run(self._eval_replica, batch, votes))
        self.input_seconds = 0.0  # spent waiting for the next batch (input_wait_share in the epoch line)

    # One step, on every replica
    def _run(self, replica_fn, batch, votes):
        outputs = self.topology.strategy.run(replica_fn, args=(batch, votes))
        return self.topology.strategy.experimental_local_results(outputs)[0]  # the same on every replica

    def _train_replica(self, batch, votes):
        import keras
        import tensorflow as tf

        features, labels = batch
        context = tf.distribute.get_replica_context()
        examples = tf.cast(tf.shape(labels)[0], tf.float32)
        job_examples = context.all_reduce(tf.distribute.ReduceOp.SUM, examples)
        gradients, loss_sum, correct = self._forward_backward(features, labels, job_examples)
        if isinstance(self.model.optimizer, keras.optimizers.LossScaleOptimizer):
            gradients = self._non_finite_everywhere_if_anywhere(gradients, context)
        self.model.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables))
        return context.all_reduce(tf.distribute.ReduceOp.SUM, tf.concat([[loss_sum, correct, examples], votes], 0))

    @staticmethod
    def _non_finite_everywhere_if_anywhere(gradients, context):
        """float16: Keras's LossScaleOptimizer decides to skip a step (and lower the scale) from each
        worker's first replica's own gradients, before they are summed; an overflow on another
        replica would then reach the weights (or one worker would skip and the other not, and
        hang). One non-finite gradient anywhere makes every replica's non-finite: one decision."""
        import tensorflow as tf

        def values(g):  # an embedding's gradient stays sparse (IndexedSlices)
            return g.values if isinstance(g, tf.IndexedSlices) else g

        def poisoned(g, poison):
            if isinstance(g, tf.IndexedSlices):
                return tf.IndexedSlices(g.values + tf.cast(poison, g.dtype), g.indices, g.dense_shape)
            return g + tf.cast(poison, g.dtype)

        present = [values(g) for g in gradients if g is not None]
        non_finite = tf.add_n([tf.reduce_sum(tf.cast(~tf.math.is_finite(g), tf.float32)) for g in present])
        anywhere = context.all_reduce(tf.distribute.ReduceOp.SUM, non_finite) > 0
        poison = tf.where(anywhere, float("nan"), 0.0)
        return [None if g is None else poisoned(g, poison) for g in gradients]

    def _forward_backward_fn(self, features, labels, job_examples):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            logits = self.model(features, training=True)
            per_example = self._loss(labels, logits)
            loss = tf.reduce_sum(per_example) / tf.maximum(job_examples, 1.0)
            scaled = self.model.optimizer.scale_loss(loss)  # float16: the loss scale
        gradients = tape.gradient(scaled, self.model.trainable_variables)
        return gradients, tf.reduce_sum(per_example), self._correct(logits, labels)

    def _eval_replica(self, batch, votes):
        import tensorflow as tf

        features, labels = batch
        logits = self.model(features, training=False)
        sums = [tf.reduce_sum(self._loss(labels, logits)), self._correct(logits, labels),
                tf.cast(tf.shape(labels)[0], tf.float32)]
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, tf.concat([sums, votes], 0))

    @staticmethod
    def _correct(logits, labels):
        import tensorflow as tf

        predicted = tf.argmax(logits, axis=-1, output_type=labels.dtype)
        return tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.float32))

    def _step(self, step_fn, iterator, stop_signal, what, batch_size_name="train_batch_size"):
        """Runs one step; returns (Totals, stop reason or None) as every worker sees them, or
        (None, None) when a finite dataset (a Pipe-mode pass) has ended."""
        import tensorflow as tf

        votes = np.array([stop_signal.received == reason for reason in STOP_REASONS], np.float32)
        try:
            with self.topology.collectives(what):
                waiting_since = time.perf_counter()
                try:
                    batch = next(iterator)
                except (StopIteration, tf.errors.OutOfRangeError):
                    return None, None
                finally:
                    self.input_seconds += time.perf_counter() - waiting_since
                sums = step_fn(batch, votes).numpy()
        except tf.errors.ResourceExhaustedError as error:
            raise ResourceError(
                f"out of memory during {what} with {batch_size_name}={self.batch_sizes[batch_size_name]} "
                f"examples per replica ({error.message.strip().splitlines()[0][:200]}); lower {batch_size_name} "
                "or max_seq_length, or use an instance with more memory"
            ) from error
        totals = Totals(float(sums[0]), float(sums[1]), float(sums[2]))
        stop = next((reason for reason, vote in zip(STOP_REASONS, sums[3:]) if vote > 0), None)
        return totals, stop

    # The run
    def fit(self, train_batches, *, start_step, steps_per_epoch, epochs, validation, stop_signal, hooks,
            position=None):
        """Trains from start_step to epochs * steps_per_epoch; returns the training seconds.

        Pipe mode (steps_per_epoch None): train_batches is a data.PipePasses; an epoch is one pass,
        `epoch(n)`, and ends where its data ends; `finish()` then raises what went wrong in it.
        A resumed job starts in epoch position["epochs_done"] + 1, skipping the steps that the
        checkpoint's epoch had taken (see Checkpointer.position).
        validation: (distributed dataset, steps) or None; (PipePasses, None) in Pipe mode. A stop
        agreed in a step (or during validation) ends the run after that step: hooks' on_stop, then
        JobStopped.
        """
        def call(name, *args):
            return [getattr(hook, name)(*args) for hook in hooks if hasattr(hook, name)]

        def stop(step, reason):
            stop_signal.agree(reason)
            outcome = "; ".join(call("on_stop", step))
            total = f"epoch {epoch} of {epochs}" if pipe_mode else f"{epochs * steps_per_epoch}"
            raise stop_signal.stopped(f"at step {step} of {total}; {outcome}")

        pipe_mode = steps_per_epoch is None
        position = position or {"epochs_done": 0, "epoch_start_step": 0}
        iterator = None if pipe_mode else iter(train_batches)
        step, training_seconds = start_step, 0.0
        first_epoch = position["epochs_done"] + 1 if pipe_mode else start_step // steps_per_epoch + 1
        for epoch in range(first_epoch, epochs + 1):
            call("on_epoch_begin", epoch)
            running, started, self.input_seconds = Totals(), time.perf_counter(), 0.0
            if pipe_mode:
                skip = start_step - position["epoch_start_step"] if epoch == first_epoch else 0
                iterator = iter(train_batches.epoch(epoch, skip_steps=skip))
            while pipe_mode or step < epoch * steps_per_epoch:
                totals, reason = self._step(self._train_step, iterator, stop_signal, f"training step {step + 1}")
                if totals is None:
                    break
                step += 1
                running.add(totals)
                call("on_step_end", step, running)
                if reason:
                    stop(step, reason)
            seconds = time.perf_counter() - started
            training_seconds += seconds
            if pipe_mode:
                train_batches.finish()  # raises what went wrong in the pass
            call("on_epoch_trained", epoch, step)
            logs = {"train_loss": running.loss, "train_accuracy": running.accuracy,
                    "train_samples_per_second": running.examples / seconds,
                    "input_wait_share": self.input_seconds / seconds}
            if validation is not None:
                batches, steps = validation
                pipe_passes = batches if hasattr(batches, "finish") else None
                evaluated, reason = self.evaluate(pipe_passes.epoch(epoch) if pipe_passes else batches, steps,
                                                  stop_signal, what=f"validation after step {step}")
                if reason:
                    stop(step, reason)
                if pipe_passes:
                    pipe_passes.finish()
                logs.update(val_loss=evaluated.loss, val_accuracy=evaluated.accuracy)
            call("on_epoch_end", epoch, step, logs)
        return training_seconds

    def evaluate(self, batches, steps, stop_signal, what="evaluation"):
        """(Totals, stop reason or None) over `steps` steps of a distributed dataset."""
        iterator = iter(batches)
        evaluated = Totals()
        for _ in range(steps) if steps is not None else iter(int, 1):  # None: to the end of the data
            totals, reason = self._step(self._eval_step, iterator, stop_signal, what, "validation_batch_size")
            if totals is None:
                break
            evaluated.add(totals)
            if reason:
                return evaluated, reason
        return evaluated, None
