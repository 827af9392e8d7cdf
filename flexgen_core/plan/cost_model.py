"""Predicted time and memory of generating with a policy (FlexGen paper, Sec. 4.3 and Appendix A.3).

Pure arithmetic, no torch. Time follows the schedule the engine runs (schedule.py): one generation step
walks every layer (input embedding, attention and MLP of each block, output embedding); at each layer it
computes all GPU batches of the block while one I/O thread loads the *next* layer's weights and the next
batch's KV cache and hidden states, and another thread stores this layer's new cache rows and hidden
states. So a layer costs the longest of three lanes, as in the paper's model:

    load    = disk->cpu + cpu->gpu copies of the next layer's weights, of this layer's cache (the next
              layer's for the block's first batch) and of the hidden states
    store   = gpu->cpu + cpu->disk copies of the new cache rows and hidden states
    compute = matmuls (the profile's measured time per parameter at the batch's row count, or the
              roofline: flops / rate, or weight bytes / device memory bandwidth) + attention on the
              device + attention on the CPU (`cpu_cache_compute`) + a fixed cost per layer and batch

and `overlap=False` adds them up. On a CPU-only host the I/O threads and the compute share the same
cores: the profile's measured `io_overlap` (1 = perfect) blends the maximum with the sum. Two things of
the engine that the paper's model has not:
- with one GPU batch per block and hidden states off the device, the hidden-state load is requested
  only when the layer needs it, behind the next layer's weights on the same thread: load and compute
  then run one after the other (`serial_load`);
- attention and MLP are separate layers, each with its own weight load.

A block's time is prefill (one step over the prompt) plus (gen_len - 1) decode steps; decode is costed at
its average context (prompt_len + gen_len / 2 keys). Throughput = block size x gen_len / that time, the
paper's generation throughput.

A shared prefix (`Workload.shared_prefix_len`: the prompts' common first tokens, which the engine computes
once, engine._shared_prefix) changes a block as the engine runs it: the prompt pass computes each
sequence's own tokens only (matmuls over B x own rows, attention of own queries over prefix + own keys);
the block's cache holds own + generated rows per sequence; the prefix's K/V, one sequence's rows, loads
with each attention layer's weights, once per (step, layer) for all GPU batches (schedule._load_layer);
decode attention still covers the prefix's keys for every sequence. The prefix's own pass (one sequence of
its tokens through every layer, logits at every position, BlockRunner.run_prefix) is `Estimate.prefix_s`,
once per run, not per block; `Estimate.run_seconds(n)` adds it to the blocks of n sequences. Memory is the
larger, per tier, of a block with the prefix's K/V beside it and the prefix's pass (`SharedPrefixMemory`).

Every term is a `Linear` form in the placement fractions (`forms.VARS`), so the planner's linear program
uses the very same terms with the fractions as variables; a concrete policy plugs in the fractions the
engine really places (`MemoryModel.placement`). Memory is `memory_model.MemoryModel`'s: the engine's exact
accounting (`memory.account`), compression included, and its linear forms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from flexgen_core.memory import MemoryReport
from flexgen_core.models.base import LayerKind
from flexgen_core.plan.forms import Linear, TierShares
from flexgen_core.plan.hardware import HardwareProfile
from flexgen_core.plan.memory_model import LayerFacts, MemoryModel, WeightShares
from flexgen_core.plan.shapes import PlanModel
from flexgen_core.plan.workload import Switches, Workload
from flexgen_core.policy import Policy

PHASES = ("prefill", "decode")
LANES = ("load", "store", "compute")


@dataclass(frozen=True)
class Lanes:
    """Seconds on each lane for one layer and all GPU batches of a block, by category."""

    load: dict[str, Linear] = field(default_factory=dict)
    store: dict[str, Linear] = field(default_factory=dict)
    compute: dict[str, Linear] = field(default_factory=dict)

    def total(self, lane: str) -> Linear:
        return sum(getattr(self, lane).values(), Linear())


@dataclass(frozen=True)
class LayerCost:
    """One kind of layer in the step, `count` times: its lanes in prefill and decode."""

    name: str
    count: int
    reads_hidden: bool
    prefill: Lanes
    decode: Lanes


def lane_bounds(lanes: Mapping[str, Any], overlap: bool, serial_load: bool, io_overlap: float = 1.0) -> list:
    """Lower bounds whose maximum is a layer's time (floats or Linear forms alike, so the LP uses them).

    Lanes that overlap cost the longest of them; with `io_overlap` < 1 (I/O threads competing with
    compute for the same CPU cores) a share of the others is added: eta * max + (1 - eta) * sum."""
    total = lanes["load"] + lanes["store"] + lanes["compute"]
    if not overlap:
        return [total]
    groups = [lanes["load"] + lanes["compute"], lanes["store"]] if serial_load else \
        [lanes["load"], lanes["store"], lanes["compute"]]
    if io_overlap >= 1.0:
        return groups
    return [g * io_overlap + total * (1.0 - io_overlap) for g in groups]


def combine(lanes: Mapping[str, float], overlap: bool, serial_load: bool, io_overlap: float = 1.0) -> float:
    """A layer's time from its lane totals (seconds)."""
    return max(lane_bounds(lanes, overlap, serial_load, io_overlap))


def serial_load(policy_act_on_gpu: bool, num_gpu_batches: int) -> bool:
    """The engine prefetches hidden states only across GPU batches (schedule._prefetch_next)."""
    return num_gpu_batches == 1 and not policy_act_on_gpu


@dataclass
class Estimate:
    """Predicted cost of one block under a policy."""

    policy: Policy
    workload: Workload
    prefill_s: float                  # the prompt pass of one block
    decode_s: float                   # all gen_len - 1 decode steps of one block
    breakdown: dict[str, dict[str, float]]  # phase -> "lane.category" -> seconds, summed over layers
    memory: MemoryReport
    disk_cached: bool
    prefix_s: float = 0.0             # the shared prefix's own pass, once per run (0 without one)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def decode_token_s(self) -> float:
        return self.decode_s / max(self.workload.decode_steps, 1)

    @property
    def throughput(self) -> float:
        """Generated tokens per second of a block (the paper's generation throughput; a shared prefix's
        one-off pass is not in it: see `run_seconds`)."""
        return self.policy.block_size * self.workload.gen_len / self.total_s

    def run_seconds(self, num_sequences: int) -> float:
        """Predicted time of a run of `num_sequences` sequences (a HELM run entry's, say): the shared
        prefix's pass once, then ceil(num_sequences / block_size) blocks, a last partial block costed as a
        full one."""
        if isinstance(num_sequences, bool) or not isinstance(num_sequences, int) or num_sequences < 1:
            raise ValueError(f"num_sequences must be an integer >= 1, got {num_sequences!r}")
        return self.prefix_s + math.ceil(num_sequences / self.policy.block_size) * self.total_s

    @property
    def peak_memory(self) -> dict[str, int]:
        return self.memory.peak

    def to_dict(self) -> dict:
        return {
            "policy": self.policy.to_dict(),
            "throughput": self.throughput,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "decode_token_s": self.decode_token_s,
            "total_s": self.total_s,
            "prefix_s": self.prefix_s,
            "shared_prefix_len": self.workload.shared_prefix_len,
            "block_size": self.policy.block_size,
            "peak_memory": self.peak_memory,
            "memory": self.memory.to_dict(),
            "breakdown": self.breakdown,
            "disk_cached": self.disk_cached,
        }


# ---- the model ------------------------------------------------------------------------------------

class CostModel:
    """Costs of one model and workload on one machine, for any policy.

    `echo_prompt`: prompt passes compute logits at every position, not only the last (as the shared
    prefix's pass does, for its tokens' logprobs)."""

    def __init__(self, model: PlanModel, workload: Workload, hardware: HardwareProfile, dtype_bytes: int,
                 echo_prompt: bool = False):
        self.memory_model = MemoryModel(model, workload, hardware, dtype_bytes)
        self.model = model
        self.shape = model.shape
        self.workload = workload
        self.hw = hardware
        self.dtype_bytes = dtype_bytes
        self.echo_prompt = echo_prompt
        self._prefix_model: CostModel | None = None  # the shared prefix's pass, built when first costed
        facts = self.memory_model.layers
        # Layers that cost the same (same weights, same next layer) are costed once: OPT has five kinds.
        groups: dict[tuple, list] = {}
        for idx, cur in enumerate(facts):
            nxt = facts[(idx + 1) % len(facts)]  # the output layer prefetches the next step's input layer
            key = (cur.signature, nxt.signature)
            if key not in groups:
                groups[key] = [cur, nxt, 0]
            groups[key][2] += 1
        self.templates = [(cur, nxt, count) for cur, nxt, count in groups.values()]

    # ---- rates ----------------------------------------------------------------------------------
    def rates(self, disk_cached: bool) -> dict[str, float]:
        hw = self.hw
        read = hw.disk_to_cpu_cached if disk_cached and hw.disk_to_cpu_cached else hw.disk_to_cpu
        cached_write = hw.cpu_to_disk_cached if disk_cached and hw.cpu_to_disk_cached else None
        return {
            "cpu_to_gpu": hw.cpu_to_gpu, "disk_to_cpu": read,
            "gpu_to_cpu_cache": hw.gpu_to_cpu_cache, "gpu_to_cpu_hidden": hw.gpu_to_cpu_hidden,
            "cpu_to_disk_cache_prefill": cached_write or hw.cpu_to_disk_cache_prefill,
            "cpu_to_disk_hidden_prefill": cached_write or hw.cpu_to_disk_hidden_prefill,
            "cpu_to_disk_decode": cached_write or hw.cpu_to_disk_decode,
        }

    def cpu_attention_rate(self, gpu_batch_size: int) -> float:
        """CPU attention flop rate, with the paper's fitted efficiency for small batches and narrow models:
        max(0.1, 1 + c1*a*b - c2*a - c3*b) with a = log2(64 / batch)+, b = log2(4096 / hidden)+."""
        if not self.hw.cpu_attention_correction:
            return self.hw.cpu_attention
        c1, c2, c3 = self.hw.cpu_attention_correction
        a = max(0.0, math.log2(64 / gpu_batch_size))
        b = max(0.0, math.log2(4096 / self.shape.hidden_size))
        return self.hw.cpu_attention * max(0.1, 1 + c1 * a * b - c2 * a - c3 * b)

    def matmul_seconds(self, rows: int, params: int, prefill: bool) -> float:
        """One GPU batch's `rows` tokens through weights of `params` parameters: the profile's measured
        table where it has one, else the roofline (flops at the phase's rate, or reading the weights
        from device memory, whichever is longer)."""
        measured = self.hw.matmul_seconds(rows, params)
        if measured is not None:
            return measured
        rate = self.hw.gpu_matmul_prefill if prefill else self.hw.gpu_matmul_decode
        seconds = 2 * rows * params / rate
        if self.hw.gpu_memory:  # each batch reads the layer's weights from device memory
            seconds = max(seconds, params * self.dtype_bytes / self.hw.gpu_memory)
        return seconds

    def decompress_seconds(self, dense_bytes: float, stored_bytes: float) -> float:
        """Decompressing to `dense_bytes`: at the profile's measured decompression rate, else as one read
        of the stored bytes and one write of the dense ones at device memory bandwidth (else free)."""
        if self.hw.decompress:
            return dense_bytes / self.hw.decompress
        if self.hw.gpu_memory:
            return (dense_bytes + stored_bytes) / self.hw.gpu_memory
        return 0.0

    # ---- time -----------------------------------------------------------------------------------
    def units(self, gpu_batch_size: int, num_gpu_batches: int, switches: Switches,
              weights: WeightShares, cache: TierShares, act: TierShares, disk_cached: bool) -> list[LayerCost]:
        """Each kind of layer's lanes, in prefill and decode, as linear forms of the placement."""
        out = []
        for cur, nxt, count in self.templates:
            lanes = {phase: self._lanes(phase, cur, nxt, gpu_batch_size, num_gpu_batches, switches,
                                        weights, cache, act, disk_cached) for phase in PHASES}
            out.append(LayerCost(cur.name, count, cur.kind is not LayerKind.INPUT, lanes["prefill"], lanes["decode"]))
        return out

    def _lanes(self, phase: str, cur: LayerFacts, nxt: LayerFacts, batch: int, num_batches: int,
               switches: Switches, weights: WeightShares, cache: TierShares, act: TierShares,
               disk_cached: bool) -> Lanes:
        hw, workload, rate = self.hw, self.workload.as_run_by(switches), self.rates(disk_cached)
        row_bytes = self.memory_model.cache_row_bytes
        cuda = hw.cuda
        cpu_attention = switches.cpu_cache_compute and cuda
        prefill = phase == "prefill"
        lanes = Lanes()

        # Next layer's weights: disk -> host, then (CUDA) host -> device, once per step for all batches.
        w_bytes = nxt.weight_bytes_compressed if switches.compress_weight else nxt.weight_bytes
        w = weights(nxt)
        to_device = w.off_gpu / rate["cpu_to_gpu"] if cuda else Linear()
        lanes.load["weights"] = w_bytes * (w.disk / rate["disk_to_cpu"] + to_device)

        # KV cache. Decode reads the rows written so far of each batch; the engine prefetches batch b+1
        # during batch b, and the next layer's first batch during this layer's last.
        row = row_bytes(batch, switches.compress_cache)
        if not prefill:
            def cache_load(facts: LayerFacts) -> Linear:
                if facts.kind is not LayerKind.ATTENTION:
                    return Linear()
                per_batch = workload.decode_rows_loaded * row
                to_device = cache.off_gpu / rate["cpu_to_gpu"] if cuda and not cpu_attention else Linear()
                return num_batches * per_batch * (cache.disk / rate["disk_to_cpu"] + to_device)

            lanes.load["cache"] = (cache_load(cur) * (num_batches - 1) + cache_load(nxt)) / num_batches
        if workload.shared_prefix_len and nxt.kind is LayerKind.ATTENTION:
            # The shared prefix's K/V (one sequence) loads with the next layer's weights, once per step for
            # all the block's batches (schedule._load_layer): its exact rows for the prompt pass, its stored
            # (4-bit with compress_cache) rows for decode.
            prefix_bytes = workload.shared_prefix_len * row_bytes(1, switches.compress_cache and not prefill)
            to_device = cache.off_gpu / rate["cpu_to_gpu"] if cuda and not cpu_attention else Linear()
            lanes.load["prefix"] = prefix_bytes * (cache.disk / rate["disk_to_cpu"] + to_device)
        if cur.kind is LayerKind.ATTENTION:
            if prefill:  # the prompt's own rows, computed on the device, copied into their home buffers
                rows = workload.own_len * row
                # On a CPU host the copies into the gpu- and cpu-tier homes are memcpys.
                to_host = (cache.off_gpu if cuda else cache.gpu + cache.cpu) / rate["gpu_to_cpu_cache"]
                lanes.store["cache"] = num_batches * rows * (to_host + cache.disk / rate["cpu_to_disk_cache_prefill"])
            else:  # one new row; with CPU attention it is written in the host buffer in place
                to_host = cache.off_gpu / rate["gpu_to_cpu_cache"] if cuda and not cpu_attention else Linear()
                lanes.store["cache"] = num_batches * row * (to_host + cache.disk / rate["cpu_to_disk_decode"])

        # Hidden states (batch, tokens, H) of each batch, split by rows; none when all on the device.
        tokens = workload.own_len if prefill else 1
        hidden = batch * tokens * self.shape.hidden_size * self.dtype_bytes
        if cur.kind is not LayerKind.INPUT:
            to_device = act.off_gpu / rate["cpu_to_gpu"] if cuda else Linear()
            lanes.load["activations"] = num_batches * hidden * (act.disk / rate["disk_to_cpu"] + to_device)
        if cur.kind is not LayerKind.OUTPUT:
            to_host = act.off_gpu if cuda else act.cpu  # on a CPU host, disk rows are written as they are
            to_disk = rate["cpu_to_disk_hidden_prefill"] if prefill else rate["cpu_to_disk_decode"]
            lanes.store["activations"] = num_batches * hidden * (to_host / rate["gpu_to_cpu_hidden"]
                                                                 + act.disk / to_disk)

        # Compute: matmuls (logits only for the last position), attention, decompression, overhead.
        lanes.compute.update(self._compute(phase, cur, batch, num_batches, switches, cache, cpu_attention))
        return lanes

    def _compute(self, phase: str, cur: LayerFacts, batch: int, num_batches: int, switches: Switches,
                 cache: TierShares, cpu_attention: bool) -> dict[str, Linear]:
        hw, workload = self.hw, self.workload.as_run_by(switches)
        row_bytes = self.memory_model.cache_row_bytes
        prefill = phase == "prefill"
        out: dict[str, Linear] = {}
        logits_of_all = cur.kind is not LayerKind.OUTPUT or self.echo_prompt
        tokens = workload.own_len if prefill and logits_of_all else 1
        if cur.matrix_params:
            out["matmul"] = Linear(num_batches * self.matmul_seconds(batch * tokens, cur.matrix_params, prefill))
        if switches.compress_weight:  # once per layer per step, for all the block's batches
            out["decompress"] = Linear(self.decompress_seconds(cur.weight_bytes, cur.weight_bytes_compressed))
        if cur.kind is LayerKind.ATTENTION:
            q_width = self.shape.num_heads * self.shape.head_dim
            if prefill:  # each sequence's own queries over the prefix's keys and its own
                work = num_batches * 4 * batch * workload.own_len * workload.prompt_len * q_width
                out["attention"] = Linear(work / hw.gpu_batched_matmul_prefill)
            else:
                # Decode attention is bound by reading the cache: charged as its MHA-equivalent flops,
                # 4 * batch * keys * kv_width (the real flops when there is one query head per KV head).
                work = 4 * batch * workload.decode_keys * self.shape.kv_width
                on_device = cache.gpu if cpu_attention else Linear(1.0)
                out["attention"] = num_batches * work / hw.gpu_batched_matmul_decode * on_device
                if cpu_attention:
                    out["cpu_attention"] = num_batches * work / self.cpu_attention_rate(batch) * cache.off_gpu
                if switches.compress_cache:
                    dense = workload.decode_own_keys * row_bytes(batch, False)
                    stored = workload.decode_own_keys * row_bytes(batch, True)
                    out["decompress_cache"] = num_batches * self.decompress_seconds(dense, stored) * on_device
                    if workload.shared_prefix_len:  # the prefix's 4-bit rows, once per layer and step for all batches
                        dense = workload.shared_prefix_len * row_bytes(1, False)
                        stored = workload.shared_prefix_len * row_bytes(1, True)
                        out["decompress_cache"] += self.decompress_seconds(dense, stored) * on_device
        if hw.layer_overhead_s:
            out["overhead"] = Linear(num_batches * hw.layer_overhead_s)
        return out

    def step_seconds(self, units: list[LayerCost], overlap: bool, serial: bool) -> dict[str, float]:
        """Seconds of one prefill step and one decode step."""
        out = {}
        for phase in PHASES:
            total = 0.0
            for unit in units:
                lanes = getattr(unit, phase)
                t = {lane: lanes.total(lane).value() for lane in LANES}
                total += unit.count * combine(t, overlap, serial and unit.reads_hidden, self.hw.io_overlap)
            out[phase] = total
        return out

    @staticmethod
    def _breakdown(units: list[LayerCost], phase: str, repeat: int) -> dict[str, float]:
        """"lane.category" -> seconds of one phase, summed over layers, `repeat` times."""
        sums: dict[str, float] = {}
        for unit in units:
            lanes = getattr(unit, phase)
            for lane in LANES:
                for category, form in getattr(lanes, lane).items():
                    key = f"{lane}.{category}"
                    sums[key] = sums.get(key, 0.0) + repeat * unit.count * form.value()
        return {key: value for key, value in sorted(sums.items()) if value > 0}

    def prefix_pass(self, policy: Policy, disk_cached: bool) -> tuple[float, dict[str, float]]:
        """Seconds of the shared prefix's own pass, once per run, and their breakdown (empty without a
        prefix): one sequence of its tokens through every layer, each layer's weights loaded, logits at every
        position (its tokens' logprobs), its K/V stored exactly on the cache's tiers (BlockRunner.run_prefix).
        With compress_cache a 4-bit copy is then made of it, one sequence's rows: not costed."""
        prefix_len = self.workload.as_run_by(policy).shared_prefix_len
        if not prefix_len:
            return 0.0, {}
        if self._prefix_model is None:
            self._prefix_model = CostModel(self.model, Workload(prefix_len, 1), self.hw, self.dtype_bytes,
                                           echo_prompt=True)
        model = self._prefix_model
        one = policy.replace(gpu_batch_size=1, num_gpu_batches=1, compress_cache=False)
        weights, cache, act = model.memory_model.placement(one)
        units = model.units(1, 1, Switches.of(one), weights, cache, act, disk_cached)
        serial = serial_load(act.gpu.value() >= 1.0, 1)
        seconds = model.step_seconds(units, one.overlap, serial)["prefill"]
        return seconds, self._breakdown(units, "prefill", 1)

    def estimate(self, policy: Policy, disk_cached: bool | None = None, full_memory: bool = False) -> Estimate:
        """Predicted prefill, decode, throughput and peak memory of one block under `policy`, and the time
        of a shared prefix's pass (`prefix_s`, "prefix" in the breakdown)."""
        wl = self.workload.as_run_by(policy)
        report = self.memory_model.exact_memory(policy, full=full_memory)
        if disk_cached is None:
            disk_cached = self.memory_model.disk_fits_page_cache(report)
        weights, cache, act = self.memory_model.placement(policy)
        switches = Switches.of(policy)
        units = self.units(policy.gpu_batch_size, policy.num_gpu_batches, switches, weights, cache, act, disk_cached)
        serial = serial_load(act.gpu.value() >= 1.0, policy.num_gpu_batches)
        steps = self.step_seconds(units, policy.overlap, serial)
        breakdown = {phase: self._breakdown(units, phase, repeat)
                     for phase, repeat in (("prefill", 1), ("decode", wl.decode_steps))}
        prefix_s, prefix_breakdown = self.prefix_pass(policy, disk_cached)
        if wl.shared_prefix_len:
            breakdown["prefix"] = prefix_breakdown
        return Estimate(policy, wl, steps["prefill"], wl.decode_steps * steps["decode"], breakdown, report,
                        disk_cached, prefix_s)
