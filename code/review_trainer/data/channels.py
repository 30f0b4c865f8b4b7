"""The job's channels, one Channel type whatever their input mode (File, FastFile or Pipe).

A File or FastFile channel is a folder (FastFile streams it from S3 behind the same folder): it is
scanned before training, on every host (scan.py), and read as often as needed. A Pipe-mode
channel is a FIFO per pass (pipe.py), read once each: it is not scanned, its rows are counted as
they stream, and each pass is checked where it ends. The rest of the job sees only a Channel:

    describe()          its start lines
    summary             what the scan found (None: not scanned), for the class-balance rule and
                        the bias report's sample
    read_once           why it cannot be read again (None: it can), for the explanations and the bias report
    own_files           this host has only its own share of the files (ShardedByS3Key on several hosts)
    fingerprint()       what a checkpoint must have been trained on
    training(...)       the training passes: each epoch's batches, and where a resumed job starts
    evaluation(...)     the validation passes, one per epoch, every host taking its share
    test_pass(...)      the test set, read once on the chief
    manifest_files()    the files (or none) and manifest_passes() the passes read, for manifest.json

Each pass object has `finish()`, called where the pass ends: it raises what went wrong in a pass
that was streamed (a record cut short, too many bad rows) and does nothing for a scanned one. The
training passes know how long the job is (total_steps; None when an epoch is as long as its
stream), where a resumed job starts (resume_point), and begin streaming once told from which step
and through which last stage (start: the frozen encoder's cache, model/frozen_encoder.py).
`check_inputs` refuses, at start-up and without TensorFlow, what a channel's mode cannot do.
Topologies are duck-typed (num_workers, worker_index, replicas, local_replicas, distribute,
barrier, sum_over_workers): training/topology.py is the one this package is handed.
"""

import dataclasses
import itertools

from review_trainer.contract.environment import TRAIN_CHANNEL
from review_trainer.contract.errors import DataError, HyperparameterError
from review_trainer.data import pipe, scan, sharding, stream
from review_trainer.data.formats import RowSpec

TRAIN, VALIDATION, TEST = TRAIN_CHANNEL, "validation", "test"
_STEPS_SETTING = {TRAIN: "train_steps_per_epoch", VALIDATION: "validation_steps", TEST: "test_steps"}


def _read_by_the_job(hp):
    """{channel: whether the job reads it, when present}."""
    return {TRAIN: True, VALIDATION: hp.run_validation, TEST: hp.run_test}


def check_inputs(env, hp, num_workers):
    """Before TensorFlow is imported: a train channel exists, and no channel the job reads asks for
    what its input mode cannot do (DataError or HyperparameterError)."""
    if TRAIN not in env.channel_dirs and TRAIN not in env.pipe_channels:
        present = [*env.channel_dirs, *env.pipe_channels]
        raise DataError(f"the required channel 'train' is missing: expected files under {env.base_dir}/input/data/"
                        f"train (channels present: {', '.join(present) or 'none'})")
    for name, read in _read_by_the_job(hp).items():
        if not read or name not in env.pipe_channels:
            continue
        setting = _STEPS_SETTING[name]
        if getattr(hp, setting) is not None:
            raise HyperparameterError(
                f"{setting} is set, but channel {name!r} is in Pipe mode, where a pass is one FIFO, read to its end; "
                f"unset {setting}, or use File or FastFile mode")
        if sharding.own_files(env.channel_distribution[name], num_workers):
            raise DataError(
                f"channel {name!r}: Pipe mode with S3DistributionType=ShardedByS3Key on {num_workers} hosts: the "
                "hosts' passes would end at different steps; use FullyReplicated (each host streams the channel and "
                "keeps its share of each batch), or File or FastFile mode")


@dataclasses.dataclass(frozen=True)
class Channels:
    """The job's channels as opened at the start; validation and test are None when absent or not run."""

    spec: RowSpec  # text and label columns, classes, max_seq_length: how every channel's rows are read
    train: "Channel"
    validation: "Channel | None"
    test: "Channel | None"
    train_passes: "StreamPasses | PipeTrainingPasses"  # what the training loop reads of the train channel
    validation_passes: "DatasetPasses | PipeEvaluationPasses | None"  # and of the validation channel

    def manifest(self):
        """manifest.json's data (each channel's files) and pipe_mode (each streamed channel's passes)."""
        channels = [c for c in (self.train, self.validation, self.test) if c is not None]
        return {"data": {c.name: c.manifest_files() for c in channels},
                "pipe_mode": {c.name: c.manifest_passes() for c in channels if c.manifest_passes() is not None}}


def open_channels(env, hp, topology, tokenizer, print_fn=print):
    """The channels stage, on every host: each channel scanned (or, in Pipe mode, described), the
    hosts then wait for each other (they scan data of different sizes); then which part of the
    train and validation channels this worker reads. Bad data fails every host here, before
    training. Train and test are scanned with the bias columns (bias_facet, bias_group)."""
    spec = RowSpec(hp.text_column, hp.label_column, hp.classes, hp.max_seq_length)
    with_extras = dataclasses.replace(spec, extra_columns=tuple(c for c in (hp.bias_facet, hp.bias_group) if c))
    opened = {}
    for name, is_wanted in _read_by_the_job(hp).items():
        if name not in env.channel_dirs and name not in env.pipe_channels:
            print_fn(f"channel={name} skipped: no {name} channel")
            continue
        if not is_wanted:
            print_fn(f"channel={name} skipped: run_{name}=false")
            continue
        own_files = sharding.own_files(env.channel_distribution[name], topology.num_workers)
        if name in env.pipe_channels:
            channel = PipeChannel(name, own_files, pipe.Fifos(name, *env.pipe_channels[name]))
        else:
            channel = ScannedChannel(name, own_files, scan.scan_channel(
                name, env.channel_dirs[name], with_extras if name != VALIDATION else spec, hp.max_bad_row_fraction,
                facet_values=hp.bias_facet_values or ()))
        for line in channel.describe():
            print_fn(line)
        opened[name] = channel
    topology.barrier("the data scan")
    train, validation = opened[TRAIN], opened.get(VALIDATION)
    return Channels(spec, train, validation, opened.get(TEST), train.training(spec, tokenizer, hp, topology, print_fn),
                    validation and validation.evaluation(spec, tokenizer, hp, topology, print_fn))


@dataclasses.dataclass
class Channel:
    name: str
    own_files: bool  # ShardedByS3Key on several hosts: this host reads (and scanned) its own files only

    summary = None  # scan.ChannelSummary of a scanned channel
    read_once = None  # why the channel cannot be read a second time


class ScannedChannel(Channel):
    """File or FastFile: a folder, scanned before training; read as often as needed."""

    def __init__(self, name, own_files, summary):
        super().__init__(name, own_files)
        self.summary = summary

    def describe(self):
        return scan.describe(self.summary)

    def fingerprint(self):
        return {f"{self.name} file {f.path.rsplit('/', 1)[-1]} sha256": f.sha256 for f in self.summary.files}

    def manifest_files(self):
        return [f.to_dict() for f in self.summary.files]

    def manifest_passes(self):
        return None

    def training(self, spec, tokenizer, hp, topology, print_fn=print):
        shard = sharding.for_training(self.summary, topology, self.own_files)
        print_fn(f"channel={self.name} {shard.describe(hp.train_batch_size)}")

        def batches(start_step, stage):
            return topology.distribute(lambda: stage(stream.make_training_stream(
                self.summary, spec, tokenizer, hp.train_batch_size, hp.seed, start_step=start_step, shard=shard,
                bucket_by_length=hp.bucket_by_length)))

        steps_per_epoch = hp.train_steps_per_epoch or shard.steps_per_pass(hp.train_batch_size)
        return StreamPasses(batches, steps_per_epoch, hp.epochs, shard.reviews_per_worker)

    def evaluation(self, spec, tokenizer, hp, topology, print_fn=print):
        shard = sharding.for_evaluation(self.summary, topology, self.own_files)
        batches = topology.distribute(lambda: stream.make_dataset(
            self.summary, spec, tokenizer, hp.validation_batch_size, repeat=hp.validation_steps is not None,
            endless=True, shard=shard))
        print_fn(f"channel={self.name} {shard.describe(hp.validation_batch_size)}")
        return DatasetPasses(batches, hp.validation_steps or shard.steps_per_pass(hp.validation_batch_size))

    def test_pass(self, spec, tokenizer, hp):
        dataset = stream.make_dataset(self.summary, spec, tokenizer, hp.test_batch_size,
                                      repeat=hp.test_steps is not None)
        return DatasetPass(dataset.take(hp.test_steps) if hp.test_steps is not None else dataset)

    def first_reviews(self, count):
        """The first `count` good reviews (the channel's file order): those the explanations explain."""
        return scan.first_texts(self.summary, count)

    def read_extras(self):
        """Each good row's class index and bias columns, in the evaluation's order (scan.read_extras)."""
        return scan.read_extras(self.summary)


class PipeChannel(Channel):
    """Pipe mode: a FIFO per pass, read once each, never scanned; rows counted as they stream."""

    def __init__(self, name, own_files, fifos):
        super().__init__(name, own_files)
        self.fifos = fifos
        self.read_once = f"the {name} channel is in Pipe mode"
        self._passes = []  # the stream.PipePasses read from this channel

    def describe(self):
        return [f"channel={self.name} input_mode=Pipe record_wrapper={self.fifos.record_wrapper} fifos="
                f"{self.fifos.fifo('<pass>')}: not scanned (a FIFO is read once); rows are counted as they stream "
                "and max_bad_row_fraction is checked at the end of each pass"]

    def fingerprint(self):
        return {f"{self.name} input": f"Pipe RecordWrapperType={self.fifos.record_wrapper}"}

    def manifest_files(self):
        return []

    def manifest_passes(self):
        return {"record_wrapper": self.fifos.record_wrapper,
                "passes": [record for passes in self._passes for record in passes.passes]}

    def _read(self, spec, tokenizer, batch_size, hp, shard=None, **options):
        passes = stream.PipePasses(self.fifos, spec, tokenizer, batch_size, hp.max_bad_row_fraction, shard, **options)
        self._passes.append(passes)
        return passes

    def training(self, spec, tokenizer, hp, topology, print_fn=print):
        shard = sharding.for_pipe(topology)
        print_fn(f"channel={self.name} input_mode=Pipe sharding={shard.by} reason={shard.reason}")
        passes = self._read(spec, tokenizer, hp.train_batch_size, hp, shard, seed=hp.seed, topology=topology,
                            bucket_by_length=hp.bucket_by_length)
        return PipeTrainingPasses(passes)

    def evaluation(self, spec, tokenizer, hp, topology, print_fn=print):
        return PipeEvaluationPasses(self._read(spec, tokenizer, hp.validation_batch_size, hp,
                                               sharding.for_pipe(topology), topology=topology))

    def test_pass(self, spec, tokenizer, hp):
        passes = self._read(spec, tokenizer, hp.test_batch_size, hp)
        return PipeTestPass(passes)


# The passes the training loop and the evaluation read. An epoch's batches end where the epoch does.

class StreamPasses:
    """Training from a scanned channel: one endless stream whose batches depend only on the step
    (stream.make_training_stream), an epoch the next steps_per_epoch of them. A resumed job starts
    in the epoch its step falls in."""

    def __init__(self, make_batches, steps_per_epoch, epochs, reviews_per_worker):
        self._make_batches, self._iterator = make_batches, None
        self.steps_per_epoch, self.reviews_per_worker = steps_per_epoch, reviews_per_worker
        self.total_steps = epochs * steps_per_epoch
        self.epoch_length = str(steps_per_epoch)  # for the `training:` line
        self.resumes_by_position = False  # the epoch follows from the step

    def resume_point(self, start_step, position):
        """(the epoch to start in, its steps already trained)."""
        return start_step // self.steps_per_epoch + 1, start_step % self.steps_per_epoch

    def start(self, start_step, stage=None):
        """The stream from step start_step on, through `stage` (a function of a dataset) last."""
        self._iterator = iter(self._make_batches(start_step, stage or (lambda batches: batches)))

    def epoch(self, epoch, skip_steps=0):
        return itertools.islice(self._iterator, self.steps_per_epoch - skip_steps)

    def finish(self):
        """Nothing can have gone wrong in a pass over scanned files that the scan did not find."""


class PipeTrainingPasses:
    """Training from a Pipe-mode channel: an epoch is a pass, as long as its FIFO, so the job's
    length is unknown; a resumed job starts in the epoch after the last one its checkpoint
    finished (position), skipping the steps trained in it."""

    total_steps = steps_per_epoch = None
    epoch_length = "one Pipe-mode pass of"
    resumes_by_position = True
    reviews_per_worker = None

    def __init__(self, passes):
        self.passes = passes

    def resume_point(self, start_step, position):
        return position["epochs_done"] + 1, start_step - position["epoch_start_step"]

    def start(self, start_step, stage=None):
        """Each pass's batches go through `stage` last (the start step is the resume point's)."""
        if stage is not None:
            self.passes.stage = stage

    def epoch(self, epoch, skip_steps=0):
        return self.passes.epoch(epoch, skip_steps=skip_steps)

    def finish(self):
        self.passes.finish()


class DatasetPasses:
    """Validation from a scanned channel: each epoch `steps` steps from the start of the dataset."""

    def __init__(self, batches, steps):
        self.batches, self.steps = batches, steps

    def epoch(self, epoch):
        return itertools.islice(iter(self.batches), self.steps)

    def finish(self):
        pass


class PipeEvaluationPasses:
    """Validation from a Pipe-mode channel: each epoch the next FIFO, to its end."""

    def __init__(self, passes):
        self.passes = passes

    def epoch(self, epoch):
        return self.passes.epoch(epoch)

    def finish(self):
        self.passes.finish()


class DatasetPass:
    """The test set of a scanned channel: its dataset, read on the chief."""

    def __init__(self, dataset):
        self._dataset = dataset

    def dataset(self):
        return self._dataset

    def finish(self):
        pass


class PipeTestPass:
    """The test set of a Pipe-mode channel: the next FIFO, read on the chief."""

    def __init__(self, passes):
        self.passes = passes

    def dataset(self):
        return self.passes.dataset()

    def finish(self):
        self.passes.finish()
