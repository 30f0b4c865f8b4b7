"""Which part of a channel each worker reads, and which slice of a step's batch each replica takes.

A step takes one batch per replica. A worker's stream yields per-replica batches in order, step n
being elements n*r ... n*r + r - 1 (r: the worker's replicas): that is how the strategy's
`distribute_datasets_from_function` hands them to the replicas. Each pass over the worker's
files is shuffled, cut into groups of `batch_size * group_replicas` examples, and each group into
per-replica slices (the last group of a pass is smaller; a replica's slice may then be empty).

A pass over the job has as many steps as the worker with the most rows needs: a worker with
fewer rows ends its pass with empty batches, so that every example is trained on once per pass
(and per epoch), wherever it lives, and all workers step together.

- `channel`: the worker reads all of its channel. One worker; or `ShardedByS3Key`, where SageMaker
  has already given each host its own files.
- `file` (FullyReplicated, at least as many files with rows as workers): the files are dealt to
  the workers, the largest first to the worker with the fewest rows, so every file is read by
  exactly one worker per pass and the workers' rows stay close.
- `record` (FullyReplicated, fewer files than workers): every worker reads the channel in the same
  shuffled order, cuts it into global batches (`batch_size` x all replicas) and keeps its own
  replicas' slices. Step n then holds exactly the examples of step n of a one-worker job with the
  global batch size. Every worker tokenizes the whole channel, which costs CPU, not accuracy.
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
    worker_rows: tuple = ()  # the rows each group of replicas reads in a pass: per worker, or one for record
    reason: str = ""

    @property
    def rows(self):
        return sum(f.good_rows for f in self.files)

    @property
    def reviews_per_worker(self):
        """Rows this worker trains on in a pass: its files' rows, or (record) its replicas' share of them."""
        return self.rows * self.local_replicas // self.group_replicas

    @property
    def job_rows(self):
        """Rows of one pass over the job's data (every worker's files)."""
        return self.rows if self.by == RECORD else sum(self.worker_rows)

    def steps_per_pass(self, batch_size):
        """Steps of one pass over the job: those of the worker with the most rows."""
        return max(self._steps(rows, batch_size) for rows in self.worker_rows)

    def _steps(self, rows, batch_size):
        return math.ceil(rows / (batch_size * self.group_replicas))

    def describe(self, batch_size):
        per_worker = ""
        if len(set(self.worker_rows)) > 1:
            per_worker = f" rows_per_worker={','.join(map(str, self.worker_rows))}"
            if self._steps(self.rows, batch_size) < self.steps_per_pass(batch_size):
                per_worker += " (this worker ends each pass with empty batches)"
        return (f"sharding={self.by} files={len(self.files)} rows={self.rows} job_rows={self.job_rows}"
                f"{per_worker} reason={self.reason}")


def whole(channel, local_replicas=1):
    """All of the channel for the only worker, its replicas sharing each group."""
    return Shard(CHANNEL, tuple(channel.files), local_replicas, local_replicas, worker_rows=(channel.good_rows,))


def own_files(distribution_type, num_workers):
    """Whether each worker has only its own share of a channel's files: ShardedByS3Key on several
    workers (SageMaker gave each host its own objects). The one place this is decided."""
    return num_workers > 1 and distribution_type == SHARDED_BY_S3_KEY


def for_training(channel, topology, own_share):
    """This worker's part of the training channel, and why it was chosen; own_share: own_files()."""
    workers = topology.num_workers
    if workers == 1:
        return dataclasses.replace(whole(channel, topology.local_replicas), reason="one worker reads the whole channel")
    if own_share:
        return _own_files(channel, topology)
    with_rows = [f for f in channel.files if f.good_rows]
    if len(with_rows) >= workers:
        shares = deal_files(with_rows, workers)
        return Shard(FILE, shares[topology.worker_index], topology.local_replicas, topology.local_replicas,
                     worker_rows=tuple(sum(f.good_rows for f in share) for share in shares),
                     reason=f"FullyReplicated with {len(with_rows)} files for {workers} workers: by file")
    return dataclasses.replace(
        by_record(channel, topology),
        reason=f"FullyReplicated with {len(with_rows)} file(s) for {workers} workers: fewer files than workers, by record")


def for_evaluation(channel, topology, own_share):
    """Each example once across the job's replicas: by record, or each host its own files (own_files())."""
    if own_share:
        return _own_files(channel, topology)
    return by_record(channel, topology)


def by_record(channel, topology):
    """Every worker reads the whole channel and keeps its replicas' slices of each global batch."""
    return Shard(RECORD, tuple(channel.files), topology.local_replicas, topology.replicas,
                 first_slice=topology.worker_index * topology.local_replicas,
                 worker_rows=(channel.good_rows,), reason="by record")


def for_pipe(topology):
    """A Pipe-mode channel (FullyReplicated): every worker streams the whole channel from its own
    FIFOs and keeps its replicas' slices of each global batch, as `by_record` does with files."""
    if topology.num_workers == 1:
        return Shard(CHANNEL, (), topology.local_replicas, topology.local_replicas,
                     reason="one worker streams the whole channel")
    return Shard(RECORD, (), topology.local_replicas, topology.replicas,
                 first_slice=topology.worker_index * topology.local_replicas,
                 reason="Pipe mode: every host streams the channel and keeps its share of each global batch")


def _own_files(channel, topology):
    """ShardedByS3Key: this host's files; the hosts tell each other their rows (a collective)."""
    one_hot = [channel.good_rows if i == topology.worker_index else 0 for i in range(topology.num_workers)]
    worker_rows = tuple(int(rows) for rows in topology.sum_over_workers(one_hot))
    return dataclasses.replace(whole(channel, topology.local_replicas), worker_rows=worker_rows,
                               reason="S3DistributionType=ShardedByS3Key: SageMaker gave each host its own files")


def deal_files(files, num_workers):
    """Files dealt to the workers, largest first to the worker with the fewest rows so far."""
    shares = [[] for _ in range(num_workers)]
    rows = [0] * num_workers
    for f in sorted(files, key=lambda f: (-f.good_rows, f.path)):
        worker = rows.index(min(rows))
        shares[worker].append(f)
        rows[worker] += f.good_rows
    return [tuple(sorted(share, key=lambda f: f.path)) for share in shares]
