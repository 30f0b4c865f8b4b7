import json

import numpy as np
import pytest
from review_trainer import evaluate


def test_report_has_sagemaker_model_quality_shape_and_correct_values(tmp_path):
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    predictions = np.array([0, 1, 1, 1, 2, 0, 2, 0])
    report = evaluate.classification_report(labels, predictions, ("1", "2", "3"))
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
    evaluate.write_report(report, str(path))
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))


def test_confusion_matrix_png(tmp_path):
    report = evaluate.classification_report(np.array([0, 1, 1]), np.array([0, 1, 0]), ("neg", "pos"))
    path = tmp_path / "cm.png"
    evaluate.plot_confusion_matrix(report, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
