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

Every term is a `Linear` form in the placement fractions (`VARS`), so the planner's linear program uses
the very same terms with the fractions as variables; a concrete policy plugs in the fractions the engine
really places (weights by the byte-midpoint rule, cache by KV heads, activations by batch rows). Memory is
the engine's exact accounting (`memory.account`), compression included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from flexgen_core import memory, placement
from flexgen_core.models.base import LayerKind
from flexgen_core.plan.hardware import HardwareProfile
from flexgen_core.plan.shapes import PlanModel, matrix_params
from flexgen_core.policy import SWITCHES, Policy

VARS = ("w_gpu", "w_cpu", "w_disk", "cache_gpu", "cache_cpu", "cache_disk", "act_gpu", "act_cpu", "act_disk")
TIERS = placement.TIERS
PHASES = ("prefill", "decode")
LANES = ("load", "store", "compute")


# ---- linear forms ---------------------------------------------------------------------------------

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
class Split:
    """Shares of one quantity on each tier (fractions summing to 1), constants or LP variables."""

    gpu: Linear
    cpu: Linear
    disk: Linear

    @classmethod
    def variables(cls, prefix: str) -> "Split":
        return cls(Linear.var(f"{prefix}_gpu"), Linear.var(f"{prefix}_cpu"), Linear.var(f"{prefix}_disk"))

    @classmethod
    def of(cls, gpu: float, cpu: float, disk: float) -> "Split":
        return cls(Linear(gpu), Linear(cpu), Linear(disk))

    @property
    def off_gpu(self) -> Linear:
        return self.cpu + self.disk


# ---- inputs ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    """Prompts of `prompt_len` tokens (as padded in a block), each generating `gen_len`. The first
    `shared_prefix_len` tokens of every prompt are one prefix that the engine computes once and shares
    (it does so for a prefix flexgen_core/prefix.py calls sharable);
    the other `own_len` are each sequence's own."""

    prompt_len: int
    gen_len: int
    shared_prefix_len: int = 0

    def __post_init__(self) -> None:
        for name in ("prompt_len", "gen_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Workload.{name} must be an integer >= 1, got {value!r}")
        prefix = self.shared_prefix_len
        if isinstance(prefix, bool) or not isinstance(prefix, int) or not 0 <= prefix < self.prompt_len:
            raise ValueError(f"Workload.shared_prefix_len must be an integer in [0, prompt_len={self.prompt_len}) "
                             f"(each prompt keeps at least one token of its own), got {prefix!r}")

    @property
    def own_len(self) -> int:
        """Tokens of each prompt after the shared prefix: what a block's prompt pass computes."""
        return self.prompt_len - self.shared_prefix_len

    @property
    def total_len(self) -> int:
        return self.prompt_len + self.gen_len

    @property
    def cache_len(self) -> int:
        """Rows of each sequence in a block's KV cache: its own prompt tokens and the generated ones."""
        return self.own_len + self.gen_len

    def unshared(self) -> "Workload":
        """The same prompts with nothing shared (as a policy with share_prefix off runs them)."""
        return Workload(self.prompt_len, self.gen_len)

    @property
    def decode_steps(self) -> int:
        return self.gen_len - 1

    @property
    def decode_rows_loaded(self) -> float:
        """Rows of each sequence's own cache read per decode step, averaged over steps 1..gen_len-1 (step t
        reads own + t - 1). A shared prefix's rows are read apart: once per step and layer, for all batches."""
        return self.own_len + (self.gen_len - 2) / 2

    @property
    def decode_keys(self) -> float:
        """Keys each sequence attends per decode step, averaged (prompt + t at step t, a shared prefix's
        keys included)."""
        return self.prompt_len + self.gen_len / 2

    @property
    def decode_own_keys(self) -> float:
        """Of those, the keys in the sequence's own cache (own + t at step t)."""
        return self.own_len + self.gen_len / 2


@dataclass(frozen=True)
class Switches:
    """The policy's switches that change costs (placement fractions and batch shape aside)."""

    overlap: bool = True
    cpu_cache_compute: bool = False
    compress_weight: bool = False
    compress_cache: bool = False
    share_prefix: bool = True

    @classmethod
    def of(cls, policy: Policy) -> "Switches":
        return cls(**{switch.name: getattr(policy, switch.name) for switch in SWITCHES if switch.costed})


def cache_compression_ratio(head_dim: int, dtype_bytes: int) -> float:
    """Stored/dense bytes of the KV cache compressed as the engine does (`memory.CACHE_COMPRESSION`: 4-bit,
    group 64 along the head dim), per head row."""
    from flexgen_core.compression import compressed_nbytes

    return compressed_nbytes((1, head_dim), memory.CACHE_COMPRESSION) / (head_dim * dtype_bytes)


@dataclass
class SharedPrefixMemory(memory.MemoryReport):
    """Bytes per tier of a run whose prompts share a prefix the engine computes once (engine._shared_prefix).

    The terms of `memory.MemoryReport` are a block's: `memory.account` over each sequence's own tokens.
    `shared_prefix` is the prefix's K/V held beside every block: the cache and cache_staging terms of
    `memory.add_shared_prefix_terms` (the engine's `last_allocated` names it so). `prefix_pass` is all that
    `memory.add_shared_prefix_terms` counts: that K/V, and the hidden states and workspace of the pass that
    computes it, before the first block. `peak` is the larger of the two phases, per tier."""

    shared_prefix: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    prefix_pass: memory.MemoryReport = field(default_factory=memory.MemoryReport)

    TERMS = memory.MemoryReport.TERMS + ("shared_prefix",)

    @classmethod
    def of(cls, block: memory.MemoryReport, layers, shape, policy: Policy, prefix_len: int, dtype_bytes: int,
           split: bool) -> "SharedPrefixMemory":
        prefix = memory.MemoryReport()
        memory.add_shared_prefix_terms(prefix, layers, shape, policy, prefix_len, dtype_bytes, split)
        report = cls(**{term: dict(getattr(block, term)) for term in memory.MemoryReport.TERMS}, prefix_pass=prefix)
        report.shared_prefix = {tier: prefix.cache[tier] + prefix.cache_staging[tier] for tier in TIERS}
        return report

    @property
    def block_peak(self) -> dict[str, int]:
        """While a block runs: the weights, the prefix's K/V and the block's own terms."""
        return {tier: sum(getattr(self, term)[tier] for term in self.TERMS) for tier in TIERS}

    @property
    def prefix_pass_peak(self) -> dict[str, int]:
        """While the prefix's pass runs: the weights and everything the pass holds."""
        held = self.prefix_pass.peak
        return {tier: self.weights[tier] + self.weight_staging[tier] + held[tier] for tier in TIERS}

    @property
    def peak(self) -> dict[str, int]:
        block, prefix = self.block_peak, self.prefix_pass_peak
        return {tier: max(block[tier], prefix[tier]) for tier in TIERS}

    def to_dict(self) -> dict[str, dict[str, int]]:
        prefix_terms = ("cache", "cache_staging", "activations", "workspace")
        return super().to_dict() | {
            "prefix_pass": {term: dict(getattr(self.prefix_pass, term)) for term in prefix_terms},
            "block_peak": self.block_peak,
            "prefix_pass_peak": self.prefix_pass_peak,
        }


# ---- per-layer facts ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerFacts:
    name: str
    kind: LayerKind
    specs: tuple
    weight_bytes: int             # dense, in the compute dtype
    weight_bytes_compressed: int  # 4-bit where the weight allows it
    matrix_params: int            # parameters multiplied by per token
    dense_compressible: int       # the compressible weights decompressed (aligned), a device buffer
    @property
    def signature(self) -> tuple:
        return self.kind, tuple((s.shape, s.compress_group_dim) for s in self.specs)


@dataclass(frozen=True)
class Lanes:
    """Seconds on each lane for one layer and all GPU batches of a block, by category."""

    load: dict[str, Linear] = field(default_factory=dict)
    store: dict[str, Linear] = field(default_factory=dict)
    compute: dict[str, Linear] = field(default_factory=dict)

    def total(self, lane: str) -> Linear:
        return sum(getattr(self, lane).values(), Linear())


@dataclass(frozen=True)
class Unit:
    """One kind of layer in the step, `count` times: its lanes in prefill and decode."""

    name: str
    count: int
    reads_hidden: bool
    prefill: Lanes
    decode: Lanes


def _larger(a: Linear, b: Linear) -> Linear:
    """The larger of two forms that are constants or multiples of the same fractions (for a maximum over
    layers: with variable fractions every layer's share is bytes x the same fraction)."""
    if not a.coef and not b.coef:
        return a if a.const >= b.const else b
    if not a.coef or not b.coef:  # a zero constant against a share
        return b if not a.const and b.coef else a if not b.const and a.coef else _bad(a, b)
    ratio = {key: b.coef.get(key, 0.0) / value for key, value in a.coef.items()}
    assert len(set(ratio.values())) == 1 and set(a.coef) == set(b.coef), (a, b)
    return b if next(iter(ratio.values())) > 1 else a


def _bad(a: Linear, b: Linear) -> Linear:
    raise AssertionError(f"cannot compare {a} and {b}")


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
    memory: memory.MemoryReport
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
        self.model = model
        self.shape = model.shape
        self.workload = workload
        self.hw = hardware
        self.dtype_bytes = dtype_bytes
        self.echo_prompt = echo_prompt
        self._prefix_model: CostModel | None = None  # the shared prefix's pass, built when first costed
        facts = [self._facts(layer) for layer in model.layers]
        self.layers = facts
        # Layers that cost the same (same weights, same next layer) are costed once: OPT has five kinds.
        groups: dict[tuple, list] = {}
        for idx, cur in enumerate(facts):
            nxt = facts[(idx + 1) % len(facts)]  # the output layer prefetches the next step's input layer
            key = (cur.signature, nxt.signature)
            if key not in groups:
                groups[key] = [cur, nxt, 0]
            groups[key][2] += 1
        self.templates = [(cur, nxt, count) for cur, nxt, count in groups.values()]
        kinds: dict[tuple, list] = {}
        for f in facts:
            kinds.setdefault(f.signature, [f, 0])[1] += 1
        self.layer_groups = [(f, count) for f, count in kinds.values()]  # identical layers, counted
        self.num_attention = sum(1 for f in facts if f.kind is LayerKind.ATTENTION)
        self.cache_ratio = cache_compression_ratio(self.shape.head_dim, dtype_bytes)

    def workload_for(self, switches: Switches | Policy) -> Workload:
        """The workload as a policy runs it: with share_prefix off, nothing is shared."""
        return self.workload if switches.share_prefix else self.workload.unshared()

    def _facts(self, layer) -> LayerFacts:
        dense = sum(s.numel for s in layer.specs) * self.dtype_bytes
        compressed = sum(memory.weight_nbytes(s, self.dtype_bytes, memory.WEIGHT_COMPRESSION) for s in layer.specs)
        dense_compressible = sum(memory.align(s.numel * self.dtype_bytes)
                                 for s in layer.specs if s.compress_group_dim is not None)
        return LayerFacts(layer.name, layer.kind, tuple(layer.specs), dense, compressed, matrix_params(layer),
                          dense_compressible)

    # ---- rates ----------------------------------------------------------------------------------
    def rates(self, disk_cached: bool) -> dict[str, float]:
        hw = self.hw
        read = hw.disk_to_cpu_cached if disk_cached and hw.disk_to_cpu_cached else hw.disk_to_cpu
        cached_write = hw.cpu_to_disk_cached if disk_cached and hw.cpu_to_disk_cached else None
        return {
            "ctog": hw.cpu_to_gpu, "gtoc_cache": hw.gpu_to_cpu_cache, "gtoc_hidden": hw.gpu_to_cpu_hidden,
            "dtoc": read,
            "ctod_cache_prefill": cached_write or hw.cpu_to_disk_cache_prefill,
            "ctod_hidden_prefill": cached_write or hw.cpu_to_disk_hidden_prefill,
            "ctod_decode": cached_write or hw.cpu_to_disk_decode,
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

    def cache_row_bytes(self, gpu_batch_size: int, compressed: bool) -> float:
        """K and V of one position for one GPU batch and one attention layer, as stored."""
        dense = 2 * gpu_batch_size * self.shape.kv_width * self.dtype_bytes
        return dense * self.cache_ratio if compressed else dense

    # ---- time -----------------------------------------------------------------------------------
    def units(self, gpu_batch_size: int, num_gpu_batches: int, switches: Switches,
              weights: Callable[[LayerFacts], Split], cache: Split, act: Split, disk_cached: bool) -> list[Unit]:
        """Each kind of layer's lanes, in prefill and decode, as linear forms of the placement."""
        out = []
        for cur, nxt, count in self.templates:
            lanes = {phase: self._lanes(phase, cur, nxt, gpu_batch_size, num_gpu_batches, switches,
                                        weights, cache, act, disk_cached) for phase in PHASES}
            out.append(Unit(cur.name, count, cur.kind is not LayerKind.INPUT, lanes["prefill"], lanes["decode"]))
        return out

    def _lanes(self, phase: str, cur: LayerFacts, nxt: LayerFacts, B: int, k: int, sw: Switches,
               weights: Callable[[LayerFacts], Split], cache: Split, act: Split, disk_cached: bool) -> Lanes:
        hw, wl, r = self.hw, self.workload_for(sw), self.rates(disk_cached)
        cuda = hw.cuda
        cpu_attention = sw.cpu_cache_compute and cuda
        prefill = phase == "prefill"
        lanes = Lanes()

        # Next layer's weights: disk -> host, then (CUDA) host -> device, once per step for all batches.
        w_bytes = nxt.weight_bytes_compressed if sw.compress_weight else nxt.weight_bytes
        w = weights(nxt)
        lanes.load["weights"] = w_bytes * (w.disk / r["dtoc"] + (w.off_gpu / r["ctog"] if cuda else Linear()))

        # KV cache. Decode reads the rows written so far of each batch; the engine prefetches batch b+1
        # during batch b, and the next layer's first batch during this layer's last.
        row = self.cache_row_bytes(B, sw.compress_cache)
        if not prefill:
            def cache_load(facts: LayerFacts) -> Linear:
                if facts.kind is not LayerKind.ATTENTION:
                    return Linear()
                per_batch = wl.decode_rows_loaded * row
                to_device = cache.off_gpu / r["ctog"] if cuda and not cpu_attention else Linear()
                return k * per_batch * (cache.disk / r["dtoc"] + to_device)

            lanes.load["cache"] = cache_load(cur) * ((k - 1) / k) + cache_load(nxt) * (1 / k)
        if wl.shared_prefix_len and nxt.kind is LayerKind.ATTENTION:
            # The shared prefix's K/V (one sequence) loads with the next layer's weights, once per step for
            # all the block's batches (schedule._load_layer): its exact rows for the prompt pass, its stored
            # (4-bit with compress_cache) rows for decode.
            prefix_bytes = wl.shared_prefix_len * self.cache_row_bytes(1, sw.compress_cache and not prefill)
            to_device = cache.off_gpu / r["ctog"] if cuda and not cpu_attention else Linear()
            lanes.load["prefix"] = prefix_bytes * (cache.disk / r["dtoc"] + to_device)
        if cur.kind is LayerKind.ATTENTION:
            if prefill:  # the prompt's own rows, computed on the device, copied into their home buffers
                rows = wl.own_len * row
                # On a CPU host the copies into the gpu- and cpu-tier homes are memcpys.
                to_host = cache.off_gpu / r["gtoc_cache"] if cuda else (cache.gpu + cache.cpu) / r["gtoc_cache"]
                lanes.store["cache"] = k * rows * (to_host + cache.disk / r["ctod_cache_prefill"])
            else:  # one new row; with CPU attention it is written in the host buffer in place
                to_host = cache.off_gpu / r["gtoc_cache"] if cuda and not cpu_attention else Linear()
                lanes.store["cache"] = k * row * (to_host + cache.disk / r["ctod_decode"])

        # Hidden states (B, tokens, H) of each batch, split by rows; none when all on the device.
        tokens = wl.own_len if prefill else 1
        hidden = B * tokens * self.shape.hidden_size * self.dtype_bytes
        if cur.kind is not LayerKind.INPUT:
            to_device = act.off_gpu / r["ctog"] if cuda else Linear()
            lanes.load["activations"] = k * hidden * (act.disk / r["dtoc"] + to_device)
        if cur.kind is not LayerKind.OUTPUT:
            to_host = act.off_gpu if cuda else act.cpu  # on a CPU host, disk rows are written as they are
            to_disk = r["ctod_hidden_prefill"] if prefill else r["ctod_decode"]
            lanes.store["activations"] = k * hidden * (to_host / r["gtoc_hidden"] + act.disk / to_disk)

        # Compute: matmuls (logits only for the last position), attention, decompression, overhead.
        lanes.compute.update(self._compute(phase, cur, B, k, sw, cache, cpu_attention))
        return lanes

    def _compute(self, phase: str, cur: LayerFacts, B: int, k: int, sw: Switches, cache: Split,
                 cpu_attention: bool) -> dict[str, Linear]:
        hw, wl = self.hw, self.workload_for(sw)
        prefill = phase == "prefill"
        out: dict[str, Linear] = {}
        logits_of_all = cur.kind is not LayerKind.OUTPUT or self.echo_prompt
        tokens = wl.own_len if prefill and logits_of_all else 1
        if cur.matrix_params:
            out["matmul"] = Linear(k * self.matmul_seconds(B * tokens, cur.matrix_params, prefill))
        if sw.compress_weight:  # once per layer per step, for all the block's batches
            out["decompress"] = Linear(self.decompress_seconds(cur.weight_bytes, cur.weight_bytes_compressed))
        if cur.kind is LayerKind.ATTENTION:
            q_width = self.shape.num_heads * self.shape.head_dim
            if prefill:  # each sequence's own queries over the prefix's keys and its own
                work = k * 4 * B * wl.own_len * wl.prompt_len * q_width
                out["attention"] = Linear(work / hw.gpu_batched_matmul_prefill)
            else:
                # Decode attention is bound by reading the cache: charged as its MHA-equivalent flops,
                # 4 * B * keys * kv_width (the real flops when there is one query head per KV head).
                work = 4 * B * wl.decode_keys * self.shape.kv_width
                on_device = cache.gpu if cpu_attention else Linear(1.0)
                out["attention"] = k * work / hw.gpu_batched_matmul_decode * on_device
                if cpu_attention:
                    out["cpu_attention"] = k * work / self.cpu_attention_rate(B) * cache.off_gpu
                if sw.compress_cache:
                    dense = wl.decode_own_keys * self.cache_row_bytes(B, False)
                    stored = wl.decode_own_keys * self.cache_row_bytes(B, True)
                    out["decompress_cache"] = k * self.decompress_seconds(dense, stored) * on_device
                    if wl.shared_prefix_len:  # the prefix's 4-bit rows, once per layer and step for all batches
                        dense = wl.shared_prefix_len * self.cache_row_bytes(1, False)
                        stored = wl.shared_prefix_len * self.cache_row_bytes(1, True)
                        out["decompress_cache"] += self.decompress_seconds(dense, stored) * on_device
        if hw.layer_overhead_s:
            out["overhead"] = Linear(k * hw.layer_overhead_s)
        return out

    # ---- memory ---------------------------------------------------------------------------------
    def memory_forms(self, gpu_batch_size: int, num_gpu_batches: int, switches: Switches,
                     weights: Callable[[LayerFacts], Split], cache: Split, act: Split) -> dict[str, Linear]:
        """Bytes per tier while a block runs, as linear forms, mirroring memory.account term by term (and
        with a shared prefix its K/V beside the block, memory.add_shared_prefix_terms). With variable weight
        fractions every layer shares one Split (fractions of bytes, not whole tensors); with a concrete
        placement each layer has its own constant Split."""
        B, k, wl = gpu_batch_size, num_gpu_batches, self.workload_for(switches)
        forms = self._weight_forms(switches, weights)
        self._add_cache_forms(forms, B, k, wl.cache_len, switches.compress_cache, switches, cache)
        self._add_activation_forms(forms, B, k, wl.own_len, act)
        forms["gpu"] += memory.workspace_bound(self.shape, B, wl.own_len, wl.cache_len, self.dtype_bytes, False,
                                                 wl.shared_prefix_len)
        if wl.shared_prefix_len:
            self._add_prefix_cache_forms(forms, wl.shared_prefix_len, switches, cache)
        return forms

    def prefix_pass_forms(self, switches: Switches, weights: Callable[[LayerFacts], Split], cache: Split,
                          act: Split) -> dict[str, Linear] | None:
        """Bytes per tier while the shared prefix's pass runs, before any block (None without a prefix): the
        weights, the prefix's K/V, and the pass's hidden states and workspace (one sequence of the prefix's
        tokens, logits at every position), as memory.add_shared_prefix_terms counts them."""
        prefix_len = self.workload_for(switches).shared_prefix_len
        if not prefix_len:
            return None
        forms = self._weight_forms(switches, weights)
        self._add_prefix_cache_forms(forms, prefix_len, switches, cache)
        self._add_activation_forms(forms, 1, 1, prefix_len, act)
        forms["gpu"] += memory.workspace_bound(self.shape, 1, prefix_len, prefix_len, self.dtype_bytes, True)
        return forms

    def _weight_forms(self, switches: Switches, weights: Callable[[LayerFacts], Split]) -> dict[str, Linear]:
        """The weights and their staging slots (memory.add_weight_terms)."""
        slots = memory.num_slots(switches)
        forms = {tier: Linear() for tier in TIERS}
        host_stage, device_stage = Linear(), Linear()
        for facts, count in self.layer_groups:
            nbytes = facts.weight_bytes_compressed if switches.compress_weight else facts.weight_bytes
            split = weights(facts)
            for tier in TIERS:
                forms[tier] += count * nbytes * getattr(split, tier)
            host_stage = _larger(host_stage, nbytes * split.disk)
            device_stage = _larger(device_stage, nbytes * split.off_gpu)
        forms["cpu"] += slots * host_stage  # each staging slot holds the largest layer's share
        if self.hw.cuda:
            forms["gpu"] += slots * device_stage
        if switches.compress_weight:  # each slot decompresses the largest layer into a dense device buffer
            forms["gpu"] += slots * max(f.dense_compressible for f in self.layers)
        return forms

    def _add_cache_forms(self, forms: dict[str, Linear], batch: int, num_batches: int, rows: int, compressed: bool,
                         switches: Switches, cache: Split) -> None:
        """K and V of `rows` positions of `num_batches` batches of `batch` sequences in every attention layer,
        and their staging slots (the cache terms of memory.add_block_terms)."""
        slots = memory.num_slots(switches)
        seg = rows * self.cache_row_bytes(batch, compressed)  # one layer, one batch, all heads
        for tier in TIERS:
            forms[tier] += num_batches * self.num_attention * seg * getattr(cache, tier)
        forms["cpu"] += slots * seg * cache.disk
        if self.hw.cuda and not switches.cpu_cache_compute:
            forms["gpu"] += slots * seg * cache.off_gpu
        if compressed:  # rows decompressed where attention runs (the device: see the planner)
            forms["gpu"] += slots * rows * self.cache_row_bytes(batch, False)

    def _add_prefix_cache_forms(self, forms: dict[str, Linear], prefix_len: int, switches: Switches,
                                cache: Split) -> None:
        """The shared prefix's K/V: one sequence's exact rows and, with compress_cache, a 4-bit copy."""
        self._add_cache_forms(forms, 1, 1, prefix_len, False, switches, cache)
        if switches.compress_cache:
            self._add_cache_forms(forms, 1, 1, prefix_len, True, switches, cache)

    def _add_activation_forms(self, forms: dict[str, Linear], batch: int, num_batches: int, tokens: int,
                              act: Split) -> None:
        """Hidden states of the prompt pass, split by rows, and the host staging buffer of one batch's disk rows."""
        hidden = num_batches * batch * tokens * self.shape.hidden_size * self.dtype_bytes
        for tier in TIERS:
            forms[tier] += hidden * getattr(act, tier)
        forms["cpu"] += (hidden / num_batches) * act.disk

    def totals(self, gpu_batch_size: int, num_gpu_batches: int, switches: Switches) -> dict[str, float]:
        """Bytes of all weights, all KV cache (a shared prefix's included) and all hidden states of a block
        (wherever they live)."""
        wl = self.workload_for(switches)
        weights = sum(f.weight_bytes_compressed if switches.compress_weight else f.weight_bytes for f in self.layers)
        cache = (num_gpu_batches * self.num_attention * wl.cache_len
                 * self.cache_row_bytes(gpu_batch_size, switches.compress_cache))
        if wl.shared_prefix_len:
            copies = self.cache_row_bytes(1, False) + (self.cache_row_bytes(1, True) if switches.compress_cache else 0)
            cache += self.num_attention * wl.shared_prefix_len * copies
        hidden = num_gpu_batches * gpu_batch_size * wl.own_len * self.shape.hidden_size * self.dtype_bytes
        return {"w": weights, "cache": cache, "act": hidden}

    def exact_memory(self, policy: Policy, full: bool = False) -> memory.MemoryReport:
        """The engine's accounting of `policy` (`memory.account`, compression included).

        By default `memory.account` runs on one layer of each kind (for the staging slots, which fit the
        largest layer, and the cache, which scales with the number of attention layers) and once per kind
        alone (for the weights, which add up): the same numbers, many times faster for a search.
        `full=True` runs it on the whole model, as the planner's final check does.

        With a shared prefix, the block's terms count each sequence's own tokens, and the report is a
        `SharedPrefixMemory`: the prefix's K/V and pass as memory.add_shared_prefix_terms counts them."""
        wl = self.workload_for(policy)

        def account(layers) -> memory.MemoryReport:
            return memory.account(layers, self.shape, policy, wl.own_len, wl.gen_len, self.dtype_bytes,
                                  self.hw.cuda, prefix_len=wl.shared_prefix_len)

        if full:
            report = account(self.model.layers)
        else:
            report = account([facts for facts, _ in self.layer_groups])
            kinds_attention = sum(1 for facts, _ in self.layer_groups if facts.kind is LayerKind.ATTENTION)
            report.weights = dict.fromkeys(TIERS, 0)
            for facts, count in self.layer_groups:
                alone = account([facts])
                for tier in TIERS:
                    report.weights[tier] += count * alone.weights[tier]
            if kinds_attention:
                for tier in TIERS:
                    report.cache[tier] = report.cache[tier] // kinds_attention * self.num_attention
        if not wl.shared_prefix_len:
            return report
        # The prefix's terms count attention layers only: the whole model's list costs no more.
        return SharedPrefixMemory.of(report, self.model.layers, self.shape, policy, wl.shared_prefix_len,
                                     self.dtype_bytes, self.hw.cuda)

    # ---- a concrete policy ------------------------------------------------------------------------
    def placement(self, policy: Policy) -> tuple[Callable[[LayerFacts], Split], Split, Split]:
        """The fractions the engine really places: weights per layer by bytes, cache by KV heads,
        activations by batch rows."""
        memo: dict[tuple, Split] = {}

        def weights(facts: LayerFacts) -> Split:
            if facts.signature not in memo:
                placed = memory.place_layer_weights(facts.specs, policy, self.dtype_bytes)
                total = sum(p.nbytes for p in placed) or 1
                memo[facts.signature] = Split.of(*(sum(p.nbytes for p in placed if p.tier == t) / total for t in TIERS))
            return memo[facts.signature]

        heads = self.shape.num_kv_heads
        cache = Split.of(*(n / heads for n in placement.split_counts(heads, policy.cache_gpu_percent,
                                                                   policy.cache_cpu_percent)))
        B = policy.gpu_batch_size
        act = Split.of(*(n / B for n in placement.split_counts(B, policy.act_gpu_percent, policy.act_cpu_percent)))
        return weights, cache, act

    def step_seconds(self, units: list[Unit], overlap: bool, serial: bool) -> dict[str, float]:
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

    def disk_fits_page_cache(self, report: memory.MemoryReport) -> bool:
        """Whether the plan's disk files fit in host RAM that the plan leaves free (the profile's RAM
        minus what the gpu and cpu tiers use on this host): then disk I/O is served by the page cache."""
        if not self.hw.disk_to_cpu_cached:
            return False
        peak = report.peak
        used = peak["cpu"] + (peak["gpu"] if self.hw.unified else 0)
        return peak["disk"] <= self.hw.physical_cpu_bytes - used

    @staticmethod
    def _breakdown(units: list[Unit], phase: str, repeat: int) -> dict[str, float]:
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
        prefix_len = self.workload_for(policy).shared_prefix_len
        if not prefix_len:
            return 0.0, {}
        if self._prefix_model is None:
            self._prefix_model = CostModel(self.model, Workload(prefix_len, 1), self.hw, self.dtype_bytes,
                                           echo_prompt=True)
        model = self._prefix_model
        one = policy.replace(gpu_batch_size=1, num_gpu_batches=1, compress_cache=False)
        weights, cache, act = model.placement(one)
        units = model.units(1, 1, Switches.of(one), weights, cache, act, disk_cached)
        serial = serial_load(act.gpu.value() >= 1.0, 1)
        seconds = model.step_seconds(units, one.overlap, serial)["prefill"]
        return seconds, self._breakdown(units, "prefill", 1)

    def estimate(self, policy: Policy, disk_cached: bool | None = None, full_memory: bool = False) -> Estimate:
        """Predicted prefill, decode, throughput and peak memory of one block under `policy`, and the time
        of a shared prefix's pass (`prefix_s`, "prefix" in the breakdown)."""
        wl = self.workload_for(policy)
        report = self.exact_memory(policy, full=full_memory)
        if disk_cached is None:
            disk_cached = self.disk_fits_page_cache(report)
        weights, cache, act = self.placement(policy)
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
