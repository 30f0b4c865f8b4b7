"""Word attributions (explanations.py) checked against a model that is additive in the words: for it
the Shapley (and Owen) value of each word is its own weight, whatever the explainer's order of
work, so every expected value below is worked out by hand. Also the tokenizer, the summary's
rankings, the files written and the failures kept out of the job."""

import html
import json
import re

import numpy as np
import pytest
from review_trainer.insights import explanations
from review_trainer.insights.explanations import explain, explain_safely, summarize, tokenize, write

CLASSES = ["negative", "positive"]
WEIGHTS = {"great": 0.2, "awful": -0.3, "!": 0.05, "but": -0.02, "good": 0.1, "bad": -0.15, "don't": -0.04}


def words(text):  # the test model's words: split independently of the module's tokenizer
    return re.findall(r"[\w']+|[^\w\s]+", text)


def additive(weights, calls=None, seen=None):
    """p(positive) = 0.5 + the weights of the words present (each occurrence), p(negative) its
    complement."""
    def predict_proba(texts):
        assert isinstance(texts, list) and all(isinstance(text, str) for text in texts)
        if calls is not None:
            calls.append(len(texts))
        if seen is not None:
            seen.extend(texts)
        positive = np.array([0.5 + sum(weights.get(word.lower(), 0.0) for word in words(text))
                             for text in texts])
        assert np.all((positive > 0.05) & (positive < 0.95)), "the test's weights leave the additive range"
        return np.stack([1 - positive, positive], axis=1)
    return predict_proba


def test_tokenizer_words_and_punctuation():
    text = "Don't buy it!!! Worst...ever :) 10/10, café"
    tokens = tokenize(text)
    assert tokens["input_ids"] == ["Don't", "buy", "it", "!!!", "Worst", "...", "ever", ":)", "10", "/", "10", ",",
                                   "café"]
    assert [text[start:end] for start, end in tokens["offset_mapping"]] == tokens["input_ids"]
    assert tokenize("   ")["input_ids"] == []


def test_attributions_are_the_weights_toward_the_predicted_class():
    text = "Great acting, but the plot was awful!"
    seen = []
    [record] = explain([text], additive(WEIGHTS, seen=seen), CLASSES)
    # hidden words are removed, no placeholder: the base value is the model's on an empty review
    seen = seen[max(i for i, masked in enumerate(seen) if "up" in words(masked)) + 1:]  # after the warm-up on "warm up"
    assert "" in seen and {word for masked in seen for word in words(masked)} == set(words(text))
    # p(positive) = 0.5 + 0.2 - 0.02 - 0.3 + 0.05 = 0.43: negative is predicted, with 0.57
    assert record["label"] == "negative"
    assert record["probability"] == pytest.approx(0.57, abs=1e-9)
    assert record["base_value"] == pytest.approx(0.5, abs=1e-9)
    assert record["words"] == ["Great", "acting", ",", "but", "the", "plot", "was", "awful", "!"]
    # toward negative: each word's weight with its sign turned; words outside the table get 0
    expected = [-0.2, 0, 0, 0.02, 0, 0, 0, 0.3, -0.05]
    assert record["attributions"] == pytest.approx(expected, abs=1e-9)
    assert sum(record["attributions"]) == pytest.approx(record["probability"] - record["base_value"], abs=1e-9)
    assert record["text"] == text and 0 < record["evaluations"] <= explanations.DEFAULT_MAX_EVALS


def test_positive_review_repeated_words_and_contractions():
    [record] = explain(["good, good... bad? Don't worry: GOOD!"], additive(WEIGHTS), CLASSES)
    # 0.5 + 3 x 0.1 - 0.15 - 0.04 + 0.05 = 0.66
    assert record["label"] == "positive" and record["probability"] == pytest.approx(0.66, abs=1e-9)
    assert record["words"] == ["good", ",", "good", "...", "bad", "?", "Don't", "worry", ":", "GOOD", "!"]
    assert record["attributions"] == pytest.approx([0.1, 0, 0.1, 0, -0.15, 0, -0.04, 0, 0, 0.1, 0.05], abs=1e-9)


def test_three_classes_take_the_predicted_column():
    # p_k = 1/3 + w_k(words): each word's weights sum to 0 over the classes, so the rows sum to 1
    weights = {"meh": (-0.1, 0.2, -0.1), "superb": (-0.1, -0.1, 0.2), "dire": (0.15, -0.05, -0.1)}

    def predict_proba(texts):
        rows = [np.full(3, 1 / 3) + sum((np.array(weights.get(word, (0, 0, 0))) for word in text.split()), np.zeros(3))
                for text in texts]
        return np.array(rows)

    [record] = explain(["meh superb meh dire plot"], predict_proba, ["bad", "middling", "good"])
    # middling: 1/3 + 0.2 - 0.1 + 0.2 - 0.05
    assert record["label"] == "middling" and record["probability"] == pytest.approx(1 / 3 + 0.25, abs=1e-9)
    assert record["base_value"] == pytest.approx(1 / 3, abs=1e-9)
    assert record["attributions"] == pytest.approx([0.2, -0.1, 0.2, -0.05, 0], abs=1e-9)


def test_one_word_and_no_word():
    one, empty = explain(["Awful", "  "], additive(WEIGHTS), CLASSES)
    assert one["label"] == "negative" and one["words"] == ["Awful"]
    assert one["attributions"] == pytest.approx([0.3], abs=1e-9) and one["probability"] == pytest.approx(0.8)
    assert empty["words"] == [] and empty["attributions"] == [] and empty["probability"] == pytest.approx(0.5)


def test_max_evals_bounds_a_long_review_and_keeps_the_sum():
    words = ("great plot but awful acting and a good score " * 5).split()
    calls = []
    np.random.seed(7)
    state = np.random.get_state()
    [record] = explain([" ".join(words)], additive(WEIGHTS, calls), CLASSES, max_evals=60, batch_size=16)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), state))  # the job's state kept
    assert explain([" ".join(words)], additive(WEIGHTS), CLASSES, max_evals=60, batch_size=16) == [record]
    warm_up = []  # the explainer's warm-up on a two-word text, before any review
    assert explain([], additive(WEIGHTS, warm_up), CLASSES, max_evals=60, batch_size=16) == [] and sum(warm_up) > 0
    # exact would take up to 45 x 44
    assert len(record["words"]) == 45 and record["evaluations"] == sum(calls) - sum(warm_up) <= 60
    assert max(calls) <= 16
    # 0.5 + 5 x (0.2 - 0.02 - 0.3 + 0.1) = 0.4: negative, with 0.6
    assert record["label"] == "negative" and record["probability"] == pytest.approx(0.6, abs=1e-9)
    assert sum(record["attributions"]) == pytest.approx(record["probability"] - record["base_value"], abs=1e-9)


def test_summary_ranks_by_mean_absolute_and_by_class_mean():
    records = [
        {"label": "positive", "words": ["Good", "film", "!"], "attributions": [0.3, 0.01, 0.15]},
        {"label": "positive", "words": ["good", "film", "dull", "!"], "attributions": [0.1, 0.03, -0.2, 0.15]},
        {"label": "negative", "words": ["dull", "film", "!", "rare"], "attributions": [0.4, -0.02, 0.15, 0.9]},
    ]
    summary = summarize(records, top_k=3, min_count=2)
    assert summary["reviews"] == 3 and summary["reviews_by_class"] == {"negative": 1, "positive": 2}
    assert summary["words"] == 11 and summary["distinct_words"] == 5
    # mean |a|: dull 0.3, good 0.2, ! 0.15, film 0.02; "rare" is seen once. (Sums would put ! before
    # good, signed means good before dull.)
    assert [row["word"] for row in summary["top_words"]] == ["dull", "good", "!"]
    assert summary["top_words"][0] == {"word": "dull", "mean_attribution": pytest.approx(0.1),
                                       "mean_abs_attribution": pytest.approx(0.3), "count": 2}
    # toward positive, over the positive reviews: good 0.2, ! 0.15, film 0.02 (dull seen once there)
    assert [row["word"] for row in summary["top_words_by_class"]["positive"]] == ["good", "!", "film"]
    assert summary["top_words_by_class"]["negative"] == []
    assert [row["word"] for row in summarize(records, min_count=1)["top_words"]][:2] == ["rare", "dull"]


def test_files_and_a_self_contained_escaped_page(tmp_path):
    text = "<script>alert('x')</script> great but awful & dull"
    records = explain([text, "good good"], additive(WEIGHTS), CLASSES)
    summary = summarize(records, min_count=1)
    write(records, summary, str(tmp_path))
    lines = (tmp_path / "explanations.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records
    assert json.loads((tmp_path / "summary.json").read_text())["top_words"] == summary["top_words"]
    page = (tmp_path / "explanations.html").read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    assert html.escape(text) in re.sub(r"</?span[^>]*>", "", page)  # every character of it, escaped
    assert not re.search(r"""(src|href)\s*=|@import|url\(|<link""", page, re.I)
    green = re.search(r'<span style="background:rgba\((\d+),(\d+),(\d+),([\d.]+)\)"[^>]*>great</span>', page)
    red = re.search(r'<span style="background:rgba\((\d+),(\d+),(\d+),([\d.]+)\)"[^>]*>awful</span>', page)
    # the first review is negative (0.5 + 0.2 - 0.02 - 0.3): awful is toward it, great against
    assert records[0]["label"] == "negative"
    assert red.groups()[:3] == ("0", "150", "0") and green.groups()[:3] == ("210", "0", "0")
    assert float(red.group(4)) == 1.0 and float(green.group(4)) == pytest.approx(0.2 / 0.3, abs=0.01)


def test_explain_safely_returns_the_error():
    def failing(texts):
        if any("boom" in text for text in texts):
            raise RuntimeError("device lost")
        return additive(WEIGHTS)(texts)

    records, error = explain_safely(["great film", "boom goes the film", "good"], failing, CLASSES)
    assert [record["text"] for record in records] == ["great film"]
    assert "RuntimeError: device lost" in error and "after 1 of 3" in error
    records, error = explain_safely(["great film"], lambda texts: np.ones((len(texts), 3)), CLASSES)
    assert records == [] and "shape" in error
    assert explain_safely(["great"], additive(WEIGHTS), CLASSES) == (explain(["great"], additive(WEIGHTS), CLASSES),
                                                                    None)


def test_cost_of_a_twenty_word_review():
    text = "The acting was great but the plot was awful and slow, though the score was good and the ending great!"
    assert len(tokenize(text)["input_ids"]) == 22
    weights = {"great": 0.1, "awful": -0.12, "good": 0.05, "slow": -0.03, "!": 0.02, "but": -0.01}
    calls = []
    [record] = explain([text], additive(weights, calls), CLASSES)
    warm_up = []  # the explainer's warm-up on a two-word text, before any review
    explain([], additive(weights, warm_up), CLASSES)
    assert record["evaluations"] == sum(calls) - sum(warm_up) <= explanations.DEFAULT_MAX_EVALS
    expected = [weights.get(word.lower(), 0.0) for word in record["words"]]
    assert record["attributions"] == pytest.approx(expected, abs=1e-9)  # exact within the default budget
