"""Metric lines in the job log, and the SageMaker `metric_definitions` regexes that read them.

Every value is printed as `name=value` with a name that no other name ends with, so that
`\\btrain_loss=` cannot match `val_loss=` (the book's `loss: (...)` also caught `val_loss`).
Lines every N steps use `running_` names, which the epoch regexes do not match.
"""

import time

import keras

_NUMBER = r"([-+0-9.eE]+|nan|inf)"
METRIC_NAMES = (
    "train_loss", "train_accuracy", "val_loss", "val_accuracy",
    "test_loss", "test_accuracy", "test_macro_f1", "train_samples_per_second",
)
METRIC_DEFINITIONS = [{"Name": name, "Regex": rf"\b{name}={_NUMBER}"} for name in METRIC_NAMES]


def format_metrics(**values):
    return " ".join(f"{name}={_format(value)}" for name, value in values.items())


def _format(value):
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class MetricLogger(keras.callbacks.Callback):
    """One line per epoch and one every `every_n_steps` steps, for people and for SageMaker."""

    def __init__(self, every_n_steps, batch_size, global_step=0, print_fn=print):
        super().__init__()
        self.every_n_steps = every_n_steps
        self.batch_size = batch_size
        self.print_fn = print_fn
        self.global_step = global_step

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1
        self.epoch_start = time.perf_counter()
        self.epoch_steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self.global_step += 1
        self.epoch_steps += 1
        self.train_end = time.perf_counter()  # validation follows; it is not training time
        if self.global_step % self.every_n_steps == 0:
            logs = logs or {}
            self.print_fn(format_metrics(
                epoch=self.epoch, step=self.global_step,
                running_train_loss=float(logs.get("loss", float("nan"))),
                running_train_accuracy=float(logs.get("accuracy", float("nan"))),
            ))

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        seconds = self.train_end - self.epoch_start
        values = {
            "epoch": epoch + 1,
            "step": self.global_step,
            "train_loss": float(logs["loss"]),
            "train_accuracy": float(logs["accuracy"]),
        }
        if "val_loss" in logs:
            values["val_loss"] = float(logs["val_loss"])
            values["val_accuracy"] = float(logs["val_accuracy"])
        values["train_samples_per_second"] = int(self.epoch_steps * self.batch_size / seconds)
        self.print_fn(format_metrics(**values))
