"""The node daemon and its CLI: control client, network map, DNS, tunnel, LocalAPI, OS DNS setup.

Modules, each owning one idea:
    daemon.py      the node's lifecycle (up, down, logout), map following, wiring of the parts below
    state.py       the state directory: keys, prefs, last map, server key pin, daemon lock
    prefs.py       what the user asked for with `up`, as a frozen value
    atomicfile.py  temp file + fsync + rename
    dnsthread.py   the magicdns server on its own event loop thread
    iface.py       100.100.100.100 / fd7a:115c:a1e0::53 on the node's interface (TUN, dummy or lo)
    metrics.py     Prometheus /metrics of the resolver (`--metrics`)
    tunnel.py      the WireGuard data plane (`--tun`): peers, addresses, routes from the map
    icmp.py        ICMP echo for `meshnode ping`
    resolvconf.py  resolv.conf as values: parse, render ours, plan recovery, detect drift (sans-I/O)
    osdns.py       the system resolver: resolv.conf file or systemd-resolved per link
    apitypes.py    LocalAPI requests and their validation (sans-I/O)
    localapi.py    the LocalAPI server on a root-only unix socket
    localclient.py the CLI's client for it
    cli.py         `meshnode daemon|up|down|logout|status|ip|ping|dns`
"""
