"""Helper of bench/dns.sh: generates the data and configs, reads CPU time, parses dnsperf, builds the
100,000-name view and prints the table. Run by hand through bench/dns.sh, not a test.

    dns_bench.py gen DIR [--hosts N]          data, configs and query files into DIR
    dns_bench.py cpu PID                      CPU ticks (utime+stime) of PID and its descendants
    dns_bench.py parse FILE LABEL CPU_TICKS   one JSON result line from a dnsperf output file
    dns_bench.py viewbuild N                  JSON: time and memory to build an N-name view
    dns_bench.py table RESULTS                the table (RESULTS: one JSON object per line)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zonegen  # noqa: E402

from magicdns.view import view_from_json  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
UP_APEX = "up.test"
SERVERS = ("magicdns", "dnsmasq", "dnsmasq-hosts", "knot", "nsd", "unbound")


# -- gen ---------------------------------------------------------------------------------------

def _free_port() -> int:
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                    t.bind(("127.0.0.1", port))
            except OSError:
                continue
            if port > 20000:
                return port
    raise SystemExit("no free port")


def gen(out: Path, hosts: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ports = {k: _free_port() for k in ("MAGICDNS", "NSD", "KNOT", "DNSMASQ", "DNSMASQ_HOSTS", "UNBOUND",
                                       "UPSTREAM", "FORWARDER")}
    (out / "ports.env").write_text("".join(f"PORT_{k}={v}\n" for k, v in ports.items()))

    obj = zonegen.bench_view_json(hosts)
    (out / "view.json").write_text(json.dumps(obj))
    view = view_from_json(obj)
    zones = zonegen.zones_from_view(view, all_reverse=False)
    zonedir = out / "zones"
    files = zonegen.write_zones(zones, zonedir)
    zonegen.write_lines(out / "queries.txt", zonegen.bench_queries(view, 20_000))
    # Every query a different NXDOMAIN name (typos, search-list expansions like www.example.com.tailnet):
    # no reply memo can help.
    rnd0 = random.Random(3)
    zonegen.write_lines(out / "nx-unique.txt",
                        [f"q{rnd0.getrandbits(48):x}.{view.domain} A" for _ in range(600_000)])
    for w in (1, 2):
        for name, fn in (("knot", zonegen.knot_conf), ("nsd", zonegen.nsd_conf)):
            d = out / f"{name}{w}"
            d.mkdir(exist_ok=True)
            (d / f"{name}.conf").write_text(fn(d, zonedir, files, ports[name.upper()], workers=w))
        d = out / f"unbound{w}"
        d.mkdir(exist_ok=True)
        (d / "unbound.conf").write_text(zonegen.unbound_conf(zones, d, ports["UNBOUND"], threads=w))
    d = out / "dnsmasq"
    d.mkdir(exist_ok=True)
    (d / "dnsmasq.conf").write_text(zonegen.dnsmasq_conf(view, d, ports["DNSMASQ"]))
    d = out / "dnsmasq-hosts"
    d.mkdir(exist_ok=True)
    (d / "dnsmasq.conf").write_text(zonegen.dnsmasq_hosts_conf(view, d, ports["DNSMASQ_HOSTS"]))

    # Forwarding: an upstream knotd for up.test, and magicdns with a tiny view forwarding to it.
    up = zonegen.upstream_zone(UP_APEX, 100)
    updir = out / "upstream"
    upfiles = zonegen.write_zones({UP_APEX: up}, updir / "zones")
    (updir / "knot.conf").write_text(zonegen.knot_conf(updir, updir / "zones", upfiles, ports["UPSTREAM"]))
    fwd_view = zonegen.bench_view_json(10)
    (out / "fwd-view.json").write_text(json.dumps(fwd_view))
    rnd = random.Random(7)
    zonegen.write_lines(out / "fwd-hit.txt", [f"n{rnd.randrange(100)}.{UP_APEX} A" for _ in range(10_000)])
    for tag in ("via", "direct"):  # every name asked once: the cache cannot help
        names = {f"r{rnd.getrandbits(48):x}.rnd.{UP_APEX}" for _ in range(60_000)}
        zonegen.write_lines(out / f"fwd-miss-{tag}.txt", [f"{n} A" for n in names])
    print(f"generated {hosts} hosts, {len(files)} zones into {out}", file=sys.stderr)


# -- cpu ---------------------------------------------------------------------------------------

def _stat(pid: str) -> tuple[int, int] | None:
    """(ppid, utime+stime) of a process, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])


def cpu_ticks(root: int) -> int:
    """CPU ticks of `root` and every descendant (nsd forks its servers; knotd and unbound use threads,
    which /proc/PID/stat already sums)."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(entry)
            if st:
                stats[int(entry)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total


# -- parse -------------------------------------------------------------------------------------

def parse(path: Path, label: str, ticks: int) -> dict:
    text = path.read_text(errors="replace")
    lat = [float(m.group(1)) for m in re.finditer(r"^> \S+ .* ([0-9.]+)$", text, re.M)]

    def num(pattern: str) -> float:
        m = re.search(pattern, text)
        return float(m.group(1)) if m else float("nan")

    completed = num(r"Queries completed:\s+(\d+)")
    qps = num(r"Queries per second:\s+([0-9.]+)")
    lost = num(r"Queries lost:\s+(\d+)")
    nx = num(r"NXDOMAIN (\d+)")
    lat.sort()
    out = {"label": label, "qps": qps, "completed": completed, "lost": lost,
           "nxdomain_pct": 100 * (0 if nx != nx else nx) / completed if completed else float("nan"),
           "mean_ms": num(r"Average Latency \(s\):\s+([0-9.]+)") * 1000,
           "p50_ms": lat[len(lat) // 2] * 1000 if lat else None,
           "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else None,
           "cpu_us_per_q": ticks / TICK * 1e6 / completed if completed and ticks >= 0 else None}
    return out


# -- viewbuild ---------------------------------------------------------------------------------

def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def viewbuild(n: int) -> dict:
    import gc

    from magicdns.engine import Engine
    from magicdns.zone import Zone

    # A tailnet's view: n nodes with an IPv4 and an IPv6 address each, no admin records.
    text = json.dumps(zonegen.bench_view_json(n, txt_every=0))
    gc.collect()
    gc.disable()  # the same build with the cyclic GC off, to show what the GC costs
    t = time.perf_counter()
    Zone(view_from_json(json.loads(text)))
    nogc_s = time.perf_counter() - t
    gc.enable()
    gc.collect()
    rss0 = _rss_kib()
    t0 = time.perf_counter()
    view = view_from_json(json.loads(text))
    t1 = time.perf_counter()
    zone = Zone(view)
    t2 = time.perf_counter()
    engine = Engine(zone)
    gc.collect()
    rss1 = _rss_kib()
    # Then answer every name once (A), as a busy tailnet would: the engine memoises finished replies.
    from dnslib import DNSRecord
    queries = [bytes(DNSRecord.question(f"host-{i}.tailnet", "A").pack()) for i in range(1, n + 1)]
    rss_q = _rss_kib()
    t3 = time.perf_counter()
    for q in queries:
        engine.handle(q)
    t4 = time.perf_counter()
    t5 = time.perf_counter()
    for q in queries:
        engine.handle(q)
    t6 = time.perf_counter()
    rss2 = _rss_kib()
    return {"names": n, "parse_s": t1 - t0, "zone_s": t2 - t1, "build_s": t2 - t0, "nogc_s": nogc_s,
            "rss_delta_mb": (rss1 - rss0) / 1024, "rss_total_mb": rss1 / 1024,
            "first_answer_us": (t4 - t3) / n * 1e6, "memo_answer_us": (t6 - t5) / n * 1e6,
            "memo_rss_delta_mb": (rss2 - rss_q) / 1024}


# -- table -------------------------------------------------------------------------------------

def _f(v, fmt: str) -> str:
    return "-" if v is None or v != v else format(v, fmt)


def table(path: Path) -> None:
    every = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by: dict[str, dict] = {}  # the best run (highest qps) of each label
    for r in every:
        if "label" in r and (r["label"] not in by or (r["qps"] or 0) > (by[r["label"]]["qps"] or 0)):
            by[r["label"]] = r
    rows = list(by.values()) + [r for r in every if "label" not in r]
    print()
    print("Authoritative, 1,000-name zone, same query mix (40% A, 20% AAAA, 10% PTR v4, 10% PTR v6, "
          "10% NXDOMAIN, 10% NODATA), dnsperf on loopback")
    hdr = f"{'run':<28}{'qps':>10}{'mean ms':>9}{'p50 ms':>8}{'p99 ms':>8}{'us CPU/q':>10}{'NXD%':>6}{'lost':>6}  {'magicdns/this qps':>17}"
    for mode, title in (("1core", "one core each: server on core 0, dnsperf on core 1"),
                        ("2core", "both cores: server and dnsperf unpinned")):
        print(f"\n[{title}]")
        print(hdr)
        ours = by.get(f"magicdns {mode}")
        for r in rows:
            if r.get("label", "") not in {f"{srv} {mode}" for srv in SERVERS}:
                continue
            ratio = ours["qps"] / r["qps"] if ours and r["qps"] else None
            print(f"{r['label']:<28}{_f(r['qps'], ',.0f'):>10}{_f(r['mean_ms'], '.3f'):>9}"
                  f"{_f(r['p50_ms'], '.3f'):>8}{_f(r['p99_ms'], '.3f'):>8}{_f(r['cpu_us_per_q'], '.1f'):>10}"
                  f"{_f(r['nxdomain_pct'], '.1f'):>6}{_f(r['lost'], '.0f'):>6}  {_f(ratio, '.2f'):>17}")
        if ours:
            cpu = {r["label"]: r["cpu_us_per_q"] for r in rows
                   if r.get("label", "") in {f"{srv} {mode}" for srv in SERVERS}}
            parts = [f"{k.split()[0]} {ours['cpu_us_per_q'] / v:.2f}x" for k, v in cpu.items()
                     if v and not k.startswith("magicdns") and ours["cpu_us_per_q"]]
            print("magicdns CPU per query relative to: " + ", ".join(parts))
    print("notes: 'dnsmasq' is host-record with cache-size=0, 'dnsmasq-hosts' addn-hosts with its default cache "
          "(the faster of the two is dnsmasq's figure in the targets); "
          "dnsmasq answers NXDOMAIN/NODATA without AA and without the SOA (smaller replies) and is "
          "single-threaded, so 'both cores' is one dnsmasq; CPU us/q is the server's process tree "
          "(utime+stime over the run, 10 ms ticks)")
    nxu = [r for r in rows if "unique-NX" in r.get("label", "")]
    if nxu:
        print("\n[one core, every query a new NXDOMAIN name (no memo hit possible)]")
        print(hdr)
        for r in nxu:
            print(f"{r['label']:<28}{_f(r['qps'], ',.0f'):>10}{_f(r['mean_ms'], '.3f'):>9}"
                  f"{_f(r['p50_ms'], '.3f'):>8}{_f(r['p99_ms'], '.3f'):>8}{_f(r['cpu_us_per_q'], '.1f'):>10}"
                  f"{_f(r['nxdomain_pct'], '.1f'):>6}{_f(r['lost'], '.0f'):>6}")
    half = by.get("magicdns half-load 1core")
    if half:
        print(f"\n[magicdns at half its one-core max, -Q {half.get('rate', '?')}]")
        print(hdr)
        for r in rows:
            if "half-load" in r.get("label", ""):
                print(f"{r['label']:<28}{_f(r['qps'], ',.0f'):>10}{_f(r['mean_ms'], '.3f'):>9}"
                      f"{_f(r['p50_ms'], '.3f'):>8}{_f(r['p99_ms'], '.3f'):>8}{_f(r['cpu_us_per_q'], '.1f'):>10}"
                      f"{_f(r['nxdomain_pct'], '.1f'):>6}{_f(r['lost'], '.0f'):>6}")
    fw = [r for r in rows if r.get("label", "").startswith("fwd ")]
    if fw:
        print("\n[forwarding at a fixed low rate: upstream knotd on core 1, magicdns on core 0, dnsperf on core 1]")
        print(f"{'run':<34}{'qps':>8}{'mean ms':>9}{'p50 ms':>8}{'p99 ms':>8}{'us CPU/q':>10}{'lost':>6}")
        for r in fw:
            print(f"{r['label']:<34}{_f(r['qps'], ',.0f'):>8}{_f(r['mean_ms'], '.3f'):>9}{_f(r['p50_ms'], '.3f'):>8}"
                  f"{_f(r['p99_ms'], '.3f'):>8}{_f(r['cpu_us_per_q'], '.1f'):>10}{_f(r['lost'], '.0f'):>6}")
        for kind in ("cache hit", "cache miss"):
            via, direct = by.get(f"fwd {kind} via magicdns"), by.get(f"fwd {kind} direct")
            if via and direct and via["p50_ms"] is not None and direct["p50_ms"] is not None:
                print(f"forwarding adds ({kind}): median {1000 * (via['p50_ms'] - direct['p50_ms']):+.0f} us, "
                      f"mean {1000 * (via['mean_ms'] - direct['mean_ms']):+.0f} us")
    vb = next((r for r in rows if "names" in r), None)
    if vb:
        print(f"\n[view of {vb['names']:,} names, in Python]")
        print(f"build (view_from_json + Zone): {vb['build_s']:.3f} s (parse+validate {vb['parse_s']:.3f} s, "
              f"Zone {vb['zone_s']:.3f} s; {vb['nogc_s']:.3f} s with the cyclic GC off); resident memory "
              f"+{vb['rss_delta_mb']:.0f} MB (process {vb['rss_total_mb']:.0f} MB)")
        print(f"answering each name once: {vb['first_answer_us']:.0f} us/query (slow path), then "
              f"{vb['memo_answer_us']:.1f} us/query from the memo; the memo holds +{vb['memo_rss_delta_mb']:.0f} MB")
    targets = []
    one = by.get("magicdns 1core")
    dms = [r for r in (by.get("dnsmasq 1core"), by.get("dnsmasq-hosts 1core")) if r and r["qps"] == r["qps"]]
    dm = max(dms, key=lambda r: r["qps"]) if dms else None
    if one and dm:
        targets.append(f"qps on one core >= dnsmasq's (faster config, {dm['label'].split()[0]}): "
                       f"{one['qps']:,.0f} vs {dm['qps']:,.0f} -> {'MET' if one['qps'] >= dm['qps'] else 'MISSED'}")
    nsd = by.get("nsd 1core")
    if one and nsd and nsd["qps"]:
        targets.append(f"qps on one core >= 0.8x nsd's: {one['qps'] / nsd['qps']:.2f}x -> "
                       f"{'MET' if one['qps'] >= 0.8 * nsd['qps'] else 'MISSED'}")
        if one["cpu_us_per_q"] and nsd["cpu_us_per_q"]:
            ratio = one["cpu_us_per_q"] / nsd["cpu_us_per_q"]
            targets.append(f"CPU per query <= 1.25x nsd's: {ratio:.2f}x -> {'MET' if ratio <= 1.25 else 'MISSED'}")
    if half and half["p99_ms"] is not None:
        targets.append(f"p99 < 1 ms at half load: {half['p99_ms']:.3f} ms -> {'MET' if half['p99_ms'] < 1 else 'MISSED'}")
    via, direct = by.get("fwd cache miss via magicdns"), by.get("fwd cache miss direct")
    if via and direct and via["p50_ms"] is not None:
        add = via["p50_ms"] - direct["p50_ms"]
        targets.append(f"forwarding adds < 0.2 ms at the median (cache miss): {add:.3f} ms -> "
                       f"{'MET' if add < 0.2 else 'MISSED'}")
    if vb:
        targets.append(f"100k-name view < 1 s and < 200 MB: {vb['build_s']:.2f} s, {vb['rss_delta_mb']:.0f} MB -> "
                       f"{'MET' if vb['build_s'] < 1 and vb['rss_delta_mb'] < 200 else 'MISSED'}")
    if targets:
        print("\n[targets]")
        for t in targets:
            print("  " + t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("dir", type=Path)
    g.add_argument("--hosts", type=int, default=1000)
    c = sub.add_parser("cpu")
    c.add_argument("pid", type=int)
    p = sub.add_parser("parse")
    p.add_argument("file", type=Path)
    p.add_argument("label")
    p.add_argument("ticks", type=int)
    p.add_argument("--rate", type=int, default=None)
    v = sub.add_parser("viewbuild")
    v.add_argument("n", type=int)
    t = sub.add_parser("table")
    t.add_argument("results", type=Path)
    a = ap.parse_args()
    if a.cmd == "gen":
        gen(a.dir, a.hosts)
    elif a.cmd == "cpu":
        print(cpu_ticks(a.pid))
    elif a.cmd == "parse":
        r = parse(a.file, a.label, a.ticks)
        if a.rate:
            r["rate"] = a.rate
        print(json.dumps(r))
    elif a.cmd == "viewbuild":
        print(json.dumps(viewbuild(a.n)))
    elif a.cmd == "table":
        table(a.results)


if __name__ == "__main__":
    main()
