"""Policy search: a linear program over placement fractions, an outer search over batch shapes, rounding,
and a check against the engine's exact memory accounting (FlexGen paper, Sec. 4.3).

For a fixed (gpu_batch_size, num_gpu_batches) and fixed switches, the cost model's lane times are linear
in the nine placement fractions (weights, cache, activations on gpu / cpu / disk), so minimising the
block's time (prefill + (gen_len - 1) decode steps, each a sum over layers of the max over lanes) under
linear memory constraints is a linear program (lp.py), solved with cvxpy. The problem is built once per switch
setting with the batch shape's coefficients as parameters and re-solved for each batch shape.

The LP's memory forms split weights as fractions of bytes; the engine places whole tensors (byte
midpoints), the cache by KV heads and activations by batch rows. So each candidate's fractions are
rounded to integer percents and the resulting `Policy` is checked with `memory.account`, the engine's
own accounting; a policy over a tier is repaired by moving the share that costs least from that tier to
the next one down until it fits. A planned policy therefore never exceeds a tier, by construction.
Candidates whose weights the LP splits are re-solved with the weights fixed where the rounded policy
puts them, so the ranking sees whole tensors. Among the candidates evaluated exactly, those within
`tie_tolerance` (5%) of the fastest count as equal, and the one that offloads least, then the smallest
block, wins: the cost model is not more accurate than that. Attention on the CPU over a compressed
cache is not planned (its decompression on the CPU is not costed).

Tiers may be filled to `memory_fraction` of their size (default 0.95): the accounting is exact (the
engine's buffers and its compute's transients), so the margin only covers what it cannot see (the CUDA
context, library workspaces). On CUDA the GPU also keeps the profile's allocator reserve free: memory the
caching allocator holds but has not handed out (0.88 GiB measured on an H200 at a 6 GiB cap).
The paper's planner used 0.8 because its memory formulas were approximations.

With a shared prefix (`Workload.shared_prefix_len`) the block's time and memory count each sequence's own
tokens (cost_model.py), so larger blocks fit; the ranking is by a block's throughput, the prefix's one-off
pass aside. Memory must fit in both phases of the run: each block with the prefix's K/V beside it, and the
prefix's own pass before the first block (one more set of constraints in the linear program).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from itertools import product
from typing import Iterable

from flexgen_core.plan.cost_model import CostModel, Estimate
from flexgen_core.plan.forms import TIERS
from flexgen_core.plan.lp import PlacementLP
from flexgen_core.plan.memory_model import SharedPrefixMemory
from flexgen_core.plan.workload import Switches, Workload
from flexgen_core.plan.hardware import HardwareProfile, format_size
from flexgen_core.plan.shapes import PlanModel
from flexgen_core.policy import QUANTITIES, Policy

log = logging.getLogger(__name__)

DEFAULT_MEMORY_FRACTION = 0.95
TIE_TOLERANCE = 0.05  # predicted throughputs this close count as equal: the cost model is not more accurate
# When the batch-shape search stops (_search): a candidate is worth refining with whole weight tensors
# if the LP puts it within this share of the best so far; for one GPU batch size, after this many larger
# blocks in a row that are no better; over GPU batch sizes, after this many in a row whose best stays
# under this share of the best so far.
REFINE_WITHIN = 0.85
BLOCKS_NO_BETTER = 2
FALLING_SHARE = 0.9
GPU_BATCHES_FALLING = 3
GPU_BATCH_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
NUM_GPU_BATCHES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
PIN_WEIGHT_LIMIT = 0.5  # pin CPU-resident weights only while they take at most this share of host RAM


class PlanInfeasible(ValueError):
    """No policy fits the machine; the message says what does not fit and by how much."""


@dataclass(frozen=True)
class PlanOptions:
    """Choices left to the planner. `None` for a switch: try both and keep the faster."""

    compress_weight: bool | None = False
    compress_cache: bool | None = False
    cpu_cache_compute: bool | None = None
    memory_fraction: float = DEFAULT_MEMORY_FRACTION
    max_block_size: int | None = None  # e.g. the number of sequences to generate: no point in larger blocks
    gpu_batch_sizes: tuple[int, ...] = GPU_BATCH_SIZES
    num_gpu_batches: tuple[int, ...] = NUM_GPU_BATCHES
    exact_candidates: int = 16  # most LP candidates evaluated exactly (rounded, checked, repaired)
    tie_tolerance: float = TIE_TOLERANCE  # throughputs this close count as equal (see `_choose`)

    def __post_init__(self) -> None:
        for name in ("compress_weight", "compress_cache", "cpu_cache_compute"):
            if getattr(self, name) not in (True, False, None):
                raise ValueError(f"PlanOptions.{name} must be True, False or None (let the planner choose), "
                                 f"got {getattr(self, name)!r}")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction!r}")
        if not 0 <= self.tie_tolerance < 1:
            raise ValueError(f"tie_tolerance must be in [0, 1), got {self.tie_tolerance!r}")
        if self.max_block_size is not None and self.max_block_size < 1:
            raise ValueError(f"max_block_size must be >= 1, got {self.max_block_size!r}")

    def switch_settings(self, cuda: bool) -> list[Switches]:
        def choices(value: bool | None) -> tuple[bool, ...]:
            return (False, True) if value is None else (value,)

        cpu_attention = choices(self.cpu_cache_compute) if cuda else (False,)
        settings = []
        for cw, cc, ca in product(choices(self.compress_weight), choices(self.compress_cache), cpu_attention):
            if cc and ca:  # attention over a compressed cache runs on the device (as in the paper)
                continue
            settings.append(Switches(overlap=True, cpu_cache_compute=ca, compress_weight=cw, compress_cache=cc))
        return settings


@dataclass
class Candidate:
    """One batch shape and switch setting: the LP's prediction and, when evaluated, the exact one."""

    gpu_batch_size: int
    num_gpu_batches: int
    switches: Switches
    lp_fractions: dict[str, float]
    lp_seconds: float
    workload: Workload
    estimate: Estimate | None = None  # after rounding, checking and repair; None if not evaluated
    failed: str | None = None          # why evaluation found no fitting policy

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    @property
    def lp_throughput(self) -> float:
        return self.block_size * self.workload.gen_len / self.lp_seconds


@dataclass
class Plan:
    model: PlanModel
    workload: Workload
    hardware: HardwareProfile
    dtype_bytes: int
    usable: dict[str, int]        # bytes per tier the plan may use
    best: Estimate
    candidates: list[Candidate] = field(default_factory=list)
    tie_tolerance: float = TIE_TOLERANCE  # the chosen policy is within this of the fastest evaluated (_choose)

    @property
    def fastest(self) -> Estimate:
        """The highest predicted throughput of the policies evaluated exactly (the chosen one may be
        up to `tie_tolerance` slower: it offloads less, or has a smaller block)."""
        evaluated = [c.estimate for c in self.candidates if c.estimate is not None] + [self.best]
        return max(evaluated, key=lambda e: e.throughput)

    @property
    def policy(self) -> Policy:
        return self.best.policy

    @property
    def throughput(self) -> float:
        return self.best.throughput

    def to_dict(self) -> dict:
        return self.best.to_dict() | {
            "model": self.model.name,
            "hardware": self.hardware.name,
            "prompt_len": self.workload.prompt_len,
            "gen_len": self.workload.gen_len,
            "shared_prefix_len": self.workload.shared_prefix_len,
            "dtype_bytes": self.dtype_bytes,
            "usable_memory": self.usable,
            "capacity": self.hardware.capacity(),
        }

    def throughput_by_block_size(self) -> dict[int, tuple[float, float | None]]:
        """Effective batch size -> (best LP throughput, best exact throughput or None)."""
        out: dict[int, tuple[float, float | None]] = {}
        for c in self.candidates:
            lp, exact = out.get(c.block_size, (0.0, None))
            lp = max(lp, c.lp_throughput)
            if c.estimate is not None:
                exact = max(exact or 0.0, c.estimate.throughput)
            out[c.block_size] = (lp, exact)
        return dict(sorted(out.items()))


# ---- rounding and repair ------------------------------------------------------------------------------

def round_percents(fractions: Iterable[float]) -> list[int]:
    """Fractions summing to ~1 -> integer percents summing to 100 (largest remainders get the rest)."""
    raw = [max(0.0, f) * 100 for f in fractions]
    scale = 100 / sum(raw) if sum(raw) > 0 else 0
    raw = [r * scale for r in raw] if scale else [0.0] * (len(raw) - 1) + [100.0]
    floors = [math.floor(r + 1e-9) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: floors[i] - raw[i])
    for i in order[:100 - sum(floors)]:
        floors[i] += 1
    return floors


def overflows(report, usable: dict[str, int], unified: bool) -> dict[str, int]:
    """Bytes over the usable size, per tier ("host" = gpu + cpu on a CPU-only host)."""
    peak = report.peak
    over = {tier: peak[tier] - usable[tier] for tier in TIERS if peak[tier] > usable[tier]}
    if unified and peak["gpu"] + peak["cpu"] > usable["cpu"]:
        over["host"] = peak["gpu"] + peak["cpu"] - usable["cpu"]
    return over


_STEPS = (1, 2, 5, 10, 20, 25, 34, 50, 100)


def _moved(policy: Policy, quantity: str, src: str, dst: str, step: int) -> Policy | None:
    """`policy` with `step` percent of a quantity moved from tier src to tier dst (None if nothing to move)."""
    share = policy.shares(quantity)
    amount = min(step, share[src])
    if amount <= 0:
        return None
    share[src] -= amount
    share[dst] += amount
    return policy.with_shares(quantity, share["gpu"], share["cpu"])


class _Evaluator:
    def __init__(self, cost: CostModel, usable: dict[str, int]):
        self.cost, self.usable = cost, usable
        self.memo: dict[Policy, Estimate] = {}

    def __call__(self, policy: Policy) -> Estimate:
        if policy not in self.memo:
            self.memo[policy] = self.cost.estimate(policy)
        return self.memo[policy]

    def cost_offload(self, cand: "Candidate") -> float:
        """Bytes the candidate's LP fractions keep off the compute device."""
        totals = self.cost.memory_model.totals(cand.gpu_batch_size, cand.num_gpu_batches, cand.switches)
        return sum(size * (1 - cand.lp_fractions[f"{q}_gpu"]) for q, size in totals.items())

    def over(self, estimate: Estimate) -> dict[str, int]:
        return overflows(estimate.memory, self.usable, self.cost.hw.unified)

    def repair(self, policy: Policy, max_rounds: int = 8) -> Estimate | None:
        """Move shares down a tier until the policy fits (None if it cannot).

        Each round tries every move off the most over-full tier (a quantity from that tier to a lower
        one), each by the smallest amount that clears the excess (binary search over percents), and keeps
        the fastest; if no single move clears it, the move that frees the most, and another round."""
        current = self(policy)
        for _ in range(max_rounds):
            over = self.over(current)
            if not over:
                return current
            tier = next(iter(over))
            if tier == "disk":
                return None  # nothing below disk
            if tier == "gpu" and self.cost.hw.cuda:
                moves = [("gpu", "cpu"), ("gpu", "disk")]
            elif tier == "cpu":
                moves = [("cpu", "disk")]
            else:  # "host", or "gpu" on a CPU-only host: only disk relieves host RAM
                moves = [("gpu", "disk"), ("cpu", "disk")]
            clearing, partial = [], []
            for quantity, (src, dst) in product(QUANTITIES, moves):
                est = self._smallest_clearing_move(current, quantity, src, dst, tier)
                if est is None:
                    continue
                (partial if tier in self.over(est) else clearing).append(est)
            if clearing:
                current = max(clearing, key=lambda e: e.throughput)
            elif partial:
                current = min(partial, key=lambda e: self._load(e, tier))
                if self._load(current, tier) >= self._load(self(policy), tier):
                    return None
            else:
                return None
        return current if not self.over(current) else None

    def _smallest_clearing_move(self, current: Estimate, quantity: str, src: str, dst: str,
                                tier: str) -> Estimate | None:
        """The move of the fewest percents that clears `tier`; else the whole share (None if it frees nothing)."""
        share = current.policy.shares(quantity)
        if share[src] == 0:
            return None
        full = self(_moved(current.policy, quantity, src, dst, share[src]))
        if self._load(full, tier) >= self._load(current, tier):
            return None
        if tier in self.over(full):
            return full
        low, high = 0, share[src]  # moving `high` clears it, moving `low` does not
        while high - low > 1:
            mid = (low + high) // 2
            if tier in self.over(self(_moved(current.policy, quantity, src, dst, mid))):
                low = mid
            else:
                high = mid
        return self(_moved(current.policy, quantity, src, dst, high))

    @staticmethod
    def _load(estimate: Estimate, tier: str) -> int:
        peak = estimate.peak_memory
        return peak["gpu"] + peak["cpu"] if tier == "host" else peak[tier]


def _policy_from(fractions: dict[str, float], gpu_batch_size: int, num_gpu_batches: int, sw: Switches) -> Policy:
    percents = []
    for prefix in ("w", "cache", "act"):
        g, c, _ = round_percents([fractions[f"{prefix}_{tier}"] for tier in TIERS])
        percents += [g, c]
    return Policy.from_percent(percents, gpu_batch_size=gpu_batch_size, num_gpu_batches=num_gpu_batches,
                               **dataclasses.asdict(sw))


def _tidy(policy: Policy, cost: CostModel, usable_cpu: int) -> Policy:
    """Switches that do nothing turned off; CPU weights pinned only while they stay a modest share of RAM."""
    changes = {}
    if policy.cpu_cache_compute and (policy.cache_gpu_percent == 100 or not cost.hw.cuda):
        changes["cpu_cache_compute"] = False
    if cost.hw.cuda:
        cpu_weights = cost.memory_model.exact_memory(policy).weights["cpu"]
        changes["pin_weight"] = cpu_weights <= PIN_WEIGHT_LIMIT * usable_cpu
    return policy.replace(**changes) if changes else policy


# ---- the search -----------------------------------------------------------------------------------

def usable_memory(hardware: HardwareProfile, fraction: float) -> dict[str, int]:
    """What the planner may fill of each tier: `fraction` of it, and on the GPU no more than what the
    caching allocator's reserve leaves."""
    usable = {tier: int(size * fraction) for tier, size in hardware.capacity().items()}
    usable["gpu"] = max(0, min(usable["gpu"], hardware.gpu_bytes - hardware.allocator_reserve()))
    return usable


def plan(model: PlanModel, workload: Workload, hardware: HardwareProfile, dtype_bytes: int = 2,
         options: PlanOptions = PlanOptions(), evaluate_all: bool = False) -> Plan:
    """The fastest policy (generated tokens per second) that fits every tier of `hardware`.

    `evaluate_all` also evaluates the best candidate of every block size exactly (for plots)."""
    cost = CostModel(model, workload, hardware, dtype_bytes)
    usable = usable_memory(hardware, options.memory_fraction)
    evaluator = _Evaluator(cost, usable)
    spare = hardware.physical_cpu_bytes - usable["cpu"] - (usable["gpu"] if hardware.unified else 0)
    dense_weights = sum(f.weight_bytes for f in cost.memory_model.layers)
    disk_cached = bool(hardware.disk_to_cpu_cached) and dense_weights <= spare

    candidates = _search(cost, workload, options, usable, disk_cached)
    best = _choose(candidates, evaluator, options, evaluate_all)
    if best is None:
        fallback = _smallest_policy(options)
        est = evaluator(fallback)
        if evaluator.over(est):
            raise PlanInfeasible(_explain(model, est, evaluator.over(est), usable, hardware))
        best = est
    # The final check: memory.account over the whole model, as the engine will allocate.
    best = cost.estimate(_tidy(best.policy, cost, usable["cpu"]), full_memory=True)
    if evaluator.over(best):
        raise AssertionError(f"planned policy {best.policy} exceeds a tier: {best.peak_memory} > {usable}")
    log.info("planned %s for %s on %s: %.3g tokens/s", best.policy, model.name, hardware.name, best.throughput)
    return Plan(model, workload, hardware, dtype_bytes, usable, best, candidates, options.tie_tolerance)


def _search(cost: CostModel, workload: Workload, options: PlanOptions, usable: dict[str, int],
            disk_cached: bool) -> list[Candidate]:
    """Solve the LP for each switch setting and batch shape worth trying (see the stopping rules)."""
    candidates: list[Candidate] = []
    top = 0.0  # best LP throughput so far
    for sw in options.switch_settings(cost.hw.cuda):
        lp = PlacementLP(cost, sw, usable, disk_cached)
        falling, top_setting = 0, 0.0
        for gpu_batch_size in options.gpu_batch_sizes:
            if options.max_block_size and gpu_batch_size > options.max_block_size:
                break
            found, best_here, worse = False, 0.0, 0
            for num_gpu_batches in options.num_gpu_batches:
                if options.max_block_size and gpu_batch_size * num_gpu_batches > options.max_block_size:
                    break
                # One GPU batch per block: hidden states off the device serialise load and compute
                # (cost_model.serial_load), so try them on the device first, off it only if that fails.
                variants = (True, False) if num_gpu_batches == 1 else (False,)
                solutions = []
                for act_on_gpu in variants:
                    solution = lp.solve(gpu_batch_size, num_gpu_batches, act_on_gpu)
                    if solution:
                        solutions, variants = [solution], (act_on_gpu,)
                        break
                if not solutions:
                    break  # more batches per block only need more memory
                found = True
                fractions, seconds = min(solutions, key=lambda s: s[1])
                promising = seconds and workload.gen_len * gpu_batch_size * num_gpu_batches / seconds > REFINE_WITHIN * top
                if promising and (0 < fractions["w_gpu"] < 1 or 0 < fractions["w_cpu"] < 1):
                    # Whole tensors, not fractions of bytes: fix the weights where the rounded policy
                    # puts them and re-plan the cache and activations around them.
                    rounded = _policy_from(fractions, gpu_batch_size, num_gpu_batches, sw)
                    refined = [s for s in (lp.solve(gpu_batch_size, num_gpu_batches, v, rounded)
                                           for v in variants) if s]
                    if refined:
                        fractions, seconds = min(refined, key=lambda s: s[1])
                cand = Candidate(gpu_batch_size, num_gpu_batches, sw, fractions, seconds, workload)
                candidates.append(cand)
                top = max(top, cand.lp_throughput)
                # Past the best block for this GPU batch, throughput falls as memory pushes data down.
                worse = worse + 1 if cand.lp_throughput <= best_here else 0
                best_here = max(best_here, cand.lp_throughput)
                if worse == BLOCKS_NO_BETTER:
                    break
            if not found:
                break  # larger GPU batches only need more memory
            # Stop once several larger GPU batches in a row stay well below the best so far.
            top_setting = max(top_setting, best_here)
            falling = falling + 1 if best_here < FALLING_SHARE * top_setting else 0
            if falling == GPU_BATCHES_FALLING:
                break

    return candidates


def offloaded_bytes(estimate: Estimate) -> int:
    """Bytes of weights, cache (a shared prefix's included) and activations kept off the compute device."""
    mem = estimate.memory
    terms = [mem.weights, mem.cache, mem.activations]
    if isinstance(mem, SharedPrefixMemory):
        terms.append(mem.shared_prefix)
    return sum(term[tier] for term in terms for tier in ("cpu", "disk"))


def _choose(candidates: list[Candidate], evaluator: _Evaluator, options: PlanOptions,
            evaluate_all: bool) -> Estimate | None:
    """Evaluate the promising candidates exactly; among those within `tie_tolerance` of the fastest,
    keep the one that offloads least, then the smallest block. The cost model is not accurate to a few
    percent, and less offloading and smaller blocks are the safer bet when it cannot tell them apart."""
    if not candidates:
        return None
    ranked = sorted(candidates, key=lambda c: -c.lp_throughput)
    top_lp = ranked[0].lp_throughput
    margin = options.tie_tolerance + 0.03  # rounding may move a candidate a little either way
    near = [c for c in ranked if c.lp_throughput >= (1 - margin) * top_lp]
    near.sort(key=lambda c: (evaluator.cost_offload(c), c.block_size))
    chosen = ranked[:3] + near[:options.exact_candidates]
    if evaluate_all:
        seen: set[int] = set()
        chosen += [c for c in ranked if not (c.block_size in seen or seen.add(c.block_size))]
    rest = iter(ranked)
    evaluated: list[Estimate] = []
    while True:
        for cand in chosen:
            if cand.estimate is None and cand.failed is None:
                _evaluate(cand, evaluator)
            if cand.estimate is not None:
                evaluated.append(cand.estimate)
        if evaluated:
            break
        chosen = [c for c in rest if c.estimate is None and c.failed is None][:options.exact_candidates]
        if not chosen:
            return None
    fastest = max(e.throughput for e in evaluated)
    near = [e for e in evaluated if e.throughput >= (1 - options.tie_tolerance) * fastest]
    return min(near, key=lambda e: (offloaded_bytes(e), e.policy.block_size, -e.throughput))


def _evaluate(cand: Candidate, evaluator: _Evaluator) -> None:
    policy = _policy_from(cand.lp_fractions, cand.gpu_batch_size, cand.num_gpu_batches, cand.switches)
    est = evaluator.repair(policy)
    if est is None:
        cand.failed = f"rounded policy {policy.percent} could not be made to fit"
    else:
        cand.estimate = est


def _smallest_policy(options: PlanOptions) -> Policy:
    return Policy.from_percent([0, 0, 0, 0, 0, 0], gpu_batch_size=1, num_gpu_batches=1,
                               compress_weight=bool(options.compress_weight),
                               compress_cache=bool(options.compress_cache))


def _explain(model: PlanModel, est: Estimate, over: dict[str, int], usable: dict[str, int],
             hardware: HardwareProfile) -> str:
    """One line: what does not fit even with batch 1 and everything on disk, and by how much."""
    parts = []
    for tier, excess in over.items():
        name = "host RAM (gpu + cpu tiers)" if tier == "host" else tier
        have = usable["cpu"] if tier == "host" else usable[tier]
        need = have + excess
        mem = est.memory
        tiers = ("gpu", "cpu") if tier == "host" else (tier,)  # "host": the gpu and cpu tiers share RAM
        if isinstance(mem, SharedPrefixMemory) and \
                sum(mem.prefix_pass_peak[x] for x in tiers) > sum(mem.block_peak[x] for x in tiers):
            terms = mem.prefix_pass.to_dict()
            big = max(("cache", "cache_staging", "activations", "workspace"),
                      key=lambda t: sum(terms[t][x] for x in tiers))
            detail = f" while computing the shared prefix of {est.workload.shared_prefix_len} tokens, mostly its {big}"
        else:
            terms = mem.to_dict()
            big = max(mem.TERMS, key=lambda t: sum(terms[t][x] for x in tiers))
            detail = f", mostly {big}"
        parts.append(f"{name} needs {format_size(need)}{detail}, usable {format_size(have)} "
                     f"(short by {format_size(excess)})")
    return (f"no policy fits {model.name} on {hardware.name}: even with batch 1 and everything on disk, "
            + "; ".join(parts))
