"""What the two local-mode examples share, apart from the SDK: arguments, metric definitions, and
reading the job's outcome (sagemaker_local_v2.py: SDK v2's Estimator; sagemaker_local_v3.py: v3's
ModelTrainer). Plain Python: each example imports it from this folder."""

import argparse
import os
import re
import sys
import tarfile

ROLE = "arn:aws:iam::123456789012:role/review-trainer-local"  # never used in local mode
CHANNELS = ("train", "validation", "test")
NUMBER = r"([-+0-9.eE]+|nan|inf)"
METRIC_NAMES = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy",
                "test_macro_f1", "train_samples_per_second", "input_wait_share")
# `\b` anchors: train_loss never matches val_loss or running_train_loss (README: How a job runs).
METRIC_REGEXES = {name: rf"\b{name}={NUMBER}" for name in METRIC_NAMES}
# Telemetry would call STS and S3 (with the SDK's default session, whatever region that has).
SDK_CONFIG = {"SchemaVersion": "1.0", "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": True}}}}


def parse_arguments(description, output_help):
    """(arguments, {channel: folder}, hyperparameters) from the command line."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--image", required=True, help="image URI, e.g. localhost/review-trainer:ci")
    parser.add_argument("--data", required=True, help="a folder with train/ and optional validation/, test/")
    parser.add_argument("--output", required=True, help=output_help)
    parser.add_argument("--pretrained-model-dir", help="a Hugging Face folder inside the image "
                        "(default: the image's baked weights, PRETRAINED_MODEL_DIR=/opt/pretrained)")
    parser.add_argument("--region", default=os.environ.get("AWS_REGION", "us-east-1"),
                        help="any SageMaker region: local mode needs one and never calls it")
    parser.add_argument("hyperparameters", nargs="*", metavar="name=value")
    args = parser.parse_args()
    data = os.path.abspath(args.data)
    channels = {name: os.path.join(data, name) for name in CHANNELS if os.path.isdir(os.path.join(data, name))}
    if "train" not in channels:
        raise SystemExit(f"{data}/train is not a folder: the job needs a train channel")
    hyperparameters = {}
    for pair in args.hyperparameters:
        name, separator, value = pair.partition("=")
        if not separator or not name:
            raise SystemExit(f"hyperparameters are name=value, not {pair!r}")
        hyperparameters[name] = value
    if args.pretrained_model_dir:
        hyperparameters["pretrained_model_dir"] = args.pretrained_model_dir
    args.output = os.path.abspath(args.output)
    os.makedirs(args.output, exist_ok=True)
    return args, channels, hyperparameters


class Tee:
    """Keeps what the SDK prints of the container's log, to apply the metric definitions to it."""

    def __init__(self, stream):
        self.stream, self.lines = stream, []

    def write(self, text):
        self.lines.append(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


def run_logged(train):
    """Runs train() with stdout kept; returns (log text, the RuntimeError of a failed job or None)."""
    tee = Tee(sys.stdout)
    sys.stdout = tee
    try:
        train()
        failed = None
    except RuntimeError as error:  # local mode's way of saying the container exited non-zero
        failed = error
    finally:
        sys.stdout = tee.stream
    return "".join(tee.lines), failed


def report(model_tar, output_tar, log_text, failed):
    """Prints where the archives are and the final metrics; a failed job exits with its own code."""
    print(f"model.tar.gz: {model_tar}")
    print(f"output.tar.gz: {output_tar}")
    if failed is not None:  # exit with the job's own exit code (README: Failures and exit codes)
        code = re.search(r"exited with code: (\d+)", str(failed))
        print(f"training job failed: {failure_reason(output_tar) or failed}", file=sys.stderr)
        raise SystemExit(int(code.group(1)) if code else 1)
    metrics = final_metrics(log_text)
    print("final metrics (metric_definitions applied to the log): "
          + " ".join(f"{name}={value:g}" for name, value in metrics.items()))


def final_metrics(log_text):
    """The last value each metric definition captures, as SageMaker's FinalMetricDataList has it.
    Local mode passes metric_definitions but never applies them."""
    metrics = {}
    for name, regex in METRIC_REGEXES.items():
        values = re.findall(regex, log_text)
        if values:
            metrics[name] = float(values[-1])
    return metrics


def failure_reason(output_tar):
    """The first line of the job's output/failure (SageMaker's FailureReason), if it wrote one."""
    try:
        with tarfile.open(output_tar) as tar:
            return tar.extractfile("failure").read().decode().splitlines()[0]
    except (OSError, KeyError, tarfile.TarError, IndexError):
        return None
