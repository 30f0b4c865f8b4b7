"""Which part of a channel each worker reads, and which slice of a step's batch each replica takes.

A step takes one batch per replica. A worker's stream yields per-replica batches in order, step n
being elements n*r ... n*r + r - 1 (r: the worker's replicas): that is how the strategy's
`distribute_datasets_from_function` hands them to the replicas. Each pass over the worker's
files is shuffled, cut into groups of `batch_size * group_replicas` examples, and each group into
per-replica slices (the last group of a pass is smaller; a replica's slice may then be empty).

- `channel`: the worker reads all of its channel. One worker; or `ShardedByS3Key`, where SageMaker
  has already given each host its own files.
- `file` (FullyReplicated, at least as many files with rows as workers): the files are dealt to
  the workers, the largest first to the worker with the fewest rows, so every file is read by
  exactly one worker per pass and the workers' rows stay close.
- `record` (FullyReplicated, fewer files than workers): every worker reads the channel in the same
  shuffled order, cuts it into global batches (`batch_size` x all replicas) and keeps its own
  replicas' slices. Each example is trained on once per pass, and step n holds exactly the
  examples of step n of a one-worker job with the global batch size. Every worker tokenizes
  the whole channel, which costs CPU, not accuracy.
"""

import dataclasses
import math

CHANNEL, FILE, RECORD = "channel", "file", "record"
FULLY_REPLICATED, SHARDED_BY_S3_KEY = "FullyReplicated", "ShardedByS3Key"


@dataclasses.dataclass(frozen=True)
class Shard:
    by: str
    files: tuple  # the FileSummary of each file this worker reads
    local_replicas: int = 1
    group_replicas: int = 1  # replicas that share one group: this worker's, or the job's (record)
    first_slice: int = 0  # this worker's first replica within a group
    job_rows: int = 0  # rows of one pass over the whole job's data (every worker's files)
    worker_rows: tuple = ()  # rows each worker reads in a pass, where they may differ (ShardedByS3Key)
    reason: str = ""

    @property
    def rows(self):
        return sum(f.good_rows for f in self.files)

    def describe(self):
        return (f"sharding={self.by} files={len(self.files)} rows={self.rows} job_rows={self.job_rows} "
                f"reason={self.reason}")

    def steps_per_pass(self, batch_size):
        """Steps in one pass over this worker's files (its last group may be smaller)."""
        return math.ceil(self.rows / (batch_size * self.group_replicas))

    def evaluation_steps(self, batch_size):
        """Steps for every worker to read all of its rows: those of the worker with the most."""
        return max(math.ceil(rows / (batch_size * self.group_replicas)) for rows in self.worker_rows or (self.rows,))


def whole(channel, local_replicas=1):
    """All of the channel for this worker, its replicas sharing each group."""
    return Shard(CHANNEL, tuple(channel.files), local_replicas, local_replicas, job_rows=channel.good_rows)


def for_training(channel, topology, distribution_type):
    """This worker's part of the training channel, and why it was chosen."""
    workers, local = topology.num_workers, topology.local_replicas
    if workers == 1:
        return dataclasses.replace(whole(channel, local), reason="one worker reads the whole channel")
    if distribution_type == SHARDED_BY_S3_KEY:
        job_rows = int(topology.sum_over_workers([channel.good_rows])[0])
        return dataclasses.replace(whole(channel, local), job_rows=job_rows,
                                   reason="S3DistributionType=ShardedByS3Key: SageMaker gave each host its own files")
    with_rows = [f for f in channel.files if f.good_rows]
    if len(with_rows) >= workers:
        return Shard(FILE, deal_files(with_rows, workers)[topology.worker_index], local, local, job_rows=channel.good_rows,
                     reason=f"FullyReplicated with {len(with_rows)} files for {workers} workers: by file")
    return dataclasses.replace(
        for_evaluation(channel, topology, FULLY_REPLICATED),
        reason=f"FullyReplicated with {len(with_rows)} file(s) for {workers} workers: fewer files than workers, by record")


def for_evaluation(channel, topology, distribution_type=FULLY_REPLICATED):
    """Each example once across the job's replicas. FullyReplicated: by record, the same steps on
    every worker. ShardedByS3Key: each worker its own files; a worker with fewer rows steps on with
    empty batches (make_dataset's `endless`) until the one with the most is done."""
    if topology.num_workers > 1 and distribution_type == SHARDED_BY_S3_KEY:
        one_hot = [channel.good_rows if i == topology.worker_index else 0 for i in range(topology.num_workers)]
        worker_rows = tuple(int(r) for r in topology.sum_over_workers(one_hot))
        return dataclasses.replace(whole(channel, topology.local_replicas), job_rows=sum(worker_rows),
                                   worker_rows=worker_rows, reason="ShardedByS3Key: each host its own files")
    return Shard(RECORD, tuple(channel.files), topology.local_replicas, topology.replicas,
                 first_slice=topology.worker_index * topology.local_replicas, job_rows=channel.good_rows,
                 reason="by record")


def deal_files(files, num_workers):
    """Files dealt to the workers, largest first to the worker with the fewest rows so far."""
    shares = [[] for _ in range(num_workers)]
    rows = [0] * num_workers
    for f in sorted(files, key=lambda f: (-f.good_rows, f.path)):
        worker = rows.index(min(rows))
        shares[worker].append(f)
        rows[worker] += f.good_rows
    return [tuple(sorted(share, key=lambda f: f.path)) for share in shares]
