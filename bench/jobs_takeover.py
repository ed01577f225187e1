"""How long the once-per-tailnet jobs stay unrun when the replica running them dies (control/jobs.py).

Run by hand: `.venv/bin/python bench/jobs_takeover.py [--trials N]`. Starts a throw-away
PostgreSQL (tests/pg.py) and two `meshnode control serve --replica-id --ephemeral-grace 2s`
processes; N times, kills the replica holding the ephemeral-removal job with SIGKILL, times until
the survivor's log says it runs the job, and starts a fresh replica. The job tick is min(5 s, grace / 2), so the takeover is bounded
by one tick plus PostgreSQL noticing the dead session (immediate when the process dies).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.test_control_jobs import Replica  # noqa: E402
from tests.pg import PostgresServer  # noqa: E402
from tests.support import wait_until  # noqa: E402

RUNS = "job ephemeral-removal: this replica runs it"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()
    pg = PostgresServer.start()
    replicas: list[Replica] = []
    try:
        url = pg.fresh_database()
        tmp = Path(tempfile.mkdtemp(prefix="jobs-bench-"))
        replicas = [Replica(url, "r0", tmp), Replica(url, "r1", tmp)]
        holder = wait_until(lambda: next((r for r in replicas if RUNS in r.text()), None), timeout=15)
        other = next(r for r in replicas if r is not holder)
        took = []
        for trial in range(args.trials):
            t0 = time.monotonic()
            holder.kill()
            wait_until(lambda: RUNS in other.text(), timeout=30)
            took.append(time.monotonic() - t0)
            fresh = Replica(url, f"x{trial}", tmp)
            replicas.append(fresh)
            holder, other = other, fresh
        print(f"job takeover after SIGKILL of its replica ({args.trials} trials, --ephemeral-grace 2s, tick 1 s):"
              f" median {statistics.median(took):.2f} s, max {max(took):.2f} s")
    finally:
        for r in replicas:
            r.kill()
        pg.stop()


if __name__ == "__main__":
    main()
