#!/bin/sh
# Scale benchmark (run by hand; loopback only; every phase bounded): three control replicas on a
# throw-away PostgreSQL beside one SQLite server, in the same run, each loaded with N simulated nodes
# (the real map-stream client, no tunnels): registration rate, a policy change / a record / a rename
# reaching the nodes (p50/p99), endpoint churn with each server's CPU, RSS per server, and how fast
# (and whether by resuming) a killed replica's nodes get their map from another.
#   bench/scale.sh [--nodes N] [--groups G] [--workers W] [--churn R] [--churn-seconds S] [--resume-wait S] [--only pg|sqlite]
#                  [--client-gc off|freeze|normal] [--pyspy PATH-TO-PY-SPY [--pyspy-client]]   (per change it also prints where the time went: see README)
# Defaults: 10000 nodes in 100 users (autogroup:self), 4 client processes (uvloop), churn 100/s for 20 s.
set -eu
cd "$(dirname "$0")/.."
exec .venv/bin/python bench/scale_bench.py "$@"
