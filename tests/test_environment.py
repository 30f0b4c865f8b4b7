"""The contract (contract/environment.py): what the job reads of SageMaker's environment, in one place."""

import os

from conftest import make_opt_ml
from review_trainer.contract import environment


def read(monkeypatch, base, **variables):
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(base))
    for name in ("TRAINING_JOB_NAME", "CUDNN_LIB_CONFIG", "IMAGE_VERSION", "PRETRAINED_MODEL_DIR", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return environment.read_environment()


def test_a_local_run_and_a_sagemaker_job_as_the_contract_reads_them(tmp_path, monkeypatch):
    base = make_opt_ml(str(tmp_path), {"train": {}, "test": {}}, {"epochs": "2"}, hosts=("algo-1", "algo-2"))
    local = read(monkeypatch, base)
    assert (local.hyperparameters, local.hosts, local.current_host) == ({"epochs": "2"}, ["algo-1", "algo-2"], "algo-1")
    assert local.channel_dirs == {name: os.path.join(base, "input", "data", name) for name in ("train", "test")}
    assert local.model_dir == os.path.join(base, "model") and local.output_data_dir == os.path.join(base, "output", "data")
    # Debugger's tensors go to output/tensors unless debughookconfig.json names a LocalPath
    assert local.default_tensors_dir == os.path.join(base, "output", "tensors")
    assert (local.under_sagemaker, local.job_name, local.cudnn_lib_config) == (False, "", None)
    job = read(monkeypatch, base, TRAINING_JOB_NAME="reviews-1", CUDNN_LIB_CONFIG="GRAPH_JIT_ONLY", IMAGE_VERSION="1.2")
    assert (job.under_sagemaker, job.job_name, job.cudnn_lib_config, job.image_version) == (
        True, "reviews-1", "GRAPH_JIT_ONLY", "1.2")


def test_the_gpus_are_those_cuda_visible_devices_leaves(tmp_path, monkeypatch):
    from sagemaker_training import environment as sagemaker_environment

    monkeypatch.setattr(sagemaker_environment, "num_gpus", lambda: 8)  # nvidia-smi counts every GPU
    base = make_opt_ml(str(tmp_path), {"train": {}})
    assert read(monkeypatch, base).num_gpus == 8
    assert read(monkeypatch, base, CUDA_VISIBLE_DEVICES="0,3").num_gpus == 2
    assert read(monkeypatch, base, CUDA_VISIBLE_DEVICES="").num_gpus == 0
