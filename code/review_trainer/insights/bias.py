"""Bias metrics the way SageMaker Clarify reports them, computed by Clarify's own library, smclarify.

SageMaker Clarify ran bias analysis as a processing job of its own: a container that runs smclarify
(github.com/aws/amazon-sagemaker-clarify) over the dataset, and over the model's predictions, and
writes analysis.json. This module makes the same numbers from the arrays the job already has, so a
training job reports the bias of its data (pre-training) and of its model (post-training) without a
second job, in the same file format.

Clarify's conventions, kept here:

* A facet column (e.g. product_category) splits the rows into d, the sensitive group (the rows whose
  facet is one of `facet_values`), and a, all the other rows. Without `facet_values` each value
  present is d in turn, against the rest. Several `facet_values` form one group, as in Clarify.
* The labels collapse to a positive outcome (`positive_labels`, by default the top two classes:
  star ratings 4 and 5) and a negative one.
* Signs, smclarify's: CI = (n_a - n_d) / n, DPL = q_a - q_d (q: the positive share of the labels),
  DPPL = q'_a - q'_d (of the predictions), DCA = c_a - c_d (c: positive labels per positive
  prediction), RD = recall_a - recall_d, DAR = precision_a - precision_d, AD = accuracy_a -
  accuracy_d; DCR, DRR, SD (specificity) and TE (FN/FP) are d minus a; DI = q'_d / q'_a. So a
  positive CI, DPL, DPPL, RD or AD and a DI under 1 say d is smaller, gets fewer positive outcomes or
  is served worse than the rest.
  CDDL and CDDPL average, over the groups of `group_column` weighted by size, d's share of the
  negative outcomes minus its share of the positive ones.

A metric smclarify cannot compute (a facet value with no rows, a single class, no positive
prediction) carries smclarify's error text in place of its value, as in Clarify's output: bias
problems never fail the job. Wrong settings do, at its start: check_config.

Under pandas 3 smclarify fails on the default string dtype ("Cannot interpret StringDtype as a data
type"), so the columns are given to it as pandas categoricals. Categoricals rather than object
columns: smclarify reads an object column of digit strings with few enough rows per distinct value
(more than 5% distinct) as a continuous column, and a single positive label as a threshold; with
labels "1".."5" in 40 rows and positive_labels ("5",) its DPL came out 0.0 where the answer is -0.25.

FT (the flip test) is left out: it fits k nearest neighbours on tabular feature columns, and the
job's only feature is the review text.
"""

import contextlib
import dataclasses
import logging

import pandas as pd
from review_trainer.contract.errors import JobStopped
from smclarify.bias import metrics as clarify_metrics
from smclarify.bias.metrics import common as clarify_common
from smclarify.bias.report import FacetColumn, LabelColumn, StageType, bias_report

PRE_TRAINING = "pre_training"
POST_TRAINING = "post_training"
PRE_TRAINING_METRICS = ("CI", "DPL", "KL", "JS", "LP", "TVD", "KS")
POST_TRAINING_METRICS = ("DPPL", "DI", "DCA", "DCR", "RD", "SD", "DAR", "DRR", "AD", "TE", "GE")
GROUP_METRICS = {PRE_TRAINING: "CDDL", POST_TRAINING: "CDDPL"}  # only with a group column
# What summary_lines shows of each stage.
KEY_METRICS = {PRE_TRAINING: ("CI", "DPL", "KL", "JS", "CDDL"),
               POST_TRAINING: ("DPPL", "DI", "DCA", "DCR", "RD", "AD", "CDDPL")}
_LABEL, _PREDICTED, _FACET = "label", "predicted_label", "facet"


@dataclasses.dataclass(frozen=True)
class BiasConfig:
    """What to measure: Clarify's BiasConfig (facet_name, facet_values_or_threshold,
    label_values_or_threshold, group_name) for categorical facets."""

    facet_column: str = "product_category"
    facet_values: tuple | None = None  # the sensitive group; None: each value present in turn
    positive_labels: tuple | None = None  # the positive outcome; None: the top two classes
    group_column: str | None = None  # for CDDL and CDDPL


def check_config(config, facet_values_seen, classes):
    """Raises ValueError for settings that cannot match the data; returns the config with
    positive_labels filled in (the top two classes when not given)."""
    seen = {str(value) for value in facet_values_seen}
    missing = [value for value in config.facet_values or () if str(value) not in seen]
    if missing:
        raise ValueError(
            f"bias facet value(s) {', '.join(map(str, missing))} not found in column "
            f"{config.facet_column}; values seen: {_some(sorted(seen))}"
        )
    class_names = [str(name) for name in classes]
    positive = tuple(config.positive_labels or class_names[-2:])
    unknown = [label for label in positive if str(label) not in class_names]
    if unknown:
        raise ValueError(
            f"bias positive label(s) {', '.join(map(str, unknown))} are not among the classes "
            f"{', '.join(class_names)}"
        )
    if not set(class_names) - {str(label) for label in positive}:
        raise ValueError(f"bias positive labels {', '.join(map(str, positive))} are every class: "
                         f"nothing would be a negative outcome")
    return dataclasses.replace(config, positive_labels=positive)


def _some(values, shown=20):
    more = f" and {len(values) - shown} more" if len(values) > shown else ""
    return ", ".join(map(str, values[:shown])) + more


def pre_training_report(labels, facets, config, groups=None):
    """Bias in the labels: CI, DPL, KL, JS, LP, TVD, KS, and CDDL with groups, per facet value."""
    return _report(PRE_TRAINING, labels, None, facets, config, groups)


def post_training_report(labels, predicted_labels, facets, config, groups=None):
    """Bias in the predictions: DPPL, DI, DCA, DCR, RD, SD, DAR, DRR, AD, TE, GE, and CDDPL with
    groups, per facet value."""
    return _report(POST_TRAINING, labels, predicted_labels, facets, config, groups)


def _report(stage, labels, predicted_labels, facets, config, groups):
    """{"facet", "positive_labels", "values": [{"value_or_threshold", "metrics"}]}, the facet
    entries as smclarify makes them."""
    positive = list(config.positive_labels or _top_two(labels))
    names = PRE_TRAINING_METRICS if stage == PRE_TRAINING else POST_TRAINING_METRICS
    if groups is not None:
        names += (GROUP_METRICS[stage],)
    try:
        label = _column(labels, _LABEL)
        facet = _column(facets, _FACET)
        predicted = None
        if predicted_labels is not None:
            predicted = LabelColumn(_PREDICTED, _column(predicted_labels, _PREDICTED))
        with _quiet_smclarify():
            values = bias_report(
                pd.DataFrame({_FACET: facet}),
                FacetColumn(_FACET, list(config.facet_values) if config.facet_values else None),
                LabelColumn(_LABEL, label, positive),
                StageType(stage),
                predicted_label_column=predicted,
                metrics=list(names),
                group_variable=None if groups is None else _column(groups, "group"),
            )
    except JobStopped:
        raise
    except Exception as error:  # smclarify gave up on the whole report: every metric carries why
        values = _failed(names, _facet_values(facets, config), error)
    return {"facet": config.facet_column, "positive_labels": positive, "values": values}


def _column(values, name):
    """A categorical Series of the values present: smclarify's reading of pandas 3 strings and of
    digit strings is wrong (module docstring). A pandas Categorical (codes, the test channel's
    columns) is taken as it is."""
    if not isinstance(values, pd.Categorical):
        values = pd.Categorical(pd.Series(list(values), dtype=object))
    return pd.Series(values.remove_unused_categories(), name=name)


def _top_two(labels):
    def order(value):
        try:
            return 0, float(value), ""
        except (TypeError, ValueError):
            return 1, 0.0, str(value)

    return sorted(set(labels), key=order)[-2:]


def _facet_values(facets, config):
    if config.facet_values:
        return [",".join(map(str, config.facet_values))]
    return [str(value) for value in dict.fromkeys(facets)]


def _failed(names, facet_values, error):
    functions = {function.__name__: function for function in
                 clarify_metrics.PRETRAINING_METRICS + clarify_metrics.POSTTRAINING_METRICS}
    metrics = [{"name": name, "description": clarify_common.metric_description(functions[name]), "value": None,
                "error": str(error) or type(error).__name__} for name in sorted(names)]
    return [{"value_or_threshold": value, "metrics": [dict(metric) for metric in metrics]} for value in facet_values]


@contextlib.contextmanager
def _quiet_smclarify():
    """smclarify logs each metric it cannot compute with a traceback; the report carries the error."""
    logger = logging.getLogger("smclarify")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def analysis_json(pre, post, config, label_column):
    """The bias sections of Clarify's analysis.json from the two reports (either may be None)."""
    analysis = {}
    for stage, report in ((PRE_TRAINING, pre), (POST_TRAINING, post)):
        if report is not None:
            analysis[f"{stage}_bias_metrics"] = {
                "label": label_column,
                "facets": {config.facet_column: report["values"]},
                "label_value_or_threshold": ",".join(map(str, report["positive_labels"])),
            }
    return analysis


def summary_lines(analysis):
    """One log line per stage and facet value, with the key metrics; errors named at the end."""
    lines = []
    for stage in (PRE_TRAINING, POST_TRAINING):
        section = analysis.get(f"{stage}_bias_metrics")
        for facet, entries in (section or {}).get("facets", {}).items():
            for entry in entries:
                by_name = {metric["name"]: metric for metric in entry["metrics"]}
                shown = [by_name[name] for name in KEY_METRICS[stage] if name in by_name]
                fields = [f"{metric['name']}={_format(metric)}" for metric in shown]
                errors = [f"{metric['name']}: {metric['error']}" for metric in shown if metric.get("error")]
                line = f"bias stage={stage} facet={facet} value={entry['value_or_threshold']} " + " ".join(fields)
                lines.append(line + (f" errors: {'; '.join(errors)}" if errors else ""))
    return lines


def _format(metric):
    if metric.get("error"):
        return "n/a"
    value = metric["value"]
    return f"{value:.4g}" if isinstance(value, float) else str(value)
