"""GPU suites: gpu-30b, OPT-30B's shape on one GPU capped at 16 GiB (the paper's headline); gpu-moe, OLMoE's.

gpu-30b. The paper ran OPT-30B on a 16 GB T4, prompt 512, 32 generated tokens: FlexGen 7.32 tokens/s, Hugging Face
Accelerate 0.62, DeepSpeed ZeRO-Inference 0.60. This suite runs the same workload shape here:

- the checkpoint: OPT-30B's shape (or another, `--shape`, e.g. opt-6.7b) with random weights
  (`random_checkpoint.py`), float16, ~56 GiB on disk for OPT-30B, built once shard by shard (never the whole
  model in RAM) under `--checkpoint-dir`;
- each system in a process of its own (`isolated.py`) with a wall-clock limit (`--system-timeout`, and the
  suite's `--time-limit` shared among the systems still to run): a crash, out-of-memory or timeout is that
  system's row, and the others still run. Each process caps itself at `--budget` of the GPU
  (`torch.cuda.set_per_process_memory_fraction`), whatever the GPU's size, and its row records PyTorch's peak
  allocated and reserved GPU memory beside the engine's accounted peak;
- our engine: the policy the paper's artifact used for its HELM runs of OPT-IML-30B on a 16 GB T4 (20% of the
  weights on the GPU, the rest and the KV cache on the CPU, attention over the cache on the CPU, 48 x 3
  sequences, the block shrunk until it fits); the policy `flexgen_core.plan.search` chooses for this machine's
  profile (measured now, `--quick-profile` for the short mode) capped at the budget; the planner's choice with
  4-bit weights and cache; and, on the best fp16 run, overlap off and one GPU batch per block;
- FlexGen 0.1.8 itself (`flexgen_baseline.py`: its OptLM with its dummy weights, driven without the hub) under
  the paper's policy and under a GPU-attention 48 x 3 policy (activations on the GPU), and optionally under the
  planner's policy; a 'skipped' row where flexgen 0.1.8 is not installed;
- Accelerate (`device_map="auto"`, `max_memory`: what the budget leaves after its KV cache and a margin) at
  the largest batch of `--accelerate-batches` that runs without running out of memory; DeepSpeed
  ZeRO-Inference (stage 3, parameters on CPU) where it imports;
- transformers `generate` with the whole model on the GPU, where it fits the budget (recorded as skipped
  where it does not: 56 GiB in 16 GiB).

Baselines run one batch (batch b on the first b prompts): `generate` treats batches independently, so more
batches would repeat the same rate for a long time (a forward pass that streams its weights over PCIe takes
seconds).

gpu-moe (`--suite gpu-moe`). The same machinery for a mixture of experts: OLMoE-1B-7B's shape
(allenai/OLMoE-1B-7B-0125-Instruct: 16 layers of 64 experts, each token routed to 8; 13.8 GB of float16 weights,
`random_checkpoint.py` builds it from the planner's table of known models) under a GPU cap that forces offloading
(default 3 GiB); the engine under the planner's policy (and with 4-bit weights and cache) against Accelerate at
the same cap and transformers where it fits. Every step of a decode pass streams all 64 experts of each layer
from the CPU, though a token uses 8: the planner's blocks amortise that over many sequences, Accelerate's batch
is bounded by its KV cache on the GPU. FlexGen 0.1.8 runs OPT only (a skipped row where asked for).

Without CUDA a suite says why and exits 3 (skipped: nothing measured). OPT-30B's shape needs ~60 GB of free
disk for the checkpoint and ~100 GiB of RAM; OPT-6.7B's 13 GB and ~40 GiB; OLMoE-1B-7B's 14 GB and ~40 GiB.

    python benchmarks/bench_gpu30b.py --checkpoint-dir /data/opt-30b-random
    python benchmarks/bench_gpu30b.py --shape opt-6.7b --budget 6GiB --quick-profile --system-timeout 90
    python benchmarks/bench_gpu30b.py --systems engine accelerate --num-prompts 32   # a part, a smaller block
    python benchmarks/bench_gpu30b.py --suite gpu-moe --budget 3GiB --quick-profile --num-prompts 64
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import suites  # noqa: E402
from flexgen_baseline import SYSTEM as FLEXGEN, flexgen_unavailable, policy_problem, run_flexgen  # noqa: E402
from isolated import FAILURES, JobRow, child_main, default_log_dir, exit_on_sigterm, run_isolated  # noqa: E402
from random_checkpoint import (  # noqa: E402
    MOE_SHAPES,
    OPT_SHAPES,
    SHAPES,
    build_random_checkpoint,
    checkpoint_bytes,
    describe,
    model_config,
    opt_config,
)
from roofline import ModelFacts, Rates, load_or_measure  # noqa: E402
from systems import (  # noqa: E402
    Measurement,
    deepspeed_unavailable,
    run_accelerate,
    run_deepspeed,
    run_engine,
    run_transformers,
    skipped,
)

from flexgen_core import Policy, memory  # noqa: E402
from flexgen_core.bench_cli import SKIPPED_EXIT  # noqa: E402
from flexgen_core.plan.hardware import format_size, parse_size  # noqa: E402

GiB, MiB = 2**30, 2**20
DTYPE, DTYPE_BYTES = "float16", 2
SYSTEMS = ("transformers", "engine-paper", "engine", "engine-4bit", "ablations", "flexgen-paper",
           "flexgen-gpu-attention", "flexgen-planner", "accelerate", "deepspeed")
DEFAULT_SYSTEMS = tuple(s for s in SYSTEMS if s != "flexgen-planner")
MOE_SYSTEMS = ("transformers", "engine", "engine-4bit", "ablations", "accelerate", "deepspeed")  # FlexGen: OPT only
PAPER_T4 = {"FlexGen": 7.32, "Hugging Face Accelerate": 0.62, "DeepSpeed ZeRO-Inference": 0.60}
CHECKPOINT_ROOT = Path("~/.cache/flexgen-helm/bench-models").expanduser()
# A 30B run streams ~45 GiB of weights per generated token: minutes per system, where 6.7B takes one.
SYSTEM_TIMEOUT_S = {"opt-30b": 1800.0, "opt-13b": 900.0}
DEFAULT_SYSTEM_TIMEOUT_S = 150.0
MIN_SYSTEM_TIME_S = 10.0  # under --time-limit, a system with less time left than this is not started
WRITE_RESERVE_S = 5.0  # of --time-limit, kept for writing the results
ACCELERATE_MIN_WEIGHTS = 256 * MiB  # a batch whose KV cache leaves less GPU than this for weights is not tried
PROMPT_SEED = 0


@dataclass(frozen=True)
class SuiteDefaults:
    """What a suite of this script runs unless told otherwise."""

    shapes: tuple[str, ...]         # the model shapes it takes; the first is its default
    budget: str                     # the GPU cap of each system's process
    systems: tuple[str, ...]
    # Accelerate's activations and allocator reserve on the GPU beside its weights and KV cache (within its
    # max_memory Accelerate itself keeps room for the largest layer it streams in: OLMoE's, ~0.8 GiB).
    accelerate_margin: int


SUITES = {
    "gpu-30b": SuiteDefaults(("opt-30b", *sorted(set(OPT_SHAPES) - {"opt-30b"})), "16GiB", DEFAULT_SYSTEMS, 2 * GiB),
    "gpu-moe": SuiteDefaults(("olmoe-1b-7b", *sorted(set(MOE_SHAPES) - {"olmoe-1b-7b"})), "3GiB", MOE_SYSTEMS, GiB),
}


def no_cuda_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device here (torch.cuda.is_available() is False)"
    return None


def sample_token_prompts(num: int, length: int, vocab: int, seed: int = PROMPT_SEED) -> list[list[int]]:
    """Random token ids after OPT's BOS (`</s>` = 2), avoiding the special ids 0-3."""
    generator = torch.Generator().manual_seed(seed)
    body = torch.randint(4, vocab, (num, length - 1), generator=generator)
    return [[2] + row.tolist() for row in body]


def planned(model: ModelFacts, profile, args, compress: bool) -> Policy:
    from flexgen_core.plan.workload import Workload
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
                                separate_device=True)
        peak = report.peak
        if (peak["cpu"] <= cpu_limit and peak["gpu"] <= gpu_limit) or g == 1:
            return policy
        g = max(1, g // 2)


def gpu_attention_policy(paper: Policy) -> Policy:
    """The paper's block and weight placement with activations on the GPU and attention there (percent
    20 80 0 100 100 0): the other policy the first GPU run tried on FlexGen 0.1.8."""
    return paper.replace(act_gpu_percent=100, act_cpu_percent=0, cpu_cache_compute=False)


def accelerate_memory(shape, prompt_len: int, gen_len: int, batch: int, budget: int, cpu_limit: int,
                      device: str, *, margin: int) -> dict | None:
    """Accelerate's max_memory at `batch`: the GPU budget less the KV cache and `margin` for activations
    (Accelerate keeps both on the GPU), and the CPU limit; None where that leaves too little for weights."""
    if device != "cuda":
        return {"cpu": cpu_limit}
    per_seq = 2 * shape.num_layers * (prompt_len + gen_len) * shape.kv_width * DTYPE_BYTES
    gpu = budget - per_seq * batch - margin
    return {0: gpu, "cpu": cpu_limit} if gpu >= ACCELERATE_MIN_WEIGHTS else None


# ---- the systems, as jobs for processes of their own -------------------------------------------------------

class Jobs:
    """The suite's run: each system's job goes to a child process in turn, under the time left."""

    def __init__(self, args, common: dict, started: float):
        self.args = args
        self.common = common
        self.deadline = started + args.time_limit if args.time_limit else None
        self.log_dir = Path(args.logs) if args.logs else default_log_dir()
        self.inject = dict(item.split("=", 1) for item in args.inject_failure or ())
        self.script = Path(__file__).resolve()
        self.count = 0

    def limit_s(self, left: int) -> float | None:
        """This system's limit: --system-timeout, or its share of the time left if less; None: no time left."""
        limit = self.args.system_timeout
        if self.deadline is not None:
            remaining = self.deadline - time.time() - WRITE_RESERVE_S
            limit = min(limit, remaining / max(left, 1))
            if limit < MIN_SYSTEM_TIME_S:
                return None
        return limit

    def run(self, system: str, kind: str, row: JobRow, left: int, **fields) -> list[Measurement]:
        limit = self.limit_s(left)
        if limit is None:
            return [Measurement(row.system, row.label, row.batch, row.weights, status="skipped: the suite's "
                                f"--time-limit of {self.args.time_limit:.0f} s ran out before it started")]
        self.count += 1
        job = self.common | fields | {"name": f"{self.count:02d}-{system}", "kind": kind,
                                      "row": {"system": row.system, "label": row.label, "batch": row.batch,
                                              "weights": row.weights}}
        rows = run_isolated(self.script, job, row, limit, self.log_dir, self.inject.get(system))
        return rows


def run_suite(args) -> Path | None:
    cuda = args.device == "cuda"
    why = no_cuda_reason() if cuda else None
    if why:
        print(f"{args.suite} skipped: {why}. It needs one GPU with at least {args.budget}, the disk for the "
              f"{args.shape} checkpoint and RAM for its offloaded weights.")
        return None
    suites.check_sizes(args)
    for item in args.inject_failure or ():
        system, _, kind = item.partition("=")
        if system not in SYSTEMS or kind not in FAILURES:
            raise SystemExit(f"error: --inject-failure takes SYSTEM=KIND with SYSTEM in {SYSTEMS} and KIND in "
                             f"{FAILURES}, got {item!r}")
    started = time.time()
    budget = parse_size(args.budget)
    if cuda:
        total_gpu = torch.cuda.get_device_properties(0).total_memory
        if budget > total_gpu:
            raise SystemExit(f"error: budget {args.budget} exceeds this GPU's {format_size(total_gpu)}")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpu_limit = int(args.cpu_fraction * ram)

    config = model_config(args.shape)
    checkpoint_dir = args.checkpoint_dir or CHECKPOINT_ROOT / f"{args.shape}-random-{DTYPE}"
    weight_bytes = checkpoint_bytes(config, torch.float16)
    print(f"checkpoint: {format_size(weight_bytes)} in {checkpoint_dir}", flush=True)
    path = build_random_checkpoint(checkpoint_dir, config, DTYPE, device=args.device, progress=cuda)
    model = ModelFacts.from_checkpoint(path)
    try:
        measured = load_or_measure(args.profile, args.device, args.offload_dir, quick=args.quick_profile)
        profile = measured.with_memory(gpu=budget, cpu=cpu_limit)
        rates = Rates.from_profile(profile)
        no_profile = None
    except Exception as e:  # the planner's rows say so; the other systems and the table go on
        logging.exception("profiling failed")
        measured = profile = rates = None
        no_profile = f"no hardware profile ({type(e).__name__}: {e})"
    if cuda:
        torch.cuda.empty_cache()  # the profiler's buffers: the systems' processes need the GPU
    wanted = [s for s in SYSTEMS if s in args.systems]
    common = {"device": args.device, "dtype": DTYPE, "budget_bytes": budget, "cpu_limit_bytes": cpu_limit,
              "checkpoint": str(path), "shape": args.shape, "num_prompts": args.num_prompts,
              "prompt_len": args.prompt_len, "gen_len": args.gen_len, "vocab_size": config.vocab_size,
              "accelerate_margin_bytes": args.accelerate_margin,
              "offload_dir": args.offload_dir}
    jobs = Jobs(args, common, started)
    measurements: list[Measurement] = []
    paper = paper_policy(model, args, cpu_limit, budget)
    plans: dict[bool, Policy | str] = {}

    def planner_policy(compress: bool) -> Policy | str:
        """The planner's policy, or why there is none."""
        if compress not in plans:
            if no_profile:
                plans[compress] = no_profile
            else:
                try:
                    plans[compress] = planned(model, profile, args, compress)
                except ImportError as e:  # cvxpy: from the wheels in .whl/ on a machine without network
                    plans[compress] = f"the planner needs cvxpy ({e})"
                except ValueError as e:  # PlanInfeasible: the row says what did not fit
                    plans[compress] = f"planner: {e}"
        return plans[compress]

    def engine(system: str, policy: Policy | str, label: str, left: int) -> list[Measurement]:
        if isinstance(policy, str):
            return [skipped("engine", label, policy)]
        accounted = memory.account(model.layers, model.shape, policy, args.prompt_len, args.gen_len, DTYPE_BYTES,
                                   separate_device=cuda).peak["gpu"]
        row = JobRow("engine", label, f"{policy.gpu_batch_size}x{policy.num_gpu_batches}",
                     "percent " + " ".join(map(str, policy.percent[:2])))
        rows = jobs.run(system, "engine", row, left, policy=policy.to_dict())
        for m in rows:
            m.extra.setdefault("memory", {}).setdefault("accounted_gpu_peak_bytes", accounted)
            m.policy = m.policy or policy
        return rows

    def flexgen(system: str, policy: Policy | str, label: str, left: int) -> list[Measurement]:
        if isinstance(policy, str):
            return [skipped(FLEXGEN, label, policy)]
        batch = f"{policy.gpu_batch_size}x{policy.num_gpu_batches}"
        weights = "percent " + " ".join(map(str, policy.percent[:2]))
        why = (None if args.shape in OPT_SHAPES else "FlexGen 0.1.8 runs OPT models only")
        why = why or flexgen_unavailable(args.device) or policy_problem(policy)
        if why:
            return [skipped(FLEXGEN, label, why, batch, weights)]
        usable = args.num_prompts // policy.block_size * policy.block_size
        if usable == 0:
            return [skipped(FLEXGEN, label, f"{args.num_prompts} prompts make no whole block of "
                            f"{policy.block_size}", batch, weights)]
        return jobs.run(system, "flexgen", JobRow(FLEXGEN, label, batch, weights), left, policy=policy.to_dict())

    def ablations(left: int) -> list[Measurement]:
        done = [m for m in measurements if m.ok and m.system == "engine" and not m.policy.compress_weight]
        if not done:
            return [skipped("engine", "engine ablations", "no fp16 engine run to ablate")]
        top = max(done, key=lambda m: m.tokens_per_s)
        out = engine("ablations", top.policy.replace(overlap=False), f"{top.label}, overlap=False", left)
        if top.policy.num_gpu_batches > 1:
            out += engine("ablations", top.policy.replace(num_gpu_batches=1), f"{top.label}, num_gpu_batches=1",
                          left)
        return out

    def transformers_run(left: int) -> list[Measurement]:
        label = f"transformers generate (whole model on the {'GPU' if cuda else 'CPU'})"
        if cuda and weight_bytes > budget:
            return [skipped("transformers", label, f"{format_size(weight_bytes)} of fp16 weights do not fit the "
                            f"{format_size(budget)} GPU budget", "1", "100% GPU")]
        batch = min(args.num_prompts, max(args.accelerate_batches))
        return jobs.run("transformers", "transformers", JobRow("transformers", label, str(batch)), left,
                        batches=[batch])

    def accelerate_run(left: int) -> list[Measurement]:
        label = "Accelerate device_map=auto"
        batches = sorted({min(b, args.num_prompts) for b in args.accelerate_batches}, reverse=True)
        return jobs.run("accelerate", "accelerate", JobRow("Accelerate", label, "/".join(map(str, batches))), left,
                        batches=batches)

    def deepspeed_run(left: int) -> list[Measurement]:
        label = "DeepSpeed ZeRO-Inference (stage 3, parameters on CPU)"
        if not cuda:
            return [skipped("DeepSpeed", label, deepspeed_unavailable("cpu"))]
        batch = min(args.num_prompts, max(args.accelerate_batches))
        return jobs.run("deepspeed", "deepspeed", JobRow("DeepSpeed", label, str(batch), "100% cpu"), left,
                        batches=[batch])

    paper_label = "the paper's HELM policy for OPT-IML-30B"
    steps = {
        "transformers": transformers_run,
        "engine-paper": lambda left: engine("engine-paper", paper, f"engine: {paper_label}", left),
        "engine": lambda left: engine("engine", planner_policy(False), "engine: planner's policy", left),
        "engine-4bit": lambda left: engine("engine-4bit", planner_policy(True),
                                           "engine: planner's policy, 4-bit weights and cache", left),
        "ablations": ablations,
        "flexgen-paper": lambda left: flexgen("flexgen-paper", paper, f"{FLEXGEN}: {paper_label}", left),
        "flexgen-gpu-attention": lambda left: flexgen("flexgen-gpu-attention", gpu_attention_policy(paper),
                                                      f"{FLEXGEN}: the paper's block, attention on the GPU", left),
        "flexgen-planner": lambda left: flexgen("flexgen-planner", planner_policy(False),
                                                f"{FLEXGEN}: our planner's policy", left),
        "accelerate": accelerate_run,
        "deepspeed": deepspeed_run,
    }
    for index, system in enumerate(wanted):
        print(f"[{args.suite}] {system}", flush=True)
        rows = steps[system](len(wanted) - index)
        for m in rows:
            rate = f", {m.tokens_per_s:.3g} tokens/s" if m.tokens_per_s else ""
            print(f"[{args.suite}]   {m.label} [{m.batch}]: {m.status}{rate}", flush=True)
        measurements += rows

    rows = [suites.to_row(m, model, rates, profile, args.prompt_len, args.gen_len, DTYPE_BYTES) for m in measurements]
    for m, row in zip(measurements, rows):
        for key in ("process", "log_tail", "flexgen_timer", "out_of_memory_at_batch"):
            if key in m.extra:
                row[key] = m.extra[key]
    where = (f"{torch.cuda.get_device_name(0)} capped at {format_size(budget)}" if cuda
             else "the CPU (a testing run: no GPU, no cap)")
    title = (f"{args.suite}: {args.shape} shape (random weights, float16) on {where}, "
             f"{args.num_prompts} prompts x {args.prompt_len} tokens, {args.gen_len} generated")
    sections = [_comparison_section(rows, where, args.shape)]
    failed = any(r["status"].startswith(("failed", "timed out")) for r in rows)
    notes = _notes(args, config, budget, cpu_limit, rates, jobs, failed, time.time() - started)
    extra = {"suite": args.suite, "model": {"shape": args.shape, "weight_bytes": weight_bytes, "dtype": DTYPE},
             "workload": {"num_prompts": args.num_prompts, "prompt_len": args.prompt_len, "gen_len": args.gen_len},
             "device": args.device, "budget_bytes": budget, "cpu_limit_bytes": cpu_limit,
             "system_timeout_s": args.system_timeout, "time_limit_s": args.time_limit,
             "rates": rates.to_dict() if rates else None, "profile": measured.to_dict() if measured else None,
             "paper_t4_tokens_per_s": PAPER_T4 if args.shape in OPT_SHAPES else None,
             "wall_s": round(time.time() - started, 1)}
    name = args.name or (args.suite if args.shape == SUITES[args.suite].shapes[0] else f"{args.suite}-{args.shape}")
    out = suites.write_suite(name, title, rows, args.out, "\n\n".join([*sections, notes]), [], extra,
                             columns=suites.GPU_COLUMNS)
    if not args.logs and not failed:
        shutil.rmtree(jobs.log_dir, ignore_errors=True)
    print(out.read_text())
    return out


def _comparison_section(rows: list[dict], where: str, shape: str) -> str:
    engine = suites.best(rows, lambda r: r["system"].startswith("engine"))
    others = {name: suites.best(rows, lambda r, n=name: r["system"].startswith(n))
              for name in (FLEXGEN, "Accelerate", "DeepSpeed")}
    here = ", ".join(f"{name} {row['tokens_per_s']:.3g}" for name, row in
                     (("engine", engine), *others.items()) if row)
    paper_ratio = {FLEXGEN: None, "Accelerate": 7.32 / 0.62, "DeepSpeed": 7.32 / 0.60}
    if shape not in OPT_SHAPES:  # a mixture of experts: the paper has no figure to hold it against
        paper_ratio = dict.fromkeys(paper_ratio)
    if shape == "opt-30b":
        lines = ["## Against the paper", "",
                 "The paper's OPT-30B figures (prompt 512, 32 generated) are from one NVIDIA T4 (16 GB, PCIe 3.0, "
                 "208 GB DRAM): FlexGen 7.32 tokens/s, Accelerate 0.62, DeepSpeed ZeRO-Inference 0.60, so FlexGen "
                 "11.8x Accelerate and 12.2x DeepSpeed there. "
                 f"Here, on {where}: {here or 'no system ran'} tokens/s. Absolute "
                 "numbers do not compare across the two machines (another GPU, another PCIe generation, another "
                 "CPU); the ratios between systems measured on one machine do."]
    else:
        lines = ["## Between the systems", "",
                 f"{shape}'s shape on {where}: {here or 'no system ran'} tokens/s "
                 "(best row of each). The paper's ratios (FlexGen 11.8x Accelerate, 12.2x DeepSpeed) are for "
                 "OPT-30B on a 16 GB T4" + ("." if shape in OPT_SHAPES else
                                           ", a dense model; the paper has no mixture of experts.")]
    for name, row in others.items():
        r = suites.ratio(engine, row)
        if r is not None:
            theirs = f" (the paper's T4, OPT-30B: {paper_ratio[name]:.1f}x)" if paper_ratio[name] else ""
            lines.append(f"- Engine vs {name} on this machine: {r:.2f}x{theirs}.")
    return "\n".join(lines)


def _notes(args, config, budget, cpu_limit, rates, jobs: Jobs, failed: bool, wall_s: float) -> str:
    limit = f"{args.system_timeout:.0f} s each"
    if args.time_limit:
        limit += f", and the suite's {args.time_limit:.0f} s shared among the systems left"
    lines = [
        "## Notes", "",
        f"- Model: {args.shape}'s shape ({describe(config)}), random float16 weights from "
        "`benchmarks/random_checkpoint.py` (the EOS row of the output embedding is zero, so greedy generation runs "
        "the full length)" + ("; FlexGen 0.1.8 runs its own dummy weights (all ones) of the same shape"
                              if args.shape in OPT_SHAPES else "") +
        ". Prompts: random token ids, all the same length; greedy.",
        f"- Each system ran in a process of its own ({limit}). "
        + (f"GPU budget: each process held itself to {format_size(budget)} with "
           "`torch.cuda.set_per_process_memory_fraction`; `gpu_max_allocated_mib` and `gpu_max_reserved_mib` are "
           "that process's `torch.cuda.max_memory_allocated()` / `max_memory_reserved()` (load, warm-up and run); "
           if args.device == "cuda" else "No GPU (a testing run on the CPU); ")
        + "`accounted_gpu_peak_mib` is the engine's exact accounting of its policy's peak on the compute device "
        "(`flexgen_core.memory.account`: its own buffers and a bound on one layer's transient tensors). CPU memory "
        f"for the plans and Accelerate: {format_size(cpu_limit)} ({args.cpu_fraction:.0%} of RAM).",
        "- Accelerate ran the largest batch of " + ", ".join(map(str, args.accelerate_batches)) + " whose KV cache "
        f"left it at least {format_size(ACCELERATE_MIN_WEIGHTS)} of GPU for weights beside a "
        f"{format_size(args.accelerate_margin)} margin, then smaller ones until one ran without running out of memory, "
        "on that many prompts.",
    ]
    if args.shape in OPT_SHAPES:
        lines.append(
            f"- {FLEXGEN} rows: its `weights_in_budget_mib`, roofline and `predicted_tokens_per_s` are our accounting "
            "and cost model of the same policy (FlexGen places weights by the same per-layer midpoint rule); its own "
            "timer's prefill and decode seconds are in the JSON (`flexgen_timer`).")
    if rates is not None:
        lines.append(
            "- Roofline: per phase max(FLOPs / measured fp16 matmul rate, weight bytes streamed / measured bandwidth "
            f"of their tier: CPU->GPU {rates.stream.get('cpu', 0) / 1e9:.3g} GB/s, disk "
            f"{rates.stream['disk'] / 1e9:.3g} GB/s); it does not price attention on the CPU, so runs that compute "
            "attention there can sit far from it.")
    if failed:
        lines.append(f"- The failed systems' output: {jobs.log_dir}/ (one log per system).")
    lines.append(
        f"- The suite took {wall_s / 60:.1f} min. Reproduce: `flexgen bench {args.suite} --shape {args.shape} --budget "
        f"{args.budget}` (`python benchmarks/bench_gpu30b.py --suite {args.suite} --shape {args.shape} --num-prompts "
        f"{args.num_prompts} --prompt-len {args.prompt_len} --gen-len {args.gen_len} --budget {args.budget}"
        f"{'' if args.device == 'cuda' else ' --device cpu'}`).")
    return "\n".join(lines)


# ---- the child processes' side ---------------------------------------------------------------------------

def _job_prompts(job: dict) -> list[list[int]]:
    return sample_token_prompts(job["num_prompts"], job["prompt_len"], job["vocab_size"])


def _engine_job(job: dict) -> list[Measurement]:
    policy = Policy.from_dict(job["policy"])
    return [run_engine(job["checkpoint"], _job_prompts(job), job["gen_len"], policy, job["row"]["label"],
                       job["device"], job["dtype"], job["offload_dir"])]


def _flexgen_job(job: dict) -> list[Measurement]:
    policy = Policy.from_dict(job["policy"])
    model = ModelFacts.from_checkpoint(job["checkpoint"])
    return [run_flexgen(opt_config(job["shape"]), model, _job_prompts(job), job["gen_len"], policy,
                        job["row"]["label"], job["offload_dir"])]


def _accelerate_job(job: dict) -> list[Measurement]:
    model = ModelFacts.from_checkpoint(job["checkpoint"])
    prompts = _job_prompts(job)

    def max_memory(batch: int) -> dict | None:
        return accelerate_memory(model.shape, job["prompt_len"], job["gen_len"], batch, job["budget_bytes"],
                                 job["cpu_limit_bytes"], job["device"], margin=job["accelerate_margin_bytes"])

    fitting = [b for b in job["batches"] if max_memory(b)]
    if not fitting:
        return [skipped("Accelerate", job["row"]["label"], "the KV cache of every batch tried leaves no GPU budget "
                        "for weights", job["row"]["batch"])]
    return run_accelerate(job["checkpoint"], prompts, job["gen_len"], fitting, max_memory(fitting[0]), job["device"],
                          job["dtype"], job["offload_dir"], prompts_for_batch={b: prompts[:b] for b in fitting},
                          first_fit=True)


def _transformers_job(job: dict) -> list[Measurement]:
    prompts = _job_prompts(job)
    return run_transformers(job["checkpoint"], prompts, job["gen_len"], job["batches"], job["device"], job["dtype"],
                            prompts_for_batch={b: prompts[:b] for b in job["batches"]})


def _deepspeed_job(job: dict) -> list[Measurement]:
    prompts = _job_prompts(job)
    return run_deepspeed(job["checkpoint"], prompts, job["gen_len"], job["batches"], job["dtype"],
                         prompts_for_batch={b: prompts[:b] for b in job["batches"]})


CHILD_RUNNERS = {"engine": _engine_job, "flexgen": _flexgen_job, "accelerate": _accelerate_job,
                 "transformers": _transformers_job, "deepspeed": _deepspeed_job}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--suite", choices=sorted(SUITES), default="gpu-30b",
                        help="gpu-30b (OPT shapes) or gpu-moe (mixtures of experts) (default gpu-30b)")
    parser.add_argument("--shape", choices=SHAPES, default=None,
                        help="the shape of the random checkpoint (default: gpu-30b opt-30b, gpu-moe olmoe-1b-7b)")
    parser.add_argument("--budget", default=None, help="GPU memory each system's process may use (default: gpu-30b "
                                                       "16GiB, gpu-moe 3GiB)")
    parser.add_argument("--accelerate-margin", default=None,
                        help="GPU memory Accelerate keeps for activations beside its weights and KV cache (default: "
                             "gpu-30b 2GiB, gpu-moe 1GiB)")
    parser.add_argument("--cpu-fraction", type=float, default=0.85, help="share of RAM plans may use (default 0.85)")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help=f"where the random checkpoint is built (default {CHECKPOINT_ROOT}/SHAPE-random-float16; "
                             "~56 GiB for opt-30b, 12.4 GiB for opt-6.7b, 12.9 GiB for olmoe-1b-7b)")
    parser.add_argument("--accelerate-batches", type=int, nargs="+", default=[16, 8, 4, 2, 1],
                        help="Accelerate's batches, tried largest first until one fits (default 16 8 4 2 1); the "
                             "largest also sets the transformers and DeepSpeed batch")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=None,
                        help="run only these (default: gpu-30b all but flexgen-planner; gpu-moe "
                             f"{' '.join(MOE_SYSTEMS)})")
    parser.add_argument("--system-timeout", type=float, default=None,
                        help="wall-clock limit of each system's process, seconds (default "
                             f"{DEFAULT_SYSTEM_TIMEOUT_S:.0f}; "
                             + ", ".join(f"{s}: {t:.0f}" for s, t in SYSTEM_TIMEOUT_S.items()) + ")")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="the whole suite's wall-clock budget, seconds: each system gets at most an even share "
                             "of what is left (default: none)")
    parser.add_argument("--logs", default=None, help="keep each system's output here (default: a temp folder, "
                                                     "kept only when a system failed)")
    parser.add_argument("--shapes", nargs="+", default=None, help=argparse.SUPPRESS)  # the planner picks shapes
    # Testing: run the suite on the CPU (a tiny shape in CI), and make a system fail on purpose.
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--inject-failure", action="append", metavar="SYSTEM=KIND", help=argparse.SUPPRESS)
    # The child side of one system (isolated.py).
    parser.add_argument("--run-one", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true")
    suites.add_size_args(parser, num_prompts=144, batch1_prompts=1)
    return parser


def apply_suite_defaults(args) -> None:
    """Fill what was not given from the suite's defaults, and check the shape is one of the suite's."""
    suite = SUITES[args.suite]
    if args.shape is None:
        args.shape = suite.shapes[0]
    elif args.shape not in suite.shapes:
        raise SystemExit(f"error: {args.suite} takes --shape {', '.join(suite.shapes)}; got {args.shape!r}")
    args.budget = args.budget or suite.budget
    args.systems = args.systems or list(suite.systems)
    args.accelerate_margin = parse_size(args.accelerate_margin) if args.accelerate_margin else suite.accelerate_margin


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.run_one is not None:
        if args.result is None:
            raise SystemExit("error: --run-one needs --result")
        return child_main(args.run_one, args.result, CHILD_RUNNERS)
    if args.shapes:
        raise SystemExit(f"error: {args.suite} takes no --shapes: the planner chooses the engine's blocks")
    apply_suite_defaults(args)
    if args.system_timeout is None:
        args.system_timeout = SYSTEM_TIMEOUT_S.get(args.shape, DEFAULT_SYSTEM_TIMEOUT_S)
    exit_on_sigterm()
    return 0 if run_suite(args) is not None else SKIPPED_EXIT


if __name__ == "__main__":
    sys.exit(main())
