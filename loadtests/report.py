"""What a load test run says: its SLO verdict (pure, so tests and the sweep use it
without importing the gevent-patched locustfile)."""

from __future__ import annotations


def slo_violations(result: dict, p99_ms: float, error_rate: float) -> list[str]:
    """What is over its bound in a run's summary (empty: within the SLO). A bound of
    p99_ms <= 0 or error_rate < 0 is off."""
    broken = []
    if result["calls"] == 0:
        broken.append("no calls were made")
    if p99_ms > 0 and result["p99_ms"] > p99_ms:
        broken.append(f"p99 {result['p99_ms']:.1f} ms > {p99_ms:g} ms")
    if error_rate >= 0 and result["error_rate"] > error_rate:
        broken.append(f"error rate {result['error_rate']:.4f} > {error_rate:g}")
    return broken
