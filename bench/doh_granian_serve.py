"""`magicdns serve` with its DoH listeners on granian instead of h2 (issue 12's spike), for
bench/encdns.sh (ENCDNS_BENCH_GRANIAN=1). Run by hand through that script, not a test; the same
arguments as `magicdns serve`.

The spike is not wired into magicdns itself (see README, "DoH on granian: the spike"): this script
swaps the DoH half of `EncryptedListeners._bind` for `bench/doh_granian.py` before the CLI runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from magicdns import cli, encrypted  # noqa: E402
from doh_granian import DohApp, GranianDoh, listen_socket  # noqa: E402
from magicdns.dot import start_dot  # noqa: E402
from magicdns.tlsconf import ALPN_DOT  # noqa: E402

_close = encrypted.EncryptedListeners._close_servers


async def _bind(self: encrypted.EncryptedListeners) -> None:
    assert self.certs is not None
    for host, port in self.config.dot:
        srv = await start_dot(self.admission, host, port, self.certs.front_context(ALPN_DOT))
        self.servers.append(srv)
        self.bound.append(("dot", host, srv.sockets[0].getsockname()[1]))
    self.granian = []  # type: ignore[attr-defined]
    for host, port in self.config.doh:
        sock = listen_socket(host, port)
        bound = sock.getsockname()[1]
        g = GranianDoh(DohApp(self.dispatch), sock, self.certs.cert_file, self.certs.key_file,
                       idle_timeout=self.dispatch.limits.idle_timeout)
        g.start()
        self.granian.append(g)  # type: ignore[attr-defined]
        self.bound.append(("doh", host, bound))


async def _close_servers(self: encrypted.EncryptedListeners) -> None:
    for g in getattr(self, "granian", ()):
        await g.stop()
    self.granian = []  # type: ignore[attr-defined]
    await _close(self)


encrypted.EncryptedListeners._bind = _bind  # type: ignore[method-assign]
encrypted.EncryptedListeners._close_servers = _close_servers  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.argv[0] = "magicdns"
    cli.main()
