"""The scan: every file of a channel read once before training.

It counts good rows and bad rows per reason (the job fails when too many are bad) and hashes the
files for the run's manifest and the checkpoint fingerprint; the stream then reads the same rows.
"""

import collections
import dataclasses
import hashlib
import os
import zlib

from review_trainer.data.formats import detect_format, iter_rows
from review_trainer.errors import DataError


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
                    summary.class_counts[label] += 1
        except (OSError, EOFError, zlib.error, ValueError) as error:  # pyarrow's errors derive from these
            raise DataError(
                f"{path}: cannot be read after {summary.good_rows + sum(summary.bad_rows.values())} rows "
                f"({type(error).__name__}: {error}); is it truncated?"
            ) from error
        summaries.append(summary)
    channel = ChannelSummary(name, summaries)
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


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
