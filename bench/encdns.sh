#!/usr/bin/env bash
# Encrypted DNS benchmark, run by hand (not a test): dnsperf over TCP, DoT and DoH against
# `magicdns serve --dot/--doh` and against unbound (Debian's build serves DoT and DoH), both answering
# the same local names from memory, one core each (taskset), dnsperf on the other core; then the
# latency DoT and DoH add over plain TCP at a light fixed rate. Prints one table.
#
#   bench/encdns.sh                          (traffic stays on 127.0.0.1)
#   ENCDNS_BENCH_SECONDS=10 bench/encdns.sh
#
# Every dnsperf run is bounded (-l). Servers are started here and killed on exit; files live in one
# mktemp directory, removed on exit. unbound answers from local-data rather than sitting in front of
# nsd: the comparison is of the TLS and HTTP layers, and both servers then answer from memory.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
DUR=${ENCDNS_BENCH_SECONDS:-8}
RATE=${ENCDNS_BENCH_LATENCY_QPS:-500}
CLIENTS=${ENCDNS_BENCH_CLIENTS:-16}
export PATH="$PATH:/usr/sbin:/sbin"
for tool in dnsperf unbound taskset; do
    command -v "$tool" >/dev/null || { echo "encdns.sh: $tool is not installed" >&2; exit 2; }
done

TMP=$(mktemp -d /tmp/encdns-bench.XXXXXX)
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

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
M_DNS=$(free_port); M_DOT=$(free_port); M_DOH=$(free_port)
U_DNS=$(free_port); U_DOT=$(free_port); U_DOH=$(free_port)

printf 'my-server.tailnet A\ndb.tailnet A\ngrafana.tailnet A\nmy-server.tailnet AAAA\n' > "$TMP/queries"

taskset -c 0 "$PY" -m magicdns.cli serve --listen "127.0.0.1:$M_DNS" --view "$ROOT/conf/view.json" \
    --control-socket "$TMP/m.sock" --resolv-conf "$TMP/none" --dot "127.0.0.1:$M_DOT" --doh "127.0.0.1:$M_DOH" \
    --tls-cert "$TMP/server.crt" --tls-key "$TMP/server.key" --max-tcp-connections 4096 \
    --log-level warning > "$TMP/magicdns.log" 2>&1 &
PIDS+=($!)
cat > "$TMP/unbound.conf" <<EOF
server:
  interface: 127.0.0.1@$U_DNS
  interface: 127.0.0.1@$U_DOT
  interface: 127.0.0.1@$U_DOH
  port: $U_DNS
  tls-port: $U_DOT
  https-port: $U_DOH
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
PIDS+=($!)

wait_port() {  # wait_port PORT: until something accepts TCP on it (deadline 15 s)
    for _ in $(seq 150); do
        "$PY" -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1',$1)))" && return 0
        sleep 0.1
    done
    echo "encdns.sh: nothing listens on $1" >&2; cat "$TMP"/*.log >&2; exit 1
}
for p in $M_DOT $M_DOH $U_DOT $U_DOH; do wait_port "$p"; done

# run NAME MODE PORT [extra dnsperf args]: one bounded dnsperf run on core 1; prints "qps avg_ms"
run() {
    local out
    out=$(taskset -c 1 dnsperf -s 127.0.0.1 -p "$3" -m "$2" -d "$TMP/queries" -l "$DUR" -c "$CLIENTS" \
          -O doh-uri=https://dns.test/dns-query "${@:4}" 2>&1) || true
    local qps avg lost
    qps=$(awk '/Queries per second/ {print $4}' <<<"$out")
    avg=$(awk '/Average Latency/ {print $4 * 1000}' <<<"$out")
    lost=$(awk '/Queries lost/ {print $3}' <<<"$out")
    echo "${qps:-0} ${avg:-nan} ${lost:-?}"
}

declare -A R
for server in magicdns unbound; do
    for mode in tcp dot doh; do
        case "$server/$mode" in
            magicdns/tcp) port=$M_DNS;; magicdns/dot) port=$M_DOT;; magicdns/doh) port=$M_DOH;;
            unbound/tcp) port=$U_DNS;; unbound/dot) port=$U_DOT;; unbound/doh) port=$U_DOH;;
        esac
        log "max load: $server $mode"
        R[$server/$mode/max]=$(run "$server" "$mode" "$port")
        log "latency at $RATE qps: $server $mode"
        R[$server/$mode/lat]=$(run "$server" "$mode" "$port" -Q "$RATE")
    done
done

printf '\n%-10s %-5s %12s %14s %16s %10s\n' server mode "qps(1 core)" "vs unbound" "avg ms @${RATE}qps" "added ms"
for server in magicdns unbound; do
    read -r tcp_q tcp_l _ <<<"${R[$server/tcp/lat]}"
    for mode in tcp dot doh; do
        read -r q _ lost <<<"${R[$server/$mode/max]}"
        read -r _ l _ <<<"${R[$server/$mode/lat]}"
        read -r uq _ _ <<<"${R[unbound/$mode/max]}"
        ratio=$(awk -v a="$q" -v b="$uq" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }')
        added=$(awk -v a="$l" -v b="$tcp_l" 'BEGIN { printf "%+.3f", a - b }')
        printf '%-10s %-5s %12.0f %14s %16.3f %10s\n' "$server" "$mode" "$q" "$ratio" "$l" "$added"
    done
done
echo
echo "qps: dnsperf -c $CLIENTS for ${DUR}s against one core; latency: dnsperf's average at -Q $RATE;"
echo "added: over plain TCP to the same server (persistent connections throughout)."
