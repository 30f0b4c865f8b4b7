"""`predict`: a finished model's star ratings for reviews in the files users have, as JSON Lines.

The command runs in the test's own process (its `main`, stdin and stdout captured), which loads no
interpreter and TensorFlow of its own; one test runs the console script as users do."""

import gzip
import io
import json
import os
import re
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import amazon_tsv

PREDICT = os.path.join(os.path.dirname(sys.executable), "predict")
SAMPLES = ["This is great!", "This is OK.", "This is terrible."]


@pytest.fixture
def predict(monkeypatch, capsys):
    """predict(*arguments, stdin=text) -> (exit code, the JSON lines read back, stderr)."""
    from review_trainer.cli import predict as command

    def run(*args, stdin=""):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
        capsys.readouterr()
        exit_code = command.main(list(args))
        captured = capsys.readouterr()
        return exit_code, [json.loads(line) for line in captured.out.splitlines()], captured.err

    return run


def test_predictions_are_those_the_job_printed_for_its_sample_reviews(distilbert_job, predict):
    base, job = distilbert_job
    exit_code, results, stderr = predict("--model", os.path.join(base, "model"), stdin="\n".join(SAMPLES) + "\n")
    assert exit_code == 0, stderr
    printed = re.findall(r"sample_prediction label=(\d) confidence=(\S+) text=", job.stdout)
    assert [r["label"] for r in results] == [label for label, _ in printed]
    assert [max(r["probabilities"].values()) for r in results] == pytest.approx(
        [float(confidence) for _, confidence in printed], abs=1.5e-3)
    assert all(sorted(r["probabilities"]) == ["1", "2", "3", "4", "5"] for r in results)
    assert all(sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-5) for r in results)


def test_on_the_test_channel_its_accuracy_is_the_jobs_evaluation(distilbert_job, tmp_path, predict):
    base, _ = distilbert_job
    with gzip.open(os.path.join(base, "input", "data", "test", "test.tsv.gz"), "rt") as f:
        tsv = f.read()
    (tmp_path / "test.tsv").write_text(tsv)
    exit_code, results, stderr = predict("--model", os.path.join(base, "model"), str(tmp_path / "test.tsv"))
    assert exit_code == 0, stderr
    header, *rows = [line.split("\t") for line in tsv.splitlines()]
    truth = [row[header.index("star_rating")] for row in rows]
    with open(os.path.join(base, "output", "data", "evaluation.json")) as f:
        accuracy = json.load(f)["multiclass_classification_metrics"]["accuracy"]["value"]
    assert len(results) == 30
    assert sum(r["label"] == t for r, t in zip(results, truth)) / 30 == pytest.approx(accuracy, abs=1e-9)


def test_every_format_the_job_trains_on_and_a_model_tar_gz_give_the_same_predictions(distilbert_job, tmp_path, predict):
    """predict reads through the job's own readers: every training format, gzip and Parquet
    included, the label column not needed; plain text a review a line."""
    base, _ = distilbert_job
    model = os.path.join(base, "model")
    buffer = io.BytesIO()
    pq.write_table(pa.table({"review_id": ["a", "b", "c"], "review_body": SAMPLES}), buffer)  # no label
    files = {
        "reviews.txt": ("\n".join(SAMPLES) + "\n").encode(),
        "reviews.csv": ("\ufeffreview_body,star_rating\n" + "".join(f'"{t}",5\n' for t in SAMPLES)).encode(),
        "reviews.jsonl": "".join(json.dumps({"review_body": t, "stars": 1}) + "\n" for t in SAMPLES).encode(),
        "reviews.tsv": amazon_tsv([(t, 3) for t in SAMPLES]),
        "reviews.tsv.gz": gzip.compress(amazon_tsv([(t, 3) for t in SAMPLES])),
        "reviews.parquet": buffer.getvalue(),
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    _, expected, _ = predict("--model", model, stdin="\n".join(SAMPLES))
    exit_code, results, stderr = predict("--model", model, *(str(tmp_path / name) for name in files))
    assert exit_code == 0, stderr
    assert [results[i:i + 3] for i in range(0, len(results), 3)] == [expected] * len(files)
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # SageMaker's layout: the folder's entries at the top
        for entry in os.listdir(model):
            tar.add(os.path.join(model, entry), arcname=entry)
    exit_code, results, stderr = predict("--model", str(archive), str(tmp_path / "reviews.txt"), str(tmp_path / "reviews.csv"))
    assert exit_code == 0 and results == expected + expected, stderr


@pytest.mark.parametrize("case, expected", [
    ("no model", "predict: --model {tmp}/nowhere: no such model folder or model.tar.gz"),
    ("not a model", "predict: {tmp} is not a model folder of this job: it lacks tensorflow/saved_model/0, tokenizer, "
                    "label_map.json"),
    ("json without the column", "predict: {tmp}/bad.jsonl, line 2: no 'review_body' in the JSON object"),
    ("missing file", "predict: {tmp}/missing.txt: cannot be read (No such file or directory)"),
    ("short tsv row", "predict: {tmp}/short.tsv, line 3: 1 tab-separated field(s), where the header has 2"),
    ("latin-1 stdin", "predict: stdin, line 1: not UTF-8 text"),
    ("tfrecord", "predict: {tmp}/records.tfrecord: a TFRecord file holds token ids, not the reviews' text"),
])
def test_bad_input_fails_with_a_clear_message_and_exit_code_2(distilbert_job, tmp_path, case, expected, monkeypatch,
                                                             capsys):
    from review_trainer.cli import predict as command
    from test_data import tfrecord_bytes

    model = os.path.join(distilbert_job[0], "model")
    (tmp_path / "bad.jsonl").write_text('{"review_body": "fine"}\n{"text": "no column"}\n')
    (tmp_path / "short.tsv").write_text("star_rating\treview_body\n5\tfine\n4\n")
    (tmp_path / "records.tfrecord").write_bytes(tfrecord_bytes(tmp_path, [([2] * 16, [1] * 16, 1)]))
    args = {"no model": ["--model", str(tmp_path / "nowhere")], "not a model": ["--model", str(tmp_path)],
            "json without the column": ["--model", model, str(tmp_path / "bad.jsonl")],
            "missing file": ["--model", model, str(tmp_path / "missing.txt")],
            "short tsv row": ["--model", model, str(tmp_path / "short.tsv")],
            "latin-1 stdin": ["--model", model],
            "tfrecord": ["--model", model, str(tmp_path / "records.tfrecord")]}[case]
    stdin = "café\n".encode("latin-1") if case == "latin-1 stdin" else b"fine\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    exit_code = command.main(args)  # in this process: each case fails before any model is loaded
    captured = capsys.readouterr()
    assert exit_code == 2 and captured.out == ""
    assert captured.err.strip().startswith(expected.format(tmp=tmp_path)), captured.err


def test_the_console_script_predicts_and_exits_with_2_on_bad_input(distilbert_job, tmp_path):
    model = os.path.join(distilbert_job[0], "model")
    result = subprocess.run([PREDICT, "--model", model], input="This is great!\n", capture_output=True, text=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    [line] = result.stdout.splitlines()
    assert sorted(json.loads(line)["probabilities"]) == ["1", "2", "3", "4", "5"]
    result = subprocess.run([PREDICT, "--model", str(tmp_path / "nowhere")], input="fine\n", capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"predict: --model {tmp_path}/nowhere: no such model folder")


def test_saved_model_cli_shows_and_runs_the_serving_signature(distilbert_job, tmp_path, predict):
    import numpy as np
    from review_trainer.cli.predict import load_tokenizer

    model = os.path.join(distilbert_job[0], "model")
    saved_model = os.path.join(model, "tensorflow", "saved_model", "0")
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    shown = subprocess.run([cli, "show", "--dir", saved_model, "--tag_set", "serve", "--signature_def",
                            "serving_default"], capture_output=True, text=True, env=env).stdout
    for name in ("input_ids", "input_mask"):
        assert re.search(rf"inputs\['{name}'\] tensor_info:\s+dtype: DT_INT32\s+shape: \(-1, 16\)", shown), shown
    assert re.search(r"outputs\['probabilities'\] tensor_info:\s+dtype: DT_FLOAT\s+shape: \(-1, 5\)", shown), shown
    ids, mask = load_tokenizer(model)(SAMPLES)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "mask.npy", mask)
    ran = subprocess.run([cli, "run", "--dir", saved_model, "--tag_set", "serve", "--signature_def", "serving_default",
                          "--inputs", f"input_ids={tmp_path}/ids.npy;input_mask={tmp_path}/mask.npy"],
                         capture_output=True, text=True, env=env)
    assert ran.returncode == 0, ran.stderr[-2000:]
    printed = ran.stdout.split("Result for output key probabilities:")[1]
    probabilities = np.array([[float(v) for v in row.split()] for row in re.findall(r"\[([^\[\]]+)\]", printed)])
    _, expected, _ = predict("--model", model, stdin="\n".join(SAMPLES))
    assert probabilities.shape == (3, 5)
    for row, result in zip(probabilities, expected):
        assert row.tolist() == pytest.approx([result["probabilities"][label] for label in "12345"], abs=2e-6)


def test_the_tf_serving_request_body_of_the_example_gives_the_jobs_evaluation(distilbert_job, distilbert_dir, predict):
    import numpy as np
    import tensorflow as tf
    from review_trainer.model.pretrained import ReviewTokenizer, open_checkpoint

    base, _ = distilbert_job
    model = os.path.join(base, "model")
    with gzip.open(os.path.join(base, "input", "data", "test", "test.tsv.gz"), "rt") as f:
        header, *rows = [line.split("\t") for line in f.read().splitlines()]
    texts = [row[header.index("review_body")] for row in rows]
    stars = [int(row[header.index("star_rating")]) for row in rows]
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "serving_request.py")
    made = subprocess.run([sys.executable, script, "--model", model], input="\n".join(texts), capture_output=True,
                          text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert made.returncode == 0, made.stderr[-2000:]
    body = json.loads(made.stdout)
    assert body["signature_name"] == "serving_default" and len(body["instances"]) == len(texts) == 30
    # The client's token ids are the job's: the pretrained folder's tokenizer at the job's length.
    ids, mask = ReviewTokenizer(open_checkpoint(distilbert_dir), 16)(texts)
    assert [instance["input_ids"] for instance in body["instances"]] == ids.tolist()
    assert [instance["input_mask"] for instance in body["instances"]] == mask.tolist()
    # What TF Serving does with the body: the instances' columns as the signature's tensors.
    serve = tf.saved_model.load(os.path.join(model, "tensorflow", "saved_model", "0")).signatures["serving_default"]
    columns = {name: tf.constant([instance[name] for instance in body["instances"]], tf.int32)
               for name in ("input_ids", "input_mask")}
    probabilities = serve(**columns)["probabilities"].numpy()
    with open(os.path.join(base, "output", "data", "evaluation.json")) as f:
        accuracy = json.load(f)["multiclass_classification_metrics"]["accuracy"]["value"]
    assert np.mean(probabilities.argmax(1) + 1 == np.array(stars)) == pytest.approx(accuracy, abs=1e-9)
    _, expected, _ = predict("--model", model, stdin="\n".join(texts))
    assert np.allclose(probabilities, [[r["probabilities"][label] for label in "12345"] for r in expected], atol=2e-6)


def test_a_review_is_cut_only_at_line_ends_not_at_a_form_feed_or_a_unicode_line_separator():
    from review_trainer.data import read_texts

    assert read_texts("good\x0cmovie\r\nbad\u2028film\n".encode(), "x", "review_body") == ["good\x0cmovie",
                                                                                          "bad\u2028film"]
    jsonl = json.dumps({"review_body": "one\u2028two"}, ensure_ascii=False) + "\n"
    assert read_texts(jsonl.encode(), "x", "review_body") == ["one\u2028two"]
