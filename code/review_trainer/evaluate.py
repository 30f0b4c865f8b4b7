"""Test-set evaluation in the shape of SageMaker's model-quality metrics (multiclass).

`multiclass_classification_metrics` holds {"value", "standard_deviation"} pairs as SageMaker Model
Monitor and Clarify write them; standard deviations come from a seeded bootstrap of the test rows.
Macro scores and per-class precision/recall/F1 are added beside the standard keys.
"""

import json
import os

import numpy as np
from review_trainer.training_steps import compiled_inference
from sklearn import metrics as sk

_BOOTSTRAP_ROUNDS = 200


def predict(model, dataset):
    """Labels, probabilities and the mean cross-entropy over a (features, label) dataset."""
    import keras

    # Only the chief evaluates, after the other hosts are done: a plain call, outside the strategy.
    probabilities = compiled_inference(model, lambda logits: keras.ops.softmax(keras.ops.cast(logits, "float32")))
    labels, probs = [], []
    for features, label in dataset.as_numpy_iterator():
        probs.append(np.asarray(probabilities(features)))
        labels.append(label)
    labels, probs = np.concatenate(labels), np.concatenate(probs)
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))))
    return labels, probs, loss


def classification_report(labels, predictions, class_names, seed=0):
    classes = list(range(len(class_names)))
    scores = _scores(labels, predictions, classes)
    rng = np.random.default_rng(seed)
    rounds = []
    for _ in range(_BOOTSTRAP_ROUNDS):
        sample = rng.integers(0, len(labels), len(labels))
        rounds.append(_scores(labels[sample], predictions[sample], classes))
    report = {
        name: {"value": value, "standard_deviation": float(np.std([r[name] for r in rounds]))}
        for name, value in scores.items()
    }
    precision, recall, f1, support = sk.precision_recall_fscore_support(
        labels, predictions, labels=classes, zero_division=0
    )
    matrix = sk.confusion_matrix(labels, predictions, labels=classes)
    report["confusion_matrix"] = {
        actual: {predicted: int(matrix[i, j]) for j, predicted in enumerate(class_names)}
        for i, actual in enumerate(class_names)
    }
    report["per_class"] = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
               "support": int(support[i])}
        for i, name in enumerate(class_names)
    }
    return {"multiclass_classification_metrics": report}


def _scores(labels, predictions, classes):
    def f(average, beta=1.0):
        return float(sk.fbeta_score(labels, predictions, beta=beta, labels=classes, average=average, zero_division=0))

    constant = np.full_like(labels, np.bincount(labels, minlength=len(classes)).argmax())
    return {
        "accuracy": float(sk.accuracy_score(labels, predictions)),
        "weighted_recall": float(sk.recall_score(labels, predictions, labels=classes, average="weighted", zero_division=0)),
        "weighted_precision": float(sk.precision_score(labels, predictions, labels=classes, average="weighted", zero_division=0)),
        "weighted_f0_5": f("weighted", 0.5),
        "weighted_f1": f("weighted"),
        "weighted_f2": f("weighted", 2.0),
        "macro_precision": float(sk.precision_score(labels, predictions, labels=classes, average="macro", zero_division=0)),
        "macro_recall": float(sk.recall_score(labels, predictions, labels=classes, average="macro", zero_division=0)),
        "macro_f1": f("macro"),
        "accuracy_best_constant_classifier": float(sk.accuracy_score(labels, constant)),
    }


def write_report(report, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def plot_confusion_matrix(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix_by_name = report["multiclass_classification_metrics"]["confusion_matrix"]
    names = list(matrix_by_name)
    matrix = np.array([[matrix_by_name[a][p] for p in names] for a in names])
    figure, axes = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
    axes.imshow(matrix, cmap="Blues")
    for i in range(len(names)):
        for j in range(len(names)):
            color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
            axes.text(j, i, str(matrix[i, j]), ha="center", va="center", color=color)
    axes.set_xticks(range(len(names)), names)
    axes.set_yticks(range(len(names)), names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("actual")
    accuracy = report["multiclass_classification_metrics"]["accuracy"]["value"]
    axes.set_title(f"Confusion matrix (accuracy {accuracy:.3f})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
