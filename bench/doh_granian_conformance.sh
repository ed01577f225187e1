#!/usr/bin/env bash
# The DoH listener's own tests, run against the granian spike instead of the h2 listener (issue 12):
# which of the listener's properties granian keeps and which it cannot give (README, "DoH on
# granian"). Run by hand, not part of the suite (some of these tests are expected to fail here).
#
#   bench/doh_granian_conformance.sh            (about 2 minutes; loopback only, as the tests are)
#   bench/doh_granian_conformance.sh -k slot    (extra pytest arguments)
#
# Every Python process of the run (pytest and the `magicdns serve` processes the tests start) loads a
# sitecustomize.py that imports bench/doh_granian_serve.py, which swaps granian in for the DoH half
# of EncryptedListeners. Nothing is changed in the tree.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
TMP=$(mktemp -d /tmp/doh-granian-conf.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
cat > "$TMP/sitecustomize.py" <<PYEOF
import sys
sys.path.insert(0, "$ROOT/bench")
import doh_granian_serve  # noqa: E402,F401  (patches magicdns.encrypted.EncryptedListeners)
PYEOF
cd "$ROOT"
PYTHONPATH="$TMP${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pytest -q -p no:cacheprovider --timeout 60 -rf \
    tests/integration/test_encrypted_dns.py tests/integration/test_doh_http2.py \
    tests/integration/test_encrypted_dns_abuse.py tests/integration/test_encrypted_dns_admission.py "$@" || true
