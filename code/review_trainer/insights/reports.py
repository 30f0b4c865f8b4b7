"""Explanations and bias, answered inside the job the way SageMaker Clarify reports them.

Clarify needs a processing job and a shadow endpoint; under network isolation, and for `docker
run`, neither exists. So after the test evaluation the chief host writes, beside the model:

    output/data/bias/analysis.json        Clarify's shape: pre-training metrics of the train
                                           channel (a bounded sample kept by the scan) and
                                           post-training metrics of the test predictions (bias.py,
                                           with AWS's smclarify)
    output/data/explanations/             SHAP word attributions of `explain_samples` test reviews
                                           (explanations.py, with the shap library)

Neither may fail the job: the model is published first, and an error here is logged and written
into the report in place of the figures. Their settings are checked at the start, after the scan
(check_settings), so that a wrong one fails before any training. A channel read once (Pipe mode)
cannot be read again for them: the reports say so and do what they can without it.
"""

import os
import time
import traceback

import numpy as np
from review_trainer.contract.errors import HyperparameterError, JobStopped
from review_trainer.contract.files import write_json
from review_trainer.contract.hyperparameters import AUTO
from review_trainer.data import bucket_lengths
from review_trainer.insights import explanations


def after_publishing(hp, channels, model, tokenizer, evaluated, out_dir, job_seconds, stop_signal, print_fn=print):
    """The insights stage (the model is published): a stop signal during it ends the job in success."""
    try:
        run(hp, channels, model, tokenizer, evaluated.predictions, out_dir, job_seconds, stop_signal, print_fn)
    except JobStopped as stopped:
        print_fn(f"explanations and bias cut short ({stopped}); the model is published")


def run(hp, channels, model, tokenizer, test_predictions, out_dir, job_seconds, stop_signal=None, print_fn=print):
    """Explanations, then the bias report, each where its settings and channels allow. Any error
    but a stop signal is logged and written down, never raised. test_predictions: (labels,
    predicted class indexes) of the test evaluation, or None. job_seconds: how long the job has
    run, for explain_max_seconds=auto. stop_signal: a signal that arrived inside a library that
    catches every exception (smclarify does, per metric) still stops the job after the phase it
    arrived in."""
    train, test = channels.train, channels.test
    try:
        if hp.explain_samples and test is not None and test.read_once is None:
            reviews = test.first_reviews(hp.explain_samples)
            budget = explain_budget(hp.explain_max_seconds, job_seconds)
            write_explanations(reviews, probability_function(model, tokenizer), hp.classes, out_dir, print_fn,
                               budget)
        elif hp.explain_samples:
            print_fn("explanations skipped: " + (f"{test.read_once} (read once, by the evaluation)"
                                                 if test is not None else "no test channel"))
    except JobStopped:
        raise
    except Exception as error:  # noqa: BLE001 - the job goes on, with the error in the report
        print_fn(f"explanations failed (the model is published): {type(error).__name__}: {error}")
        _write_error_summary(os.path.join(out_dir, "explanations"), f"{type(error).__name__}: {error}", print_fn,
                             traceback=traceback.format_exc())
    _check_stop(stop_signal)
    if not hp.bias_facet:
        return
    if train.summary is None:
        print_fn(f"bias report skipped: {train.read_once} (read once, no sample kept)")
        return
    test_rows = None
    if test_predictions is not None and test.read_once is None:
        test_rows = (test.read_extras, *test_predictions)
    else:
        print_fn("bias report: pre-training metrics only, " + (f"{test.read_once} (read once)"
                                                               if test is not None else "no test channel"))
    write_bias_report(hp, train.summary.sample, test_rows, out_dir, print_fn)
    _check_stop(stop_signal)


def _check_stop(stop_signal):
    if stop_signal is not None and stop_signal.received:
        raise stop_signal.stopped("during the explanations and bias report")


# Facet values reported one by one when bias_facet_values does not name the sensitive group.
MAX_FACET_VALUES = 50


def check_settings(hp, channels, topology, print_fn=print):
    """At the start, after the scan, on every host alike: bias_facet_values must occur in the train
    channel, and without them the facet must have at most MAX_FACET_VALUES values (each is reported
    in turn against the rest). Raises HyperparameterError.

    With ShardedByS3Key each host scanned its own files: the named values' rows are summed over the
    hosts, and the number of values is the chief's (whose sample the report is made of), so every
    host decides the same."""
    if not hp.bias_facet:
        return
    train = channels.train
    if train.summary is None:
        print_fn(f"bias report skipped: {train.read_once} (read once and not scanned)")
        return
    from review_trainer.insights import bias  # smclarify and pandas: imported by the jobs that ask for a report

    values = train.summary.extra_values[0]  # the facet's ValueCounts over this host's train files
    named = list(hp.bias_facet_values or ())
    own = [values.counts.get(value, 0) for value in named]
    chief = [len(values.counts), values.others] if topology.is_chief else [0, 0]
    *named_rows, distinct, others = (int(n) for n in topology.sum_over_workers(own + chief))
    config = bias_config(hp)
    try:
        bias.check_config(config, [v for v, n in zip(named, named_rows) if n] + list(values.counts), hp.classes)
    except ValueError as error:
        raise HyperparameterError(f"{error} (bias_facet_values, in the train channel)") from error
    if not named and (distinct > MAX_FACET_VALUES or others):
        common = ", ".join(value for value, _ in values.counts.most_common(5))
        raise HyperparameterError(
            f"bias_facet {hp.bias_facet} has {distinct}{'+' if others else ''} values in the train channel, more "
            f"than the {MAX_FACET_VALUES} reported one by one against the rest: name the sensitive group with "
            f"bias_facet_values (its most frequent values: {common})")
    sensitive = ",".join(named) if named else f"each of {distinct}"
    print_fn(f"bias facet={hp.bias_facet} sensitive={sensitive} positive_labels={','.join(hp.positive_labels)} "
             f"group={hp.bias_group or 'none'} train_sample_rows={len(train.summary.sample)} of "
             f"{train.summary.good_rows}" + (" (the chief's files only: ShardedByS3Key)" if train.own_files else ""))


def bias_config(hp):
    from review_trainer.insights import bias

    return bias.BiasConfig(facet_column=hp.bias_facet, facet_values=hp.bias_facet_values,
                           positive_labels=hp.positive_labels, group_column=hp.bias_group)


def write_bias_report(hp, train_sample, test, out_dir, print_fn=print):
    """train_sample: (class index, facet[, group]) rows of the scan's sample; test: None, or
    (a function that reads the test channel's rows like data.read_extras, in the evaluation's
    order; the evaluation's labels; its predicted class indexes)."""
    path = os.path.join(out_dir, "bias", "analysis.json")
    started = time.perf_counter()
    try:
        import pandas as pd
        from review_trainer.insights import bias

        config, classes = bias_config(hp), list(hp.classes)
        train_labels, train_facets, train_groups = _columns(train_sample, classes)
        pre = bias.pre_training_report(train_labels, train_facets, config, train_groups)
        post = None
        if test is not None:
            read_rows, labels, predicted = test
            row_labels, extras = read_rows()
            rows = np.arange(len(labels)) % max(len(row_labels), 1)  # test_steps may repeat the channel
            if not len(row_labels) or not np.array_equal(row_labels[rows], np.asarray(labels)):
                raise ValueError("the test channel's rows, read again, are not in the evaluation's order")
            facets, *groups = (pd.Categorical.from_codes(codes[rows], values) for codes, values in extras)
            post = bias.post_training_report(pd.Categorical.from_codes(row_labels[rows], classes),
                                             pd.Categorical.from_codes(np.asarray(predicted), classes),
                                             facets, config, groups[0] if groups else None)
        analysis = bias.analysis_json(pre, post, config, hp.label_column)
        for line in bias.summary_lines(analysis):
            print_fn(line)
    except JobStopped:
        raise
    except Exception as error:  # noqa: BLE001 - the report carries what went wrong; the job goes on
        analysis = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        print_fn(f"bias report failed (the model is published): {type(error).__name__}: {error}")
    try:
        write_json(analysis, path, default=str)
        print_fn(f"bias report written to {path} seconds={time.perf_counter() - started:.1f}")
    except OSError as error:
        print_fn(f"bias report not written ({error})")


def _columns(rows, classes):
    labels = [classes[row[0]] for row in rows]
    facets = [row[1] for row in rows]
    groups = [row[2] for row in rows] if rows and len(rows[0]) > 2 else None
    return labels, facets, groups


# Model evaluations per review. On the bundled sample's first 30 test sentences (MiniLM, fine-tuned),
# 200 gave the same top word as shap's default 500 for 28 of them, and 89% of the top three
# (`make benchmark-explanations`; README, Explanations and bias).
MAX_EVALS = 200


# explain_max_seconds=auto: the explanations' time, a share of the job's time before them (under the
# 5% aimed at: a review's time is predicted from the last one's), and at least AUTO_BUDGET_MIN_SECONDS
# so that a short job still explains a handful (shap's warm-up alone takes about 6 s on a CPU).
AUTO_BUDGET_SHARE = 0.04
AUTO_BUDGET_MIN_SECONDS = 15.0


def explain_budget(explain_max_seconds, job_seconds):
    """(seconds, how they were chosen) for the explanations."""
    if explain_max_seconds == AUTO:
        seconds = max(AUTO_BUDGET_SHARE * job_seconds, AUTO_BUDGET_MIN_SECONDS)
        return seconds, (f"auto: {AUTO_BUDGET_SHARE:.0%} of the job's {job_seconds:.0f} s, at least "
                         f"{AUTO_BUDGET_MIN_SECONDS:.0f} s")
    return float(explain_max_seconds), "explain_max_seconds"


def write_explanations(texts, predict_proba, classes, out_dir, print_fn=print, budget=None, clock=time.monotonic):
    """budget: None, or (seconds, how they were chosen): no review is begun after that long, by
    `clock` (a test drives its own)."""
    folder = os.path.join(out_dir, "explanations")
    started = clock()
    deadline = None if budget is None else started + budget[0]
    records, error = explanations.explain_safely(texts, predict_proba, list(classes), max_evals=MAX_EVALS,
                                                 deadline=deadline, clock=clock)
    seconds = clock() - started
    cut_short = error is None and len(records) < len(texts)
    try:
        summary = explanations.summarize(records)
        summary.update(reviews_asked=len(texts), seconds=round(seconds, 2),
                       seconds_per_review=round(seconds / max(len(records), 1), 3),
                       budget_seconds=None if budget is None else round(budget[0], 1),
                       budget=None if budget is None else budget[1], cut_short_by_budget=cut_short)
        explanations.write(records, summary, folder, error=error)
    except JobStopped:
        raise
    except Exception as write_error:  # noqa: BLE001 - never fails the job
        error = f"{error}; " if error else ""
        error += f"writing them: {type(write_error).__name__}: {write_error}"
        _write_error_summary(folder, error, print_fn)
    if error:
        print_fn(f"explanations incomplete (the model is published): {error}")
    if cut_short:
        print_fn(f"explanations stopped after {len(records)} of {len(texts)} reviews: their time budget, "
                 f"{budget[0]:.0f} s ({budget[1]}), was spent; explain_max_seconds sets it")
    print_fn(f"explanations reviews={len(records)} seconds={seconds:.1f} seconds_per_review="
             f"{seconds / max(len(records), 1):.2f} written to {folder}")


BATCH_ROWS = 64  # texts per forward pass at most
ROW_BUCKETS = (8, 16, 32, 64)  # a batch is padded to one of these sizes: few shapes to compile


def probability_function(model, tokenizer):
    """texts -> class probabilities, the served model's, in batches of at most BATCH_ROWS, each cut
    to the shortest training length bucket that holds its texts and padded to a row bucket: shap
    asks for a few dozen masked reviews at a time, short ones, and each shape compiles once (the
    padding is masked: the probabilities are those of the max_seq_length input)."""
    import keras
    from review_trainer.model import inference

    forward = inference.compiled_inference(model, keras.ops.softmax)
    lengths = bucket_lengths(tokenizer.max_seq_length)

    def predict_proba(texts):
        outputs = []
        for start in range(0, len(texts), BATCH_ROWS):
            token_ids, padding_mask = tokenizer(list(texts[start:start + BATCH_ROWS]))
            rows = len(token_ids)
            length = next(n for n in lengths if n >= padding_mask.sum(axis=1).max())
            filler = np.arange(next(n for n in ROW_BUCKETS if n >= rows)) % rows  # rows again, dropped below
            features = {"token_ids": token_ids[filler, :length], "padding_mask": padding_mask[filler, :length]}
            outputs.append(np.asarray(forward(features), np.float64)[:rows])
        return np.concatenate(outputs) if outputs else np.zeros((0, model.output_shape[-1]))

    return predict_proba


def _write_error_summary(folder, error, print_fn, **details):
    """The explanations' summary.json when they failed: the error in place of the figures."""
    try:
        write_json({"error": error, **details}, os.path.join(folder, "summary.json"), default=str)
    except OSError as write_error:
        print_fn(f"explanations' report not written ({write_error})")
