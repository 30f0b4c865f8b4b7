import collections
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from conftest import amazon_tsv, gzipped, make_reviews
from review_trainer import data
from review_trainer.data import sharding
from review_trainer.contract.errors import DataError
from review_trainer.model.pretrained import ReviewTokenizer, open_checkpoint

SPEC = data.RowSpec("review_body", "star_rating", ("1", "2", "3", "4", "5"), 16)


def write(path, content):
    path.write_bytes(content)
    return path


def tfrecord_bytes(tmp_path, examples, compressed=False):
    path = tmp_path / "records.tmp"
    options = tf.io.TFRecordOptions(compression_type="GZIP" if compressed else "")
    with tf.io.TFRecordWriter(str(path), options) as writer:
        for ids, mask, label in examples:
            feature = {
                "input_ids": tf.train.Feature(int64_list=tf.train.Int64List(value=ids)),
                "input_mask": tf.train.Feature(int64_list=tf.train.Int64List(value=mask)),
                "segment_ids": tf.train.Feature(int64_list=tf.train.Int64List(value=[0] * len(ids))),
                "label_ids": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    content = path.read_bytes()
    path.unlink()
    return content


def rows_of(path):
    file_format, compressed = data.detect_format(str(path))
    summary = data.FileSummary(str(path), file_format, compressed, 0)
    return list(data.iter_rows(summary, SPEC))


def table(rows):
    return {"review_body": [r[0] for r in rows], "star_rating": [r[1] for r in rows]}


@pytest.fixture
def reviews():
    return make_reviews(20, seed=7)


def test_every_format_is_detected_by_content_and_yields_the_same_rows(tmp_path, reviews):
    expected = [(text, stars - 1) for text, stars in reviews]
    csv_text = "review_body,star_rating\n" + "".join(f'"{t}",{s}\n' for t, s in reviews)
    jsonl = "".join(json.dumps({"review_body": t, "star_rating": s, "extra": 1}) + "\n" for t, s in reviews)
    pq.write_table(pa.table(table(reviews)), tmp_path / "p.parquet")
    files = {
        "a.tsv": amazon_tsv(reviews), "b.tsv.gz": gzipped(amazon_tsv(reviews)),
        "c.csv": csv_text.encode(), "d.jsonl": jsonl.encode(), "e.json.gz": gzipped(jsonl.encode()),
        "no_extension": amazon_tsv(reviews), "p.parquet": (tmp_path / "p.parquet").read_bytes(),
    }
    formats = {}
    for name, content in files.items():
        path = write(tmp_path / name, content)
        formats[name] = data.detect_format(str(path))
        assert rows_of(path) == expected, name
    assert formats == {
        "a.tsv": ("tsv", False), "b.tsv.gz": ("tsv", True), "c.csv": ("csv", False),
        "d.jsonl": ("jsonl", False), "e.json.gz": ("jsonl", True), "no_extension": ("tsv", False),
        "p.parquet": ("parquet", False),
    }


def test_tfrecord_is_detected_and_counted_plain_and_gzipped(tmp_path):
    examples = [([2] + [10] * 15, [1] * 16, label) for label in (0, 4, 2, 7)]
    for name, compressed in (("train.tfrecord", False), ("train.tfrecord.gz", True)):
        path = write(tmp_path / name, tfrecord_bytes(tmp_path, examples, compressed))
        assert data.detect_format(str(path)) == ("tfrecord", compressed)
        assert rows_of(path) == [(None, 0), (None, 4), (None, 2), (None, "unknown_label")]


def test_tfrecord_length_mismatch_names_the_file_and_both_lengths(tmp_path):
    path = write(tmp_path / "short.tfrecord", tfrecord_bytes(tmp_path, [([2] * 8, [1] * 8, 0)]))
    with pytest.raises(DataError, match=r"short.tfrecord: feature input_ids has length 8 but max_seq_length is 16"):
        rows_of(path)


def test_bad_rows_are_counted_per_reason(tmp_path):
    good = amazon_tsv(make_reviews(10)).rstrip(b"\n").split(b"\n")
    header, rows = good[0], good[1:]
    empty = rows[0].replace(b"was", b"").split(b"\t")
    empty[13] = b"   "
    bad_label = rows[1].split(b"\t")
    bad_label[7] = b"6"
    lines = [header, *rows[2:], b"\t".join(empty), b"\t".join(bad_label),
             rows[2].replace(b"was", b"\xff\xfe"), b"too\tfew\tfields"]
    path = write(tmp_path / "bad.tsv", b"\n".join(lines) + b"\n")
    reasons = collections.Counter(r[1] for r in rows_of(path) if r[0] is None)
    assert reasons == {"empty_text": 1, "unknown_label": 1, "undecodable": 1, "malformed": 1}


def test_labels_match_as_values_whatever_their_type(tmp_path):
    rows = [("five", 5), ("four", 4.0), ("three", "3"), ("two", " 2.0 ")]
    pq.write_table(pa.table({"review_body": [r[0] for r in rows], "star_rating": [str(r[1]) for r in rows]}),
                   tmp_path / "s.parquet")
    assert [r[1] for r in rows_of(tmp_path / "s.parquet")] == [4, 3, 2, 1]
    jsonl = "".join(json.dumps({"review_body": t, "star_rating": s}) + "\n" for t, s in rows)
    assert [r[1] for r in rows_of(write(tmp_path / "s.jsonl", jsonl.encode()))] == [4, 3, 2, 1]


@pytest.mark.parametrize("name, content", [
    ("wrong.tsv", b"review\tstars\nnice\t5\n"),
    ("wrong.csv", b"review,stars\nnice,5\n"),
    ("wrong.jsonl", b'{"review": "nice", "stars": 5}\n'),
])
def test_a_missing_column_fails_with_the_columns_found(tmp_path, name, content):
    path = write(tmp_path / name, content)
    with pytest.raises(DataError, match=r"no column 'review_body', 'star_rating'; its columns are .*review.*stars"):
        rows_of(path)


def test_unreadable_files_fail_with_the_file_name(tmp_path):
    path = write(tmp_path / "image.bin", bytes(range(256)) * 4)
    with pytest.raises(DataError, match="image.bin: not a format this job reads"):
        data.detect_format(str(path))


def test_scan_counts_hashes_and_fails_over_the_bad_row_fraction(tmp_path, reviews):
    channel_dir = tmp_path / "train"
    channel_dir.mkdir()
    write(channel_dir / "good.tsv", amazon_tsv(reviews))
    write(channel_dir / "_SUCCESS", b"")
    write(channel_dir / ".hidden", b"junk")
    channel = data.scan_channel("train", str(channel_dir), SPEC, 0.01)
    assert [f.path.rsplit("/", 1)[1] for f in channel.files] == ["good.tsv"]
    assert channel.good_rows == 20 and len(channel.files[0].sha256) == 64

    write(channel_dir / "bad.tsv", amazon_tsv([("", 5), ("fine", 9)]))
    with pytest.raises(DataError) as error:
        data.scan_channel("train", str(channel_dir), SPEC, 0.05)
    message = str(error.value)
    assert "channel 'train': 2 of 22 rows are bad" in message
    assert "empty_text: 1, unknown_label: 1" in message and "bad.tsv" in message
    assert "max_bad_row_fraction=0.05" in message
    assert data.scan_channel("train", str(channel_dir), SPEC, 0.1).good_rows == 20


@pytest.mark.parametrize("name", ["cut.tsv.gz", "cut.parquet"])
def test_a_truncated_file_fails_naming_the_file(tmp_path, reviews, name):
    channel_dir = tmp_path / "train"
    channel_dir.mkdir()
    if name.endswith(".gz"):
        content = gzipped(amazon_tsv(make_reviews(2000)))
    else:
        pq.write_table(pa.table(table(reviews)), tmp_path / "whole.parquet")
        content = (tmp_path / "whole.parquet").read_bytes()
    write(channel_dir / name, content[: len(content) // 2])
    with pytest.raises(DataError, match=rf"{name}: "):
        data.scan_channel("train", str(channel_dir), SPEC, 0.01)


def test_empty_channels_fail(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="channel 'test' .* has no files"):
        data.scan_channel("test", str(tmp_path / "empty"), SPEC, 0.01)
    write(tmp_path / "empty" / "header_only.tsv", b"review_body\tstar_rating\n")
    with pytest.raises(DataError, match="channel 'test' has no usable rows"):
        data.scan_channel("test", str(tmp_path / "empty"), SPEC, 0.01)


def test_dataset_streams_all_good_rows_of_mixed_formats_tokenized(tmp_path, reviews, distilbert_dir):
    tokenizer = ReviewTokenizer(open_checkpoint(distilbert_dir), SPEC.max_seq_length)
    channel_dir = tmp_path / "train"
    channel_dir.mkdir()
    write(channel_dir / "a.tsv.gz", gzipped(amazon_tsv(reviews[:12] + [("", 3)])))
    ids, mask = tokenizer(["a record"])
    write(channel_dir / "b.tfrecord", tfrecord_bytes(tmp_path, [(ids[0].tolist(), mask[0].tolist(), 3)] * 3))
    channel = data.scan_channel("train", str(channel_dir), SPEC, 0.5)
    dataset = data.make_dataset(channel, SPEC, tokenizer, batch_size=4)
    batches = list(dataset.as_numpy_iterator())
    labels = np.concatenate([b[1] for b in batches])
    assert [len(b[1]) for b in batches] == [4, 4, 4, 3]
    assert labels.tolist() == [stars - 1 for _, stars in reviews[:12]] + [3, 3, 3]
    first_ids, first_mask = tokenizer([reviews[0][0]])
    assert (batches[0][0]["token_ids"][0] == first_ids[0]).all()
    assert (batches[0][0]["padding_mask"][0] == first_mask[0]).all()
    assert batches[0][0]["token_ids"].dtype == np.int32


def test_training_stream_is_seeded_reshuffled_per_pass_and_resumable_at_any_step(tmp_path, distilbert_dir):
    tokenizer = ReviewTokenizer(open_checkpoint(distilbert_dir), SPEC.max_seq_length)
    channel_dir = tmp_path / "train"
    channel_dir.mkdir()
    for i in range(3):
        write(channel_dir / f"part-{i}.tsv", amazon_tsv(make_reviews(30, seed=i)))
    write(channel_dir / "part-3.tfrecord", tfrecord_bytes(tmp_path, [([2] + [i] * 15, [1] * 16, 1) for i in range(10)]))
    channel = data.scan_channel("train", str(channel_dir), SPEC, 0.01)
    assert sharding.whole(channel).steps_per_pass(8) == 13  # 100 rows

    def batches(seed, start=0, count=30):
        stream = data.make_training_stream(channel, SPEC, tokenizer, 8, seed, start_step=start)
        return [(x["token_ids"].numpy(), y.numpy()) for x, y in stream.take(count)]

    first, again, other_seed = batches(1), batches(1), batches(2)
    assert all((a[0] == b[0]).all() for a, b in zip(first, again))
    assert not all((a[0] == b[0]).all() for a, b in zip(first, other_seed))
    pass_0, pass_1 = first[:13], first[13:26]
    assert [len(y) for _, y in pass_0] == [8] * 12 + [4]
    rows = lambda batches_: sorted(bytes(row) for ids, _ in batches_ for row in ids)  # noqa: E731
    assert rows(pass_0) == rows(pass_1)  # every row once per pass ...
    assert not all((a[0] == b[0]).all() for a, b in zip(pass_0, pass_1))  # ... in another order
    unshuffled = list(data.make_dataset(channel, SPEC, tokenizer, 8).as_numpy_iterator())
    assert rows(pass_0) == sorted(bytes(row) for x, _ in unshuffled for row in x["token_ids"])
    for start in (5, 13, 20):  # a resumed job reads what an uninterrupted one would have
        resumed = batches(1, start=start, count=30 - start)
        assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(first[start:], resumed))


def test_a_utf8_byte_order_mark_before_the_header_is_read_past_in_every_text_format(tmp_path, reviews):
    expected = [(text, stars - 1) for text, stars in reviews]
    csv_text = "review_body,star_rating\n" + "".join(f'"{t}",{s}\n' for t, s in reviews)
    jsonl = "".join(json.dumps({"review_body": t, "star_rating": s}) + "\n" for t, s in reviews)
    for name, content, file_format in (("a.tsv", amazon_tsv(reviews), "tsv"), ("b.csv", csv_text.encode(), "csv"),
                                       ("c.jsonl", jsonl.encode(), "jsonl")):
        path = write(tmp_path / name, b"\xef\xbb\xbf" + content)  # as spreadsheet exports write it
        assert data.detect_format(str(path)) == (file_format, False)
        assert rows_of(path) == expected, name


@pytest.mark.parametrize("mark, encoding", [(b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"),
                                            (b"\xff\xfe\x00\x00", "UTF-32")])
def test_text_in_another_unicode_encoding_fails_saying_which(tmp_path, mark, encoding):
    path = write(tmp_path / "reviews.tsv", mark + "review_body\tstar_rating\n".encode("utf-16-le"))
    with pytest.raises(DataError, match=f"reviews.tsv: {encoding}-encoded text .*; save it as UTF-8"):
        data.detect_format(str(path))


def test_a_nul_byte_in_one_review_makes_one_bad_row_not_an_unreadable_file(tmp_path, reviews):
    rows = reviews[:5] + [("great\x00 movie", 5)] + reviews[5:]
    for name, content in (("a.tsv", amazon_tsv(rows)),
                          ("b.csv", ("review_body,star_rating\n" + "".join(f'"{t}",{s}\n' for t, s in rows)).encode())):
        path = write(tmp_path / name, content)
        read = rows_of(path)
        assert read[5] == (None, "nul_byte") and len(read) == 21, name
        assert [r for r in read if r[0] is not None] == [(t, s - 1) for t, s in reviews]


@pytest.mark.parametrize("after_the_quote, message", [
    (500, r"a quoted field runs from line 202 over \d+ lines: an unclosed quote\? Fix that line"),
    (4000, r"line 202: field larger than field limit .*; an unclosed quote\?"),  # > 128 KiB: csv.Error
])
def test_an_unclosed_quote_in_a_csv_fails_at_its_line_instead_of_eating_the_rows_below(tmp_path, after_the_quote,
                                                                                      message):
    rows = "".join(f"fine review number {i} of many words here,{1 + i % 5}\n" for i in range(200))
    rows += '"a stray quote,5\n' + "".join(f"another fine review {i} " * 3 + f",{1 + i % 5}\n"
                                            for i in range(after_the_quote))
    path = write(tmp_path / "stray.csv", ("review_body,star_rating\n" + rows).encode())
    with pytest.raises(DataError, match=rf"stray.csv: {message}"):
        rows_of(path)


def test_length_buckets_keep_every_example_once_cut_only_padding_and_resume_exactly(tmp_path, distilbert_dir):
    spec = data.RowSpec("review_body", "star_rating", ("1", "2", "3", "4", "5"), 32)
    tokenizer = ReviewTokenizer(open_checkpoint(distilbert_dir), 32)
    rng = np.random.default_rng(3)
    rows = [(" ".join(["movie"] * int(k)), 1 + int(k) % 5) for k in rng.integers(1, 40, 300)]  # some truncated
    channel_dir = tmp_path / "train"
    channel_dir.mkdir()
    write(channel_dir / "part-0.tsv", amazon_tsv(rows))
    channel = data.scan_channel("train", str(channel_dir), spec, 0.01)
    steps = sharding.whole(channel).steps_per_pass(8)
    assert steps == 38 and data.bucket_lengths(32) == [8, 16, 24, 32]

    def batches(bucket_by_length, start=0, count=2 * steps):
        stream = data.make_training_stream(channel, spec, tokenizer, 8, 1, start_step=start,
                                           bucket_by_length=bucket_by_length)
        return [(x["token_ids"].numpy(), x["padding_mask"].numpy(), y.numpy()) for x, y in stream.take(count)]

    def examples(batches_):  # each example's tokens (unpadded) and label
        return sorted((tuple(ids[mask > 0]), label) for b in batches_ for ids, mask, label in zip(*b))

    plain, bucketed = batches(False), batches(True)
    for one_pass in (slice(0, steps), slice(steps, 2 * steps)):
        assert examples(bucketed[one_pass]) == examples(plain[one_pass])  # every example once a pass
        assert sorted(len(b[2]) for b in bucketed[one_pass]) == [4] + [8] * 37  # the same batches' sizes
    for ids, mask, _ in bucketed:
        used = max(np.flatnonzero(row).max() + 1 for row in mask)
        width = ids.shape[1]
        assert width in (8, 16, 24, 32) and used <= width and (width == 8 or used > width - 8), (used, width)
    # Less padding than 32, and less than the same buckets without sorting by length would leave
    widths = [b[0].shape[1] for b in bucketed[:steps]]
    unsorted = [min(w for w in (8, 16, 24, 32) if w >= max(np.flatnonzero(row).max() + 1 for row in mask))
                for _, mask, _ in plain[:steps]]
    assert np.mean(widths) < np.mean(unsorted) < 32 and len(set(widths)) > 2, (np.mean(widths), np.mean(unsorted))
    for start in (5, steps, steps + 7):  # a resumed job reads what an uninterrupted one would have
        resumed = batches(True, start=start, count=2 * steps - start)
        assert all((a[0] == b[0]).all() and (a[2] == b[2]).all() for a, b in zip(bucketed[start:], resumed))


EXTRAS = data.RowSpec("review_body", "star_rating", ("1", "2", "3", "4", "5"), 16, extra_columns=("product_category",))


def test_extra_columns_are_read_beside_each_row_in_every_format_and_never_make_a_row_bad(tmp_path, reviews):
    categories = [("Books", "Toys", "Music")[i % 3] for i in range(len(reviews))]
    expected = [(text, stars - 1, category) for (text, stars), category in zip(reviews, categories)]
    csv_text = "review_body,star_rating,product_category\n" + "".join(
        f'"{t}",{s},{c}\n' for (t, s), c in zip(reviews, categories))
    jsonl = "".join(json.dumps({"review_body": t, "star_rating": s, "product_category": c}) + "\n"
                    for (t, s), c in zip(reviews, categories))
    pq.write_table(pa.table({**table(reviews), "product_category": categories}), tmp_path / "p.parquet")
    files = {"a.tsv": amazon_tsv([(t, s, {"product_category": c}) for (t, s), c in zip(reviews, categories)]),
             "c.csv": csv_text.encode(), "d.jsonl": jsonl.encode(), "p.parquet": (tmp_path / "p.parquet").read_bytes()}
    for name, content in files.items():
        assert [tuple(row) for row in rows_of_spec(write(tmp_path / name, content), EXTRAS)] == expected, name

    # A facet value that is missing, null or undecodable is an empty or replaced value, never a bad row:
    # the rows and bad rows are the same with the extra column as without it.
    odd = [json.dumps({"review_body": "no category", "star_rating": 4}),
           json.dumps({"review_body": "null category", "star_rating": 2, "product_category": None}),
           json.dumps({"review_body": "", "star_rating": 2, "product_category": "Toys"}),  # bad: empty text
           json.dumps({"review_body": "kept", "star_rating": 5, "product_category": " Toys "})]
    path = write(tmp_path / "odd.jsonl", ("\n".join(odd) + "\n").encode())
    assert rows_of_spec(path, EXTRAS) == [("no category", 3, ""), ("null category", 1, ""), (None, "empty_text"),
                                          ("kept", 4, "Toys")]
    assert [row[:2] for row in rows_of_spec(path, EXTRAS)] == rows_of(path)
    broken = b'review_body,star_rating,product_category\n"fine",5,\xff\xfeBooks\n"bad \xff",4,Books\n'
    path = write(tmp_path / "odd.csv", broken)
    assert [row[:2] for row in rows_of_spec(path, EXTRAS)] == rows_of(path) == [("fine", 4), (None, "undecodable")]


def rows_of_spec(path, spec):
    file_format, compressed = data.detect_format(str(path))
    return list(data.iter_rows(data.FileSummary(str(path), file_format, compressed, 0), spec))


def test_an_extra_column_in_no_row_or_in_a_tfrecord_file_fails_naming_it(tmp_path, reviews):
    jsonl = "".join(json.dumps({"review_body": t, "star_rating": s, "category": "Books"}) + "\n" for t, s in reviews)
    with pytest.raises(DataError, match=r"no column 'product_category'; its columns are category, review_body, "
                                        r"star_rating\. Set text_column / label_column / bias_facet / bias_group"):
        rows_of_spec(write(tmp_path / "none.jsonl", jsonl.encode()), EXTRAS)
    path = write(tmp_path / "r.tfrecord", tfrecord_bytes(tmp_path, [([101, 102] + [0] * 14, [1, 1] + [0] * 14, 3)]))
    with pytest.raises(DataError, match=r"a TFRecord file holds token ids and a label, no column 'product_category'"):
        rows_of_spec(path, EXTRAS)


def test_the_scan_keeps_a_seeded_uniform_sample_and_counts_every_facet_value(tmp_path, monkeypatch):
    from review_trainer.data import scan

    monkeypatch.setattr(scan, "SAMPLE_ROWS", 50)
    monkeypatch.setattr(scan, "MAX_DISTINCT_VALUES", 3)
    channel_dir = tmp_path / "train"
    channel_dir.mkdir()
    rows = [(f"review number {i}", i % 5 + 1, {"product_category": f"c{i % 4}", "review_id": str(i)}) for i in range(1000)]
    write(channel_dir / "a.tsv", amazon_tsv(rows[:600]))
    write(channel_dir / "b.tsv", amazon_tsv(rows[600:]))
    spec = data.RowSpec("review_body", "star_rating", SPEC.classes, 16, extra_columns=("product_category", "review_id"))
    channel = data.scan_channel("train", str(channel_dir), spec, 0.0)
    # Every row counted: the first 3 values one by one, the 4th's rows as others
    assert channel.extra_values[0].counts == {"c0": 250, "c1": 250, "c2": 250} and channel.extra_values[0].others == 250
    # The sample: 50 distinct rows of the channel, each row's label beside its own columns
    sampled = [int(review_id) for _, _, review_id in channel.sample]
    assert len(set(sampled)) == 50
    assert channel.sample == [(i % 5, f"c{i % 4}", str(i)) for i in sampled]
    # Uniform over the whole channel, not its first rows: about 40% from file b (rows 600-999)
    assert 10 <= sum(i >= 600 for i in sampled) <= 30 and 10 <= sum(i < 300 for i in sampled) <= 30
    # A value named in bias_facet_values is counted one by one whatever the bound
    named = data.scan_channel("train", str(channel_dir), spec, 0.0, facet_values=("c3",)).extra_values[0]
    assert named.counts == {"c0": 250, "c1": 250, "c2": 250, "c3": 250} and named.others == 0
    assert data.scan_channel("train", str(channel_dir), spec, 0.0).sample == channel.sample  # seeded: every host
    assert data.scan_channel("train", str(channel_dir), SPEC, 0.0).sample == []  # no extra columns, no sample


def test_read_extras_gives_every_good_row_in_file_order_as_codes(tmp_path):
    channel_dir = tmp_path / "test"
    channel_dir.mkdir()
    write(channel_dir / "a.tsv", amazon_tsv([("one", 1, {"product_category": "Toys"}), ("", 2),
                                            ("three", 3, {"product_category": "Books"})]))
    write(channel_dir / "b.tsv", amazon_tsv([("four", 5, {"product_category": "Toys"})]))
    channel = data.scan_channel("test", str(channel_dir), EXTRAS, 0.5)
    labels, [(codes, values)] = data.read_extras(channel)
    assert labels.dtype == codes.dtype == np.int32
    assert labels.tolist() == [0, 2, 4] and [values[c] for c in codes] == ["Toys", "Books", "Toys"]
