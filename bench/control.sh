#!/bin/sh
# Coordination-server benchmark (run by hand; loopback only; every phase bounded in count and time):
# registration rate of 10,000 simulated nodes, time for one change to reach every connected map
# stream, server memory, and the time a node takes to turn a 10,000-node map into its DNS view.
#   bench/control.sh [--nodes N] [--streams S] [--workers W] [--deadline SECONDS]
# Defaults: 10000 nodes, 1000 streams, 2 client processes, 600 s per phase.
set -eu
cd "$(dirname "$0")/.."
exec .venv/bin/python bench/control_bench.py "$@"
