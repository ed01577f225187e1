#!/usr/bin/env bash
# Instructions per query, counted by callgrind (repeatable on a busy shared machine, where qps and
# CPU time are noise): each server runs under valgrind --tool=callgrind, is sent N1 and then N2
# queries of the bench mix by dnsperf at a gentle fixed rate, and the difference of its total
# instruction counts divided by N2-N1 is its cost per query (start-up and idle work cancel out).
# User-space instructions only (the kernel's share, similar for all, is not counted).
#
# The cost per query depends on how full each recvmmsg batch is, so queries are sent faster than a
# server under valgrind answers (RATE), as at full load; the count is what the server answered
# (magicdns's driver reports it, for the others dnsperf's "Queries completed").
#
#   bench/dns_instr.sh                 (magicdns and nsd; SERVERS="magicdns nsd knot" for more)
#   N1=2000 N2=8000 bench/dns_instr.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
MAGICDNS=${MAGICDNS:-$ROOT/.venv/bin/magicdns}
HELPER="$ROOT/bench/dns_bench.py"
N1=${N1:-2000}
N2=${N2:-8000}
RATE=${RATE:-20000}
WARM=20000  # the whole query file first: every question's reply built and memoised before counting
SERVERS=${SERVERS:-magicdns nsd}
export PATH="$PATH:/usr/sbin:/sbin"
for tool in valgrind callgrind_annotate dnsperf nsd dig; do
    command -v "$tool" >/dev/null || { echo "dns_instr.sh: $tool is not installed" >&2; exit 2; }
done

TMP=$(mktemp -d /tmp/dns-instr.XXXXXX)
PID=""
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 200 names: the first answer to each question is built with dnslib (~0.4 ms natively, far more
# under valgrind); with fewer names the warm-up pass that absorbs that stays short.
"$PY" "$HELPER" gen "$TMP" --hosts 200 2>/dev/null
# shellcheck disable=SC1091
. "$TMP/ports.env"

cmd_for() {  # cmd_for SERVER -> the command line and its port
    case $1 in
        # The listener and engine alone (bench/dns_loop.py): `magicdns serve` idles at a cost that
        # grows with the run's length under valgrind (timers, the view watcher), which N1/N2 would
        # not cancel. It exits 3 s after the last query and says how many it served.
        magicdns) echo "$PORT_MAGICDNS $PY -u $ROOT/bench/dns_loop.py $TMP/view.json $PORT_MAGICDNS" ;;
        nsd) echo "$PORT_NSD nsd -d -c $TMP/nsd1/nsd.conf" ;;
        knot) echo "$PORT_KNOT knotd -c $TMP/knot1/knot.conf" ;;
        *) echo "unknown server $1" >&2; exit 2 ;;
    esac
}

total_ir() {  # total_ir DIR: sum of the instruction totals of every callgrind.out.* in DIR
    local sum=0 f n
    for f in "$1"/callgrind.out.*; do
        n=$(grep -m1 '^totals:\|^summary:' "$f" | awk '{print $2}')
        sum=$((sum + ${n:-0}))
    done
    echo "$sum"
}

one_run() {  # one_run SERVER N -> "total-instructions queries-answered"
    local server=$1 n=$2 port cmd dir
    read -r port cmd <<<"$(cmd_for "$server" "$n")"
    dir="$TMP/$server-$n"
    mkdir -p "$dir"
    head -n "$n" "$TMP/queries.txt" >"$dir/q.txt"
    # shellcheck disable=SC2086
    valgrind --tool=callgrind --trace-children=yes --callgrind-out-file="$dir/callgrind.out.%p" $cmd \
        >"$dir/log" 2>&1 &
    PID=$!
    local deadline=$((SECONDS + 120))
    until grep -q . "$dir/log" 2>/dev/null && dig +time=2 +tries=1 +short -p "$port" @127.0.0.1 host-1.tailnet A 2>/dev/null | grep -q '^[^;]'; do
        [ $SECONDS -le $deadline ] && kill -0 "$PID" 2>/dev/null || { echo "$server did not start" >&2; cat "$dir/log" >&2; exit 1; }
        sleep 0.5
    done
    dnsperf -s 127.0.0.1 -p "$port" -d "$TMP/queries.txt" -n 1 -c 4 -Q "$RATE" -t 10 >"$dir/warm.out" 2>&1 || true
    dnsperf -s 127.0.0.1 -p "$port" -d "$dir/q.txt" -n 1 -c 4 -Q "$RATE" -t 10 >"$dir/dnsperf.out" 2>&1 || true
    local served
    if [ "$server" = magicdns ]; then
        for _ in $(seq 600); do grep -q '^served' "$dir/log" && break; sleep 0.5; done
        served=$(awk '/^served/ {print $2}' "$dir/log")
    else
        kill -TERM "$PID" 2>/dev/null || true
        served=$(( $(awk '/Queries completed/ {print $3}' "$dir/dnsperf.out") \
                   + $(awk '/Queries completed/ {print $3}' "$dir/warm.out") + 1 ))
    fi
    wait "$PID" 2>/dev/null || true
    PID=""
    echo "$(total_ir "$dir") $served"
}

printf "%-10s %14s %8s %14s %8s %12s\n" server "Ir(run 1)" answered "Ir(run 2)" answered "Ir/query"
for s in $SERVERS; do
    read -r a qa <<<"$(one_run "$s" "$N1")"
    read -r b qb <<<"$(one_run "$s" "$N2")"
    printf "%-10s %14s %8s %14s %8s %12.0f\n" "$s" "$a" "$qa" "$b" "$qb" "$(echo "($b - $a) / ($qb - $qa)" | bc -l)"
done
