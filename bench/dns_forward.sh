#!/usr/bin/env bash
# The latency forwarding adds, run by hand (not a test): the forwarding part of bench/dns.sh alone,
# with several interleaved rounds, so a busy machine can be seen for what it is. A knotd upstream
# on core 1, `magicdns serve` forwarding to it on core 0, dnsperf at a fixed rate on core 1:
#   cache hit:  the same 100 names through magicdns, and straight to knotd
#   cache miss: every name asked once (knotd answers NXDOMAIN from its zone), through magicdns and
#               straight to knotd
# Each round gets its own slice of the unique names, so no round is helped by an earlier one's cache.
# Prints, per round, the median and p99 latency of each run and the median magicdns adds; the
# summary is the median over rounds of those per-round differences.
#
#   bench/dns_forward.sh                                     (traffic stays on 127.0.0.1)
#   DNS_BENCH_SECONDS=5 DNS_BENCH_ROUNDS=5 DNS_BENCH_FWD_QPS=2000 bench/dns_forward.sh
#
# Before/after on a busy machine: DNS_FORWARD_BASE=REF also runs magicdns as of git REF (exported
# to a temporary directory, same Python, on core 0 too) and DNS_FORWARD_PINGPONG=N sends N rounds of
# one query at a time through bench/fwd_pingpong.py, alternating direct, this tree and REF query by
# query, then measures each forwarder's CPU per cache miss from its schedstat. DNS_BENCH_ROUNDS=0
# skips the dnsperf rounds:
#   DNS_BENCH_ROUNDS=0 DNS_FORWARD_PINGPONG=3000 DNS_FORWARD_BASE=main bench/dns_forward.sh
#
# Every dnsperf run is bounded (-l); every server is started here and killed on exit (trap).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
MAGICDNS=${MAGICDNS:-$ROOT/.venv/bin/magicdns}
HELPER="$ROOT/bench/dns_bench.py"
DUR=${DNS_BENCH_SECONDS:-5}
ROUNDS=${DNS_BENCH_ROUNDS:-3}
BASE=${DNS_FORWARD_BASE:-}
PINGPONG=${DNS_FORWARD_PINGPONG:-0}
RATE=${DNS_BENCH_FWD_QPS:-2000}
CLIENTS=8
if [ "$(id -u)" = 0 ]; then NICE=${DNS_BENCH_NICE:--10}; else NICE=${DNS_BENCH_NICE:-0}; fi
export PATH="$PATH:/usr/sbin:/sbin"
for tool in dnsperf knotd taskset dig; do
    command -v "$tool" >/dev/null || { echo "dns_forward.sh: $tool is not installed" >&2; exit 2; }
done

TMP=$(mktemp -d /tmp/dns-forward.XXXXXX)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$PY" "$HELPER" gen "$TMP" --hosts 100 2>/dev/null
# shellcheck disable=SC1091
. "$TMP/ports.env"

start() {  # start NAME CPUS PORT CMD...: run pinned, wait (15 s) until it answers n1.up.test
    local name=$1 cpus=$2 port=$3
    shift 3
    taskset -c "$cpus" "$@" >"$TMP/$name.log" 2>&1 &
    local pid=$! p t
    PIDS+=("$pid")
    local deadline=$((SECONDS + 15))
    until dig +time=1 +tries=1 +short -p "$port" @127.0.0.1 n1.up.test A 2>/dev/null | grep -q '^[^;]'; do
        if ! kill -0 "$pid" 2>/dev/null || [ $SECONDS -gt $deadline ]; then
            echo "dns_forward.sh: $name did not start:" >&2; cat "$TMP/$name.log" >&2; exit 1
        fi
        sleep 0.1
    done
    for p in $pid $(ps -o pid= --ppid "$pid"); do
        taskset -a -p -c "$cpus" "$p" >/dev/null
        for t in /proc/"$p"/task/*; do renice -n "$NICE" -p "${t##*/}" >/dev/null 2>&1 || true; done
    done
    eval "PID_$name=$pid"
}

start upstream 1 "$PORT_UPSTREAM" knotd -c "$TMP/upstream/knot.conf"
start forwarder 0 "$PORT_FORWARDER" "$MAGICDNS" serve --listen "127.0.0.1:$PORT_FORWARDER" \
    --view "$TMP/fwd-view.json" --upstream "127.0.0.1:$PORT_UPSTREAM" --control-socket "$TMP/fwd.sock" \
    --resolv-conf /dev/null --log-level warning
dnsperf -s 127.0.0.1 -p "$PORT_FORWARDER" -d "$TMP/fwd-hit.txt" -n 1 -c "$CLIENTS" -l 30 >/dev/null 2>&1 || true
if [ -n "$BASE" ]; then
    mkdir "$TMP/base"
    git -C "$ROOT" archive "$BASE" magicdns | tar -x -C "$TMP/base"
    # -P: the current directory (maybe this tree) must not come before the exported one.
    start base 0 "$PORT_MAGICDNS" env PYTHONPATH="$TMP/base" "$PY" -P -m magicdns.cli serve \
        --listen "127.0.0.1:$PORT_MAGICDNS" --view "$TMP/fwd-view.json" --upstream "127.0.0.1:$PORT_UPSTREAM" \
        --control-socket "$TMP/base.sock" --resolv-conf /dev/null --log-level warning
fi

# One slice of unique names per round and path.
PER=$((RATE * DUR + RATE))
for tag in via direct; do
    split -l "$PER" -d -a 2 "$TMP/fwd-miss-$tag.txt" "$TMP/miss-$tag-"
done

measure() {  # measure LABEL PORT FILE -> one JSON line appended to results
    nice -n "$NICE" taskset -c 1 dnsperf -s 127.0.0.1 -p "$2" -d "$3" -l "$DUR" -c "$CLIENTS" -v -Q "$RATE" \
        >"$TMP/dnsperf.out" 2>&1 || true
    "$PY" "$HELPER" parse "$TMP/dnsperf.out" "$1" -1 >>"$TMP/results.jsonl"
}

echo "dns_forward.sh $(date -u +%FT%TZ), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg);" \
     "$ROUNDS rounds of $DUR s at $RATE qps, nice $NICE"
for r in $(seq 0 $((ROUNDS - 1))); do
    [ "$ROUNDS" -gt 0 ] || break
    slice=$(printf %02d "$r")
    [ -f "$TMP/miss-via-$slice" ] || { echo "not enough unique names for round $r" >&2; break; }
    measure "hit via $r" "$PORT_FORWARDER" "$TMP/fwd-hit.txt"
    measure "hit direct $r" "$PORT_UPSTREAM" "$TMP/fwd-hit.txt"
    measure "miss via $r" "$PORT_FORWARDER" "$TMP/miss-via-$slice"
    measure "miss direct $r" "$PORT_UPSTREAM" "$TMP/miss-direct-$slice"
done
if [ "$PINGPONG" -gt 0 ]; then
    vias=(--via "magicdns=$PORT_FORWARDER" --pid "magicdns=$PID_forwarder")
    [ -z "$BASE" ] || vias+=(--via "$BASE=$PORT_MAGICDNS" --pid "$BASE=$PID_base")
    echo "one query at a time, $PINGPONG rounds (fwd_pingpong.py):"
    nice -n "$NICE" taskset -c 1 "$PY" "$ROOT/bench/fwd_pingpong.py" --direct "$PORT_UPSTREAM" "${vias[@]}" \
        -n "$PINGPONG"
fi
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
[ -s "$TMP/results.jsonl" ] || exit 0
"$PY" - "$TMP/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
by = {r["label"]: r for r in rows}
rounds = sorted({int(r["label"].rsplit(" ", 1)[1]) for r in rows})
adds = {"hit": [], "miss": []}
print(f"{'round':>5} {'kind':5} {'via p50 ms':>10} {'direct p50':>10} {'added us':>9} {'via p99':>8} {'direct p99':>10} {'lost':>5}")
for r in rounds:
    for kind in ("hit", "miss"):
        via, direct = by.get(f"{kind} via {r}"), by.get(f"{kind} direct {r}")
        if not via or not direct or via["p50_ms"] is None or direct["p50_ms"] is None:
            continue
        added = (via["p50_ms"] - direct["p50_ms"]) * 1000
        adds[kind].append(added)
        print(f"{r:>5} {kind:5} {via['p50_ms']:10.3f} {direct['p50_ms']:10.3f} {added:9.0f} "
              f"{via['p99_ms']:8.3f} {direct['p99_ms']:10.3f} {int(via['lost']):>5}")
for kind, target in (("hit", 100), ("miss", 200)):
    if adds[kind]:
        print(f"cache {kind}: magicdns adds {statistics.median(adds[kind]):.0f} us at the median "
              f"(median of {len(adds[kind])} rounds; target < {target} us)")
PY
