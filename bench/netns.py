"""A network namespace of this machine joined to ours by a veth pair, for the fault bench: a stage run inside it
is reached at an address of its own, across a link that can be cut (a partition: packets dropped silently, no
reset, as when a cable or a switch fails) and restored, or given netem's delay and loss where the kernel has
netem. Needs root and `ip` (iproute2).

    python -m bench.netns exec NAME -- MODULE ARGS...

runs `python -m MODULE ARGS...` inside namespace NAME (the process becomes it, so its pid is the stage's).
"""

import ctypes
import ipaddress
import os
import re
import shutil
import subprocess
import sys

NAME_PREFIX = "dvd-bench-"
NETNS_DIR = "/var/run/netns"
INSIDE_DEVICE = "veth0"
_CLONE_NEWNET = 0x40000000


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "not root: network namespaces and veth pairs need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"{NAME_PREFIX}probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "delete", probe, check=False)
    return None


def netem_available() -> bool:
    """Whether the kernel has the netem qdisc (many container kernels lack it)."""
    name = f"{NAME_PREFIX}netem-{os.getpid()}"
    if _ip("netns", "add", name, check=False).returncode != 0:
        return False
    try:
        _ip("-n", name, "link", "set", "lo", "up", check=False)
        return subprocess.run(["tc", "-n", name, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
                              capture_output=True).returncode == 0
    except FileNotFoundError:  # no tc
        return False
    finally:
        _ip("netns", "delete", name, check=False)


def subnet_of(pid: int) -> ipaddress.IPv4Network:
    """A /30 of 10/8 that no other run's namespace holds: it is made of the pid of the run (pids < 2^22)."""
    return ipaddress.IPv4Network(((10 << 24) | ((pid & 0x3FFFFF) << 2), 30))


def remove_leftovers() -> None:
    """Namespaces of earlier runs whose process is gone (killed before it could clean up), with their routes."""
    for entry in _ip("netns", "list", check=False).stdout.splitlines():
        name = entry.split()[0] if entry.split() else ""
        match = re.fullmatch(re.escape(NAME_PREFIX) + r"(\d+)-\w+", name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            _ip("netns", "delete", name, check=False)
            _ip("route", "del", "blackhole", str(subnet_of(int(match.group(1)))), check=False)


class VethNamespace:
    """Namespace `dvd-bench-PID-TAG`; our end of the pair is `dvbPID`, its end `veth0`. Deleted by `delete()`
    (call it in a finally), after the processes inside have ended."""

    def __init__(self, tag: str = "v"):
        pid = os.getpid()
        self.name = f"{NAME_PREFIX}{pid}-{tag}"
        self.outside_device = f"dvb{pid}"
        self.subnet = subnet_of(pid)
        outside, inside = list(self.subnet.hosts())
        self.outside_address, self.inside_address = str(outside), str(inside)

    def create(self) -> "VethNamespace":
        remove_leftovers()
        try:
            _ip("netns", "add", self.name)
            _ip("link", "add", self.outside_device, "type", "veth", "peer", "name", INSIDE_DEVICE, "netns", self.name)
            _ip("addr", "add", f"{self.outside_address}/30", "dev", self.outside_device)
            _ip("link", "set", self.outside_device, "up")
            _ip("-n", self.name, "addr", "add", f"{self.inside_address}/30", "dev", INSIDE_DEVICE)
            _ip("-n", self.name, "link", "set", INSIDE_DEVICE, "up")
            _ip("-n", self.name, "link", "set", "lo", "up")
            # Should the connected route ever go, packets for the subnet are dropped here rather than sent to
            # the default gateway: the bench's traffic stays on this machine.
            _ip("route", "add", "blackhole", str(self.subnet), "metric", "4000")
        except subprocess.CalledProcessError as error:
            self.delete()
            raise RuntimeError(f"setting up {self.name}: `{' '.join(error.cmd)}`: {error.stderr.strip()}") from None
        return self

    def module_args(self, module: str, *args: str) -> list[str]:
        """Arguments of `python -m` that run `python -m module args` inside the namespace."""
        return ["bench.netns", "exec", self.name, "--", module, *args]

    def cut(self) -> None:
        """Partition: the link goes down on the namespace's side; our side keeps its address and route, so packets
        to the namespace are dropped at the dead link (no reset, no ICMP)."""
        _ip("-n", self.name, "link", "set", INSIDE_DEVICE, "down")

    def restore(self) -> None:
        _ip("-n", self.name, "link", "set", INSIDE_DEVICE, "up")

    def netem(self, *spec: str) -> None:
        """netem (e.g. "delay", "100ms" or "loss", "5%") on both ends of the link; no spec removes it."""
        for prefix, device in ((["tc"], self.outside_device), (["tc", "-n", self.name], INSIDE_DEVICE)):
            command = [*prefix, "qdisc", "replace" if spec else "del", "dev", device, "root"]
            subprocess.run([*command, "netem", *spec] if spec else command, capture_output=True, check=bool(spec))

    def delete(self) -> None:
        """Removes the namespace, the pair (whose inside end dies with it) and the route; idempotent."""
        _ip("netns", "delete", self.name, check=False)
        _ip("link", "delete", self.outside_device, check=False)
        _ip("route", "del", "blackhole", str(self.subnet), check=False)


def exec_in_namespace(name: str, argv: list[str]) -> None:
    """Joins namespace `name` and becomes `python -m argv...` (same pid, so signals reach the stage itself)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"setns into {name} failed")
    os.close(fd)
    os.execv(sys.executable, [sys.executable, "-m", *argv])


def main() -> None:
    if len(sys.argv) < 5 or sys.argv[1] != "exec" or sys.argv[3] != "--":
        sys.exit(__doc__)
    exec_in_namespace(sys.argv[2], sys.argv[4:])


if __name__ == "__main__":
    main()
