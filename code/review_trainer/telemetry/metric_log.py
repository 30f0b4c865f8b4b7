"""Metric and progress lines in the job log, the SageMaker `metric_definitions` regexes that read them, and TensorBoard.

Every value is printed as `name=value` with a name that no other name ends with, so that
`\\btrain_loss=` cannot match `val_loss=` (the book's `loss: (...)` also caught `val_loss`).
Lines every N steps use `running_` names, which the epoch regexes do not match.
"""

_NUMBER = r"([-+0-9.eE]+|nan|inf)"
METRIC_NAMES = (
    "train_loss", "train_accuracy", "val_loss", "val_accuracy",
    "test_loss", "test_accuracy", "test_macro_f1", "train_samples_per_second", "input_wait_share",
)
METRIC_DEFINITIONS = [{"Name": name, "Regex": rf"\b{name}={_NUMBER}"} for name in METRIC_NAMES]


def format_metrics(**values):
    return " ".join(f"{name}={_format(value)}" for name, value in values.items())


def _format(value):
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class Interval:
    """This host's steps since the last reading (their count, seconds and examples), read every
    `every_n_steps` global steps."""

    def __init__(self, every_n_steps):
        self.every_n_steps = every_n_steps
        self.steps, self.seconds, self.examples = 0, 0.0, 0.0

    def add(self, step, result):
        """(step seconds, samples per second) since the last reading when `step` is one to report
        at (the interval then starts again), else None."""
        self.steps += 1
        self.seconds += result.seconds
        self.examples += result.examples
        if step % self.every_n_steps:
            return None
        steps, seconds, examples = self.steps, self.seconds, self.examples
        self.steps, self.seconds, self.examples = 0, 0.0, 0.0
        return seconds / max(steps, 1), examples / seconds if seconds else 0.0


class MetricLogger:
    """A training-loop hook: one line per epoch, and a progress line every `every_n_steps` steps,
    for people and for SageMaker. The losses and accuracies are the whole job's (every replica of
    every host); the speed is this host's, over the steps since the last progress line:

        epoch=1 step=50 running_train_loss=1.2 running_train_accuracy=0.4 running_samples_per_second=61
        step_seconds=0.52 gradient_norm=3.1 epoch_eta_seconds=104 job_eta_seconds=416 [device_memory_mb=2100]

    gradient_norm is the last step's; device_memory_mb is printed on a GPU. The ETAs assume the
    steps to come take as long as the last interval's (Pipe mode: no step count, no ETA)."""

    def __init__(self, every_n_steps, steps_per_epoch=None, total_steps=None, print_fn=print):
        self.every_n_steps = every_n_steps
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.print_fn = print_fn
        self._interval = Interval(every_n_steps)  # a resumed job's first one has fewer than every_n_steps steps

    def on_epoch_begin(self, epoch):
        self.epoch = epoch

    def on_step_end(self, step, running, result):
        reading = self._interval.add(step, result)
        if reading is None:
            return
        step_seconds, samples_per_second = reading
        values = {"epoch": self.epoch, "step": step, "running_train_loss": running.loss,
                  "running_train_accuracy": running.accuracy,
                  "running_samples_per_second": round(samples_per_second),
                  "step_seconds": step_seconds, "gradient_norm": f"{result.gradient_norm:.4g}"}
        if self.steps_per_epoch:
            values["epoch_eta_seconds"] = round((self.epoch * self.steps_per_epoch - step) * step_seconds)
            values["job_eta_seconds"] = round((self.total_steps - step) * step_seconds)
        memory = device_memory_bytes()
        if memory is not None:
            values["device_memory_mb"] = round(memory / 2**20)
        self.print_fn(format_metrics(**values))

    def on_epoch_end(self, epoch, step, logs):
        values = {"epoch": epoch, "step": step, "train_loss": logs["train_loss"],
                  "train_accuracy": logs["train_accuracy"]}
        if "val_loss" in logs:
            values["val_loss"] = logs["val_loss"]
            values["val_accuracy"] = logs["val_accuracy"]
        values["train_samples_per_second"] = int(logs["train_samples_per_second"])
        if "input_wait_share" in logs:  # of the epoch's training time, spent waiting for the next batch
            values["input_wait_share"] = round(logs["input_wait_share"], 4)
        self.print_fn(format_metrics(**values))


def device_memory_bytes():
    """Memory in use on the first accelerator, or None on a CPU (asked of the backend in use)."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        device = jax.local_devices()[0]
        return (device.memory_stats() or {}).get("bytes_in_use") if device.platform != "cpu" else None
    import tensorflow as tf

    if not tf.config.list_logical_devices("GPU"):
        return None
    return tf.config.experimental.get_memory_info("GPU:0")["current"]


def forward_function(model, max_seq_length):
    """The model's forward pass on serving-shaped inputs as a tf.function, for TensorBoard's graph."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, max_seq_length], tf.int32)
    return tf.function(lambda token_ids, padding_mask: model({"token_ids": token_ids, "padding_mask": padding_mask},
                                                             training=False), input_signature=[spec, spec])


class TensorBoardLog:
    """A training-loop hook: TensorBoard scalars under the names Keras's TensorBoard callback uses
    (train/ and validation/; epoch_loss and epoch_accuracy at step = epoch), and every
    `every_n_steps` steps, in train/ at the global step: batch_loss, batch_accuracy (the step's own),
    learning_rate, gradient_norm and samples_per_second (over the interval). On the TensorFlow
    backend the model's forward graph goes in train/ too (JAX's programs are not TensorFlow graphs)."""

    def __init__(self, log_dir, every_n_steps=50, learning_rate=None, graph_of=None):
        """graph_of: a tf.function whose concrete graph to write once (None: no graph)."""
        import tensorflow as tf

        self._writers = {name: tf.summary.create_file_writer(f"{log_dir}/{name}") for name in ("train", "validation")}
        self.every_n_steps, self.learning_rate = every_n_steps, learning_rate
        self._graph_of = graph_of
        self._interval = Interval(every_n_steps)

    def on_epoch_begin(self, epoch):
        import tensorflow as tf

        if self._graph_of is not None:
            with self._writers["train"].as_default():
                tf.summary.graph(self._graph_of.get_concrete_function().graph)
            self._graph_of = None

    def on_step_end(self, step, running, result):
        reading = self._interval.add(step, result)
        if reading is not None:
            self._write_step(step, result, samples_per_second=reading[1])

    def _write_step(self, step, result, samples_per_second):
        import tensorflow as tf

        with self._writers["train"].as_default(step=step):
            tf.summary.scalar("batch_loss", result.loss)
            tf.summary.scalar("batch_accuracy", result.accuracy)
            tf.summary.scalar("gradient_norm", result.gradient_norm)
            tf.summary.scalar("samples_per_second", samples_per_second)
            if self.learning_rate is not None:
                tf.summary.scalar("learning_rate", self.learning_rate)

    def close(self):
        for writer in self._writers.values():
            writer.close()

    def on_epoch_end(self, epoch, step, logs):
        import tensorflow as tf

        for writer_name, prefix in (("train", "train_"), ("validation", "val_")):
            if f"{prefix}loss" not in logs:
                continue
            with self._writers[writer_name].as_default(step=epoch - 1):
                tf.summary.scalar("epoch_loss", logs[f"{prefix}loss"])
                tf.summary.scalar("epoch_accuracy", logs[f"{prefix}accuracy"])
            self._writers[writer_name].flush()
