"""The telemetry a job asked for, as training-loop hooks (training/loop.py).

Every host prints the metric lines (the loss and accuracy are the whole job's); the chief alone
writes the reports: Debugger tensors (when debughookconfig.json exists), the profile report
(enable_profiler) and TensorBoard (enable_tensorboard). The rules are built by the training stage,
which needs their decision after training.
"""

import contextlib
import dataclasses

from review_trainer.telemetry import debugger_tensors, profiler
from review_trainer.telemetry.metric_log import MetricLogger, TensorBoardLog, forward_function


@dataclasses.dataclass
class Telemetry:
    hooks: list
    profile: "profiler.Profiler | None" = None
    tensors: "debugger_tensors.TensorHook | None" = None
    tensorboard: "TensorBoardLog | None" = None

    @contextlib.contextmanager
    def running(self):
        """Around training: the profiler samples while it runs, and its report and TensorBoard's
        files are closed however it ends; Debugger's end marker is written when it ended well."""
        if self.profile:
            self.profile.start()
        try:
            yield
            if self.tensors:
                self.tensors.close()
        finally:
            if self.profile:
                self.profile.close()
            if self.tensorboard:
                self.tensorboard.close()


def for_training(env, hp, is_chief, hook_config, *, model, learning_rate, steps_per_epoch, total_steps,
                 evaluations_done, graph=False, print_fn=print):
    """hook_config: debughookconfig.json as read at the start (None without one); learning_rate:
    the optimizer's, for the tensors and TensorBoard; graph: write the forward graph to TensorBoard
    (the TensorFlow backend: JAX's programs are not TensorFlow graphs)."""
    telemetry = Telemetry([MetricLogger(hp.log_every_n_steps, steps_per_epoch, total_steps, print_fn)])
    if not is_chief:
        return telemetry
    if hook_config is not None:
        writer = debugger_tensors.DebuggerTensorWriter(hook_config, mark_end=not env.under_sagemaker)
        telemetry.tensors = debugger_tensors.TensorHook(writer, learning_rate, evaluations_done)
        telemetry.hooks.append(telemetry.tensors)
        print_fn(f"debugger_tensors={hook_config.local_path} collections={','.join(hook_config.collections)} "
                 "(smdebug's layout)")
    if hp.enable_profiler:
        telemetry.profile = profiler.Profiler(profiler.interval_from_config(env.profiler_config), env.output_data_dir,
                                              print_fn)
        telemetry.hooks.append(telemetry.profile)
    if hp.enable_tensorboard:
        telemetry.tensorboard = TensorBoardLog(env.tensorboard_dir, hp.log_every_n_steps, learning_rate,
                                               graph_of=forward_function(model, hp.max_seq_length) if graph else None)
        telemetry.hooks.append(telemetry.tensorboard)
    return telemetry
