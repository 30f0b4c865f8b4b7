"""Every hyperparameter of the job: its name, type, default and valid range, in one place.

Names are those of the book's notebooks so that existing estimators keep working. SageMaker writes
every value as a string; each is parsed by its declared type (never `eval`), and all problems are
reported together.
"""

from __future__ import annotations  # field types stay strings: they select the parser below

import dataclasses
import math

from review_trainer.contract.errors import HyperparameterError

AUTO = "auto"
HEADS = ("cls", "bilstm")
DISTRIBUTIONS = (AUTO, "none", "mirrored", "multi_worker")
NAMED_BACKENDS = ("tensorflow", "jax")  # what backend=auto resolves to (training/backend.py)
BACKENDS = (AUTO, *NAMED_BACKENDS)
RULES = ("loss_not_decreasing", "overtraining", "early_stopping", "exploding_gradient", "vanishing_gradient",
         "class_imbalance")
RULE_ACTIONS = ("stop", "log", "off")
EARLY_STOPPING_METRICS = ("val_loss", "val_accuracy")


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    # Optimisation
    epochs: int = 3
    learning_rate: float = 5e-5
    epsilon: float = 1e-8
    train_batch_size: int = 32
    validation_batch_size: int = 64
    test_batch_size: int = 64
    train_steps_per_epoch: int | None = None  # None: the whole channel
    validation_steps: int | None = None
    test_steps: int | None = None
    seed: int = 42
    # Model
    pretrained_model_dir: str | None = None  # None: $PRETRAINED_MODEL_DIR, baked into the image
    head: str = "cls"  # cls: [CLS] -> dropout -> Dense; bilstm: the book's BiLSTM head
    max_seq_length: int = 64
    freeze_bert_layer: bool = False
    # Frozen encoder: its outputs computed in the first epoch and kept; the head trains on them (model/frozen_encoder.py)
    cache_frozen_encoder: bool = True
    use_amp: bool | str = AUTO  # auto: measured per device, see training/precision.py
    use_xla: bool | str = AUTO
    backend: str = AUTO  # Keras's backend: tensorflow, jax, or auto (measured per device, see training/backend.py)
    # Data
    text_column: str = "review_body"
    label_column: str = "star_rating"
    classes: tuple = ("1", "2", "3", "4", "5")  # label values; their order gives the class index
    max_bad_row_fraction: float = 0.01
    # Training batches cut to a few lengths up to max_seq_length instead of padded to it (stream.py)
    bucket_by_length: bool = True
    # What the job does besides training
    run_validation: bool = True
    run_test: bool = True
    run_sample_predictions: bool = True
    enable_tensorboard: bool = False
    log_every_n_steps: int = 50
    # Checkpoints (on when checkpointconfig.json exists or enable_checkpointing is true)
    enable_checkpointing: bool = False
    checkpoint_every_n_steps: int | str = AUTO  # auto: the interval keeps saving under 5% of training time
    keep_checkpoints: int = 2
    resume: bool = True  # false: delete the checkpoints found and start fresh
    # Debugger rules, evaluated in the job (telemetry/rules.py): each stop, log or off; a non-finite loss always stops
    rule_loss_not_decreasing: str = "log"  # the mean loss of the last num_steps steps against the num_steps before
    loss_not_decreasing_num_steps: int = 10
    loss_not_decreasing_diff_percent: float = 0.1  # a smaller relative decrease (%) triggers it
    rule_overtraining: str = "log"  # val_loss rose for `patience` evaluations while train_loss fell
    overtraining_patience: int = 1
    rule_early_stopping: str = "off"  # early_stopping_metric did not improve for `patience` evaluations
    early_stopping_metric: str = "val_loss"  # or val_accuracy
    early_stopping_patience: int = 2
    early_stopping_min_delta: float = 0.0
    rule_exploding_gradient: str = "log"  # the gradient norm above the threshold
    exploding_gradient_threshold: float = 1000.0
    rule_vanishing_gradient: str = "log"  # the gradient norm below the threshold
    vanishing_gradient_threshold: float = 1e-7
    rule_class_imbalance: str = "log"  # at the scan: most / least frequent training class above the threshold
    class_imbalance_threshold: float = 10.0
    # Explanations and bias after the test evaluation, on the chief (insights/reports.py): Clarify's metrics and SHAP
    bias_facet: str | None = None  # a column of the review tables, e.g. product_category; None: no bias report
    bias_facet_values: tuple | None = None  # the sensitive group(s); None: each value of the facet in turn
    bias_positive_labels: tuple | None = None  # the positive outcome; None: the last two classes (4 and 5)
    bias_group: str | None = None  # a column for the conditional metrics (CDDL, CDDPL)
    explain_samples: int = 32  # test reviews explained with SHAP (the first ones); 0: none
    # the explanations' time (no review begun that would end after it); auto: 4% of the job's time before, >= 15 s
    explain_max_seconds: int | str = AUTO
    # Telemetry: the profile report (telemetry/profiler.py) and Debugger tensors (debughookconfig.json) are on when asked for
    enable_profiler: bool = True
    # Several devices and hosts (training/topology.py)
    distribution: str = AUTO  # auto: several hosts -> multi_worker; one host, several GPUs -> mirrored
    scale_learning_rate: bool = False  # multiply learning_rate by the number of replicas
    host_wait_seconds: int = 300  # how long the hosts wait for each other at start
    collective_timeout_seconds: int = 120  # a lost host or a stuck collective fails the job after this

    @classmethod
    def from_dict(cls, raw):
        """Parses SageMaker's string values; unknown names and bad values fail together."""
        fields = {field.name: field for field in dataclasses.fields(cls)}
        problems = []
        unknown = sorted(k for k in raw if k not in fields and not k.startswith("sagemaker_"))
        if unknown:
            problems.append(
                f"unknown hyperparameter(s) {', '.join(unknown)}; valid names are: {', '.join(fields)}"
            )
        values = {}
        for name, value in raw.items():
            if name not in fields:
                continue
            try:
                values[name] = _PARSERS[name](value)
            except ValueError as error:
                problems.append(f"{name}={str(value)!r}: {error}")
        if not problems:
            hyperparameters = cls(**values)
            problems = [*hyperparameters._size_problems(), *hyperparameters._option_problems(),
                        *hyperparameters._column_problems()]
        if problems:
            raise HyperparameterError(
                "invalid hyperparameters.json: " + "; ".join(problems)
            )
        return hyperparameters

    def _size_problems(self):
        """The loop's counts, sizes and rates."""
        problems = []
        for name in ("epochs", "train_batch_size", "validation_batch_size", "test_batch_size",
                     "log_every_n_steps", "keep_checkpoints", "host_wait_seconds",
                     "collective_timeout_seconds"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("train_steps_per_epoch", "validation_steps", "test_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be at least 1 (or absent for the whole channel), got {value}")
        if self.checkpoint_every_n_steps != AUTO and self.checkpoint_every_n_steps < 1:
            problems.append(f"checkpoint_every_n_steps must be at least 1 or auto, got {self.checkpoint_every_n_steps}")
        if not 0 < self.learning_rate < 1:
            problems.append(f"learning_rate must be between 0 and 1, got {self.learning_rate}")
        if not 0 < self.epsilon < 1:
            problems.append(f"epsilon must be between 0 and 1, got {self.epsilon}")
        if not 8 <= self.max_seq_length <= 512:
            problems.append(f"max_seq_length must be between 8 and 512, got {self.max_seq_length}")
        if not 0 <= self.max_bad_row_fraction <= 1:
            problems.append(f"max_bad_row_fraction must be between 0 and 1, got {self.max_bad_row_fraction}")
        return problems

    def _option_problems(self):
        """The named choices, and the rules' and reports' settings."""
        problems = []
        if self.head not in HEADS:
            problems.append(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.distribution not in DISTRIBUTIONS:
            problems.append(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got {self.distribution!r}")
        if self.backend not in BACKENDS:
            problems.append(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        for name in RULES:
            action = getattr(self, f"rule_{name}")
            if action not in RULE_ACTIONS:
                problems.append(f"rule_{name} must be one of {', '.join(RULE_ACTIONS)}, got {action!r}")
        for name in ("loss_not_decreasing_num_steps", "overtraining_patience", "early_stopping_patience"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("loss_not_decreasing_diff_percent", "early_stopping_min_delta", "exploding_gradient_threshold",
                     "vanishing_gradient_threshold"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if self.class_imbalance_threshold < 1:
            problems.append(f"class_imbalance_threshold must be at least 1 (a ratio), got {self.class_imbalance_threshold}")
        if self.early_stopping_metric not in EARLY_STOPPING_METRICS:
            problems.append(f"early_stopping_metric must be one of {', '.join(EARLY_STOPPING_METRICS)}, "
                            f"got {self.early_stopping_metric!r}")
        if self.explain_max_seconds != AUTO and self.explain_max_seconds < 1:
            problems.append(f"explain_max_seconds must be at least 1 or auto, got {self.explain_max_seconds}")
        if self.explain_samples < 0:
            problems.append(f"explain_samples must be 0 (off) or more, got {self.explain_samples}")
        return problems

    def _column_problems(self):
        """The columns, the classes and the bias settings that name them."""
        problems = []
        if self.bias_positive_labels and not set(self.bias_positive_labels) <= set(self.classes):
            problems.append(f"bias_positive_labels must be among classes ({','.join(self.classes)}), got "
                            f"{','.join(self.bias_positive_labels)}")
        if self.bias_positive_labels and set(self.bias_positive_labels) >= set(self.classes):
            problems.append("bias_positive_labels must leave a class for the negative outcome, got every class")
        if self.bias_group and self.bias_group in (self.text_column, self.label_column, self.bias_facet):
            problems.append(f"bias_group must be another column than text_column, label_column and bias_facet, "
                            f"got {self.bias_group!r}")
        if self.bias_facet in (self.text_column, self.label_column) and self.bias_facet:
            problems.append(f"bias_facet must be another column than text_column and label_column, got {self.bias_facet!r}")
        if (self.bias_facet_values or self.bias_positive_labels or self.bias_group) and not self.bias_facet:
            problems.append("bias_facet_values, bias_positive_labels and bias_group need bias_facet (the column)")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            problems.append(f"classes must list at least two distinct label values, got {','.join(self.classes)}")
        if not self.text_column or not self.label_column:
            problems.append("text_column and label_column must not be empty")
        return problems

    def to_dict(self):
        values = dataclasses.asdict(self)
        for name in ("classes", "bias_facet_values", "bias_positive_labels"):
            values[name] = None if values[name] is None else list(values[name])
        return values

    @property
    def positive_labels(self):
        """The positive outcome of the bias metrics: as set, or the last two classes (4 and 5 stars)."""
        return self.bias_positive_labels or self.classes[-2:]


def _parse_int(value):
    number = _parse_float(value)
    if not number.is_integer():
        raise ValueError("expected a whole number")
    return int(number)


def _parse_optional_int(value):
    if value is None or str(value).strip().lower() in ("", "none", "null"):
        return None
    return _parse_int(value)


def _parse_float(value):
    try:
        number = float(str(value).strip())
    except ValueError:
        raise ValueError("expected a number") from None
    if not math.isfinite(number):
        raise ValueError("expected a finite number")
    return number


_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def parse_bool(value):
    """True or False from the spellings SageMaker users write (True/true/1/yes, False/false/0/no);
    also the job's other JSON settings (debughookconfig.json). ValueError otherwise."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("expected true or false (True/true/1, False/false/0)")


def _or_auto(parse, expected):
    """A parser that takes `auto` besides what `parse` takes."""
    def parse_or_auto(value):
        if str(value).strip().lower() == AUTO:
            return AUTO
        try:
            return parse(value)
        except ValueError:
            raise ValueError(expected) from None
    return parse_or_auto


_parse_bool_or_auto = _or_auto(parse_bool, "expected auto, true or false")
_parse_int_or_auto = _or_auto(_parse_int, "expected auto or a whole number")


def _parse_str(value):
    return str(value).strip()


def _parse_optional_str(value):
    text = _parse_str(value)
    return text or None


def _parse_classes(value):
    if isinstance(value, (list, tuple)):
        items = [str(item).strip() for item in value]
    else:
        items = [item.strip() for item in str(value).split(",")]
    if any(not item for item in items):
        raise ValueError("expected comma-separated label values, e.g. 1,2,3,4,5")
    return tuple(items)


def _parse_optional_list(value):
    if value is None or (not isinstance(value, (list, tuple)) and str(value).strip().lower() in ("", "none", "null")):
        return None
    return _parse_classes(value)


_PARSER_BY_TYPE = {
    "int": _parse_int,
    "int | None": _parse_optional_int,
    "float": _parse_float,
    "bool": parse_bool,
    "bool | str": _parse_bool_or_auto,
    "int | str": _parse_int_or_auto,
    "str": _parse_str,
    "str | None": _parse_optional_str,
    "tuple": _parse_classes,
    "tuple | None": _parse_optional_list,
}
_PARSERS = {
    field.name: _PARSER_BY_TYPE[field.type]
    for field in dataclasses.fields(Hyperparameters)
}
