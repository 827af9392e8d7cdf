"""The offloading policy: batch shape, placement percentages and switches (FlexGen paper, Sec. 4).

Percentages are integers 0-100. For each of weights, KV cache and activations, the GPU share and the
CPU share are given; whatever the two do not take lives on disk. "GPU" means the compute device: a
CUDA device, or the CPU itself on a CPU-only host.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

# Each placed quantity (weights, KV cache, activations) and its GPU and CPU percent fields.
QUANTITIES = {"w": ("w_gpu_percent", "w_cpu_percent"), "cache": ("cache_gpu_percent", "cache_cpu_percent"),
              "act": ("act_gpu_percent", "act_cpu_percent")}
_PERCENT_PAIRS = tuple(QUANTITIES.values())


@dataclass(frozen=True)
class Switch:
    """One of the policy's on/off switches, and what each part of the project derives from it."""

    name: str                 # the Policy field
    default: bool
    flag_help: str            # help of `flexgen generate`'s flag: --NAME, or --no-NAME where on by default
    changes_results: bool     # it changes what the model computes: part of the HELM client's cache key
    costed: bool              # the cost model prices it (plan/cost_model.Switches)
    shown: bool               # named in a policy's one-line description when on

    @property
    def flag(self) -> str:
        return f"--{'no-' if self.default else ''}{self.name.replace('_', '-')}"


# The switches, in one table: the CLI's flags, the client's cache key, the cost model's and the
# planner's switches and the one-line descriptions are derived from it.
SWITCHES = (
    Switch("overlap", True, "run I/O and compute one after the other", False, True, True),
    Switch("cpu_cache_compute", False, "attention over CPU-resident cache on the CPU", False, True, True),
    Switch("compress_weight", False, "store weights as 4-bit group-wise codes", True, True, True),
    Switch("compress_cache", False, "store the KV cache as 4-bit group-wise codes", True, True, True),
    Switch("pin_weight", True, "do not pin host-resident weights (CUDA)", False, False, False),
    Switch("share_prefix", True, "compute a prompt prefix shared by all prompts once per sequence, not once "
           "(an ablation)", False, True, False),
)
_SWITCHES = tuple(switch.name for switch in SWITCHES)

# The policy fields fixed once an engine has loaded its weights: where they lie, how they are stored, and
# the staging slots that overlap needs. Engine.use_block_policy may change the others between calls.
WEIGHT_FIELDS = ("w_gpu_percent", "w_cpu_percent", "compress_weight", "pin_weight", "overlap")

# What `policy="auto"` may do about 4-bit compression, a lossy change of the model's computation:
# "never" (the default: exact policies only) or "allow" (where the cost model says it pays; the choice
# is logged as lossy).
COMPRESS_CHOICES = ("never", "allow")


def auto_compression(compress: str, compress_weight: bool | None = None,
                     compress_cache: bool | None = None) -> tuple[bool | None, bool | None]:
    """The planner's compression switches for `policy="auto"`: each as fixed by the caller, else off,
    or the planner's choice (None) where `compress="allow"`."""
    if compress not in COMPRESS_CHOICES:
        raise ValueError(f"compress must be one of {', '.join(COMPRESS_CHOICES)}, got {compress!r}")
    free = None if compress == "allow" else False
    return (free if compress_weight is None else bool(compress_weight),
            free if compress_cache is None else bool(compress_cache))


@dataclass(frozen=True)
class Policy:
    gpu_batch_size: int = 1
    num_gpu_batches: int = 1
    w_gpu_percent: int = 100
    w_cpu_percent: int = 0
    cache_gpu_percent: int = 100
    cache_cpu_percent: int = 0
    act_gpu_percent: int = 100
    act_cpu_percent: int = 0
    overlap: bool = True
    cpu_cache_compute: bool = False
    compress_weight: bool = False
    compress_cache: bool = False
    # Pin host copies of CPU-resident weights (CUDA hosts only). The paper turns this off for 175B.
    pin_weight: bool = True
    # Compute a prompt prefix shared by the sequences of a call once, store its K/V once, and keep it
    # for later calls (Engine.generate). Results do not depend on it; off is for ablation.
    share_prefix: bool = True

    def __post_init__(self) -> None:
        for name in ("gpu_batch_size", "num_gpu_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Policy.{name} must be an integer >= 1, got {value!r}")
        for gpu_name, cpu_name in _PERCENT_PAIRS:
            for name in (gpu_name, cpu_name):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
                    raise ValueError(f"Policy.{name} must be an integer percent in 0..100, got {value!r}")
            total = getattr(self, gpu_name) + getattr(self, cpu_name)
            if total > 100:
                raise ValueError(
                    f"Policy.{gpu_name} + Policy.{cpu_name} = {total} exceeds 100 "
                    f"({getattr(self, gpu_name)} + {getattr(self, cpu_name)})"
                )
        for name in _SWITCHES:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Policy.{name} must be a bool, got {getattr(self, name)!r}")

    def shares(self, quantity: str) -> dict[str, int]:
        """Percent of a quantity ("w", "cache" or "act") per tier; the disk holds what the others do not."""
        gpu, cpu = (getattr(self, name) for name in QUANTITIES[quantity])
        return {"gpu": gpu, "cpu": cpu, "disk": 100 - gpu - cpu}

    def with_shares(self, quantity: str, gpu: int, cpu: int) -> "Policy":
        """The same policy with a quantity's GPU and CPU percents replaced (the rest on disk)."""
        gpu_name, cpu_name = QUANTITIES[quantity]
        return self.replace(**{gpu_name: gpu, cpu_name: cpu})

    @property
    def w_disk_percent(self) -> int:
        return self.shares("w")["disk"]

    @property
    def cache_disk_percent(self) -> int:
        return self.shares("cache")["disk"]

    @property
    def act_disk_percent(self) -> int:
        return self.shares("act")["disk"]

    @property
    def lossy(self) -> list[str]:
        """What is stored in 4 bits (a lossy change of the model's computation): [] when exact."""
        return [name for name, on in (("weights", self.compress_weight), ("KV cache", self.compress_cache)) if on]

    @property
    def block_size(self) -> int:
        """Sequences per block: the effective batch size."""
        return self.gpu_batch_size * self.num_gpu_batches

    @property
    def percent(self) -> tuple[int, int, int, int, int, int]:
        """The six numbers in the paper's order: weights, cache, activations; GPU then CPU each."""
        return (
            self.w_gpu_percent, self.w_cpu_percent,
            self.cache_gpu_percent, self.cache_cpu_percent,
            self.act_gpu_percent, self.act_cpu_percent,
        )

    @classmethod
    def from_percent(cls, percent: tuple[int, ...] | list[int], **kwargs: Any) -> "Policy":
        if len(percent) != 6:
            raise ValueError(f"percent needs 6 numbers (W_G W_C C_G C_C A_G A_C), got {len(percent)}: {percent}")
        names = [name for pair in _PERCENT_PAIRS for name in pair]
        return cls(**dict(zip(names, percent)), **kwargs)

    @classmethod
    def parse(cls, value: Any) -> "Policy | str":
        """A policy as given in code or config: a Policy, a mapping of its fields, None (the default
        policy) or "auto" (returned as is: planned once the model and machine are known)."""
        if value is None:
            return cls()
        if isinstance(value, Policy):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(dict(value))
        if value == "auto":
            return "auto"
        raise ValueError(f"policy must be a Policy, a mapping of Policy fields or 'auto', got {value!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Policy":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown Policy field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "Policy":
        return dataclasses.replace(self, **changes)

    def keeps_weights(self, current: "Policy") -> bool:
        """Whether this policy can run on weights loaded under `current` (same WEIGHT_FIELDS)."""
        return all(getattr(self, f) == getattr(current, f) for f in WEIGHT_FIELDS)

    def results_key(self) -> list[bool]:
        """The switches that change what the model computes (compression), in table order."""
        return [getattr(self, s.name) for s in SWITCHES if s.changes_results]


_BOOLS = [(f.name, f.default) for f in dataclasses.fields(Policy) if f.type in (bool, "bool")]
assert _BOOLS == [(s.name, s.default) for s in SWITCHES], "Policy's bool fields and SWITCHES must agree"
