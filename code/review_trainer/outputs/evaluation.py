"""Test-set evaluation in the shape of SageMaker's model-quality metrics (multiclass).

`multiclass_classification_metrics` holds {"value", "standard_deviation"} pairs as SageMaker Model
Monitor and Clarify write them; standard deviations come from a seeded bootstrap of the test rows.
Macro scores and per-class precision/recall/F1 are added beside the standard keys.

The evaluation stage (`evaluate_test`) runs on the chief, after training: the test channel's
metrics, and the model's predictions for three sample reviews.
"""

import dataclasses
import os

import numpy as np
from review_trainer.contract.files import write_json
from review_trainer.model.inference import compiled_inference
from review_trainer.telemetry.metric_log import format_metrics

SAMPLE_REVIEWS = ("This is great!", "This is OK.", "This is terrible.")


@dataclasses.dataclass(frozen=True)
class Evaluation:
    report: dict | None  # classification_report of the test channel; None without one
    predictions: tuple | None  # (labels, predicted class indexes) in the test channel's order (the bias report)

    @property
    def test_metrics(self):
        """The figures of the report (its values, without their standard deviations), for the manifest."""
        if self.report is None:
            return None
        return {name: value["value"] for name, value in self.report["multiclass_classification_metrics"].items()
                if isinstance(value, dict) and "value" in value}

    def write(self, metrics_dir):
        if self.report is not None:
            write_report(self.report, os.path.join(metrics_dir, "evaluation.json"))
            plot_confusion_matrix(self.report, os.path.join(metrics_dir, "confusion_matrix.png"))


def evaluate_test(model, channels, tokenizer, hp, print_fn=print):
    """The evaluation stage: the test channel (when there is one) and the sample predictions."""
    evaluation = Evaluation(None, None)
    if channels.test is not None:
        test = channels.test.test_pass(channels.spec, tokenizer, hp)
        try:
            labels, probabilities, test_loss = predict(model, test.dataset())
        except ValueError:  # no batch at all: a streamed pass that broke off or had no good row says why
            test.finish()
            raise
        test.finish()
        predicted = probabilities.argmax(axis=1)
        report = classification_report(labels, predicted, hp.classes, seed=hp.seed)
        scores = report["multiclass_classification_metrics"]
        print_fn(format_metrics(test_loss=test_loss, test_accuracy=scores["accuracy"]["value"],
                                test_macro_f1=scores["macro_f1"]["value"], test_rows=len(labels)))
        evaluation = Evaluation(report, (labels, predicted))
    if hp.run_sample_predictions:
        print_sample_predictions(model, tokenizer, hp.classes, print_fn)
    return evaluation


def print_sample_predictions(model, tokenizer, classes, print_fn=print):
    import keras

    token_ids, padding_mask = tokenizer(SAMPLE_REVIEWS)
    # A plain call: Keras's predict would run under the strategy, with the other hosts gone.
    logits = model({"token_ids": token_ids, "padding_mask": padding_mask}, training=False)
    for text, probabilities in zip(SAMPLE_REVIEWS, keras.ops.convert_to_numpy(keras.ops.softmax(logits))):
        print_fn(f"sample_prediction label={classes[probabilities.argmax()]} confidence={probabilities.max():.3f} "
                 f"text={text!r}")


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
    """SageMaker's multiclass metrics of class indexes, each with the standard deviation of a
    seeded bootstrap (_BOOTSTRAP_ROUNDS resamples of the rows), the confusion matrix and per-class
    precision, recall, F1 and support. Every figure follows from a confusion matrix, so the
    bootstrap counts its resamples' matrices at once (numpy) rather than scoring each resample
    (scikit-learn's scorers took 3 s a report); tests/test_evaluate.py holds the figures to
    scikit-learn's."""
    k, n = len(class_names), len(labels)
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    matrix = _confusion_matrices(labels[None], predictions[None], k)[0]
    samples = np.random.default_rng(seed).integers(0, n, (_BOOTSTRAP_ROUNDS, n))
    rounds = _scores(_confusion_matrices(labels[samples], predictions[samples], k))
    report = {name: {"value": float(values[0]), "standard_deviation": float(np.std(rounds[name]))}
              for name, values in _scores(matrix[None]).items()}
    report["confusion_matrix"] = {
        actual: {predicted: int(matrix[i, j]) for j, predicted in enumerate(class_names)}
        for i, actual in enumerate(class_names)
    }
    precision, recall, f1 = (_per_class(matrix[None], beta=1.0)[i][0] for i in range(3))
    report["per_class"] = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
               "support": int(matrix[i].sum())}
        for i, name in enumerate(class_names)
    }
    return {"multiclass_classification_metrics": report}


def _confusion_matrices(labels, predictions, k):
    """[rounds, k, k] counts (actual, predicted) of [rounds, n] class indexes."""
    rounds = labels.shape[0]
    cells = (np.arange(rounds)[:, None] * k + labels) * k + predictions
    return np.bincount(cells.ravel(), minlength=rounds * k * k).reshape(rounds, k, k)


def _per_class(matrices, beta):
    """Per-class precision, recall and F-beta of [rounds, k, k] matrices; 0 where undefined
    (scikit-learn's zero_division=0)."""
    true_positives = np.diagonal(matrices, axis1=1, axis2=2).astype(np.float64)
    predicted, actual = matrices.sum(axis=1), matrices.sum(axis=2)
    precision = np.divide(true_positives, predicted, out=np.zeros_like(true_positives), where=predicted > 0)
    recall = np.divide(true_positives, actual, out=np.zeros_like(true_positives), where=actual > 0)
    denominator = beta ** 2 * precision + recall
    f = np.divide((1 + beta ** 2) * precision * recall, denominator, out=np.zeros_like(true_positives),
                  where=denominator > 0)
    return precision, recall, f


def _scores(matrices):
    """{metric: [rounds] values} of [rounds, k, k] confusion matrices."""
    support = matrices.sum(axis=2)  # rows of each class
    rows = support.sum(axis=1)

    def weighted(values):
        return (values * support).sum(axis=1) / rows

    precision, recall, f1 = _per_class(matrices, beta=1.0)
    return {
        "accuracy": np.trace(matrices, axis1=1, axis2=2) / rows,
        "weighted_recall": weighted(recall),
        "weighted_precision": weighted(precision),
        "weighted_f0_5": weighted(_per_class(matrices, beta=0.5)[2]),
        "weighted_f1": weighted(f1),
        "weighted_f2": weighted(_per_class(matrices, beta=2.0)[2]),
        "macro_precision": precision.mean(axis=1),
        "macro_recall": recall.mean(axis=1),
        "macro_f1": f1.mean(axis=1),
        "accuracy_best_constant_classifier": support.max(axis=1) / rows,
    }


def write_report(report, path):
    write_json(report, path)


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
