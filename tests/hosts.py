"""Several SageMaker hosts on one machine: a network namespace per host, joined by a bridge.

Each namespace has its own /etc/hosts (from /etc/netns/<name>/hosts), so `algo-1`, `algo-2`, ...
resolve as they do in a multi-instance job, and each host has its own address and ports. The
bridge lives in a namespace of its own, so nothing on the machine's own network changes. Needs
root and iproute2 (`ip`).
"""

import os
import shutil
import subprocess


class Hosts:
    def __init__(self, count, subnet="10.211.0"):
        self.count = count
        self.subnet = subnet
        self.prefix = f"rt{os.getpid()}"
        self.names = [f"algo-{i + 1}" for i in range(count)]

    @staticmethod
    def available():
        return os.geteuid() == 0 and shutil.which("ip") is not None

    def namespace(self, host):
        return f"{self.prefix}-{host}"

    def __enter__(self):
        switch = f"{self.prefix}-switch"
        _ip("netns", "add", switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        hosts_file = "127.0.0.1 localhost\n" + "".join(
            f"{self.subnet}.{i + 1} {name}\n" for i, name in enumerate(self.names))
        for i, name in enumerate(self.names):
            namespace = self.namespace(name)
            _ip("netns", "add", namespace)
            os.makedirs(f"/etc/netns/{namespace}", exist_ok=True)
            with open(f"/etc/netns/{namespace}/hosts", "w") as f:
                f.write(hosts_file)
            inside, outside = f"{self.prefix[:8]}h{i}", f"{self.prefix[:8]}s{i}"
            _ip("link", "add", inside, "type", "veth", "peer", "name", outside)
            _ip("link", "set", inside, "netns", namespace)
            _ip("link", "set", outside, "netns", switch)
            _ip("-n", switch, "link", "set", outside, "master", "br0")
            _ip("-n", switch, "link", "set", outside, "up")
            _ip("-n", namespace, "addr", "add", f"{self.subnet}.{i + 1}/24", "dev", inside)
            _ip("-n", namespace, "link", "set", inside, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc):
        for name in self.names:
            self.kill(name)
            subprocess.run(["ip", "netns", "del", self.namespace(name)], capture_output=True)
            shutil.rmtree(f"/etc/netns/{self.namespace(name)}", ignore_errors=True)
        subprocess.run(["ip", "netns", "del", f"{self.prefix}-switch"], capture_output=True)

    def start(self, host, command, env, **kwargs):
        """Starts command on host (its own network, its own host name resolution)."""
        return subprocess.Popen(["ip", "netns", "exec", self.namespace(host), *command], env=env, **kwargs)

    def kill(self, host, signum=9):
        """Sends signum to every process of host (`ip netns pids`)."""
        pids = subprocess.run(["ip", "netns", "pids", self.namespace(host)], capture_output=True, text=True).stdout
        for pid in pids.split():
            try:
                os.kill(int(pid), signum)
            except ProcessLookupError:
                pass


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True)
