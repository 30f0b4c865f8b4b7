"""What smdebug's own reader sees in a Debugger tensor folder, as a JSON file (smdebug logs on stdout).
Runs in .venv-smdebug (`make smdebug`), not in the project's venv:
`.venv-smdebug/bin/python tests/smdebug_reader.py DIR OUT.json`.

Reads the folder as a rule container does: smdebug.trials.create_trial, then a rule run over every
global step by smdebug's invoke_rule, which ends (NoMoreData) only when the trial knows the job ended.
"""

import json
import sys

from smdebug.core.modes import ModeKeys
from smdebug.core.tfevent.event_file_reader import EventFileReader
from smdebug.exceptions import NoMoreData
from smdebug.rules.rule import Rule
from smdebug.rules.rule_invoker import invoke_rule
from smdebug.trials import create_trial

MODES = (ModeKeys.TRAIN, ModeKeys.EVAL)


class RecordSteps(Rule):
    """Records the (mode, mode step) and the tensors of each global step it is invoked at."""

    def __init__(self, trial):
        super().__init__(trial, action_str="")
        self.seen = []

    def invoke_at_step(self, step):
        mode, mode_step = self.base_trial.mode_modestep(step)
        self.seen.append([step, mode.name, mode_step, sorted(self.base_trial.tensor_names(step=step))])
        return False


def main(path, out):
    trial = create_trial(path)
    report = {
        "tensor_names": trial.tensor_names(),
        "collections": {name: sorted(c.tensor_names) for name, c in trial.collections().items()},
        "losses_collection": trial.tensor_names(collection="losses"),
        "num_workers": trial.num_workers,
        "workers": trial.workers(),
        "steps": {"GLOBAL": trial.steps(), **{m.name: trial.steps(mode=m) for m in MODES}},
        "global_steps": {m.name: {s: trial.global_step(m, s) for s in trial.steps(mode=m)} for m in MODES},
        "values": {}, "dtypes": {},
        "ended": trial.loaded_all_steps,
    }
    for name in trial.tensor_names():
        tensor = trial.tensor(name)
        for mode in MODES:
            for step in tensor.steps(mode=mode):
                value = tensor.value(step, mode=mode)
                report["values"].setdefault(name, {}).setdefault(mode.name, {})[step] = value.tolist()
                report["dtypes"].setdefault(name, {})[mode.name] = str(value.dtype)
    # The events themselves, each with the mode and mode step its own metadata (plugin_data) carries.
    report["events"] = []
    for event_file in sorted(trial.index_reader.list_event_files("")):
        for name, step, _, mode, mode_step in EventFileReader(event_file).read_tensors():
            report["events"].append([name, step, mode.name, mode_step])
    rule = RecordSteps(trial)
    if not trial.loaded_all_steps:  # the rule would wait for more steps for ever
        report["rule_ended"] = "not run: the job has not ended"
    else:
        try:
            invoke_rule(rule, start_step=0)
            report["rule_ended"] = "without NoMoreData"
        except NoMoreData:
            report["rule_ended"] = "NoMoreData"
    report["rule_steps"] = rule.seen
    with open(out, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
