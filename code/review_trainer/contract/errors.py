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
    """An error the user can fix; `kind` and `exit_code` are what the job reports."""

    kind = "JobError"
    exit_code = EXIT_INTERNAL_ERROR


class HyperparameterError(JobError):
    """A hyperparameter is unknown, malformed or out of range."""

    kind = "HyperparameterError"
    exit_code = 2


class DataError(JobError):
    """A channel is missing or empty, a file is unreadable, or too many rows are bad."""

    kind = "DataError"
    exit_code = 3


class PretrainedModelError(JobError):
    """The pretrained checkpoint folder is missing, incomplete or of an unsupported type."""

    kind = "PretrainedModelError"
    exit_code = 4


class ResourceError(JobError):
    """The machine ran out of something: disk space or memory."""

    kind = "ResourceError"
    exit_code = 5


class CheckpointError(JobError):
    """A checkpoint exists but was written by a job with other settings or data."""

    kind = "CheckpointError"
    exit_code = 6


class ClusterError(JobError):
    """The hosts of a job cannot train together: a wrong host list, a host that never came up, a
    host lost during training, a collective operation that timed out."""

    kind = "ClusterError"
    exit_code = 7


class TrainingError(JobError):
    """Training itself broke down: the loss became NaN or infinite, and no finite model was kept to
    export instead (telemetry/rules.py)."""

    kind = "TrainingError"
    exit_code = 8


class JobStopped(JobError):
    """SIGTERM (spot interruption, StopTrainingJob, `docker stop`) or SIGINT arrived."""

    kind = "Stopped"

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
