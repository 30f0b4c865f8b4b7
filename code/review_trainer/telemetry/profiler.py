"""A profile of the training job, like SageMaker Debugger's profiler report, written by the job itself.

Debugger's report comes from rules run in a separate processing job (and its framework profiling
ended with TensorFlow 2.11); this hook measures inside the job, with nothing to set up:

    steps   each step's wall time and the part of it spent waiting for the next batch (the training
            loop's numbers): step-time percentiles, outliers, the input wait share, samples per second
    host    every `interval_seconds` (profilerconfig.json's ProfilingIntervalInMilliseconds, 500 ms by
            default): CPU utilisation overall and per core, memory used, this process's RSS
    GPUs    at the same times, through NVML where it starts: each GPU's utilisation and memory

close() writes output_dir/profile.json (the figures) and output_dir/profile.html (plots and table, no
external assets), and prints a `profile` line and a `profile_advice` line per finding, judged with
the default thresholds of Debugger's rules.

The first step the job runs traces and compiles the step function, so it is reported apart as
first_step_seconds and every step figure is of the steps after it. Utilisation figures are of the
samples taken after it too (Debugger's rules wait 1000 data points, `patience`, for the same
reason: the GPU idles while the job starts); memory maxima are of every sample.
"""

import base64
import contextlib
import html
import io
import os
import threading
import time

import numpy as np
import psutil
from review_trainer.contract.files import write_json
from review_trainer.telemetry.metric_log import format_metrics

# SageMaker's defaults. ProfilerConfig.ProfilingIntervalInMilliseconds: 500 ms unless the job sets
# one of 100, 200, 500, 1000, 5000 or 60000 (the SageMaker API reference).
DEFAULT_INTERVAL_SECONDS = 0.5
# Default thresholds of Debugger's profiler rules: smdebug_rulesconfig/profiler_rules/rules.py, and
# the rules' code in awslabs/sagemaker-debugger (smdebug/profiler/analysis/rules/, until Dec 2020).
OUTLIER_STDDEVS = 3     # StepOutlier.stddev: a step longer than mean + 3 x stddev (population) is an outlier
OUTLIERS_IGNORED = 10   # StepOutlier.n_outliers: it fires on more than 10 (it also waits for over 100
#                         steps, which over 10 outliers at 3 stddevs imply: Cantelli's inequality)
BOTTLENECK_SHARE = 0.5  # CPUBottleneck/IOBottleneck.threshold: a bottleneck more than 50% of the time
BUSY_CPU_PERCENT = 90   # CPUBottleneck.cpu_threshold: a core above 90%...
IDLE_GPU_PERCENT = 10   # CPUBottleneck.gpu_threshold: ...while a GPU is below 10%
LOW_GPU_P95_PERCENT = 70  # LowGPUUtilization.threshold_p95 (BatchSize.gpu_threshold_p95 alike)
LISTED_OUTLIERS = 20    # outliers named in the report; step_outlier_count has them all
KEPT_ERRORS = 5         # sampling error messages kept; sampling_errors counts them all
MAX_SAMPLES = 20_000    # about 3 hours at 500 ms; then every other one goes and the interval doubles
PERCENTILES = {"p50": 50, "p90": 90, "p95": 95, "p99": 99}
GIB = 2**30


def interval_from_config(config):
    """Seconds between samples, from the contents of /opt/ml/input/config/profilerconfig.json (a dict,
    or None without one). SageMaker writes the job's ProfilerConfig there, e.g.
    {"ProfilingIntervalInMilliseconds": 500, "ProfilingParameters": {...}}; smdebug reads its keys
    in any case, and so does this."""
    keys = {str(key).lower(): value for key, value in (config if isinstance(config, dict) else {}).items()}
    try:
        milliseconds = float(keys["profilingintervalinmilliseconds"])
    except (KeyError, TypeError, ValueError):
        return DEFAULT_INTERVAL_SECONDS
    return milliseconds / 1000 if milliseconds > 0 else DEFAULT_INTERVAL_SECONDS


class Profiler:
    """A training-loop hook (on_step_end, on_epoch_end) with a sampler thread; start(), then close()."""

    def __init__(self, interval_seconds, output_dir, print_fn=print, gpu_indices=None, clock=time.monotonic):
        """clock: where the times of steps and samples come from (a test drives its own)."""
        self.interval_seconds = interval_seconds
        self.clock = clock
        self.output_dir = output_dir
        self.print_fn = print_fn
        self.gpu_indices = gpu_indices
        self.steps = []        # (step, seconds, input_seconds, examples, ended_at)
        self.samples = []      # dicts; `at` is seconds since the profiler was made, like ended_at
        self.epoch_end_steps = []
        self.errors, self.error_count = [], 0
        self._born = clock()
        self._stop = threading.Event()
        self._thread = self._nvml = None
        self._gpus = []
        self._closed = False

    # The hook
    def on_step_end(self, step, running, result):
        self.steps.append((step, float(result.seconds), float(result.input_seconds), float(result.examples),
                           self._now()))

    def on_epoch_end(self, epoch, step, logs=None):
        self.epoch_end_steps.append(step)

    # Sampling
    def start(self, sampler_thread=True):
        """Opens psutil and NVML, and starts sampling every interval_seconds in a thread of its own
        (sampler_thread False: only when sample() is called, as tests do)."""
        self._process = psutil.Process()
        psutil.cpu_percent(percpu=True)  # the first reading means nothing: it starts psutil's count
        self._gpus = self._open_nvml()
        if sampler_thread:
            self._thread = threading.Thread(target=self._sample_until_stopped, name="profiler", daemon=True)
            self._thread.start()
        return self

    def _open_nvml(self):
        """(index, handle) of the GPUs to sample; none where NVML is missing or fails (a CPU host)."""
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            indices = range(pynvml.nvmlDeviceGetCount()) if self.gpu_indices is None else self.gpu_indices
            return [(index, pynvml.nvmlDeviceGetHandleByIndex(index)) for index in indices]
        except Exception:
            return []

    def _sample_until_stopped(self):
        while not self._stop.wait(self.interval_seconds):
            self.sample()

    def sample(self):
        """One sample of the host (and GPUs): the sampler thread's, or a caller's."""
        # A profile must never fail the job: a failed sample is counted and named in the report.
        try:
            cores, memory = psutil.cpu_percent(percpu=True), psutil.virtual_memory()
            sample = {"at": self._now(), "cpu_percent": sum(cores) / len(cores), "core_percents": cores,
                      "memory_used_bytes": memory.used, "rss_bytes": self._process.memory_info().rss}
            self.memory_total_bytes = memory.total
            if self._gpus:
                sample["gpus"] = [self._read_gpu(handle) for _, handle in self._gpus]
            self.samples.append(sample)
            if len(self.samples) >= MAX_SAMPLES:  # a long job: half the samples, twice the interval, bounded memory
                del self.samples[1::2]
                self.interval_seconds *= 2
        except Exception as error:
            self.error_count += 1
            if len(self.errors) < KEPT_ERRORS:
                self.errors.append(f"{type(error).__name__}: {error}")

    def _read_gpu(self, handle):
        memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
        return self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu, memory.used, memory.total

    def _now(self):
        return self.clock() - self._born

    def close(self):
        """Stops sampling, writes profile.json and profile.html, prints the lines; returns the summary."""
        if self._closed:
            return None
        self._closed = True
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=self.interval_seconds + 10)  # a hung NVML call may not hold up the job
            self.sample()  # the last one: a job shorter than the interval still has one
        summary = self.summary()
        try:
            write_json(summary, os.path.join(self.output_dir, "profile.json"), indent=1)
            write_html(summary, self, os.path.join(self.output_dir, "profile.html"))
        except Exception as error:
            self.print_fn(f"profile report not written: {type(error).__name__}: {error}")
        for line in report_lines(summary):
            self.print_fn(line)
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
        return summary

    # The figures
    def summary(self):
        summary = {"step_count": len(self.steps), "sampling_interval_seconds": self.interval_seconds,
                   "sample_count": len(self.samples), "sampling_errors": self.error_count,
                   "sampling_error_messages": self.errors, "epoch_end_steps": self.epoch_end_steps}
        if self.steps:
            summary["first_step"], summary["first_step_seconds"] = self.steps[0][:2]
        timed = self.steps[1:]
        if timed:
            seconds = np.array([step[1] for step in timed], np.float64)
            summary["step_seconds"] = {name: float(np.percentile(seconds, q)) for name, q in PERCENTILES.items()}
            summary["step_seconds"].update(max=float(seconds.max()), mean=float(seconds.mean()))
            threshold = float(seconds.mean() + OUTLIER_STDDEVS * seconds.std())
            outliers = [{"step": step, "seconds": s} for step, s, *_ in timed if s > threshold]
            total = float(seconds.sum())
            summary.update(step_outlier_threshold_seconds=threshold, step_outlier_count=len(outliers),
                           step_outliers=outliers[:LISTED_OUTLIERS],
                           input_wait_share=sum(step[2] for step in timed) / total if total > 0 else 0.0,
                           samples_per_second=sum(step[3] for step in timed) / total if total > 0 else 0.0)
        first_step_ended = self.steps[0][4] if self.steps else 0.0
        working = [sample for sample in self.samples if sample["at"] > first_step_ended] or self.samples
        if self.samples:
            cpu = np.array([sample["cpu_percent"] for sample in working])
            summary.update(cpu_mean_percent=float(cpu.mean()), cpu_p95_percent=float(np.percentile(cpu, 95)),
                           cpu_core_mean_percents=np.mean([s["core_percents"] for s in working], 0).tolist(),
                           memory_max_used_bytes=max(s["memory_used_bytes"] for s in self.samples),
                           memory_total_bytes=self.memory_total_bytes,
                           process_rss_max_bytes=max(s["rss_bytes"] for s in self.samples))
        with_gpus = [sample for sample in working if "gpus" in sample]
        if with_gpus:
            summary["gpus"] = [_gpu_summary(index, [s["gpus"][n] for s in with_gpus],
                                            [s["gpus"][n] for s in self.samples if "gpus" in s])
                               for n, (index, _) in enumerate(self._gpus)]
            bottlenecked = [s for s in with_gpus if max(s["core_percents"]) > BUSY_CPU_PERCENT
                            and min(gpu[0] for gpu in s["gpus"]) < IDLE_GPU_PERCENT]
            summary["cpu_bottleneck_share"] = len(bottlenecked) / len(with_gpus)
        summary["advice"] = advice(summary)
        return summary


def _gpu_summary(index, working, every):
    utilization = np.array([reading[0] for reading in working], np.float64)
    return {"index": index, "utilization_mean_percent": float(utilization.mean()),
            "utilization_p50_percent": float(np.percentile(utilization, 50)),
            "utilization_p95_percent": float(np.percentile(utilization, 95)),
            "memory_max_used_bytes": max(reading[1] for reading in every),
            "memory_total_bytes": every[-1][2]}


def advice(summary):
    """Debugger's recommendations, where its rules' thresholds call for them, in this job's terms."""
    lines = []
    share = summary.get("input_wait_share", 0.0)
    if share > BOTTLENECK_SHARE:
        lines.append(f"profile_advice input_bound: {share:.0%} of step time waits for the next batch (over "
                     f"{BOTTLENECK_SHARE:.0%}); speed up data loading: raise the number of parallel reads, "
                     "prefetch more, or use faster storage, before a larger batch or a bigger GPU")
    if summary.get("cpu_bottleneck_share", 0.0) > BOTTLENECK_SHARE:
        lines.append(f"profile_advice cpu_bound: in {summary['cpu_bottleneck_share']:.0%} of the samples a "
                     f"CPU core was over {BUSY_CPU_PERCENT}% while a GPU was under {IDLE_GPU_PERCENT}%; "
                     "move preprocessing off the training host's CPUs or choose an instance with more cores")
    for gpu in summary.get("gpus", []):
        if gpu["utilization_p95_percent"] < LOW_GPU_P95_PERCENT:
            lines.append(f"profile_advice low_gpu_utilization: GPU {gpu['index']} p95 utilisation is "
                         f"{gpu['utilization_p95_percent']:.0f}% (under {LOW_GPU_P95_PERCENT}%) with "
                         f"{gpu['memory_max_used_bytes'] / GIB:.1f} of {gpu['memory_total_bytes'] / GIB:.1f} "
                         "GiB used; raise train_batch_size, or look for what keeps it waiting")
    if summary.get("step_outlier_count", 0) > OUTLIERS_IGNORED:
        named = ", ".join(str(outlier["step"]) for outlier in summary["step_outliers"])
        more = summary["step_outlier_count"] - len(summary["step_outliers"])
        lines.append(f"profile_advice step_outliers: {summary['step_outlier_count']} of {summary['step_count'] - 1} steps took "
                     f"over mean + {OUTLIER_STDDEVS} stddev ({summary['step_outlier_threshold_seconds']:.3f} s): "
                     f"steps {named}{f' and {more} more' if more else ''}; look for what else ran then "
                     "(input, checkpoints, evaluation, other processes)")
    return lines


def flat(summary):
    """The summary as one level of name: value, the GPUs' as gpu<index>_<name>."""
    values = {}
    for name, value in summary.items():
        if name == "step_seconds":
            values.update((f"step_{key}_seconds", v) for key, v in value.items())
        elif name == "gpus":
            for gpu in value:
                values.update((f"gpu{gpu['index']}_{key}", v) for key, v in gpu.items() if key != "index")
        elif name != "advice":
            values[name] = value
    return values


LINE_FIGURES = ("step_count", "first_step_seconds", "step_p50_seconds", "step_p95_seconds", "step_p99_seconds",
                "step_max_seconds", "step_outlier_count", "input_wait_share", "samples_per_second",
                "cpu_mean_percent", "cpu_p95_percent", "memory_max_used_bytes", "process_rss_max_bytes")


def report_lines(summary):
    """The `profile` line of name=value figures, then the advice."""
    values = flat(summary)
    names = [name for name in LINE_FIGURES if name in values] + [
        name for name in values if name.startswith("gpu") and name.endswith(("_mean_percent", "max_used_bytes"))]
    figures = {}
    for name in names + ["sample_count"]:
        value = values[name]
        if name.endswith("_bytes"):
            name, value = name.removesuffix("_bytes") + "_gib", value / GIB
        # job_ in front: the epoch lines' `input_wait_share=` is a SageMaker metric (metric_log.py)
        figures["job_input_wait_share" if name == "input_wait_share" else name] = value
    return ["profile " + format_metrics(**figures), *summary["advice"]]


# The HTML report
def write_html(summary, profiler, path):
    from matplotlib.figure import Figure  # no pyplot: the job's global matplotlib state stays as it is

    def png(figure):
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
        return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'

    plots, timed, samples = [], profiler.steps[1:], profiler.samples
    if timed:
        axes = Figure(figsize=(10, 3)).add_subplot()
        threshold = summary["step_outlier_threshold_seconds"]
        axes.plot([s[0] for s in timed], [s[1] for s in timed], lw=0.8, label="step")
        outliers = [s for s in timed if s[1] > threshold]
        axes.scatter([s[0] for s in outliers], [s[1] for s in outliers], color="red", s=12, label="outlier")
        axes.axhline(threshold, color="red", ls=":", lw=0.8)
        for step in profiler.epoch_end_steps:
            axes.axvline(step, color="grey", ls="--", lw=0.5)
        axes.set(xlabel="step", ylabel="seconds", title="Step time (first step left out; dashes: epoch ends)")
        axes.legend()
        plots.append(png(axes.figure))
    if samples:
        cpu, memory = Figure(figsize=(10, 5.5)).subplots(2, 1, sharex=True)
        at = [s["at"] for s in samples]
        cpu.plot(at, [s["core_percents"] for s in samples], lw=0.4, alpha=0.4)
        cpu.plot(at, [s["cpu_percent"] for s in samples], color="black", lw=1.2, label="all cores")
        cpu.set(ylabel="CPU %", ylim=(0, 105), title="Host CPU (thin: each core) and memory")
        memory.plot(at, [s["memory_used_bytes"] / GIB for s in samples], label="host used")
        memory.plot(at, [s["rss_bytes"] / GIB for s in samples], label="this process (RSS)")
        memory.set(xlabel="seconds", ylabel="GiB", ylim=(0, None))
        cpu.legend(), memory.legend()
        plots.append(png(cpu.figure))
    with_gpus = [s for s in samples if "gpus" in s]
    if with_gpus:
        utilization, memory = Figure(figsize=(10, 5.5)).subplots(2, 1, sharex=True)
        at = [s["at"] for s in with_gpus]
        for n, (index, _) in enumerate(profiler._gpus):
            utilization.plot(at, [s["gpus"][n][0] for s in with_gpus], label=f"GPU {index}")
            memory.plot(at, [s["gpus"][n][1] / GIB for s in with_gpus], label=f"GPU {index}")
        utilization.set(ylabel="utilisation %", ylim=(0, 105), title="GPUs")
        memory.set(xlabel="seconds", ylabel="memory used, GiB", ylim=(0, None))
        utilization.legend()
        plots.append(png(utilization.figure))
    advice_items = "".join(f"<li>{html.escape(line)}</li>" for line in summary["advice"]) or "<li>none</li>"
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{html.escape(_shown(name, value))}</td></tr>"
                   for name, value in flat(summary).items())
    with open(path, "w") as file:
        file.write(f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>Training profile</title>
<style>body{{font-family:sans-serif;margin:2em}}td{{padding:2px 12px;border-bottom:1px solid #ddd}}</style>
</head><body><h1>Training profile</h1><h2>Advice</h2><ul>{advice_items}</ul>
<h2>Plots</h2>{"<br>".join(plots)}<h2>Figures</h2><table>{rows}</table></body></html>
""")


def _shown(name, value):
    if name.endswith("_bytes"):
        return f"{value / GIB:.2f} GiB"
    if name == "step_outliers":
        return ", ".join(f"{outlier['step']} ({outlier['seconds']:.3f} s)" for outlier in value)
    if isinstance(value, list):
        return ", ".join(_shown("", item) for item in value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)
