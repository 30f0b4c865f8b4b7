"""The package's shape: layers that import only downwards, packages that say what they own, one
place that tells input modes apart, and a job that reads as its stages."""

import ast
import inspect
import os
import re

import pytest
import review_trainer
from review_trainer import LAYERS, job

PACKAGE = os.path.dirname(review_trainer.__file__)


def modules():
    """(module name, path) of every module of the package."""
    for root, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                relative = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                yield relative.removesuffix(".__init__"), path


def layer(module):
    """The layer of review_trainer.<part>...: its package (or top-level module) name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imported(path):
    """Every review_trainer module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.startswith("review_trainer.")}


def test_every_module_belongs_to_a_layer():
    assert {layer(module) for module, _ in modules()} - {None} == set(LAYERS)


@pytest.mark.parametrize("module, path", list(modules()), ids=lambda value: value if "." in value else None)
def test_a_package_imports_only_the_layers_below_it(module, path):
    own = layer(module)
    if own is None:
        return  # review_trainer/__init__.py: the layers themselves
    above = [name for name in imported(path)
             if layer(name) in LAYERS and LAYERS.index(layer(name)) > LAYERS.index(own)]
    assert above == [], f"{module} ({own}) imports from layers above it: {above}"


def test_each_package_says_what_it_owns_and_what_it_may_import():
    for name in LAYERS:
        if os.path.isfile(os.path.join(PACKAGE, f"{name}.py")):
            continue  # job.py: a module, its docstring its own
        path = os.path.join(PACKAGE, name, "__init__.py")
        assert os.path.isfile(path), f"{name}/ has no __init__.py"
        docstring = ast.get_docstring(ast.parse(open(path).read()))
        assert docstring, f"{name}/__init__.py has no docstring"
        listed = set(re.findall(r"^    (\w+)\.py\b", docstring, re.M))
        present = {f[:-3] for f in os.listdir(os.path.join(PACKAGE, name)) if f.endswith(".py") and f != "__init__.py"}
        assert listed == present, f"{name}/__init__.py lists {sorted(listed)}, the folder holds {sorted(present)}"
        assert re.search(r"\b(Imports|May import)\b", docstring), f"{name}/__init__.py does not say what it may import"


# Input modes: only the contract (which reads inputdataconfig.json) and data/ (which owns the
# Channel type) tell File, FastFile and Pipe apart.
INPUT_MODE_NAMES = re.compile(r"pipe_channels|PipePasses|TrainingInputMode|RecordWrapperType|\bpipe\.|Fifos|in pipes")


def test_no_code_outside_data_and_the_contract_asks_which_input_mode_a_channel_has():
    for module, path in modules():
        if layer(module) in ("contract", "data"):
            continue
        code = "\n".join(line for line in open(path) if not line.lstrip().startswith("#"))
        body = ast.parse(code)
        strings = [node for node in ast.walk(body) if isinstance(node, ast.Constant) and isinstance(node.value, str)]
        for node in strings:  # messages and docstrings may name the modes; code may not
            code = code.replace(node.value, "")
        assert not INPUT_MODE_NAMES.search(code), f"{module}: {INPUT_MODE_NAMES.search(code)[0]}"


def test_the_job_reads_as_its_stages_in_at_most_60_lines():
    source = inspect.getsource(job.run)
    assert len(source.splitlines()) <= 60
    assert "is_chief" not in source  # the stages decide who does what
