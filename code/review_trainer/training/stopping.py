"""SIGTERM and SIGINT: stop at a step boundary, after a checkpoint, and say that the job can resume.

Managed spot training and StopTrainingJob send SIGTERM and kill the container 120 s later. The
`train` process handles the signal itself, also as PID 1 in a container (where the kernel applies
no default action to a signal without a handler), from its first statement on: a signal that
arrives while TensorFlow is still being imported is reported too. During training the handler only
records the signal; each step votes with it (`votes`), and every host of the job stops after the
same step (loop.py). At any other time there is no progress to save, and the handler stops the job
at once.
"""

import contextlib
import signal

import numpy as np
from review_trainer.contract.errors import JobStopped

STOP_REASONS = ("SIGTERM", "SIGINT")  # a step's votes: one per reason, in this order


class StopSignal:
    def __init__(self):
        self.received = None  # the signal's name once one arrived
        self.from_another_host = False
        self._deferred = False

    @contextlib.contextmanager
    def installed(self):
        """Handles SIGTERM and SIGINT within the block; the handlers before it are put back after it."""
        previous = {signum: signal.signal(signum, self._handle) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        if not self._deferred:
            raise self.stopped("before training had made progress worth saving")

    def votes(self, step=None):
        """This host's stop votes for the step about to run (training step `step`, or None in an
        evaluation): 1 for the reason received, summed over the hosts by the step itself."""
        return np.array([self.received == reason for reason in STOP_REASONS], np.float32)

    def agree(self, reason):
        """The job stops for `reason`, received here or by another host."""
        if self.received is None:
            self.received = reason
            self.from_another_host = True

    def stopped(self, what_happened):
        if self.from_another_host:
            what_happened = f"(on another host) {what_happened}"
        exit_code = 128 + signal.Signals[self.received].value  # 143 for SIGTERM, 130 for SIGINT
        return JobStopped(f"the job received {self.received} {what_happened}", exit_code)

    @contextlib.contextmanager
    def deferred(self):
        """Within this block a signal waits for the training loop to act on it."""
        self._deferred = True
        try:
            yield
        finally:
            self._deferred = False
        if self.received:
            raise self.stopped("after training had finished")
