#!/usr/bin/env bash
# Forwarding overload, run by hand (not a test): magicdns's authoritative qps on one core, alone and
# while a flood of unique forwarded names arrives (issue 8: authoritative answers keep at least 80%
# of their unloaded qps). Two floods: toward a live upstream (knotd; every name a cache miss), and
# toward an upstream that never answers (forwards pile up to the in-flight cap, after which each
# flooding query is answered SERVFAIL at once).
#
#   bench/dns_overload.sh                         (traffic stays on 127.0.0.1)
#   DNS_BENCH_SECONDS=8 DNS_FLOOD_QPS=20000 bench/dns_overload.sh
#
# Server on core 0; the clients (dnsperf for authoritative queries, bench/flood.py for the flood) and
# the upstream on core 1. Every run is bounded (-l, flood.py's SECONDS).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
MAGICDNS=${MAGICDNS:-$ROOT/.venv/bin/magicdns}
HELPER="$ROOT/bench/dns_bench.py"
DUR=${DNS_BENCH_SECONDS:-8}
FLOOD=${DNS_FLOOD_QPS:-20000}
ROUNDS=${DNS_BENCH_ROUNDS:-2}
export PATH="$PATH:/usr/sbin:/sbin"
for tool in dnsperf knotd taskset dig; do
    command -v "$tool" >/dev/null || { echo "dns_overload.sh: $tool is not installed" >&2; exit 2; }
done

TMP=$(mktemp -d /tmp/dns-overload.XXXXXX)
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

"$PY" "$HELPER" gen "$TMP" --hosts 1000 2>/dev/null
# shellcheck disable=SC1091
. "$TMP/ports.env"

wait_answer() {  # wait_answer PORT NAME PID
    local deadline=$((SECONDS + 15))
    until dig +time=1 +tries=1 +short -p "$1" @127.0.0.1 "$2" 2>/dev/null | grep -q '^[^;]'; do
        kill -0 "$3" 2>/dev/null && [ $SECONDS -le $deadline ] || { echo "server did not start" >&2; exit 1; }
        sleep 0.1
    done
}

taskset -c 1 knotd -c "$TMP/upstream/knot.conf" >"$TMP/knot.log" 2>&1 &
PIDS+=($!); wait_answer "$PORT_UPSTREAM" "n1.up.test" "$!"
# An upstream that never answers: a bound UDP socket nobody reads.
"$PY" -c "import socket,sys,time; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind(('127.0.0.1',0)); print(s.getsockname()[1],flush=True); time.sleep(3600)" >"$TMP/hole.port" &
PIDS+=($!)
for _ in $(seq 50); do [ -s "$TMP/hole.port" ] && break; sleep 0.1; done
HOLE=$(cat "$TMP/hole.port")

grep -h 'rnd' "$TMP/fwd-miss-via.txt" >"$TMP/flood.txt"
grep -h 'rnd' "$TMP/fwd-miss-direct.txt" >"$TMP/flood2.txt"  # other names: never a cache hit of the first flood

run_server() {  # run_server UPSTREAM_PORT -> sets SRV
    taskset -c 0 "$MAGICDNS" serve --listen "127.0.0.1:$PORT_MAGICDNS" --view "$TMP/view.json" \
        --upstream "127.0.0.1:$1" --control-socket "$TMP/m.sock" --resolv-conf /dev/null --log-level error \
        >"$TMP/magicdns.log" 2>&1 &
    SRV=$!
    PIDS+=("$SRV")
    wait_answer "$PORT_MAGICDNS" "host-1.tailnet" "$SRV"
    dnsperf -s 127.0.0.1 -p "$PORT_MAGICDNS" -d "$TMP/queries.txt" -n 1 -c 8 -l 30 >/dev/null 2>&1 || true
}

# sched SRV: "run_ns wait_ns" of the server process so far (/proc/PID/schedstat): CPU it used, and
# time it was runnable but waiting for a CPU (other work on a busy machine).
sched() { cut -d' ' -f1-2 "/proc/$SRV/schedstat"; }

# cpu1: "busy total" jiffies of core 1 (/proc/stat), where both clients and the upstream run: if it
# is saturated, the authoritative client is starved and the qps ratio measures the client.
cpu1() { awk '$1 == "cpu1" {b = $2 + $3 + $4 + $7 + $8; print b, b + $5 + $6}' /proc/stat; }
now_ns() { date +%s%N; }
# profile TAG: with PERF_OUT=DIR, sample the server (perf record -g, 999 Hz) for most of the window
# that starts now; the report goes to DIR/TAG.perf.txt (profiling costs the server a little CPU: the
# figures of such a run are for where the time goes, not for the ratios).
profile() {
    [ -n "${PERF_OUT:-}" ] || return 0
    mkdir -p "$PERF_OUT"
    if [ -n "${PYSPY:-}" ]; then  # PYSPY=path/to/py-spy: Python frames (collapsed stacks) instead
        taskset -c 1 "$PYSPY" record --nonblocking -r 1000 -d $((DUR - 2)) -p "$SRV" -f raw \
            -o "$PERF_OUT/$1.pyspy.txt" >/dev/null 2>&1 &
    else
        taskset -c 1 perf record -F 999 -g -p "$SRV" -o "$PERF_OUT/$1.perf.data" -- sleep $((DUR - 2)) >/dev/null 2>&1 &
    fi
}
# counters: "udp forwarded overload cache_answers" of the running server (its control socket), and
# the CPU ticks so far of knotd and of the flood client (the other tenants of core 1).
counters() {
    "$MAGICDNS" status --control-socket "$TMP/m.sock" --json 2>/dev/null |
        "$PY" -c "import json,sys; q=json.load(sys.stdin)['queries']; print(q['udp'], q['forwarded'], q['overload'], q['cache_answers'])" ||
        echo "0 0 0 0"
    "$PY" - <<'CPU'
import glob
ticks = {"knotd": 0, "flood": 0}
for stat in glob.glob("/proc/[0-9]*/stat"):
    try:
        fields = open(stat).read().rsplit(")", 1)[1].split()
        cmd = open(stat.replace("stat", "cmdline"), "rb").read()
    except OSError:
        continue
    tag = "knotd" if b"knotd" in cmd.split(b"\0")[0] else "flood" if b"flood.py" in cmd or (
        b"dnsperf" in cmd and b"flood" in cmd) else None
    if tag:
        ticks[tag] += int(fields[11]) + int(fields[12])
print(ticks["knotd"], ticks["flood"])
CPU
}

# cost FILE S0 S1 COMPLETED: append "cpu_us_per_answer wait_share" for the run between S0 and S1.
cost() {
    "$PY" -c "import sys; r0,w0,r1,w1,n=map(int,sys.argv[1:]); print(f'{(r1-r0)/1e3/max(n,1):.1f} {(w1-w0)/max(1,(r1-r0)+(w1-w0)):.2f}')" \
        $2 $3 "$4" >>"$1"
}

auth() {  # auth: authoritative qps at full load, best of ROUNDS; CPU per answer into $TMP/auth.cost
    local best=0 q r s0 s1 out
    for r in $(seq "$ROUNDS"); do
        k0=$(counters | tr "\n" " ")
        c0=$(cpu1); t0=$(now_ns); s0=$(sched)
        [ "$r" = 1 ] && profile auth
        out=$(/usr/bin/time -f "%U %S" -o "$TMP/client.time" taskset -c 1 dnsperf -s 127.0.0.1 -p "$PORT_MAGICDNS" \
            -d "$TMP/queries.txt" -l "$DUR" -c 8 -t 1 2>&1)
        s1=$(sched); t1=$(now_ns); c1=$(cpu1)
        k1=$(counters | tr "\n" " ")
        echo "$s0 $s1 $t0 $t1 $c0 $c1 $k0 $k1 $(tail -1 "$TMP/client.time")" >>"$TMP/alone.util"
        q=$(awk '/Queries per second/ {print int($4)}' <<<"$out")
        cost "$TMP/auth.cost" "$s0" "$s1" "$(awk '/Queries completed/ {print $3}' <<<"$out")"
        [ "${q:-0}" -gt "$best" ] && best=$q
    done
    echo "$best"
}

# flood_client NAMES SECONDS: $FLOOD qps of the names on core 1 (output in dnsperf's words). By
# default bench/flood.py, prebuilt queries sent with sendmmsg. Any flood takes 9-13% of core 1 at
# 20,000 qps (over loopback the receive path runs in the sender's context), which the
# authoritative dnsperf needed (it uses 98-99% of core 1 alone): the qps ratio measures the client
# too; see the "keeps" figure. DNS_FLOOD_CLIENT=dnsperf: the old flood client.
flood_client() {
    if [ "${DNS_FLOOD_CLIENT:-flood.py}" = dnsperf ]; then
        taskset -c 1 dnsperf -s 127.0.0.1 -p "$PORT_MAGICDNS" -d "$1" -l "$2" -c 8 -q 20000 -t 1 -Q "$FLOOD"
    else
        taskset -c 1 "$PY" "$ROOT/bench/flood.py" 127.0.0.1 "$PORT_MAGICDNS" "$1" "$FLOOD" "$2"
    fi
}

flood_only() {  # flood_only TAG: the flood alone; CPU per answered flood query into $TMP/TAG.cost
    local s0 s1
    s0=$(sched)
    flood_client "$TMP/flood2.txt" "$DUR" >"$TMP/flood-only.out" 2>&1 || true
    s1=$(sched)
    cost "$TMP/$1.cost" "$s0" "$s1" "$(awk '/Queries completed/ {print $3}' "$TMP/flood-only.out")"
}

auth_at_rate() {  # authoritative queries at the flood's rate: CPU per answer into $TMP/authrate.cost
    local s0 s1
    s0=$(sched)
    taskset -c 1 dnsperf -s 127.0.0.1 -p "$PORT_MAGICDNS" -d "$TMP/queries.txt" -l "$DUR" -c 8 -q 20000 -t 1 -Q "$FLOOD" \
        >"$TMP/auth-rate.out" 2>&1 || true
    s1=$(sched)
    cost "$TMP/authrate.cost" "$s0" "$s1" "$(awk '/Queries completed/ {print $3}' "$TMP/auth-rate.out")"
}

flooded() {  # flooded TAG: authoritative qps while $FLOOD qps of unique forwarded names arrive;
    # per round "run_ns0 wait_ns0 run_ns1 wait_ns1 auth_answers seconds flood_qps" into $TMP/TAG.share
    local best=0 q r fp s0 s1
    for r in $(seq "$ROUNDS"); do
        flood_client "$TMP/flood.txt" $((DUR + 2)) >"$TMP/flood.out" 2>&1 &
        fp=$!
        sleep 1
        k0=$(counters | tr "\n" " ")
        c0=$(cpu1); t0=$(now_ns); s0=$(sched)
        [ "$r" = 1 ] && profile "flood-$1"
        /usr/bin/time -f "%U %S" -o "$TMP/client.time" taskset -c 1 dnsperf -s 127.0.0.1 -p "$PORT_MAGICDNS" \
            -d "$TMP/queries.txt" -l "$DUR" -c 8 -t 1 >"$TMP/auth-flooded.out" 2>&1 || true
        s1=$(sched); t1=$(now_ns); c1=$(cpu1)
        k1=$(counters | tr "\n" " ")
        # per round: the server's CPU share of the window, core 1's busy share, datagrams read,
        # forwards started and queries shed in the window
        echo "$s0 $s1 $t0 $t1 $c0 $c1 $k0 $k1 $(tail -1 "$TMP/client.time")" >>"$TMP/$1.util"
        q=$(awk '/Queries per second/ {print int($4)}' "$TMP/auth-flooded.out")
        wait "$fp" || true
        echo "$s0 $s1 $(awk '/Queries completed/ {print $3}' "$TMP/auth-flooded.out") $DUR" \
            "$(awk '/Queries per second/ {print int($4)}' "$TMP/flood.out")" >>"$TMP/$1.share"
        [ "${q:-0}" -gt "$best" ] && best=$q
    done
    echo "$best"
}

echo "dns_overload.sh $(date -u +%FT%TZ), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); flood $FLOOD qps of unique names"
run_server "$PORT_UPSTREAM"
A0=$(auth)
auth_at_rate
A1=$(flooded live)
FLOOD_LIVE=$(grep -E "Queries per second|SERVFAIL|NOERROR|NXDOMAIN" "$TMP/flood.out" | tr -s ' ' | tr '\n' ';')
LOST_LIVE=$(grep -E "Queries lost" "$TMP/auth-flooded.out" | tr -s ' ')
flood_only live
kill "$SRV"; wait "$SRV" 2>/dev/null || true
run_server "$HOLE"
A2=$(flooded hole)
FLOOD_HOLE=$(grep -E "Queries per second|SERVFAIL|NOERROR|NXDOMAIN" "$TMP/flood.out" | tr -s ' ' | tr '\n' ';')
LOST_HOLE=$(grep -E "Queries lost" "$TMP/auth-flooded.out" | tr -s ' ')
flood_only hole
kill "$SRV"; wait "$SRV" 2>/dev/null || true
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" - "$A0" "$A1" "$A2" "$TMP" "$FLOOD" <<'PY'
import os, statistics, sys
a0, a1, a2 = (int(x) for x in sys.argv[1:4])
tmp = sys.argv[4]

def cost(tag):
    rows = [line.split() for line in open(f"{tmp}/{tag}.cost")]
    return statistics.median(float(r[0]) for r in rows), max(float(r[1]) for r in rows)

print(f"{'authoritative qps, one core':44} {a0:>8}")
print(f"{'  with a flood toward a live upstream':44} {a1:>8}  {a1 / a0:5.2f}x")
print(f"{'  with a flood toward a silent upstream':44} {a2:>8}  {a2 / a0:5.2f}x   (target >= 0.80x)")
(ca, wa), (cr, wr), (cl, wl), (ch, wh) = cost("auth"), cost("authrate"), cost("live"), cost("hole")
print("server CPU per answered query (schedstat run time / answers), immune to other load:")
print(f"{'  authoritative, full load':44} {ca:8.1f} us")
print(f"{'  authoritative, at the flood rate':44} {cr:8.1f} us   (the same batch sizes as the floods below)")
print(f"{'  flood, live upstream (forwarded or shed)':44} {cl:8.1f} us  {cl / cr:5.2f}x of the line above")
print(f"{'  flood, silent upstream (shed at the cap)':44} {ch:8.1f} us  {ch / cr:5.2f}x")
# What a flooding query costs the server while authoritative queries keep it busy (full batches,
# behind): its CPU in the flooded window less what the authoritative answers of that window cost at
# full load, per flooding query. A server that the authoritative load alone saturates then keeps
# 1 - FLOOD * that cost of its answers. CPU time, so other load on the machine does not count; but
# the authoritative client must still have kept the server busy (few queries lost, below).
def flooding(tag):  # per round: the flooding queries the server saw in the window (its counters)
    out = []
    for line in open(f"{tmp}/{tag}.util"):
        v = list(map(int, line.split()[:-2]))
        out.append((v[17] - v[11]) + (v[18] - v[12]) + (v[19] - v[13]))  # forwarded, shed, cache answers
    return out

def under_load(tag):
    rows = [list(map(int, line.split())) for line in open(f"{tmp}/{tag}.share")]
    costs = [max(0.0, (r1 - r0) / 1e3 - n * ca) / max(1, seen or secs * fq)
             for (r0, _, r1, _, n, secs, fq), seen in zip(rows, flooding(tag))]
    return statistics.median(costs)

flood_qps = int(sys.argv[5])
ul, uh = under_load("live"), under_load("hole")
print(f"server CPU per flooding query beside full authoritative load, and what a saturated server keeps:")
print(f"{'  live upstream':44} {ul:8.1f} us  {ul / ca:5.2f}x   keeps {1 - flood_qps * ul / 1e6:4.2f}x")
print(f"{'  silent upstream':44} {uh:8.1f} us  {uh / ca:5.2f}x   keeps {1 - flood_qps * uh / 1e6:4.2f}x")
def util(tag):
    for line in open(f"{tmp}/{tag}.util"):
        *ints, user, system = line.split()
        (r0, w0, r1, w1, t0, t1, b0, a0_, b1, a1_, u0, f0, o0, h0, k0, x0,
         u1, f1, o1, h1, k1, x1) = map(int, ints)
        wall = max(1, t1 - t0)
        ticks = max(1, a1_ - a0_)
        secs = wall / 1e9
        client = (float(user) + float(system)) * 100 / ticks  # seconds -> ticks (USER_HZ 100)
        busy, knot, flood = (b1 - b0) / ticks, (k1 - k0) / ticks, (x1 - x0) / ticks
        print(f"  {tag:6} server ran {(r1 - r0) / wall:4.0%} of the window (waited {(w1 - w0) / wall:4.0%});"
              f" core 1 busy {busy:4.0%}: auth client {client:4.0%}, knotd {knot:4.0%}, flood client {flood:4.0%},"
              f" anything else {max(0.0, busy - client - knot - flood):4.0%}")
        print(f"  {'':6} per second: {(u1 - u0) / secs:6.0f} datagrams, {(f1 - f0) / secs:5.0f} forwards,"
              f" {(o1 - o0) / secs:5.0f} shed, {(h1 - h0) / secs:5.0f} cache answers")

print("measuring windows (server on core 0; the clients and knotd on core 1):")
util("alone")
util("live")
util("hole")
print(f"flood client: {os.environ.get('DNS_FLOOD_CLIENT', 'flood.py')}")
print(f"busy machine: the server waited for a CPU up to {max(wa, wr, wl, wh):.0%} of the time it was runnable"
      " (qps ratios are only meaningful when this is near 0%)")
PY
echo "flood, live upstream: $FLOOD_LIVE"
echo "flood, silent upstream: $FLOOD_HOLE"
echo "authoritative client under the flood (last round), live upstream: $LOST_LIVE; silent upstream: $LOST_HOLE"
