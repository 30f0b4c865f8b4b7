"""The scan: every file of a channel read once before training.

It counts good rows and bad rows per reason (the job fails when too many are bad) and hashes the
files for the run's manifest and the checkpoint fingerprint; the stream then reads the same rows.
"""

import collections
import dataclasses
import os
import random
import zlib
from array import array

import numpy as np

from review_trainer.contract.errors import DataError
from review_trainer.contract.files import sha256_file
from review_trainer.data.formats import detect_format, iter_rows


@dataclasses.dataclass
class FileSummary:
    path: str
    format: str
    compressed: bool
    size_bytes: int
    sha256: str = ""
    good_rows: int = 0
    bad_rows: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    class_counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # by class index

    def to_dict(self):
        return {
            "path": self.path, "format": self.format, "gzip": self.compressed,
            "size_bytes": self.size_bytes, "sha256": self.sha256,
            "good_rows": self.good_rows, "bad_rows": dict(self.bad_rows),
            "class_counts": {str(k): v for k, v in sorted(self.class_counts.items())},
        }


@dataclasses.dataclass
class ChannelSummary:
    name: str
    files: list
    spec: object = None  # the formats.RowSpec it was scanned with (its extra columns included)
    # With RowSpec.extra_columns (insights/bias.py), so that a channel of any size is never held in memory:
    # a uniform sample of (class index, *extra values) of the good rows, at most SAMPLE_ROWS, and
    # the rows per value of each extra column, counted over every good row
    sample: list = dataclasses.field(default_factory=list)
    extra_values: tuple = ()  # a ValueCounts per extra column

    @property
    def good_rows(self):
        return sum(f.good_rows for f in self.files)

    @property
    def bad_rows(self):
        return sum((f.bad_rows for f in self.files), collections.Counter())

    @property
    def class_counts(self):
        return sum((f.class_counts for f in self.files), collections.Counter())


def list_files(channel_dir):
    """Every file under the channel, sorted; hidden and marker files (`.x`, `_SUCCESS`) are skipped."""
    paths = []
    for root, dirs, files in os.walk(channel_dir, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        paths += [os.path.join(root, f) for f in sorted(files) if not f.startswith((".", "_"))]
    return paths


SAMPLE_ROWS = 100_000  # rows kept for the bias metrics when the spec has extra columns
MAX_DISTINCT_VALUES = 1_000  # values counted one by one per extra column (a category, not an ID)


@dataclasses.dataclass
class ValueCounts:
    """Rows per value of a column, for its first MAX_DISTINCT_VALUES distinct values; the rows of
    any later value are counted together in `others`, so an ID-like column stays small."""

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    others: int = 0
    always: frozenset = frozenset()  # values counted one by one whatever the bound (bias_facet_values)

    def add(self, value):
        if value in self.counts or len(self.counts) < MAX_DISTINCT_VALUES or value in self.always:
            self.counts[value] += 1
        else:
            self.others += 1


def scan_channel(name, channel_dir, spec, max_bad_row_fraction, facet_values=()):
    """Reads every row once: counts good and bad rows, hashes the files, checks the fraction; with
    extra columns, keeps a reservoir sample of them (seeded: the same sample on every host) and
    counts their values (facet_values: values of the first, counted whatever the bound)."""
    paths = list_files(channel_dir)
    if not paths:
        raise DataError(f"channel {name!r} ({channel_dir}) has no files")
    summaries, sample, seen, rng = [], [], 0, random.Random(0)
    extra_values = tuple(ValueCounts(always=frozenset(facet_values) if i == 0 else frozenset())
                         for i in range(len(spec.extra_columns)))
    for path in paths:
        file_format, compressed = detect_format(path)
        summary = FileSummary(path, file_format, compressed, os.path.getsize(path), sha256_file(path))
        try:
            for _, label, *extras in iter_rows(summary, spec):
                if isinstance(label, str):
                    summary.bad_rows[label] += 1
                    continue
                summary.good_rows += 1
                summary.class_counts[label] += 1
                if spec.extra_columns:
                    for counts, value in zip(extra_values, extras):
                        counts.add(value)
                    seen += 1  # Algorithm R
                    if len(sample) < SAMPLE_ROWS:
                        sample.append((label, *extras))
                    elif (slot := rng.randrange(seen)) < SAMPLE_ROWS:
                        sample[slot] = (label, *extras)
        except (OSError, EOFError, zlib.error, ValueError) as error:  # pyarrow's errors derive from these
            raise DataError(
                f"{path}: cannot be read after {summary.good_rows + sum(summary.bad_rows.values())} rows "
                f"({type(error).__name__}: {error}); is it truncated?"
            ) from error
        summaries.append(summary)
    channel = ChannelSummary(name, summaries, spec, sample, extra_values)
    check_bad_rows(channel, max_bad_row_fraction)
    return channel


def check_bad_rows(channel, max_bad_row_fraction):
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


def first_texts(channel, count):
    """The first `count` good reviews of a scanned channel (its file order)."""
    texts = []
    for summary in channel.files:
        for text, label, *_ in iter_rows(summary, channel.spec):
            if not isinstance(label, str):
                texts.append(text)
                if len(texts) == count:
                    return texts
    return texts


def read_extras(channel):
    """The class index and extra values of every good row of a scanned channel, in the order the
    evaluation reads them (its files in order, each from the top): the test set's facets beside its
    predictions. Compact, 4 bytes a row and column: (class indexes, [(codes, values) per extra
    column]), int32 arrays, values[code] the value."""
    spec = channel.spec
    labels, codes = array("i"), [array("i") for _ in spec.extra_columns]
    values = [{} for _ in spec.extra_columns]
    for summary in channel.files:
        for _, label, *extras in iter_rows(summary, spec):
            if isinstance(label, str):
                continue
            labels.append(label)
            for column_codes, column_values, value in zip(codes, values, extras):
                column_codes.append(column_values.setdefault(value, len(column_values)))
    return np.asarray(labels, np.int32), [(np.asarray(c, np.int32), list(v)) for c, v in zip(codes, values)]

