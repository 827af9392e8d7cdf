"""CPU suites: our engine against transformers `generate` and Accelerate on the same model, prompts and budget.

- `cpu-small`: a ~100M-parameter OPT (`opt-100m` preset: opt-125m's shape, 8192-token vocabulary, random
  weights, built locally), weights in RAM and weights on disk. Targets: weights on disk >= 0.8x in RAM at
  the best block size of each; >= 10x Accelerate with its weights on disk too.
- `cpu-offload`: the `large` preset (~212M parameters, 848 MB in float32) under a RAM budget for weights
  several times smaller (default 256 MiB); what does not fit is read from disk. Target: >= 10x Accelerate
  under the same budget.
- `cpu-moe`: the same under a budget, for a mixture of experts: the `olmoe-small` preset (OLMoE-1B-7B's
  layout, 64 experts of which each token uses 8, scaled down to ~110M parameters; default budget 256 MiB:
  a layer of all its experts, staged twice for overlap, takes 200 MB of it).

The budget bounds the weights each system keeps in RAM: for the engine its compute- and CPU-tier weights
plus the staging buffers disk reads land in (`Engine.memory`), for Accelerate `max_memory={"cpu": budget}`.
The KV cache and activations of both live in RAM beside it (on a CPU-only host every tier but disk is the
same RAM). Throughput = sequences x generated tokens / (prefill + decode) wall time, greedy, load excluded.

    python benchmarks/bench_cpu.py cpu-small                       # full size: 16 prompts, 512 + 32 tokens
    python benchmarks/bench_cpu.py cpu-offload --budget 256MiB
    python benchmarks/bench_cpu.py cpu-moe --budget 256MiB
    python benchmarks/bench_cpu.py cpu-small --num-prompts 2 --prompt-len 32 --gen-len 4 --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
import suites  # noqa: E402
from common import cpu_pressure  # noqa: E402
from roofline import ModelFacts, Rates, load_or_measure  # noqa: E402
from systems import (  # noqa: E402
    deepspeed_unavailable,
    run_accelerate,
    run_engine,
    run_transformers,
    skipped,
)

from flexgen_core import Policy, memory  # noqa: E402
from flexgen_core.plan.hardware import format_size, parse_size  # noqa: E402
from flexgen_core.testing import PRESETS, build_checkpoint, sample_prompts  # noqa: E402

MiB = 2**20
DTYPE, DTYPE_BYTES = "float32", 4
SUITES = {
    "cpu-small": dict(preset="opt-100m", num_prompts=16, shapes=["16x1", "8x2", "4x4"]),
    "cpu-offload": dict(preset="large", num_prompts=16, shapes=["16x1", "4x4"], budget="256MiB"),
    "cpu-moe": dict(preset="olmoe-small", num_prompts=16, shapes=["16x1", "4x4"], budget="256MiB"),
}


def resident_percent(model: ModelFacts, budget: int, overlap: bool) -> tuple[int, int]:
    """The largest share of each layer's weights (percent) kept in RAM, with the rest on disk, such that
    resident weights plus disk staging buffers fit `budget`; and the bytes that takes."""
    for percent in range(100, -1, -1):
        policy = Policy(w_gpu_percent=percent, w_cpu_percent=0, overlap=overlap)
        report = memory.account(model.layers, model.shape, policy, 1, 0, DTYPE_BYTES, separate_device=False)
        used = report.weights["gpu"] + report.weights["cpu"] + report.weight_staging["cpu"]
        if used <= budget:
            return percent, used
    raise SystemExit(f"error: a budget of {format_size(budget)} cannot hold even the disk staging buffers")


def engine_policy(shape: tuple[int, int], w_percent: int, **switches) -> Policy:
    g, k = shape
    return Policy(gpu_batch_size=g, num_gpu_batches=k, w_gpu_percent=w_percent, w_cpu_percent=0, **switches)


def ablation_shape(shapes: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The swept shape with the most GPU batches per block (its num_gpu_batches=1 twin shows what the
    block schedule adds), if any has more than one."""
    multi = [s for s in shapes if s[1] > 1]
    return max(multi, key=lambda s: (s[1], s[0])) if multi else None


def run_suite(args) -> Path:
    conf = SUITES[args.suite]
    suites.check_sizes(args)
    preset = PRESETS[conf["preset"]]
    if args.prompt_len + args.gen_len > preset.max_positions:
        raise SystemExit(f"error: prompt {args.prompt_len} + generation {args.gen_len} exceeds the model's "
                         f"{preset.max_positions} positions")
    started = time.time()
    pressure_before = cpu_pressure()
    path = build_checkpoint(conf["preset"])
    model = ModelFacts.from_checkpoint(path)
    prompts = sample_prompts(path, args.num_prompts, args.prompt_len, args.prompt_len, seed=0)
    short = suites.batch1_subset(prompts, args.batch1_prompts)
    shapes = suites.parse_shapes(args.shapes or conf["shapes"], args.num_prompts)
    profile = load_or_measure(args.profile, "cpu", args.offload_dir, quick=args.quick_profile)
    rates = Rates.from_profile(profile)
    weight_bytes = sum(spec.numel for layer in model.layers for spec in layer.specs) * DTYPE_BYTES

    measurements = []
    budget = parse_size(args.budget or conf["budget"]) if "budget" in conf else 0
    plan, disk_label = _plan(args, path, prompts, short, shapes, model, weight_bytes, budget, measurements)
    for name, run in tqdm(plan, desc=f"{args.suite} systems", unit="system"):
        tqdm.write(f"[{args.suite}] {name}")
        measurements += run()

    rows = [suites.to_row(m, model, rates, profile, args.prompt_len, args.gen_len, DTYPE_BYTES) for m in measurements]
    targets = _targets(args.suite, rows, disk_label, profile)
    pressure_after = cpu_pressure()
    resident = resident_percent(model, budget, overlap=True)[0] if budget else 0
    notes = _notes(args, conf, preset, weight_bytes, budget, resident, rates, short, pressure_before, pressure_after,
                   time.time() - started)
    title = (f"{args.suite}: {conf['preset']} ({preset.num_params / 1e6:.0f}M parameters, float32), "
             f"{args.num_prompts} prompts x {args.prompt_len} tokens, {args.gen_len} generated"
             + (f", weights budget {format_size(budget)}" if budget else ""))
    extra = {"suite": args.suite, "model": {"preset": conf["preset"], "num_params": preset.num_params,
                                            "weight_bytes": weight_bytes, "dtype": DTYPE},
             "workload": {"num_prompts": args.num_prompts, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
                          "batch1_prompts": len(short)},
             "budget_bytes": budget, "rates": rates.to_dict(), "profile": profile.to_dict(),
             "cpu_pressure_pct": {"before": pressure_before, "after": pressure_after},
             "wall_s": round(time.time() - started, 1)}
    out = suites.write_suite(args.name or args.suite, title, rows, args.out, notes, targets, extra)
    print(out.read_text())
    return out


def _plan(args, path, prompts, short, shapes, model, weight_bytes, budget, measurements):
    """The suite's runs in order, as (name, thunk returning Measurements); and the label of the engine runs
    under the budget (weights on disk, for cpu-small)."""
    largest = max(g * k for g, k in shapes)

    def engine(policy: Policy, label: str):
        return lambda: [run_engine(path, prompts, args.gen_len, policy, label, "cpu", DTYPE, args.offload_dir)]

    def without_overlap(label: str):
        """The best `label` run so far again, with overlap=False (decided once those runs are done)."""
        def run():
            done = [m for m in measurements if m.ok and m.label == label]
            if not done:
                return [skipped("engine", f"{label}, overlap=False", "no run to ablate")]
            top = max(done, key=lambda m: m.tokens_per_s)
            return engine(top.policy.replace(overlap=False), f"{label}, overlap=False")()
        return run

    plan = []
    if args.suite == "cpu-small":
        resident = 0
        disk_label = "engine: weights on disk"
        plan.append(("transformers", lambda: run_transformers(path, prompts, args.gen_len, [1, largest], "cpu",
                                                              DTYPE, prompts_for_batch={1: short})))
        for g, k in shapes:
            plan.append((f"engine in RAM {g}x{k}", engine(engine_policy((g, k), 100), "engine: weights in RAM")))
    else:
        resident, _ = resident_percent(model, budget, overlap=True)
        disk_label = f"engine: {format_size(budget)} budget"
        why = f"needs all {format_size(weight_bytes)} of weights in RAM, over the {format_size(budget)} budget"
        plan.append(("transformers", lambda: [skipped("transformers", "transformers generate (whole model in RAM)",
                                                      why, f"1, {largest}", "100% RAM")]))
        plan.append(("engine, no budget", engine(engine_policy(shapes[0], 100),
                                                 "engine: weights in RAM (reference, ignores the budget)")))
    for g, k in shapes:
        plan.append((f"{disk_label} {g}x{k}", engine(engine_policy((g, k), resident), disk_label)))
    plan.append(("engine, overlap=False", without_overlap(disk_label)))
    ablate = ablation_shape(shapes)
    if ablate:
        g, k = ablate
        plan.append((f"engine {g}x1", engine(engine_policy((g, 1), resident),
                                             f"{disk_label}, num_gpu_batches=1 (the {g}x{k} block split up)")))
    # Accelerate: the same budget for its weights (one byte where the engine keeps none in RAM).
    max_memory = {"cpu": max(budget, 1)}
    plan.append((f"Accelerate, max_memory cpu {format_size(max_memory['cpu'])}",
                 lambda: run_accelerate(path, prompts, args.gen_len, [1, largest], max_memory, "cpu", DTYPE,
                                        args.offload_dir, prompts_for_batch={1: short})))
    plan.append(("DeepSpeed", lambda: [skipped("DeepSpeed", "DeepSpeed ZeRO-Inference",
                                               deepspeed_unavailable("cpu"))]))
    return plan, disk_label


def _targets(suite: str, rows: list[dict], disk_label: str, profile) -> list[suites.Target]:
    engine_disk = suites.best(rows, lambda r: r["system"] == disk_label)
    accelerate = suites.best(rows, lambda r: r["system"].startswith("Accelerate"))
    accelerate_1 = suites.best(rows, lambda r: r["system"].startswith("Accelerate") and r["batch"] == "1")
    targets = []
    if suite == "cpu-small":
        ram = suites.best(rows, lambda r: r["system"] == "engine: weights in RAM")
        measured = suites.ratio(engine_disk, ram)
        why = ""
        if engine_disk and ram and "roofline" in engine_disk:
            streamed = engine_disk["roofline"]["streamed_bytes"] / 1e9
            why = (f"the disk run reads {streamed:.2f} GB of weights through the page cache on the same "
                   f"{os.cpu_count()} cores that compute (the profile measured I/O overlapping compute at "
                   f"{profile.io_overlap:.0%}); its roofline allows {engine_disk['roofline_tokens_per_s']:.3g} "
                   f"tokens/s, in RAM {ram.get('roofline_tokens_per_s', 0):.3g}")
        targets.append(suites.Target("weights on disk vs in RAM (best block size of each)", 0.8, measured, why))
        name = "engine vs Accelerate, weights on disk (best of each)"
    else:
        name = "engine vs Accelerate under the same budget (best of each)"
    measured = suites.ratio(engine_disk, accelerate)
    why = ""
    if engine_disk and accelerate:
        ceiling = suites.ceiling_vs(engine_disk, accelerate)
        terms = engine_disk.get("roofline", {}).get("terms", {})
        floors = {phase: max(t.values()) for phase, t in terms.items() if t}
        prefill_share = floors.get("prefill", 0) / sum(floors.values()) if floors else 0
        why = ""
        if accelerate["batch"] != "1":
            why = (f"Accelerate's best run is at batch {accelerate['batch']}: it spreads its per-forward weight reads "
                   "over as many sequences as the engine's block does, so what is left between the two is overlap "
                   "and the read path; against Accelerate at batch 1 the engine is "
                   f"{suites.ratio(engine_disk, accelerate_1) or float('nan'):.1f}x. ")
        if engine_disk.get("pct_of_roofline", 0) > 100:
            why += (f"(The engine ran at {engine_disk['pct_of_roofline']:.0f}% of its roofline: the profile, measured "
                    "under other load, understates this machine, so it gives no ceiling here.)")
        elif ceiling is not None:
            why += (f"Even at its roofline the engine could be at most {ceiling:.1f}x Accelerate's measured rate "
                    f"here: the prompt pass, compute-bound with the same FLOPs for both, is {prefill_share:.0%} of the "
                    "engine's floor")
    targets.append(suites.Target(name, 10.0, measured, why))
    return targets


def _notes(args, conf, preset, weight_bytes, budget, resident, rates, short, before, after, wall_s) -> str:
    memory_rate = f"{rates.memory / 1e9:.3g} GB/s" if rates.memory else "n/a"
    lines = [
        "## Notes", "",
        f"- Model: `{conf['preset']}` preset of `flexgen_core.testing` ({preset.layers} layers, hidden "
        f"{preset.hidden}, vocabulary {preset.vocab}; {format_size(weight_bytes)} of weights as the engine stores "
        "them, float32, random weights built locally). Prompts: `sample_prompts(..., seed=0)`, all the same length; "
        "greedy; `generate` is forced to the full length (`min_new_tokens`).",
        "- Throughput = sequences x generated tokens / (prefill + decode) wall time, after a warm-up, load excluded. "
        f"Batch-1 rows ran the first {len(short)} prompt(s): at batch 1 each sequence runs alone, so the rate does "
        "not depend on how many.",
    ]
    if budget:
        lines.append(
            f"- Budget: {format_size(budget)} of weights in RAM for both systems, {weight_bytes / budget:.1f}x less "
            f"than the model. The engine keeps the first {resident}% of each layer's bytes in RAM (whole weights, by "
            "the midpoint rule of `placement.weight_tiers`) and reads the rest from its offload files every block step; "
            "its `weights_in_budget_mib` counts resident weights plus the disk staging buffers. Accelerate gets "
            "`max_memory={'cpu': budget}` and loads each disk-offloaded module before its forward, every forward "
            "pass. KV cache and activations of both live in RAM beside the budget.")
    else:
        lines.append("- Weights on disk: the engine keeps none in RAM (percent 0 0) and reads every layer from its "
                     "offload files once per block step; Accelerate gets a 1-byte `max_memory` (the whole model "
                     "offloaded) and loads the weights before every forward pass.")
    lines += [
        "- Accelerate reads its disk-offloaded weights straight from the checkpoint's safetensors file "
        "(memory-mapped), the engine from its own offload files. On this host both are served by the OS page cache "
        "(the model fits in RAM many times over), so 'disk' measures each system's read path at page-cache "
        "bandwidth, not the SSD.",
        "- Roofline (`benchmarks/roofline.py`): a lower bound on each run's time from this machine's profile, "
        f"measured in the same run by `flexgen_core.plan.profiler` (prompt-pass matmuls {rates.matmul_prefill / 1e9:.3g} "
        f"GFLOP/s, decode matmuls {rates.matmul_decode / 1e9:.3g} GFLOP/s, memory {memory_rate}, page-cache reads "
        f"{rates.stream['disk'] / 1e9:.3g} GB/s). Per phase: max(FLOPs / matmul rate, bytes the decode matmuls "
        "read / memory bandwidth, weight bytes streamed / read bandwidth); `bound` names the term that sets the "
        "longest phase's floor; `pct_of_roofline` = floor / measured time; `achieved_gflops` = the workload's "
        "FLOPs / time; `streamed_gbps` = weight bytes read from disk / time. The profile's rates are medians under "
        "the load of the moment: a run that meets a quieter machine can pass 100%.",
        "- `predicted_tokens_per_s`: `flexgen_core.plan.cost_model` for the engine's policy on the same profile; it does "
        "not model transformers or Accelerate (n/a).",
        "- DeepSpeed ZeRO-Inference runs on CUDA GPUs only: skipped here (see the gpu-30b suite).",
        "- Shared host: CPU pressure (Linux PSI `some avg60`, the share of time a runnable task waited for a CPU) "
        f"{_pct(before)} before the runs, {_pct(after)} after; the suite took {wall_s / 60:.1f} min.",
        f"- Reproduce: `flexgen bench {args.suite} {_size_flags(args)}` (or `python benchmarks/bench_cpu.py "
        f"{args.suite} {_size_flags(args)}`).",
    ]
    return "\n".join(lines)


def _size_flags(args) -> str:
    flags = f"--num-prompts {args.num_prompts} --prompt-len {args.prompt_len} --gen-len {args.gen_len} " \
            f"--batch1-prompts {args.batch1_prompts}"
    if args.shapes:
        flags += " --shapes " + " ".join(args.shapes)
    if args.budget:
        flags += f" --budget {args.budget}"
    return flags


def _pct(value) -> str:
    return f"{value:.0f}%" if value is not None else "n/a"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--shapes", nargs="+", default=None, metavar="GxK",
                        help="engine block shapes to sweep, GPU batch size x batches per block "
                             "(default: cpu-small 16x1 8x2 4x4; cpu-offload 16x1 4x4)")
    parser.add_argument("--budget", default=None,
                        help="cpu-offload and cpu-moe: RAM for weights (default 256MiB)")
    parser.add_argument("-v", "--verbose", action="store_true")
    suites.add_size_args(parser, num_prompts=16)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    run_suite(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
