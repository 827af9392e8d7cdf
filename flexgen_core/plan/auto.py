"""`policy="auto"`: the planner run for an engine's own layers, on this machine's profile, as the engine
loads (and, for the HELM client, again when the work changes materially)."""

from __future__ import annotations

import logging

from flexgen_core.plan.cost_model import CostModel
from flexgen_core.plan.workload import Workload
from flexgen_core.plan.search import PlanOptions, _Evaluator, plan, usable_memory
from flexgen_core.plan.shapes import PlanModel
from flexgen_core.policy import WEIGHT_FIELDS, Policy

log = logging.getLogger(__name__)


def plan_for_engine(*, name: str, config, layers, device_type: str, dtype_bytes: int, hardware, offload_dir,
                    prompt_len: int, gen_len: int, num_prompts: int | None,
                    compress_weight: bool | None = None, compress_cache: bool | None = None,
                    shared_prefix_len: int = 0, current: Policy | None = None) -> Policy:
    """`policy="auto"` of `Engine.from_pretrained`: plan for the engine's own layers on `hardware` (see
    `profiler.resolve`) and log the choice. Compression is the planner's choice where a switch is None
    (see auto_compression: only when the caller allows it), as given otherwise; a compressed choice is
    logged as lossy.
    `shared_prefix_len`: tokens at the start of every prompt that the engine will share (HELM's
    instructions and in-context examples); like the lengths, a hint, cut to leave each prompt a token."""
    from flexgen_core.plan.profiler import resolve

    profile = resolve(hardware, device_type, offload_dir)
    if profile.compute_device != device_type:
        raise ValueError(f"hardware profile {profile.name!r} describes a {profile.compute_device} machine, but the "
                         f"engine computes on {device_type}; pass a profile of this machine (`flexgen profile`)")
    gen_len = max(1, min(gen_len, config.max_positions - 1))
    prompt_len = max(1, min(prompt_len, config.max_positions - gen_len))
    shared_prefix_len = min(shared_prefix_len, prompt_len - 1)  # a negative one is Workload's error
    options = PlanOptions(compress_weight=compress_weight, compress_cache=compress_cache, max_block_size=num_prompts)
    workload = Workload(prompt_len, gen_len, shared_prefix_len)
    model = PlanModel(name, config, layers, "folder")
    result = plan(model, workload, profile, dtype_bytes, options)
    best = result.best
    if current is not None and not best.policy.keeps_weights(current):
        # Weights already loaded elsewhere: keep them unless the new placement is faster by more than the
        # planner's own tie tolerance (a reload costs a pass over the checkpoint).
        kept = best.policy.replace(**{f: getattr(current, f) for f in WEIGHT_FIELDS})
        evaluate = _Evaluator(CostModel(model, workload, profile, dtype_bytes),
                              usable_memory(profile, options.memory_fraction))
        estimate = evaluate(kept)
        if not evaluate.over(estimate) and estimate.throughput * (1 + result.tie_tolerance) >= best.throughput:
            log.info("re-planned on the loaded weights: %s predicted %.3g tokens/s against %.3g with a reload",
                     kept.percent, estimate.throughput, best.throughput)
            best = estimate
    if best.policy.lossy:
        log.warning("policy='auto' chose 4-bit %s: results are lossy (not the model's exact computation)",
                    " and ".join(best.policy.lossy))
    log.info("policy='auto' on %s: batch %d x %d, percent %s, cpu_cache_compute=%s, compress weights %s, "
             "cache %s; predicted %.3g tokens/s (prefill %.3g s, decode %.3g s per block; shared prefix pass "
             "%.3g s once) for prompts of %d tokens (%d shared) generating %d", profile.name,
             best.policy.gpu_batch_size, best.policy.num_gpu_batches, list(best.policy.percent),
             best.policy.cpu_cache_compute, best.policy.compress_weight, best.policy.compress_cache,
             best.throughput, best.prefill_s, best.decode_s, best.prefix_s, result.workload.prompt_len,
             result.workload.shared_prefix_len, result.workload.gen_len)
    return best.policy
