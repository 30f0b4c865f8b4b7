"""Metric lines in the job log, the SageMaker `metric_definitions` regexes that read them, and TensorBoard.

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


class MetricLogger:
    """A training-loop hook: one line per epoch and one every `every_n_steps` steps, for people and
    for SageMaker. The values are the whole job's (every replica of every host)."""

    def __init__(self, every_n_steps, print_fn=print):
        self.every_n_steps = every_n_steps
        self.print_fn = print_fn

    def on_epoch_begin(self, epoch):
        self.epoch = epoch

    def on_step_end(self, step, running):
        if step % self.every_n_steps == 0:
            self.print_fn(format_metrics(epoch=self.epoch, step=step, running_train_loss=running.loss,
                                         running_train_accuracy=running.accuracy))

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


class TensorBoardLog:
    """A training-loop hook: the epoch metrics as TensorBoard scalars, under the names Keras's
    TensorBoard callback uses (train/ and validation/, epoch_loss and epoch_accuracy, step = epoch)."""

    def __init__(self, log_dir):
        import tensorflow as tf

        self._writers = {name: tf.summary.create_file_writer(f"{log_dir}/{name}") for name in ("train", "validation")}

    def on_epoch_end(self, epoch, step, logs):
        import tensorflow as tf

        for writer_name, prefix in (("train", "train_"), ("validation", "val_")):
            if f"{prefix}loss" not in logs:
                continue
            with self._writers[writer_name].as_default(step=epoch - 1):
                tf.summary.scalar("epoch_loss", logs[f"{prefix}loss"])
                tf.summary.scalar("epoch_accuracy", logs[f"{prefix}accuracy"])
            self._writers[writer_name].flush()
