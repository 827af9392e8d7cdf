"""Linear forms in the placement fractions: the terms the cost model states once, which the planner's
linear program reads as rows and a concrete policy evaluates as numbers.

`VARS` are the fractions of the weights, the KV cache and the activations on each tier. A `Linear` is
const + sum(coef[v] * v); `TierShares` is one quantity's shares on the three tiers, constants for a
concrete policy or variables for the LP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from flexgen_core import placement

VARS = ("w_gpu", "w_cpu", "w_disk", "cache_gpu", "cache_cpu", "cache_disk", "act_gpu", "act_cpu", "act_disk")
TIERS = placement.TIERS


class Linear:
    """const + sum(coef[v] * v) over placement fractions v in VARS."""

    __slots__ = ("const", "coef")

    def __init__(self, const: float = 0.0, coef: Mapping[str, float] | None = None):
        self.const = float(const)
        self.coef = {k: float(v) for k, v in (coef or {}).items() if v}

    @classmethod
    def var(cls, name: str) -> "Linear":
        assert name in VARS, name
        return cls(0.0, {name: 1.0})

    def __add__(self, other: "Linear | float") -> "Linear":
        if not isinstance(other, Linear):
            return Linear(self.const + other, self.coef)
        coef = dict(self.coef)
        for k, v in other.coef.items():
            coef[k] = coef.get(k, 0.0) + v
        return Linear(self.const + other.const, coef)

    __radd__ = __add__

    def __mul__(self, k: float) -> "Linear":
        return Linear(self.const * k, {name: v * k for name, v in self.coef.items()})

    __rmul__ = __mul__

    def __truediv__(self, k: float) -> "Linear":
        return self * (1.0 / k)

    def value(self, x: Mapping[str, float] | None = None) -> float:
        return self.const + sum(v * (x or {})[k] for k, v in self.coef.items())

    def __repr__(self) -> str:
        terms = [f"{self.const:.4g}"] + [f"{v:.4g}*{k}" for k, v in self.coef.items()]
        return "Linear(" + " + ".join(terms) + ")"


@dataclass(frozen=True)
class TierShares:
    """Shares of one quantity on each tier (fractions summing to 1), constants or LP variables."""

    gpu: Linear
    cpu: Linear
    disk: Linear

    @classmethod
    def variables(cls, prefix: str) -> "TierShares":
        return cls(Linear.var(f"{prefix}_gpu"), Linear.var(f"{prefix}_cpu"), Linear.var(f"{prefix}_disk"))

    @classmethod
    def of(cls, gpu: float, cpu: float, disk: float) -> "TierShares":
        return cls(Linear(gpu), Linear(cpu), Linear(disk))

    @property
    def off_gpu(self) -> Linear:
        return self.cpu + self.disk


def larger(a: Linear, b: Linear) -> Linear:
    """The larger of two forms that are constants or multiples of the same fractions (for a maximum over
    layers: with variable fractions every layer's share is bytes x the same fraction)."""
    if not a.coef and not b.coef:
        return a if a.const >= b.const else b
    if not a.coef or not b.coef:  # a zero constant against a share
        return b if not a.const and b.coef else a if not b.const and a.coef else _incomparable(a, b)
    ratio = {key: b.coef.get(key, 0.0) / value for key, value in a.coef.items()}
    assert len(set(ratio.values())) == 1 and set(a.coef) == set(b.coef), (a, b)
    return b if next(iter(ratio.values())) > 1 else a


def _incomparable(a: Linear, b: Linear) -> Linear:
    raise AssertionError(f"cannot compare {a} and {b}")
