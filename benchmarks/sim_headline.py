"""The headline policies' GPU memory at full width, on the simulated GPU (no GPU needed).

A policy's GPU peak is its resident terms (weights, staging, cache: exact per layer, checked against the
engine's real allocations by tests/test_memory.py) plus the transient tensors of one layer's compute on
one GPU batch, which only a run at the real width can show. This runs one layer of a model of the
shape's width (random weights, float32 so the CPU computes it at a usable speed) under each headline
policy's GPU batch and percentages, on the simulated GPU (flexgen_core/runtime/simulated_cuda.py), and
prints its peak bytes beside `memory.account` for the same model and block.

The last row is the planner's policy planned now, with the H200's measured profile
(`benchmarks/profiles/h200-quick.json`) held to the headline's 6 GiB: its full model's accounted GPU peak
in float16 must be within the budget less the caching allocator's reserve, which the planner keeps free.

    python benchmarks/sim_headline.py                 # OPT-6.7B's width; about a minute a policy on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results  # noqa: E402
from random_checkpoint import build_random_checkpoint, opt_config  # noqa: E402

from flexgen_core import Engine, Policy  # noqa: E402
from flexgen_core.plan.workload import Workload  # noqa: E402
from flexgen_core.plan.hardware import load_profile, parse_size  # noqa: E402
from flexgen_core.plan.search import PlanOptions, plan  # noqa: E402
from flexgen_core.plan.shapes import load_model  # noqa: E402
from flexgen_core.runtime.simulated_cuda import MEMORY  # noqa: E402

MiB = 2**20
H200 = Path(__file__).parent / "profiles" / "h200-quick.json"
HEADLINE_PROMPTS = 144  # the gpu-30b benchmark's 48 x 3 prompts: the largest block it may plan
# The headline policies for OPT-6.7B in 6 GiB (benchmarks/results/gpu-30b-opt-6.7b.md): the paper's HELM
# policy (its 48-sequence GPU batch) and the planner's choice for the H200's profile at that budget.
POLICIES = {
    "paper's policy (48 x 3, weights 20/80, cache and activations on the CPU, CPU attention)":
        Policy(gpu_batch_size=48, num_gpu_batches=1, w_gpu_percent=20, w_cpu_percent=80, cache_gpu_percent=0,
               cache_cpu_percent=100, act_gpu_percent=0, act_cpu_percent=100, cpu_cache_compute=True),
    "planner's policy on the H200 before the allocator reserve (32 x 4, weights 20/80, cache 4/96, activations on the CPU)":
        Policy(gpu_batch_size=32, num_gpu_batches=1, w_gpu_percent=20, w_cpu_percent=80, cache_gpu_percent=4,
               cache_cpu_percent=96, act_gpu_percent=0, act_cpu_percent=100),
}


def planned_now(shape: str, budget: str, cpu: str, prompt_len: int, gen_len: int) -> tuple[str, Policy, dict]:
    """The planner's policy for `shape` on the H200's profile capped at `budget`, and its full-size figures."""
    hardware = load_profile(H200).with_memory(gpu=parse_size(budget), cpu=parse_size(cpu))
    result = plan(load_model(f"facebook/{shape}"), Workload(prompt_len, gen_len), hardware, 2,
                  PlanOptions(max_block_size=HEADLINE_PROMPTS))
    p = result.policy
    label = (f"planner's policy now ({p.gpu_batch_size} x {p.num_gpu_batches}, weights {p.w_gpu_percent}/"
             f"{p.w_cpu_percent}, cache {p.cache_gpu_percent}/{p.cache_cpu_percent}, the H200's profile at {budget})")
    reserve = hardware.allocator_reserve()
    full = {"full_fp16_accounted_mib": round(result.best.peak_memory["gpu"] / MiB, 1),
            "budget_less_reserve_mib": round((hardware.gpu_bytes - reserve) / MiB, 1)}
    return label, p, full


def measure(path, policy: Policy, prompt_len: int, gen_len: int) -> dict:
    prompts = [[2] + [4 + (i * 7 + j) % 50000 for j in range(prompt_len - 1)] for i in range(policy.block_size)]
    gc.collect()
    MEMORY.reset_peak()
    base = MEMORY.live_bytes
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as offload, \
            Engine.from_pretrained(path, policy=policy, offload_dir=offload, device="simulated") as engine:
        engine.generate(prompts, max_new_tokens=gen_len)
        report = engine.memory(prompt_len, gen_len)
    return {"peak_mib": round((MEMORY.peak_bytes - base) / MiB, 1),
            "accounted_mib": round(report.peak["gpu"] / MiB, 1),
            "workspace_bound_mib": round(report.workspace["gpu"] / MiB, 1),
            "seconds": round(time.perf_counter() - started, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="opt-6.7b")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--gen-len", type=int, default=2)
    parser.add_argument("--checkpoint-dir", type=Path, default=None)
    parser.add_argument("--budget", default="6GiB", help="GPU budget the planner's row is planned for (default 6GiB)")
    parser.add_argument("--cpu", default="106.97GiB",
                        help="CPU memory of that plan (default: the H200 run's 85%% of RAM)")
    parser.add_argument("--out", default=None, help="write <out>/sim-headline.md/.json (default: print only)")
    args = parser.parse_args(argv)
    config = opt_config(args.shape, num_hidden_layers=1)
    label, now, full = planned_now(args.shape, args.budget, args.cpu, args.prompt_len, 32)
    policies = [(label, now, full)] + [(label, policy, {}) for label, policy in POLICIES.items()]
    with tempfile.TemporaryDirectory() as scratch:
        path = build_random_checkpoint(args.checkpoint_dir or Path(scratch) / "model", config, "float32", progress=False)
        rows = []
        for label, policy, full in policies:
            # One layer computes one GPU batch at a time: the block's other batches add no transient.
            one_batch = dataclasses.replace(policy, num_gpu_batches=1)
            row = {"policy": label, "batch": f"{policy.gpu_batch_size}x{policy.num_gpu_batches}"} | measure(
                path, one_batch, args.prompt_len, args.gen_len) | full
            row["within"] = row["peak_mib"] <= row["accounted_mib"] and (
                not full or full["full_fp16_accounted_mib"] <= full["budget_less_reserve_mib"])
            print(row, flush=True)
            rows.append(row)
    if args.out:
        write_results("sim-headline", f"Simulated GPU peak vs accounting: one layer of {args.shape}'s width, float32, "
                      f"prompt {args.prompt_len}, {args.gen_len} generated", rows,
                      ["policy", "batch", "peak_mib", "accounted_mib", "workspace_bound_mib",
                       "full_fp16_accounted_mib", "budget_less_reserve_mib", "within", "seconds"],
                      notes="Peak: the simulated GPU's live bytes over loading and generating one layer at "
                            "full width, one GPU batch; accounted: memory.account of the same. "
                            "full_fp16_accounted_mib: memory.account of the planned policy over the whole "
                            "model in float16 (prompt 512, 32 generated), against the budget less the "
                            "caching allocator's reserve (0.88 GiB, measured on the H200).",
                      out_dir=args.out)
    return 0 if all(r["within"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
