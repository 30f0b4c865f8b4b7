"""The start-up: what the job starts from, decided once, before Keras is imported.

`start(env)` parses the hyperparameters, chooses the kind of distribution (topology.py) and the
backend (backend.py) from the contract's hosts and devices, checks what each channel's input mode
allows (data/channels.py) and reads Debugger's config (telemetry/debugger_tensors.py). A mistake in
any of them is a HyperparameterError, DataError or ClusterError here, without TensorFlow, on every
host alike. The `train` command (cli/train.py) then sets KERAS_BACKEND (`select`) and hands the
Startup to the job (job.py), whose stages read it.
"""

import dataclasses

from review_trainer.contract.environment import TrainingEnvironment
from review_trainer.contract.errors import HyperparameterError
from review_trainer.contract.hyperparameters import Hyperparameters
from review_trainer.data import check_inputs
from review_trainer.telemetry.debugger_tensors import HookConfig
from review_trainer.training import backend, topology


@dataclasses.dataclass(frozen=True)
class Startup:
    env: TrainingEnvironment  # the contract
    hp: Hyperparameters
    distribution: topology.Distribution  # the kind of tf.distribute strategy, and why
    backend: backend.Backend
    hook_config: HookConfig | None  # debughookconfig.json as Debugger's hook would read it; None without one


def start(env):
    """The start-up decisions; a HyperparameterError, DataError or ClusterError for a wrong one."""
    hp = Hyperparameters.from_dict(env.hyperparameters)
    distribution = topology.plan(hp.distribution, env.hosts, env.num_gpus)
    chosen = backend.decide(env, hp, distribution)
    check_inputs(env, hp, distribution.num_workers)
    hook_config = None  # the Estimator's debugger_hook_config or rules: read on every host, so all fail alike
    if env.debug_hook_config is not None:
        try:
            hook_config = HookConfig.from_json(env.debug_hook_config, env.default_tensors_dir)
        except (ValueError, TypeError, KeyError) as error:
            raise HyperparameterError(f"debughookconfig.json: {error}") from error
    return Startup(env, hp, distribution, chosen, hook_config)


def select(startup):
    """Sets the backend for Keras to read when first imported: the job may import it now."""
    backend.select(startup.backend, startup.env)
