"""The run-time topology: which tf.distribute strategy trains, over how many replicas, and who is chief.

The contract (contract/environment.py) says what SageMaker gave the job (hosts, channels); this
module decides how to use it, and it is the only place that creates a strategy. `distribution`:

    auto          several hosts: multi_worker; one host with several GPUs: mirrored; else none
    none          one device (TensorFlow's default strategy); on several hosts only the chief trains
    mirrored      MirroredStrategy over this host's GPUs (without GPUs: its logical CPU devices)
    multi_worker  MultiWorkerMirroredStrategy over every device of every host

Several hosts: TF_CONFIG is built from resourceconfig.json (hosts sorted, worker index = position in
that list, port 2222 on every host; worker 0 is the chief). Before the strategy exists, every host
must resolve and answer on that port within `host_wait_seconds` (TensorFlow's own wait for the
other hosts has no bound on the chief). The collectives of the start (a barrier after the data
scan, the row counts, the resumed state) wait as long; those of training time out after
`collective_timeout_seconds`, and a lost host (TensorFlow's heartbeats find one in about 10 s)
ends every other worker with a ClusterError naming it.
"""

import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import time

import numpy as np
from review_trainer.contract.errors import ClusterError, HyperparameterError

PORT = 2222  # TensorFlow's gRPC server on every host of a multi-host job
NONE, MIRRORED, MULTI_WORKER = "none", "mirrored", "multi_worker"
# Which setting bounds a collective, for the message when one times out.
START_BOUND, TRAINING_BOUND = "host_wait_seconds, at the start", "collective_timeout_seconds, during training"
_POLL_SECONDS = 0.5


@dataclasses.dataclass(frozen=True)
class Topology:
    strategy: object  # a tf.distribute.Strategy
    kind: str  # none, mirrored or multi_worker
    reason: str  # why this strategy, for the start-up line
    hosts: tuple  # the job's hosts, sorted: worker i runs on hosts[i]
    worker_index: int
    num_workers: int  # hosts that train together: len(hosts) for multi_worker, else 1
    wait_seconds: int = 300  # the bound of the start's collectives: host_wait_seconds

    @classmethod
    def set_up(cls, env, hp, distribution, backend="tensorflow"):
        """Creates the strategy of the kind chosen at start-up (distribution: a Distribution); call it
        before any other TensorFlow operation (multi-worker needs that).

        backend=jax: one device, JAX's; TensorFlow (tf.data) stays off the GPUs, whose memory JAX takes."""
        import tensorflow as tf

        hosts = tuple(sorted(env.hosts))
        worker_index = hosts.index(env.current_host)
        kind, reason = distribution.kind, distribution.reason
        if backend == "jax":  # one device, JAX's (backend.py refused any other distribution)
            tf.config.set_visible_devices([], "GPU")
        if kind == MULTI_WORKER:
            strategy = start_multi_worker(hosts, worker_index, hp.host_wait_seconds, hp.collective_timeout_seconds)
            return cls(strategy, kind, reason, hosts, worker_index, len(hosts), hp.host_wait_seconds)
        if kind == MIRRORED:  # this host's GPUs; without any, its logical CPU devices
            gpus = tf.config.list_logical_devices("GPU")
            devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
            strategy = tf.distribute.MirroredStrategy(devices)
        else:
            strategy = tf.distribute.get_strategy()
        return cls(strategy, kind, reason, hosts, worker_index, 1)

    @property
    def replicas(self):
        return self.strategy.num_replicas_in_sync

    @property
    def local_replicas(self):
        return self.replicas // self.num_workers

    @property
    def is_chief(self):
        """Worker 0 writes the model, evaluation, checkpoints and TensorBoard logs."""
        return self.worker_index == 0

    @property
    def current_host(self):
        return self.hosts[self.worker_index]

    @property
    def idle(self):
        """distribution=none on several hosts: only the chief trains."""
        return self.kind == NONE and not self.is_chief

    def scope(self):
        """Variables created inside are the strategy's (mirrored on every replica)."""
        return self.strategy.scope()

    def describe(self, per_replica_batch):
        return (f"distribution={self.kind} replicas={self.replicas} workers={self.num_workers} "
                f"worker_index={self.worker_index} per_replica_batch={per_replica_batch} "
                f"global_batch={per_replica_batch * self.replicas} reason={self.reason}")

    def distribute(self, make_dataset):
        """The strategy's per-worker dataset: make_dataset() is this worker's stream of per-replica batches."""
        return self.strategy.distribute_datasets_from_function(lambda _context: make_dataset())

    def barrier(self, what):
        """Waits (at most host_wait_seconds) until every worker is done with `what`: hosts scan
        data of different sizes, and a collective of training would time out sooner."""
        self._all_reduce([np.ones(1)], lambda replica: True, f"the wait for every host to finish {what}")

    def sum_over_workers(self, values):
        """The element-wise sum of each worker's values (numbers), on every worker."""
        return self._all_reduce([np.asarray(values)], lambda replica: replica % self.local_replicas == 0,
                                "the exchange of row counts")[0]

    def broadcast_from_chief(self, arrays):
        """The chief's arrays on every worker: an all-reduce to which only the chief contributes."""
        return self._all_reduce([np.asarray(a) for a in arrays], lambda replica: replica == 0,
                                "the broadcast of the resumed state")

    def _all_reduce(self, arrays, contributes, what):
        """Sums over the replicas for which contributes(replica id) holds (exact: the others add zeros)."""
        if self.num_workers == 1:
            return arrays
        import tensorflow as tf

        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=self.wait_seconds)

        def as_tensor(a):  # collectives take floats and 64-bit integers
            return tf.constant(a if np.issubdtype(a.dtype, np.floating) else a.astype(np.int64))

        @tf.function
        def reduce(tensors):
            def replica_fn(tensors):
                context = tf.distribute.get_replica_context()
                keep = contributes(context.replica_id_in_sync_group)
                return [context.all_reduce(tf.distribute.ReduceOp.SUM, tf.where(keep, t, tf.zeros_like(t)),
                                           options=options) for t in tensors]
            return self.strategy.experimental_local_results(self.strategy.run(replica_fn, args=(tensors,)))[0]

        with self.collectives(what, bound=START_BOUND):
            reduced = reduce([as_tensor(a) for a in arrays])
        return [r.numpy().astype(a.dtype) for r, a in zip(reduced, arrays)]

    @contextlib.contextmanager
    def collectives(self, what, bound=TRAINING_BOUND):
        """TensorFlow's errors of a lost host or a timed-out collective, as a ClusterError that names the host."""
        import tensorflow as tf

        try:
            yield
        except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
                tf.errors.AbortedError, tf.errors.InternalError) as error:
            # Unavailable and DeadlineExceeded are the network's; the others only when they name a task
            # or a collective (an XLA or cuDNN failure is this host's own error).
            network = isinstance(error, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError))
            if self.num_workers == 1 or not (network or self._other_tasks(error) or "ollective" in str(error)):
                raise
            raise self.lost_host(error, what, bound) from error

    def _other_tasks(self, error):
        """The other workers' indexes that TensorFlow's message names (/job:worker/task:1)."""
        return sorted({int(t) for t in re.findall(r"task:(\d+)", str(error))} - {self.worker_index})

    def lost_host(self, error, what, bound=TRAINING_BOUND):
        import tensorflow as tf

        message = re.sub(r"\{\{[^}]*\}\}\s*", "", str(getattr(error, "message", error))).strip()
        first_line = message.splitlines()[0][:300] if message else ""
        lost = [self.hosts[t] for t in self._other_tasks(error) if t < len(self.hosts)]
        who = (f"lost host {', '.join(lost)}" if lost
               else "lost contact with another host (none named by TensorFlow)")
        if isinstance(error, tf.errors.DeadlineExceededError):
            who += f" (a collective outlasted its timeout: {bound})"
        return ClusterError(
            f"{self.current_host} {who} during {what} ({type(error).__name__}: {first_line}). The lost host's "
            "own log and failure file say why it stopped; a host that vanished was probably reclaimed. "
            "Rerun the job (it resumes from the last checkpoint when checkpointing is on)"
        )


@dataclasses.dataclass(frozen=True)
class Distribution:
    """The kind of distribution a job uses, decided once at start-up from the contract's hosts and GPUs."""

    kind: str  # none, mirrored or multi_worker
    reason: str  # for the start line
    num_workers: int  # hosts that train together


def plan(distribution, hosts, num_gpus):
    """The Distribution for the `distribution` hyperparameter on these hosts and GPUs."""
    kind, reason = choose(distribution, len(hosts), num_gpus)
    return Distribution(kind, reason, len(hosts) if kind == MULTI_WORKER else 1)


def choose(distribution, num_hosts, num_gpus):
    """(kind, reason) for the `distribution` hyperparameter on this many hosts and GPUs."""
    if distribution == "auto":
        if num_hosts > 1:
            return MULTI_WORKER, f"auto: {num_hosts} hosts in resourceconfig.json"
        if num_gpus > 1:
            return MIRRORED, f"auto: one host with {num_gpus} GPUs"
        return NONE, f"auto: one host with {'one GPU' if num_gpus else 'no GPU'}"
    if distribution == MIRRORED and num_hosts > 1:
        raise HyperparameterError(
            f"distribution=mirrored trains on the devices of one host, but this job has {num_hosts} hosts: "
            "set distribution=multi_worker (or auto) to train on all of them, or use one instance"
        )
    if distribution == NONE and num_hosts > 1:
        return NONE, (f"distribution=none on {num_hosts} hosts: only the chief trains (with ShardedByS3Key, on "
                      "its own files only), the other hosts stop at once (set distribution=auto to train on all of them)")
    return distribution, f"distribution={distribution}"


def tf_config(hosts, worker_index):
    """TF_CONFIG for MultiWorkerMirroredStrategy: every host a worker, in sorted order."""
    return {"cluster": {"worker": [f"{host}:{PORT}" for host in hosts]},
            "task": {"type": "worker", "index": worker_index}}


def start_multi_worker(hosts, worker_index, wait_seconds, collective_timeout_seconds):
    """MultiWorkerMirroredStrategy, once every host resolves and answers on PORT within wait_seconds.

    TensorFlow's own wait for the other hosts has no bound on the chief, and holds the interpreter
    (not even SIGTERM is handled), so the hosts meet first: each listens on PORT with a plain
    socket and polls the others until all answer; then it closes its socket and TensorFlow's
    server takes the port (a host still polling finds either one answering).
    """
    import tensorflow as tf

    deadline = time.monotonic() + wait_seconds
    _wait(hosts, lambda host: not _resolves(host), deadline, lambda late: ClusterError(
        f"host(s) {', '.join(late)} did not resolve within host_wait_seconds={wait_seconds}: "
        f"{hosts[worker_index]} cannot reach them by name. The instances may not have started, or the "
        "job's network (VPC, security group) does not let its hosts see each other"))
    with socket.create_server(("", PORT)) as listener:
        listener.settimeout(_POLL_SECONDS)
        peers = [host for i, host in enumerate(hosts) if i != worker_index]
        _wait(peers, lambda host: not _answers(host, PORT, listener), deadline, lambda late: ClusterError(
            f"host(s) {', '.join(late)} did not answer on port {PORT} within host_wait_seconds={wait_seconds}: "
            "their training container did not start, or failed before training (see their logs), or a "
            "security group blocks the port between the job's hosts"))

    os.environ["TF_CONFIG"] = json.dumps(tf_config(hosts, worker_index))
    # TensorFlow's coordination service installs its own SIGTERM handler (to note preemptions),
    # which would hide the signal from the job: the handlers in place now are put back.
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        # A timeout makes TensorFlow watch each collective with a thread of its own: microseconds
        # against the milliseconds of a step.
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=collective_timeout_seconds)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except tf.errors.OpError as error:
        raise ClusterError(f"the hosts {', '.join(hosts)} could not form a cluster: {type(error).__name__}: "
                           f"{error.message.strip().splitlines()[0][:300]}") from error
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return strategy


def _wait(hosts, pending, deadline, timed_out):
    """Polls until pending(host) is false for every host, or raises timed_out(the hosts left)."""
    while True:
        hosts = [host for host in hosts if pending(host)]
        if not hosts:
            return
        if time.monotonic() > deadline:
            raise timed_out(hosts)
        time.sleep(_POLL_SECONDS)


def _resolves(host):
    try:
        socket.getaddrinfo(host, PORT)
        return True
    except socket.gaierror:
        return False


def _answers(host, port, listener):
    """Whether host accepts a connection on port; meanwhile lets the others' connections in."""
    try:
        while True:
            listener.accept()[0].close()
    except (TimeoutError, BlockingIOError):
        pass
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False
