"""Word attributions for the model's predictions, computed in the job the way SageMaker Clarify
explains text: SHAP values of the units of the text ("token" granularity) for the predicted class.

Clarify explains text in a separate processing job with Kernel SHAP: it cuts a review into units,
replaces some of them with a baseline string, and asks the endpoint for each such version of the
review. Here the job explains a sample of reviews itself, with the `shap` library: its text masker
hides words of the review, and the Partition explainer computes Owen values: Shapley values that
respect the masker's hierarchy of the words (neighbouring words join into phrases, phrases into
clauses), far cheaper to compute exactly. Both share out the same game, "the model's probability
given only these words"; for a model additive in the words both give each word its own weight.

    explain(texts, predict_proba, class_names)  one record per review: the predicted class, its
        probability, the words and their attributions toward it, and the base value (the model's
        probability of that class for the review with every word hidden)
    summarize(records)  the words that weigh most over the sample
    write(records, summary, out_dir)  explanations.jsonl, summary.json, explanations.html

Words. `TOKEN` is a regex: a run of letters and digits, apostrophes inside it included ("don't",
"isn't": a negation is one word), or a run of punctuation ("!!!", "?!", ":)"). Punctuation are
tokens of their own as in Clarify's token granularity (spaCy's tokens), since "!!!" sways a
sentiment model too; the regex needs no language model, and every token is a readable word, where
the model's own WordPiece tokens would split "unwatchable" into pieces.

Hiding. A hidden word is removed (mask_token ""), so the model reads the review without it and the
base value is its probability for an empty review: that asks nothing of the model's vocabulary,
where a placeholder such as "[MASK]" or "..." would be words the model reads too.

Cost. Exact Owen values take up to M * (M - 1) model evaluations for M words (and punctuation
marks), e.g. 348 for 20. `max_evals` (default 500, shap's own default for this explainer) bounds
each review, the empty and the whole review included: up to about 22 words are explained exactly;
in a longer review the phrases that change the probability most are split first, and what a phrase
left unsplit contributes is shared evenly among its words. The attributions always add up to the
probability minus the base value.
"""

import html
import json
import math
import os
import re
import time
from collections import defaultdict

import numpy as np
from review_trainer.contract.errors import JobStopped
from review_trainer.contract.files import write_json

TOKEN = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+")
DEFAULT_MAX_EVALS = 500  # per review: see the module docstring
DEFAULT_BATCH_SIZE = 64  # masked texts per predict_proba call, at most
POSITIVE, NEGATIVE = (0, 150, 0), (210, 0, 0)  # green: toward the predicted class; red: against


def tokenize(text, return_offsets_mapping=True):
    """The words of `text` in the form shap.maskers.Text takes from a tokenizer (that of
    Hugging Face's tokenizers): input_ids (here the words themselves) and their offsets."""
    matches = list(TOKEN.finditer(text))
    tokens = {"input_ids": [match.group() for match in matches]}
    if return_offsets_mapping:
        tokens["offset_mapping"] = [match.span() for match in matches]
    return tokens


class _CountedModel:
    """predict_proba as shap calls it (an array of strings), checked and counted."""

    def __init__(self, predict_proba, classes):
        self.predict_proba, self.classes, self.evaluations = predict_proba, classes, 0

    def __call__(self, texts):
        texts = [str(text) for text in texts]
        probabilities = np.asarray(self.predict_proba(texts), dtype=np.float64)
        if probabilities.shape != (len(texts), self.classes):
            raise ValueError(f"predict_proba returned shape {probabilities.shape} for {len(texts)} "
                             f"texts and {self.classes} classes")
        self.evaluations += len(texts)
        return probabilities


class _TextExplainer:
    """shap's Partition explainer over predict_proba with the text masker: explainer(text) -> the
    review's record. Built once: it imports shap and warms up on a two-word text, which compiles
    shap's numba functions (about 6 s on a CPU, once a process) and the model's smallest batch
    shape, so that the first review does not pay for them."""

    def __init__(self, predict_proba, class_names, max_evals, batch_size, mask_token):
        import shap  # imported here: a job that explains nothing does not pay for importing it

        self.class_names, self.max_evals, self.batch_size = class_names, max_evals, batch_size
        self.mask_token = mask_token
        self.model = _CountedModel(predict_proba, len(class_names))
        masker = shap.maskers.Text(tokenize, mask_token="...", collapse_mask_token=True)
        # The masker looks up an id for its mask token when built, and "" has none; in string output
        # it uses only the string.
        masker.mask_token = mask_token
        self.explainer = shap.Explainer(self.model, masker, output_names=list(class_names), algorithm="partition")
        self._shap_values("warm up")

    def _shap_values(self, text):
        # shap breaks ties between phrases with np.random: seeded, for the same explanation every
        # time, and the job's random state left as it was
        state = np.random.get_state()
        np.random.seed(0)
        try:
            explanation = self.explainer([text], max_evals=self.max_evals, batch_size=self.batch_size, silent=True)[0]
        finally:
            np.random.set_state(state)
        return np.asarray(explanation.values), np.asarray(explanation.base_values)

    def __call__(self, text):
        text = "" if text is None else str(text)
        before = self.model.evaluations
        words = tokenize(text)["input_ids"]
        if len(words) < 2:
            # The explainer's word hierarchy needs two words. One word's Shapley value is the whole
            # change, f(text) - f(nothing); no word, nothing to share.
            base, full = self.model([self.mask_token.strip(), text])
            values = np.tile(full - base, (len(words), 1))
        else:
            values, base = self._shap_values(text)
            full = base + values.sum(axis=0)  # Owen values are efficient: they add up to f(text)
        label = int(np.argmax(full))
        return {
            "text": text,
            "label": self.class_names[label],
            "probability": float(full[label]),
            "base_value": float(base[label]),
            "words": words,
            "attributions": [float(value) for value in values[:, label]],
            "evaluations": self.model.evaluations - before,
        }


def explain(texts, predict_proba, class_names, max_evals=DEFAULT_MAX_EVALS,
            batch_size=DEFAULT_BATCH_SIZE, mask_token=""):
    """One record per review: text, label (the predicted class, argmax of the probabilities),
    probability, base_value, words, attributions (toward the predicted class, one per word; they sum
    to probability - base_value) and evaluations (the texts predict_proba was asked for).
    predict_proba(list[str]) -> array [n, len(class_names)] of the classes' probabilities."""
    explainer = _TextExplainer(predict_proba, class_names, max_evals, batch_size, mask_token)
    return [explainer(text) for text in texts]


def explain_safely(texts, predict_proba, class_names, max_evals=DEFAULT_MAX_EVALS,
                   batch_size=DEFAULT_BATCH_SIZE, mask_token="", deadline=None, clock=time.monotonic):
    """explain() that never raises: (the records, None), or (the records done before a failure, the
    error's text) for the job to log and to write into its report. deadline: a time.monotonic() by
    which the explanations should end: after the warm-up and the first review (always explained),
    no review is begun that would end after it, going by the fastest review so far; fewer records than
    texts then, and no error. A stop signal (JobStopped) is not an error of theirs: it is raised.
    clock: what the deadline is a time of (a test drives its own)."""
    records, texts, fastest = [], list(texts), float("inf")
    try:
        explainer = _TextExplainer(predict_proba, class_names, max_evals, batch_size, mask_token)
        for text in texts:
            began = clock()
            records.append(explainer(text))
            ended = clock()
            # The fastest review so far predicts the next: a review that met a new batch shape
            # also paid for its compilation, once
            fastest = min(fastest, ended - began)
            if deadline is not None and ended + fastest > deadline:
                break
    except JobStopped:
        raise
    except Exception as error:  # noqa: BLE001 - explanations must not fail the training job
        return records, (f"explanations stopped after {len(records)} of {len(texts)} reviews: "
                         f"{type(error).__name__}: {error}")
    return records, None


def summarize(records, top_k=20, min_count=2):
    """The words that weigh most over the sample, lower-cased, each occurrence's attribution taken
    toward its review's predicted class:

        top_words       ranked by mean |attribution| (Clarify's default global aggregation,
                        agg_method mean_abs): the words that move predictions most, either way
        top_words_by_class  for each class, over the reviews predicted as it, ranked by mean
                        attribution: the words that push hardest toward that class

    Means, not sums, so that a frequent word is not ranked by its frequency; a word seen fewer than
    min_count times is left out of the rankings (one occurrence is an anecdote) but counted."""
    occurrences, by_class = defaultdict(list), defaultdict(lambda: defaultdict(list))
    for record in records:
        for word, value in zip(record["words"], record["attributions"]):
            occurrences[word.lower()].append(value)
            by_class[record["label"]][word.lower()].append(value)

    def ranked(table, statistic):
        rows = [{"word": word, "mean_attribution": float(np.mean(values)),
                 "mean_abs_attribution": float(np.mean(np.abs(values))), "count": len(values)}
                for word, values in table.items() if len(values) >= min_count]
        return sorted(rows, key=lambda row: (-row[statistic], -row["count"], row["word"]))[:top_k]

    labels = [record["label"] for record in records]
    return {
        "reviews": len(records),
        "reviews_by_class": {label: labels.count(label) for label in sorted(set(labels))},
        "words": sum(len(values) for values in occurrences.values()),
        "distinct_words": len(occurrences),
        "evaluations": sum(record.get("evaluations", 0) for record in records),
        "min_count": min_count,
        "top_words": ranked(occurrences, "mean_abs_attribution"),
        "top_words_by_class": {label: ranked(table, "mean_attribution") for label, table in sorted(by_class.items())},
    }


def _colour(value, scale):
    red, green, blue = POSITIVE if value >= 0 else NEGATIVE
    alpha = 0.0 if scale == 0 or not math.isfinite(value) else min(1.0, abs(value) / scale)
    return f"rgba({red},{green},{blue},{alpha:.2f})"


def _highlighted(record):
    """The review's text, each word on a background for its attribution (scaled to the review's
    largest), the value in its tooltip; the text between words kept as written."""
    text, values = record["text"], record["attributions"]
    scale = max((abs(value) for value in values if math.isfinite(value)), default=0.0)
    spans = tokenize(text)["offset_mapping"]
    parts, position = [], 0
    for (start, end), value in zip(spans, values):
        parts.append(html.escape(text[position:start]))
        parts.append(f'<span style="background:{_colour(value, scale)}" title="{value:+.4f}">'
                     f"{html.escape(text[start:end])}</span>")
        position = end
    parts.append(html.escape(text[position:]))
    return "".join(parts)


def _table(rows, statistic):
    cells = "".join(f"<tr><td>{html.escape(row['word'])}</td><td>{row[statistic]:+.4f}</td>"
                    f"<td>{row['count']}</td></tr>" for row in rows)
    return f"<table><tr><th>word</th><th>{statistic}</th><th>count</th></tr>{cells}</table>"


def write(records, summary, out_dir, error=None):
    """out_dir/explanations.jsonl (a record a line), summary.json (with the error, if any) and
    explanations.html (one page, no external assets or scripts)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "explanations.jsonl"), "w", encoding="utf-8") as file:
        file.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    write_json({**summary, "error": error}, os.path.join(out_dir, "summary.json"))
    reviews = "".join(
        f"<div class=review><p class=meta>{html.escape(str(record['label']))} "
        f"p={record['probability']:.3f} (base {record['base_value']:.3f})</p>"
        f"<p>{_highlighted(record)}</p></div>" for record in records)
    by_class = "".join(f"<h3>Toward {html.escape(str(label))}</h3>{_table(rows, 'mean_attribution')}"
                       for label, rows in summary.get("top_words_by_class", {}).items())
    problem = f"<p class=error>{html.escape(error)}</p>" if error else ""
    with open(os.path.join(out_dir, "explanations.html"), "w", encoding="utf-8") as file:
        file.write(f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>Word attributions</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:auto}} .review{{border-bottom:1px solid #ddd}}
.meta{{color:#555;font-size:90%}} .error{{color:#b00}} td,th{{padding:0 1em;text-align:left}}</style></head>
<body><h1>Word attributions</h1>{problem}<p>Each word's background: green toward the predicted class,
red against it, stronger for a larger SHAP value (relative to the review's largest; the value in
its tooltip). {summary.get('reviews', len(records))} reviews.</p>
<h2>Top words</h2>{_table(summary.get('top_words', []), 'mean_abs_attribution')}{by_class}
<h2>Reviews</h2>{reviews}</body></html>
""")
