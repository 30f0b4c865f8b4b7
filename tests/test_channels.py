"""The channels stage (data/channels.py), in-process and without a model: File and Pipe channels
behind one Channel type, what each says and reads, and what an input mode cannot do."""

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import FAST_HYPERPARAMETERS, amazon_tsv, make_reviews
from review_trainer import data
from review_trainer.contract.errors import DataError, HyperparameterError
from review_trainer.contract.hyperparameters import Hyperparameters
from review_trainer.data import channels as channels_module
from review_trainer.data.channels import PipeChannel, ScannedChannel, StreamPasses
from review_trainer.data.pipe import Fifos
from review_trainer.model.pretrained import ReviewTokenizer, open_checkpoint


class OneWorker:
    """The topology of a one-device job, as the channels stage uses it."""

    num_workers, worker_index, replicas, local_replicas, is_chief = 1, 0, 1, 1, True

    def __init__(self):
        self.barriers = []

    def barrier(self, what):
        self.barriers.append(what)

    def distribute(self, make_dataset):
        return make_dataset()

    def sum_over_workers(self, values):
        return np.asarray(values)


def contract(tmp_path, channels, pipes=()):
    """What the contract would say of an /opt/ml tree with these channel folders (and Pipe channels)."""
    dirs = {}
    for name, files in channels.items():
        (tmp_path / name).mkdir()
        for file_name, content in files.items():
            (tmp_path / name / file_name).write_bytes(content)
        dirs[name] = str(tmp_path / name)
    return SimpleNamespace(base_dir=str(tmp_path), channel_dirs=dirs,
                           pipe_channels={name: (str(tmp_path / name), "RecordIO") for name in pipes},
                           channel_distribution={name: "FullyReplicated" for name in [*channels, *pipes]})


def test_scanned_channels_are_opened_described_and_planned(tmp_path, distilbert_dir):
    hp = Hyperparameters.from_dict({**FAST_HYPERPARAMETERS, "run_test": "false"})
    env = contract(tmp_path, {"train": {"a.tsv": amazon_tsv(make_reviews(20, 1))},
                              "validation": {"v.tsv": amazon_tsv(make_reviews(12, 2))},
                              "test": {"t.tsv": amazon_tsv(make_reviews(4, 3))}})
    lines, topology = [], OneWorker()
    opened = data.open_channels(env, hp, topology, ReviewTokenizer(open_checkpoint(distilbert_dir), 16), lines.append)
    assert isinstance(opened.train, ScannedChannel) and opened.test is None and topology.barriers == ["the data scan"]
    assert "channel=test skipped: run_test=false" in lines
    assert "channel=train files=1 rows=20 bad_rows=0" in lines and "channel=validation files=1 rows=12 bad_rows=0" in lines
    assert opened.train.read_once is None and opened.train.summary.good_rows == 20
    # 20 rows in batches of 8: 3 steps an epoch
    training = opened.train_passes
    assert (training.steps_per_epoch, training.total_steps, training.resumes_by_position) == (3, 3, False)
    assert training.resume_point(0, {}) == (1, 0)
    training.start(0)
    assert sorted(len(labels) for _, labels in training.epoch(1)) == [4, 8, 8]  # shuffled by length buckets
    assert [sum(len(labels) for _, labels in opened.validation_passes.epoch(epoch)) for epoch in (1, 2)] == [12, 12]
    assert list(opened.train.fingerprint()) == ["train file a.tsv sha256"]
    manifest = opened.manifest()
    assert [f["good_rows"] for f in manifest["data"]["train"]] == [20] and manifest["pipe_mode"] == {}


def test_a_resumed_stream_starts_in_the_epoch_of_its_step_and_skips_what_was_trained():
    passes = StreamPasses(lambda start_step, stage: iter(range(start_step, 100)), steps_per_epoch=4, epochs=3,
                          reviews_per_worker=None)
    assert passes.resume_point(6, {"epochs_done": 0}) == (2, 2)  # the position is Pipe mode's: unused here
    passes.start(6)
    assert list(passes.epoch(2, skip_steps=2)) == [6, 7] and list(passes.epoch(3)) == [8, 9, 10, 11]


def test_a_pipe_mode_channel_is_described_not_scanned(tmp_path):
    channel = PipeChannel("train", False, Fifos("train", str(tmp_path / "train"), "RecordIO"))
    assert channel.summary is None and channel.read_once == "the train channel is in Pipe mode"
    assert channel.describe() == [f"channel=train input_mode=Pipe record_wrapper=RecordIO fifos={tmp_path}/train_<pass>: "
                                  "not scanned (a FIFO is read once); rows are counted as they stream and "
                                  "max_bad_row_fraction is checked at the end of each pass"]
    assert channel.fingerprint() == {"train input": "Pipe RecordWrapperType=RecordIO"}
    assert channel.manifest_files() == [] and channel.manifest_passes() == {"record_wrapper": "RecordIO", "passes": []}
    training = channel.training(data.RowSpec("review_body", "star_rating", tuple("12345"), 16), None,
                                Hyperparameters.from_dict({}), OneWorker(), print)
    assert (training.total_steps, training.steps_per_epoch, training.resumes_by_position) == (None, None, True)
    # A Pipe-mode job resumes by the checkpoint's position: the epoch after the last one it finished
    assert training.resume_point(10, {"epochs_done": 1, "epoch_start_step": 7}) == (2, 3)


@pytest.mark.parametrize("hyperparameters, workers, error, message", [
    ({"validation_steps": "2"}, 1, HyperparameterError, "validation_steps is set, but channel 'validation' is in Pipe"),
    ({}, 2, DataError, "channel 'validation': Pipe mode with S3DistributionType=ShardedByS3Key on 2 hosts"),
])
def test_what_pipe_mode_cannot_do_is_refused_at_the_start(tmp_path, hyperparameters, workers, error, message):
    env = contract(tmp_path, {"train": {"a.tsv": b""}}, pipes=("validation",))
    env.channel_distribution["validation"] = "ShardedByS3Key" if workers > 1 else "FullyReplicated"
    with pytest.raises(error, match=message):
        data.check_inputs(env, Hyperparameters.from_dict(hyperparameters), workers)
    channels_module.check_inputs(env, Hyperparameters.from_dict({}), 1)  # fine on one host without the setting
    # A channel the job does not read is not checked: validation with run_validation=false, an unknown one
    skipped = Hyperparameters.from_dict({**hyperparameters, "run_validation": "false"})
    data.check_inputs(env, skipped, workers)
    env.pipe_channels["extra"], env.channel_distribution["extra"] = ("/fifo", "None"), "ShardedByS3Key"
    data.check_inputs(env, skipped, workers)
