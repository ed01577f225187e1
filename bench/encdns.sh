#!/usr/bin/env bash
# Encrypted DNS benchmark, run by hand (not a test), as issue 12 asks: dnsperf over plain TCP, DoT
# (-m dot) and DoH (-m doh) against `magicdns serve --dot/--doh` and against dnsdist in front of nsd
# (Debian's dnsdist 1.7 serves DoT with OpenSSL and DoH with h2o: `dnsdist --version`), in the same
# run, each server side on one core (taskset -c 0; dnsdist and nsd share it), the clients on the
# other; rounds interleaved, MEDIANS kept. DoH is also driven by h2load (nghttp2), the figure the
# ratios use: dnsperf 2.10's DoH client loses replies that share a TLS record, and both dnsdist and
# magicdns pack the replies to one read into one record (row dnsperf-doh: lost).
# Then the latency DoT and DoH add over plain TCP: one connection at a light fixed rate, the median
# of the per-query latencies (dnsperf -v, h2load --log-file). Prints one table.
#
#   bench/encdns.sh                                   (traffic stays on 127.0.0.1; about 5 minutes)
#   ENCDNS_BENCH_SECONDS=8 ENCDNS_BENCH_ROUNDS=5 bench/encdns.sh
#   ENCDNS_BENCH_UNBOUND=1 bench/encdns.sh            (adds unbound 1.17, which serves DoT and DoH; ~7 min)
#
# Both servers answer the same names from memory: magicdns from conf/view.json, nsd from the same
# records as a zone file, behind dnsdist's packet cache (as dnsdist is deployed; its hit rate here is
# ~100%, so nsd is barely asked). Every dnsperf run is bounded (-l); servers are started here and
# killed on exit; files live in one mktemp directory, removed on exit. The qps of a busy machine
# moves with its load: the table prints the load average, and CPU per query (from /proc, the server
# side's process tree) is the steadier figure.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
HELPER="$ROOT/bench/dns_bench.py"
DUR=${ENCDNS_BENCH_SECONDS:-5}              # seconds per max-load run
ROUNDS=${ENCDNS_BENCH_ROUNDS:-3}            # interleaved rounds; the table keeps the median
LAT_DUR=${ENCDNS_BENCH_LATENCY_SECONDS:-4}  # seconds per latency run
RATE=${ENCDNS_BENCH_LATENCY_QPS:-200}       # fixed rate of the latency runs, on one connection
CLIENTS=${ENCDNS_BENCH_CLIENTS:-16}         # dnsperf connections in the max-load runs
export PATH="$PATH:/usr/sbin:/sbin"
for tool in dnsperf h2load dnsdist nsd taskset; do
    command -v "$tool" >/dev/null || { echo "encdns.sh: $tool is not installed" >&2; exit 2; }
done
SERVERS=(magicdns dnsdist)
[ "${ENCDNS_BENCH_UNBOUND:-0}" = 1 ] && SERVERS+=(unbound)
if [ "${ENCDNS_BENCH_UNBOUND:-0}" = 1 ]; then command -v unbound >/dev/null || { echo "encdns.sh: unbound is not installed" >&2; exit 2; }; fi
dnsdist --version | grep -q 'dns-over-https' || { echo "encdns.sh: this dnsdist has no DoH" >&2; exit 2; }

TMP=$(mktemp -d /tmp/encdns-bench.XXXXXX)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    [ "${ENCDNS_BENCH_KEEP:-0}" = 1 ] && echo "encdns.sh: kept $TMP" >&2 || rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
log() { echo "[$(date +%T)] $*" >&2; }

# A test CA and a certificate for dns.test (the tailnet CA code makes them; dnsperf does not verify).
"$PY" - "$TMP" <<'EOF'
import sys, time
from pathlib import Path
from meshnode.control import ca
d = Path(sys.argv[1])
t = ca.create_ca("test", time.time())
key = ca.new_key_pem()
cert = ca.issue(t, ca.public_key_from_csr(ca.make_csr(key, "dns.test")), ca.LeafNames(("dns.test",), ()), time.time())
(d / "server.key").write_text(key); (d / "server.crt").write_text(cert); (d / "ca.pem").write_text(t.cert_pem)
EOF
chmod 644 "$TMP/server.key"

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
declare -A PORT
for s in magicdns dnsdist unbound; do
    for m in tcp dot doh; do PORT[$s/$m]=$(free_port); done
done
NSD_PORT=$(free_port)

printf 'my-server.tailnet A\ndb.tailnet A\ngrafana.tailnet A\nmy-server.tailnet AAAA\n' > "$TMP/queries"
for s in magicdns dnsdist unbound; do  # the same four queries as RFC 8484 GETs (ID 0), for h2load
    "$PY" - "${PORT[$s/doh]}" "$TMP/queries" > "$TMP/uris.$s" <<'EOF'
import base64, sys
import dns.message
for line in open(sys.argv[2]):
    name, rtype = line.split()
    q = dns.message.make_query(name, rtype, use_edns=False)
    q.id = 0
    print(f"https://127.0.0.1:{sys.argv[1]}/dns-query?dns=" + base64.urlsafe_b64encode(q.to_wire()).decode().rstrip("="))
EOF
done

# -- servers -------------------------------------------------------------------------------------
declare -A PID
taskset -c 0 "$PY" -m magicdns.cli serve --listen "127.0.0.1:${PORT[magicdns/tcp]}" --view "$ROOT/conf/view.json" \
    --control-socket "$TMP/m.sock" --resolv-conf "$TMP/none" --dot "127.0.0.1:${PORT[magicdns/dot]}" \
    --doh "127.0.0.1:${PORT[magicdns/doh]}" --tls-cert "$TMP/server.crt" --tls-key "$TMP/server.key" \
    --max-tcp-connections 4096 --log-level warning > "$TMP/magicdns.log" 2>&1 &
PID[magicdns]=$!; PIDS+=($!)

mkdir -p "$TMP/nsd"
cat > "$TMP/nsd/tailnet.zone" <<'EOF'
$ORIGIN tailnet.
$TTL 300
@          IN SOA ns.tailnet. hostmaster.tailnet. 1 3600 600 86400 60
@          IN NS  ns.tailnet.
ns         IN A   100.64.0.1
my-server  IN A   100.64.0.2
my-server  IN AAAA fd7a:115c:a1e0::2
db         IN A   100.64.0.3
db         IN A   100.64.0.4
grafana 60 IN CNAME my-server.tailnet.
EOF
cat > "$TMP/nsd/nsd.conf" <<EOF
server:
  ip-address: 127.0.0.1@$NSD_PORT
  port: $NSD_PORT
  server-count: 1
  username: ""
  chroot: ""
  zonesdir: "$TMP/nsd"
  database: ""
  pidfile: "$TMP/nsd/nsd.pid"
  xfrdfile: "$TMP/nsd/xfrd.state"
  zonelistfile: "$TMP/nsd/zone.list"
  verbosity: 0
remote-control:
  control-enable: no
zone:
  name: tailnet
  zonefile: tailnet.zone
EOF
taskset -c 0 nsd -d -c "$TMP/nsd/nsd.conf" > "$TMP/nsd.log" 2>&1 &
PID[nsd]=$!; PIDS+=($!)

cat > "$TMP/dnsdist.conf" <<EOF
setACL({"127.0.0.0/8"})
setLocal("127.0.0.1:${PORT[dnsdist/tcp]}")
addTLSLocal("127.0.0.1:${PORT[dnsdist/dot]}", "$TMP/server.crt", "$TMP/server.key", {provider="openssl"})
addDOHLocal("127.0.0.1:${PORT[dnsdist/doh]}", "$TMP/server.crt", "$TMP/server.key", "/dns-query")
newServer({address="127.0.0.1:$NSD_PORT", checkName="my-server.tailnet.", checkInterval=1})
pc = newPacketCache(10000)
getPool(""):setCache(pc)
EOF
taskset -c 0 dnsdist --supervised --disable-syslog -C "$TMP/dnsdist.conf" > "$TMP/dnsdist.log" 2>&1 &
PID[dnsdist]=$!; PIDS+=($!)

if [ "${ENCDNS_BENCH_UNBOUND:-0}" = 1 ]; then
    cat > "$TMP/unbound.conf" <<EOF
server:
  interface: 127.0.0.1@${PORT[unbound/tcp]}
  interface: 127.0.0.1@${PORT[unbound/dot]}
  interface: 127.0.0.1@${PORT[unbound/doh]}
  port: ${PORT[unbound/tcp]}
  tls-port: ${PORT[unbound/dot]}
  https-port: ${PORT[unbound/doh]}
  tls-service-key: "$TMP/server.key"
  tls-service-pem: "$TMP/server.crt"
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "$TMP"
  pidfile: ""
  use-syslog: no
  logfile: ""
  num-threads: 1
  incoming-num-tcp: 4096
  do-ip6: no
  access-control: 127.0.0.0/8 allow
  module-config: "iterator"
  local-zone: "tailnet." static
  local-data: "my-server.tailnet. 300 IN A 100.64.0.2"
  local-data: "my-server.tailnet. 300 IN AAAA fd7a:115c:a1e0::2"
  local-data: "db.tailnet. 300 IN A 100.64.0.3"
  local-data: "db.tailnet. 300 IN A 100.64.0.4"
  local-data: "grafana.tailnet. 60 IN CNAME my-server.tailnet."
EOF
    taskset -c 0 unbound -d -c "$TMP/unbound.conf" > "$TMP/unbound.log" 2>&1 &
    PID[unbound]=$!; PIDS+=($!)
fi

wait_answer() {  # wait_answer SERVER: until its plain TCP port answers a query (deadline 20 s)
    local port=${PORT[$1/tcp]}
    for _ in $(seq 200); do
        if dnsperf -s 127.0.0.1 -p "$port" -m tcp -d "$TMP/queries" -n 1 -t 1 2>/dev/null | grep -q 'NOERROR 4'; then
            return 0
        fi
        sleep 0.1
    done
    echo "encdns.sh: $1 does not answer on $port" >&2; cat "$TMP"/*.log >&2; exit 1
}
for s in "${SERVERS[@]}"; do wait_answer "$s"; done
# Threads started after launch (dnsdist's per-listener threads, nsd's forked server) stay on core 0.
for s in "${SERVERS[@]}" nsd; do
    for p in ${PID[$s]} $(ps -o pid= --ppid "${PID[$s]}"); do taskset -a -p -c 0 "$p" >/dev/null; done
done

cpu() {  # CPU ticks of a server's process tree (dnsdist's includes nsd's: they are one server side)
    local t
    t=$("$PY" "$HELPER" cpu "${PID[$1]}")
    [ "$1" = dnsdist ] && t=$((t + $("$PY" "$HELPER" cpu "${PID[nsd]}")))
    echo "$t"
}
RESULTS="$TMP/results.jsonl"
alive() {
    local p
    for p in "$@"; do
        kill -0 "${PID[$p]}" 2>/dev/null || { echo "encdns.sh: $p died:" >&2; cat "$TMP/$p.log" >&2; exit 1; }
    done
}
# run SERVER MODE KIND [dnsperf args]: one bounded dnsperf run on core 1, its figures appended as JSON.
# MODE dnsperf-doh is dnsperf's -m doh.
run() {
    local s=$1 m=$2 kind=$3 t0 t1
    shift 3
    t0=$(cpu "$s")
    taskset -c 1 dnsperf -s 127.0.0.1 -p "${PORT[$s/${m#dnsperf-}]}" -m "${m#dnsperf-}" -d "$TMP/queries" \
        -O doh-uri=https://dns.test/dns-query "$@" > "$TMP/dnsperf.out" 2>&1 || true
    t1=$(cpu "$s")
    "$PY" "$HELPER" parse "$TMP/dnsperf.out" "$s $m $kind" $((t1 - t0)) >> "$RESULTS"
    tail -1 "$RESULTS" | cut -c1-150 >&2
    alive "$s"
}
# run_h2 SERVER KIND [h2load args]: DoH GETs with h2load (nghttp2), which reads every reply however
# the server packs them into TLS records; dnsperf 2.10's DoH client takes one reply per record and
# loses the rest, so it cannot measure dnsdist (h2o coalesces replies). Bounded by -D.
run_h2() {
    local s=$1 kind=$2 t0 t1
    shift 2
    rm -f "$TMP/h2load.log"
    t0=$(cpu "$s")
    taskset -c 1 h2load -i "$TMP/uris.$s" --log-file="$TMP/h2load.log" "$@" > "$TMP/h2load.out" 2>&1 || true
    t1=$(cpu "$s")
    "$PY" "$ROOT/bench/encdns_table.py" --h2load "$TMP/h2load.out" "$TMP/h2load.log" "$s doh $kind" $((t1 - t0)) >> "$RESULTS"
    tail -1 "$RESULTS" | cut -c1-150 >&2
    alive "$s"
}

modes() { echo tcp dot dnsperf-doh; }
for s in "${SERVERS[@]}"; do  # warm: connections, caches, the reply memo
    for m in $(modes "$s"); do run "$s" "$m" warm -l 1 -c 4 2>/dev/null; done
    run_h2 "$s" warm -c 4 -m 10 -D 1 2>/dev/null
done
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
for r in $(seq "$ROUNDS"); do
    log "round $r of $ROUNDS"
    for s in "${SERVERS[@]}"; do
        for m in $(modes "$s"); do run "$s" "$m" max -l "$DUR" -c "$CLIENTS"; done
        run_h2 "$s" max -c "$CLIENTS" -m 10 -D "$DUR"
    done
    for s in "${SERVERS[@]}"; do
        for m in $(modes "$s"); do run "$s" "$m" lat -l "$LAT_DUR" -c 1 -Q "$RATE" -v; done
        run_h2 "$s" lat -c 1 -m 1 --rps "$RATE" -D "$LAT_DUR"
    done
done
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)

echo
echo "encdns.sh $(date -u +%FT%TZ) on $(uname -r), $(nproc) cores; load average $LOAD0 at start, $LOAD1 at end"
echo "$(dnsperf -h 2>&1 | grep Version | head -1 | sed 's/^/dnsperf /'); magicdns $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?');" \
     "$(dnsdist --version | head -1 | cut -d' ' -f1-2); $(nsd -v 2>&1 | head -1)"
echo "server side on core 0, clients on core 1; $ROUNDS interleaved rounds, medians; max load: -c $CLIENTS for ${DUR}s" \
     "(h2load: -m 10 streams each); latency: one connection at $RATE qps for ${LAT_DUR}s, median of per-query latencies;" \
     "doh = h2load $(h2load --version | cut -d/ -f2) GETs, dnsperf-doh = dnsperf -m doh"
"$PY" "$ROOT/bench/encdns_table.py" "$RESULTS" "${SERVERS[@]}"
