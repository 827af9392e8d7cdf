"""Hardware profiles: memory per tier, bandwidths between tiers, compute rates (FlexGen paper, Sec. 4.3).

A profile is a JSON file in the layout of the paper's fitted constants (`profiles/t4-gcp.json`, the
built-in `t4-gcp`): sizes in GB, bandwidths in GB/s, where GB means 2**30 bytes (the one convention
of the whole project: `flexgen plan --gpu-mem 16GB` means the same), and compute in TFLOP/s (1e12). `flexgen profile` measures one for this machine (`profiler.py`). In memory, a `HardwareProfile`
holds bytes, bytes/s and flop/s.

"gpu" is the compute device. On a CPU-only host (`compute_device: "cpu"`) it is the CPU itself: the
gpu and cpu tiers then share host RAM (`unified`), and copies between them are free or plain memcpys.

Optional fields the paper's profile lacks (absent = not modelled):
- `bandwidth_GBps.gpu_memory`: device memory bandwidth, the roofline of decode matmuls at small batch;
- `bandwidth_GBps.disk_to_cpu_cached` / `cpu_to_disk_cached`: disk reads and writes served by the page
  cache, used when the plan's disk files fit in RAM the plan leaves free;
- `bandwidth_GBps.decompress`: dense bytes per second that decompressing 4-bit weights or cache
  writes on the compute device (else costed as memory traffic at `gpu_memory`);
- `overhead_s.per_layer_batch`: fixed cost of computing one layer on one GPU batch (launches, Python);
- `memory.allocator_reserve_GB`: GPU memory the caching allocator keeps reserved but unallocated at
  peak, which the planner leaves free (default on CUDA: the H200's 0.88 measured at a 6 GB cap, and
  the same share of a smaller GPU; none on a CPU);
- `io_overlap`: how much the I/O threads overlap compute, 1 (default: copy engines and disk work
  beside the GPU) down to 0 (a CPU-only host whose copies and compute share the same cores);
- `matmul_s_per_param`: measured seconds of a linear layer per weight parameter, by the number of rows
  (tokens) multiplied at once, e.g. `{"1": 7.1e-11, "8": 1.2e-10, ...}`. Where present it replaces the
  roofline (flop rate, memory bandwidth) for matmuls: on a CPU the time of a few-row matmul is nearer
  the sum of its memory and flop times than their maximum, and a table measures it as it is.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

GiB = 2**30
TERA = 1e12
PROFILES_DIR = Path(__file__).with_name("profiles")

_BANDWIDTHS = ("cpu_to_gpu", "gpu_to_cpu_cache", "gpu_to_cpu_hidden", "disk_to_cpu",
               "cpu_to_disk_cache_prefill", "cpu_to_disk_hidden_prefill", "cpu_to_disk_decode")
_OPTIONAL_BANDWIDTHS = ("gpu_memory", "disk_to_cpu_cached", "cpu_to_disk_cached", "decompress")
_FLOPS = ("gpu_matmul_prefill", "gpu_matmul_decode", "gpu_batched_matmul_prefill", "gpu_batched_matmul_decode")
COMPUTE_DEVICES = ("cuda", "cpu")
# Reserved but unallocated by PyTorch's CUDA caching allocator at the peak of a planned policy: 0.88 GiB,
# measured on an H200 with OPT-6.7B's shape under a 6 GiB cap (reference/gpu-h200.md). Until a profile
# measures its own (`memory.allocator_reserve_GB`), the planner keeps that much free on a GPU of 6 GiB or
# more, and the same share of a smaller one, whose blocks and transients are smaller too.
ALLOCATOR_RESERVE_BYTES = int(0.88 * GiB)
ALLOCATOR_RESERVE_MEASURED_AT = 6 * GiB


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    description: str
    compute_device: str  # "cuda" or "cpu" (then the "gpu" tier is host RAM)
    dtype: str  # dtype the compute rates were measured in
    # memory per tier, bytes
    gpu_bytes: int
    cpu_bytes: int
    disk_bytes: int
    # bandwidths, bytes/s
    cpu_to_gpu: float
    gpu_to_cpu_cache: float
    gpu_to_cpu_hidden: float
    disk_to_cpu: float
    cpu_to_disk_cache_prefill: float
    cpu_to_disk_hidden_prefill: float
    cpu_to_disk_decode: float
    # compute, flop/s
    gpu_matmul_prefill: float
    gpu_matmul_decode: float
    gpu_batched_matmul_prefill: float
    gpu_batched_matmul_decode: float
    cpu_attention: float
    # optional terms (None / 0: not modelled)
    gpu_memory: float | None = None
    disk_to_cpu_cached: float | None = None
    cpu_to_disk_cached: float | None = None
    decompress: float | None = None  # dense bytes/s that 4-bit decompression writes on the compute device
    cpu_attention_correction: tuple[float, float, float] | None = None
    layer_overhead_s: float = 0.0
    # How well I/O threads overlap compute: 1 = fully (separate engines), 0 = not at all (same cores).
    io_overlap: float = 1.0
    # Host RAM of the machine, kept when `with_memory` sets a smaller budget: what is left is page cache.
    physical_cpu_bytes: int = -1
    # (rows, seconds per weight parameter) pairs, rows ascending; None: use the roofline.
    matmul_s_per_param: tuple[tuple[int, float], ...] | None = None
    # GPU memory PyTorch's caching allocator holds but has not handed out, at peak, as measured on this
    # machine; None: the H200's figure (see `allocator_reserve`).
    allocator_reserve_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.physical_cpu_bytes == -1:
            object.__setattr__(self, "physical_cpu_bytes", self.cpu_bytes)
        if self.compute_device not in COMPUTE_DEVICES:
            raise ValueError(f"profile {self.name!r}: compute_device must be one of {COMPUTE_DEVICES}, "
                             f"got {self.compute_device!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "allocator_reserve_bytes" and value is None:
                continue
            if f.name.endswith("_bytes") and (not isinstance(value, int) or value < 0):
                raise ValueError(f"profile {self.name!r}: {f.name} must be an integer >= 0, got {value!r}")
            if f.name in _BANDWIDTHS + _FLOPS + ("cpu_attention",) and not value > 0:
                raise ValueError(f"profile {self.name!r}: {f.name} must be > 0, got {value!r}")
            if f.name == "io_overlap" and not 0.0 <= value <= 1.0:
                raise ValueError(f"profile {self.name!r}: io_overlap must be in [0, 1], got {value!r}")
            if f.name in _OPTIONAL_BANDWIDTHS and value is not None and not value > 0:
                raise ValueError(f"profile {self.name!r}: {f.name} must be > 0 or absent, got {value!r}")
        if self.matmul_s_per_param is not None:
            table = self.matmul_s_per_param
            rows = [r for r, _ in table]
            if not table or rows != sorted(set(rows)) or any(r < 1 or not t > 0 for r, t in table):
                raise ValueError(f"profile {self.name!r}: matmul_s_per_param must map distinct row counts >= 1 "
                                 f"to seconds > 0, got {table!r}")

    def matmul_seconds(self, rows: int, params: int) -> float | None:
        """Measured time of multiplying `rows` rows by a weight of `params` parameters, interpolated in
        log-log between measured row counts; past the largest, linear in rows (compute-bound). None
        without a table."""
        if not self.matmul_s_per_param:
            return None
        table = self.matmul_s_per_param
        if rows <= table[0][0]:
            return params * table[0][1]
        if rows >= table[-1][0]:
            last_rows, last = table[-1]
            return params * last * rows / last_rows
        for (r0, t0), (r1, t1) in zip(table, table[1:]):
            if r0 <= rows <= r1:
                w = math.log(rows / r0) / math.log(r1 / r0)
                return params * math.exp((1 - w) * math.log(t0) + w * math.log(t1))
        raise AssertionError("unreachable")

    def allocator_reserve(self) -> int:
        """GPU bytes to leave for the caching allocator's reserve (none when the compute device is the CPU)."""
        if self.unified:
            return 0
        if self.allocator_reserve_bytes is not None:
            return self.allocator_reserve_bytes
        return min(ALLOCATOR_RESERVE_BYTES, self.gpu_bytes * ALLOCATOR_RESERVE_BYTES // ALLOCATOR_RESERVE_MEASURED_AT)

    @property
    def unified(self) -> bool:
        """The compute device is the host CPU: gpu and cpu tiers are the same RAM."""
        return self.compute_device == "cpu"

    @property
    def cuda(self) -> bool:
        return not self.unified

    def with_memory(self, gpu: int | None = None, cpu: int | None = None, disk: int | None = None) -> "HardwareProfile":
        """The same machine with some tiers' sizes replaced (bytes)."""
        changes = {k: v for k, v in (("gpu_bytes", gpu), ("cpu_bytes", cpu), ("disk_bytes", disk)) if v is not None}
        return dataclasses.replace(self, **changes)

    def capacity(self) -> dict[str, int]:
        return {"gpu": self.gpu_bytes, "cpu": self.cpu_bytes, "disk": self.disk_bytes}

    # ---- JSON -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "profile") -> "HardwareProfile":
        try:
            memory, bandwidth, flops = d["memory"], d["bandwidth_GBps"], d["flops_TFLOPs"]
            correction = d.get("cpu_attention_correction")
            return cls(
                name=d.get("name", source),
                description=d.get("description", ""),
                compute_device=d.get("compute_device", "cuda"),
                dtype=d.get("dtype", "float16"),
                gpu_bytes=int(memory["gpu_GB"] * GiB),
                cpu_bytes=int(memory["cpu_GB"] * GiB),
                disk_bytes=int(memory["disk_GB"] * GiB),
                allocator_reserve_bytes=int(memory["allocator_reserve_GB"] * GiB)
                if memory.get("allocator_reserve_GB") is not None else None,
                **{k: float(bandwidth[k]) * GiB for k in _BANDWIDTHS},
                **{k: float(bandwidth[k]) * GiB if bandwidth.get(k) else None for k in _OPTIONAL_BANDWIDTHS},
                **{k: float(flops[k]) * TERA for k in _FLOPS},
                cpu_attention=float(flops["cpu"]) * TERA,
                cpu_attention_correction=(float(correction["c1"]), float(correction["c2"]), float(correction["c3"]))
                if correction else None,
                layer_overhead_s=float(d.get("overhead_s", {}).get("per_layer_batch", 0.0)),
                io_overlap=float(d.get("io_overlap", 1.0)),
                matmul_s_per_param=tuple(sorted((int(r), float(t)) for r, t in d["matmul_s_per_param"].items()))
                if d.get("matmul_s_per_param") else None,
            )
        except KeyError as e:
            raise ValueError(f"{source}: missing field {e.args[0]!r} (see flexgen_core/profiles/t4-gcp.json)") from None
        except (TypeError, AttributeError) as e:
            raise ValueError(f"{source}: malformed profile ({e})") from None

    def to_dict(self) -> dict[str, Any]:
        bandwidth = {k: _round(getattr(self, k) / GiB) for k in _BANDWIDTHS}
        bandwidth |= {k: _round(getattr(self, k) / GiB) for k in _OPTIONAL_BANDWIDTHS if getattr(self, k)}
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "units": {"bytes": "GB means 2**30 bytes", "bandwidth": "GB/s (2**30 bytes per second)",
                      "flops": "TFLOP/s (1e12 per second)"},
            "compute_device": self.compute_device,
            "dtype": self.dtype,
            "memory": {"gpu_GB": _round(self.gpu_bytes / GiB), "cpu_GB": _round(self.cpu_bytes / GiB),
                       "disk_GB": _round(self.disk_bytes / GiB)},
            "bandwidth_GBps": bandwidth,
            "flops_TFLOPs": {k: _round(getattr(self, k) / TERA) for k in _FLOPS}
            | {"cpu": _round(self.cpu_attention / TERA)},
        }
        if self.cpu_attention_correction:
            out["cpu_attention_correction"] = dict(zip(("c1", "c2", "c3"), self.cpu_attention_correction))
        if self.layer_overhead_s:
            out["overhead_s"] = {"per_layer_batch": _round(self.layer_overhead_s)}
        if self.allocator_reserve_bytes is not None:
            out["memory"]["allocator_reserve_GB"] = _round(self.allocator_reserve_bytes / GiB)
        if self.io_overlap != 1.0:
            out["io_overlap"] = _round(self.io_overlap)
        if self.matmul_s_per_param:
            out["matmul_s_per_param"] = {str(rows): _round(t) for rows, t in self.matmul_s_per_param}
        return out

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def builtin_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


def load_profile(name_or_file: str | os.PathLike) -> HardwareProfile:
    """A built-in profile by name (`t4-gcp`) or a profile JSON file."""
    name = str(name_or_file)
    builtin = PROFILES_DIR / f"{name}.json"
    path = builtin if builtin.is_file() else Path(name).expanduser()
    if not path.is_file():
        raise ValueError(f"hardware profile {name!r} is neither a built-in profile ({', '.join(builtin_profiles())}) "
                         f"nor a file; measure this machine with `flexgen profile --out FILE`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"hardware profile {str(path)!r} is not valid JSON: {e}") from None
    return HardwareProfile.from_dict(data, source=str(path))


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(?:([KMGT])(?:i?B)?)?\s*$", re.IGNORECASE)
# One convention in the whole project, the FlexGen paper's and its profiles': G = GB = GiB = 2**30 bytes.
_UNITS = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """'16G', '16GB' or '16GiB' -> bytes: all three mean 16 * 2**30 (as in the profiles and the paper),
    likewise K/M/T; a unit is required, so a bare '16' is not read as 16 bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"cannot read memory size {text!r}; write e.g. 16G, 16GB, 200GiB or 1.5TB (G = GB = GiB = 2**30 bytes)")
    number, unit = match.groups()
    if unit is None:
        raise ValueError(f"memory size {text!r} needs a unit: e.g. {number}GB (GB = GiB = 2**30 bytes)")
    return int(float(number) * _UNITS[unit.lower()])


def format_size(nbytes: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{int(nbytes)} B"
