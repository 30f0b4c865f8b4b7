"""Word attributions on real sentences, from a trained model folder (`make sample` leaves one in
build/sample/model: all-MiniLM-L6-v2 fine-tuned on the bundled movie5 sample): for the first
REVIEWS test sentences, the predicted class and the top three words with the job's setting (200
model evaluations a review) and with shap's default (500), and how often the two agree.

    .venv/bin/python tests/benchmarks/explanations.py [--model build/sample/model] [--reviews 30]
"""

import argparse
import time

import numpy as np
from review_trainer.insights import explanations
from review_trainer.insights import reports
from review_trainer.cli.predict import Predictor

TEST_FILE = "tests/fixtures/opt_ml/input/data/test/movie5_sample_test.tsv"


def served_probabilities(model_dir):
    """texts -> the SavedModel's probabilities (as served, max_seq_length tokens)."""
    import tensorflow as tf

    predictor = Predictor(model_dir)

    def predict_proba(texts):
        outputs = []
        for start in range(0, len(texts), 64):
            ids, mask = predictor.tokenizer(texts[start:start + 64])
            outputs.append(predictor.serve(input_ids=tf.constant(ids), input_mask=tf.constant(mask))["probabilities"])
        return np.concatenate([np.asarray(o) for o in outputs]) if outputs else np.zeros((0, len(predictor.labels)))

    return predict_proba, predictor.labels


def top_words(record, k=3):
    order = np.argsort(record["attributions"])[::-1][:k]
    return [record["words"][i] for i in order]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="build/sample/model")
    parser.add_argument("--reviews", type=int, default=30)
    args = parser.parse_args()
    with open(TEST_FILE, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        texts = [line.rstrip("\n").split("\t")[header.index("review_body")] for line in f][:args.reviews]
    predict_proba, labels = served_probabilities(args.model)
    runs = {}
    for max_evals in (reports.MAX_EVALS, explanations.DEFAULT_MAX_EVALS):
        started = time.perf_counter()
        runs[max_evals] = explanations.explain(texts, predict_proba, labels, max_evals=max_evals)
        print(f"max_evals={max_evals}: {time.perf_counter() - started:.1f} s for {len(texts)} reviews "
              "(shap's warm-up included)")
    ours, reference = runs[reports.MAX_EVALS], runs[explanations.DEFAULT_MAX_EVALS]
    for record in ours:
        print(f"{record['label']} p={record['probability']:.2f}  top: {', '.join(top_words(record))}  "
              f"| {record['text'][:90]}")
    same_top = sum(top_words(a, 1) == top_words(b, 1) for a, b in zip(ours, reference))
    shared = np.mean([len(set(top_words(a)) & set(top_words(b))) / 3 for a, b in zip(ours, reference)])
    print(f"top word as with {explanations.DEFAULT_MAX_EVALS} evaluations: {same_top} of {len(ours)}; "
          f"top three shared: {shared:.0%}")


if __name__ == "__main__":
    main()
