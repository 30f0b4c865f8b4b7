"""The failures a job reports, each with its own exit code.

The first line of /opt/ml/output/failure is `<Kind>: <message>`; SageMaker shows it as the job's
FailureReason, so the message names the file, row or key and what was expected. Any other error
is described by `describe_failure`: a full disk and out-of-memory errors as ResourceError, the
rest as InternalError (exit code 1) with its traceback.
"""

import errno

EXIT_SUCCESS = 0
EXIT_INTERNAL_ERROR = 1


class JobError(Exception):
    """An error the user can fix; `kind` (the class's name unless given) and `exit_code` are what
    the job reports: `class DataError(JobError, exit_code=3)`."""

    kind = "JobError"
    exit_code = EXIT_INTERNAL_ERROR

    def __init_subclass__(cls, exit_code=None, kind=None, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.kind = kind or cls.__name__
        if exit_code is not None:
            cls.exit_code = exit_code


class HyperparameterError(JobError, exit_code=2):
    """A hyperparameter is unknown, malformed or out of range."""


class DataError(JobError, exit_code=3):
    """A channel is missing or empty, a file is unreadable, or too many rows are bad."""


class PretrainedModelError(JobError, exit_code=4):
    """The pretrained checkpoint folder is missing, incomplete or of an unsupported type."""


class ResourceError(JobError, exit_code=5):
    """The machine ran out of something: disk space or memory."""


class CheckpointError(JobError, exit_code=6):
    """A checkpoint exists but was written by a job with other settings or data."""


class ClusterError(JobError, exit_code=7):
    """The hosts of a job cannot train together: a wrong host list, a host that never came up, a
    host lost during training, a collective operation that timed out."""


class TrainingError(JobError, exit_code=8):
    """Training itself broke down: the loss became NaN or infinite, and no finite model was kept to
    export instead (telemetry/rules.py)."""


class JobStopped(JobError, kind="Stopped"):
    """SIGTERM (spot interruption, StopTrainingJob, `docker stop`) or SIGINT arrived."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


def describe_failure(error):
    """(kind, message, exit code) for any exception, disk-full and out-of-memory errors included."""
    if isinstance(error, JobError):
        return error.kind, str(error), error.exit_code
    if _is_disk_full(error):
        resource = ResourceError(f"no space left on device ({error}); free space or give the job a larger volume "
                                 "(VolumeSizeInGB)")
        return resource.kind, str(resource), resource.exit_code
    if isinstance(error, MemoryError) or type(error).__name__ == "ResourceExhaustedError" or (  # TensorFlow's OOM
            type(error).__name__ in ("XlaRuntimeError", "JaxRuntimeError") and "RESOURCE_EXHAUSTED" in str(error)):
        resource = ResourceError(f"out of memory ({type(error).__name__}); lower the batch sizes or "
                                 "max_seq_length, or use a larger instance")
        return resource.kind, str(resource), resource.exit_code
    return "InternalError", f"{type(error).__name__}: {error}", EXIT_INTERNAL_ERROR


def _is_disk_full(error):
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False
