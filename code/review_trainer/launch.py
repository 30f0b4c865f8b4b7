"""The `train` command: chooses the Keras backend, then runs the job (train.py).

Keras fixes its backend when it is first imported, and the job's modules import it: the backend
is set here first, from the `backend` hyperparameter and the devices (backend.py).
"""

import sys


def main():
    from review_trainer import backend, environment
    from review_trainer.hyperparameters import Hyperparameters

    env = None
    try:
        env = environment.read_environment()  # sagemaker-training asks nvidia-smi and neuron-ls: once
        backend.select(env, Hyperparameters.from_dict(env.hyperparameters))
    except Exception:  # noqa: BLE001 - the job reads the contract again and reports what is wrong in output/failure
        pass
    from review_trainer import train

    return train.main(env)


if __name__ == "__main__":
    sys.exit(main())
