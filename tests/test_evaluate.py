import json

import numpy as np
import pytest
from review_trainer.outputs import evaluation


def test_report_has_sagemaker_model_quality_shape_and_correct_values(tmp_path):
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    predictions = np.array([0, 1, 1, 1, 2, 0, 2, 0])
    report = evaluation.classification_report(labels, predictions, ("1", "2", "3"))
    metrics = report["multiclass_classification_metrics"]
    assert metrics["accuracy"]["value"] == pytest.approx(6 / 8)
    assert metrics["accuracy"]["standard_deviation"] > 0
    assert metrics["confusion_matrix"]["1"] == {"1": 2, "2": 1, "3": 0}
    assert metrics["confusion_matrix"]["3"] == {"1": 1, "2": 0, "3": 2}
    assert metrics["per_class"]["2"] == {"precision": 2 / 3, "recall": 1.0, "f1": pytest.approx(0.8), "support": 2}
    per_class_f1 = [metrics["per_class"][c]["f1"] for c in "123"]
    assert metrics["macro_f1"]["value"] == pytest.approx(np.mean(per_class_f1))
    assert metrics["accuracy_best_constant_classifier"]["value"] == pytest.approx(3 / 8)
    for key in ("weighted_recall", "weighted_precision", "weighted_f0_5", "weighted_f1", "weighted_f2"):
        assert set(metrics[key]) == {"value", "standard_deviation"}
    path = tmp_path / "metrics" / "evaluation.json"
    evaluation.write_report(report, str(path))
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))


def test_confusion_matrix_png(tmp_path):
    report = evaluation.classification_report(np.array([0, 1, 1]), np.array([0, 1, 0]), ("neg", "pos"))
    path = tmp_path / "cm.png"
    evaluation.plot_confusion_matrix(report, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("seed", [0, 1, 4])  # a missing class (odd), one class predicted (4)
def test_every_figure_and_its_bootstrap_are_scikit_learns(seed):
    """The report computes from confusion matrices; scikit-learn's scorers, on the same resamples,
    are the oracle (classes never predicted or absent included: zero_division=0)."""
    from sklearn import metrics as sk

    rng = np.random.default_rng(seed)
    classes, rows = int(rng.integers(2, 6)), int(rng.integers(5, 80))
    labels = rng.integers(0, classes - (seed % 2), rows)  # odd seeds: the last class has no rows
    predictions = np.where(rng.random(rows) < 0.6, labels, rng.integers(0, classes, rows))
    if seed == 4:
        predictions[:] = 0  # one class predicted for every row
    names = tuple(str(c) for c in range(classes))
    report = evaluation.classification_report(labels, predictions, names, seed=seed)["multiclass_classification_metrics"]
    ids = list(range(classes))

    def scores(y, p):
        def f(average, beta):
            return sk.fbeta_score(y, p, beta=beta, labels=ids, average=average, zero_division=0)
        return {"accuracy": sk.accuracy_score(y, p),
                "weighted_recall": sk.recall_score(y, p, labels=ids, average="weighted", zero_division=0),
                "weighted_precision": sk.precision_score(y, p, labels=ids, average="weighted", zero_division=0),
                "weighted_f0_5": f("weighted", 0.5), "weighted_f1": f("weighted", 1.0), "weighted_f2": f("weighted", 2.0),
                "macro_precision": sk.precision_score(y, p, labels=ids, average="macro", zero_division=0),
                "macro_recall": sk.recall_score(y, p, labels=ids, average="macro", zero_division=0),
                "macro_f1": f("macro", 1.0),
                "accuracy_best_constant_classifier": np.bincount(y, minlength=classes).max() / len(y)}

    resamples = np.random.default_rng(seed).integers(0, rows, (200, rows))
    expected = scores(labels, predictions)
    bootstrap = [scores(labels[s], predictions[s]) for s in resamples]
    for name, value in expected.items():
        assert report[name]["value"] == pytest.approx(value, abs=1e-12), name
        assert report[name]["standard_deviation"] == pytest.approx(np.std([b[name] for b in bootstrap]), abs=1e-12)
    precision, recall, f1, support = sk.precision_recall_fscore_support(labels, predictions, labels=ids,
                                                                        zero_division=0)
    assert [report["per_class"][n]["support"] for n in names] == support.tolist()
    assert [report["per_class"][n]["f1"] for n in names] == pytest.approx(f1.tolist(), abs=1e-12)
    assert [report["per_class"][n]["precision"] for n in names] == pytest.approx(precision.tolist(), abs=1e-12)
    assert [report["per_class"][n]["recall"] for n in names] == pytest.approx(recall.tolist(), abs=1e-12)
    matrix = sk.confusion_matrix(labels, predictions, labels=ids)
    assert [[report["confusion_matrix"][a][p] for p in names] for a in names] == matrix.tolist()
