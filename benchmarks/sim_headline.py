"""The headline policies' GPU memory at full width, on the simulated GPU (no GPU needed).

A policy's GPU peak is its resident terms (weights, staging, cache: exact per layer, checked against the
engine's real allocations by tests/test_memory.py) plus the transient tensors of one layer's compute on
one GPU batch, which only a run at the real width can show. This runs one layer of a model of the
shape's width (random weights, float32 so the CPU computes it at a usable speed) under each headline
policy's GPU batch and percentages, on the simulated GPU (flexgen_core/runtime/simulated_cuda.py), and
prints its peak bytes beside `memory.account` for the same model and block.

    python benchmarks/sim_headline.py                 # OPT-6.7B's width; about a minute a policy on 2 cores
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results  # noqa: E402
from random_checkpoint import build_random_opt, opt_config  # noqa: E402

from flexgen_core import Engine, Policy  # noqa: E402
from flexgen_core.runtime.simulated_cuda import MEMORY  # noqa: E402

MiB = 2**20
# The headline policies for OPT-6.7B in 6 GiB (benchmarks/results/gpu-30b-opt-6.7b.md): the paper's HELM
# policy (its 48-sequence GPU batch) and the planner's choice for the H200's profile at that budget.
POLICIES = {
    "paper's policy (48 x 3, weights 20/80, cache and activations on the CPU, CPU attention)":
        Policy(gpu_batch_size=48, num_gpu_batches=1, w_gpu_percent=20, w_cpu_percent=80, cache_gpu_percent=0,
               cache_cpu_percent=100, act_gpu_percent=0, act_cpu_percent=100, cpu_cache_compute=True),
    "planner's policy (32 x 4, weights 20/80, cache 4/96, activations on the CPU)":
        Policy(gpu_batch_size=32, num_gpu_batches=1, w_gpu_percent=20, w_cpu_percent=80, cache_gpu_percent=4,
               cache_cpu_percent=96, act_gpu_percent=0, act_cpu_percent=100),
}


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
    parser.add_argument("--out", default=None, help="write <out>/sim-headline.md/.json (default: print only)")
    args = parser.parse_args(argv)
    config = opt_config(args.shape, num_hidden_layers=1)
    with tempfile.TemporaryDirectory() as scratch:
        path = build_random_opt(args.checkpoint_dir or Path(scratch) / "model", config, "float32", progress=False)
        rows = []
        for label, policy in POLICIES.items():
            row = {"policy": label, "batch": f"{policy.gpu_batch_size}x{policy.num_gpu_batches}"} | measure(
                path, policy, args.prompt_len, args.gen_len)
            row["within"] = row["peak_mib"] <= row["accounted_mib"]
            print(row, flush=True)
            rows.append(row)
    if args.out:
        write_results("sim-headline", f"Simulated GPU peak vs accounting: one layer of {args.shape}'s width, float32, "
                      f"prompt {args.prompt_len}, {args.gen_len} generated", rows,
                      ["policy", "batch", "peak_mib", "accounted_mib", "workspace_bound_mib", "within", "seconds"],
                      notes="Peak: the simulated GPU's live bytes over loading and generating; "
                            "accounted: memory.account.",
                      out_dir=args.out)
    return 0 if all(r["within"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
