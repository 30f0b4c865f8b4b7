"""Test-only code run inside a job's own process, through a sitecustomize module on PYTHONPATH
(Python imports it at start-up; the job's package is never changed for a test), for what a job
run in the test's own process cannot show: a stop signal.

    HOLD_STEP  training step N waits for a stop signal before it votes (training/stopping.py), so a
               stop test stops exactly at the step it names, whatever the machine's speed: the test
               waits for the line HOLDING.format(step=N), then sends the signal
"""

import os

HOLDING = "test_gate holding step={step} until a stop signal"

HOLD_STEP = '''
import os, time
from review_trainer.training import stopping
_held_step, _votes = int(os.environ["REVIEW_TRAINER_TEST_HOLD_STEP"]), stopping.StopSignal.votes
def _held_votes(self, step=None):
    if step == _held_step and self.received is None:
        print(''' + repr(HOLDING) + '''.format(step=step), flush=True)
        while self.received is None:
            time.sleep(0.01)
    return _votes(self, step)
stopping.StopSignal.votes = _held_votes
'''


def injected(folder, code, **variables):
    """Environment variables that run `code` in every Python process started with them: the
    sitecustomize written into `folder`, on PYTHONPATH, and `variables` (values made strings)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "sitecustomize.py"), "w") as f:
        f.write(code)
    path = os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {"PYTHONPATH": path, **{name: str(value) for name, value in variables.items()}}


def hold_step(folder, step):
    return injected(folder, HOLD_STEP, REVIEW_TRAINER_TEST_HOLD_STEP=step)
