#!/bin/sh
# Scale benchmark (run by hand; loopback only; every phase bounded): three control replicas on a
# throw-away PostgreSQL beside one SQLite server, in the same run: registration rate, a rename and a
# record reaching every map stream (p50/p99), RSS per server, a killed replica's nodes shown offline.
#   bench/scale.sh [--nodes N] [--streams S] [--workers W] [--deadline SECONDS]
# Defaults: 10000 nodes, 3000 streams, 3 client processes, 600 s per phase.
set -eu
cd "$(dirname "$0")/.."
exec .venv/bin/python bench/scale_bench.py "$@"
