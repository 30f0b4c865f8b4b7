"""Prints hashed lock files without the packages that this Python already has (standard library only).

    python without_installed.py requirements-neuron.lock requirements-nodeps.lock > missing.lock

The `neuron` image target installs over AWS's Neuron JAX training image, whose jax, jaxlib,
jax-neuronx, libneuronxla, neuronx-cc and their own dependencies (numpy among them) are a tested
set: every package the base already has stays as it is, and only the missing ones are installed,
pinned and hash-checked from the lock. What is kept from the base (and the lock's version beside it)
goes to stderr, for the build log.
"""

import importlib.metadata
import re
import sys


def normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def blocks(text):
    """Yields (name, version, lines) per requirement of a `uv pip compile --generate-hashes` file."""
    name = version = None
    lines = []
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(\S+)", line)
        if match:
            if name:
                yield name, version, lines
            name, version, lines = match.group(1), match.group(2), [line]
        elif name and line.startswith((" ", "\t")) and not line.strip().startswith("#"):
            lines.append(line)
    if name:
        yield name, version, lines


def main(paths):
    installed = {normalize(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
                 if d.metadata["Name"]}
    for path in paths:
        with open(path) as f:
            for name, version, lines in blocks(f.read()):
                if normalize(name) in installed:
                    print(f"kept from the base image: {name} {installed[normalize(name)]} (lock: {version})",
                          file=sys.stderr)
                else:
                    print("\n".join(lines).rstrip(" \\"))


if __name__ == "__main__":
    main(sys.argv[1:])
