"""The stream: a channel's rows, tokenized, shuffled and batched through tf.data, never all in memory.

Training reads an endless stream, pass 0, pass 1, ... of this worker's files (see sharding.py for
which files and which slice of each batch); validation and test read the files once, in order.
A Pipe-mode channel is read a pass at a time instead, each pass a FIFO (PipePasses, pipe.py).
channels.py hands these to the job behind one Channel type.
"""

import numpy as np
from review_trainer.data import pipe, sharding
from review_trainer.data.formats import TFRECORD, iter_rows
from review_trainer.contract.errors import DataError

_TOKENIZE_CHUNK = 512  # rows per tokenizer call
_SHUFFLE_BUFFER = 10_000  # examples
_BUCKETS = 4  # length buckets: max_seq_length / 4, 2/4, 3/4, 4/4 (rounded up to 8): few shapes to compile
_BUCKET_WINDOW = 32  # batches whose examples are sorted by length together


def bucket_lengths(max_seq_length):
    """The lengths training batches are cut to (bucket_by_length)."""
    fractions = (-(-max_seq_length * k // _BUCKETS) for k in range(1, _BUCKETS + 1))  # rounded up
    return sorted({min(max_seq_length, (length + 7) // 8 * 8) for length in fractions})


def make_dataset(channel, spec, tokenizer, batch_size, *, repeat=False, endless=False, shard=None):
    """Per-replica batches of ({"token_ids", "padding_mask"}, label) in file order, for validation
    and test. Without a shard: plain batches of the whole channel. repeat: the rows again and
    again; endless: empty batches after the rows (a worker with fewer rows than another keeps
    stepping with it)."""
    import tensorflow as tf

    shard = shard or sharding.whole(channel)
    dataset = _replica_batches(_examples(shard.files, spec, tokenizer), shard, batch_size)
    if repeat:
        dataset = dataset.repeat()
    elif endless:
        dataset = dataset.concatenate(_empty_batches(spec))
    return dataset.map(_as_features).prefetch(tf.data.AUTOTUNE)


def make_training_stream(channel, spec, tokenizer, batch_size, seed, start_step=0, shard=None, bucket_by_length=False):
    """The endless training stream of per-replica batches, from step `start_step` on.

    Pass p is this worker's files in an order and through a 10,000-example shuffle buffer seeded
    by (seed, p), ended with empty batches when another worker has more rows (sharding.py); the
    stream is pass 0, pass 1, ... The batches of step n depend only on n, so a job resumed at
    global step n reads exactly what an uninterrupted job would have read from step n on.

    bucket_by_length: the examples of 32 batches are sorted by length together, cut into batches
    (as many as without: every example once), each batch cut to the shortest of a few lengths
    (bucket_lengths) that holds its longest review, and the batches shuffled (seeded). Less
    padding, the same batch count, still a function of the step.
    """
    import tensorflow as tf

    shard = shard or sharding.whole(channel)
    steps_per_pass = shard.steps_per_pass(batch_size)
    first_pass, offset = divmod(start_step, steps_per_pass)

    @tf.autograph.experimental.do_not_convert  # plain Python that builds a dataset
    def one_pass(pass_index):
        examples = _examples(shard.files, spec, tokenizer, file_order_seed=(seed, pass_index))
        shuffle_seed = tf.constant(seed, tf.int64) * 1_000_003 + pass_index
        shuffled = examples.shuffle(_SHUFFLE_BUFFER, seed=shuffle_seed, reshuffle_each_iteration=False)
        batches = _replica_batches(shuffled, shard, batch_size, spec, bucket_seed=shuffle_seed if bucket_by_length else None)
        batches = batches.concatenate(_empty_batches(spec))
        return batches.take(steps_per_pass * shard.local_replicas)

    stream = tf.data.Dataset.range(first_pass, 1 << 62).flat_map(one_pass).skip(offset * shard.local_replicas)
    return stream.map(_as_features).prefetch(tf.data.AUTOTUNE)


class PipePasses:
    """A Pipe-mode channel, pass after pass: the n-th pass of this container reads FIFO n.

    A pass is a finite dataset of per-replica batches, shuffled for training like a File-mode pass
    (buffer seeded by (seed, pass index), so a resumed pass that skips its consumed steps reads what
    the interrupted one would have). After its last batch, `finish` raises what went wrong in it (a
    record cut short, too many bad rows) and returns its counts. With several workers, `finish`
    is a collective: every worker raises when one worker's pass broke off, or when the workers read
    different numbers of rows (their FIFOs differ).
    """

    def __init__(self, fifos, spec, tokenizer, batch_size, max_bad_row_fraction, shard=None, *, seed=None,
                 topology=None, bucket_by_length=False, stage=None):
        self.fifos, self.spec, self.tokenizer = fifos, spec, tokenizer
        self.stage = stage or (lambda batches: batches)  # the last stage of a training pass (model/frozen_encoder.py)
        self.batch_size, self.max_bad_row_fraction = batch_size, max_bad_row_fraction
        self.shard = shard or sharding.Shard(sharding.CHANNEL, ())
        self.seed = seed  # None: not shuffled (evaluation)
        self.bucket_by_length = bucket_by_length and seed is not None  # training only
        self.topology = topology  # None: this process alone (the chief's test pass)
        self.opened = 0  # FIFOs opened by this container
        self.counts = None
        self.passes = []  # counts of each finished pass, for the manifest

    def epoch(self, epoch, skip_steps=0):
        """The training loop's batches of an epoch (1-based): the next FIFO, distributed."""
        return self.topology.distribute(lambda: self.stage(self.dataset(pass_index=epoch - 1, skip_steps=skip_steps)))

    def dataset(self, *, pass_index=0, skip_steps=0):
        import tensorflow as tf

        fifo_index, self.opened = self.opened, self.opened + 1
        counts = self.counts = pipe.PassCounts(self.fifos.fifo(fifo_index))
        length = self.spec.max_seq_length

        def chunks():
            try:
                yield from _chunks(pipe.read_pass(self.fifos, fifo_index, self.spec, counts), self.tokenizer)
            except DataError as error:  # tf.data would turn it into its own error: `finish` raises it
                counts.error = error
            except OSError as error:
                counts.error = DataError(f"{counts.fifo}: cannot be read ({error})")

        examples = tf.data.Dataset.from_generator(chunks, output_signature=(
            tf.TensorSpec([None, length], tf.int32), tf.TensorSpec([None, length], tf.int32),
            tf.TensorSpec([None], tf.int32))).unbatch()
        pass_seed = None if self.seed is None else self.seed * 1_000_003 + pass_index
        if pass_seed is not None:
            examples = examples.shuffle(_SHUFFLE_BUFFER, seed=pass_seed, reshuffle_each_iteration=False)
        batches = _replica_batches(examples, self.shard, self.batch_size, self.spec,
                                   bucket_seed=pass_seed if self.bucket_by_length else None)
        batches = batches.skip(skip_steps * self.shard.local_replicas)
        return batches.map(_as_features).prefetch(tf.data.AUTOTUNE)

    def finish(self):
        counts = self.counts
        print(counts.describe(self.fifos.name))
        if self.topology is not None and self.topology.num_workers > 1:
            failed, rows = self.topology.sum_over_workers([counts.error is not None, counts.good_rows])
            if failed and counts.error is None:
                counts.error = DataError(f"channel {self.fifos.name!r}: the pass broke off on another host "
                                         "(its failure file says why)")
            elif rows != counts.good_rows * self.topology.num_workers and counts.error is None:
                counts.error = DataError(
                    f"channel {self.fifos.name!r}: the hosts read different numbers of rows in the same pass "
                    f"({counts.good_rows} here, {int(rows)} in all); with FullyReplicated every host's FIFO should "
                    "carry the whole channel")
        counts.check(self.fifos.name, self.max_bad_row_fraction)
        self.passes.append({"fifo": counts.fifo, "objects": counts.objects, "rows": counts.good_rows,
                            "bad_rows": dict(counts.bad_rows)})
        return counts


def _chunks(rows, tokenizer):
    """(token_ids, padding_mask, labels) arrays of up to _TOKENIZE_CHUNK rows: tables' texts are
    tokenized here, TFRecords' ids pass through."""
    texts, text_labels, token_rows = [], [], []
    for row in rows:
        if len(row) == 2:
            texts.append(row[0])
            text_labels.append(row[1])
            if len(texts) == _TOKENIZE_CHUNK:
                yield _tokenized(tokenizer, texts, text_labels)
                texts, text_labels = [], []
        else:
            token_rows.append(row)
            if len(token_rows) == _TOKENIZE_CHUNK:
                yield _stacked(token_rows)
                token_rows = []
    if texts:
        yield _tokenized(tokenizer, texts, text_labels)
    if token_rows:
        yield _stacked(token_rows)


def _stacked(token_rows):
    ids, masks, labels = zip(*token_rows)
    return np.asarray(ids, np.int32), np.asarray(masks, np.int32), np.asarray(labels, np.int32)


def _replica_batches(examples, shard, batch_size, spec=None, bucket_seed=None):
    """Groups of batch_size x group_replicas examples, each cut into this worker's replica slices.
    With bucket_seed, the groups are bucketed by length (make_training_stream)."""
    import tensorflow as tf

    first, count = shard.first_slice, shard.local_replicas
    group_size = batch_size * shard.group_replicas
    if bucket_seed is None:
        groups = examples.batch(group_size)
    else:
        groups = _length_bucketed(examples, group_size, bucket_lengths(spec.max_seq_length), bucket_seed)
    if shard.group_replicas == 1:
        return groups

    def slices(*group):
        def replica_slice(i):
            start = (first + i) * batch_size
            return tuple(tensor[start:start + batch_size] for tensor in group)
        return tf.data.Dataset.range(count).map(replica_slice)

    return groups.flat_map(slices)


def _length_bucketed(examples, group_size, lengths, seed):
    """Groups of group_size examples of like length, each cut to its bucket (see make_training_stream)."""
    import tensorflow as tf

    lengths = tf.constant(lengths, tf.int32)

    def used_length(mask):  # up to the last unmasked position, whatever the mask's layout
        positions = tf.range(1, tf.shape(mask)[-1] + 1)
        return tf.reduce_max(tf.where(mask > 0, positions, 0), axis=-1)

    def sort_window(token_ids, padding_mask, labels):
        order = tf.argsort(used_length(padding_mask), stable=True)
        return tf.gather(token_ids, order), tf.gather(padding_mask, order), tf.gather(labels, order)

    def cut(token_ids, padding_mask, labels):
        longest = tf.reduce_max(used_length(padding_mask))
        length = tf.gather(lengths, tf.searchsorted(lengths, [longest])[0])
        return token_ids[:, :length], padding_mask[:, :length], labels

    groups = examples.batch(group_size * _BUCKET_WINDOW).map(sort_window).unbatch().batch(group_size).map(cut)
    return groups.shuffle(_BUCKET_WINDOW, seed=seed, reshuffle_each_iteration=False)


def _empty_batches(spec):
    """Endless batches of no examples: a worker with fewer rows steps on with the others."""
    import tensorflow as tf

    nothing = tf.zeros([0, spec.max_seq_length], tf.int32)
    return tf.data.Dataset.from_tensors((nothing, nothing, tf.zeros([0], tf.int32))).repeat()


def _as_features(token_ids, padding_mask, label):
    return {"token_ids": token_ids, "padding_mask": padding_mask}, label


def _examples(files, spec, tokenizer, file_order_seed=None):
    """Unbatched (token_ids, padding_mask, label) examples of every good row of the files.

    With file_order_seed = (seed, pass index) (a tensor inside the training stream), the order
    of the files is shuffled by it.
    """
    import tensorflow as tf

    length = spec.max_seq_length
    table_files = [f for f in files if f.format != TFRECORD and f.good_rows]
    tfrecord_files = [f for f in files if f.format == TFRECORD and f.good_rows]

    def table_examples(seed, pass_index):
        ordered = list(table_files)
        if seed >= 0:
            np.random.default_rng([seed, pass_index]).shuffle(ordered)
        for summary in ordered:
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
        path_dataset = tf.data.Dataset.from_tensor_slices(paths)
        if file_order_seed is not None:
            path_dataset = path_dataset.shuffle(len(paths), seed=tf.constant(seed, tf.int64) * 7 + pass_index,
                                                reshuffle_each_iteration=False)
        records = path_dataset.flat_map(lambda path, c=compressed: tf.data.TFRecordDataset(path, "GZIP" if c else ""))
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
