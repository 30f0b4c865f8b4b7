"""The Debugger rules (telemetry/rules.py): each rule on numbers whose answer is known, then whole
jobs (in this process) that a rule stops: a diverging learning rate, a flat loss on a skewed
training channel, a NaN with and without a model to fall back on."""

import json
import math
import os
import re

import keras
import numpy as np
import pytest
from conftest import FAST_HYPERPARAMETERS, amazon_tsv, make_opt_ml, make_reviews, read_failure, train_in_process
from review_trainer.contract.errors import DataError
from review_trainer.contract.hyperparameters import Hyperparameters
from review_trainer.telemetry.rules import NON_FINITE, Rules
from review_trainer.training.loop import StepResult
from review_trainer.training.steps import TensorFlowSteps


def rules(printed=None, loss_scaling=False, **hyperparameters):
    job_rules = Rules(Hyperparameters.from_dict(hyperparameters), print_fn=(printed.append if printed is not None
                                                                             else lambda line: None))
    job_rules.watch(model=None, sync_model=lambda: None, loss_scaling=loss_scaling, keep_best=False)
    return job_rules


def step(number, loss, gradient_norm=1.0):
    return StepResult(number, 1, loss, 0.5, 8.0, gradient_norm, 0.1, 0.0)


def run_steps(job_rules, losses, gradient_norms=None):
    """Feeds the steps; returns the first decision to end the run and the step it came at."""
    for number, loss in enumerate(losses, 1):
        ended = job_rules.on_step_end(number, None, step(number, loss, (gradient_norms or [1.0] * len(losses))[number - 1]))
        if ended:
            return ended, number
    return None, None


@pytest.mark.parametrize("after,triggers", [
    (0.9995, True),  # a decrease of 0.05% < diff_percent=0.1
    (0.998, False),  # 0.2%
    (1.05, True),  # a rise
])
def test_loss_not_decreasing_compares_the_mean_loss_of_two_windows(after, triggers):
    job_rules = rules(rule_loss_not_decreasing="stop", loss_not_decreasing_num_steps="4")
    # steps 1-4 average 1.0 (noisy), steps 5-8 average `after`: the rule looks at step 8 only
    losses = [1.2, 0.8, 1.1, 0.9] + [after + 0.1, after - 0.1, after + 0.05, after - 0.05]
    ended, at = run_steps(job_rules, losses)
    if triggers:
        assert (ended.rule, ended.step, at) == ("loss_not_decreasing", 8, 8)
        values = job_rules.triggers["loss_not_decreasing"][0]["values"]
        assert values["mean_loss_before"] == pytest.approx(1.0) and values["mean_loss_after"] == pytest.approx(after)
        assert values["decrease_percent"] == pytest.approx((1.0 - after) * 100)
    else:
        assert ended is None and job_rules.counts["loss_not_decreasing"] == 0


def test_loss_not_decreasing_is_checked_every_num_steps_steps_over_the_last_two_windows():
    job_rules = rules(rule_loss_not_decreasing="stop", loss_not_decreasing_num_steps="3")
    # falling through step 6 (checked there: fine), flat from step 7: at step 9, steps 7-9 still beat
    # steps 4-6 (2.3 against 2.4); at step 12, steps 10-12 do not beat steps 7-9
    losses = [3.0, 2.9, 2.8, 2.5, 2.4, 2.3] + [2.3] * 8
    ended, at = run_steps(job_rules, losses)
    assert (ended.step, at) == (12, 12)
    values = job_rules.triggers["loss_not_decreasing"][0]["values"]
    assert values["mean_loss_before"] == pytest.approx(2.3) and values["mean_loss_after"] == pytest.approx(2.3)


def test_a_rule_set_to_log_records_every_trigger_but_logs_only_the_first_few():
    printed = []
    job_rules = rules(printed, rule_exploding_gradient="log", exploding_gradient_threshold="10")
    ended, _ = run_steps(job_rules, [1.0] * 6, gradient_norms=[50.0] * 6)
    assert ended is None
    assert job_rules.counts["exploding_gradient"] == 6 and len(job_rules.triggers["exploding_gradient"]) == 6
    assert len([line for line in printed if line.startswith("rule=exploding_gradient action=log")]) == 3


def test_a_rule_set_to_off_is_not_evaluated():
    job_rules = rules(rule_exploding_gradient="off", exploding_gradient_threshold="10")
    assert run_steps(job_rules, [1.0] * 3, gradient_norms=[50.0] * 3) == (None, None)
    assert job_rules.counts["exploding_gradient"] == 0


@pytest.mark.parametrize("norm,rule", [(1500.0, "exploding_gradient"), (1e-9, "vanishing_gradient"), (5.0, None)])
def test_gradient_norm_rules_use_their_thresholds(norm, rule):
    job_rules = rules(rule_exploding_gradient="stop", rule_vanishing_gradient="stop")  # defaults 1000 and 1e-7
    ended, _ = run_steps(job_rules, [1.0], gradient_norms=[norm])
    assert (ended.rule if ended else None) == rule


@pytest.mark.parametrize("loss,norm,loss_scaling,stops", [
    (math.nan, 1.0, False, True),
    (math.inf, 1.0, True, True),  # a non-finite loss stops whatever the precision
    (1.0, math.nan, False, True),
    (1.0, math.inf, True, False),  # float16: the optimizer skips an overflowing step and lowers its scale
])
def test_a_non_finite_loss_always_stops_even_with_every_rule_off(loss, norm, loss_scaling, stops):
    off = {f"rule_{name}": "off" for name in ("loss_not_decreasing", "overtraining", "early_stopping",
                                               "exploding_gradient", "vanishing_gradient", "class_imbalance")}
    job_rules = rules(loss_scaling=loss_scaling, **off)
    ended, _ = run_steps(job_rules, [loss], gradient_norms=[norm])
    assert (ended.rule if ended else None) == (NON_FINITE if stops else None)


def epochs(job_rules, evaluations):
    """Feeds (train_loss, val_loss, val_accuracy) per epoch; returns the first decision and its epoch."""
    for epoch, (train_loss, val_loss, val_accuracy) in enumerate(evaluations, 1):
        ended = job_rules.on_epoch_end(epoch, epoch * 10, {"train_loss": train_loss, "val_loss": val_loss,
                                                           "val_accuracy": val_accuracy})
        if ended:
            return ended, epoch
    return None, None


@pytest.mark.parametrize("evaluations,patience,stopped_at", [
    ([(1.0, 0.8, 0.5), (0.8, 0.9, 0.5)], 1, 2),  # val up, train down
    ([(1.0, 0.8, 0.5), (1.1, 0.9, 0.5)], 1, None),  # both up: not overtraining
    ([(1.0, 0.8, 0.5), (0.8, 0.9, 0.5), (0.7, 0.85, 0.5)], 2, None),  # val fell again
    ([(1.0, 0.8, 0.5), (0.8, 0.9, 0.5), (0.7, 0.95, 0.5)], 2, 3),
])
def test_overtraining_is_validation_loss_rising_while_training_loss_falls(evaluations, patience, stopped_at):
    job_rules = rules(rule_overtraining="stop", overtraining_patience=str(patience))
    ended, at = epochs(job_rules, evaluations)
    assert at == stopped_at and (ended is None) == (stopped_at is None)


@pytest.mark.parametrize("metric,values,min_delta,stopped_at", [
    ("val_loss", [0.5, 0.6, 0.55], 0.0, 3),  # two evaluations without beating 0.5
    ("val_loss", [0.5, 0.6, 0.45], 0.0, None),
    ("val_loss", [0.5, 0.499, 0.498], 0.01, 3),  # better, but not by more than min_delta
    ("val_accuracy", [0.5, 0.7, 0.6, 0.65], 0.0, 4),  # higher is better
])
def test_early_stopping_waits_patience_evaluations_without_improvement(metric, values, min_delta, stopped_at):
    job_rules = rules(rule_early_stopping="stop", early_stopping_metric=metric, early_stopping_patience="2",
                      early_stopping_min_delta=str(min_delta))
    evaluations = [(1.0, v, 0.5) if metric == "val_loss" else (1.0, 1.0, v) for v in values]
    _, at = epochs(job_rules, evaluations)
    assert at == stopped_at


def test_class_imbalance_is_the_ratio_of_the_most_to_the_least_frequent_class():
    printed = []
    job_rules = rules(printed)
    job_rules.check_class_balance({0: 95, 1: 5}, ("1", "5"))  # 19 > 10
    record = job_rules.triggers["class_imbalance"][0]
    assert record["values"]["ratio"] == 19.0 and record["values"]["counts"] == {"1": 95, "5": 5}
    assert printed == ["rule=class_imbalance action=log step=0 epoch=0: the training channel has 95 rows of class 1 "
                       "and 5 of class 5, a ratio of 19.0 (class_imbalance_threshold=10)"]
    balanced = rules()
    balanced.check_class_balance({0: 50, 1: 50, 2: 6}, ("1", "2", "3"))  # 8.3
    assert balanced.counts["class_imbalance"] == 0
    missing = rules()
    missing.check_class_balance({0: 50, 1: 50}, ("1", "2", "3"))  # a class without a row
    assert missing.triggers["class_imbalance"][0]["values"]["ratio"] == math.inf
    with pytest.raises(DataError, match="rule class_imbalance"):
        rules(rule_class_imbalance="stop").check_class_balance({0: 95, 1: 5}, ("1", "5"))


def test_the_best_weights_are_kept_at_each_better_validation_loss_and_restored(tmp_path):
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    synced = []
    job_rules = Rules(Hyperparameters.from_dict({}), print_fn=lambda line: None)
    job_rules.watch(model, lambda: synced.append(True), loss_scaling=False, keep_best=True)
    for epoch, val_loss in enumerate([0.9, 0.5, 0.7], 1):
        model.set_weights([np.full((2, 1), epoch, np.float32), np.zeros(1, np.float32)])
        job_rules.on_epoch_end(epoch, epoch * 10, {"train_loss": 1.0, "val_loss": val_loss, "val_accuracy": 0.5})
    assert len(synced) == 2  # read at the two better evaluations only
    job_rules.stopped_by = run_steps(job_rules, [math.nan])[0]
    assert job_rules.restore_best() == {"weights": "best", "step": 20, "epoch": 2, "val_loss": 0.5}
    assert (model.get_weights()[0] == 2).all()
    job_rules.write_report(str(tmp_path / "rules.json"), {"weights": "best", "step": 20})
    with open(tmp_path / "rules.json") as f:
        report = json.load(f)  # strict JSON: the NaN is a string
    assert report["stopped_by"] == {"rule": NON_FINITE, "step": 1,
                                    "message": "the loss or the gradient norm is NaN or infinite"}
    [nan_rule] = [r for r in report["rules"] if r["rule"] == NON_FINITE]
    assert nan_rule["triggers"][0]["values"]["loss"] == "nan"


# Whole jobs
def job(tmp_path, hyperparameters, validation=True, train_rows=None):
    channels = {"train": {"train.tsv": amazon_tsv(train_rows or make_reviews(96, 1))},
                "test": {"test.tsv": amazon_tsv(make_reviews(16, 4))}}
    if validation:
        channels["validation"] = {"validation.tsv": amazon_tsv(make_reviews(24, 3))}
    return make_opt_ml(str(tmp_path / "opt_ml"), channels, {**FAST_HYPERPARAMETERS, **hyperparameters})


@pytest.fixture
def nan_from_step(monkeypatch):
    """nan_from_step(n): the training step's loss is NaN from step n on, for a job run in this process."""
    def inject(from_step):
        steps_done, train = [0], TensorFlowSteps.train

        def train_then_nan(self, batch, votes):
            sums = train(self, batch, votes)
            steps_done[0] += 1
            if steps_done[0] >= from_step:
                sums[0] = float("nan")
            return sums

        monkeypatch.setattr(TensorFlowSteps, "train", train_then_nan)

    return inject


def report(base):
    with open(os.path.join(base, "output", "data", "rules.json")) as f:
        return json.load(f)


def test_a_diverging_learning_rate_stops_by_rule_and_exports_the_model(tmp_path, distilbert_dir):
    base = job(tmp_path, {"learning_rate": "0.9", "epochs": "2", "rule_loss_not_decreasing": "stop",
                          "loss_not_decreasing_num_steps": "2"})
    result = train_in_process(base, distilbert_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.exists(os.path.join(base, "output", "success"))
    stopped = report(base)["stopped_by"]
    assert stopped["rule"] == "loss_not_decreasing" and stopped["step"] % 2 == 0 and stopped["step"] < 24
    assert f"training stopped by rule loss_not_decreasing after step {stopped['step']}" in result.stdout
    [record] = [r for r in report(base)["rules"] if r["rule"] == "loss_not_decreasing"][0]["triggers"]
    assert record["values"]["mean_loss_after"] > record["values"]["mean_loss_before"]  # it diverged
    assert os.path.exists(os.path.join(base, "model", "tensorflow", "saved_model", "0", "saved_model.pb"))
    with open(os.path.join(base, "model", "manifest.json")) as f:
        assert json.load(f)["stopped_by_rule"]["rule"] == "loss_not_decreasing"


@pytest.fixture(scope="module")
def flat_skewed_job(tmp_path_factory, distilbert_dir):
    """A learning rate too small to move the loss, on a training channel of 95 five-star reviews and
    5 one-star ones: class_imbalance logs it at the scan, loss_not_decreasing stops the run."""
    skewed = [("a great buy", 5)] * 95 + [("a waste of money", 1)] * 5
    base = job(tmp_path_factory.mktemp("flat"), {
        "classes": "1,5", "learning_rate": "1e-9", "rule_loss_not_decreasing": "stop",
        "loss_not_decreasing_num_steps": "3", "run_test": "false"}, validation=False, train_rows=skewed)
    return base, train_in_process(base, distilbert_dir)


def test_a_flat_loss_stops_by_loss_not_decreasing(flat_skewed_job):
    base, result = flat_skewed_job
    assert result.returncode == 0, result.stderr[-3000:]
    stopped = report(base)["stopped_by"]
    assert stopped["rule"] == "loss_not_decreasing" and stopped["step"] % 3 == 0
    assert not any(line.startswith("epoch=1 step=12 train_loss=") for line in result.stdout.splitlines())
    assert "exporting the last model" in result.stdout and os.path.exists(os.path.join(base, "output", "success"))


def test_a_nan_loss_with_a_kept_model_exports_the_best_one_and_succeeds(tmp_path, distilbert_dir, nan_from_step):
    base = job(tmp_path, {"epochs": "2", "enable_checkpointing": "true", "checkpoint_every_n_steps": "1"})
    nan_from_step(15)  # epoch 1 is steps 1-12
    result = train_in_process(base, distilbert_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert report(base)["stopped_by"]["rule"] == NON_FINITE and report(base)["stopped_by"]["step"] == 15
    assert report(base)["exported"]["weights"] == "best" and report(base)["exported"]["step"] == 12
    assert "exporting the best model: step 12" in result.stdout
    # No checkpoint of the NaN step: the newest is the step before it
    assert sorted(os.listdir(os.path.join(base, "checkpoints")))[-1] == "step-000000014"
    # The exported model is epoch 1's: its loss on the validation reviews is the val_loss logged then
    # (the weights had trained 3 more steps by the NaN)
    import tensorflow as tf
    from review_trainer.model.pretrained import ReviewTokenizer, open_checkpoint

    logged = float(re.search(r"^epoch=1 step=12 .* val_loss=(\S+) ", result.stdout, re.M)[1])
    reviews = make_reviews(24, 3)
    ids, mask = ReviewTokenizer(open_checkpoint(distilbert_dir), 16)([text for text, _ in reviews])
    serve = tf.saved_model.load(os.path.join(base, "model", "tensorflow", "saved_model", "0")).signatures[
        "serving_default"]
    probabilities = serve(input_ids=tf.constant(ids), input_mask=tf.constant(mask))["probabilities"].numpy()
    loss = -np.mean(np.log([p[stars - 1] for p, (_, stars) in zip(probabilities, reviews)]))
    assert loss == pytest.approx(logged, abs=2e-4)


def test_a_nan_loss_without_a_kept_model_fails_with_training_error(tmp_path, distilbert_dir, nan_from_step):
    base = job(tmp_path, {}, validation=False)
    nan_from_step(3)
    result = train_in_process(base, distilbert_dir)
    assert result.returncode == 8, result.stderr[-3000:]
    failure = read_failure(base)
    assert failure.startswith("TrainingError: the loss became NaN or infinite at step 3")
    assert "lower learning_rate" in failure
    assert report(base)["stopped_by"]["rule"] == NON_FINITE
    assert not os.path.exists(os.path.join(base, "model", "tensorflow"))


def test_a_skewed_training_channel_is_reported_at_the_scan(flat_skewed_job):
    base, result = flat_skewed_job
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    reported = lines.index("rule=class_imbalance action=log step=0 epoch=0: the training channel has 95 rows of "
                           "class 5 and 5 of class 1, a ratio of 19.0 (class_imbalance_threshold=10)")
    assert reported < next(i for i, line in enumerate(lines) if line.startswith("training: "))  # before training
    [rule] = [r for r in report(base)["rules"] if r["rule"] == "class_imbalance"]
    assert rule["triggered"] == 1 and rule["triggers"][0]["values"]["counts"] == {"1": 5, "5": 95}
