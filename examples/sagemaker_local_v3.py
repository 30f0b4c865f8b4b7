"""Runs the image as a training job with the SageMaker Python SDK v3's ModelTrainer in local
container mode: no AWS call.

    .venv-sagemaker-v3/bin/python examples/sagemaker_local_v3.py --image localhost/review-trainer:ci \\
        --data DATA --output OUT epochs=1 max_seq_length=32

The same job as examples/sagemaker_local_v2.py (see there for DATA, the hyperparameters and the
set-up; `make sagemaker-v3` makes .venv-sagemaker-v3 from docker/requirements-sagemaker-v3.lock).
ModelTrainer's local mode takes plain folders as channels and leaves model.tar.gz and
output.tar.gz in OUT/compressed_artifacts/; the last lines say where.
"""

import logging
import os

os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

import boto3  # noqa: E402
from local_job import METRIC_REGEXES, ROLE, SDK_CONFIG, parse_arguments, report, run_logged  # noqa: E402
from sagemaker.core.local.local_session import LocalSession  # noqa: E402
from sagemaker.core.training.configs import Compute, InputData, MetricDefinition, Networking  # noqa: E402
from sagemaker.train.model_trainer import Mode, ModelTrainer  # noqa: E402

METRIC_DEFINITIONS = [MetricDefinition(name=name, regex=regex) for name, regex in METRIC_REGEXES.items()]


def main():
    args, channels, hyperparameters = parse_arguments(
        __doc__.split("\n")[0], "the local container root: model.tar.gz and output.tar.gz go to its "
        "compressed_artifacts/")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:%(name)s:%(message)s")  # the SDK's steps
    session = LocalSession(boto_session=boto3.Session(region_name=args.region), sagemaker_config=SDK_CONFIG)
    trainer = ModelTrainer(
        training_mode=Mode.LOCAL_CONTAINER,
        sagemaker_session=session,
        training_image=args.image,
        role=ROLE,
        base_job_name="review-trainer-local",
        compute=Compute(instance_type="local", instance_count=1),
        networking=Networking(enable_network_isolation=True),
        hyperparameters=hyperparameters,
        environment={"SM_STUDIO_LOCAL_MODE": "true"},
        local_container_root=args.output,
    ).with_metric_definitions(METRIC_DEFINITIONS)
    inputs = [InputData(channel_name=name, data_source=folder) for name, folder in channels.items()]
    log_text, failed = run_logged(lambda: trainer.train(input_data_config=inputs, wait=True, logs=True))

    artifacts = os.path.join(args.output, "compressed_artifacts")  # written failed or not
    report(os.path.join(artifacts, "model.tar.gz"), os.path.join(artifacts, "output.tar.gz"), log_text, failed)


if __name__ == "__main__":
    main()
