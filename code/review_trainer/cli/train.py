"""The `train` command: SageMaker runs it as `docker run IMAGE train`.

    1. a stop signal is handled from the start of main on (training/stopping.py)
    2. the start-up, before Keras is imported (training/startup.py): the contract read, the
       hyperparameters parsed, the distribution and the backend chosen, the channels' input modes
       and Debugger's config checked. A mistake in any of them is reported here, in
       output/failure, on every host alike.
    3. KERAS_BACKEND set; the job (job.py) runs
    4. output/success, or output/failure (`<Kind>: <message>` first, then details) and the exit
       code of the error (contract/errors.py)

Training runs in this process, which handles SIGTERM itself (a spot interruption, StopTrainingJob).
"""

import sys
import traceback

from review_trainer.contract import environment
from review_trainer.contract.errors import EXIT_SUCCESS, JobError, describe_failure
from review_trainer.outputs.export import discard_staging
from review_trainer.training import startup as job_startup
from review_trainer.training.stopping import StopSignal


def main():
    stop_signal = StopSignal()
    with stop_signal.installed():
        environment.clear_outcome()
        try:
            startup = job_startup.start(environment.read_environment())  # nvidia-smi and neuron-ls: once
            job_startup.select(startup)
            from review_trainer import job  # Keras, on the backend just selected

            job.run(startup, stop_signal)
            environment.write_success()
            print("training job succeeded")
            return EXIT_SUCCESS
        except BaseException as error:  # noqa: BLE001 - every ending is reported in output/failure
            kind, message, exit_code = describe_failure(error)
            details = "" if isinstance(error, JobError) else traceback.format_exc()
            print(f"training job failed: {kind}: {message}", file=sys.stderr)
            if details:
                print(details, file=sys.stderr)
            discard_staging(environment.model_dir())  # what this run, or a killed earlier one, left aside
            environment.write_failure(kind, message, details)
            return exit_code


if __name__ == "__main__":
    sys.exit(main())
