"""Planner on this machine: profile it, plan a ~100M-parameter OPT under RAM budgets that force
offloading, run each planned policy with the engine, and compare predicted with measured throughput.

The model is the `opt-100m` test preset (opt-125m's shape with an 8192-token vocabulary, random weights,
built locally). Budgets are the RAM the plan may use (on a CPU-only host the "gpu" and "cpu" tiers share
it): one that holds everything, and two below the model's weights, so part of them lives on disk. Each
round measures a profile and then runs every case right after, so both see the same load on a
shared machine; the table gives the median over rounds. Measured prefill is a run with one generated
token; decode is the rest.

    python benchmarks/bench_planner.py [--rounds 2] [--num-prompts 8] [--prompt-len 64] [--gen-len 32]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import Timer, write_results  # noqa: E402

from flexgen_core import Engine  # noqa: E402
from flexgen_core.plan.workload import Workload  # noqa: E402
from flexgen_core.plan.hardware import format_size  # noqa: E402
from flexgen_core.plan.profiler import measure  # noqa: E402
from flexgen_core.plan.search import PlanOptions, plan  # noqa: E402
from flexgen_core.plan.shapes import load_model  # noqa: E402
from flexgen_core.testing import build_checkpoint, sample_prompts  # noqa: E402

# RAM budgets as shares of the model's weights (fp32, as stored by the engine).
BUDGETS = (("holds everything", 2.0), ("70% of the weights", 0.7), ("35% of the weights", 0.35))


def cpu_pressure() -> float | None:
    """Share of the last 10 s in which some runnable task waited for a CPU (Linux PSI), in percent."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


def run_round(path, model, prompts, workload, offload_dir) -> list[dict]:
    profile = measure(device="cpu", offload_dir=offload_dir, quick=False, progress=False)
    weights = sum(spec.numel for layer in model.layers for spec in layer.specs) * 4
    n = len(prompts)
    # Block sizes that divide the number of prompts, so every block is full.
    sizes = tuple(b for b in (1, 2, 4, 8, 16, 32, 64) if n % b == 0)
    options = PlanOptions(max_block_size=n, gpu_batch_sizes=sizes, num_gpu_batches=sizes)
    rows = []
    for label, share in BUDGETS:
        budget = int(share * weights)
        hw = profile.with_memory(gpu=budget, cpu=budget)
        result = plan(model, workload, hw, 4, options)
        best, policy = result.best, result.policy
        blocks = math.ceil(n / policy.block_size)
        with Engine.from_pretrained(path, policy=policy, offload_dir=offload_dir, device="cpu") as engine:
            engine.generate(prompts[:policy.block_size], max_new_tokens=2)  # warm-up
            pressure = cpu_pressure()
            with Timer() as prefill:
                engine.generate(prompts, max_new_tokens=1)
            with Timer() as full:
                engine.generate(prompts, max_new_tokens=workload.gen_len)
            allocated = engine.runner.last_allocated
        used = sum(allocated[term][tier] for term in allocated for tier in ("gpu", "cpu"))
        predicted_s = blocks * best.total_s
        decode_s = max(full.seconds - prefill.seconds, 0.0)
        rows.append({
            "budget": f"{format_size(budget)} ({label})",
            "policy": f"{policy.gpu_batch_size}x{policy.num_gpu_batches}, {' '.join(map(str, policy.percent))}",
            "pred_prefill_s": blocks * best.prefill_s,
            "meas_prefill_s": prefill.seconds,
            "pred_decode_ms_per_token": 1e3 * best.decode_token_s,
            "meas_decode_ms_per_token": 1e3 * decode_s / (workload.gen_len - 1) / blocks,
            "pred_tokens_per_s": n * workload.gen_len / predicted_s,
            "meas_tokens_per_s": n * workload.gen_len / full.seconds,
            "ram_used": format_size(used),
            "cpu_pressure_pct": pressure,
            "profile": profile.to_dict(),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=32)
    args = parser.parse_args()

    path = build_checkpoint("opt-100m")
    model = load_model(path)
    prompts = sample_prompts(path, args.num_prompts, args.prompt_len, args.prompt_len, seed=0)
    workload = Workload(args.prompt_len, args.gen_len)
    rounds = []
    with tempfile.TemporaryDirectory() as offload_dir:
        for _ in tqdm(range(args.rounds), desc="rounds (profile, plan, run)"):
            rounds.append(run_round(path, model, prompts, workload, offload_dir))

    rows = []
    for case_idx in range(len(BUDGETS)):
        runs = [r[case_idx] for r in rounds]
        row = {"budget": runs[0]["budget"], "policy": " / ".join(dict.fromkeys(r["policy"] for r in runs))}
        for key in ("pred_prefill_s", "meas_prefill_s", "pred_decode_ms_per_token", "meas_decode_ms_per_token",
                    "pred_tokens_per_s", "meas_tokens_per_s"):
            row[key] = statistics.median(r[key] for r in runs)
        row["pred/meas"] = row["pred_tokens_per_s"] / row["meas_tokens_per_s"]
        row["ram_used"] = runs[-1]["ram_used"]
        pressures = [r["cpu_pressure_pct"] for r in runs if r["cpu_pressure_pct"] is not None]
        row["cpu_pressure_pct"] = statistics.median(pressures) if pressures else ""
        rows.append(row)
    columns = ["budget", "policy", "pred_tokens_per_s", "meas_tokens_per_s", "pred/meas", "pred_prefill_s",
               "meas_prefill_s", "pred_decode_ms_per_token", "meas_decode_ms_per_token", "ram_used",
               "cpu_pressure_pct"]
    notes = (f"Model: opt-100m preset ({model.num_params / 1e6:.0f}M parameters as stored, float32), "
             f"{args.num_prompts} prompts of {args.prompt_len} tokens, {args.gen_len} generated, greedy; "
             f"median of {args.rounds} rounds, each a `flexgen profile` followed by the runs. "
             "Policy: GPU batch x batches per block, then percent (weights, cache, activations on gpu / cpu; "
             "the rest on disk). cpu_pressure_pct: Linux PSI `some avg10` just before the timed runs, the "
             "share of time some task waited for a CPU (other work on this shared host).")
    path = write_results("planner-cpu", "Planner: predicted vs measured throughput on this machine", rows, columns,
                         notes=notes, extra={"rounds": rounds, "args": vars(args)})
    print(path.read_text())


if __name__ == "__main__":
    main()
