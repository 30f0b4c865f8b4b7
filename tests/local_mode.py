"""`docker` and `docker-compose` shims for the SageMaker Python SDK's local mode on a machine with
podman and no Docker engine (tests/test_sagemaker_local.py; by hand: `python tests/local_mode.py DIR [PODMAN_COMPOSE]`,
then put DIR first on PATH).

Local mode runs `docker compose version`, then `docker-compose -f FILE up --build
--abort-on-container-exit` (and `docker images`/`pull`/`login` for an ECR image). The shims map
them to podman-compose and podman with this machine's options (runc, cgroupfs, overlay, ulimits:
/work/shared/recipes/containers.md). podman-compose's `--abort-on-container-exit` alone ends with 0
whatever the container's exit code, so a failed job would look like a success to the SDK:
`--abort-on-container-failure` is added, which hands a non-zero exit code on (Docker Compose's
behaviour). Local mode never runs `down`, so the shim does, after `up`: no container is left.
"""

import os
import shlex
import sys

PODMAN_GLOBAL = ["--storage-driver", "overlay", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
PODMAN_RUN_ARGS = "--ulimit nofile=1024:1024 --ulimit nproc=4096:4096"

DOCKER = """#!/usr/bin/env bash
# docker -> podman with this machine's options; `docker compose` -> the docker-compose shim.
if [[ "${{1:-}}" == compose ]]; then shift; exec "$(dirname "$0")/docker-compose" "$@"; fi
exec podman {podman_global} "$@"
"""

DOCKER_COMPOSE = """#!/usr/bin/env bash
# docker-compose -> podman-compose, through the docker shim. `up` also stops on a failed container
# and hands its exit code on; its containers and pod are removed afterwards (`down`).
compose=({podman_compose} --podman-path "$(dirname "$0")/docker" --podman-run-args {run_args})
[[ " $* " == *" up "* ]] || exec "${{compose[@]}}" "$@"
args=() before_up=() seen_up=
for arg in "$@"; do
  args+=("$arg")
  if [[ "$arg" == up ]]; then args+=(--abort-on-container-failure); seen_up=1; fi
  [[ -n "$seen_up" ]] || before_up+=("$arg")
done
"${{compose[@]}}" "${{args[@]}}"
code=$?
"${{compose[@]}}" "${{before_up[@]}}" down >/dev/null 2>&1
exit "$code"
"""


# A sitecustomize.py that proves "no AWS call": with NETWORK_GUARD_LOG set, every DNS look-up and
# connection of a Python process to anything but this machine is refused and written to that file.
NETWORK_GUARD = """import os, socket, sys

_LOG = os.environ.get("NETWORK_GUARD_LOG")
_LOCAL = {None, "", "localhost", "127.0.0.1", "::1", b"localhost", b"127.0.0.1"}


def _refuse(what):
    with open(_LOG, "a") as f:
        f.write(f"{os.getpid()} {sys.argv[0]} {what}\\n")
    raise OSError(f"network guard: {what} refused")


def _guard(event, args):
    if event == "socket.getaddrinfo" and args[0] not in _LOCAL:
        _refuse(f"getaddrinfo {args[0]!r}")
    if event == "socket.connect" and args[0].family in (socket.AF_INET, socket.AF_INET6) and args[1][0] not in _LOCAL:
        _refuse(f"connect {args[1]!r}")


if _LOG:
    sys.addaudithook(_guard)
"""


def write_network_guard(folder):
    """Writes sitecustomize.py into folder: put folder on PYTHONPATH and set NETWORK_GUARD_LOG."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "sitecustomize.py"), "w") as f:
        f.write(NETWORK_GUARD)
    return folder


def write_shims(folder, podman_compose):
    """Writes `docker` and `docker-compose` into folder; returns it (put it first on PATH)."""
    os.makedirs(folder, exist_ok=True)
    scripts = {
        "docker": DOCKER.format(podman_global=" ".join(PODMAN_GLOBAL)),
        "docker-compose": DOCKER_COMPOSE.format(podman_compose=shlex.quote(os.path.abspath(podman_compose)),
                                                run_args=shlex.quote(PODMAN_RUN_ARGS)),
    }
    for name, text in scripts.items():
        path = os.path.join(folder, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o755)
    return folder


if __name__ == "__main__":  # python tests/local_mode.py DIR [PODMAN_COMPOSE]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    default = os.path.join(repo, ".venv-sagemaker-v2", "bin", "podman-compose")
    print(write_shims(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else default))
