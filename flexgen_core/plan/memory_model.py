"""Predicted memory of a policy: the engine's exact accounting (`memory.account`) for a concrete policy, and
the same terms as linear forms in the placement fractions for the planner's linear program.

The fractions a concrete policy places are the engine's own: weights per layer by bytes (the midpoint
rule of `memory.place_layer_weights`), the cache by KV heads, activations by batch rows
(`placement.split_counts`). `MemoryModel.memory_forms` mirrors `memory.account` term by term, and the
tests hold the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from flexgen_core import memory, placement
from flexgen_core.models.base import LayerKind
from flexgen_core.plan.forms import TIERS, Linear, TierShares, larger
from flexgen_core.plan.hardware import HardwareProfile
from flexgen_core.plan.shapes import PlanModel, matrix_params
from flexgen_core.plan.workload import Switches, Workload
from flexgen_core.policy import Policy

WeightShares = Callable[["LayerFacts"], TierShares]  # each layer's weights' shares on the tiers


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
           separate_device: bool) -> "SharedPrefixMemory":
        prefix = memory.MemoryReport()
        memory.add_shared_prefix_terms(prefix, layers, shape, policy, prefix_len, dtype_bytes, separate_device)
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


# ---- the model ------------------------------------------------------------------------------------

class MemoryModel:
    """Bytes per tier of one model and workload on one machine, for any policy."""

    def __init__(self, model: PlanModel, workload: Workload, hardware: HardwareProfile, dtype_bytes: int):
        self.model = model
        self.shape = model.shape
        self.workload = workload
        self.hw = hardware
        self.dtype_bytes = dtype_bytes
        self.layers = [self._facts(layer) for layer in model.layers]
        kinds: dict[tuple, list] = {}
        for f in self.layers:
            kinds.setdefault(f.signature, [f, 0])[1] += 1
        self.layer_groups = [(f, count) for f, count in kinds.values()]  # identical layers, counted
        self.num_attention = sum(1 for f in self.layers if f.kind is LayerKind.ATTENTION)
        self.cache_ratio = cache_compression_ratio(self.shape.head_dim, dtype_bytes)

    def _facts(self, layer) -> LayerFacts:
        dense = sum(s.numel for s in layer.specs) * self.dtype_bytes
        compressed = sum(memory.weight_nbytes(s, self.dtype_bytes, memory.WEIGHT_COMPRESSION) for s in layer.specs)
        dense_compressible = sum(memory.align(s.numel * self.dtype_bytes)
                                 for s in layer.specs if s.compress_group_dim is not None)
        return LayerFacts(layer.name, layer.kind, tuple(layer.specs), dense, compressed, matrix_params(layer),
                          dense_compressible)

    def cache_row_bytes(self, gpu_batch_size: int, compressed: bool) -> float:
        """K and V of one position for one GPU batch and one attention layer, as stored."""
        dense = 2 * gpu_batch_size * self.shape.kv_width * self.dtype_bytes
        return dense * self.cache_ratio if compressed else dense

    def memory_forms(self, gpu_batch_size: int, num_gpu_batches: int, switches: Switches,
                     weights: WeightShares, cache: TierShares, act: TierShares) -> dict[str, Linear]:
        """Bytes per tier while a block runs, as linear forms, mirroring memory.account term by term (and
        with a shared prefix its K/V beside the block, memory.add_shared_prefix_terms). With variable weight
        fractions every layer shares one TierShares (fractions of bytes, not whole tensors); with a concrete
        placement each layer has its own constant TierShares."""
        B, k, wl = gpu_batch_size, num_gpu_batches, self.workload.as_run_by(switches)
        forms = self._weight_forms(switches, weights)
        self._add_cache_forms(forms, B, k, wl.cache_len, switches.compress_cache, switches, cache)
        self._add_activation_forms(forms, B, k, wl.own_len, act)
        forms["gpu"] += memory.workspace_bound(self.shape, B, wl.own_len, wl.cache_len, self.dtype_bytes, False,
                                                 wl.shared_prefix_len)
        if wl.shared_prefix_len:
            self._add_prefix_cache_forms(forms, wl.shared_prefix_len, switches, cache)
        return forms

    def prefix_pass_forms(self, switches: Switches, weights: WeightShares, cache: TierShares,
                          act: TierShares) -> dict[str, Linear] | None:
        """Bytes per tier while the shared prefix's pass runs, before any block (None without a prefix): the
        weights, the prefix's K/V, and the pass's hidden states and workspace (one sequence of the prefix's
        tokens, logits at every position), as memory.add_shared_prefix_terms counts them."""
        prefix_len = self.workload.as_run_by(switches).shared_prefix_len
        if not prefix_len:
            return None
        forms = self._weight_forms(switches, weights)
        self._add_prefix_cache_forms(forms, prefix_len, switches, cache)
        self._add_activation_forms(forms, 1, 1, prefix_len, act)
        forms["gpu"] += memory.workspace_bound(self.shape, 1, prefix_len, prefix_len, self.dtype_bytes, True)
        return forms

    def _weight_forms(self, switches: Switches, weights: WeightShares) -> dict[str, Linear]:
        """The weights and their staging slots (memory.add_weight_terms)."""
        slots = memory.num_slots(switches)
        forms = {tier: Linear() for tier in TIERS}
        host_stage, device_stage = Linear(), Linear()
        for facts, count in self.layer_groups:
            nbytes = facts.weight_bytes_compressed if switches.compress_weight else facts.weight_bytes
            shares = weights(facts)
            for tier in TIERS:
                forms[tier] += count * nbytes * getattr(shares, tier)
            host_stage = larger(host_stage, nbytes * shares.disk)
            device_stage = larger(device_stage, nbytes * shares.off_gpu)
        forms["cpu"] += slots * host_stage  # each staging slot holds the largest layer's share
        if self.hw.cuda:
            forms["gpu"] += slots * device_stage
        if switches.compress_weight:  # each slot decompresses the largest layer into a dense device buffer
            forms["gpu"] += slots * max(f.dense_compressible for f in self.layers)
        return forms

    def _add_cache_forms(self, forms: dict[str, Linear], batch: int, num_batches: int, rows: int, compressed: bool,
                         switches: Switches, cache: TierShares) -> None:
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
                                cache: TierShares) -> None:
        """The shared prefix's K/V: one sequence's exact rows and, with compress_cache, a 4-bit copy."""
        self._add_cache_forms(forms, 1, 1, prefix_len, False, switches, cache)
        if switches.compress_cache:
            self._add_cache_forms(forms, 1, 1, prefix_len, True, switches, cache)

    def _add_activation_forms(self, forms: dict[str, Linear], batch: int, num_batches: int, tokens: int,
                              act: TierShares) -> None:
        """Hidden states of the prompt pass, split by rows, and the host staging buffer of one batch's disk rows."""
        hidden = num_batches * batch * tokens * self.shape.hidden_size * self.dtype_bytes
        for tier in TIERS:
            forms[tier] += hidden * getattr(act, tier)
        forms["cpu"] += (hidden / num_batches) * act.disk

    def totals(self, gpu_batch_size: int, num_gpu_batches: int, switches: Switches) -> dict[str, float]:
        """Bytes of all weights, all KV cache (a shared prefix's included) and all hidden states of a block
        (wherever they live)."""
        wl = self.workload.as_run_by(switches)
        weights = sum(f.weight_bytes_compressed if switches.compress_weight else f.weight_bytes for f in self.layers)
        cache = (num_gpu_batches * self.num_attention * wl.cache_len
                 * self.cache_row_bytes(gpu_batch_size, switches.compress_cache))
        if wl.shared_prefix_len:
            copies = self.cache_row_bytes(1, False)
            if switches.compress_cache:
                copies += self.cache_row_bytes(1, True)
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
        wl = self.workload.as_run_by(policy)

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

    def placement(self, policy: Policy) -> tuple[WeightShares, TierShares, TierShares]:
        """The fractions the engine really places: weights per layer by bytes, cache by KV heads,
        activations by batch rows."""
        memo: dict[tuple, TierShares] = {}

        def weights(facts: LayerFacts) -> TierShares:
            if facts.signature not in memo:
                placed = memory.place_layer_weights(facts.specs, policy, self.dtype_bytes)
                total = sum(p.nbytes for p in placed) or 1
                shares = (sum(p.nbytes for p in placed if p.tier == tier) / total for tier in TIERS)
                memo[facts.signature] = TierShares.of(*shares)
            return memo[facts.signature]

        heads = self.shape.num_kv_heads
        cache = TierShares.of(*(n / heads for n in placement.split_counts(heads, policy.cache_gpu_percent,
                                                                   policy.cache_cpu_percent)))
        B = policy.gpu_batch_size
        act = TierShares.of(*(n / B for n in placement.split_counts(B, policy.act_gpu_percent,
                                                                    policy.act_cpu_percent)))
        return weights, cache, act

    def disk_fits_page_cache(self, report: memory.MemoryReport) -> bool:
        """Whether the plan's disk files fit in host RAM that the plan leaves free (the profile's RAM
        minus what the gpu and cpu tiers use on this host): then disk I/O is served by the page cache."""
        if not self.hw.disk_to_cpu_cached:
            return False
        peak = report.peak
        used = peak["cpu"] + (peak["gpu"] if self.hw.unified else 0)
        return peak["disk"] <= self.hw.physical_cpu_bytes - used
