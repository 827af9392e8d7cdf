"""The planner's linear program: for one switch setting and batch shape, the placement fractions (weights,
cache and activations on gpu / cpu / disk) that minimise a block's predicted time under the tiers' memory
(FlexGen paper, Sec. 4.3). The cost model's lane times and memory terms are linear forms in those
fractions (forms.py); each becomes a row here. Solved with cvxpy (HiGHS through scipy); the problem is
built once per switch setting with the batch shape's coefficients as parameters.
"""

from __future__ import annotations

import logging

import numpy as np

from flexgen_core.plan.cost_model import LANES, PHASES, CostModel, lane_bounds, serial_load
from flexgen_core.plan.forms import TIERS, VARS, Linear, TierShares
from flexgen_core.plan.workload import Switches
from flexgen_core.policy import Policy

log = logging.getLogger(__name__)

TIE_PENALTY = 1e-5  # per unit of placement fraction, relative to the block's compute time
_TIER_RANK = {"gpu": 0.0, "cpu": 1.0, "disk": 2.0}


class PlacementLP:
    """min block time over placement fractions, for one switch setting; re-solved per batch shape.

    Memory constraints per phase of the run: a block, and with a shared prefix also the prefix's pass."""

    def __init__(self, cost: CostModel, switches: Switches, usable: dict[str, int], disk_cached: bool):
        import cvxpy as cp

        self.cost, self.switches, self.usable, self.disk_cached = cost, switches, usable, disk_cached
        self.num_phases = 2 if cost.workload.as_run_by(switches).shared_prefix_len else 1
        self.num_units = len(cost.templates)
        rows = 3 * 2 * self.num_units  # (lane row) x (phase) x (unit)
        self.x = cp.Variable(len(VARS), nonneg=True)
        self.t = cp.Variable(2 * self.num_units, nonneg=True)
        self.A = cp.Parameter((rows, len(VARS)))
        self.b = cp.Parameter(rows)
        self.c = cp.Parameter(2 * self.num_units, nonneg=True)
        # Per phase: gpu, cpu, disk, gpu+cpu (unified hosts); each / capacity.
        self.M = cp.Parameter((4 * self.num_phases, len(VARS)))
        self.m = cp.Parameter(4 * self.num_phases)
        self.act_gpu_min = cp.Parameter(nonneg=True)
        self.penalty = cp.Parameter(len(VARS), nonneg=True)
        select = np.zeros((rows, 2 * self.num_units))
        for row in range(rows):
            select[row, row // 3] = 1.0  # rows 3j..3j+2 bound t[j]
        index = {name: i for i, name in enumerate(VARS)}
        constraints = [select @ self.t >= self.A @ self.x + self.b, self.M @ self.x + self.m <= 1,
                       self.x[index["act_gpu"]] >= self.act_gpu_min]
        for prefix in ("w", "cache", "act"):
            constraints.append(sum(self.x[index[f"{prefix}_{tier}"]] for tier in TIERS) == 1)
        self.problem = cp.Problem(cp.Minimize(self.c @ self.t + self.penalty @ self.x), constraints)
        self.index = index

    def _row(self, form: Linear) -> tuple[np.ndarray, float]:
        row = np.zeros(len(VARS))
        for name, coef in form.coef.items():
            row[self.index[name]] = coef
        return row, form.const

    def solve(self, gpu_batch_size: int, num_gpu_batches: int, act_on_gpu: bool,
              fixed_weights: Policy | None = None) -> tuple[dict[str, float], float] | None:
        """Fractions and predicted block seconds, or None when nothing fits. With `fixed_weights`, the
        weights stay where that policy places them (whole tensors) and only cache and activations move."""
        import cvxpy as cp

        cost, sw = self.cost, self.switches
        weights, cache, act = TierShares.variables("w"), TierShares.variables("cache"), TierShares.variables("act")
        if fixed_weights is None:
            def weight_shares(_facts):
                return weights
        else:
            weight_shares = cost.memory_model.placement(fixed_weights)[0]
        units = cost.units(gpu_batch_size, num_gpu_batches, sw, weight_shares, cache, act, self.disk_cached)
        serial = serial_load(act_on_gpu, num_gpu_batches)
        A = np.zeros(self.A.shape)
        b = np.zeros(self.b.shape)
        c = np.zeros(self.c.shape)
        repeats = {"prefill": 1, "decode": cost.workload.decode_steps}
        for u, unit in enumerate(units):
            for p, phase in enumerate(PHASES):
                j = 2 * u + p
                c[j] = unit.count * repeats[phase]
                lanes = {lane: getattr(unit, phase).total(lane) for lane in LANES}
                forms = lane_bounds(lanes, sw.overlap, serial and unit.reads_hidden, cost.hw.io_overlap)
                forms += [Linear()] * (3 - len(forms))
                for r, form in enumerate(forms):
                    A[3 * j + r], b[3 * j + r] = self._row(form)
        phases = [cost.memory_model.memory_forms(gpu_batch_size, num_gpu_batches, sw, weight_shares, cache, act)]
        if self.num_phases == 2:
            phases.append(cost.memory_model.prefix_pass_forms(sw, weight_shares, cache, act))
        M = np.zeros(self.M.shape)
        m = np.zeros(self.m.shape)
        caps = [self.usable["gpu"], self.usable["cpu"], self.usable["disk"], self.usable["cpu"]]
        for phase_idx, mem in enumerate(phases):
            forms = [mem["gpu"], mem["cpu"], mem["disk"], mem["gpu"] + mem["cpu"] if cost.hw.unified else None]
            for i, (form, cap) in enumerate(zip(forms, caps)):
                if form is None:
                    continue
                if cap <= 0:
                    cap = 1  # nothing fits on this tier: any use is infeasible
                row, const = self._row(form)
                M[4 * phase_idx + i], m[4 * phase_idx + i] = row / cap, const / cap
        self.A.value, self.b.value, self.c.value, self.M.value, self.m.value = A, b, c, M, m
        self.act_gpu_min.value = 1.0 if act_on_gpu else 0.0
        # Break ties toward the faster tiers: a penalty far below any real difference in time.
        compute_s = sum(c[2 * u + p] * getattr(unit, phase).total("compute").const
                        for u, unit in enumerate(units) for p, phase in enumerate(PHASES))
        self.penalty.value = TIE_PENALTY * compute_s * np.array([_TIER_RANK[name.rsplit("_", 1)[1]] for name in VARS])
        try:
            # HiGHS through scipy: the same solver as cp.HIGHS, without the banner highspy prints on stdout.
            self.problem.solve(solver=cp.SCIPY, scipy_options={"method": "highs"})
        except cp.error.SolverError as e:  # numerical trouble: treat as no solution for this shape
            log.debug("LP failed for %dx%d: %s", gpu_batch_size, num_gpu_batches, e)
            return None
        if self.problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
            return None
        values = {name: float(max(0.0, self.x.value[i])) for name, i in self.index.items()}
        if fixed_weights is not None:
            values |= {f"w_{tier}": p / 100 for tier, p in fixed_weights.shares("w").items()}
        return values, float(self.c.value @ self.t.value)
