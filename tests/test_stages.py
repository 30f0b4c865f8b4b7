"""The job as stages (job.py): each runs once, in the order the job's docstring gives, and hands the
next a small typed object. A job whose stages were skipped, repeated or reordered, or one that
passed loose values between them, fails here."""

import dataclasses

from conftest import FAST_HYPERPARAMETERS, amazon_tsv, make_opt_ml, make_reviews, train_in_process
from review_trainer import job
from review_trainer.data.channels import Channels
from review_trainer.model.pretrained import Pretrained
from review_trainer.outputs.evaluation import Evaluation
from review_trainer.training.stages import Devices, ModelState, Trained

# (the name job.py calls, the type it returns), in the job's order
EXPECTED = [
    ("set_up", "Devices"),
    ("open_for_job", "Pretrained"),
    ("open_channels", "Channels"),
    ("check_settings", "NoneType"),
    ("at_the_scan", "Rules"),
    ("build_model", "ModelState"),
    ("train", "Trained"),
    ("evaluate_test", "Evaluation"),
    ("export_and_publish", "str"),
    ("after_publishing", "NoneType"),
]


def recording(calls, function):
    def stage(*args, **kwargs):
        result = function(*args, **kwargs)
        calls.append((function.__name__, type(result).__name__))
        return result
    return stage


def test_the_job_runs_each_stage_once_in_order_and_hands_on_small_typed_objects(tmp_path, monkeypatch, distilbert_dir):
    calls = []
    for owner, name in [(job.stages, "set_up"), (job, "open_for_job"), (job, "open_channels"),
                        (job.reports, "check_settings"), (job.stages, "build_model"), (job.stages, "train"),
                        (job.evaluation, "evaluate_test"), (job.export, "export_and_publish"),
                        (job.reports, "after_publishing")]:
        monkeypatch.setattr(owner, name, recording(calls, getattr(owner, name)))
    monkeypatch.setattr(job.Rules, "at_the_scan", classmethod(recording(calls, job.Rules.at_the_scan.__func__)))
    tsv = amazon_tsv(make_reviews(24))
    base = make_opt_ml(tmp_path, {"train": {"train.tsv": tsv}, "test": {"test.tsv": tsv}},
                       {**FAST_HYPERPARAMETERS, "epochs": 1, "train_batch_size": 8})

    result = train_in_process(base, distilbert_dir)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert calls == EXPECTED
    # The hand-offs are frozen dataclasses of a few fields, not bags of locals.
    for handed in (Devices, Pretrained, Channels, ModelState, Trained, Evaluation):
        assert dataclasses.is_dataclass(handed) and handed.__dataclass_params__.frozen, handed
        assert len(dataclasses.fields(handed)) <= 8, handed
