#!/bin/sh
# Relay benchmark (run by hand, as root): in one run on the same network namespaces, iperf3 TCP
# throughput and ping latency through a meshnode tunnel over the relay (DERP), over a direct path,
# and through a Debian wireguard-go pair (the reference, ratios against it); the relay server's CPU
# seconds per GB (from /proc/PID/stat); and the time from `meshnode up` to the first packet answered
# through the relay. Traffic stays inside the namespaces bench/relay_bench.py makes (and deletes).
#   bench/relay.sh [SECONDS]        (default 5 s per iperf3 run)
#   KEEP=1 bench/relay.sh           (keep the daemons' and relay's logs; their directory is printed)
set -eu
cd "$(dirname "$0")/.."
exec .venv/bin/python bench/relay_bench.py "${1:-5}"
