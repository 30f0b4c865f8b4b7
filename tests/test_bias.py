"""Bias metrics (bias.py) on reviews built with a known skew, each expected value worked out here from
Clarify's definitions (d = the facet value, a = the other rows) rather than taken from smclarify."""

import json
import math

import numpy as np
import pytest
from review_trainer.insights.bias import (BiasConfig, analysis_json, check_config, post_training_report,
                                 pre_training_report, summary_lines)

CLASSES = ("1", "2", "3", "4", "5")
CONFIG = BiasConfig(facet_column="product_category", positive_labels=("4", "5"), group_column="marketplace")
# Per category: (true positive, false negative, false positive, true negative) predictions, positive = 4 or 5.
# Books: 40 rows, 80% rated 4-5; Toys: 40 rows, 30%; Music: 20 rows, 50%.
COUNTS = {"Books": (28, 4, 2, 6), "Toys": (6, 6, 4, 24), "Music": (8, 2, 3, 7)}


def reviews():
    """product_category, star_rating, predicted rating and marketplace for 100 reviews."""
    facets, labels, predicted = [], [], []
    for category, (tp, fn, fp, tn) in COUNTS.items():
        for count, label_pool, predicted_pool in ((tp, "45", "54"), (fn, "45", "123"), (fp, "123", "45"),
                                                  (tn, "123", "312")):
            for i in range(count):
                facets.append(category)
                labels.append(label_pool[i % len(label_pool)])
                predicted.append(predicted_pool[i % len(predicted_pool)])
    groups = ["UK" if i % 3 == 0 else "US" for i in range(len(facets))]
    return np.array(facets), np.array(labels), np.array(predicted), np.array(groups)


def by_value(report):
    return {entry["value_or_threshold"]: {metric["name"]: metric for metric in entry["metrics"]}
            for entry in report["values"]}


def values(report):
    return {value: {name: metric["value"] for name, metric in metrics.items()}
            for value, metrics in by_value(report).items()}


def masks(value, facets, labels, predicted=None):
    d = facets == value
    positive = np.isin(labels, ["4", "5"])
    return (d, positive) if predicted is None else (d, positive, np.isin(predicted, ["4", "5"]))


def test_class_imbalance_and_label_proportions_as_constructed():
    facets, labels, _, _ = reviews()
    report = values(pre_training_report(labels, facets, CONFIG))
    assert set(report) == {"Books", "Toys", "Music"}
    # CI = (n_a - n_d) / (n_a + n_d): 60 other rows against Books' 40, 80 against Music's 20.
    assert report["Books"]["CI"] == pytest.approx((60 - 40) / 100)
    assert report["Music"]["CI"] == pytest.approx((80 - 20) / 100)
    # DPL = q_a - q_d: Books (d, 32/40 positive) is favoured, negative; Toys (12/40) is not, positive.
    assert report["Books"]["DPL"] == pytest.approx((12 + 10) / 60 - 32 / 40)
    assert report["Toys"]["DPL"] == pytest.approx((32 + 10) / 60 - 12 / 40)
    assert report["Books"]["DPL"] < -0.4 and report["Toys"]["DPL"] == pytest.approx(0.4)
    assert "CDDL" not in report["Books"]  # no groups given


def test_label_distribution_distances():
    facets, labels, _, _ = reviews()
    report = values(pre_training_report(labels, facets, CONFIG))
    for value in ("Books", "Toys", "Music"):
        d, positive = masks(value, facets, labels)
        p_a = np.array([1 - positive[~d].mean(), positive[~d].mean()])  # outcome distributions: negative, positive
        p_d = np.array([1 - positive[d].mean(), positive[d].mean()])
        mean = (p_a + p_d) / 2
        got = report[value]
        assert got["KL"] == pytest.approx(np.sum(p_a * np.log(p_a / p_d)))
        assert got["JS"] == pytest.approx(0.5 * (np.sum(p_a * np.log(p_a / mean)) + np.sum(p_d * np.log(p_d / mean))))
        assert got["LP"] == pytest.approx(np.sqrt(np.sum((p_a - p_d) ** 2)))
        assert got["TVD"] == pytest.approx(0.5 * np.sum(np.abs(p_a - p_d)))
        assert got["KS"] == pytest.approx(np.max(np.abs(p_a - p_d)))


def test_post_training_metrics_from_the_confusion_counts():
    facets, labels, predicted, _ = reviews()
    report = values(post_training_report(labels, predicted, facets, CONFIG))
    for value in ("Books", "Toys", "Music"):
        d, y, y_hat = masks(value, facets, labels, predicted)

        def rates(rows):
            tp, fn = np.sum(y & y_hat & rows), np.sum(y & ~y_hat & rows)
            fp, tn = np.sum(~y & y_hat & rows), np.sum(~y & ~y_hat & rows)
            return dict(q=(tp + fp) / rows.sum(), accept=(tp + fn) / (tp + fp), reject=(tn + fp) / (tn + fn),
                        recall=tp / (tp + fn), precision=tp / (tp + fp), npv=tn / (tn + fn),
                        accuracy=(tp + tn) / rows.sum(), specificity=tn / (tn + fp), fn_per_fp=fn / fp)

        a, dd = rates(~d), rates(d)
        got = report[value]
        assert got["DPPL"] == pytest.approx(a["q"] - dd["q"])
        assert got["DI"] == pytest.approx(dd["q"] / a["q"])
        assert got["DCA"] == pytest.approx(a["accept"] - dd["accept"])
        assert got["DCR"] == pytest.approx(dd["reject"] - a["reject"])
        assert got["RD"] == pytest.approx(a["recall"] - dd["recall"])
        assert got["SD"] == pytest.approx(dd["specificity"] - a["specificity"])
        assert got["DAR"] == pytest.approx(a["precision"] - dd["precision"])
        assert got["DRR"] == pytest.approx(dd["npv"] - a["npv"])
        assert got["AD"] == pytest.approx(a["accuracy"] - dd["accuracy"])
        assert got["TE"] == pytest.approx(dd["fn_per_fp"] - a["fn_per_fp"])
        benefit = y_hat.astype(float) - y + 1  # generalized entropy, alpha 2: over all rows
        assert got["GE"] == pytest.approx(np.mean((benefit / benefit.mean()) ** 2 - 1) / 2)
    # Toys: 10 of 40 predicted positive against 41 of 60, so DI well under 1 and DPPL positive.
    assert report["Toys"]["DI"] == pytest.approx((10 / 40) / (41 / 60))
    assert report["Toys"]["DPPL"] > 0.4


def conditional_demographic_disparity(outcome, d, groups):
    total = 0.0
    for group in np.unique(groups):
        rows = groups == group
        negative_share = np.sum(~outcome & d & rows) / np.sum(~outcome & rows)
        positive_share = np.sum(outcome & d & rows) / np.sum(outcome & rows)
        total += rows.sum() * (negative_share - positive_share)
    return total / len(groups)


def test_conditional_demographic_disparity_with_a_group_column():
    facets, labels, predicted, groups = reviews()
    pre = values(pre_training_report(labels, facets, CONFIG, groups))
    post = values(post_training_report(labels, predicted, facets, CONFIG, groups))
    for value in ("Books", "Toys", "Music"):
        d, y, y_hat = masks(value, facets, labels, predicted)
        assert pre[value]["CDDL"] == pytest.approx(conditional_demographic_disparity(y, d, groups))
        assert post[value]["CDDPL"] == pytest.approx(conditional_demographic_disparity(y_hat, d, groups))
    assert pre["Toys"]["CDDL"] > 0.2 and pre["Books"]["CDDL"] < -0.2  # Toys: more of the rejections


def test_several_facet_values_form_one_sensitive_group():
    facets, labels, _, _ = reviews()
    config = BiasConfig(facet_values=("Toys", "Music"), positive_labels=("4", "5"))
    report = values(pre_training_report(labels, facets, config))
    assert list(report) == ["Toys,Music"]
    assert report["Toys,Music"]["CI"] == pytest.approx((40 - 60) / 100)
    assert report["Toys,Music"]["DPL"] == pytest.approx(32 / 40 - 22 / 60)


def test_one_positive_label_among_digit_strings_and_integer_labels():
    """smclarify reads object columns of digit strings as continuous, a single positive label as a
    threshold; the module's categoricals keep them labels."""
    facets = np.array(["Books"] * 20 + ["Toys"] * 20)
    labels = np.array(["5"] * 10 + ["1"] * 10 + ["5"] * 5 + ["2"] * 5 + ["3"] * 10)
    config = BiasConfig(positive_labels=("5",))
    assert values(pre_training_report(labels, facets, config))["Books"]["DPL"] == pytest.approx(5 / 20 - 10 / 20)
    integers = values(pre_training_report(labels.astype(int), facets, BiasConfig(positive_labels=(4, 5))))
    assert integers["Books"]["DPL"] == pytest.approx(5 / 20 - 10 / 20)


def test_positive_labels_default_to_the_top_two_classes():
    facets, labels, _, _ = reviews()
    assert check_config(BiasConfig(), ["Books"], CLASSES).positive_labels == ("4", "5")
    report = pre_training_report(labels, facets, BiasConfig())
    assert report["positive_labels"] == ["4", "5"]
    assert values(report)["Toys"]["DPL"] == pytest.approx(0.4)


def test_what_smclarify_cannot_compute_is_carried_not_raised():
    facets, labels, _, _ = reviews()
    absent = by_value(pre_training_report(labels, facets, BiasConfig(facet_values=("Garden",),
                                                                     positive_labels=("4", "5"))))
    assert list(absent) == ["Garden"]
    assert len(absent["Garden"]) == 7
    assert all(metric["value"] is None and metric["error"] for metric in absent["Garden"].values())
    assert "facet set is empty" in absent["Garden"]["CI"]["error"]

    no_positive_prediction = by_value(post_training_report(labels, np.full(len(labels), "1"), facets, CONFIG))
    assert set(no_positive_prediction) == {"Books", "Toys", "Music"}
    for metrics in no_positive_prediction.values():
        assert len(metrics) == 11
        assert all(metric["value"] is None and "Positive Predicted Index" in metric["error"]
                   for metric in metrics.values())

    single_class = by_value(pre_training_report(np.full(len(labels), "5"), facets, CONFIG, reviews()[3]))
    assert "No negative labels" in single_class["Books"]["CDDL"]["error"]
    assert single_class["Books"]["DPL"]["value"] == 0.0


def test_analysis_json_in_clarifys_shape():
    facets, labels, predicted, groups = reviews()
    pre = pre_training_report(labels, facets, CONFIG, groups)
    post = post_training_report(labels, predicted, facets, CONFIG, groups)
    analysis = analysis_json(pre, post, CONFIG, "star_rating")
    assert set(analysis) == {"pre_training_bias_metrics", "post_training_bias_metrics"}
    section = analysis["post_training_bias_metrics"]
    assert section["label"] == "star_rating" and section["label_value_or_threshold"] == "4,5"
    assert list(section["facets"]) == ["product_category"]
    entries = section["facets"]["product_category"]
    assert {entry["value_or_threshold"] for entry in entries} == {"Books", "Toys", "Music"}
    metric = next(metric for metric in entries[0]["metrics"] if metric["name"] == "DI")
    assert metric["description"] == "Disparate Impact (DI)" and isinstance(metric["value"], float)
    assert {metric["name"] for metric in analysis["pre_training_bias_metrics"]["facets"]["product_category"][0]
            ["metrics"]} == {"CI", "DPL", "KL", "JS", "LP", "TVD", "KS", "CDDL"}
    json.dumps(analysis, allow_nan=False)
    assert list(analysis_json(pre, None, CONFIG, "star_rating")) == ["pre_training_bias_metrics"]


def test_summary_lines():
    facets, labels, _, _ = reviews()
    analysis = analysis_json(pre_training_report(labels, facets, CONFIG),
                             post_training_report(labels, np.full(len(labels), "1"), facets, CONFIG),
                             CONFIG, "star_rating")
    lines = summary_lines(analysis)
    assert len(lines) == 6
    toys = next(line for line in lines if "stage=pre_training" in line and "value=Toys" in line)
    assert toys.startswith("bias stage=pre_training facet=product_category value=Toys CI=0.2 DPL=0.4 KL=")
    books = next(line for line in lines if "stage=post_training" in line and "value=Books" in line)
    assert "DPPL=n/a DI=n/a" in books and "errors: DPPL: No Label values" in books
    assert not math.isnan(float(toys.split("DPL=")[1].split()[0]))


def test_check_config_messages():
    with pytest.raises(ValueError, match=r"facet value\(s\) Garden not found in column product_category; "
                                         r"values seen: Books, Toys"):
        check_config(BiasConfig(facet_values=("Books", "Garden")), ["Toys", "Books"], CLASSES)
    with pytest.raises(ValueError, match=r"positive label\(s\) 6 are not among the classes 1, 2, 3, 4, 5"):
        check_config(BiasConfig(positive_labels=("5", "6")), ["Books"], CLASSES)
    with pytest.raises(ValueError, match="every class"):
        check_config(BiasConfig(positive_labels=CLASSES), ["Books"], CLASSES)
    config = BiasConfig(facet_values=("Books",), positive_labels=("5",))
    assert check_config(config, ["Books", "Toys"], CLASSES) == config
