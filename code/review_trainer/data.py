"""Channels: find the files, tell their format by content, scan them, and stream them to Keras.

Formats, decided per file from its first bytes (a `.gz` is looked into first):
- TFRecord of tf.train.Example with the book's features `input_ids`, `input_mask`, `segment_ids`
  (int64, length max_seq_length) and `label_ids` (int64, 0-based): already tokenized.
- Review tables with `text_column` and `label_column`: tab-separated (the Amazon Customer Reviews
  schema: header row, no quoting), CSV, JSON Lines, Parquet. Tokenized here.

`scan_channel` reads every file once before training: it counts good rows and bad rows per
reason (the job fails when too many are bad) and hashes the files for the run's manifest.
`make_dataset` then streams the same rows, so a channel of many GB never sits in memory.
"""

import collections
import csv
import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import struct
import zlib

import numpy as np
from review_trainer.errors import DataError

TFRECORD = "tfrecord"
TSV, CSV, JSONL, PARQUET = "tsv", "csv", "jsonl", "parquet"
TFRECORD_FEATURES = ("input_ids", "input_mask", "segment_ids", "label_ids")

# Reasons a row is skipped
EMPTY_TEXT = "empty_text"
UNKNOWN_LABEL = "unknown_label"
UNDECODABLE = "undecodable"
MALFORMED = "malformed"

_SNIFF_BYTES = 1 << 16
_TOKENIZE_CHUNK = 512  # rows per tokenizer call
_SHUFFLE_BUFFER = 10_000  # examples


@dataclasses.dataclass
class FileSummary:
    path: str
    format: str
    compressed: bool
    size_bytes: int
    sha256: str = ""
    good_rows: int = 0
    bad_rows: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def to_dict(self):
        return {
            "path": self.path, "format": self.format, "gzip": self.compressed,
            "size_bytes": self.size_bytes, "sha256": self.sha256,
            "good_rows": self.good_rows, "bad_rows": dict(self.bad_rows),
        }


@dataclasses.dataclass
class ChannelSummary:
    name: str
    files: list

    @property
    def good_rows(self):
        return sum(f.good_rows for f in self.files)

    @property
    def bad_rows(self):
        return sum((f.bad_rows for f in self.files), collections.Counter())


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """What a row must hold: the columns to read and the label values, in class order."""

    text_column: str
    label_column: str
    classes: tuple
    max_seq_length: int

    @property
    def label_index(self):
        return {label: index for index, label in enumerate(self.classes)}


def list_files(channel_dir):
    """Every file under the channel, sorted; hidden and marker files (`.x`, `_SUCCESS`) are skipped."""
    paths = []
    for root, dirs, files in os.walk(channel_dir, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        paths += [os.path.join(root, f) for f in sorted(files) if not f.startswith((".", "_"))]
    return paths


def detect_format(path):
    """Returns (format, gzip) from the file's content, or raises DataError naming the file."""
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    compressed = head[:2] == b"\x1f\x8b"
    if compressed:
        try:
            with gzip.open(path, "rb") as f:
                head = f.read(_SNIFF_BYTES)
        except (OSError, EOFError) as error:
            raise DataError(f"{path}: looks gzip-compressed but cannot be decompressed ({error})") from error
    if head[:4] == b"PAR1":
        if compressed:
            raise DataError(f"{path}: a gzip-compressed Parquet file; Parquet compresses itself, store it uncompressed")
        return PARQUET, False
    if _looks_like_tfrecord(head):
        return TFRECORD, compressed
    if b"\x00" not in head:  # the text formats
        first_line = head.split(b"\n", 1)[0]
        if head.lstrip()[:1] == b"{":
            return JSONL, compressed
        if b"\t" in first_line:
            return TSV, compressed
        if b"," in first_line:
            return CSV, compressed
    raise DataError(
        f"{path}: not a format this job reads (TFRecord, tab-separated with a header row, CSV, "
        "JSON Lines or Parquet; optionally gzip-compressed)"
    )


def _looks_like_tfrecord(head):
    # A record starts with its uint64 length and the masked CRC-32C of those 8 bytes.
    return len(head) >= 12 and struct.unpack("<I", head[8:12])[0] == _masked_crc32c(head[:8])


def _masked_crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    crc ^= 0xFFFFFFFF
    return ((crc >> 15 | crc << 17) + 0xA282EAD8) & 0xFFFFFFFF


def scan_channel(name, channel_dir, spec, max_bad_row_fraction):
    """Reads every row once: counts good and bad rows, hashes the files, checks the fraction."""
    paths = list_files(channel_dir)
    if not paths:
        raise DataError(f"channel {name!r} ({channel_dir}) has no files")
    summaries = []
    for path in paths:
        file_format, compressed = detect_format(path)
        summary = FileSummary(path, file_format, compressed, os.path.getsize(path), sha256_file(path))
        try:
            for _, label in iter_rows(summary, spec):
                if isinstance(label, str):
                    summary.bad_rows[label] += 1
                else:
                    summary.good_rows += 1
        except (OSError, EOFError, zlib.error, ValueError) as error:  # pyarrow's errors derive from these
            raise DataError(
                f"{path}: cannot be read after {summary.good_rows + sum(summary.bad_rows.values())} rows "
                f"({type(error).__name__}: {error}); is it truncated?"
            ) from error
        summaries.append(summary)
    channel = ChannelSummary(name, summaries)
    _check_bad_rows(channel, max_bad_row_fraction)
    return channel


def _check_bad_rows(channel, max_bad_row_fraction):
    bad = sum(channel.bad_rows.values())
    total = bad + channel.good_rows
    if channel.good_rows == 0:
        reasons = _format_counts(channel.bad_rows) or "no rows at all"
        raise DataError(f"channel {channel.name!r} has no usable rows ({reasons})")
    if bad / total > max_bad_row_fraction:
        worst = max(channel.files, key=lambda f: sum(f.bad_rows.values()))
        raise DataError(
            f"channel {channel.name!r}: {bad} of {total} rows are bad ({bad / total:.2%}; "
            f"{_format_counts(channel.bad_rows)}), more than max_bad_row_fraction="
            f"{max_bad_row_fraction}; most in {worst.path} ({_format_counts(worst.bad_rows)}). "
            "Fix the data, or raise max_bad_row_fraction to train on the good rows."
        )


def describe(channel):
    """Log lines: one per file and a total, with bad rows per reason."""
    lines = []
    for f in channel.files:
        lines.append(
            f"channel={channel.name} file={f.path} format={f.format}{'+gzip' if f.compressed else ''} "
            f"rows={f.good_rows} bad_rows={sum(f.bad_rows.values())} {_format_counts(f.bad_rows)}".rstrip()
        )
    lines.append(
        f"channel={channel.name} files={len(channel.files)} rows={channel.good_rows} "
        f"bad_rows={sum(channel.bad_rows.values())} {_format_counts(channel.bad_rows)}".rstrip()
    )
    return lines


def _format_counts(counter):
    return ", ".join(f"{reason}: {count}" for reason, count in sorted(counter.items()))


class BadRow(str):
    """What a file reader yields instead of (text, label): the reason the row is skipped."""


def iter_rows(summary, spec):
    """Yields (text, class index) for a good row and (None, reason) for a bad one.

    TFRecord rows are already tokenized: they yield (None, class index) here, for the counts.
    """
    if summary.format == TFRECORD:
        yield from _tfrecord_rows(summary, spec)
        return
    readers = {TSV: _tsv_rows, CSV: _csv_rows, JSONL: _jsonl_rows, PARQUET: _parquet_rows}
    label_index = spec.label_index
    for row in readers[summary.format](summary, spec):
        if isinstance(row, BadRow):
            yield None, str(row)
            continue
        text, label = row
        text = "" if text is None else str(text).strip()
        if not text:
            yield None, EMPTY_TEXT
            continue
        index = label_index.get(_label_key(label))
        if index is None:
            yield None, UNKNOWN_LABEL
            continue
        yield text, index


def _label_key(value):
    """5, 5.0, "5" and " 5.0 " are the same label; other values compare as text."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


def _open_binary(summary):
    return gzip.open(summary.path, "rb") if summary.compressed else open(summary.path, "rb")


def _header_indexes(summary, header, spec):
    missing = [c for c in (spec.text_column, spec.label_column) if c not in header]
    if missing:
        raise DataError(
            f"{summary.path}: no column {', '.join(map(repr, missing))}; its columns are "
            f"{', '.join(header)}. Set text_column / label_column to the right names."
        )
    return header.index(spec.text_column), header.index(spec.label_column)


def _tsv_rows(summary, spec):
    # The Amazon Customer Reviews files are tab-separated with no quoting: a quote is text.
    with _open_binary(summary) as f:
        header = f.readline().decode("utf-8", "replace").rstrip("\r\n").split("\t")
        text_at, label_at = _header_indexes(summary, header, spec)
        for raw in f:
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield BadRow(UNDECODABLE)
                continue
            fields = line.split("\t")
            if len(fields) != len(header):
                yield BadRow(MALFORMED)
                continue
            yield fields[text_at], fields[label_at]


def _csv_rows(summary, spec):
    with _open_binary(summary) as f:
        # Undecodable bytes become U+FFFD so that one bad line cannot stop the csv reader.
        reader = csv.reader(io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline=""))
        header = next(reader, [])
        text_at, label_at = _header_indexes(summary, header, spec)
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(header):
                yield BadRow(MALFORMED)
            elif "\ufffd" in fields[text_at] or "\ufffd" in fields[label_at]:
                yield BadRow(UNDECODABLE)
            else:
                yield fields[text_at], fields[label_at]


def _jsonl_rows(summary, spec):
    columns = (spec.text_column, spec.label_column)
    rows_with_columns, keys_seen = 0, set()
    with _open_binary(summary) as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield BadRow(UNDECODABLE)
                continue
            except json.JSONDecodeError:
                yield BadRow(MALFORMED)
                continue
            if not isinstance(record, dict) or not all(c in record for c in columns):
                keys_seen.update(record if isinstance(record, dict) else ())
                yield BadRow(MALFORMED)
                continue
            rows_with_columns += 1
            yield record[spec.text_column], record[spec.label_column]
    if keys_seen and not rows_with_columns:
        _header_indexes(summary, sorted(keys_seen), spec)  # raises: names the missing column


def _parquet_rows(summary, spec):
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(summary.path)
    except Exception as error:  # noqa: BLE001 - pyarrow raises several types for a broken file
        raise DataError(f"{summary.path}: unreadable Parquet file ({error})") from error
    _header_indexes(summary, parquet.schema_arrow.names, spec)
    for batch in parquet.iter_batches(batch_size=4096, columns=[spec.text_column, spec.label_column]):
        texts = batch.column(spec.text_column).to_pylist()
        labels = batch.column(spec.label_column).to_pylist()
        yield from zip(texts, labels)


def _tfrecord_rows(summary, spec):
    import tensorflow as tf
    from tensorflow.core.example import example_pb2

    dataset = tf.data.TFRecordDataset(summary.path, compression_type="GZIP" if summary.compressed else "")
    num_classes = len(spec.classes)
    try:
        for record in dataset.as_numpy_iterator():
            features = example_pb2.Example.FromString(record).features.feature
            missing = [name for name in TFRECORD_FEATURES if name not in features]
            if missing:
                raise DataError(
                    f"{summary.path}: TFRecord example without feature(s) {', '.join(missing)}; "
                    f"expected {', '.join(TFRECORD_FEATURES)} (the book's chapter-6 format)"
                )
            values = {name: features[name].int64_list.value for name in TFRECORD_FEATURES}
            for name in ("input_ids", "input_mask", "segment_ids"):
                if len(values[name]) != spec.max_seq_length:
                    raise DataError(
                        f"{summary.path}: feature {name} has length {len(values[name])} but "
                        f"max_seq_length is {spec.max_seq_length}; set max_seq_length="
                        f"{len(values[name])} or re-tokenize the data"
                    )
            labels = values["label_ids"]
            if len(labels) != 1 or not 0 <= labels[0] < num_classes:
                yield None, UNKNOWN_LABEL
                continue
            yield None, int(labels[0])
    except tf.errors.DataLossError as error:
        raise DataError(f"{summary.path}: truncated or corrupt TFRecord file ({error.message})") from error


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def batches_per_pass(channel, batch_size):
    """Batches in one pass over the channel (the last one may be smaller)."""
    return math.ceil(channel.good_rows / batch_size)


def make_dataset(channel, spec, tokenizer, batch_size, *, repeat=False):
    """Batches of ({"token_ids", "padding_mask"}, label) in file order, for validation and test."""
    import tensorflow as tf

    dataset = _examples(channel, spec, tokenizer).batch(batch_size)
    # The scan counted the rows: Keras then knows the epoch's length.
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(batches_per_pass(channel, batch_size)))
    if repeat:
        dataset = dataset.repeat()
    return dataset.map(_as_features).prefetch(tf.data.AUTOTUNE)


def make_training_stream(channel, spec, tokenizer, batch_size, seed, start_batch=0):
    """The endless training stream, from batch `start_batch` on.

    Pass p is the whole channel with its file order and a 10,000-example shuffle buffer seeded by
    (seed, p), then batched; the stream is pass 0, pass 1, ... A batch's content depends only on
    its index, so a job resumed at global step n reads exactly what an uninterrupted job would
    have read from step n on. Epochs are cut from the stream by `steps_per_epoch`.
    """
    import tensorflow as tf

    first_pass, offset = divmod(start_batch, batches_per_pass(channel, batch_size))

    @tf.autograph.experimental.do_not_convert  # plain Python that builds a dataset
    def one_pass(pass_index):
        examples = _examples(channel, spec, tokenizer, file_order_seed=(seed, pass_index))
        shuffle_seed = tf.constant(seed, tf.int64) * 1_000_003 + pass_index
        return examples.shuffle(_SHUFFLE_BUFFER, seed=shuffle_seed, reshuffle_each_iteration=False).batch(batch_size)

    stream = tf.data.Dataset.range(first_pass, 1 << 62).flat_map(one_pass).skip(offset)
    return stream.map(_as_features).prefetch(tf.data.AUTOTUNE)


def _as_features(token_ids, padding_mask, label):
    return {"token_ids": token_ids, "padding_mask": padding_mask}, label


def _examples(channel, spec, tokenizer, file_order_seed=None):
    """Unbatched (token_ids, padding_mask, label) examples of every good row of the channel.

    With file_order_seed = (seed, pass index) (a tensor inside the training stream), the order
    of the files is shuffled by it.
    """
    import tensorflow as tf

    length = spec.max_seq_length
    table_files = [f for f in channel.files if f.format != TFRECORD and f.good_rows]
    tfrecord_files = [f for f in channel.files if f.format == TFRECORD and f.good_rows]

    def table_examples(seed, pass_index):
        files = list(table_files)
        if seed >= 0:
            np.random.default_rng([seed, pass_index]).shuffle(files)
        for summary in files:
            texts, labels = [], []
            for text, label in iter_rows(summary, spec):
                if isinstance(label, str):
                    continue
                texts.append(text)
                labels.append(label)
                if len(texts) == _TOKENIZE_CHUNK:
                    yield _tokenized(tokenizer, texts, labels)
                    texts, labels = [], []
            if texts:
                yield _tokenized(tokenizer, texts, labels)

    seed, pass_index = file_order_seed if file_order_seed is not None else (-1, 0)
    parts = []
    if table_files:
        chunks = tf.data.Dataset.from_generator(
            table_examples,
            args=(seed, pass_index),
            output_signature=(
                tf.TensorSpec([None, length], tf.int32),
                tf.TensorSpec([None, length], tf.int32),
                tf.TensorSpec([None], tf.int32),
            ),
        )
        parts.append(chunks.unbatch())
    for compressed in (False, True):
        paths = [f.path for f in tfrecord_files if f.compressed == compressed]
        if not paths:
            continue
        files = tf.data.Dataset.from_tensor_slices(paths)
        if file_order_seed is not None:
            files = files.shuffle(len(paths), seed=tf.constant(seed, tf.int64) * 7 + pass_index,
                                  reshuffle_each_iteration=False)
        records = files.flat_map(lambda path, c=compressed: tf.data.TFRecordDataset(path, "GZIP" if c else ""))
        parts.append(_parse_tfrecords(records, spec))
    dataset = parts[0]
    for part in parts[1:]:
        dataset = dataset.concatenate(part)
    return dataset


def _tokenized(tokenizer, texts, labels):
    token_ids, padding_mask = tokenizer(texts)
    return token_ids, padding_mask, np.asarray(labels, dtype=np.int32)


def _parse_tfrecords(records, spec):
    import tensorflow as tf

    length = spec.max_seq_length
    features = {
        "input_ids": tf.io.FixedLenFeature([length], tf.int64),
        "input_mask": tf.io.FixedLenFeature([length], tf.int64),
        "segment_ids": tf.io.FixedLenFeature([length], tf.int64),
        "label_ids": tf.io.FixedLenFeature([], tf.int64),
    }
    num_classes = len(spec.classes)

    def parse(record):
        example = tf.io.parse_single_example(record, features)
        return (
            tf.cast(example["input_ids"], tf.int32),
            tf.cast(example["input_mask"], tf.int32),
            tf.cast(example["label_ids"], tf.int32),
        )

    return records.map(parse).filter(lambda _ids, _mask, label: (label >= 0) & (label < num_classes))
