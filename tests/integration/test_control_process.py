"""`meshnode control serve` as a subprocess: admin CLI changes reach streams; kill -9 and restart
serves the same map."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from meshnode.control.client import ControlClient, generate_private_key
from meshnode.netmap import NetMap
from tests.support import async_wait_until, free_port, wait_until

BIN = Path(sys.executable).parent
MESHNODE = str(BIN / "meshnode")
MAGICDNS = str(BIN / "magicdns")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MESHNODE, "control", *args], capture_output=True, text=True, timeout=30)


class ServerProcess:
    def __init__(self, db: Path) -> None:
        self.db = db
        self.port = free_port(kind=1)  # SOCK_STREAM
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([MESHNODE, "control", "serve", "--listen", f"127.0.0.1:{self.port}",
                                      "--db", str(self.db)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.db.with_suffix(".log"), "a"))

        def up() -> bool:
            assert self.proc.poll() is None, f"server exited: {self.db.with_suffix('.log').read_text()}"
            import urllib.request
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False
        wait_until(up, timeout=15, what="control server to answer /healthz")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def server(tmp_path: Path):
    s = ServerProcess(tmp_path / "control.db")
    s.start()
    yield s
    s.stop()


def _essence(nm: NetMap) -> tuple:
    """What must survive a restart: identities, names, addresses, keys, DNS (not online flags)."""
    return (nm.domain, nm.self_node.id, nm.self_node.name, nm.self_node.addresses, nm.self_node.node_key,
            tuple((p.id, p.name, p.addresses, p.node_key, p.tags) for p in nm.peers),
            nm.dns.to_json())


def test_cli_changes_reach_streams_and_kill_9_restart_serves_the_same_map(server: ServerProcess) -> None:
    key = cli("authkey", "create", "--db", str(server.db), "--reusable", "--user", "alice@example.com",
              "--create-user")
    assert key.returncode == 0, key.stderr
    authkey = key.stdout.strip()
    token_file = Path(str(server.db) + ".admin-token")
    assert token_file.exists() and (token_file.stat().st_mode & 0o777) == 0o600

    async def scenario() -> None:
        clients = [ControlClient(server.url, generate_private_key(), generate_private_key()) for _ in range(3)]
        for i, c in enumerate(clients):
            await c.register(authkey, hostname=f"host{i}")
        latest: dict[int, NetMap] = {}

        async def follow(i: int, c: ControlClient) -> None:
            async for nm in c.stream_map(max_backoff=0.2):
                latest[i] = nm
        tasks = [asyncio.create_task(follow(i, c)) for i, c in enumerate(clients)]
        try:
            await async_wait_until(lambda: len(latest) == 3 and all(len(m.peers) == 2 for m in latest.values()),
                                   timeout=5, what="first maps")
            # Admin CLI in another process: rename, DNS setting, a record through `magicdns records`.
            assert cli("nodes", "rename", "host1", "db", "--db", str(server.db)).returncode == 0
            await async_wait_until(lambda: all("db" in {p.name for p in m.peers} or m.self_node.name == "db"
                                               for m in latest.values()), timeout=1.0, what="CLI rename")
            assert cli("dns", "search-domains", "set", "corp.example", "--db", str(server.db)).returncode == 0
            await async_wait_until(lambda: all(m.dns.search_domains == ("corp.example",) for m in latest.values()),
                                   timeout=1.0, what="CLI DNS change")
            rec = subprocess.run([MAGICDNS, "records", "--db", str(server.db), "add", "wiki", "CNAME", "db"],
                                 capture_output=True, text=True, timeout=30)
            assert rec.returncode == 0, rec.stderr
            await async_wait_until(lambda: all([r.name for r in m.dns.records] == ["wiki.tailnet"]
                                               for m in latest.values()), timeout=1.0, what="magicdns record")
            before = {i: _essence(m) for i, m in latest.items()}
            version_before = max(m.version for m in latest.values())

            server.kill9()
            latest.clear()
            server.start()
            # The clients reconnect by themselves (backoff) and get the same map, at a newer version.
            await async_wait_until(lambda: len(latest) == 3 and all(_essence(latest[i]) == before[i] for i in latest),
                                   timeout=10, what="same maps after kill -9 and restart")
            assert all(m.version >= version_before for m in latest.values())
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for c in clients:
                await c.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_cli_bad_usage_and_failures(server: ServerProcess) -> None:
    db = str(server.db)
    assert cli("authkey", "create", "--db", db, "--expiry", "soon").returncode == 2
    assert cli("nodes", "rename", "--db", db).returncode == 2
    assert cli("serve", "--listen", "nonsense", "--db", db).returncode == 2
    failed = cli("nodes", "rm", "ghost", "--db", db)
    assert failed.returncode == 1 and "no node 'ghost'" in failed.stderr
    assert cli("dns", "nameservers", "set", "not-an-ip", "--db", db).returncode == 1
    ls = cli("nodes", "ls", "--db", db, "--json")
    assert ls.returncode == 0 and ls.stdout.strip() == "[]"


def test_admin_token_rotation_takes_effect_at_once(server: ServerProcess) -> None:
    import urllib.error
    import urllib.request
    token_file = Path(str(server.db) + ".admin-token")
    old = token_file.read_text().strip()

    def status(token: str) -> int:
        req = urllib.request.Request(server.url + "/admin/nodes", headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
    assert status(old) == 200
    assert cli("admin-token", "--rotate", "--db", str(server.db)).returncode == 0
    new = token_file.read_text().strip()
    assert new != old and (token_file.stat().st_mode & 0o777) == 0o600
    assert status(old) == 401 and status(new) == 200
