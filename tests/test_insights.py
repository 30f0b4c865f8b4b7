"""Explanations and bias in the job (insights/reports.py): a fixture in the Amazon TSV schema whose
product_category skews the labels on purpose, the reports checked against direct computations."""

import json
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf
from conftest import FAST_HYPERPARAMETERS, amazon_tsv, make_opt_ml, make_reviews, read_failure, train_in_process
from review_trainer.model.pretrained import ReviewTokenizer, open_checkpoint

# pytest-xdist: the module's job, made once
pytestmark = pytest.mark.xdist_group("insights")

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
    result = train_in_process(base, distilbert_dir)
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


def test_an_unknown_facet_column_fails_at_the_scan_naming_it(tmp_path, distilbert_dir, run_in_process):
    base = make_opt_ml(str(tmp_path), {"train": {"train.tsv": amazon_tsv(make_reviews(16))}},
                       {**FAST_HYPERPARAMETERS, "bias_facet": "category"})
    result = run_in_process(base, distilbert_dir)
    assert result.returncode == 3, result.stderr[-2000:]
    assert re.match(r"DataError: .*train\.tsv: no column 'category'; its columns are .*product_category.*"
                    r"Set text_column / label_column / bias_facet / bias_group", read_failure(base))


def test_facet_values_not_in_the_data_fail_at_the_start(tmp_path, distilbert_dir, run_in_process):
    base = make_opt_ml(str(tmp_path), {"train": {"train.tsv": amazon_tsv(make_reviews(16))}},
                       {**FAST_HYPERPARAMETERS, "bias_facet": "product_category", "bias_facet_values": "Toys"})
    result = run_in_process(base, distilbert_dir)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Toys" in read_failure(base) and "Books" in read_failure(base)  # what was asked for, what there is
    assert "training: " not in result.stdout


def test_a_failure_in_the_reports_is_written_down_and_the_job_still_succeeds(tmp_path, distilbert_dir, monkeypatch):
    from review_trainer.insights import bias

    def broken(*args, **kwargs):
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(bias, "post_training_report", broken)  # the job runs in this process
    base = make_opt_ml(str(tmp_path / "opt_ml"), {"train": {"train.tsv": amazon_tsv(skewed_reviews(TRAIN_MIX, 8))},
                                                  "test": {"test.tsv": amazon_tsv(skewed_reviews(TRAIN_MIX, 9)[:20])}},
                       {**FAST_HYPERPARAMETERS, "bias_facet": "product_category", "explain_samples": "0"})
    result = train_in_process(base, distilbert_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bias report failed (the model is published): RuntimeError: broken on purpose" in result.stdout
    with open(os.path.join(base, "output", "data", "bias", "analysis.json")) as f:
        assert json.load(f)["error"] == "RuntimeError: broken on purpose"
    assert os.path.exists(os.path.join(base, "model", "tensorflow", "saved_model", "0", "saved_model.pb"))
    assert not os.path.exists(os.path.join(base, "output", "data", "explanations"))  # explain_samples=0


# Units of insights/reports.py, without a job: the bias report's alignment of the test rows with the
# evaluation, the settings' checks on every host alike, and the batched probability function.

def hyperparameters(**values):
    from review_trainer.contract.hyperparameters import Hyperparameters

    return Hyperparameters.from_dict({"bias_facet": "product_category", **values})


def test_the_bias_report_lines_the_test_rows_up_with_the_evaluation_even_when_it_wraps_around(tmp_path):
    from review_trainer.insights import reports

    train_sample = [(4, "Books"), (0, "Books"), (3, "Toys"), (1, "Toys")]
    # The test channel: 4 rows; the evaluation (test_steps) read 6, rows 0 and 1 again
    row_labels, categories = np.array([4, 0, 3, 1], np.int32), ["Books", "Toys"]
    codes = np.array([0, 0, 1, 1], np.int32)
    evaluated = np.array([4, 0, 3, 1, 4, 0])
    predicted = np.array([4, 4, 0, 0, 3, 0])  # positive (4 or 5 stars): Books 3 of 4, Toys 0 of 2
    lines = []
    reports.write_bias_report(hyperparameters(), train_sample, (lambda: (row_labels, [(codes, categories)]),
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
    reports.write_bias_report(hyperparameters(), train_sample, (lambda: (row_labels, [(codes, categories)]),
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


def scanned_train(values, own_files=False):
    """Channels whose train channel was scanned with the facet: one review of class 0 per value."""
    from review_trainer.data.channels import ScannedChannel
    from review_trainer.data.scan import ChannelSummary, ValueCounts

    counts = ValueCounts()
    for value in values:
        counts.add(value)
    summary = ChannelSummary("train", [], sample=[(0, value) for value in values], extra_values=(counts,))
    return SimpleNamespace(train=ScannedChannel("train", own_files, summary), test=None)


def streamed_train():
    """Channels whose train channel is in Pipe mode (not scanned), and no test channel."""
    from review_trainer.data.channels import PipeChannel
    from review_trainer.data.pipe import Fifos

    return SimpleNamespace(train=PipeChannel("train", False, Fifos("train", "/fifo", "None")), test=None)


def test_facet_settings_are_decided_alike_on_every_host_of_a_sharded_channel():
    from review_trainer.contract.errors import HyperparameterError
    from review_trainer.insights.reports import check_settings

    hp = hyperparameters(bias_facet_values="Toys")
    # ShardedByS3Key: Toys only in the other host's files. The sum says 3 rows: both hosts go on.
    lines = []
    check_settings(hp, scanned_train(["Books"] * 5, own_files=True), TwoHosts(True, [3, 0, 0]), lines.append)
    check_settings(hp, scanned_train(["Toys"] * 3, own_files=True), TwoHosts(False, [0, 1, 0]), print)
    assert lines == ["bias facet=product_category sensitive=Toys positive_labels=4,5 group=none train_sample_rows=5 "
                     "of 0 (the chief's files only: ShardedByS3Key)"]
    # In neither host's files: both fail, naming what was asked for and what there is
    for topology in (TwoHosts(True, [0, 0, 0]), TwoHosts(False, [0, 1, 0])):
        with pytest.raises(HyperparameterError, match=r"bias facet value\(s\) Toys not found in column product_"
                                                       r"category; values seen: Books"):
            check_settings(hp, scanned_train(["Books"] * 5, own_files=True), topology, print)


def test_a_facet_with_too_many_values_and_no_sensitive_group_fails_naming_the_setting(monkeypatch):
    from review_trainer.data import scan
    from review_trainer.contract.errors import HyperparameterError
    from review_trainer.insights.reports import MAX_FACET_VALUES, check_settings

    class OneHost:
        is_chief, num_workers = True, 1

        def sum_over_workers(self, values):
            return np.asarray(values)

    check_settings(hyperparameters(), scanned_train([f"v{i}" for i in range(MAX_FACET_VALUES)]), OneHost(), print)
    with pytest.raises(HyperparameterError, match=rf"bias_facet product_category has {MAX_FACET_VALUES + 1} values in "
                                                  r"the train channel, .* name the sensitive group with bias_facet_values"):
        check_settings(hyperparameters(), scanned_train([f"v{i}" for i in range(MAX_FACET_VALUES + 1)]), OneHost(),
                       print)
    monkeypatch.setattr(scan, "MAX_DISTINCT_VALUES", 10)  # an ID-like column: values beyond the count's bound
    with pytest.raises(HyperparameterError, match=r"has 10\+ values"):
        check_settings(hyperparameters(), scanned_train([f"id{i}" for i in range(11)]), OneHost(), print)
    # With the sensitive group named, any number of other values is fine
    check_settings(hyperparameters(bias_facet_values="id3"), scanned_train([f"id{i}" for i in range(11)]),
                   OneHost(), print)
    # Pipe mode: no scan, no sample; said, and no check
    lines = []
    check_settings(hyperparameters(), streamed_train(), OneHost(), lines.append)
    assert lines == ["bias report skipped: the train channel is in Pipe mode (read once and not scanned)"]


def test_the_probability_function_cuts_batches_to_a_length_bucket_and_pads_them_to_a_row_bucket(distilbert_dir, monkeypatch):
    import keras
    from review_trainer.insights import reports
    from review_trainer.model import inference
    from review_trainer.model.classifier import build_classifier
    from review_trainer.model.pretrained import load_backbone

    tokenizer = ReviewTokenizer(open_checkpoint(distilbert_dir), 32)
    model = build_classifier(load_backbone(open_checkpoint(distilbert_dir)), 5, 32)
    shapes, compiled = [], inference.compiled_inference

    def recording(model, outputs):
        forward = compiled(model, outputs)
        return lambda features: shapes.append(features["token_ids"].shape) or forward(features)

    monkeypatch.setattr(inference, "compiled_inference", recording)
    texts = [f"review {i} " + "good " * (i % 9) for i in range(70)] + ["long " * 40]
    probabilities = reports.probability_function(model, tokenizer)(texts)
    ids, mask = tokenizer(texts)  # the full max_seq_length input, as served
    logits = model({"token_ids": ids, "padding_mask": mask}, training=False)
    np.testing.assert_allclose(probabilities, keras.ops.convert_to_numpy(keras.ops.softmax(logits)), atol=1e-5,
                               equal_nan=False)
    # The first batch: 64 rows, its longest review (10 words) fits the 16-token bucket; the last: 7
    # reviews padded to the 8-row bucket, the 40-word one among them taking all 32 tokens
    assert shapes == [(64, 16), (8, 32)]


class FakeClock:
    """Time that passes only when a test says so: a model call "takes" what the test gives it."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def model(self, seconds_per_call):
        """A predict_proba whose n-th call takes seconds_per_call(n) on this clock."""
        calls = []

        def predict_proba(texts):
            self.now += seconds_per_call(len(calls))
            calls.append(len(texts))
            return np.tile([0.1, 0.2, 0.3, 0.2, 0.2], (len(texts), 1))

        return predict_proba


def test_explanations_stop_at_their_time_budget_after_a_whole_review(tmp_path):
    from review_trainer.insights import reports

    assert reports.explain_budget("auto", 1000.0) == (40.0, "auto: 4% of the job's 1000 s, at least 15 s")
    assert reports.explain_budget("auto", 100.0)[0] == 15.0
    assert reports.explain_budget(90, 400.0) == (90.0, "explain_max_seconds")

    clock = FakeClock()
    slow = clock.model(lambda call: 0.1)  # 0.1 s a call: a review of three words takes a few calls
    lines, texts = [], [f"review number {i}" for i in range(20)]
    reports.write_explanations(texts, slow, tuple("12345"), str(tmp_path), lines.append, budget=(0.5, "test"),
                               clock=clock)
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
    reports.write_explanations(texts[:3], slow, tuple("12345"), str(tmp_path), lines.append, budget=(600, "test"),
                               clock=clock)
    with open(tmp_path / "explanations" / "summary.json") as f:
        summary = json.load(f)
    assert summary["reviews"] == 3 and summary["cut_short_by_budget"] is False


def test_the_explainers_warm_up_is_not_taken_for_a_reviews_time(tmp_path):
    from review_trainer.insights import reports

    clock = FakeClock()
    compiling_first = clock.model(lambda call: 2.0 if call == 0 else 0.01)  # the first call compiles (2 s)
    texts = [f"review number {i}" for i in range(10)]
    reports.write_explanations(texts, compiling_first, tuple("12345"), str(tmp_path), print, budget=(4.0, "test"),
                               clock=clock)
    with open(tmp_path / "explanations" / "summary.json") as f:
        summary = json.load(f)
    # Taken for the first review's time, the 2 s would predict that a second review ends past 4 s
    assert summary["reviews"] == 10 and summary["cut_short_by_budget"] is False


def test_an_error_before_the_explanations_begin_is_written_down_and_not_raised(tmp_path):
    from review_trainer import data
    from review_trainer.insights import reports

    from review_trainer.contract.hyperparameters import Hyperparameters
    from review_trainer.data.channels import ScannedChannel

    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test.tsv").write_bytes(amazon_tsv(make_reviews(4)))
    spec = data.RowSpec("review_body", "star_rating", tuple("12345"), 16)
    test = ScannedChannel("test", False, data.scan_channel("test", str(tmp_path / "test"), spec, 0.0))
    lines = []
    reports.run(Hyperparameters.from_dict({"explain_samples": "2"}), SimpleNamespace(train=None, test=test),
                model=None, tokenizer=None, test_predictions=None, out_dir=str(tmp_path / "out"), job_seconds=100.0,
                print_fn=lines.append)
    assert lines == ["explanations failed (the model is published): AttributeError: 'NoneType' object has no "
                     "attribute 'max_seq_length'"]
    with open(tmp_path / "out" / "explanations" / "summary.json") as f:
        assert json.load(f)["error"] == "AttributeError: 'NoneType' object has no attribute 'max_seq_length'"


def test_a_stop_signal_in_step_7_is_raised_not_written_down(tmp_path):
    from review_trainer.insights import reports
    from review_trainer.contract.errors import JobStopped
    from review_trainer.training.stopping import StopSignal

    def stopped(texts):
        raise JobStopped("the job received SIGTERM", 143)

    with pytest.raises(JobStopped, match="SIGTERM"):
        reports.write_explanations(["a short review"], stopped, tuple("12345"), str(tmp_path))
    # A signal that a library swallowed (smclarify catches every exception, per metric) still
    # stops the job once the phase it arrived in is over
    signal = StopSignal()
    signal.received = "SIGTERM"
    with pytest.raises(JobStopped, match="SIGTERM during the explanations and bias report"):
        reports.run(hyperparameters(), scanned_train(["Books", "Toys"]), None, None, None, str(tmp_path), 100.0,
                    stop_signal=signal, print_fn=print)
