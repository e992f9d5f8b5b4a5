"""Network namespaces for the multi-host test: hosts with their own network stack, joined by veth links to a
bridge in a "server" namespace, links that can be cut, and a way for the test itself to reach inside one
(a thread that joins the namespace: a network namespace belongs to a thread, not to the process). Only the
addresses given here, inside namespaces this module creates, are ever used."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000
SUBNET = "10.231.0"  # inside the test's own namespaces only


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"sdfprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode:
        return f"ip netns add failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Network:
    prefix: str
    hosts: dict[str, str] = field(default_factory=dict)  # namespace -> address

    @property
    def server(self) -> str:
        return f"{self.prefix}srv"

    @property
    def server_address(self) -> str:
        return f"{SUBNET}.1"

    def create(self) -> "Network":
        _ip("netns", "add", self.server)
        _ip("-n", self.server, "link", "set", "lo", "up")
        _ip("-n", self.server, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.server, "addr", "add", f"{self.server_address}/24", "dev", "br0")
        _ip("-n", self.server, "link", "set", "br0", "up")
        return self

    def add_host(self, name: str) -> str:
        """A namespace linked to the server's bridge; returns its address."""
        ns, n = f"{self.prefix}{name}", len(self.hosts) + 10
        address = f"{SUBNET}.{n}"
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"v{name}", "netns", self.server)
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", self.server, "link", "set", f"v{name}", "master", "br0")
        _ip("-n", self.server, "link", "set", f"v{name}", "up")
        self.hosts[name] = address
        return address

    def link(self, name: str, up: bool) -> None:
        """Cut (or restore) a host's only link, as a pulled cable would."""
        _ip("-n", f"{self.prefix}{name}", "link", "set", "eth0", "up" if up else "down")

    def exec_args(self, name: str | None) -> list[str]:
        return ["ip", "netns", "exec", self.server if name is None else f"{self.prefix}{name}"]

    def destroy(self) -> None:
        for ns in [*(f"{self.prefix}{h}" for h in self.hosts), self.server]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def run_in(netns: str, fn, *args, **kwargs):
    """Call fn in a thread that has joined the namespace: its sockets live there."""
    result: dict = {}

    def target():
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            result["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the caller)
            result["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
