"""gpu-30b suite: an OPT-30B-shaped model on one GPU capped at 16 GiB, as in the FlexGen paper's headline.

The paper ran OPT-30B on a 16 GB T4, prompt 512, 32 generated tokens: FlexGen 7.32 tokens/s, Hugging Face
Accelerate 0.62, DeepSpeed ZeRO-Inference 0.60. This suite runs the same workload shape here, in one process:

- the checkpoint: OPT-30B's shape with random weights (`random_checkpoint.py`), float16, ~56 GiB on disk, built
  once shard by shard (never the whole model in RAM) under `--checkpoint-dir`;
- the cap: `torch.cuda.set_per_process_memory_fraction` holds this process to `--budget` (16 GiB) of the GPU,
  whatever its size, for every system;
- our engine: the policy `flexgen_core.plan.search` chooses for this machine's profile (measured now) capped at the
  budget; the policy the paper's artifact used for its HELM runs of OPT-IML-30B on a 16 GB T4 (20% of the
  weights on the GPU, the rest and the KV cache on the CPU, attention over the cache on the CPU); the
  planner's choice with 4-bit weights and cache; and, on the best fp16 run, overlap off and one GPU batch
  per block;
- Accelerate with `max_memory={0: what the budget leaves after its KV cache, "cpu": ...}` at batch 1 and at
  `--accelerate-batch`; DeepSpeed ZeRO-Inference (stage 3, parameters on CPU) where it imports;
- transformers `generate` alone cannot hold 56 GiB in 16 GiB: recorded as skipped.

Baselines run one batch per batch size (batch b on the first b prompts): `generate` treats batches
independently, so more batches would repeat the same rate for a long time (a 30B forward pass that streams
its weights over PCIe takes seconds).

Without CUDA the suite says why and exits 3 (skipped: nothing measured). Needs ~60 GB of free disk for the checkpoint and ~100 GiB of RAM.

    python benchmarks/bench_gpu30b.py --checkpoint-dir /data/opt-30b-random
    python benchmarks/bench_gpu30b.py --systems engine accelerate --num-prompts 32   # a part, a smaller block
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
import suites  # noqa: E402
from random_checkpoint import build_random_opt, checkpoint_bytes, opt_config  # noqa: E402
from roofline import ModelFacts, Rates, load_or_measure  # noqa: E402
from systems import run_accelerate, run_deepspeed, run_engine, skipped  # noqa: E402

from flexgen_core import Policy, memory  # noqa: E402
from flexgen_core.bench_cli import SKIPPED_EXIT  # noqa: E402
from flexgen_core.plan.hardware import format_size, parse_size  # noqa: E402

GiB = 2**30
DTYPE, DTYPE_BYTES = "float16", 2
SYSTEMS = ("transformers", "engine", "engine-paper", "engine-4bit", "ablations", "accelerate", "deepspeed")
PAPER_T4 = {"FlexGen": 7.32, "Hugging Face Accelerate": 0.62, "DeepSpeed ZeRO-Inference": 0.60}
DEFAULT_CHECKPOINT = Path("~/.cache/flexgen-helm/bench-models/opt-30b-random-float16").expanduser()


def no_cuda_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device here (torch.cuda.is_available() is False)"
    return None


def sample_token_prompts(num: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Random token ids after OPT's BOS (`</s>` = 2), avoiding the special ids 0-3."""
    generator = torch.Generator().manual_seed(seed)
    body = torch.randint(4, vocab, (num, length - 1), generator=generator)
    return [[2] + row.tolist() for row in body]


def planned(model: ModelFacts, profile, args, compress: bool) -> Policy:
    from flexgen_core.plan.cost_model import Workload
    from flexgen_core.plan.search import PlanOptions, plan
    from flexgen_core.plan.shapes import PlanModel

    options = PlanOptions(compress_weight=compress, compress_cache=compress, max_block_size=args.num_prompts)
    result = plan(PlanModel(model.name, model.shape, model.layers, "folder"), Workload(args.prompt_len, args.gen_len),
                  profile, DTYPE_BYTES, options)
    return result.policy


def paper_policy(model: ModelFacts, args, cpu_limit: int, gpu_limit: int) -> Policy:
    """The policy of the paper's HELM runs of OPT-IML-30B on a 16 GB T4 (percent 20 80 0 100 0 100, attention
    on the CPU, 48 x 3 sequences), with the block shrunk until the exact accounting fits this machine."""
    g = min(48, args.num_prompts)
    k = min(3, max(1, args.num_prompts // g))
    while True:
        policy = Policy(gpu_batch_size=g, num_gpu_batches=k, w_gpu_percent=20, w_cpu_percent=80, cache_gpu_percent=0,
                        cache_cpu_percent=100, act_gpu_percent=0, act_cpu_percent=100, cpu_cache_compute=True)
        report = memory.account(model.layers, model.shape, policy, args.prompt_len, args.gen_len, DTYPE_BYTES,
                                split=True)
        peak = report.peak
        if (peak["cpu"] <= cpu_limit and peak["gpu"] <= gpu_limit) or g == 1:
            return policy
        g = max(1, g // 2)


def accelerate_memory(model: ModelFacts, args, budget: int, cpu_limit: int) -> dict:
    """Accelerate's max_memory: the GPU budget less the KV cache and a margin for activations at its largest
    batch (Accelerate keeps both on the GPU), and the CPU limit."""
    shape = model.shape
    per_seq = 2 * shape.num_layers * (args.prompt_len + args.gen_len) * shape.kv_width * DTYPE_BYTES
    cache = per_seq * args.accelerate_batch
    margin = 2 * GiB
    gpu = budget - cache - margin
    if gpu <= 0:
        raise SystemExit(f"error: Accelerate at batch {args.accelerate_batch} needs {format_size(cache)} of KV cache, "
                         f"more than the {format_size(budget)} budget leaves; lower --accelerate-batch")
    return {0: gpu, "cpu": cpu_limit}


def run_suite(args) -> Path | None:
    why = no_cuda_reason()
    if why:
        print(f"gpu-30b skipped: {why}. It needs one GPU with at least {args.budget}, ~60 GB of free disk for the "
              "checkpoint and ~100 GiB of RAM.")
        return None
    suites.check_sizes(args)
    started = time.time()
    budget = parse_size(args.budget)
    total_gpu = torch.cuda.get_device_properties(0).total_memory
    if budget > total_gpu:
        raise SystemExit(f"error: budget {args.budget} exceeds this GPU's {format_size(total_gpu)}")
    torch.cuda.set_per_process_memory_fraction(budget / total_gpu)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpu_limit = int(args.cpu_fraction * ram)

    config = opt_config("opt-30b")
    print(f"checkpoint: {format_size(checkpoint_bytes(config, torch.float16))} in {args.checkpoint_dir}", flush=True)
    path = build_random_opt(args.checkpoint_dir, config, DTYPE)
    model = ModelFacts.from_checkpoint(path)
    prompts = sample_token_prompts(args.num_prompts, args.prompt_len, config.vocab_size)
    measured = load_or_measure(args.profile, "cuda", args.offload_dir, quick=args.quick_profile)
    profile = measured.with_memory(gpu=budget, cpu=cpu_limit)
    rates = Rates.from_profile(profile)
    batches = sorted({1, args.accelerate_batch})
    subsets = {b: suites.batch1_subset(prompts, args.batch1_prompts) if b == 1 else prompts[:b] for b in batches}
    weight_bytes = checkpoint_bytes(config, torch.float16)
    wanted = set(args.systems)

    measurements = []

    def engine(policy: Policy, label: str):
        return lambda: [run_engine(path, prompts, args.gen_len, policy, label, "cuda", DTYPE, args.offload_dir)]

    def engine_planned(compress: bool, label: str):
        def run():
            try:
                policy = planned(model, profile, args, compress)
            except ValueError as e:  # PlanInfeasible: the row says what did not fit
                return [skipped("engine", label, f"planner: {e}")]
            return engine(policy, label)()
        return run

    def ablations():
        done = [m for m in measurements if m.ok and m.system == "engine" and not m.policy.compress_weight]
        if not done:
            return [skipped("engine", "engine ablations", "no fp16 engine run to ablate")]
        top = max(done, key=lambda m: m.tokens_per_s)
        out = engine(top.policy.replace(overlap=False), f"{top.label}, overlap=False")()
        if top.policy.num_gpu_batches > 1:
            out += engine(top.policy.replace(num_gpu_batches=1), f"{top.label}, num_gpu_batches=1")()
        return out

    plan = []
    if "transformers" in wanted:
        plan.append(("transformers", lambda: [skipped(
            "transformers", "transformers generate (whole model on the GPU)",
            f"{format_size(weight_bytes)} of fp16 weights do not fit the {format_size(budget)} GPU budget",
            "1", "100% GPU")]))
    if "engine" in wanted:
        plan.append(("engine (planner)", engine_planned(False, "engine: planner's policy")))
    if "engine-paper" in wanted:
        policy = paper_policy(model, args, cpu_limit, budget)
        plan.append(("engine (paper's policy)", engine(policy, "engine: the paper's HELM policy for OPT-IML-30B")))
    if "engine-4bit" in wanted:
        plan.append(("engine 4-bit", engine_planned(True, "engine: planner's policy, 4-bit weights and cache")))
    if "ablations" in wanted:
        plan.append(("engine ablations", ablations))
    if "accelerate" in wanted:
        max_memory = accelerate_memory(model, args, budget, cpu_limit)
        plan.append(("Accelerate", lambda: run_accelerate(path, prompts, args.gen_len, batches, max_memory, "cuda",
                                                          DTYPE, args.offload_dir, prompts_for_batch=subsets)))
    if "deepspeed" in wanted:
        plan.append(("DeepSpeed", lambda: run_deepspeed(path, prompts, args.gen_len, batches, DTYPE,
                                                        prompts_for_batch=subsets)))
    for name, run in tqdm(plan, desc="gpu-30b systems", unit="system"):
        tqdm.write(f"[gpu-30b] {name}")
        measurements += run()

    rows = [suites.to_row(m, model, rates, profile, args.prompt_len, args.gen_len, DTYPE_BYTES) for m in measurements]
    gpu_name = torch.cuda.get_device_name(0)
    title = (f"gpu-30b: OPT-30B shape (random weights, float16) on {gpu_name} capped at {format_size(budget)}, "
             f"{args.num_prompts} prompts x {args.prompt_len} tokens, {args.gen_len} generated")
    sections = [_paper_section(rows, gpu_name)]
    notes = _notes(args, budget, cpu_limit, rates, subsets, time.time() - started)
    extra = {"suite": "gpu-30b", "model": {"shape": "opt-30b", "weight_bytes": weight_bytes, "dtype": DTYPE},
             "workload": {"num_prompts": args.num_prompts, "prompt_len": args.prompt_len, "gen_len": args.gen_len},
             "budget_bytes": budget, "cpu_limit_bytes": cpu_limit, "rates": rates.to_dict(),
             "profile": measured.to_dict(), "paper_t4_tokens_per_s": PAPER_T4,
             "wall_s": round(time.time() - started, 1)}
    out = suites.write_suite(args.name or "gpu-30b", title, rows, args.out, "\n\n".join([*sections, notes]), [], extra)
    print(out.read_text())
    return out


def _paper_section(rows: list[dict], gpu_name: str) -> str:
    engine = suites.best(rows, lambda r: r["system"].startswith("engine"))
    accelerate = suites.best(rows, lambda r: r["system"].startswith("Accelerate"))
    deepspeed = suites.best(rows, lambda r: r["system"].startswith("DeepSpeed"))
    here = ", ".join(f"{name} {row['tokens_per_s']:.3g}" for name, row in
                     (("engine", engine), ("Accelerate", accelerate), ("DeepSpeed", deepspeed)) if row)
    lines = ["## Against the paper", "",
             "The paper's OPT-30B figures (prompt 512, 32 generated) are from one NVIDIA T4 (16 GB, PCIe 3.0, 208 GB "
             "DRAM): FlexGen 7.32 tokens/s, Accelerate 0.62, DeepSpeed ZeRO-Inference 0.60, so FlexGen 11.8x "
             "Accelerate and 12.2x DeepSpeed there. "
             f"Here, on {gpu_name} held to the same 16 GiB: {here or 'no system ran'} tokens/s. Absolute numbers "
             "do not compare across the two machines (another GPU, another PCIe generation, another CPU); the "
             "ratios between systems measured on one machine do."]
    for name, row in (("Accelerate", accelerate), ("DeepSpeed", deepspeed)):
        r = suites.ratio(engine, row)
        if r is not None:
            lines.append(f"- Engine vs {name} on this machine: {r:.1f}x (the paper's T4: "
                         f"{7.32 / (0.62 if name == 'Accelerate' else 0.60):.1f}x).")
    return "\n".join(lines)


def _notes(args, budget, cpu_limit, rates, subsets, wall_s) -> str:
    return "\n".join([
        "## Notes", "",
        "- Model: OPT-30B's shape (48 layers, hidden 7168, 56 heads, FFN 28672, vocabulary 50272), random float16 "
        "weights from `benchmarks/random_checkpoint.py` (the EOS embedding row is zero, so greedy generation runs "
        "the full length). Prompts: random token ids, all the same length; greedy.",
        f"- GPU budget: `torch.cuda.set_per_process_memory_fraction` holds this process to {format_size(budget)}; CPU "
        f"memory for the plans and Accelerate: {format_size(cpu_limit)} ({args.cpu_fraction:.0%} of RAM).",
        "- Baselines ran one batch per batch size: " + ", ".join(f"batch {b} on {len(p)} prompt(s)"
                                                                  for b, p in subsets.items()) + ".",
        "- Roofline: per phase max(FLOPs / measured fp16 matmul rate, weight bytes streamed / measured bandwidth of "
        f"their tier: CPU->GPU {rates.stream.get('cpu', 0) / 1e9:.3g} GB/s, disk {rates.stream['disk'] / 1e9:.3g} "
        "GB/s); it does not price attention on the CPU, so runs that compute attention there can sit far from it.",
        f"- The suite took {wall_s / 60:.1f} min. Reproduce: `flexgen bench gpu-30b` "
        f"(`python benchmarks/bench_gpu30b.py --num-prompts {args.num_prompts} --prompt-len {args.prompt_len} "
        f"--gen-len {args.gen_len} --budget {args.budget}`).",
    ])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--budget", default="16GiB", help="GPU memory the process may use (default 16GiB)")
    parser.add_argument("--cpu-fraction", type=float, default=0.85, help="share of RAM plans may use (default 0.85)")
    parser.add_argument("--checkpoint-dir", type=Path, default=DEFAULT_CHECKPOINT,
                        help=f"where the random checkpoint is built, ~56 GiB (default {DEFAULT_CHECKPOINT})")
    parser.add_argument("--accelerate-batch", type=int, default=8,
                        help="the larger batch of Accelerate and DeepSpeed (default 8; its KV cache must fit the "
                             "GPU budget beside part of the weights)")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS),
                        help="run only these (default: all)")
    parser.add_argument("--shapes", nargs="+", default=None, help=argparse.SUPPRESS)  # the planner picks shapes
    parser.add_argument("-v", "--verbose", action="store_true")
    suites.add_size_args(parser, num_prompts=144, batch1_prompts=1)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.shapes:
        raise SystemExit("error: gpu-30b takes no --shapes: the planner chooses the engine's blocks")
    return 0 if run_suite(args) is not None else SKIPPED_EXIT


if __name__ == "__main__":
    sys.exit(main())
