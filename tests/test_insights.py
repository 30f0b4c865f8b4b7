"""Explanations and bias in the job (insights.py): a fixture in the Amazon TSV schema whose
product_category skews the labels on purpose, the reports checked against direct computations."""

import json
import os
import re
import subprocess

import numpy as np
import pytest
import tensorflow as tf
from conftest import FAST_HYPERPARAMETERS, TRAIN, amazon_tsv, make_opt_ml, make_reviews, read_failure, train_env
from review_trainer.pretrained import ReviewTokenizer, open_checkpoint

# (category, reviews, of which rated 4 or 5): Books skewed positive, Toys negative, Music even
TRAIN_MIX = (("Books", 40, 32), ("Toys", 30, 9), ("Music", 30, 15))


def skewed_reviews(mix, seed):
    rng = np.random.default_rng(seed)
    reviews, pool = [], make_reviews(400, seed)
    positive = [r for r in pool if r[1] >= 4]
    negative = [r for r in pool if r[1] <= 3]
    for category, count, positives in mix:
        for i in range(count):
            text, stars = (positive if i < positives else negative)[rng.integers(0, 100)]
            reviews.append((text, stars, {"product_category": category}))
    return reviews


def metric(analysis, stage, value, name):
    [entry] = [e for e in analysis[stage]["facets"]["product_category"] if e["value_or_threshold"] == value]
    [found] = [m for m in entry["metrics"] if m["name"] == name]
    return found["value"]


@pytest.fixture(scope="module")
def insight_job(tmp_path_factory, distilbert_dir):
    test_rows = skewed_reviews((("Books", 12, 9), ("Toys", 12, 3)), 9)  # skewed too: AD depends on the facets
    base = make_opt_ml(str(tmp_path_factory.mktemp("insights")), {
        "train": {"train.tsv": amazon_tsv(skewed_reviews(TRAIN_MIX, 8))},
        "test": {"test.tsv": amazon_tsv(test_rows)}},
        {**FAST_HYPERPARAMETERS, "bias_facet": "product_category", "explain_samples": "4",
         "explain_max_seconds": "600"})
    result = subprocess.run([TRAIN], env=train_env(base, distilbert_dir), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return base, result, test_rows


def test_pre_training_bias_has_the_sign_and_size_the_fixture_was_made_with(insight_job):
    base, result, _ = insight_job
    with open(os.path.join(base, "output", "data", "bias", "analysis.json")) as f:
        analysis = json.load(f)
    stage = "pre_training_bias_metrics"
    assert analysis[stage]["label_value_or_threshold"] == "4,5"
    n = 100
    for category, count, positives in TRAIN_MIX:  # d: the category, a: the rest
        rest_count = n - count
        rest_positives = sum(p for c, _, p in TRAIN_MIX if c != category)
        assert metric(analysis, stage, category, "CI") == pytest.approx((rest_count - count) / n)
        assert metric(analysis, stage, category, "DPL") == pytest.approx(rest_positives / rest_count - positives / count)
    assert metric(analysis, stage, "Books", "DPL") < -0.3 < 0.3 < metric(analysis, stage, "Toys", "DPL")
    assert re.search(r"^bias stage=pre_training facet=product_category value=Books CI=", result.stdout, re.M)


def test_post_training_bias_agrees_with_the_models_own_predictions(insight_job, distilbert_dir):
    base, _, test_rows = insight_job
    with open(os.path.join(base, "output", "data", "bias", "analysis.json")) as f:
        analysis = json.load(f)
    ids, mask = ReviewTokenizer(open_checkpoint(distilbert_dir), 16)([text for text, *_ in test_rows])
    serve = tf.saved_model.load(os.path.join(base, "model", "tensorflow", "saved_model", "0")).signatures[
        "serving_default"]
    predicted = serve(input_ids=tf.constant(ids), input_mask=tf.constant(mask))["probabilities"].numpy().argmax(1)
    positive = predicted >= 3  # classes 4 and 5
    labelled_positive = np.array([stars >= 4 for _, stars, _ in test_rows])
    books = np.array([other["product_category"] == "Books" for _, _, other in test_rows])
    q_books, q_toys = positive[books].mean(), positive[~books].mean()
    stage = "post_training_bias_metrics"
    assert metric(analysis, stage, "Books", "DPPL") == pytest.approx(q_toys - q_books)
    assert q_toys > 0  # the fixture's model predicts 4 or 5 stars for some Toys reviews: DI is defined
    assert metric(analysis, stage, "Books", "DI") == pytest.approx(q_books / q_toys)
    # The accuracy of the outcome per facet: the labels are skewed by category (Books 9 of 12
    # positive, Toys 3 of 12), so it differs with any predictions, and only rows lined up with their
    # own facet and label give it
    correct = positive == labelled_positive
    assert metric(analysis, stage, "Books", "AD") == pytest.approx(correct[~books].mean() - correct[books].mean())
    assert metric(analysis, stage, "Books", "AD") != 0


def test_explanations_add_up_to_the_models_probabilities(insight_job, distilbert_dir):
    base, result, test_rows = insight_job
    folder = os.path.join(base, "output", "data", "explanations")
    assert sorted(os.listdir(folder)) == ["explanations.html", "explanations.jsonl", "summary.json"]
    with open(os.path.join(folder, "explanations.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["text"] for r in records] == [text for text, *_ in test_rows[:4]]  # the first 4 test reviews
    ids, mask = ReviewTokenizer(open_checkpoint(distilbert_dir), 16)([r["text"] for r in records])
    serve = tf.saved_model.load(os.path.join(base, "model", "tensorflow", "saved_model", "0")).signatures[
        "serving_default"]
    probabilities = serve(input_ids=tf.constant(ids), input_mask=tf.constant(mask))["probabilities"].numpy()
    ids, mask = ReviewTokenizer(open_checkpoint(distilbert_dir), 16)([""])
    empty = serve(input_ids=tf.constant(ids), input_mask=tf.constant(mask))["probabilities"].numpy()[0]
    for record, served in zip(records, probabilities):
        assert record["label"] == str(served.argmax() + 1)
        assert record["probability"] == pytest.approx(served.max(), abs=1e-4)
        assert record["base_value"] == pytest.approx(empty[served.argmax()], abs=1e-4)  # every word hidden
        # SHAP's efficiency: the attributions add up to the probability minus the empty review's
        assert sum(record["attributions"]) == pytest.approx(record["probability"] - record["base_value"], abs=1e-4)
    assert re.search(r"^explanations reviews=4 seconds=\S+ seconds_per_review=", result.stdout, re.M)


def test_an_unknown_facet_column_fails_at_the_scan_naming_it(tmp_path, distilbert_dir):
    base = make_opt_ml(str(tmp_path), {"train": {"train.tsv": amazon_tsv(make_reviews(16))}},
                       {**FAST_HYPERPARAMETERS, "bias_facet": "category"})
    result = subprocess.run([TRAIN], env=train_env(base, distilbert_dir), capture_output=True, text=True, timeout=600)
    assert result.returncode == 3, result.stderr[-2000:]
    assert re.match(r"DataError: .*train\.tsv: no column 'category'; its columns are .*product_category.*"
                    r"Set text_column / label_column / bias_facet / bias_group", read_failure(base))


def test_facet_values_not_in_the_data_fail_at_the_start(tmp_path, distilbert_dir):
    base = make_opt_ml(str(tmp_path), {"train": {"train.tsv": amazon_tsv(make_reviews(16))}},
                       {**FAST_HYPERPARAMETERS, "bias_facet": "product_category", "bias_facet_values": "Toys"})
    result = subprocess.run([TRAIN], env=train_env(base, distilbert_dir), capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Toys" in read_failure(base) and "Books" in read_failure(base)  # what was asked for, what there is
    assert "training: " not in result.stdout


# A bias report that breaks in the job's own process (sitecustomize): the model is still published.
BROKEN_BIAS = '''
from review_trainer import bias
def _broken(*args, **kwargs):
    raise RuntimeError("broken on purpose")
bias.post_training_report = _broken
'''


def test_a_failure_in_the_reports_is_written_down_and_the_job_still_succeeds(tmp_path, distilbert_dir):
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(BROKEN_BIAS)
    base = make_opt_ml(str(tmp_path / "opt_ml"), {"train": {"train.tsv": amazon_tsv(skewed_reviews(TRAIN_MIX, 8))},
                                                  "test": {"test.tsv": amazon_tsv(skewed_reviews(TRAIN_MIX, 9)[:20])}},
                       {**FAST_HYPERPARAMETERS, "bias_facet": "product_category", "explain_samples": "0"})
    env = train_env(base, distilbert_dir, PYTHONPATH=os.pathsep.join(
        [str(tmp_path / "inject"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    result = subprocess.run([TRAIN], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bias report failed (the model is published): RuntimeError: broken on purpose" in result.stdout
    with open(os.path.join(base, "output", "data", "bias", "analysis.json")) as f:
        assert json.load(f)["error"] == "RuntimeError: broken on purpose"
    assert os.path.exists(os.path.join(base, "model", "tensorflow", "saved_model", "0", "saved_model.pb"))
    assert not os.path.exists(os.path.join(base, "output", "data", "explanations"))  # explain_samples=0


# Units of insights.py, without a job: the bias report's alignment of the test rows with the
# evaluation, the settings' checks on every host alike, and the batched probability function.

def hyperparameters(**values):
    from review_trainer.hyperparameters import Hyperparameters

    return Hyperparameters.from_dict({"bias_facet": "product_category", **values})


def test_the_bias_report_lines_the_test_rows_up_with_the_evaluation_even_when_it_wraps_around(tmp_path):
    from review_trainer import insights

    train_sample = [(4, "Books"), (0, "Books"), (3, "Toys"), (1, "Toys")]
    # The test channel: 4 rows; the evaluation (test_steps) read 6, rows 0 and 1 again
    row_labels, categories = np.array([4, 0, 3, 1], np.int32), ["Books", "Toys"]
    codes = np.array([0, 0, 1, 1], np.int32)
    evaluated = np.array([4, 0, 3, 1, 4, 0])
    predicted = np.array([4, 4, 0, 0, 3, 0])  # positive (4 or 5 stars): Books 3 of 4, Toys 0 of 2
    lines = []
    insights.write_bias_report(hyperparameters(), train_sample, (lambda: (row_labels, [(codes, categories)]),
                                                                   evaluated, predicted), str(tmp_path), lines.append)
    with open(tmp_path / "bias" / "analysis.json") as f:
        analysis = json.load(f)
    stage = "post_training_bias_metrics"
    assert metric(analysis, stage, "Books", "DPPL") == pytest.approx(0 / 2 - 3 / 4)  # q'_a - q'_d, d: Books
    assert metric(analysis, stage, "Toys", "DPPL") == pytest.approx(3 / 4 - 0 / 2)
    # accuracy of the outcome (positive or not), the wrapped rows included: Books 3 of 4, Toys 1 of 2
    assert metric(analysis, stage, "Books", "AD") == pytest.approx(1 / 2 - 3 / 4)
    assert any(line.startswith("bias stage=post_training facet=product_category value=Toys DPPL=0.75") for line in lines)

    # Rows that do not match the evaluation's labels: written down as an error, never a wrong report
    lines.clear()
    insights.write_bias_report(hyperparameters(), train_sample, (lambda: (row_labels, [(codes, categories)]),
                                                                   evaluated[::-1], predicted), str(tmp_path), lines.append)
    with open(tmp_path / "bias" / "analysis.json") as f:
        assert "not in the evaluation's order" in json.load(f)["error"]
    assert any(line.startswith("bias report failed (the model is published): ValueError") for line in lines)


class TwoHosts:
    """The topology of one of two hosts: sum_over_workers adds the other host's values."""

    def __init__(self, is_chief, other_values):
        self.is_chief, self.num_workers, self.other_values = is_chief, 2, other_values

    def sum_over_workers(self, values):
        return np.asarray(values) + np.asarray(self.other_values)


def scanned_train(values):
    from review_trainer.data.scan import ChannelSummary, ValueCounts

    counts = ValueCounts()
    for value in values:
        counts.add(value)
    return {"train": ChannelSummary("train", [], [(0, value) for value in values], (counts,))}


def test_facet_settings_are_decided_alike_on_every_host_of_a_sharded_channel():
    from review_trainer.errors import HyperparameterError
    from review_trainer.insights import check_settings

    hp = hyperparameters(bias_facet_values="Toys")
    # ShardedByS3Key: Toys only in the other host's files. The sum says 3 rows: both hosts go on.
    lines = []
    check_settings(hp, scanned_train(["Books"] * 5), {}, TwoHosts(True, [3, 0, 0]), True, lines.append)
    check_settings(hp, scanned_train(["Toys"] * 3), {}, TwoHosts(False, [0, 1, 0]), True, print)
    assert lines == ["bias facet=product_category sensitive=Toys positive_labels=4,5 group=none train_sample_rows=5 "
                     "of 0 (the chief's files only: ShardedByS3Key)"]
    # In neither host's files: both fail, naming what was asked for and what there is
    for topology in (TwoHosts(True, [0, 0, 0]), TwoHosts(False, [0, 1, 0])):
        with pytest.raises(HyperparameterError, match=r"bias facet value\(s\) Toys not found in column product_"
                                                       r"category; values seen: Books"):
            check_settings(hp, scanned_train(["Books"] * 5), {}, topology, True, print)


def test_a_facet_with_too_many_values_and_no_sensitive_group_fails_naming_the_setting(monkeypatch):
    from review_trainer.data import scan
    from review_trainer.errors import HyperparameterError
    from review_trainer.insights import MAX_FACET_VALUES, check_settings

    class OneHost:
        is_chief, num_workers = True, 1

        def sum_over_workers(self, values):
            return np.asarray(values)

    check_settings(hyperparameters(), scanned_train([f"v{i}" for i in range(MAX_FACET_VALUES)]), {}, OneHost(), False, print)
    with pytest.raises(HyperparameterError, match=rf"bias_facet product_category has {MAX_FACET_VALUES + 1} values in "
                                                  r"the train channel, .* name the sensitive group with bias_facet_values"):
        check_settings(hyperparameters(), scanned_train([f"v{i}" for i in range(MAX_FACET_VALUES + 1)]), {}, OneHost(),
                       False, print)
    monkeypatch.setattr(scan, "MAX_DISTINCT_VALUES", 10)  # an ID-like column: values beyond the count's bound
    with pytest.raises(HyperparameterError, match=r"has 10\+ values"):
        check_settings(hyperparameters(), scanned_train([f"id{i}" for i in range(11)]), {}, OneHost(), False, print)
    # With the sensitive group named, any number of other values is fine
    check_settings(hyperparameters(bias_facet_values="id3"), scanned_train([f"id{i}" for i in range(11)]), {},
                   OneHost(), False, print)
    # Pipe mode: no scan, no sample; said, and no check
    lines = []
    check_settings(hyperparameters(), {}, {"train": object()}, OneHost(), False, lines.append)
    assert lines == ["bias report skipped: the train channel is in Pipe mode (read once and not scanned)"]


def test_the_probability_function_cuts_batches_to_a_length_bucket_and_pads_them_to_a_row_bucket(distilbert_dir, monkeypatch):
    import keras
    from review_trainer import insights, training_steps
    from review_trainer.model import build_classifier
    from review_trainer.pretrained import load_backbone

    tokenizer = ReviewTokenizer(open_checkpoint(distilbert_dir), 32)
    model = build_classifier(load_backbone(open_checkpoint(distilbert_dir)), 5, 32)
    shapes, compiled = [], training_steps.compiled_inference

    def recording(model, outputs):
        forward = compiled(model, outputs)
        return lambda features: shapes.append(features["token_ids"].shape) or forward(features)

    monkeypatch.setattr(training_steps, "compiled_inference", recording)
    texts = [f"review {i} " + "good " * (i % 9) for i in range(70)] + ["long " * 40]
    probabilities = insights.probability_function(model, tokenizer)(texts)
    ids, mask = tokenizer(texts)  # the full max_seq_length input, as served
    logits = model({"token_ids": ids, "padding_mask": mask}, training=False)
    np.testing.assert_allclose(probabilities, keras.ops.convert_to_numpy(keras.ops.softmax(logits)), atol=1e-5)
    # The first batch: 64 rows, its longest review (10 words) fits the 16-token bucket; the last: 7
    # reviews padded to the 8-row bucket, the 40-word one among them taking all 32 tokens
    assert shapes == [(64, 16), (8, 32)]


def test_explanations_stop_at_their_time_budget_after_a_whole_review(tmp_path):
    import time

    from review_trainer import insights

    assert insights.explain_budget("auto", 1000.0) == (40.0, "auto: 4% of the job's 1000 s, at least 15 s")
    assert insights.explain_budget("auto", 100.0)[0] == 15.0
    assert insights.explain_budget(90, 400.0) == (90.0, "explain_max_seconds")

    def slow(texts):  # 0.1 s a call: a review of three words takes a few calls
        time.sleep(0.1)
        return np.tile([0.1, 0.2, 0.3, 0.2, 0.2], (len(texts), 1))

    lines, texts = [], [f"review number {i}" for i in range(20)]
    insights.write_explanations(texts, slow, tuple("12345"), str(tmp_path), lines.append, budget=(0.5, "test"))
    with open(tmp_path / "explanations" / "summary.json") as f:
        summary = json.load(f)
    with open(tmp_path / "explanations" / "explanations.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert 1 <= summary["reviews"] == len(records) < 20 and summary["reviews_asked"] == 20
    assert summary["cut_short_by_budget"] is True and summary["error"] is None and summary["budget_seconds"] == 0.5
    assert [r["text"] for r in records] == texts[:len(records)]
    assert any(line.startswith(f"explanations stopped after {len(records)} of 20 reviews: their time budget, 0 s (test)")
               for line in lines)
    # No budget, or one not reached: every review
    insights.write_explanations(texts[:3], slow, tuple("12345"), str(tmp_path), lines.append, budget=(600, "test"))
    with open(tmp_path / "explanations" / "summary.json") as f:
        summary = json.load(f)
    assert summary["reviews"] == 3 and summary["cut_short_by_budget"] is False


def test_the_explainers_warm_up_is_not_taken_for_a_reviews_time(tmp_path):
    import time

    from review_trainer import insights

    calls = []

    def compiling_first(texts):  # the first call compiles (2 s), the others take 10 ms
        time.sleep(2.0 if not calls else 0.01)
        calls.append(len(texts))
        return np.tile([0.1, 0.2, 0.3, 0.2, 0.2], (len(texts), 1))

    from review_trainer import explanations

    explanations.explain(["compile numba"], lambda texts: np.full((len(texts), 2), 0.5), ["a", "b"])  # once a process
    texts = [f"review number {i}" for i in range(10)]
    insights.write_explanations(texts, compiling_first, tuple("12345"), str(tmp_path), print, budget=(4.0, "test"))
    with open(tmp_path / "explanations" / "summary.json") as f:
        summary = json.load(f)
    # Taken for the first review's time, the 2 s would predict that a second review ends past 4 s
    assert summary["reviews"] == 10 and summary["cut_short_by_budget"] is False


def test_an_error_before_the_explanations_begin_is_written_down_and_not_raised(tmp_path):
    from review_trainer import data, insights

    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test.tsv").write_bytes(amazon_tsv(make_reviews(4)))
    spec = data.RowSpec("review_body", "star_rating", tuple("12345"), 16)
    channels = {"test": data.scan_channel("test", str(tmp_path / "test"), spec, 0.0)}
    lines = []
    from review_trainer.hyperparameters import Hyperparameters

    insights.run(Hyperparameters.from_dict({"explain_samples": "2"}), channels, {}, spec, spec, model=None,
                 tokenizer=None, test_predictions=None, out_dir=str(tmp_path / "out"), job_seconds=100.0,
                 print_fn=lines.append)
    assert lines == ["explanations failed (the model is published): AttributeError: 'NoneType' object has no "
                     "attribute 'max_seq_length'"]
    with open(tmp_path / "out" / "explanations" / "summary.json") as f:
        assert json.load(f)["error"] == "AttributeError: 'NoneType' object has no attribute 'max_seq_length'"


def test_a_stop_signal_in_step_7_is_raised_not_written_down(tmp_path):
    from review_trainer import insights
    from review_trainer.errors import JobStopped
    from review_trainer.stopping import StopSignal

    def stopped(texts):
        raise JobStopped("the job received SIGTERM", 143)

    with pytest.raises(JobStopped, match="SIGTERM"):
        insights.write_explanations(["a short review"], stopped, tuple("12345"), str(tmp_path))
    # A signal that a library swallowed (smclarify catches every exception, per metric) still
    # stops the job once the phase it arrived in is over
    signal = StopSignal()
    signal.received = "SIGTERM"
    with pytest.raises(JobStopped, match="SIGTERM during the explanations and bias report"):
        insights.run(hyperparameters(), scanned_train(["Books", "Toys"]), {}, None, None, None, None, None,
                     str(tmp_path), 100.0, stop_signal=signal, print_fn=print)
