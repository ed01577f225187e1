"""A real `magicdns serve` process for tests: started on free loopback ports, stopped in finalizers."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.query

from tests.support import free_port, stop_process, wait_until

ROOT = Path(__file__).resolve().parents[2]
MAGICDNS = [sys.executable, "-m", "magicdns.cli"]


@dataclass
class MagicDnsProcess:
    """A running resolver; `query` asks it over UDP (or TCP)."""

    proc: subprocess.Popen
    host: str
    port: int
    control_socket: str
    db: str | None
    workdir: str
    log_path: str
    extra: dict = field(default_factory=dict)

    def query(self, name: str, rtype: str = "A", tcp: bool = False, timeout: float = 2.0,
              **kw: object) -> dns.message.Message:
        q = dns.message.make_query(name, rtype, **kw)  # type: ignore[arg-type]
        if tcp:
            return dns.query.tcp(q, self.host, port=self.port, timeout=timeout)
        return dns.query.udp(q, self.host, port=self.port, timeout=timeout)

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)


def start_magicdns(*args: str, view: str | None = str(ROOT / "conf" / "view.json"), db: bool = True,
                   host: str = "127.0.0.1", probe: str | None = "my-server.tailnet",
                   workdir: str | None = None) -> MagicDnsProcess:
    """Start `magicdns serve` with `args` added; wait until it answers `probe` (or, with no probe,
    until its control socket is up, which happens after the listeners are bound)."""
    work = workdir or tempfile.mkdtemp(prefix="magicdns-test-")
    port = free_port(host=host)
    sock = os.path.join(work, "magicdns.sock")
    db_path = os.path.join(work, "records.db") if db else None
    cmd = MAGICDNS + ["serve", "--listen", f"{host}:{port}" if ":" not in host else f"[{host}]:{port}",
                      "--control-socket", sock, "--resolv-conf", os.path.join(work, "no-resolv.conf")]
    if view:
        cmd += ["--view", view]
    if db_path:
        cmd += ["--db", db_path]
    cmd += list(args)
    log_path = os.path.join(work, "server.log")
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=str(ROOT))
    server = MagicDnsProcess(proc, host, port, sock, db_path, work, log_path)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"magicdns exited with {proc.returncode}:\n{server.log()}")
        if probe is None:
            return os.path.exists(sock)
        try:
            server.query(probe, timeout=0.2)
            return os.path.exists(sock)
        except (dns.exception.Timeout, OSError):
            return False

    try:
        wait_until(ready, timeout=15, what="magicdns to answer")
    except BaseException:
        server.stop()
        raise
    return server


def run_cli(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    """Run the `magicdns` command line and capture its output."""
    return subprocess.run(MAGICDNS + list(args), capture_output=True, text=True, input=input,
                          cwd=str(ROOT), timeout=60)
