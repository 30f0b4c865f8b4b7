"""Pipe mode: a channel streamed through FIFOs, `<channel>_0`, `<channel>_1`, ..., one per pass.

SageMaker writes each FIFO once, from the first of the channel's S3 objects to the last, and closes
it; the job opens FIFO n for its n-th pass over the channel in this container (a restarted spot job
starts again at 0). A FIFO cannot be read twice, so a Pipe-mode channel is not scanned before
training: rows and bad rows are counted as they stream, and max_bad_row_fraction is checked at the
end of each pass; a pass that breaks off (a record cut short) is a DataError at that point.

RecordWrapperType says how the objects arrive:
- "RecordIO": each object is one RecordIO record (a magic number, a uint32 of a 3-bit part flag and
  a 29-bit length, the data padded to 4 bytes; an object over 512 MiB comes in parts, flag 1 or 2
  while more parts follow), read as a stream, part after part.
- "None": the objects' bytes back to back: one stream. TFRecord files and gzip members concatenate
  into one valid stream; concatenated tables repeat their header line, which is skipped (each object
  must end with a newline, or its last row runs into the next object's header).
Each object (or the one stream) is gunzipped when it starts with gzip's magic and read in the format
its first bytes show (formats.py). Parquet, read from its end, needs RecordIO (an object in memory).
TFRecord framing is checked (lengths and their checksums), not the data checksums: pure-Python
CRC-32C (TensorBoard's) would be the slowest part of the stream, and a damaged example still has to parse.
"""

import collections
import dataclasses
import gzip
import io
import os
import struct
import time
import zlib

from review_trainer.data import formats
from review_trainer.data.scan import ChannelSummary, FileSummary, check_bad_rows
from review_trainer.contract.errors import DataError

RECORDIO, NO_WRAPPER = "RecordIO", "None"
RECORDIO_MAGIC = 0xCED7230A
_WHOLE, _FIRST_PART, _MIDDLE_PART, _LAST_PART = 0, 1, 2, 3  # a record's part flags
_READ_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class Fifos:
    """Where a Pipe-mode channel's passes arrive, and how they are wrapped."""

    name: str
    prefix: str  # /opt/ml/input/data/<name>: the FIFOs are <prefix>_0, <prefix>_1, ...
    record_wrapper: str
    # SageMaker may create a pass's FIFO only once the previous one is read (as AWS's own
    # PipeModeDataset expects, it waits for the file to appear).
    fifo_wait_seconds: float = 300.0

    def fifo(self, index):
        return f"{self.prefix}_{index}"


@dataclasses.dataclass
class PassCounts:
    """What one pass has read so far; `error` is a DataError that ended it early."""

    fifo: str
    good_rows: int = 0
    bad_rows: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    objects: int = 0
    error: DataError | None = None

    def check(self, name, max_bad_row_fraction):
        """Raises the pass's DataError, or one for too many bad rows (scan.py's rule)."""
        if self.error is not None:
            raise self.error
        summary = FileSummary(self.fifo, "pipe", False, 0, good_rows=self.good_rows, bad_rows=self.bad_rows)
        check_bad_rows(ChannelSummary(name, [summary]), max_bad_row_fraction)

    def describe(self, name):
        bad = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.bad_rows.items()))
        return (f"channel={name} pipe={self.fifo} objects={self.objects} rows={self.good_rows} "
                f"bad_rows={sum(self.bad_rows.values())} {bad}").rstrip()


def read_pass(channel, fifo_index, spec, counts):
    """Yields the rows of one pass: (text, class index) from tables, (input_ids, input_mask, class
    index) from TFRecords; bad rows are counted in `counts`, not yielded."""
    path = channel.fifo(fifo_index)
    deadline = time.monotonic() + channel.fifo_wait_seconds
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        fifo = open(path, "rb", buffering=_READ_BYTES)
    except FileNotFoundError as error:
        raise DataError(f"channel {channel.name!r} is in Pipe mode but {path} did not appear within "
                        f"{channel.fifo_wait_seconds:g} s; SageMaker creates one FIFO per pass (is the channel's "
                        "TrainingInputMode right?)") from error
    with fifo:
        for name, stream in _objects(fifo, channel.record_wrapper, path):
            counts.objects += 1
            for row in _object_rows(stream, name, channel.record_wrapper, spec):
                if isinstance(row[-1], str):
                    counts.bad_rows[row[-1]] += 1
                else:
                    counts.good_rows += 1
                    yield row


def _objects(fifo, record_wrapper, path):
    """(name for messages, binary stream) of each object in the FIFO."""
    if record_wrapper == NO_WRAPPER:
        yield path, fifo
        return
    number = 0
    while True:
        header = fifo.read(8)
        if not header:
            return
        number += 1
        name = f"{path} (object {number})"
        record = _RecordIOObject(fifo, header, name)
        yield name, io.BufferedReader(record, _READ_BYTES)
        record.drain()


def _object_rows(stream, name, record_wrapper, spec):
    head = stream.read(formats.SNIFF_BYTES)
    if not head:
        return
    stream = io.BufferedReader(_Prepended(head, stream), _READ_BYTES)
    compressed = formats.is_gzip(head)
    try:
        if compressed:
            stream = gzip.GzipFile(fileobj=stream, mode="rb")
            head = stream.read(formats.SNIFF_BYTES)
            stream = io.BufferedReader(_Prepended(head, stream), _READ_BYTES)
        file_format = formats.classify(head, compressed, name)
        if file_format == formats.TFRECORD:
            for record in _tfrecords(stream, name):
                yield formats.parse_example(record, spec, name)
        elif file_format == formats.PARQUET and record_wrapper == NO_WRAPPER:
            raise DataError(f"{name}: Parquet in a Pipe-mode channel needs RecordWrapperType RecordIO (a Parquet "
                            "file is read from its end), or use File or FastFile mode")
        else:
            source = io.BytesIO(stream.read()) if file_format == formats.PARQUET else stream
            yield from formats.table_rows(source, file_format, spec, name)
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DataError(f"{name}: the gzip stream is cut short or corrupt ({error})") from error
    except DataError:
        raise
    except (OSError, ValueError) as error:  # pyarrow's errors derive from these
        raise DataError(f"{name}: cannot be read ({type(error).__name__}: {error})") from error


def _tfrecords(stream, name):
    """TFRecord framing: uint64 length, masked CRC-32C of the length, data, CRC-32C of the data."""
    count = 0
    while True:
        header = stream.read(12)
        if not header:
            return
        if len(header) < 12:
            raise DataError(f"{name}: a TFRecord record is cut short after {count} records (a partial header)")
        length, length_crc = struct.unpack("<QI", header)
        if length_crc != formats.masked_crc32c(header[:8]):
            raise DataError(f"{name}: corrupt TFRecord stream after {count} records (bad length checksum)")
        data = stream.read(length + 4)
        if len(data) < length + 4:
            raise DataError(f"{name}: a TFRecord record is cut short after {count} records "
                            f"({len(data):,} of {length + 4:,} bytes)")
        count += 1
        yield data[:length]


class _RecordIOObject(io.RawIOBase):
    """One RecordIO record of the FIFO, read as a stream, part after part."""

    def __init__(self, fifo, header, name):
        self._fifo, self._name = fifo, name
        self._start_part(header, first=True)

    def readable(self):
        return True

    def readinto(self, buffer):
        while self._left == 0:
            self._read_exactly(self._padding)
            self._padding = 0
            if not self._more:
                return 0
            self._start_part(self._fifo.read(8), first=False)
        read = self._fifo.readinto(memoryview(buffer)[:min(len(buffer), self._left)])
        if not read:
            raise DataError(f"{self._name}: the pipe ended inside a RecordIO record ({self._left:,} bytes "
                            "missing): the record is cut short")
        self._left -= read
        return read

    def drain(self):
        """Reads to the end of the record, so that the next header is where the FIFO stands."""
        buffer = bytearray(_READ_BYTES)
        while self.readinto(buffer):
            pass

    def _start_part(self, header, first):
        if len(header) < 8:
            raise DataError(f"{self._name}: the pipe ended inside a RecordIO header: the record is cut short")
        magic, size_and_flag = struct.unpack("<II", header)
        if magic != RECORDIO_MAGIC:
            raise DataError(f"{self._name}: not RecordIO (magic number {magic:#010x}, expected "
                            f"{RECORDIO_MAGIC:#010x}); is the channel's RecordWrapperType right?")
        flag = size_and_flag >> 29
        if flag not in ((_WHOLE, _FIRST_PART) if first else (_MIDDLE_PART, _LAST_PART)):
            raise DataError(f"{self._name}: a RecordIO {'record' if first else 'continuation part'} with part "
                            f"flag {flag}: the stream is corrupt")
        self._left = size_and_flag & ((1 << 29) - 1)
        self._padding = -self._left % 4
        self._more = flag in (_FIRST_PART, _MIDDLE_PART)

    def _read_exactly(self, count):
        if count and len(self._fifo.read(count)) < count:
            raise DataError(f"{self._name}: the pipe ended inside a RecordIO record's padding: cut short")


class _Prepended(io.RawIOBase):
    """`head`, then the rest of `stream`: the bytes read to tell the format are read again."""

    def __init__(self, head, stream):
        self._head, self._stream = memoryview(head), stream

    def readable(self):
        return True

    def readinto(self, buffer):
        if self._head:
            count = min(len(buffer), len(self._head))
            buffer[:count] = self._head[:count]
            self._head = self._head[count:]
            return count
        data = self._stream.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)
