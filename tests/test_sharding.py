"""Sharding: which examples each worker and replica reads (data/sharding.py, data/stream.py).

The examples are TFRecords whose first token id is the example's number, so the examples a stream
yields can be counted without a model: across the workers, every example once per pass.
"""

import collections
import dataclasses

import pytest
from review_trainer import data
from review_trainer.data import sharding
from test_data import tfrecord_bytes

SPEC = data.RowSpec("review_body", "star_rating", ("1", "2", "3", "4", "5"), 16)
BATCH = 4


@dataclasses.dataclass
class FakeTopology:
    """A worker's view of the job. Sharding sums one vector over the workers: each worker's rows at
    its own index (zeros elsewhere), which adds up to every worker's rows."""

    num_workers: int
    worker_index: int
    local_replicas: int
    rows_per_worker: list

    @property
    def replicas(self):
        return self.num_workers * self.local_replicas

    def sum_over_workers(self, values):
        assert list(values) == [r if i == self.worker_index else 0 for i, r in enumerate(self.rows_per_worker)]
        return list(self.rows_per_worker)


def channel_of(tmp_path, name, numbers, files):
    """A channel of `files` TFRecord files holding the examples `numbers` (sizes 1, 2, 3, ...)."""
    folder = tmp_path / name
    folder.mkdir()
    numbers = list(numbers)
    sizes = [i + 1 for i in range(files)]
    cuts = [round(len(numbers) * sum(sizes[:i]) / sum(sizes)) for i in range(files + 1)]
    for i in range(files):
        examples = [([n] + [1] * 15, [1] * 16, n % 5) for n in numbers[cuts[i]:cuts[i + 1]]]
        (folder / f"part-{i}.tfrecord").write_bytes(tfrecord_bytes(tmp_path, examples))
    return data.scan_channel(name, str(folder), SPEC, 0.0)


def first_pass(channel, shard, start_step=0):
    """The example numbers of each step of the job's first pass on this worker: [[replica 0's, ...], ...]."""
    stream = data.make_training_stream(channel, SPEC, None, BATCH, seed=5, start_step=start_step, shard=shard)
    steps = shard.steps_per_pass(BATCH) - start_step
    elements = [x["token_ids"][:, 0].numpy().tolist() for x, _ in stream.take(steps * shard.local_replicas)]
    return [elements[i:i + shard.local_replicas] for i in range(0, len(elements), shard.local_replicas)]


@pytest.mark.parametrize("files", [1, 2, 3])
@pytest.mark.parametrize("workers", [2, 3])
def test_fully_replicated_every_example_is_read_once_per_pass_across_the_workers(tmp_path, files, workers):
    channel = channel_of(tmp_path, "train", range(37), files)  # files of 1, 2, 3 parts: unequal shares
    shards = [sharding.for_training(channel, FakeTopology(workers, w, 1, None), own_share=False)
              for w in range(workers)]
    assert {s.by for s in shards} == {"file" if files >= workers else "record"}
    assert {s.job_rows for s in shards} == {37}
    assert len({s.steps_per_pass(BATCH) for s in shards}) == 1  # the workers step together
    read = collections.Counter(n for s in shards for step in first_pass(channel, s) for replica in step for n in replica)
    assert read == collections.Counter(range(37))
    if files >= workers:  # whole files, dealt so that no two workers share one
        assert sorted(f.path for s in shards for f in s.files) == sorted(f.path for f in channel.files)


def test_each_host_has_its_own_files_with_sharded_by_s3_key_on_several_hosts_only():
    assert sharding.own_files("ShardedByS3Key", 2) and not sharding.own_files("ShardedByS3Key", 1)
    assert not sharding.own_files("FullyReplicated", 2)


@pytest.mark.parametrize("files", [1, 2, 3])
def test_sharded_by_s3_key_each_host_reads_all_of_its_own_files_once_per_pass(tmp_path, files):
    channels = [channel_of(tmp_path, f"host-{w}", range(w * 100, w * 100 + 20 + 7 * w), files) for w in range(2)]
    rows = [c.good_rows for c in channels]
    shards = [sharding.for_training(c, FakeTopology(2, w, 1, rows), own_share=True) for w, c in enumerate(channels)]
    assert [s.by for s in shards] == ["channel", "channel"] and [s.job_rows for s in shards] == [47, 47]
    passes = [first_pass(c, s) for c, s in zip(channels, shards)]
    assert [len(p) for p in passes] == [7, 7]  # ceil(27 / 4): the host with 20 rows ends with 2 empty steps
    assert [len(step[0]) for step in passes[0]] == [4, 4, 4, 4, 4, 0, 0]
    read = collections.Counter(n for p in passes for step in p for replica in step for n in replica)
    assert read == collections.Counter([*range(20), *range(100, 127)])


def test_record_sharding_gives_each_step_the_examples_of_a_one_worker_step_with_the_global_batch(tmp_path):
    channel = channel_of(tmp_path, "train", range(45), 1)
    # Two workers with two replicas each: the global batch is 4 x 4 = 16.
    shards = [sharding.for_training(channel, FakeTopology(2, w, 2, None), own_share=False) for w in range(2)]
    global_batches = one_worker_steps(channel, 16)
    passes = [first_pass(channel, s) for s in shards]
    assert [len(p) for p in passes] == [3, 3]  # ceil(45 / 16) steps on every worker
    for step, expected in enumerate(global_batches):
        replicas = passes[0][step] + passes[1][step]  # replica order: worker 0's, then worker 1's
        assert sorted(n for r in replicas for n in r) == sorted(expected)
        assert [len(r) for r in replicas] == [min(BATCH, max(0, len(expected) - i * BATCH)) for i in range(4)]


def one_worker_steps(channel, global_batch):
    """The example numbers of each step of a one-worker, one-replica job with batch `global_batch`."""
    stream = data.make_training_stream(channel, SPEC, None, global_batch, seed=5)
    steps = sharding.whole(channel).steps_per_pass(global_batch)
    return [x["token_ids"][:, 0].numpy().tolist() for x, _ in stream.take(steps)]


def test_evaluation_with_sharded_by_s3_key_steps_as_long_as_the_worker_with_most_rows(tmp_path):
    channels = [channel_of(tmp_path, f"host-{w}", range(w * 100, w * 100 + n), 1) for w, n in enumerate((9, 30))]
    shards = [sharding.for_evaluation(c, FakeTopology(2, w, 1, [9, 30]), own_share=True) for w, c in enumerate(channels)]
    assert [s.steps_per_pass(BATCH) for s in shards] == [8, 8]  # ceil(30 / 4) for both
    small = data.make_dataset(channels[0], SPEC, None, BATCH, endless=True, shard=shards[0])
    sizes = [int(y.shape[0]) for _, y in small.take(8)]
    assert sizes == [4, 4, 1, 0, 0, 0, 0, 0]  # its 9 rows, then empty batches in step with the other worker


def test_a_sharded_multi_replica_stream_resumed_at_a_step_reads_what_the_uninterrupted_one_did(tmp_path):
    channel = channel_of(tmp_path, "train", range(45), 1)
    shard = sharding.for_training(channel, FakeTopology(2, 1, 2, None), own_share=False)  # worker 1 of 2
    uninterrupted = first_pass(channel, shard)
    assert first_pass(channel, shard, start_step=2) == uninterrupted[2:]
