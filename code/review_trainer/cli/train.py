"""The `train` command: SageMaker runs it as `docker run IMAGE train`.

    1. a stop signal is handled from the first statement on (training/stopping.py)
    2. the start-up, before Keras is imported: the contract read, the hyperparameters parsed,
       the backend chosen, the channels' input modes and Debugger's config checked. A mistake in
       any of them is reported here, in output/failure, on every host alike.
    3. KERAS_BACKEND set; the job (job.py) runs
    4. output/success, or output/failure (`<Kind>: <message>` first, then details) and the exit
       code of the error (contract/errors.py)

Training runs in this process, which handles SIGTERM itself (a spot interruption, StopTrainingJob).
"""

import dataclasses
import sys
import traceback

from review_trainer.contract import environment
from review_trainer.contract.errors import EXIT_SUCCESS, HyperparameterError, JobError, describe_failure
from review_trainer.contract.hyperparameters import Hyperparameters
from review_trainer.data import check_inputs
from review_trainer.telemetry.debugger_tensors import HookConfig
from review_trainer.training import backend, topology
from review_trainer.training.stopping import StopSignal


@dataclasses.dataclass(frozen=True)
class Startup:
    """What the job starts from, decided once, before Keras is imported."""

    env: environment.TrainingEnvironment  # the contract
    hp: Hyperparameters
    backend: backend.Backend
    hook_config: HookConfig | None  # debughookconfig.json as Debugger's hook would read it; None without one


def start(env):
    """The start-up decisions; a HyperparameterError, DataError or ClusterError for a wrong one."""
    hp = Hyperparameters.from_dict(env.hyperparameters)
    chosen = backend.decide(env, hp)
    kind, _ = topology.choose(hp.distribution, len(env.hosts), env.num_gpus)
    check_inputs(env, hp, num_workers=len(env.hosts) if kind == topology.MULTI_WORKER else 1)
    hook_config = None  # the Estimator's debugger_hook_config or rules: read on every host, so all fail alike
    if env.debug_hook_config is not None:
        try:
            hook_config = HookConfig.from_json(env.debug_hook_config, env.default_tensors_dir)
        except (ValueError, TypeError, KeyError) as error:
            raise HyperparameterError(f"debughookconfig.json: {error}") from error
    return Startup(env, hp, chosen, hook_config)


def main():
    stop_signal = StopSignal()
    with stop_signal.installed():
        environment.clear_outcome()
        try:
            startup = start(environment.read_environment())  # sagemaker-training asks nvidia-smi and neuron-ls: once
            backend.select(startup.backend, startup.env)
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
            environment.write_failure(kind, message, details)
            return exit_code


if __name__ == "__main__":
    sys.exit(main())
