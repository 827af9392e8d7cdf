"""How close a measured run comes to what this machine can physically do, and what the cost model predicted.

The limits are this machine's own measurements, taken by `flexgen_core.plan.profiler` (the code behind
`flexgen profile`): matmul rates at prompt-pass and decode shapes, the device's memory bandwidth as
decode matmuls see it, and the read bandwidth of each tier weights can stream from (disk through the
page cache or from the device itself, host RAM to GPU over PCIe).

A run's *roofline time* is a lower bound on its wall time, per phase (prompt pass, then decode):

    phase floor = max(compute, memory, stream)
    compute = matmul FLOPs / matmul rate + attention FLOPs / batched-matmul rate
    memory  = bytes the decode matmuls and attention read from device memory / memory bandwidth
              (each GPU batch reads the resident weights, and its KV cache, once per step)
    stream  = weight bytes read from a slower tier / that tier's bandwidth (offloaded weights, once per
              weight pass: per block step for the engine, per forward pass for Accelerate)

and the run reaches `roofline_s / seconds` of the limit; `bound` names the term that sets the floor
of the phase that takes longest. FLOPs are the same for every system on the same prompts (the logits
of the last position only, as `generate` computes them); bytes differ with where each system keeps
its weights and how often it reads them. Times are the profiler's medians under the load of the moment.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from flexgen_core.models.base import LayerKind
from flexgen_core.plan.hardware import HardwareProfile
from flexgen_core.plan.shapes import matrix_params

log = logging.getLogger(__name__)


# ---- what was run ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelFacts:
    """What the floors need of a model: its layers (engine-side specs) and shape."""

    shape: object      # flexgen_core.models.base.ModelShape
    layers: list
    name: str

    @classmethod
    def from_checkpoint(cls, folder) -> "ModelFacts":
        from flexgen_core.models.registry import family_for
        from flexgen_core.runtime import checkpoint

        hf = checkpoint.read_config(checkpoint.resolve(folder))
        family = family_for(hf)
        config = family.config_from_hf(hf)
        return cls(config, family.build_layers(config), str(folder))

    @property
    def matrix_params(self) -> int:
        """Parameters multiplied by per token: every 2-D weight but the input embedding's."""
        return sum(matrix_params(layer) for layer in self.layers)

    @property
    def output_params(self) -> int:
        return sum(matrix_params(layer) for layer in self.layers if layer.kind is LayerKind.OUTPUT)

    @property
    def num_attention(self) -> int:
        return sum(1 for layer in self.layers if layer.kind is LayerKind.ATTENTION)


@dataclass
class Traffic:
    """How a system moved weights in one run (filled by the runner that measured it).

    `weight_passes`: how many times the whole model's layers were walked (engine: blocks x generated
    tokens; `generate`: batches x generated tokens). `matmul_batches_per_pass`: how many times each pass
    multiplies by the weights (GPU batches per block; 1 for `generate`). `streamed_bytes_per_pass`: weight
    bytes read per pass from each slower tier ("cpu" on a CUDA host, "disk")."""

    weight_passes: int
    matmul_batches_per_pass: int = 1
    streamed_bytes_per_pass: dict[str, int] = field(default_factory=dict)

    @property
    def streamed_bytes(self) -> dict[str, int]:
        return {tier: n * self.weight_passes for tier, n in self.streamed_bytes_per_pass.items()}


# ---- limits ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rates:
    """This machine's limits, in flop/s and bytes/s."""

    matmul_prefill: float
    matmul_decode: float
    attention_prefill: float
    memory: float | None           # device memory bandwidth seen by decode matmuls (None: not measured)
    stream: dict[str, float]       # tier -> read bandwidth of weights streaming from it to compute
    source: str

    @classmethod
    def from_profile(cls, profile: HardwareProfile, disk_cached: bool = True) -> "Rates":
        """`disk_cached`: offload files are served by the page cache (they fit in the RAM left free), as
        the cost model assumes in that case; else the device's own read bandwidth."""
        disk = profile.disk_to_cpu_cached if disk_cached and profile.disk_to_cpu_cached else profile.disk_to_cpu
        if profile.cuda:  # disk -> pinned host -> device, pipelined: the slower hop sets the rate
            stream = {"cpu": profile.cpu_to_gpu, "disk": min(disk, profile.cpu_to_gpu)}
        else:  # CPU host: CPU-tier weights are computed in place, disk ones read into a staging buffer
            stream = {"disk": disk}
        return cls(profile.gpu_matmul_prefill, profile.gpu_matmul_decode, profile.gpu_batched_matmul_prefill,
                   profile.gpu_memory, stream, profile.name)

    def to_dict(self) -> dict:
        return {"matmul_prefill_GFLOPs": self.matmul_prefill / 1e9, "matmul_decode_GFLOPs": self.matmul_decode / 1e9,
                "attention_prefill_GFLOPs": self.attention_prefill / 1e9,
                "memory_GBps": self.memory / 1e9 if self.memory else None,
                "stream_GBps": {tier: rate / 1e9 for tier, rate in self.stream.items()}, "profile": self.source}


def load_or_measure(profile_file: str | None, device: str, offload_dir, quick: bool = False) -> HardwareProfile:
    """The profile in `profile_file`, or this machine's measured now, so the limits see the load the runs that
    follow will see (full mode: about 40 s on a 2-core host; quick: 15 s, noisier)."""
    if profile_file:
        from flexgen_core.plan.hardware import load_profile

        return load_profile(profile_file)
    from flexgen_core.plan.profiler import measure

    return measure(device=device, offload_dir=offload_dir, quick=quick, progress=True)


# ---- floors ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Work:
    """FLOPs and device-memory bytes of generating `gen_len` tokens for `num_seqs` prompts of `prompt_len`."""

    prefill_matmul_flops: float
    prefill_attention_flops: float
    decode_matmul_flops: float
    decode_attention_flops: float
    decode_cache_bytes: float     # KV cache read by decode attention

    @property
    def flops(self) -> float:
        return (self.prefill_matmul_flops + self.prefill_attention_flops + self.decode_matmul_flops
                + self.decode_attention_flops)


def work(model: ModelFacts, num_seqs: int, prompt_len: int, gen_len: int, dtype_bytes: int) -> Work:
    shape = model.shape
    body = model.matrix_params - model.output_params  # multiplied by every prompt token
    q_width = shape.num_heads * shape.head_dim
    prefill_matmul = 2 * num_seqs * (prompt_len * body + model.output_params)  # logits of the last position
    prefill_attention = model.num_attention * 4 * num_seqs * prompt_len * prompt_len * q_width
    steps = max(gen_len - 1, 0)
    keys = sum(prompt_len + t for t in range(1, steps + 1))  # step t attends prompt + t positions
    decode_matmul = 2 * num_seqs * steps * model.matrix_params
    decode_attention = model.num_attention * 4 * num_seqs * keys * q_width
    cache_bytes = model.num_attention * 2 * num_seqs * keys * shape.kv_width * dtype_bytes
    return Work(prefill_matmul, prefill_attention, decode_matmul, decode_attention, cache_bytes)


@dataclass(frozen=True)
class Roofline:
    seconds: float                  # lower bound on the run's wall time
    bound: str                      # "compute", "memory", "disk read", "cpu->gpu copy"
    terms: dict[str, dict[str, float]]  # phase -> term -> seconds
    flops: float
    streamed_bytes: int

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "bound": self.bound, "terms": self.terms, "flops": self.flops,
                "streamed_bytes": self.streamed_bytes}


_STREAM_NAMES = {"disk": "disk read", "cpu": "cpu->gpu copy"}


def roofline(model: ModelFacts, traffic: Traffic, rates: Rates, num_seqs: int, prompt_len: int, gen_len: int,
             dtype_bytes: int, resident_weight_bytes: int | None = None) -> Roofline:
    """The floor of one run (see the module docstring). `resident_weight_bytes`: weight bytes the decode
    matmuls read from device memory per GPU batch and step (default: all matrix weights)."""
    w = work(model, num_seqs, prompt_len, gen_len, dtype_bytes)
    steps = max(gen_len - 1, 0)
    passes_per_step = traffic.weight_passes / max(gen_len, 1)  # blocks or batches
    # Streamed weights: the first pass of each block/batch is the prompt pass, the rest are decode steps.
    streamed = traffic.streamed_bytes_per_pass
    prompt_passes, decode_passes = passes_per_step, passes_per_step * steps
    phases = {
        "prefill": {
            "compute": (w.prefill_matmul_flops / rates.matmul_prefill
                        + w.prefill_attention_flops / rates.attention_prefill),
            **{_STREAM_NAMES[t]: prompt_passes * n / rates.stream[t] for t, n in streamed.items() if n},
        },
        "decode": {
            "compute": (w.decode_matmul_flops / rates.matmul_decode
                        + w.decode_attention_flops / rates.attention_prefill),
            **{_STREAM_NAMES[t]: decode_passes * n / rates.stream[t] for t, n in streamed.items() if n},
        },
    }
    if rates.memory:
        weight_bytes = resident_weight_bytes if resident_weight_bytes is not None else model.matrix_params * dtype_bytes
        reads = decode_passes * traffic.matmul_batches_per_pass * weight_bytes + w.decode_cache_bytes
        phases["decode"]["memory"] = reads / rates.memory
    floors = {phase: max(terms.values()) if terms else 0.0 for phase, terms in phases.items()}
    longest = max(floors, key=floors.get)
    bound = max(phases[longest], key=phases[longest].get)
    total_streamed = sum(traffic.streamed_bytes.values())
    return Roofline(sum(floors.values()), bound, phases, w.flops, total_streamed)


# ---- the cost model -------------------------------------------------------------------------------

def predicted_throughput(model: ModelFacts, policy, profile: HardwareProfile, num_seqs: int, prompt_len: int,
                         gen_len: int, dtype_bytes: int) -> float | None:
    """Tokens/s that `flexgen_core.plan.cost_model` predicts for the engine under `policy` on `profile`, for
    `num_seqs` prompts in blocks of `policy.block_size`; None where the cost model cannot price it."""
    try:
        from flexgen_core.plan.cost_model import CostModel
        from flexgen_core.plan.workload import Workload
        from flexgen_core.plan.shapes import PlanModel
    except ImportError:  # the planner's modules are not in this checkout
        return None
    cost = CostModel(PlanModel(model.name, model.shape, model.layers, "folder"), Workload(prompt_len, gen_len),
                     profile, dtype_bytes)
    estimate = cost.estimate(policy)
    blocks = math.ceil(num_seqs / policy.block_size)
    return num_seqs * gen_len / (blocks * estimate.total_s)
