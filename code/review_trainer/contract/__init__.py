"""The contract: what SageMaker hands the job and what the job hands back.

    environment.py      the only reader of /opt/ml, SM_* and the job's other environment variables:
                        config files, channels, hosts and devices, paths; the job's outcome files
    hyperparameters.py  every hyperparameter: name, type, default, range, one parser per type
    errors.py           the failures a user can fix, their exit codes, and any error as a failure
    files.py            files written whole (a reader never sees half of one) and hashed

Imports nothing else of review_trainer: every other package may import it.
"""
