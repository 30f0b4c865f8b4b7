"""Review files: tell a file's format by its content, and read its rows.

Formats, decided per file from its first bytes (a `.gz` is looked into first):
- TFRecord of tf.train.Example with the book's features `input_ids`, `input_mask`, `segment_ids`
  (int64, length max_seq_length) and `label_ids` (int64, 0-based): already tokenized.
- Review tables with `text_column` and `label_column`: tab-separated (the Amazon Customer Reviews
  schema: header row, no quoting), CSV, JSON Lines, Parquet. Tokenized by the stream.
- Plain text, one review per line: only where rows need no label (RowSpec.labelled false: the
  reviews `predict` is given), and the first line is no table header naming the text column.

A bad row is a BadRow: its reason (counted per reason by the scan), the line or row it is on, and
what is wrong with it in words (for `predict`, which cannot skip a review it was asked for).
"""

import csv
import dataclasses
import gzip
import io
import itertools
import json
import struct

from review_trainer.contract.errors import DataError

TFRECORD = "tfrecord"
TSV, CSV, JSONL, PARQUET, LINES = "tsv", "csv", "jsonl", "parquet", "lines"
TFRECORD_FEATURES = ("input_ids", "input_mask", "segment_ids", "label_ids")

# Reasons a row is skipped
EMPTY_TEXT = "empty_text"
UNKNOWN_LABEL = "unknown_label"
UNDECODABLE = "undecodable"
MALFORMED = "malformed"
NUL_BYTE = "nul_byte"  # a NUL inside a review: a broken export, not text

UTF8_BOM = b"\xef\xbb\xbf"  # spreadsheet exports put it before the header row
_OTHER_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16",
               b"\xfe\xff": "UTF-16"}

SNIFF_BYTES = 1 << 16
MAX_CSV_RECORD_LINES = 100


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """What a row must hold: the columns to read and the label values, in class order.

    extra_columns (the bias facet and group, insights/bias.py): read as text beside each good row,
    which then is (text, class index, *extras); without them a good row is (text, class index).
    Without a label_column (reviews to predict) a good row is (text,), and an empty text is a review."""

    text_column: str
    label_column: str | None
    classes: tuple = ()
    max_seq_length: int = 0
    extra_columns: tuple = ()

    @property
    def labelled(self):
        return self.label_column is not None

    @property
    def label_index(self):
        return {label: index for index, label in enumerate(self.classes)}

    @property
    def columns(self):
        return (self.text_column, *([self.label_column] if self.labelled else []), *self.extra_columns)


def detect_format(path):
    """Returns (format, gzip) from the file's content, or raises DataError naming the file."""
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    compressed = is_gzip(head)
    if compressed:
        try:
            with gzip.open(path, "rb") as f:
                head = f.read(SNIFF_BYTES)
        except (OSError, EOFError) as error:
            raise DataError(f"{path}: looks gzip-compressed but cannot be decompressed ({error})") from error
    return classify(head, compressed, path), compressed


def is_gzip(head):
    return head[:2] == b"\x1f\x8b"


def classify(head, compressed, name):
    """The format of content that starts with `head` (decompressed), or DataError naming `name`."""
    binary = _binary_format(head, compressed, name)
    if binary:
        return binary
    head = head.removeprefix(UTF8_BOM)
    first_line = head.split(b"\n", 1)[0]
    # Text: a header (or first record) without NUL, and NULs rare below it (a bad row each).
    if b"\x00" not in first_line and head.count(b"\x00") * 100 < len(head):
        if head.lstrip()[:1] == b"{":
            return JSONL
        if b"\t" in first_line:
            return TSV
        if b"," in first_line:
            return CSV
    raise DataError(
        f"{name}: not a format this job reads (TFRecord, tab-separated with a header row, CSV, "
        "JSON Lines or Parquet; optionally gzip-compressed)"
    )


def _binary_format(head, compressed, name):
    """PARQUET or TFRECORD, or None for text (which must be UTF-8: other encodings are refused)."""
    if head[:4] == b"PAR1":
        if compressed:
            raise DataError(f"{name}: a gzip-compressed Parquet file; Parquet compresses itself, store it uncompressed")
        return PARQUET
    if _looks_like_tfrecord(head):
        return TFRECORD
    for mark, encoding in _OTHER_BOMS.items():
        if head.startswith(mark):
            raise DataError(f"{name}: {encoding}-encoded text (it starts with the byte-order mark "
                            f"{mark.hex(' ').upper()}); save it as UTF-8")
    return None


def read_texts(content, name, text_column):
    """The reviews in `content` (the bytes of a file or of stdin), for `predict`: every format the
    job trains on, gzip included, read with the job's own readers, labels not needed; text whose
    first line is no header naming text_column is plain text, a review a line. A bad row (one
    that cannot be read: `predict` may skip none) is a DataError naming its line."""
    if is_gzip(content):
        try:
            content = gzip.decompress(content)
        except (OSError, EOFError) as error:
            raise DataError(f"{name}: looks gzip-compressed but cannot be decompressed ({error})") from error
    head = content[:SNIFF_BYTES]
    text_format = _binary_format(head, False, name)
    if text_format == TFRECORD:
        raise DataError(f"{name}: a TFRecord file holds token ids, not the reviews' text: give predict the text")
    if text_format is None:
        first_line = head.removeprefix(UTF8_BOM).split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace")
        if head.lstrip().removeprefix(UTF8_BOM)[:1] == b"{":
            text_format = JSONL
        elif text_column in first_line.split("\t"):
            text_format = TSV
        elif text_column in next(csv.reader([first_line]), []):
            text_format = CSV
        else:
            text_format = LINES
    texts = []
    for text, *bad in table_rows(io.BytesIO(content), text_format, RowSpec(text_column, None), name):
        if bad:
            raise DataError(bad[0].describe(name))
        texts.append(text)
    return texts


def _looks_like_tfrecord(head):
    # A record starts with its uint64 length and the masked CRC-32C of those 8 bytes.
    return len(head) >= 12 and struct.unpack("<I", head[8:12])[0] == masked_crc32c(head[:8])


def masked_crc32c(data):
    """TFRecord's checksum: CRC-32C, rotated and offset (TensorBoard's implementation)."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tensorboard_crc

    return tensorboard_crc(data)


class BadRow(str):
    """What a file reader yields instead of a row: the reason it is skipped (the string itself),
    where it is (`place`: "line 7", "row 7") and what is wrong in words (`detail`)."""

    def __new__(cls, reason, place=None, detail=None):
        row = super().__new__(cls, reason)
        row.place, row.detail = place, detail or reason.replace("_", " ")
        return row

    def describe(self, name):
        return f"{name}{f', {self.place}' if self.place else ''}: {self.detail}"


def iter_rows(summary, spec):
    """Yields (text, class index) for a good row and (None, reason) for a bad one.

    TFRecord rows are already tokenized: they yield (None, class index) here, for the counts.
    """
    if summary.format == TFRECORD:
        if spec.extra_columns:
            raise DataError(f"{summary.path}: a TFRecord file holds token ids and a label, no column "
                            f"{', '.join(map(repr, spec.extra_columns))}; bias_facet needs review tables "
                            "(TSV, CSV, JSON Lines, Parquet)")
        yield from _tfrecord_rows(summary, spec)
    elif summary.format == PARQUET:
        yield from _checked(_parquet_rows(summary.path, spec, summary.path), spec)
    else:
        with _open_binary(summary) as f:
            yield from table_rows(f, summary.format, spec, summary.path)


def table_rows(f, table_format, spec, name):
    """iter_rows for a review table read from the binary stream `f` (a file, or a Pipe-mode FIFO).

    A header line again below the first (files concatenated, as a Pipe-mode channel without a
    record wrapper delivers them) is skipped."""
    readers = {TSV: _tsv_rows, CSV: _csv_rows, JSONL: _jsonl_rows, LINES: _lines}
    source = _parquet_rows(f, spec, name) if table_format == PARQUET else readers[table_format](f, spec, name)
    yield from _checked(source, spec)


def _checked(rows, spec):
    """(text, class index, *extras), or (text,) without labels; (None, BadRow) for a bad row."""
    label_index = spec.label_index
    for row in rows:
        if isinstance(row, BadRow):
            yield None, row
            continue
        text, *rest = row
        text = "" if text is None else str(text).strip()
        if "\x00" in text:
            yield None, BadRow(NUL_BYTE, detail="a NUL byte in the review: a broken export, not text")
            continue
        if not spec.labelled:
            yield (text,)
            continue
        if not text:
            yield None, BadRow(EMPTY_TEXT)
            continue
        label, *extras = rest
        index = label_index.get(_label_key(label))
        if index is None:
            yield None, BadRow(UNKNOWN_LABEL)
            continue
        yield (text, index, *("" if extra is None else str(extra).strip() for extra in extras))


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


def _header_indexes(name, header, spec):
    """Where each of spec.columns is in the header (text, label, then the extra columns)."""
    missing = [c for c in spec.columns if c not in header]
    if missing:
        settings = "text_column / label_column" + (" / bias_facet / bias_group" if spec.extra_columns else "")
        raise DataError(
            f"{name}: no column {', '.join(map(repr, missing))}; its columns are "
            f"{', '.join(header)}. Set {settings} to the right names."
        )
    return [header.index(column) for column in spec.columns]


_NOT_UTF8 = "not UTF-8 text"


def _tsv_rows(f, spec, name):
    # The Amazon Customer Reviews files are tab-separated with no quoting: a quote is text.
    header_line = f.readline().removeprefix(UTF8_BOM).rstrip(b"\r\n")
    header = header_line.decode("utf-8", "replace").split("\t")
    at = _header_indexes(name, header, spec)
    for number, raw in enumerate(f, 2):
        raw = raw.rstrip(b"\r\n")
        if not raw.strip() or raw.removeprefix(UTF8_BOM) == header_line:
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield BadRow(UNDECODABLE, f"line {number}", _NOT_UTF8)
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            yield BadRow(MALFORMED, f"line {number}", f"{len(fields)} tab-separated field(s), where the header "
                         f"has {len(header)}")
            continue
        yield tuple(fields[i] for i in at)


def _lines(f, spec, name):
    """Plain text: each line that is not blank is a review (reviews to predict only)."""
    for number, raw in enumerate(f, 1):
        raw = raw.removeprefix(UTF8_BOM) if number == 1 else raw
        raw = raw.removesuffix(b"\n").removesuffix(b"\r")  # not at a form feed or U+2028: review text
        if not raw.strip():
            continue
        try:
            yield (raw.decode("utf-8"),)
        except UnicodeDecodeError:
            yield BadRow(UNDECODABLE, f"line {number}", _NOT_UTF8)


def _csv_rows(f, spec, name):
    # Undecodable bytes become U+FFFD so that one bad line cannot stop the csv reader.
    text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="replace", newline="")
    try:
        reader = csv.reader(text)
        header = next(reader, [])
        at = _header_indexes(name, header, spec)
        while True:
            first_line = reader.line_num + 1
            try:
                fields = next(reader, None)
            except csv.Error as error:  # e.g. a field over the csv module's size limit
                raise DataError(f"{name}: line {first_line}: {error}; an unclosed quote?") from error
            if fields is None:
                break
            # A quote left open takes every line after it into one field, silently: a review does
            # not run over that many lines.
            if reader.line_num - first_line >= MAX_CSV_RECORD_LINES:
                raise DataError(f"{name}: a quoted field runs from line {first_line} over "
                                f"{reader.line_num - first_line + 1} lines: an unclosed quote? Fix that line")
            if not fields or [field.removeprefix("\ufeff") for field in fields] == header:
                continue
            place = f"line {first_line}"
            if len(fields) != len(header):
                yield BadRow(MALFORMED, place, f"{len(fields)} comma-separated field(s), where the header has "
                             f"{len(header)}")
            elif any("\ufffd" in fields[i] for i in at[:len(spec.columns) - len(spec.extra_columns)]):
                yield BadRow(UNDECODABLE, place, _NOT_UTF8)  # the extra columns never make a row bad
            else:
                yield tuple(fields[i] for i in at)
    finally:
        text.detach()  # the caller closes f


MAX_KEYS_NAMED = 100  # JSON Lines keys collected for a missing column's message


def _jsonl_rows(f, spec, name):
    columns = spec.columns
    required = len(columns) - len(spec.extra_columns)  # text and label; a missing extra value is empty
    rows_with_columns, keys_seen, extras_present = 0, set(), set()
    for number, raw in enumerate(f, 1):
        if not raw.strip():
            continue
        place = f"line {number}"
        try:
            record = json.loads(raw.decode("utf-8-sig"))
        except UnicodeDecodeError:
            yield BadRow(UNDECODABLE, place, _NOT_UTF8)
            continue
        except json.JSONDecodeError as error:
            yield BadRow(MALFORMED, place, f"not JSON ({error.msg})")
            continue
        if not isinstance(record, dict) or not all(c in record for c in columns[:required]):
            keys_seen.update(record if isinstance(record, dict) else ())
            missing = [c for c in columns[:required] if not isinstance(record, dict) or c not in record]
            yield BadRow(MALFORMED, place, f"no {', '.join(map(repr, missing))} in the JSON object")
            continue
        rows_with_columns += 1
        if len(extras_present) < len(spec.extra_columns):  # until each is seen: the keys, for the message
            extras_present.update(c for c in spec.extra_columns if c in record)
            keys_seen.update(itertools.islice(record, max(MAX_KEYS_NAMED - len(keys_seen), 0)))
        yield tuple(record.get(c) for c in columns)
    if keys_seen and not rows_with_columns:
        _header_indexes(name, sorted(keys_seen), spec)  # raises: names the missing column
    if rows_with_columns and len(extras_present) < len(spec.extra_columns):  # an extra column in no row at all
        _header_indexes(name, sorted(keys_seen | set(columns[:required]) | extras_present), spec)  # raises


def _parquet_rows(source, spec, name):
    """source: a path, or a seekable binary file (Parquet's footer is at the end)."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source)
    except Exception as error:  # noqa: BLE001 - pyarrow raises several types for a broken file
        raise DataError(f"{name}: unreadable Parquet file ({error})") from error
    _header_indexes(name, parquet.schema_arrow.names, spec)
    for batch in parquet.iter_batches(batch_size=4096, columns=list(spec.columns)):
        yield from zip(*(batch.column(column).to_pylist() for column in spec.columns))


def _tfrecord_rows(summary, spec):
    import tensorflow as tf

    dataset = tf.data.TFRecordDataset(summary.path, compression_type="GZIP" if summary.compressed else "")
    try:
        for record in dataset.as_numpy_iterator():
            _, _, label = parse_example(record, spec, summary.path)
            yield None, label
    except tf.errors.DataLossError as error:
        raise DataError(f"{summary.path}: truncated or corrupt TFRecord file ({error.message})") from error


def parse_example(record, spec, name):
    """(input_ids, input_mask, class index or bad-row reason) of one serialized tf.train.Example."""
    from tensorflow.core.example import example_pb2

    try:
        features = example_pb2.Example.FromString(record).features.feature
    except Exception as error:  # noqa: BLE001 - protobuf's DecodeError
        raise DataError(f"{name}: a TFRecord record that is not a tf.train.Example ({error})") from error
    missing = [feature for feature in TFRECORD_FEATURES if feature not in features]
    if missing:
        raise DataError(
            f"{name}: TFRecord example without feature(s) {', '.join(missing)}; "
            f"expected {', '.join(TFRECORD_FEATURES)} (the book's chapter-6 format)"
        )
    values = {feature: features[feature].int64_list.value for feature in TFRECORD_FEATURES}
    for feature in ("input_ids", "input_mask", "segment_ids"):
        if len(values[feature]) != spec.max_seq_length:
            raise DataError(
                f"{name}: feature {feature} has length {len(values[feature])} but "
                f"max_seq_length is {spec.max_seq_length}; set max_seq_length="
                f"{len(values[feature])} or re-tokenize the data"
            )
    labels = values["label_ids"]
    if len(labels) != 1 or not 0 <= labels[0] < len(spec.classes):
        return None, None, UNKNOWN_LABEL
    return values["input_ids"], values["input_mask"], int(labels[0])
