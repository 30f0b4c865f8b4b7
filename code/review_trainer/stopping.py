"""SIGTERM and SIGINT: stop at a step boundary, after a checkpoint, and say that the job can resume.

Managed spot training and StopTrainingJob send SIGTERM and kill the container 120 s later. The
`train` process handles the signal itself, also as PID 1 in a container (where the kernel applies
no default action to a signal without a handler). During training the handler only records the
signal; the training loop votes with it in the next step, and every host of the job stops after
that same step (training_loop.py). At any other time there is no progress to save, and the
handler stops the job at once.
"""

import contextlib
import signal

from review_trainer.errors import JobStopped


class StopSignal:
    def __init__(self):
        self.received = None  # the signal's name once one arrived
        self.from_another_host = False
        self._deferred = False

    def install(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        if not self._deferred:
            raise self.stopped("before training had made progress worth saving")

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
