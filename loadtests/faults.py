"""The soak's fault schedule: what happens when, as a pure function of the run's length
(unit-tested; the soak's actions in loadtests/chaos.py carry it out)."""

from __future__ import annotations

from dataclasses import dataclass

# In the order they happen. The side trainer's cycles need their shards in this order:
# one shard alone is an adapter-only cycle (the FM waits for a shard to validate on);
# each further shard is an FM cycle (new FM and adapter versions). The rollback comes
# after the last publish, so no later publish hides it; the Triton kills and the replica
# kill fall between publishes, so each one lands on a stack that has just changed.
KINDS = (
    "adapter_refresh",
    "kill_triton",
    "publish",
    "kill_replica",
    "publish",
    "kill_triton",
    "rollback",
    "disk_full_export",
)
# Share of the run before the first fault and after the last: the warm-up (the resource
# bounds are measured from its end) and a quiet tail that shows the stack settled.
LEAD, TAIL = 0.1, 0.1
# Below this the faults would overlap: a trainer cycle or a Triton restart takes tens of
# seconds on two cores.
MIN_GAP_S = 15.0


@dataclass(frozen=True)
class Fault:
    at_s: float  # seconds after the load started
    kind: str


def schedule(duration_s: float) -> list[Fault]:
    """The faults of a run of `duration_s`, evenly spread between the warm-up and the tail."""
    span = duration_s * (1 - LEAD - TAIL)
    gap = span / (len(KINDS) - 1)
    if gap < MIN_GAP_S:
        shortest = MIN_GAP_S * (len(KINDS) - 1) / (1 - LEAD - TAIL)
        raise ValueError(f"a soak of {duration_s:g} s is too short for its faults (at least {shortest:.0f} s)")
    return [Fault(round(duration_s * LEAD + i * gap, 1), kind) for i, kind in enumerate(KINDS)]


def warm_up_s(duration_s: float) -> float:
    """When the resource bounds start counting: the first fault."""
    return duration_s * LEAD
