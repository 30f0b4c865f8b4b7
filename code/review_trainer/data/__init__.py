"""Data: the job's channels, from files (or FIFOs) to batches, never all in memory.

    formats.py   a file's format from its first bytes; its rows, or a bad row's reason and place
    scan.py      every file read once before training: rows, bad rows per reason, SHA-256, a sample of extra columns
    sharding.py  which files and which slice of each batch a worker and its replicas read
    stream.py    tf.data: tokenized, shuffled, batched, resumable at any step
    pipe.py      Pipe mode: a channel's passes read from FIFOs (RecordIO or no wrapper), counted as they stream
    channels.py  File, FastFile and Pipe behind one Channel type: the job's channels stage

Imports only the contract. Tokenizers and topologies are handed in (model/, training/).
"""

from review_trainer.data.channels import Channels, check_inputs, open_channels
from review_trainer.data.formats import TFRECORD, RowSpec, detect_format, iter_rows, read_texts
from review_trainer.data.scan import ChannelSummary, FileSummary, describe, list_files, read_extras, scan_channel
from review_trainer.data.stream import PipePasses, bucket_lengths, make_dataset, make_training_stream

__all__ = [
    "TFRECORD", "ChannelSummary", "Channels", "FileSummary", "PipePasses", "RowSpec", "bucket_lengths",
    "check_inputs", "describe", "detect_format", "iter_rows", "list_files", "make_dataset", "make_training_stream",
    "open_channels", "read_extras", "read_texts", "scan_channel",
]
