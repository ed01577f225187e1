"""The table of bench/encdns.sh: medians over rounds of the JSON lines `dns_bench.py parse` wrote,
ratios to dnsdist, the latency DoT and DoH add over plain TCP, and issue 12's targets.

    python bench/encdns_table.py RESULTS.jsonl magicdns dnsdist [unbound]
    python bench/encdns_table.py --h2load H2LOAD_OUTPUT H2LOAD_LOG LABEL CPU_TICKS   (one JSON line)
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
from pathlib import Path

MODES = ("tcp", "dot", "doh", "dnsperf-doh")
REFERENCE = "dnsdist"
TARGETS = {"dot": 0.8, "doh": 0.5}  # qps as a share of the reference's (issue 12)
ADDED_MS = 0.2  # most latency DoT/DoH may add over plain TCP at the median (issue 12)


def h2load(out: Path, log: Path, label: str, ticks: int) -> dict:
    """h2load's figures in the shape `dns_bench.py parse` gives dnsperf's: only 2xx replies count as
    completed, the rest as lost; latencies from its per-request log (status, microseconds)."""
    text = out.read_text(errors="replace")
    m = re.search(r"finished in ([0-9.]+)(m?s), ([0-9.]+) req/s", text)
    reqs = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded", text)
    lat = []
    if log.exists():
        for line in log.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3 and parts[1].startswith("2"):
                lat.append(int(parts[2]) / 1000)
    lat.sort()
    ok = int(reqs.group(4)) if reqs else 0
    seconds = float(m.group(1)) / (1000 if m and m.group(2) == "ms" else 1) if m else 0
    return {"label": label, "qps": ok / seconds if seconds else float("nan"), "completed": ok,
            "lost": (int(reqs.group(1)) - ok) if reqs else float("nan"),
            "mean_ms": statistics.fmean(lat) if lat else None,
            "p50_ms": lat[len(lat) // 2] if lat else None,
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
            "cpu_us_per_q": ticks / os.sysconf("SC_CLK_TCK") * 1e6 / ok if ok and ticks >= 0 else None}


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and v == v]
    return statistics.median(vals) if vals else None


def summarise(lines: list[dict]) -> dict[tuple[str, str, str], dict]:
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for rec in lines:
        server, mode, kind = rec["label"].split()
        groups.setdefault((server, mode, kind), []).append(rec)
    out = {}
    for key, recs in groups.items():
        out[key] = {"qps": median([r["qps"] for r in recs]), "cpu": median([r["cpu_us_per_q"] for r in recs]),
                    "lost": sum(r["lost"] for r in recs if r["lost"] == r["lost"]),
                    "p50": median([r["p50_ms"] for r in recs]), "rounds": len(recs),
                    "all_qps": [round(r["qps"]) if r["qps"] == r["qps"] else None for r in recs]}
    return out


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(path: Path, servers: list[str]) -> str:
    s = summarise([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
    rows = [f"{'server':<9} {'mode':<11} {'qps (median)':>12} {'vs ' + REFERENCE:>11} {'CPU us/q':>9}"
            f" {'vs ' + REFERENCE + ' (CPU)':>17} {'lost':>5} {'p50 ms':>7} {'added ms':>9}   qps per round"]
    verdicts = []
    for server in servers:
        tcp_lat = s.get((server, "tcp", "lat"), {}).get("p50")
        for mode in MODES:
            mx, lat = s.get((server, mode, "max"), {}), s.get((server, mode, "lat"), {})
            if not mx and not lat:
                continue
            ref = s.get((REFERENCE, mode, "max"), {}).get("qps")
            ratio = mx.get("qps") / ref if mx.get("qps") is not None and ref else None
            # The same ratio from CPU per query: what each would do with a whole core to itself.
            ref_cpu = s.get((REFERENCE, mode, "max"), {}).get("cpu")
            cpu_ratio = ref_cpu / mx["cpu"] if mx.get("cpu") and ref_cpu else None
            if s.get((REFERENCE, mode, "max"), {}).get("lost"):
                ratio = cpu_ratio = None  # the reference lost replies under this client: no ratio
            added = lat["p50"] - tcp_lat if lat.get("p50") is not None and tcp_lat is not None and mode != "tcp" else None
            rows.append(f"{server:<9} {mode:<11} {fmt(mx.get('qps'), '12.0f')} {fmt(ratio, '10.2f') + ('x' if ratio is not None else ''):>11}"
                        f" {fmt(mx.get('cpu'), '9.0f')} {fmt(cpu_ratio, '16.2f') + ('x' if cpu_ratio is not None else ''):>17}"
                        f" {mx.get('lost', 0):>5.0f} {fmt(lat.get('p50'), '7.3f')}"
                        f" {fmt(added, '+9.3f')}   {mx.get('all_qps', [])}")
            if server == "magicdns" and mode in TARGETS and ratio is not None:
                ok = ratio >= TARGETS[mode]
                verdicts.append(f"{server} {mode.upper()} qps >= {TARGETS[mode]}x {REFERENCE}'s: {ratio:.2f}x measured -> "
                                f"{'MET' if ok else 'MISSED'}; {fmt(cpu_ratio, '.2f')}x by CPU per query -> "
                                f"{'MET' if cpu_ratio is not None and cpu_ratio >= TARGETS[mode] else 'MISSED'}")
            if server == "magicdns" and added is not None and mode in TARGETS:
                verdicts.append(f"{server} {mode.upper()} adds < {ADDED_MS} ms over TCP at the median: {added:+.3f} ms -> "
                                f"{'MET' if added < ADDED_MS else 'MISSED'}")
    note = (f"On a shared machine the scheduler gives a multi-threaded server (dnsdist) more of core 0 than a"
            f" one-thread one (magicdns): 'vs {REFERENCE} (CPU)' compares CPU per query, i.e. a whole core each.")
    return "\n".join(rows + [""] + verdicts + [note])


if __name__ == "__main__":
    if sys.argv[1] == "--h2load":
        print(json.dumps(h2load(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], int(sys.argv[5]))))
    else:
        print(table(Path(sys.argv[1]), sys.argv[2:]))
