"""The training loop: one step clock for every strategy, backend and input mode, one device or many hosts.

Keras 3's `fit` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585), so every run goes
through this loop, read top to bottom like nanoGPT's. A step (steps.py: under the
tf.distribute strategy, or jitted by JAX on one device) trains on the batch and sums over the
job's replicas, besides the gradients, a few numbers:

    examples   the global batch, by which each replica's loss sum is divided
    loss, correct   for the metric lines, over the whole job
    gradient norm   for the rules and the tensors (squared, summed as steps.py says)
    stop votes      one per stop reason (SIGTERM, SIGINT): a host that received the signal votes, and
               every host sees the same sum, so all stop after the same step

Hooks (metric lines, rules, tensors, TensorBoard, the profiler, checkpoints) are plain objects with
any of on_epoch_begin, on_step_end (with the step's StepResult), on_epoch_trained (the training
pass ended; validation comes next), on_epoch_end and on_stop; on_stop returns what became of the
progress. on_step_end and on_epoch_end may return an end of the run (a rule's decision:
telemetry/rules.py): training ends after that step, and `fit` returns with `ended_by` set. Every
host computes the same decision from the same job-wide numbers. A hook that reads the model's
variables calls `sync_model` first (JAX trains on arrays outside them).

The batches come from the channels' pass objects (data/channels.py), whatever the input mode: an
epoch's batches end where the epoch does, and `finish()` after them raises what went wrong in a
streamed pass.
"""

import dataclasses
import time

import numpy as np
from review_trainer.contract.errors import ResourceError
from review_trainer.training import steps as training_steps
from review_trainer.training.stopping import STOP_REASONS


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


@dataclasses.dataclass(frozen=True)
class StepResult:
    """One training step, as every host sees it (the time fields are this host's own)."""

    step: int
    epoch: int
    loss: float  # the mean loss over the step's global batch
    accuracy: float
    examples: float
    gradient_norm: float  # of the mean loss's gradient, unscaled (steps.py)
    seconds: float  # wall time of the step, waiting for its batch included
    input_seconds: float  # of which waiting for the batch


class _Hooks:
    """The hooks a run calls: each method on the hooks that have it, in order."""

    def __init__(self, hooks):
        self.hooks = hooks

    def call(self, name, *args):
        return [getattr(hook, name)(*args) for hook in self.hooks if hasattr(hook, name)]

    def first_end(self, name, *args):
        """The first end of the run a hook returned, if any did."""
        return next((result for result in self.call(name, *args) if result is not None), None)


class TrainingLoop:
    def __init__(self, topology, model, *, jit_compile, batch_sizes, backend="tensorflow", head=None):
        """head: the model's head alone, for batches of cached encoder outputs (model/frozen_encoder.py)."""
        self.topology = topology
        self.model = model
        self.batch_sizes = batch_sizes  # {"train_batch_size": n, "validation_batch_size": n}: per replica
        self.steps = training_steps.for_backend(backend, topology, model, jit_compile, head)
        self.input_seconds = 0.0  # spent waiting for the next batch (input_wait_share in the epoch line)
        self.ended_by = None  # what a hook returned to end the run early (a rule's decision), if it did

    def sync_model(self):
        """Brings the model's (and optimizer's) variables up to the last step."""
        self.steps.sync_model()

    def _step(self, step_fn, iterator, stop_signal, what, batch_size_name="train_batch_size", step=None):
        """Runs one step (training step `step`, or None in an evaluation); returns (Totals, gradient
        norm, stop reason or None) as every worker sees them, or (None, None, None) when the batches
        have ended."""
        import tensorflow as tf  # tf.data feeds both backends

        try:
            with self.topology.collectives(what):
                waiting_since = time.perf_counter()
                try:
                    batch = next(iterator)
                except (StopIteration, tf.errors.OutOfRangeError):
                    return None, None, None
                finally:
                    self.input_seconds += time.perf_counter() - waiting_since
                # The votes once the batch is here: a signal that arrived while it was read counts now
                sums = step_fn(batch, stop_signal.votes(step))
        except Exception as error:
            if not self.steps.out_of_memory(error):
                raise
            message = getattr(error, "message", str(error)).strip().splitlines()[0][:200]
            raise ResourceError(
                f"out of memory during {what} with {batch_size_name}={self.batch_sizes[batch_size_name]} examples per "
                f"replica ({message}); lower {batch_size_name} or max_seq_length, or use an instance with more memory"
            ) from error
        totals = Totals(float(sums[0]), float(sums[1]), float(sums[2]))
        stop = next((reason for reason, vote in zip(STOP_REASONS, sums[4:]) if vote > 0), None)
        return totals, float(np.sqrt(sums[3])), stop

    # The run
    def fit(self, train, *, start_step, position, epochs, validation, stop_signal, hooks):
        """Trains from start_step to the end of epoch `epochs`; returns the training seconds.

        train: the training passes (data/channels.py): where a resumed job starts (from the global
        step and the checkpoint's position), each epoch's batches, and `finish()` at a pass's end.
        validation: the validation passes, or None. A stop agreed in a step (or during validation)
        ends the run after that step: hooks' on_stop, then JobStopped.
        """
        hooks = _Hooks(hooks)

        def stop(step, epoch, reason):
            stop_signal.agree(reason)
            outcome = "; ".join(hooks.call("on_stop", step))
            total = train.total_steps or f"epoch {epoch} of {epochs}"
            raise stop_signal.stopped(f"at step {step} of {total}; {outcome}")

        step, training_seconds, self.ended_by = start_step, 0.0, None
        first_epoch, skip_steps = train.resume_point(start_step, position)
        for epoch in range(first_epoch, epochs + 1):
            hooks.call("on_epoch_begin", epoch)
            batches = iter(train.epoch(epoch, skip_steps if epoch == first_epoch else 0))
            step, running, seconds = self._train_epoch(batches, epoch, step, stop_signal, hooks, stop)
            training_seconds += seconds
            if self.ended_by:  # mid-epoch: no validation; the pass is left unfinished
                break
            train.finish()  # raises what went wrong in a streamed pass
            hooks.call("on_epoch_trained", epoch, step)
            logs = {"train_loss": running.loss, "train_accuracy": running.accuracy,
                    "train_samples_per_second": running.examples / seconds,
                    "input_wait_share": self.input_seconds / seconds}
            if validation is not None:
                evaluated, reason = self.evaluate(validation.epoch(epoch), stop_signal,
                                                  what=f"validation after step {step}")
                if reason:
                    stop(step, epoch, reason)
                validation.finish()
                logs.update(val_loss=evaluated.loss, val_accuracy=evaluated.accuracy)
            self.ended_by = hooks.first_end("on_epoch_end", epoch, step, logs)
            if self.ended_by:
                break
        self.sync_model()
        return training_seconds

    def _train_epoch(self, batches, epoch, step, stop_signal, hooks, stop):
        """One epoch's training steps, to the end of its batches or an end a hook returned; returns
        (the last step, the epoch's Totals, its seconds)."""
        running, started, self.input_seconds = Totals(), time.perf_counter(), 0.0
        while True:
            step_started, input_before = time.perf_counter(), self.input_seconds
            totals, gradient_norm, reason = self._step(self.steps.train, batches, stop_signal,
                                                       f"training step {step + 1}", step=step + 1)
            if totals is None:
                break
            step += 1
            running.add(totals)
            result = StepResult(step, epoch, totals.loss, totals.accuracy, totals.examples, gradient_norm,
                                time.perf_counter() - step_started, self.input_seconds - input_before)
            self.ended_by = hooks.first_end("on_step_end", step, running, result)
            if reason:
                stop(step, epoch, reason)
            if self.ended_by:
                break
        return step, running, time.perf_counter() - started

    def evaluate(self, batches, stop_signal, what="evaluation"):
        """(Totals, stop reason or None) over the distributed batches, to their end."""
        iterator = iter(batches)
        evaluated = Totals()
        while True:
            totals, _, reason = self._step(self.steps.evaluate, iterator, stop_signal, what, "validation_batch_size")
            if totals is None:
                break
            evaluated.add(totals)
            if reason:
                return evaluated, reason
        return evaluated, None
