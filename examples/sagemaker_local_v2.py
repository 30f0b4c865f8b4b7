"""Runs the image as a training job with the SageMaker Python SDK v2's local mode: no AWS call.

    .venv-sagemaker-v2/bin/python examples/sagemaker_local_v2.py --image localhost/review-trainer:ci \\
        --data DATA --output OUT epochs=1 max_seq_length=32

DATA holds one folder per channel: `train/` (required), `validation/` and `test/` (optional), each
with review tables or TFRecords (README: Data channels); each becomes a `file://` channel. Extra
`name=value` arguments are hyperparameters. The SDK writes OUT/model.tar.gz (the job's
/opt/ml/model) and OUT/output.tar.gz (its /opt/ml/output: data/evaluation.json and success or
failure), replacing those of an earlier run; the script prints where, the metric definitions
applied to the log, and for a failed job its failure reason, ending with the job's exit code.
The image's baked weights are used unless --pretrained-model-dir names another folder inside it.

Set-up (`make sagemaker-v2` makes .venv-sagemaker-v2 from docker/requirements-sagemaker-v2.lock):
local mode runs `docker compose` or `docker-compose`, so one of them must reach a container
engine (with podman: tests/local_mode.py writes `docker` and `docker-compose` shims).

No AWS credentials are needed or read, and nothing calls AWS: the boto session has a region only,
telemetry is opted out (it would call STS and S3), and AWS_EC2_METADATA_DISABLED is set before
`import sagemaker`, whose boto3 clients would otherwise ask the EC2 metadata service for
credentials (and local mode would copy any it found into the container).
"""

import os
import tempfile

os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

import boto3  # noqa: E402
from local_job import METRIC_REGEXES, ROLE, SDK_CONFIG, parse_arguments, report, run_logged  # noqa: E402
from sagemaker.estimator import Estimator  # noqa: E402
from sagemaker.local import LocalSession  # noqa: E402

METRIC_DEFINITIONS = [{"Name": name, "Regex": regex} for name, regex in METRIC_REGEXES.items()]


def main():
    args, channels, hyperparameters = parse_arguments(__doc__.split("\n")[0],
                                                      "where model.tar.gz and output.tar.gz go")
    output = args.output
    session = LocalSession(boto_session=boto3.Session(region_name=args.region), sagemaker_config=SDK_CONFIG)
    work = tempfile.TemporaryDirectory(prefix=".local-mode-", dir=output, ignore_cleanup_errors=True)
    with work as container_root:
        # local_code: nothing is uploaded to S3; container_root: the SDK's per-job folders (the
        # /opt/ml it mounts), removed at the end instead of left in /tmp (what a rootless user
        # cannot remove of the container's root-owned files stays there).
        session.config = {"local": {"local_code": True, "container_root": container_root}}
        estimator = Estimator(
            image_uri=args.image,
            role=ROLE,
            instance_count=1,
            instance_type="local",
            enable_network_isolation=True,
            hyperparameters=hyperparameters,
            metric_definitions=METRIC_DEFINITIONS,
            # sagemaker-training's runner would wait for algo-1 to resolve without it (the job
            # does not use that runner; a derived image might).
            environment={"SM_STUDIO_LOCAL_MODE": "true"},
            output_path=f"file://{output}",
            base_job_name="review-trainer-local",
            sagemaker_session=session,
        )
        inputs = {name: f"file://{folder}" for name, folder in channels.items()}
        log_text, failed = run_logged(lambda: estimator.fit(inputs, wait=True, logs=True))

    # Local mode writes both archives into a file:// output_path's folder itself, failed or not.
    model_tar, output_tar = os.path.join(output, "model.tar.gz"), os.path.join(output, "output.tar.gz")
    report(model_tar, output_tar, log_text, failed)
    assert estimator.model_data == f"file://{model_tar}", estimator.model_data
    print(f"job: {estimator.latest_training_job.name}")


if __name__ == "__main__":
    main()
