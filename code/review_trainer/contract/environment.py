"""The SageMaker training contract, read in one place.

Nothing else in the package reads `/opt/ml` paths or `SM_*` variables. The layout is SageMaker's:

    $SAGEMAKER_BASE_DIR (default /opt/ml)
    ├── input/config/hyperparameters.json   values are strings, as SageMaker writes them
    ├── input/config/resourceconfig.json    hosts and the current host
    ├── input/config/inputdataconfig.json   the channels
    ├── input/config/checkpointconfig.json  LocalPath of checkpoints (optional)
    ├── input/config/tensorboardoutputconfig.json  LocalPath of TensorBoard logs (optional)
    ├── input/config/debughookconfig.json   Debugger: where and how often to save tensors (optional;
    │                                       the Estimator's debugger_hook_config or built-in rules)
    ├── input/config/profilerconfig.json    Debugger's profiler: its sampling interval (optional)
    ├── input/data/<channel>/...            the channel's files (TrainingInputMode File or FastFile)
    ├── input/data/<channel>_<pass>         Pipe mode: a FIFO per pass over the channel (0, 1, ...)
    ├── model/                              what SageMaker uploads as model.tar.gz
    ├── output/success | output/failure     how the job ended
    └── output/data/                        uploaded as output.tar.gz

sagemaker-training's `Environment` supplies the host list and device counts (the GPUs, as
CUDA_VISIBLE_DEVICES limits them); training/topology.py decides how they are used (strategy,
replicas, chief). Its module reads `SAGEMAKER_BASE_DIR` once, at import, and invents a
`~/sagemaker_local/...` tree when neither that variable nor /opt/ml exists, so the variable is set
before it is imported. Its `train` runner is not used: it waits up to 15 minutes for every host
name to resolve and does not forward SIGTERM.
"""

import dataclasses
import errno
import json
import os
import socket
import tempfile

from review_trainer.contract import files
from review_trainer.contract.errors import ClusterError, DataError, HyperparameterError, ResourceError

BASE_DIR_VARIABLE = "SAGEMAKER_BASE_DIR"
DEFAULT_BASE_DIR = "/opt/ml"
TRAIN_CHANNEL = "train"


@dataclasses.dataclass(frozen=True)
class TrainingEnvironment:
    base_dir: str
    hyperparameters: dict  # raw values, as written in hyperparameters.json
    channel_dirs: dict  # channel name -> folder, for channels whose folder exists
    channel_distribution: dict  # channel name -> S3DistributionType: FullyReplicated or ShardedByS3Key
    pipe_channels: dict  # Pipe-mode channel name -> (FIFO path prefix, RecordWrapperType: "None" or "RecordIO")
    hosts: list
    current_host: str
    num_gpus: int
    num_neurons: int  # Trainium/Inferentia NeuronCores (neuron-ls), 0 elsewhere
    num_cpus: int
    job_name: str
    checkpoint_dir: str
    checkpoint_config_present: bool
    tensorboard_dir: str
    debug_hook_config: dict | None  # debughookconfig.json as written, None without it (telemetry/debugger_tensors.py)
    profiler_config: dict | None  # profilerconfig.json as written, None without it (telemetry/profiler.py)
    image_version: str | None
    default_pretrained_model_dir: str | None
    # Set by SageMaker in a training job (not by `docker run`): the service marks the end of
    # Debugger's tensors itself, once they are uploaded (telemetry/debugger_tensors.py)
    under_sagemaker: bool = False
    # The GPU image's cuDNN: GRAPH_JIT_ONLY, NVIDIA's reduced configuration, has no legacy RNN API
    # (the Dockerfile sets it; model/classifier.py keeps the LSTM off cuDNN there)
    cudnn_lib_config: str | None = None

    @property
    def model_dir(self):
        return os.path.join(self.base_dir, "model")

    @property
    def output_data_dir(self):
        return os.path.join(self.base_dir, "output", "data")

    @property
    def default_tensors_dir(self):
        """Where Debugger tensors go when debughookconfig.json names no LocalPath (SageMaker's default)."""
        return os.path.join(self.base_dir, "output", "tensors")


def base_dir():
    return os.path.abspath(os.environ.get(BASE_DIR_VARIABLE, DEFAULT_BASE_DIR))


# How the job ended. These need only the base folder, so a job whose contract cannot be read
# still reports why.
def output_dir():
    return os.path.join(base_dir(), "output")


def model_dir():
    return os.path.join(base_dir(), "model")


def clear_outcome():
    """Removes success/failure left by an earlier run in the same folder."""
    for name in ("success", "failure"):
        try:
            os.remove(os.path.join(output_dir(), name))
        except FileNotFoundError:
            pass


def write_success():
    files.write_bytes(os.path.join(output_dir(), "success"), b"")


def write_failure(kind, message, details=""):
    """First line `<Kind>: <message>` (SageMaker's FailureReason), then the details."""
    text = f"{kind}: {message}\n" + (f"\n{details}\n" if details else "")
    files.write_bytes(os.path.join(output_dir(), "failure"), text.encode("utf-8"))


def read_environment():
    """Reads the contract; fails with a message that names the file that is wrong."""
    root = base_dir()
    os.environ[BASE_DIR_VARIABLE] = root  # before sagemaker_training is imported: see above
    config_dir = os.path.join(root, "input", "config")
    hyperparameters = _read_json_object(os.path.join(config_dir, "hyperparameters.json"), {}, HyperparameterError,
                                        "a JSON object of name: value pairs")
    hostname = socket.gethostname()
    resource_config_file = os.path.join(config_dir, "resourceconfig.json")
    resource_config = _read_json(resource_config_file, {"current_host": hostname, "hosts": [hostname]}, ClusterError)
    _check_hosts(resource_config, resource_config_file)
    channel_dirs, pipe_channels, channel_distribution = _read_channels(config_dir, os.path.join(root, "input", "data"))
    sm = _sagemaker_environment(resource_config, [*channel_dirs, *pipe_channels], hyperparameters)
    checkpoint_config_file = os.path.join(config_dir, "checkpointconfig.json")
    checkpoint_config = _read_json(checkpoint_config_file, {}, DataError)
    tensorboard_config = _read_json(os.path.join(config_dir, "tensorboardoutputconfig.json"), {}, DataError)
    return TrainingEnvironment(
        base_dir=root,
        hyperparameters=hyperparameters,
        channel_dirs=channel_dirs,
        channel_distribution=channel_distribution,
        pipe_channels=pipe_channels,
        hosts=list(sm.hosts),
        current_host=sm.current_host,
        num_gpus=_visible(sm.num_gpus),
        num_neurons=sm.num_neurons,
        num_cpus=sm.num_cpus,
        job_name=os.environ.get("TRAINING_JOB_NAME") or sm.job_name or "",
        checkpoint_dir=checkpoint_config.get("LocalPath", os.path.join(root, "checkpoints")),
        checkpoint_config_present=os.path.exists(checkpoint_config_file),
        tensorboard_dir=tensorboard_config.get("LocalPath", os.path.join(root, "output", "tensorboard")),
        debug_hook_config=_read_json_object(os.path.join(config_dir, "debughookconfig.json"), None,
                                            HyperparameterError, "a JSON object"),
        profiler_config=_read_json_object(os.path.join(config_dir, "profilerconfig.json"), None,
                                          HyperparameterError, "a JSON object"),
        image_version=os.environ.get("IMAGE_VERSION"),
        default_pretrained_model_dir=os.environ.get("PRETRAINED_MODEL_DIR"),
        under_sagemaker="TRAINING_JOB_NAME" in os.environ,
        cudnn_lib_config=os.environ.get("CUDNN_LIB_CONFIG"),
    )


def _visible(gpus):
    """The GPUs this job may use: sagemaker-training counts every GPU (nvidia-smi), and
    CUDA_VISIBLE_DEVICES, where set, names fewer ("" or -1: none)."""
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is None:
        return gpus
    return min(gpus, len([device for device in named.split(",") if device.strip() not in ("", "-1")]))


def _read_channels(config_dir, data_dir):
    """(folders of the File and FastFile channels, the Pipe channels, each channel's
    S3DistributionType) from inputdataconfig.json; without it (a local run) the folders are the channels."""
    input_data_config = _read_json(os.path.join(config_dir, "inputdataconfig.json"), None, DataError)
    if input_data_config is None:
        input_data_config = {name: {} for name in (sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else [])}
    pipe_channels = _pipe_channels(input_data_config, data_dir)
    channel_dirs = {name: os.path.join(data_dir, name) for name in input_data_config
                    if name not in pipe_channels and os.path.isdir(os.path.join(data_dir, name))}
    distribution = {name: (input_data_config[name] or {}).get("S3DistributionType", "FullyReplicated")
                    for name in [*channel_dirs, *pipe_channels]}
    return channel_dirs, pipe_channels, distribution


def _sagemaker_environment(resource_config, channels, hyperparameters):
    """sagemaker-training's Environment, for the hosts and the device counts only. It reads the
    files itself when an argument is empty (falsy), from the path it fixed at import: it is handed
    non-empty dicts, so it reads nothing."""
    from sagemaker_training import environment as sagemaker_environment

    return sagemaker_environment.Environment(
        resource_config=resource_config,
        input_data_config={name: {} for name in channels} or {TRAIN_CHANNEL: {}},
        hyperparameters={key: value for key, value in hyperparameters.items() if key.startswith("sagemaker_")}
        or {"sagemaker_job_name": os.environ.get("TRAINING_JOB_NAME", "")},
    )


INPUT_MODES = ("File", "FastFile", "Pipe")
RECORD_WRAPPERS = ("None", "RecordIO")


def _pipe_channels(input_data_config, data_dir):
    """{name: (FIFO prefix, RecordWrapperType)} of the channels in Pipe mode; File and FastFile
    channels are folders (FastFile streams from S3 behind the same folder)."""
    pipes = {}
    for name, config in input_data_config.items():
        config = config or {}
        mode = config.get("TrainingInputMode", "File")
        wrapper = config.get("RecordWrapperType", "None")
        if mode not in INPUT_MODES or wrapper not in RECORD_WRAPPERS:
            raise DataError(
                f"inputdataconfig.json: channel {name!r} has TrainingInputMode={mode!r} and RecordWrapperType="
                f"{wrapper!r}; this job reads TrainingInputMode {', '.join(INPUT_MODES)} and RecordWrapperType "
                f"{', '.join(RECORD_WRAPPERS)}"
            )
        if mode == "Pipe":
            pipes[name] = (os.path.join(data_dir, name), wrapper)
    return pipes


def make_writable_folder(path):
    """Creates the folder when missing and proves it takes a file; raises OSError otherwise."""
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
        pass


def check_writable(folders):
    """{what: path} of the folders the job will write: one that cannot be written fails now, named,
    not after training (a full disk stays a full disk)."""
    for what, path in folders.items():
        try:
            make_writable_folder(path)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise
            raise ResourceError(f"the {what} {path} cannot be created or written ({error.strerror or error}); "
                                "give the job a writable folder there") from error


def _check_hosts(resource_config, path):
    """A host list that cannot be right fails here, not as a job that trains and exports nothing."""
    hosts = resource_config.get("hosts") if isinstance(resource_config, dict) else None
    current = resource_config.get("current_host") if isinstance(resource_config, dict) else None
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) and h for h in hosts):
        raise ClusterError(f"{path}: hosts must be a non-empty list of host names, got {hosts!r}")
    repeated = sorted({h for h in hosts if hosts.count(h) > 1})
    if repeated:
        raise ClusterError(f"{path}: hosts lists {', '.join(repeated)} more than once: {hosts}")
    if current not in hosts:
        raise ClusterError(
            f"{path}: current_host {current!r} is not one of the hosts {hosts}; this host would train "
            "without a place in the job"
        )


def _read_json_object(path, default, error_class, what):
    value = _read_json(path, default, error_class)
    if value is not default and not isinstance(value, dict):
        raise error_class(f"{path} must hold {what}")
    return value


def _read_json(path, default, error_class):
    if not os.path.exists(path):
        return default
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise error_class(f"{path} is not valid JSON ({error})") from error
