"""`predict`: star ratings for reviews, from a finished model, as JSON Lines.

    predict --model MODEL [FILE ...]

MODEL is a model folder the job wrote (or the `model.tar.gz` SageMaker uploads). The reviews come
from the files, or stdin without any, read by the job's own readers (data/formats.py): every format
the job trains on (the Amazon TSV, CSV, JSON Lines, Parquet; gzip-compressed or not) with a
`review_body` column (`--text-column`; no label column needed), else plain text with one review
per line. A row that cannot be read is an error naming its line: no review is skipped. Each
review gives one line on stdout: {"label": "5", "probabilities": {"1": 0.01, ..., "5": 0.93}}, in
input order. The model's own tokenizer (saved beside it) turns the text into the SavedModel's
`input_ids` and `input_mask`, as a TF Serving client would.
"""

import argparse
import contextlib
import json
import os
import sys
import tarfile
import tempfile

import numpy as np
from review_trainer.contract.errors import DataError
from review_trainer.data import read_texts
from review_trainer.outputs.export import SAVED_MODEL_PATH as SAVED_MODEL

BATCH = 64


class PredictError(Exception):
    """Bad input: the message says what and where; the exit code is 2."""


@contextlib.contextmanager
def opened_model(path):
    """The model folder: `path` itself, or `path` (a model.tar.gz) unpacked into a temporary folder."""
    if os.path.isdir(path):
        yield path
        return
    if not os.path.isfile(path):
        raise PredictError(f"--model {path}: no such model folder or model.tar.gz")
    try:
        with tempfile.TemporaryDirectory(prefix="review-trainer-model-") as folder:
            with tarfile.open(path) as archive:
                unsafe = [m.name for m in archive.getmembers() if m.issym() or m.islnk() or m.name.startswith("/")
                          or ".." in m.name.split("/")]
                if unsafe:
                    raise PredictError(f"--model {path}: refusing to unpack {unsafe[0]!r} (a link or a path outside)")
                archive.extractall(folder)
            yield folder
    except tarfile.TarError as error:
        raise PredictError(f"--model {path}: not a model folder or a readable model.tar.gz ({error})") from error


def load_tokenizer(model_dir):
    """The tokenizer saved beside the model: text -> (input_ids, input_mask) at its max_seq_length."""
    from review_trainer.model.pretrained import PretrainedCheckpoint, ReviewTokenizer

    tokenizer_dir = os.path.join(model_dir, "tokenizer")
    with open(os.path.join(tokenizer_dir, "review_trainer_tokenizer.json")) as f:
        max_seq_length = json.load(f)["max_seq_length"]
    return ReviewTokenizer(PretrainedCheckpoint(tokenizer_dir, "bert", {}), max_seq_length)


class Predictor:
    def __init__(self, model_dir):
        missing = [name for name in (SAVED_MODEL, "tokenizer", "label_map.json")
                   if not os.path.exists(os.path.join(model_dir, name))]
        if missing:
            raise PredictError(f"{model_dir} is not a model folder of this job: it lacks {', '.join(missing)}")
        with open(os.path.join(model_dir, "label_map.json")) as f:
            index_to_label = json.load(f)["index_to_label"]
        self.labels = [index_to_label[str(i)] for i in range(len(index_to_label))]
        self.tokenizer = load_tokenizer(model_dir)

        import tensorflow as tf

        self.serve = tf.saved_model.load(os.path.join(model_dir, SAVED_MODEL)).signatures["serving_default"]

    def __call__(self, texts):
        """[{"label", "probabilities"}] for each text."""
        import tensorflow as tf

        results = []
        for start in range(0, len(texts), BATCH):
            ids, mask = self.tokenizer(texts[start:start + BATCH])
            probabilities = self.serve(input_ids=tf.constant(ids), input_mask=tf.constant(mask))["probabilities"]
            for row in np.asarray(probabilities):
                results.append({"label": self.labels[int(row.argmax())],
                                "probabilities": {label: round(float(p), 6) for label, p in zip(self.labels, row)}})
        return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="predict", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a model folder the job wrote, or its model.tar.gz")
    parser.add_argument("--text-column", default="review_body", help="the text column of CSV, TSV and JSON Lines")
    parser.add_argument("files", nargs="*", help="files of reviews (default: stdin)")
    args = parser.parse_args(argv)
    try:
        reviews = [review for path in args.files or ["-"] for review in read_reviews(path, args.text_column)]
        with opened_model(args.model) as model_dir:
            predictor = Predictor(model_dir)
            for result in predictor(reviews):
                print(json.dumps(result))
    except (PredictError, DataError) as error:
        print(f"predict: {error}", file=sys.stderr)
        return 2
    return 0


def read_reviews(path, text_column):
    """The reviews of one input: a file, or stdin for "-"."""
    if path == "-":
        return read_texts(sys.stdin.buffer.read(), "stdin", text_column)
    try:
        with open(path, "rb") as f:
            content = f.read()
    except OSError as error:
        raise PredictError(f"{path}: cannot be read ({error.strerror or error})") from error
    return read_texts(content, path, text_column)


if __name__ == "__main__":
    sys.exit(main())
