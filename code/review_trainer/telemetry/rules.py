"""Debugger rules, evaluated in the job: a run that goes wrong stops itself, and the stop is a result.

SageMaker Debugger's built-in rules ran in containers of their own, reading the tensors smdebug
saved; with smdebug gone from TensorFlow 2.11 on, the job evaluates them itself, on the numbers its
steps already sum over the whole job (training/loop.py). Every host computes the same decision from
the same numbers, so all stop after the same step without a message between them.

Each rule is switched by `rule_<name>` = stop | log | off and tuned by its own hyperparameters:

    loss_not_decreasing  every num_steps steps: the mean training loss of the last num_steps steps
                         against that of the num_steps before them; a relative decrease under
                         diff_percent (%) triggers it (smdebug's LossNotDecreasing compares two
                         single steps' losses; means of steps are less noisy with small batches)
    overtraining         val_loss rose for `patience` evaluations in a row while the epoch's
                         training loss fell (smdebug's Overtraining, per evaluation)
    early_stopping       early_stopping_metric did not improve on its best by min_delta for
                         `patience` evaluations (Keras's EarlyStopping)
    exploding_gradient   the step's gradient norm above the threshold
    vanishing_gradient   the step's gradient norm below the threshold
    class_imbalance      at the scan, before training: the most frequent training class over the
                         least frequent above the threshold (smdebug's ClassImbalance, 10); `stop`
                         fails the job there (DataError), as nothing is trained yet
    non_finite_loss      always on, always stops: the loss, or (without float16's loss scaling, which
                         skips such steps by design) the gradient norm, is NaN or infinite

A stop by rule ends training after that step; the job then exports the best model it has: the
weights of its lowest val_loss (kept in host memory at each better evaluation) or, with no
validation, the last ones. For a non-finite loss the last weights are not usable: with a kept
best model the job exports it and succeeds; without one it fails with TrainingError (exit code 8).
Everything that triggered is written to /opt/ml/output/data/rules.json.
"""

import dataclasses
import math

from review_trainer.contract.errors import DataError, TrainingError
from review_trainer.contract.files import write_json
from review_trainer.contract.hyperparameters import RULES

NON_FINITE = "non_finite_loss"
MAX_RECORDED = 100  # triggers kept per rule in rules.json; the count is always exact
MAX_LOGGED = 3  # log lines per rule whose action is log


@dataclasses.dataclass
class Triggered:
    """A rule's decision to end the run (what the training loop's hooks return)."""

    rule: str
    step: int
    message: str


class Rules:
    """A training-loop hook that evaluates the rules and keeps the best model for a stop."""

    def __init__(self, hp, print_fn=print):
        self.hp = hp
        self.print_fn = print_fn
        self.model = self.sync_model = None
        self.loss_scaling = False  # float16: a non-finite gradient skips the step, it is not a failure
        self.keep_best = False
        self.actions = {name: getattr(hp, f"rule_{name}") for name in RULES}
        self.actions[NON_FINITE] = "stop"
        self.triggers = {name: [] for name in self.actions}
        self.counts = {name: 0 for name in self.actions}
        self.stopped_by = None
        self.step_losses = []  # the last 2 * num_steps steps' losses
        self.evaluations = []  # (train_loss, val_loss, val_accuracy) per evaluation
        self.best = None  # {"step", "epoch", "val_loss", "weights"}: the lowest val_loss so far

    @classmethod
    def at_the_scan(cls, hp, train, report_path, print_fn=print):
        """The job's rules, and class_imbalance evaluated on the scanned train channel (a channel
        read once was not scanned: the rule is skipped). A stop there is a DataError, with the
        rules' record written first."""
        rules = cls(hp, print_fn)
        if train.summary is None:
            print_fn(f"rule=class_imbalance skipped: {train.read_once}, read once and not scanned")
            return rules
        try:
            rules.check_class_balance(train.summary.class_counts, hp.classes, may_stop=not train.own_files)
        except DataError:
            rules.write_report(report_path)
            raise
        return rules

    def watch(self, model, sync_model, loss_scaling, keep_best):
        """The model being trained; keep_best: keep the best weights for export (the chief)."""
        self.model, self.sync_model = model, sync_model
        self.loss_scaling, self.keep_best = loss_scaling, keep_best

    # Before training
    def check_class_balance(self, class_counts, classes, may_stop=True):
        """class_counts: training rows per class index, from the scan; may_stop False: this host
        scanned its own shard only (ShardedByS3Key), so the rule logs what it sees and never stops."""
        counts = [class_counts.get(index, 0) for index in range(len(classes))]
        ratio = max(counts) / min(counts) if min(counts) else math.inf
        values = {"counts": dict(zip(classes, counts)), "ratio": ratio,
                  "threshold": self.hp.class_imbalance_threshold}
        if ratio > self.hp.class_imbalance_threshold:
            most, least = counts.index(max(counts)), counts.index(min(counts))
            message = (f"the training channel has {counts[most]} rows of class {classes[most]} and {counts[least]} of "
                       f"class {classes[least]}, a ratio of {ratio:.1f} (class_imbalance_threshold="
                       f"{self.hp.class_imbalance_threshold:g})")
            if not may_stop and self.actions["class_imbalance"] == "stop":
                self.actions["class_imbalance"] = "log"
                message += "; this host's shard only (ShardedByS3Key), so logged, not stopped"
            self._trigger("class_imbalance", 0, 0, values, message)
            if self.actions["class_imbalance"] == "stop":
                raise DataError(f"rule class_imbalance (action stop): {message}; rebalance the data, or set "
                                "rule_class_imbalance=log to train anyway")

    # Training-loop hooks
    def on_step_end(self, step, running, result):
        if not math.isfinite(result.loss) or (not self.loss_scaling and not math.isfinite(result.gradient_norm)):
            return self._trigger(NON_FINITE, step, result.epoch, {"loss": result.loss,
                                 "gradient_norm": result.gradient_norm}, "the loss or the gradient norm is NaN or infinite")
        ended = None
        if math.isfinite(result.gradient_norm):
            if result.gradient_norm > self.hp.exploding_gradient_threshold:
                ended = self._trigger("exploding_gradient", step, result.epoch, {
                    "gradient_norm": result.gradient_norm, "threshold": self.hp.exploding_gradient_threshold},
                    f"gradient norm {result.gradient_norm:.4g} > exploding_gradient_threshold="
                    f"{self.hp.exploding_gradient_threshold:g}")
            elif result.gradient_norm < self.hp.vanishing_gradient_threshold:
                ended = self._trigger("vanishing_gradient", step, result.epoch, {
                    "gradient_norm": result.gradient_norm, "threshold": self.hp.vanishing_gradient_threshold},
                    f"gradient norm {result.gradient_norm:.4g} < vanishing_gradient_threshold="
                    f"{self.hp.vanishing_gradient_threshold:g}")
        return ended or self._loss_not_decreasing(step, result)

    def _loss_not_decreasing(self, step, result):
        window = self.hp.loss_not_decreasing_num_steps
        self.step_losses = (self.step_losses + [result.loss])[-2 * window:]
        if len(self.step_losses) < 2 * window or step % window:
            return None
        before = sum(self.step_losses[:window]) / window
        after = sum(self.step_losses[window:]) / window
        decrease_percent = (before - after) / abs(before) * 100 if before else 0.0
        if decrease_percent >= self.hp.loss_not_decreasing_diff_percent:
            return None
        return self._trigger("loss_not_decreasing", step, result.epoch, {
            "mean_loss_before": before, "mean_loss_after": after, "decrease_percent": decrease_percent,
            "num_steps": window, "diff_percent": self.hp.loss_not_decreasing_diff_percent},
            f"the mean loss of steps {step - window + 1}-{step} ({after:.4f}) is "
            f"{'down' if decrease_percent >= 0 else 'up'} {abs(decrease_percent):.2f}% on the {window} steps before "
            f"({before:.4f}): it did not fall by loss_not_decreasing_diff_percent={self.hp.loss_not_decreasing_diff_percent:g}%")

    def on_epoch_end(self, epoch, step, logs):
        if "val_loss" not in logs:
            return None
        train_loss, val_loss, val_accuracy = logs["train_loss"], logs["val_loss"], logs["val_accuracy"]
        if self.keep_best and math.isfinite(val_loss) and (self.best is None or val_loss < self.best["val_loss"]):
            self.sync_model()
            self.best = {"step": step, "epoch": epoch, "val_loss": val_loss, "weights": self.model.get_weights()}
        self.evaluations.append((train_loss, val_loss, val_accuracy))
        return self._overtraining(epoch, step) or self._early_stopping(epoch, step)

    def _overtraining(self, epoch, step):
        patience = self.hp.overtraining_patience
        if len(self.evaluations) <= patience:
            return None
        recent = self.evaluations[-patience - 1:]
        rising = all(later[1] > earlier[1] for earlier, later in zip(recent, recent[1:]))
        falling = all(later[0] < earlier[0] for earlier, later in zip(recent, recent[1:]))
        if not (rising and falling):
            return None
        return self._trigger("overtraining", step, epoch, {
            "train_loss": [e[0] for e in recent], "val_loss": [e[1] for e in recent], "patience": patience},
            f"val_loss rose for {patience} evaluation(s) ({' -> '.join(f'{e[1]:.4f}' for e in recent)}) while "
            f"train_loss fell ({' -> '.join(f'{e[0]:.4f}' for e in recent)})")

    def _early_stopping(self, epoch, step):
        """Keras's EarlyStopping: an evaluation improves when it beats the best by more than min_delta."""
        metric, patience = self.hp.early_stopping_metric, self.hp.early_stopping_patience
        best, best_evaluation, waited = math.inf, 0, 0
        for number, (_, val_loss, val_accuracy) in enumerate(self.evaluations, 1):
            value = val_loss if metric == "val_loss" else -val_accuracy  # lower is better
            if value < best - self.hp.early_stopping_min_delta:
                best, best_evaluation, waited = value, number, 0
            else:
                waited += 1
        if waited < patience:
            return None
        return self._trigger("early_stopping", step, epoch, {
            "metric": metric, "best": abs(best), "best_evaluation": best_evaluation, "patience": patience,
            "min_delta": self.hp.early_stopping_min_delta},
            f"{metric} has not improved on {abs(best):.4f} (evaluation {best_evaluation}) by more than "
            f"early_stopping_min_delta={self.hp.early_stopping_min_delta:g} for {waited} evaluation(s)")

    def _trigger(self, rule, step, epoch, values, message):
        action = self.actions[rule]
        if action == "off":
            return None
        self.counts[rule] += 1
        if len(self.triggers[rule]) < MAX_RECORDED:
            self.triggers[rule].append({"step": step, "epoch": epoch, "action": action, "values": values,
                                        "message": message})
        if action == "stop" or self.counts[rule] <= MAX_LOGGED:
            self.print_fn(f"rule={rule} action={action} step={step} epoch={epoch}: {message}"
                          + (" (further triggers: rules.json)" if action == "log" and self.counts[rule] == MAX_LOGGED else ""))
        if action != "stop" or rule == "class_imbalance":
            return None
        self.stopped_by = Triggered(rule, step, message)
        return self.stopped_by

    # After training
    def model_to_export(self, report_path, learning_rate):
        """On the chief, after training: what to export. None after a run no rule stopped (its last
        weights); after a stop by rule, the best kept weights put back into the model (or the last),
        as a record for rules.json and the manifest. A non-finite loss with no finite model kept is
        a TrainingError, its record written first."""
        if self.stopped_by is None:
            return None
        if self.stopped_by.rule == NON_FINITE and self.best is None:
            self.write_report(report_path)
            raise TrainingError(
                f"the loss became NaN or infinite at step {self.stopped_by.step}, and no finite model was kept to "
                "export (one is kept at each better validation loss: give the job a validation channel); lower "
                f"learning_rate (now {learning_rate:g}) or check the data; the rules' record is in {report_path}")
        exported = self.restore_best()
        self.print_fn("exporting the " + (f"best model: step {exported['step']}, val_loss={exported['val_loss']:.4f}"
                                          if exported["weights"] == "best" else f"last model: step {exported['step']}"))
        return exported

    def restore_best(self):
        """Before export, after a stop by rule: the best kept weights go back into the model.
        Returns what is exported, for rules.json and the log."""
        if self.best is not None:
            self.model.set_weights(self.best["weights"])
            return {"weights": "best", "step": self.best["step"], "epoch": self.best["epoch"],
                    "val_loss": self.best["val_loss"]}
        return {"weights": "last", "step": self.stopped_by.step}

    def write_report(self, path, exported=None):
        settings = {name: {k: v for k, v in dataclasses.asdict(self.hp).items()
                           if k.startswith(name) and not k.startswith("rule_")} for name in self.actions}
        report = {
            "rules": [{"rule": name, "action": action, "settings": settings[name], "triggered": self.counts[name],
                       "triggers": self.triggers[name]} for name, action in self.actions.items()],
            "stopped_by": self.stopped_by and dataclasses.asdict(self.stopped_by),
            "exported": exported,
        }
        write_json(report, path)  # NaN and infinities as strings: strict JSON
