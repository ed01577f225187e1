"""Network namespaces joined by a veth pair, for end-to-end tests (root only), and what tests do
across them: ICMP ping (this machine has no `ping` binary), a checked TCP transfer, running a
function inside a namespace (`in_netns`).

Everything created here is deleted by `NetnsPair.destroy()`, which tolerates partial creation, so
a fixture that calls it in its finalizer leaves nothing behind even when a test fails midway."""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import threading
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

_serial = itertools.count()
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run `fn` on a fresh thread that has entered namespace `name`, and return its result.

    setns() moves only the calling thread, so the test process stays where it was; file
    descriptors `fn` opens there (a TUN, a socket, a netlink socket) keep their namespace."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {name}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


MESHNODE = [sys.executable, "-c", "from meshnode.cli import main; main()"]


def run(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing output; raise with its stderr on failure when `check`."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


class Lab:
    """Namespaces, /etc/netns files and processes made by one test; `destroy` removes all of it."""

    def __init__(self) -> None:
        self.namespaces: list[str] = []
        self.etc_dirs: list[Path] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def add_namespace(self, ns: str) -> None:
        run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")

    def write_resolv_conf(self, ns: str, text: str) -> None:
        """The namespace's own resolv.conf (`ip netns exec` mounts it over /etc/resolv.conf)."""
        etc = Path("/etc/netns") / ns
        etc.mkdir(parents=True, exist_ok=True)
        self.etc_dirs.append(etc)
        (etc / "resolv.conf").write_text(text)

    def popen(self, ns: str, *cmd: str, log: Path) -> subprocess.Popen[bytes]:
        """Start `cmd` in `ns` in its own process group, output appended to `log`."""
        with open(log, "ab") as f:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def destroy(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait(5)
        for ns in self.namespaces:
            run("ip", "netns", "del", ns, check=False)
        for etc in self.etc_dirs:
            shutil.rmtree(etc, ignore_errors=True)


def unique_name(prefix: str) -> str:
    """A short name unique to this process and call (interface names have 15 bytes)."""
    return f"{prefix}{os.getpid() % 100000}{next(_serial)}"[:15]


@dataclass
class Netns:
    """One namespace; `exec` prefixes a command with `ip netns exec NAME`."""

    name: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def exec(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, *cmd: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return run(*self.exec(*cmd), check=check, timeout=timeout)

    def ping(self, dst: str, count: int = 1, timeout: float = 1.0) -> list[float] | None:
        """ICMP echo from inside the namespace (this machine has no `ping`): the round-trip
        times in seconds, or None if a reply did not come back within `timeout`."""
        proc = self.run(sys.executable, os.path.abspath(__file__), "ping", dst, str(count),
                        str(timeout), check=False, timeout=count * (timeout + 1) + 10)
        if proc.returncode != 0:
            return None
        return [float(x) for x in proc.stdout.split()]

    def popen(self, *cmd: str, **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a process inside the namespace; it is killed when the pair is destroyed."""
        proc = subprocess.Popen(self.exec(*cmd), start_new_session=True, **kwargs)  # type: ignore[call-overload]
        self.processes.append(proc)
        return proc

    def kill_processes(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)  # its own session: only its children
                    proc.wait(timeout=5)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait(timeout=5)
        self.processes.clear()


@dataclass
class NetnsPair:
    """Namespaces `a` and `b` joined by veth `a_if`/`b_if` with `a_addr`/`b_addr` on a /24 and
    `a_addr6`/`b_addr6` on a /64."""

    a: Netns
    b: Netns
    a_if: str
    b_if: str
    a_addr: str
    b_addr: str
    a_addr6: str = "fd00:200::1"
    b_addr6: str = "fd00:200::2"

    @classmethod
    def create(cls, prefix: str = "mn", subnet: str = "10.200.0") -> NetnsPair:
        tag = unique_name(prefix)
        pair = cls(Netns(f"{tag}a"), Netns(f"{tag}b"), f"{tag}x"[:15], f"{tag}y"[:15],
                   f"{subnet}.1", f"{subnet}.2")
        try:
            run("ip", "netns", "add", pair.a.name)
            run("ip", "netns", "add", pair.b.name)
            run("ip", "link", "add", pair.a_if, "netns", pair.a.name, "type", "veth",
                "peer", "name", pair.b_if, "netns", pair.b.name)
            for ns, ifname, addr, addr6 in ((pair.a, pair.a_if, pair.a_addr, pair.a_addr6),
                                            (pair.b, pair.b_if, pair.b_addr, pair.b_addr6)):
                ns.run("ip", "addr", "add", f"{addr}/24", "dev", ifname)
                # nodad: usable at once, no duplicate address detection to wait for
                ns.run("ip", "-6", "addr", "add", f"{addr6}/64", "dev", ifname, "nodad")
                ns.run("ip", "link", "set", ifname, "up")
                ns.run("ip", "link", "set", "lo", "up")
        except BaseException:
            pair.destroy()
            raise
        return pair

    def destroy(self) -> None:
        """Kill the namespaces' processes, then delete the namespaces (and so the veth)."""
        for ns in (self.a, self.b):
            ns.kill_processes()
        for ns in (self.a, self.b):
            run("ip", "netns", "del", ns.name, check=False)


# TCP check: the server reads everything a client sends and answers with its length and SHA-256;
# both are bounded by socket timeouts.
SERVER = """
import hashlib, socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.create_server((sys.argv[1], int(sys.argv[2])), family=fam); s.settimeout(30)
print("ready", flush=True)
c, _ = s.accept(); c.settimeout(30); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 16)
    if not b: break
    h.update(b); n += len(b)
c.sendall(f"{n} {h.hexdigest()}".encode()); c.close()
"""
CLIENT = """
import socket, sys
data = bytes.fromhex(sys.stdin.readline()) * int(sys.argv[3])
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
c.sendall(data); c.shutdown(socket.SHUT_WR)
print(c.recv(200).decode(), flush=True)
"""


def check_tcp_transfer(server_ns: Netns, server_ip: str, client_ns: Netns, size: int,
                       port: int = 5001) -> None:
    """Send `size` random bytes over TCP from `client_ns` to `server_ip` in `server_ns` and
    check that exactly those bytes arrived (length and SHA-256)."""
    server = server_ns.popen(sys.executable, "-c", SERVER, server_ip, str(port),
                             stdout=subprocess.PIPE)
    assert server.stdout is not None
    assert server.stdout.readline().strip() == b"ready"
    chunk = os.urandom(1 << 16)
    repeat = max(1, size // len(chunk))
    client = subprocess.run(client_ns.exec(sys.executable, "-c", CLIENT, server_ip, str(port),
                                           str(repeat)),
                            input=chunk.hex() + "\n", capture_output=True, text=True, timeout=60)
    assert client.returncode == 0, client.stderr
    assert client.stdout.split() == [str(repeat * len(chunk)),
                                     hashlib.sha256(chunk * repeat).hexdigest()]
    server.wait(timeout=10)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def icmp_ping(dst: str, count: int, timeout: float) -> list[float]:
    """Send `count` ICMP echo requests to `dst` one after another; the RTTs in seconds.
    Raises TimeoutError if any reply is missing."""
    ident = os.getpid() & 0xFFFF
    rtts = []
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        for seq in range(count):
            payload = b"meshnode-ping" + bytes(43)
            head = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
            packet = struct.pack("!BBHHH", 8, 0, _checksum(head + payload), ident, seq) + payload
            start = time.perf_counter()
            s.sendto(packet, (dst, 0))
            deadline = start + timeout
            while True:
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise TimeoutError(f"no reply from {dst} (seq {seq})")
                s.settimeout(left)
                try:
                    reply = s.recv(2048)
                except socket.timeout:
                    continue
                ihl = (reply[0] & 15) * 4
                typ, _, _, rid, rseq = struct.unpack("!BBHHH", reply[ihl:ihl + 8])
                if typ == 0 and rid == ident and rseq == seq:
                    rtts.append(time.perf_counter() - start)
                    break
    return rtts


if __name__ == "__main__":
    # `python netns.py ping DST COUNT TIMEOUT`: prints RTTs (seconds), exit 1 on a lost reply.
    if len(sys.argv) != 5 or sys.argv[1] != "ping":
        sys.exit("usage: netns.py ping DST COUNT TIMEOUT")
    try:
        print(" ".join(f"{r:.6f}" for r in icmp_ping(sys.argv[2], int(sys.argv[3]),
                                                     float(sys.argv[4]))))
    except (TimeoutError, OSError) as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
