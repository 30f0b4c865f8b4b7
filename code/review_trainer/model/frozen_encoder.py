"""The frozen encoder's cache: its outputs computed once, in the first epoch, and the head trained on them.

With `freeze_bert_layer=true` the encoder runs in inference mode (classifier.py), so what it gives the
head is a fixed function of a review's token ids: computing it again every epoch is waste. The
cache is a stage on the training stream, after batching and length bucketing:

    ({token_ids, padding_mask}, labels)  ->  ({encoder_output}, labels)

Each review is looked up by a hash of its token ids and mask up to its used length (content
addressed: no example ids in the stream, so shuffling, length buckets, exact resume, sharding and
Pipe mode need nothing from it; a repeated review is stored once). The reviews of a batch that are
not cached yet run through the encoder here, in inference mode, and are stored; the training step
then trains the head alone (training/loop.py). A resumed job starts with an empty cache and fills it.

What a review costs: `cls` keeps the [CLS] (or pooled) vector, hidden values; `bilstm` keeps the
whole sequence output, max_seq_length x hidden values (computed at max_seq_length, so that any
later length bucket is a slice of it), in the compute dtype (bfloat16 under mixed_bfloat16, as the
head reads it), plus about INDEX_BYTES of index. Rows stay in memory up to MEMORY_SHARE of the
memory available at the start, then go to a spill file in the temporary folder ($TMPDIR, else
/tmp), up to DISK_SHARE of its free space; past both, the remaining reviews are not cached and run
through the encoder every epoch. The spill file is unlinked as soon as it is created: it takes no
name, and its space returns when the job ends, however it ends.
"""

import hashlib
import os
import tempfile
import threading

import numpy as np
from review_trainer.model.classifier import ENCODER_OUTPUT
from review_trainer.model.inference import compiled_inference

MEMORY_SHARE = 0.5  # of the memory available when training starts
DISK_SHARE = 0.5  # of the temporary folder's free space
INDEX_BYTES = 160  # per review: its 16-byte key, its row number and their dict entry (measured: ~150)
CHUNK_BYTES = 16 << 20  # the store grows by chunks of this size


def available_memory():
    """Bytes this process may still use: MemAvailable, or less where the container's cgroup says so."""
    candidates = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f, open(usage_file) as g:
                limit = f.read().strip()
                if limit != "max" and int(limit) < 1 << 60:  # v1 writes a huge number for no limit
                    candidates.append(max(0, int(limit) - int(g.read())))
            break
        except (OSError, ValueError):
            continue
    if not candidates:
        candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return min(candidates)


class FeatureStore:
    """Rows of one shape and dtype, appended and read back by row number: in memory while the rows
    and their index fit memory_bound bytes, then in the spill file up to spill_bound bytes, then full."""

    def __init__(self, row_shape, dtype, memory_bound, spill_bound, spill_dir, chunk_bytes=CHUNK_BYTES):
        self.row_shape, self.dtype = tuple(row_shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        self.memory_bound, self.spill_bound, self.spill_dir = memory_bound, spill_bound, spill_dir
        self.chunk_rows = max(1, chunk_bytes // self.row_bytes)
        self.chunks = []  # each chunk_rows rows: numpy arrays first, then memmaps of the spill file
        self.rows = 0
        self.memory_bytes = 0  # of the chunks in memory
        self.spill_bytes = 0  # of the spill file
        self.full = False
        self._spill_file = None

    def append(self, value):
        """Stores one row; returns its row number, or None when the store is full."""
        if self.rows == len(self.chunks) * self.chunk_rows and not self._grow():
            return None
        chunk, offset = divmod(self.rows, self.chunk_rows)
        self.chunks[chunk][offset] = value
        self.rows += 1
        return self.rows - 1

    def row(self, number):
        chunk, offset = divmod(number, self.chunk_rows)
        return self.chunks[chunk][offset]

    def _grow(self):
        chunk_bytes = self.chunk_rows * self.row_bytes
        index_bytes = (len(self.chunks) + 1) * self.chunk_rows * INDEX_BYTES  # the index stays in memory
        if self.memory_bytes + chunk_bytes + index_bytes <= self.memory_bound:
            self.chunks.append(np.empty((self.chunk_rows, *self.row_shape), self.dtype))
            self.memory_bytes += chunk_bytes
        elif self.spill_bytes + chunk_bytes <= self.spill_bound:
            if self._spill_file is None:
                self._spill_file = tempfile.TemporaryFile(dir=self.spill_dir, prefix="review-trainer-frozen-encoder-")
            os.ftruncate(self._spill_file.fileno(), self.spill_bytes + chunk_bytes)
            self.chunks.append(np.memmap(self._spill_file, self.dtype, "r+", offset=self.spill_bytes,
                                         shape=(self.chunk_rows, *self.row_shape)))
            self.spill_bytes += chunk_bytes
        else:
            self.full = True
            return False
        return True

    def close(self):
        self.chunks = []
        if self._spill_file is not None:
            self._spill_file.close()


class EncoderCache:
    """The cache stage of the training stream; also a training-loop hook that prints its counts."""

    def __init__(self, encoder, max_seq_length, pad_id, memory_bound=None, spill_dir=None, spill_bound=None,
                 chunk_bytes=CHUNK_BYTES, print_fn=print):
        import tensorflow as tf

        self.encoder = encoder
        self.max_seq_length, self.pad_id = max_seq_length, pad_id
        output = encoder.output
        # bilstm reads every position: keep all max_seq_length of them, and cut each batch's from them
        self.sequence = len(output.shape) == 3
        self.tf_dtype = tf.as_dtype(output.dtype)
        hidden = output.shape[-1]
        row_shape = (max_seq_length, hidden) if self.sequence else (hidden,)
        self.spill_dir = spill_dir or tempfile.gettempdir()
        self.memory_bound = int(MEMORY_SHARE * available_memory()) if memory_bound is None else memory_bound
        if spill_bound is None:
            disk = os.statvfs(self.spill_dir)
            spill_bound = int(DISK_SHARE * disk.f_bavail * disk.f_frsize)
        self.store = FeatureStore(row_shape, self.tf_dtype.as_numpy_dtype, self.memory_bound, spill_bound,
                                  self.spill_dir, chunk_bytes)
        self.rows = {}  # key of a review -> its row in the store
        self.encoded = self.from_cache = 0  # reviews, since the last epoch line
        self.print_fn = print_fn
        self._lock = threading.Lock()  # tf.data may call the stage from more than one thread
        self._encode = compiled_inference(encoder)  # inference mode: the same outputs as in training

    @property
    def per_review_bytes(self):
        return self.store.row_bytes + INDEX_BYTES

    def describe(self, expected_reviews):
        """The line the job prints at the start: the choice, the bound, what a review costs, the expected size."""
        store = self.store
        shape = " x ".join(map(str, store.row_shape))
        what = f"{shape} {self.tf_dtype.name} values ({'the sequence output' if self.sequence else 'the [CLS] vector'})"
        memory_rows = max(0, store.memory_bound // self.per_review_bytes)
        spill_rows = store.spill_bound // store.row_bytes
        if expected_reviews is None:
            storage = "memory+spill_file reviews=unknown (Pipe mode: in memory up to the bound, then in the spill file)"
        else:
            size = f"reviews={expected_reviews} expected_bytes={_size(expected_reviews * self.per_review_bytes)}"
            if expected_reviews <= memory_rows:
                storage = f"memory {size}"
            elif expected_reviews <= memory_rows + spill_rows:
                storage = f"memory+spill_file {size} (about {memory_rows} reviews in memory, the rest in the spill file)"
            else:
                storage = (f"memory+spill_file {size} capped_at={memory_rows + spill_rows} (the other reviews run "
                           "through the encoder every epoch)")
        return (f"frozen_encoder_cache=on storage={storage} per_review_bytes={self.per_review_bytes} "
                f"({what}, {store.row_bytes} bytes, and about {INDEX_BYTES} of index) "
                f"memory_bound={_size(store.memory_bound)} ({MEMORY_SHARE:.0%} of the available memory) "
                f"spill_dir={self.spill_dir} spill_bound={_size(store.spill_bound)} ({DISK_SHARE:.0%} of its free space)")

    # The stage
    def stage(self, batches):
        """Per-replica batches of token ids -> the same batches as encoder outputs."""
        import tensorflow as tf

        def cached(features, labels):
            outputs = tf.numpy_function(self.encoder_outputs, [features["token_ids"], features["padding_mask"]],
                                        self.tf_dtype, stateful=True)
            outputs.set_shape([None, None, self.store.row_shape[-1]] if self.sequence else [None, self.store.row_shape[-1]])
            return {ENCODER_OUTPUT: outputs}, labels

        return batches.map(cached).prefetch(tf.data.AUTOTUNE)

    def encoder_outputs(self, token_ids, padding_mask):
        """The encoder's outputs for a batch: from the store, or computed (and stored) when missing."""
        length = token_ids.shape[1]
        keys = [review_key(ids, mask) for ids, mask in zip(token_ids, padding_mask)]
        with self._lock:
            numbers = [self.rows.get(key, -1) for key in keys]
        missing = {}  # key -> its place among the reviews to encode (a review twice in a batch is encoded once)
        for key, number in zip(keys, numbers):
            if number < 0:
                missing.setdefault(key, len(missing))
        outputs = np.empty((len(keys), length, *self.store.row_shape[1:]) if self.sequence
                           else (len(keys), *self.store.row_shape), self.store.dtype)
        if missing:
            first = [keys.index(key) for key in missing]
            encoded = self._run_encoder(token_ids[first], padding_mask[first])
        with self._lock:
            for key, place in missing.items():
                if key not in self.rows and not self.store.full:
                    number = self.store.append(encoded[place])
                    if number is None:
                        self._tell_full()
                    else:
                        self.rows[key] = number
            for i, (key, number) in enumerate(zip(keys, numbers)):
                if number >= 0:
                    outputs[i] = self.store.row(number)[:length] if self.sequence else self.store.row(number)
                else:
                    outputs[i] = encoded[missing[key], :length] if self.sequence else encoded[missing[key]]
            self.encoded += len(missing)
            self.from_cache += len(keys) - len(missing)
        return outputs

    def _run_encoder(self, token_ids, padding_mask):
        if self.sequence and token_ids.shape[1] < self.max_seq_length:
            # Padded back to max_seq_length as the tokenizer pads: the stored row serves every bucket.
            extra = ((0, 0), (0, self.max_seq_length - token_ids.shape[1]))
            token_ids = np.pad(token_ids, extra, constant_values=self.pad_id)
            padding_mask = np.pad(padding_mask, extra)
        encoded = self._encode({"token_ids": token_ids, "padding_mask": padding_mask})
        return np.asarray(encoded).astype(self.store.dtype, copy=False)

    def _tell_full(self):
        self.print_fn(f"frozen_encoder_cache full after {self.store.rows} reviews (memory {_size(self.store.memory_bytes)}, "
                      f"spill file {_size(self.store.spill_bytes)}): the reviews not cached run through the encoder "
                      "every epoch")

    # Hook: one line per epoch, after the training pass
    def on_epoch_trained(self, epoch, step):
        """Counted as the stream reads, which is a few batches ahead of the training step."""
        self.print_fn(f"frozen_encoder_cache epoch={epoch} encoded={self.encoded} from_cache={self.from_cache} "
                      f"cached_reviews={len(self.rows)} cached_bytes={self.store.rows * self.store.row_bytes} "
                      f"spill_file_bytes={self.store.spill_bytes}")
        self.encoded = self.from_cache = 0

    def close(self):
        self.store.close()


def review_key(token_ids, padding_mask):
    """A review's key: a hash of its token ids and mask up to its last unmasked position."""
    used = int(np.flatnonzero(padding_mask)[-1]) + 1 if padding_mask.any() else 0
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.ascontiguousarray(token_ids[:used], np.int32).tobytes())
    digest.update(np.ascontiguousarray(padding_mask[:used], np.int32).tobytes())
    return digest.digest()


def _size(count):
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
