"""The home relay region, chosen by measured latency (sans-I/O: latencies and `now` in, a region
id out).

Netcheck's `preferred_region` already keeps the old home unless another region is a third faster.
This adds what a node running for days needs on top of one run's answer:
- a minimum dwell: after a move the home stays put for MIN_DWELL even if a later run prefers
  another region (one noisy run must not move every peer's relay traffic twice);
- a home that stops answering STUN is left at once (dwell or not): it is likely down;
- stale measurements (older than STALE) are forgotten, and with none fresh, or none for a region
  of the current relay map (UDP blocked: DERP over TCP still works), the home stays where it is,
  or is the map's first region when there is none yet;
- a region that left the relay map is never the home.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from ..netcheck import preferred_region

MIN_DWELL = 300.0   # seconds a new home is kept before another measurement may move it
STALE = 600.0       # seconds after which a measurement no longer counts


class HomeRegion:
    def __init__(self, min_dwell: float = MIN_DWELL, stale_after: float = STALE) -> None:
        self.min_dwell = min_dwell
        self.stale_after = stale_after
        self.home: int | None = None
        self._since = float("-inf")           # when the home last changed
        self._latency: dict[int, float] = {}  # the last measurement (ms per region)
        self._measured_at: float | None = None

    def measured(self, latency_ms: Mapping[int, float], now: float) -> None:
        """One netcheck run's per-region latency (regions that answered)."""
        self._latency = {int(r): float(ms) for r, ms in latency_ms.items()}
        self._measured_at = now

    def choose(self, regions: Sequence[int], now: float) -> int | None:
        """The home among `regions` (the relay map's region ids, in map order) at `now`."""
        regions = [int(r) for r in regions]
        if not regions:
            return self._set(None, now)
        current = self.home if self.home in regions else None
        fresh = self._measured_at is not None and now - self._measured_at <= self.stale_after
        latency = {r: ms for r, ms in self._latency.items() if r in regions} if fresh else {}
        if not latency:
            # Not a measured choice: it starts no dwell, so the first measurement moves it at once.
            home = current if current is not None else regions[0]
            if home != self.home:
                self.home, self._since = home, float("-inf")
            return home
        best = preferred_region(latency, current)
        if current is not None and best != current and current in latency \
                and now - self._since < self.min_dwell:
            return current  # answered, and moved too recently to move again
        return self._set(best, now)

    def _set(self, home: int | None, now: float) -> int | None:
        if home != self.home:
            self.home, self._since = home, now
        return home
