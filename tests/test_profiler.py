"""The job's own profile (telemetry/profiler.py): figures checked against values worked out by hand, the
sampler thread, the files it writes, the advice, and NVML absent, failing or faked.

Samples are taken by calling sample() on a profiler started without its thread, at times of a fake
clock: what a test checks never depends on what a thread managed to do during a sleep."""

import dataclasses
import json
import math
import random
import re
import threading
import types

import psutil
import pynvml
import pytest
from review_trainer.telemetry import profiler
from review_trainer.telemetry.profiler import Profiler, interval_from_config

GIB = 2**30


@dataclasses.dataclass
class StepResult:  # the fields of the training loop's step result that the profiler reads
    seconds: float
    input_seconds: float = 0.0
    examples: int = 32
    epoch: int = 1


def feed(hook, seconds, inputs=None, examples=32):
    for step, step_seconds in enumerate(seconds, 1):
        hook.on_step_end(step, None, StepResult(step_seconds, inputs[step - 1] if inputs else 0.0, examples))


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def sampled(hook, clock, count, every=0.01):
    """`count` samples, `every` seconds apart on the fake clock."""
    for _ in range(count):
        clock.now += every
        hook.sample()


def advice_lines(lines):
    return [line for line in lines if line.startswith("profile_advice")]


@pytest.fixture
def no_nvml(monkeypatch):
    def fail():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)


@pytest.fixture
def fake_nvml(monkeypatch):
    """Two 16 GiB GPUs: GPU 0 at 40% with 3 GiB used, GPU 1 at 90% with 12 GiB; while fake.before
    is (utilisation, GiB used), each GPU reads that instead."""
    fake = types.SimpleNamespace(before=None, utilization={0: 40, 1: 90}, used={0: 3 * GIB, 1: 12 * GIB},
                                 shutdown=False)

    def utilization(handle):
        return types.SimpleNamespace(gpu=fake.utilization[handle] if fake.before is None else fake.before[0])

    def memory(handle):
        used = fake.used[handle] if fake.before is None else fake.before[1] * GIB
        return types.SimpleNamespace(used=used, total=16 * GIB)

    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: setattr(fake, "shutdown", True))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 2)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda index: index)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", utilization)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", memory)
    return fake


def test_interval_from_profilerconfig():
    assert interval_from_config(None) == 0.5  # SageMaker's default: 500 ms
    assert interval_from_config({"ProfilingParameters": {"ProfilerEnabled": "True"}}) == 0.5
    assert interval_from_config({"ProfilingIntervalInMilliseconds": 100, "ProfilingParameters": {}}) == 0.1
    assert interval_from_config({"profilingintervalinmilliseconds": "5000"}) == 5.0  # any case, like smdebug
    assert interval_from_config({"ProfilingIntervalInMilliseconds": 0}) == 0.5
    assert interval_from_config({"ProfilingIntervalInMilliseconds": "soon"}) == 0.5
    assert interval_from_config(["not", "a", "dict"]) == 0.5


def test_step_percentiles_leave_out_the_first_step(tmp_path):
    # After a 50 s first step (compilation), steps of 1..100 s in a shuffled order: with linear
    # interpolation (numpy's and Debugger's) the q-th percentile of 1..100 is 1 + 99 q / 100.
    steady = list(range(1, 101))
    random.Random(0).shuffle(steady)
    hook = Profiler(0.5, tmp_path)
    feed(hook, [50.0] + [float(s) for s in steady])
    summary = hook.summary()
    assert summary["step_count"] == 101
    assert summary["first_step"] == 1 and summary["first_step_seconds"] == 50.0
    assert summary["step_seconds"] == pytest.approx(
        {"p50": 50.5, "p90": 90.1, "p95": 95.05, "p99": 99.01, "max": 100, "mean": 50.5})
    # stddev of 1..100 is sqrt((100**2 - 1) / 12): nothing is over 50.5 + 3 x 28.87
    assert summary["step_outlier_threshold_seconds"] == pytest.approx(50.5 + 3 * math.sqrt(9999 / 12))
    assert summary["step_outlier_count"] == 0 and summary["step_outliers"] == []


def outlier_threshold(steady, slow, share):
    """mean + 3 x population stddev of a series of two values, `share` of them slow."""
    return steady + (slow - steady) * share + 3 * (slow - steady) * math.sqrt(share * (1 - share))


def test_injected_slow_steps_are_the_outliers(tmp_path):
    # 200 timed steps of 0.1 s, 12 of them 1.0 s: mean + 3 stddev = 0.795 s, under the slow ones
    slow_steps = list(range(15, 181, 15))
    seconds = [30.0] + [1.0 if step in slow_steps else 0.1 for step in range(2, 202)]
    lines = []
    hook = Profiler(0.5, tmp_path, print_fn=lines.append)
    feed(hook, seconds)
    summary = hook.summary()
    assert summary["step_outlier_threshold_seconds"] == pytest.approx(outlier_threshold(0.1, 1.0, 12 / 200))
    assert summary["step_outlier_count"] == 12
    assert [o["step"] for o in summary["step_outliers"]] == slow_steps
    assert all(o["seconds"] == 1.0 for o in summary["step_outliers"])
    # more than StepOutlier's 10 ignored outliers, over more than 100 steps: advice naming the steps
    [line] = summary["advice"]
    assert line.startswith("profile_advice step_outliers: 12 of 200 steps")
    assert "steps 15, 30, 45, 60, 75, 90, 105, 120, 135, 150, 165, 180;" in line


def test_steady_steps_have_no_outliers(tmp_path):
    hook = Profiler(0.5, tmp_path)
    feed(hook, [30.0] + [0.25] * 150)  # stddev 0: the threshold is the mean, which no step exceeds
    summary = hook.summary()
    assert summary["step_outlier_threshold_seconds"] == 0.25 and summary["step_outlier_count"] == 0


def test_few_outliers_are_listed_without_advice(tmp_path):
    slow_steps = [20, 60, 100, 140, 180]
    hook = Profiler(0.5, tmp_path)
    feed(hook, [30.0] + [1.0 if step in slow_steps else 0.1 for step in range(2, 202)])
    summary = hook.summary()
    assert [o["step"] for o in summary["step_outliers"]] == slow_steps  # 5: not over the 10 ignored
    assert summary["advice"] == []


def test_the_outlier_list_is_capped_and_says_how_many_more(tmp_path):
    # 400 timed steps, 25 slow (a share of 1/16: sqrt(15) > 3 stddevs, so all 25 stand out)
    slow_steps = list(range(10, 260, 10))
    hook = Profiler(0.5, tmp_path)
    feed(hook, [30.0] + [1.0 if step in slow_steps else 0.1 for step in range(2, 402)])
    summary = hook.summary()
    assert summary["step_outlier_count"] == 25
    assert [o["step"] for o in summary["step_outliers"]] == slow_steps[:20]
    assert "steps 10, 20," in summary["advice"][0] and "200 and 5 more;" in summary["advice"][0]


@pytest.mark.parametrize("inputs, share, bound", [
    ([9.0, 0.5, 0.5, 0.0], 1.0 / 4.0, False),
    ([9.0, 1.0, 1.0, 0.0], 2.0 / 4.0, False),  # exactly half: Debugger's threshold is "more than 50%"
    ([9.0, 0.6, 1.5, 0.7], 2.8 / 4.0, True),
])
def test_input_wait_share_and_throughput(tmp_path, inputs, share, bound):
    # Timed steps of 1 + 2 + 1 = 4 s with 3 x 32 examples: 24 examples a second; the first step's
    # 9 s of input wait (the pipeline filling) is left out with the step.
    hook = Profiler(0.5, tmp_path)
    feed(hook, [20.0, 1.0, 2.0, 1.0], inputs)
    summary = hook.summary()
    assert summary["input_wait_share"] == pytest.approx(share)
    assert summary["samples_per_second"] == pytest.approx(24.0)
    assert any(line.startswith("profile_advice input_bound:") for line in summary["advice"]) == bound


def test_the_sampler_thread_stops_on_close_and_takes_a_last_sample(tmp_path, no_nvml):
    hook = Profiler(3600.0, tmp_path, print_fn=lambda line: None).start()  # it never samples on its own here
    assert hook._thread.is_alive()
    summary = hook.close()
    assert not hook._thread.is_alive()
    assert "profiler" not in [thread.name for thread in threading.enumerate()]
    assert summary["sample_count"] == 1  # close's own: a job shorter than the interval still has one
    assert hook.close() is None  # a second close does nothing


def test_the_samples_are_summarised_and_written(tmp_path, no_nvml):
    clock, lines = FakeClock(), []
    hook = Profiler(0.01, tmp_path, print_fn=lines.append, clock=clock).start(sampler_thread=False)
    sampled(hook, clock, 30)
    feed(hook, [3.0, 0.1, 0.1, 0.1], [0.0, 0.02, 0.02, 0.02])
    hook.on_epoch_end(1, 4, {"train_loss": 0.5})
    sampled(hook, clock, 5)
    summary = hook.close()
    assert summary["sample_count"] == 35 and summary["sampling_errors"] == 0
    assert summary["epoch_end_steps"] == [4]
    assert 0 <= summary["cpu_mean_percent"] <= 100 and 0 <= summary["cpu_p95_percent"] <= 100
    assert len(summary["cpu_core_mean_percents"]) == psutil.cpu_count()
    assert 0 < summary["process_rss_max_bytes"] <= summary["memory_total_bytes"]
    assert 0 < summary["memory_max_used_bytes"] <= summary["memory_total_bytes"]
    # No GPU fields where NVML fails to start, and no error either
    assert "gpus" not in summary and "cpu_bottleneck_share" not in summary
    assert not any("gpu" in line for line in lines)
    # The balanced run calls for no advice; the summary line has the figures
    assert advice_lines(lines) == []
    [line] = [line for line in lines if line.startswith("profile ")]
    assert "step_count=4 " in line and "step_p50_seconds=0.1000" in line and "job_input_wait_share=0.2000" in line
    assert re.search(r"\bsample_count=\d+", line)
    # profile.json holds the summary, filled
    written = json.loads((tmp_path / "profile.json").read_text())
    assert written == json.loads(json.dumps(summary))
    for field in ("step_count", "first_step_seconds", "step_seconds", "step_outlier_count", "step_outliers",
                  "input_wait_share", "samples_per_second", "cpu_mean_percent", "cpu_p95_percent",
                  "memory_max_used_bytes", "process_rss_max_bytes", "sampling_interval_seconds",
                  "sample_count", "advice"):
        assert written[field] is not None, field
    assert written["sampling_interval_seconds"] == 0.01 and written["first_step_seconds"] == 3.0
    # profile.html stands alone: the plots are inline PNGs, nothing is fetched
    page = (tmp_path / "profile.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2  # step time; CPU and memory
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "step_p95_seconds" in page and "<li>none</li>" in page


def test_a_failing_sample_is_counted_not_raised(tmp_path, no_nvml, monkeypatch):
    def broken():
        raise OSError("no /proc/meminfo")

    monkeypatch.setattr(psutil, "virtual_memory", broken)
    clock, lines = FakeClock(), []
    hook = Profiler(0.01, tmp_path, print_fn=lines.append, clock=clock).start(sampler_thread=False)
    sampled(hook, clock, 3)
    feed(hook, [1.0, 0.1])
    summary = hook.close()
    assert summary["sampling_errors"] == 3 and summary["sample_count"] == 0
    assert summary["sampling_error_messages"][0] == "OSError: no /proc/meminfo"
    assert json.loads((tmp_path / "profile.json").read_text())["sampling_errors"] == summary["sampling_errors"]
    assert [line for line in lines if line.startswith("profile ")]  # the report still comes


def test_fake_gpus_are_summarised(tmp_path, fake_nvml, monkeypatch):
    # Two cores at 95% and 15% (55% overall); until the first step ends the GPUs read 0% (left out of
    # the utilisation figures) and 5 GiB (in the memory maximum); then GPU 0 reads 40% (under 70%:
    # advice) and 3 GiB, GPU 1 90% and 12 GiB.
    monkeypatch.setattr(psutil, "cpu_percent", lambda percpu=False: [95.0, 15.0])
    fake_nvml.before = (0, 5)
    clock, lines = FakeClock(), []
    hook = Profiler(0.01, tmp_path, print_fn=lines.append, clock=clock).start(sampler_thread=False)
    sampled(hook, clock, 5)
    fake_nvml.before = None
    feed(hook, [2.0, 0.1, 0.1])
    sampled(hook, clock, 5)
    summary = hook.close()
    assert fake_nvml.shutdown
    assert summary["cpu_mean_percent"] == pytest.approx(55.0) and summary["cpu_p95_percent"] == pytest.approx(55.0)
    assert summary["cpu_core_mean_percents"] == [95.0, 15.0]
    gpu0, gpu1 = summary["gpus"]
    assert gpu0 == {"index": 0, "utilization_mean_percent": 40.0, "utilization_p50_percent": 40.0,
                    "utilization_p95_percent": 40.0, "memory_max_used_bytes": 5 * GIB,
                    "memory_total_bytes": 16 * GIB}
    assert gpu1["index"] == 1 and gpu1["utilization_p95_percent"] == 90.0
    assert gpu1["memory_max_used_bytes"] == 12 * GIB
    assert summary["cpu_bottleneck_share"] == 0.0  # a core over 90%, but no GPU under 10%
    [advice] = advice_lines(lines)
    assert advice.startswith("profile_advice low_gpu_utilization: GPU 0 p95 utilisation is 40%")
    assert "train_batch_size" in advice and "5.0 of 16.0 GiB" in advice
    [line] = [line for line in lines if line.startswith("profile ")]
    assert "gpu0_utilization_mean_percent=40.0000" in line and "gpu1_memory_max_used_gib=12.0000" in line
    page = (tmp_path / "profile.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3  # and the GPUs'


def test_a_cpu_bottleneck(tmp_path, fake_nvml, monkeypatch):
    # A core at 95% while GPU 0 idles at 5% (GPU 1 at 90%) in every sample: CPUBottleneck's case
    monkeypatch.setattr(psutil, "cpu_percent", lambda percpu=False: [95.0, 15.0])
    fake_nvml.utilization[0] = 5
    clock, lines = FakeClock(), []
    hook = Profiler(0.01, tmp_path, print_fn=lines.append, clock=clock).start(sampler_thread=False)
    feed(hook, [2.0, 0.1])
    sampled(hook, clock, 5)
    summary = hook.close()
    assert summary["cpu_bottleneck_share"] == 1.0
    kinds = [line.split(":")[0] for line in advice_lines(lines)]
    assert kinds == ["profile_advice cpu_bound", "profile_advice low_gpu_utilization"]


def test_only_the_chosen_gpus_are_sampled(tmp_path, fake_nvml, monkeypatch):
    monkeypatch.setattr(psutil, "cpu_percent", lambda percpu=False: [95.0, 15.0])
    fake_nvml.utilization[0] = 5  # idle, but not this job's
    clock, lines = FakeClock(), []
    hook = Profiler(0.01, tmp_path, print_fn=lines.append, gpu_indices=[1], clock=clock).start(sampler_thread=False)
    feed(hook, [2.0, 0.1])
    sampled(hook, clock, 5)
    summary = hook.close()
    assert [gpu["index"] for gpu in summary["gpus"]] == [1]
    assert summary["cpu_bottleneck_share"] == 0.0 and advice_lines(lines) == []
    assert "gpu1_utilization_mean_percent=90.0000" in lines[0] and "gpu0" not in lines[0]


def test_a_profile_of_nothing_still_reports(tmp_path):
    # close() without start() and without steps: an empty report, no error
    lines = []
    summary = Profiler(0.5, tmp_path / "out", print_fn=lines.append).close()
    assert summary["step_count"] == 0 and summary["sample_count"] == 0 and summary["advice"] == []
    assert lines == ["profile step_count=0 sample_count=0"]
    assert (tmp_path / "out" / "profile.json").exists() and (tmp_path / "out" / "profile.html").exists()


def test_a_long_job_keeps_every_other_sample_and_doubles_the_interval(tmp_path, monkeypatch):
    monkeypatch.setattr(profiler, "MAX_SAMPLES", 8)
    clock = FakeClock()
    job = Profiler(0.5, str(tmp_path), clock=clock).start(sampler_thread=False)
    sampled(job, clock, 8, every=0.5)
    assert len(job.samples) == 4 and job.interval_seconds == 1.0
    stamps = [sample["at"] for sample in job.samples]
    assert stamps == sorted(stamps)
