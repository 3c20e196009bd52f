"""The side trainer's Prometheus metrics and its one line per cycle.

Served by rank 0 at http://HOST:<--metrics-port>/metrics (prometheus-client's own HTTP
server, on a registry of its own so that tests can start several trainers in one
process). Names are prefixed `gem_trainer_`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

log = logging.getLogger(__name__)


@dataclass
class TrainerMetrics:
    registry: CollectorRegistry
    examples: Counter
    examples_per_s: Gauge
    loss: Gauge
    last_ne: Gauge
    last_auc: Gauge
    serving_version: Gauge
    last_publish: Gauge
    cycles: Counter
    failures: Counter
    quarantined: Counter
    cycle_seconds: Gauge
    pending_shards: Gauge

    @classmethod
    def create(cls) -> TrainerMetrics:
        r = CollectorRegistry()
        p = "gem_trainer_"
        return cls(
            registry=r,
            examples=Counter(f"{p}examples", "Examples trained on (all ranks).", registry=r),
            examples_per_s=Gauge(f"{p}examples_per_second", "Training throughput of the last cycle.", registry=r),
            loss=Gauge(f"{p}loss", "Mean training loss of the last cycle.", registry=r),
            last_ne=Gauge(f"{p}last_ne", "Candidate NE on the next shard (progressive).", ["task"], registry=r),
            last_auc=Gauge(f"{p}last_auc", "Candidate AUC on the next shard (progressive).", ["task"], registry=r),
            serving_version=Gauge(f"{p}serving_version", "Latest published version.", ["model"], registry=r),
            last_publish=Gauge(
                f"{p}last_publish_timestamp_seconds", "Unix time of the last publish.", ["model"], registry=r
            ),
            cycles=Counter(f"{p}cycles", "Cycles run, by outcome.", ["outcome"], registry=r),
            failures=Counter(f"{p}failures", "Failures, by stage (gate, export, load, data).", ["stage"], registry=r),
            quarantined=Counter(f"{p}quarantined_shards", "Shards moved aside as unreadable.", registry=r),
            cycle_seconds=Gauge(f"{p}cycle_seconds", "Wall time of the last cycle.", registry=r),
            pending_shards=Gauge(f"{p}pending_shards", "Shards waiting to be trained on.", registry=r),
        )

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
        log.info("trainer metrics at http://%s:%d/metrics", addr, port)


def cycle_line(
    cycle: int,
    shard: str,
    eval_shard: str,
    outcome: str,
    examples_per_s: float,
    loss: float,
    ne: dict[str, float],
    served_ne: dict[str, float] | None,
    versions: str,
    seconds: float,
) -> str:
    """One compact line per cycle, e.g. `cycle 3 part-00002.parquet -> eval part-00003.parquet:
    published | 5,120 ex/s loss 0.3012 | NE click 0.8123 (served 0.8250) conversion ... |
    gem_fm v4 student_adapter v5 | 12.3s`"""
    nes = " ".join(f"{t} {v:.4f}" + (f" (served {served_ne[t]:.4f})" if served_ne else "") for t, v in ne.items())
    return (
        f"cycle {cycle} {shard} -> eval {eval_shard}: {outcome} | {examples_per_s:,.0f} ex/s loss {loss:.4f} | "
        f"NE {nes} | {versions} | {seconds:.1f}s"
    )
