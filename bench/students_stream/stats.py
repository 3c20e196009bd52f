"""Paired differences over seeds (each seed a new world): the mean, its 95 % interval
(Student's t) and how many seeds agree in sign."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

# Two-sided 95 % quantiles of Student's t by degrees of freedom (no scipy dependency
# for ten numbers).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


@dataclass(frozen=True)
class Paired:
    mean: float
    lo: float
    hi: float
    positive: int
    n: int

    def to_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}

    def __str__(self) -> str:
        return f"{self.mean:+.2f} [{self.lo:+.2f}, {self.hi:+.2f}] {self.positive}/{self.n}"


def paired(values: list[float]) -> Paired:
    """`values`: one paired difference per seed."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    mean = float(x.mean())
    half = T95.get(n - 1, 1.96) * float(x.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return Paired(mean, mean - half, mean + half, int((x > 0).sum()), n)


def gain_pct(ne_hard: float, ne: float) -> float:
    """NE gain over hard in percent of hard's NE (positive: better than hard)."""
    return 100.0 * (ne_hard - ne) / ne_hard
