"""A TF Serving REST request body for raw reviews: tokenized on the client, as stock TF Serving needs.

TF Serving (and SageMaker's TensorFlow Serving container) runs the SavedModel's `serving_default`,
which takes token ids, not text: tokenization ops are not in stock TF Serving. This script uses the
tokenizer the job saved beside the model to write the body of

    POST http://HOST:8501/v1/models/review-trainer:predict      (TF Serving)
    InvokeEndpoint ContentType=application/json                   (SageMaker TensorFlow Serving)

    .venv/bin/python examples/serving_request.py --model build/sample/model reviews.txt > body.json

One review per line of the files (or stdin). The answer's "predictions" hold the probabilities of
the classes in label_map.json's order.
"""

import argparse
import json
import sys

from review_trainer.cli.predict import load_tokenizer


def request_body(model_dir, reviews):
    token_ids, mask = load_tokenizer(model_dir)(reviews)
    return {"signature_name": "serving_default",
            "instances": [{"input_ids": ids.tolist(), "input_mask": m.tolist()} for ids, m in zip(token_ids, mask)]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="the model folder the job wrote (model.tar.gz unpacked)")
    parser.add_argument("files", nargs="*", help="reviews, one per line (default: stdin)")
    args = parser.parse_args()
    lines = [line for path in args.files for line in open(path, encoding="utf-8")] if args.files else sys.stdin
    json.dump(request_body(args.model, [line.strip() for line in lines if line.strip()]), sys.stdout)


if __name__ == "__main__":
    main()
