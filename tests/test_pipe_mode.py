"""Pipe mode: channels streamed through FIFOs `<channel>_<pass>`, written once each by another
thread the way SageMaker's agent writes them, with RecordWrapperType RecordIO or None."""

import io
import json
import os
import re
import shutil
import struct
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (FAST_HYPERPARAMETERS, amazon_tsv, gzipped, make_opt_ml, make_reviews, read_failure,
                      run_until_held_then_signal, train_in_process)
from review_trainer import data
from review_trainer.data import pipe
from review_trainer.contract.errors import DataError
from test_data import tfrecord_bytes

# pytest-xdist: the module's File-mode run, made once
pytestmark = pytest.mark.xdist_group("pipe")

SPEC = data.RowSpec("review_body", "star_rating", ("1", "2", "3", "4", "5"), 8)
MAGIC = struct.pack("<I", pipe.RECORDIO_MAGIC)


def recordio(objects, part_bytes=None):
    """SageMaker's RecordIO wrapping: one record per object; with part_bytes, multipart records
    (flag 1 for the first part, 2 for the middle ones, 3 for the last)."""
    out = bytearray()
    for content in objects:
        parts = [content[i:i + part_bytes] for i in range(0, len(content), part_bytes)] if part_bytes else [content]
        for index, part in enumerate(parts):
            flag = 0 if len(parts) == 1 else 1 if index == 0 else 3 if index == len(parts) - 1 else 2
            out += MAGIC + struct.pack("<I", flag << 29 | len(part)) + part + b"\0" * (-len(part) % 4)
    return bytes(out)


def wrapped(objects, wrapper):
    return recordio(objects) if wrapper == "RecordIO" else b"".join(objects)


class PipeWriter:
    """A channel's passes as SageMaker's agent delivers them, from a thread: FIFO n is made, written
    once and closed, then removed; only then is FIFO n + 1 made."""

    def __init__(self, prefix, passes):
        self.current, self.closing = None, False
        os.mkfifo(f"{prefix}_0")  # there when the job starts
        self.thread = threading.Thread(target=self._write, args=(prefix, passes), daemon=True)
        self.thread.start()

    def _write(self, prefix, passes):
        for index, content in enumerate(passes):
            path = self.current = f"{prefix}_{index}"
            if index:
                os.mkfifo(path)
            try:
                with open(path, "wb") as f:  # blocks until the job opens the FIFO
                    f.write(content)
            except BrokenPipeError:  # the reader left early
                pass
            finally:
                os.remove(path)
            if self.closing:
                return

    def close(self):
        """Ends the thread: a writer waiting for a reader that will not come is let go."""
        self.closing = True
        while self.thread.is_alive():
            try:
                os.close(os.open(self.current, os.O_RDONLY | os.O_NONBLOCK))
            except (FileNotFoundError, TypeError):
                pass
            self.thread.join(timeout=0.2)


def read(tmp_path, objects, wrapper, spec=SPEC):
    prefix = str(tmp_path / "train")
    writer = PipeWriter(prefix, [wrapped(objects, wrapper)])
    counts = pipe.PassCounts(prefix + "_0")
    try:
        return list(pipe.read_pass(pipe.Fifos("train", prefix, wrapper), 0, spec, counts)), counts
    finally:
        writer.close()


REVIEWS_A, REVIEWS_B = make_reviews(7, 1), make_reviews(5, 2)
EXPECTED_TABLE_ROWS = [(text, int(stars) - 1) for text, stars in REVIEWS_A + REVIEWS_B]


def table_objects(kind):
    if kind == "tsv":
        return [amazon_tsv(REVIEWS_A), amazon_tsv(REVIEWS_B)]
    if kind == "csv+bom+gzip":
        return [gzipped(("\ufeffreview_body,star_rating\n" + "".join(f'"{t}",{s}\n' for t, s in reviews)).encode())
                for reviews in (REVIEWS_A, REVIEWS_B)]
    if kind == "jsonl":
        return ["".join(json.dumps({"review_body": t, "star_rating": s}) + "\n" for t, s in reviews).encode()
                for reviews in (REVIEWS_A, REVIEWS_B)]
    raise ValueError(kind)


@pytest.mark.parametrize("wrapper", ["RecordIO", "None"])
@pytest.mark.parametrize("kind", ["tsv", "csv+bom+gzip", "jsonl"])
def test_tables_stream_with_their_rows_counted_and_repeated_headers_skipped(tmp_path, wrapper, kind):
    rows, counts = read(tmp_path, table_objects(kind), wrapper)
    assert rows == EXPECTED_TABLE_ROWS
    assert (counts.good_rows, sum(counts.bad_rows.values())) == (12, 0)
    assert counts.objects == (2 if wrapper == "RecordIO" else 1)


@pytest.mark.parametrize("wrapper", ["RecordIO", "None"])
def test_tfrecord_files_stream_as_token_ids(tmp_path, wrapper):
    examples = [([101, i, 102, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0], i % 5) for i in range(9)]
    # Each object is read on its own with RecordIO: one plain, one gzip. Without a wrapper the
    # stream is one: two gzip files concatenate into one gzip stream of two members.
    compressed = {"RecordIO": (False, True), "None": (True, True)}[wrapper]
    objects = [tfrecord_bytes(tmp_path, examples[:4], compressed=compressed[0]),
               tfrecord_bytes(tmp_path, examples[4:], compressed=compressed[1])]
    rows, counts = read(tmp_path, objects, wrapper)
    assert [(list(ids), list(mask), label) for ids, mask, label in rows] == examples
    assert counts.good_rows == 9


def test_a_multipart_recordio_record_reads_as_one_object(tmp_path):
    prefix = str(tmp_path / "train")
    content = amazon_tsv(REVIEWS_A)
    writer = PipeWriter(prefix, [recordio([content], part_bytes=37) + recordio([amazon_tsv(REVIEWS_B)])])
    try:
        counts = pipe.PassCounts(prefix + "_0")
        rows = list(pipe.read_pass(pipe.Fifos("train", prefix, "RecordIO"), 0, SPEC, counts))
    finally:
        writer.close()
    assert rows == EXPECTED_TABLE_ROWS and counts.objects == 2


def test_parquet_needs_recordio_and_reads_with_it(tmp_path):
    buffer = io.BytesIO()
    pq.write_table(pa.table({"review_body": [t for t, _ in REVIEWS_A], "star_rating": [s for _, s in REVIEWS_A]}), buffer)
    rows, _ = read(tmp_path, [buffer.getvalue()], "RecordIO")
    assert rows == EXPECTED_TABLE_ROWS[:7]
    shutil.rmtree(tmp_path)
    os.makedirs(tmp_path)
    with pytest.raises(DataError, match="Parquet in a Pipe-mode channel needs RecordWrapperType RecordIO"):
        read(tmp_path, [buffer.getvalue()], "None")


def test_bad_rows_are_counted_per_reason_and_bounded_at_the_end_of_the_pass(tmp_path):
    content = amazon_tsv(REVIEWS_A + [("", 3), ("fine", 9), ("nul\x00here", 2)])
    rows, counts = read(tmp_path, [content], "RecordIO")
    assert len(rows) == 7 and dict(counts.bad_rows) == {"empty_text": 1, "unknown_label": 1, "nul_byte": 1}
    counts.check("train", 0.5)
    with pytest.raises(DataError, match=r"3 of 10 rows are bad .* more than max_bad_row_fraction=0.2"):
        counts.check("train", 0.2)


@pytest.mark.parametrize("case", ["recordio record", "recordio header", "tfrecord", "gzip"])
def test_a_record_cut_short_in_the_pipe_is_a_data_error(tmp_path, case):
    tfrecords = tfrecord_bytes(tmp_path, [([1] * 8, [1] * 8, 1)] * 3)
    whole, wrapper = {
        "recordio record": (recordio([amazon_tsv(REVIEWS_A)]), "RecordIO"),
        "recordio header": (recordio([amazon_tsv(REVIEWS_A)]) + MAGIC, "RecordIO"),
        "tfrecord": (tfrecords, "None"),
        "gzip": (gzipped(amazon_tsv(REVIEWS_A)), "None"),
    }[case]
    cut = whole if case == "recordio header" else whole[:-9]
    prefix = str(tmp_path / "train")
    writer = PipeWriter(prefix, [cut])
    try:
        with pytest.raises(DataError, match=r"cut short"):
            list(pipe.read_pass(pipe.Fifos("train", prefix, wrapper), 0, SPEC, pipe.PassCounts(prefix + "_0")))
    finally:
        writer.close()


def test_a_missing_fifo_and_a_wrong_wrapper_say_what_to_check(tmp_path):
    channel = pipe.Fifos("train", str(tmp_path / "train"), "None", fifo_wait_seconds=0.3)
    with pytest.raises(DataError, match=r"train_0 did not appear within 0.3 s; SageMaker creates one FIFO per pass"):
        list(pipe.read_pass(channel, 0, SPEC, pipe.PassCounts("x")))
    prefix = str(tmp_path / "plain")
    writer = PipeWriter(prefix, [amazon_tsv(REVIEWS_A)])  # no wrapper, but the channel says RecordIO
    try:
        with pytest.raises(DataError, match=r"not RecordIO .* is the channel's RecordWrapperType right\?"):
            list(pipe.read_pass(pipe.Fifos("plain", prefix, "RecordIO"), 0, SPEC, pipe.PassCounts(prefix)))
    finally:
        writer.close()


# The job end to end: two epochs in Pipe mode give File mode's metrics on the same data.

JOB_HYPERPARAMETERS = {**FAST_HYPERPARAMETERS, "epochs": "2", "run_sample_predictions": "false"}


def job_data(tmp_path, distilbert_dir):
    from review_trainer.model.pretrained import ReviewTokenizer, open_checkpoint

    tokenizer = ReviewTokenizer(open_checkpoint(distilbert_dir), 16)

    def tfrecords(reviews):
        ids, mask = tokenizer([t for t, _ in reviews])
        return tfrecord_bytes(tmp_path, [(i.tolist(), m.tolist(), s - 1) for i, m, (_, s) in zip(ids, mask, reviews)])

    table_reviews, record_reviews = make_reviews(30, 12), make_reviews(20, 11)
    channels = {
        "train": {"a.tsv": amazon_tsv(table_reviews), "b.tfrecord": tfrecords(record_reviews)},
        "validation": {"validation.tsv": amazon_tsv(make_reviews(12, 13))},
        "test": {"test.tsv": amazon_tsv(make_reviews(14, 14))},
    }
    # Without a wrapper a FIFO is one stream, so one format: the same rows, the table's tokenized
    # first (File mode reads tables before TFRecords), as one TFRecord stream.
    return channels, {**channels, "train": {"a.tfrecord": tfrecords(table_reviews), "b.tfrecord": tfrecords(record_reviews)}}


def as_pipe_job(base, channels, wrapper, passes):
    """The File-mode tree turned into Pipe mode, as a (re)started container sees it: the channel
    folders become FIFOs from _0 on, fed by writers; returns the writers."""
    with open(os.path.join(base, "input", "config", "inputdataconfig.json"), "w") as f:
        json.dump({name: {"TrainingInputMode": "Pipe", "RecordWrapperType": wrapper,
                          "S3DistributionType": "FullyReplicated"} for name in channels}, f)
    data_dir = os.path.join(base, "input", "data")
    writers = []
    for name, files in channels.items():
        shutil.rmtree(os.path.join(data_dir, name), ignore_errors=True)
        content = wrapped([files[n] for n in sorted(files)], wrapper)
        writers.append(PipeWriter(os.path.join(data_dir, name), [content] * passes[name]))
    return writers


def run_pipe_job(base, pretrained, channels, wrapper, passes, run=None):
    writers = as_pipe_job(base, channels, wrapper, passes)
    try:
        return (run or train_in_process)(base, pretrained)
    finally:
        for writer in writers:
            writer.close()


def metric_lines(log):
    return re.findall(r"^epoch=\d+ step=\d+ train_loss=.*$", log, re.M)


@pytest.fixture(scope="module")
def file_mode_job(tmp_path_factory, distilbert_dir):
    tmp_path = tmp_path_factory.mktemp("file_mode")
    channels, unwrapped_channels = job_data(tmp_path, distilbert_dir)
    base = make_opt_ml(str(tmp_path / "opt_ml"), channels, JOB_HYPERPARAMETERS)
    result = train_in_process(base, distilbert_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"RecordIO": channels, "None": unwrapped_channels}, base, result


@pytest.mark.parametrize("wrapper", ["RecordIO", "None"])
def test_two_epochs_in_pipe_mode_give_the_metrics_of_file_mode(tmp_path, distilbert_dir, file_mode_job, wrapper):
    channels_by_wrapper, file_base, file_result = file_mode_job
    channels = channels_by_wrapper[wrapper]
    base = make_opt_ml(str(tmp_path / "opt_ml"), channels, JOB_HYPERPARAMETERS)
    result = run_pipe_job(base, distilbert_dir, channels, wrapper, {"train": 2, "validation": 2, "test": 1})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "channel=train input_mode=Pipe record_wrapper=" + wrapper in result.stdout
    assert len(re.findall(r"^channel=train pipe=\S+/train_[01] objects=\d rows=50 bad_rows=0$", result.stdout, re.M)) == 2
    assert re.search(r"^channel=test pipe=\S+/test_0 objects=\d rows=14 bad_rows=0$", result.stdout, re.M)
    file_lines, pipe_lines = metric_lines(file_result.stdout), metric_lines(result.stdout)
    assert len(file_lines) == 2 and [line.split(" train_samples_per_second")[0] for line in pipe_lines] == [
        line.split(" train_samples_per_second")[0] for line in file_lines]
    evaluations = []
    for job in (file_base, base):
        with open(os.path.join(job, "output", "data", "evaluation.json")) as f:
            evaluations.append(json.load(f)["multiclass_classification_metrics"])
    assert evaluations[0] == evaluations[1]


def test_a_record_cut_short_fails_the_job_with_a_data_error_and_no_model(tmp_path, distilbert_dir):
    channels = {"train": {"a.tsv": amazon_tsv(make_reviews(16, 3))}}
    base = make_opt_ml(str(tmp_path / "opt_ml"), channels, {**FAST_HYPERPARAMETERS, "run_sample_predictions": "false"})
    with open(os.path.join(base, "input", "config", "inputdataconfig.json"), "w") as f:
        json.dump({"train": {"TrainingInputMode": "Pipe", "RecordWrapperType": "RecordIO"}}, f)
    shutil.rmtree(os.path.join(base, "input", "data", "train"))
    writer = PipeWriter(os.path.join(base, "input", "data", "train"), [recordio([channels["train"]["a.tsv"]])[:-20]])
    try:
        result = train_in_process(base, distilbert_dir)
    finally:
        writer.close()
    assert result.returncode == 3, result.stderr[-2000:]
    assert re.match(r"DataError: \S+/train_0 \(object 1\): the pipe ended inside a RecordIO record", read_failure(base))
    assert not os.listdir(os.path.join(base, "model"))


def test_a_test_channel_in_pipe_mode_without_a_good_row_fails_with_the_reason(tmp_path, distilbert_dir):
    channels = {"train": {"a.tsv": amazon_tsv(make_reviews(16, 3))},
                "test": {"t.tsv": amazon_tsv([("", 1), ("fine", 9)])}}
    base = make_opt_ml(str(tmp_path / "opt_ml"), channels, {**FAST_HYPERPARAMETERS, "run_sample_predictions": "false"})
    with open(os.path.join(base, "input", "config", "inputdataconfig.json"), "w") as f:
        json.dump({"train": {"TrainingInputMode": "File"},
                   "test": {"TrainingInputMode": "Pipe", "RecordWrapperType": "None"}}, f)
    shutil.rmtree(os.path.join(base, "input", "data", "test"))
    writer = PipeWriter(os.path.join(base, "input", "data", "test"), [channels["test"]["t.tsv"]])
    try:
        result = train_in_process(base, distilbert_dir)
    finally:
        writer.close()
    assert result.returncode == 3, result.stderr[-2000:]
    assert read_failure(base).startswith(
        "DataError: channel 'test' has no usable rows (empty_text: 1, unknown_label: 1)")
    assert not os.listdir(os.path.join(base, "model"))


def test_a_continuation_part_where_a_new_record_should_start_is_corrupt(tmp_path):
    first_part = MAGIC + struct.pack("<I", 1 << 29 | 4) + b"abcd"
    prefix = str(tmp_path / "train")
    writer = PipeWriter(prefix, [first_part + recordio([amazon_tsv(REVIEWS_A)])])  # flag 0 after flag 1
    try:
        with pytest.raises(DataError, match="a RecordIO continuation part with part flag 0: the stream is corrupt"):
            list(pipe.read_pass(pipe.Fifos("train", prefix, "RecordIO"), 0, SPEC, pipe.PassCounts(prefix)))
    finally:
        writer.close()


def test_a_stopped_pipe_mode_job_resumes_mid_pass_and_ends_with_the_uninterrupted_model(tmp_path, distilbert_dir,
                                                                                        file_mode_job):
    channels_by_wrapper, file_base, _ = file_mode_job
    channels = channels_by_wrapper["RecordIO"]
    base = make_opt_ml(str(tmp_path / "opt_ml"), channels, {**JOB_HYPERPARAMETERS, "checkpoint_every_n_steps": "100"})
    with open(os.path.join(base, "input", "config", "checkpointconfig.json"), "w") as f:
        json.dump({"LocalPath": str(tmp_path / "checkpoints")}, f)
    # 50 rows in batches of 8: 7 steps a pass. Stopped in the second pass, after step 10.
    exit_code, log = run_pipe_job(base, distilbert_dir, channels, "RecordIO", {"train": 2, "validation": 2, "test": 1},
                                  run=lambda base, pretrained: run_until_held_then_signal(base, pretrained, 10))
    stopped_at = 10
    assert exit_code == 143, log[-3000:]
    assert re.search(r"^checkpoint step=10 ", log, re.M) and read_failure(base).startswith(
        "Stopped: the job received SIGTERM at step 10 of epoch 2 of 2; a checkpoint of step 10")
    # The restarted container's FIFOs start again at _0: the rest of pass 2, then the test pass.
    result = run_pipe_job(base, distilbert_dir, channels, "RecordIO", {"train": 1, "validation": 1, "test": 1})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {tmp_path}/checkpoints/step-{stopped_at:09d}: global step {stopped_at}" in result.stdout
    assert re.search(r"^channel=train pipe=\S+/train_0 objects=2 rows=50 bad_rows=0$", result.stdout, re.M)
    assert re.search(r"^epoch=2 step=14 ", result.stdout, re.M) and "epoch=1 " not in result.stdout
    evaluations = []
    for job in (file_base, base):
        with open(os.path.join(job, "output", "data", "evaluation.json")) as f:
            evaluations.append(json.load(f)["multiclass_classification_metrics"])
    assert evaluations[0] == evaluations[1]


@pytest.mark.parametrize("config, hyperparameters, exit_code, message", [
    ({"TrainingInputMode": "Pipe"}, {"train_steps_per_epoch": "3"}, 2,
     r"HyperparameterError: train_steps_per_epoch is set, but channel 'train' is in Pipe mode"),
    ({"TrainingInputMode": "Stream"}, {}, 3,
     r"DataError: inputdataconfig.json: channel 'train' has TrainingInputMode='Stream'"),
    ({"TrainingInputMode": "Pipe", "RecordWrapperType": "TFRecord"}, {}, 3,
     r"DataError: .*RecordWrapperType='TFRecord'; this job reads .* RecordWrapperType None, RecordIO"),
])
def test_what_pipe_mode_cannot_do_fails_before_training(tmp_path, distilbert_dir, config, hyperparameters,
                                                        exit_code, message, run_in_process):
    base = make_opt_ml(str(tmp_path), {"train": {"a.tsv": amazon_tsv(make_reviews(8))}},
                       {**FAST_HYPERPARAMETERS, **hyperparameters})
    with open(os.path.join(base, "input", "config", "inputdataconfig.json"), "w") as f:
        json.dump({"train": config}, f)
    result = run_in_process(base, distilbert_dir)
    assert result.returncode == exit_code, result.stderr[-2000:]
    assert re.match(message, read_failure(base))


def test_sharded_by_s3_key_in_pipe_mode_is_refused_on_several_hosts_only():
    from types import SimpleNamespace

    from review_trainer.contract.hyperparameters import Hyperparameters

    hp = Hyperparameters.from_dict({})

    def contract(distribution, channel="train"):
        return SimpleNamespace(channel_dirs={}, pipe_channels={channel: ("/fifo", "None"), "train": ("/fifo", "None")},
                               channel_distribution={"train": "FullyReplicated", channel: distribution})

    with pytest.raises(DataError, match="Pipe mode with S3DistributionType=ShardedByS3Key on 2 hosts"):
        data.check_inputs(contract("ShardedByS3Key"), hp, num_workers=2)
    data.check_inputs(contract("ShardedByS3Key"), hp, num_workers=1)
    data.check_inputs(contract("FullyReplicated", "validation"), hp, num_workers=2)
