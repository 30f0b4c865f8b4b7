"""Channels: find the files, tell their format by content, scan them, and stream them to the model.

    formats.py   a file's format from its first bytes; its rows as (text, class index) or a bad-row reason
    scan.py      every file read once before training: rows, bad rows per reason, SHA-256, a sample of extra columns
    sharding.py  which files and which slice of each batch a worker and its replicas read
    stream.py    tf.data: tokenized, shuffled, batched, resumable at any step
    pipe.py      Pipe mode: a channel's passes read from FIFOs (RecordIO or no wrapper), counted as they stream
"""

from review_trainer.data.formats import TFRECORD, RowSpec, detect_format, iter_rows
from review_trainer.data.scan import (ChannelSummary, FileSummary, describe, list_files, read_extras, scan_channel,
                                     sha256_file)
from review_trainer.data.pipe import PipeChannel
from review_trainer.data.stream import PipePasses, bucket_lengths, make_dataset, make_training_stream

__all__ = [
    "TFRECORD", "ChannelSummary", "FileSummary", "RowSpec", "describe", "detect_format", "iter_rows",
    "list_files", "make_dataset", "read_extras", "make_training_stream", "scan_channel", "sha256_file", "PipeChannel", "PipePasses", "bucket_lengths",
]
