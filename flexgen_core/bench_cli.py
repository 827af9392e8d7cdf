"""`flexgen bench SUITE`: run one of the benchmark suites of the repository's `benchmarks/` folder.

The suites are scripts in `benchmarks/` (not an installed package), found next to this package: `flexgen
bench` works from a repository checkout installed with `pip install -e .`. Each suite runs its systems
side by side (gpu-30b and gpu-moe: each in a process of its own, under a time limit) and writes
`<out>/<suite>.md`, `.json` and `.png` (gpu-30b or gpu-moe with another `--shape S`: `<out>/<suite>-S.*`),
by default into a scratch folder of the user's own (`$TMPDIR/flexgen-bench-<uid>/`, made 0700 and refused if
another user made it or may write to it): the checkout's committed `benchmarks/results/` changes only with
`--out benchmarks/results`. The suite scripts take a few more options than these (`python
benchmarks/<script> --help`).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flexgen_core.runtime.private_dir import private_folder, user_temp_folder

BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
SCRATCH_OUT = user_temp_folder("flexgen-bench")
# A suite script that ran but could not measure (gpu-30b or gpu-moe without CUDA) exits with this code.
SKIPPED_EXIT = 3


@dataclass(frozen=True)
class Suite:
    script: str
    script_args: tuple[str, ...]
    help: str


SUITES = {
    "cpu-small": Suite("bench_cpu.py", ("cpu-small",),
                       "~100M-parameter OPT, weights in RAM and on disk, vs transformers and Accelerate"),
    "cpu-offload": Suite("bench_cpu.py", ("cpu-offload",),
                         "a model 3.3x larger than a 256 MiB weights budget, vs Accelerate under the same budget"),
    "cpu-moe": Suite("bench_cpu.py", ("cpu-moe",),
                     "a mixture of experts (OLMoE's layout, ~110M parameters) under a 256 MiB weights budget, vs "
                     "Accelerate under the same budget"),
    "gpu-30b": Suite("bench_gpu30b.py", (),
                     "OPT-30B shape (or --shape), random weights, GPU capped at 16 GiB, vs FlexGen 0.1.8 and "
                     "Accelerate (needs CUDA; ~60 GB disk)"),
    "gpu-moe": Suite("bench_gpu30b.py", ("--suite", "gpu-moe"),
                     "OLMoE-1B-7B shape (64 experts, top 8), random weights, GPU capped at 3 GiB, vs Accelerate "
                     "(needs CUDA; ~14 GB disk)"),
    "helm": Suite("bench_helm.py", (), "the same helm-run through FlexGenClient and HELM's HuggingFaceClient"),
}
# Options passed on to the suite scripts as given (none apply to the helm suite).
_PASSED = (
    ("--budget", str, "cpu-offload and cpu-moe: RAM for weights (default 256MiB); gpu-30b and gpu-moe: GPU "
                      "memory cap (default 16GiB, 3GiB)"),
    ("--shapes", str, "engine block shapes to sweep, GPU batch x batches per block, e.g. 16x1 4x4"),
    ("--batch1-prompts", int, "batch-1 baselines run on the first N prompts (0 = all)"),
    ("--profile", str, "hardware profile JSON for the roofline and cost model instead of measuring now"),
    ("--offload-dir", str, "folder for offload files (default: the temp folder)"),
    ("--checkpoint-dir", str, "gpu-30b and gpu-moe: where the random checkpoint is built (~60 GB for OPT-30B's "
                              "shape)"),
    ("--shape", str, "gpu-30b: the OPT shape of the random checkpoint, e.g. opt-6.7b (default opt-30b); gpu-moe: "
                     "olmoe-1b-7b (default) or olmoe-tiny"),
    ("--system-timeout", float, "gpu-30b and gpu-moe: wall-clock limit of each system's process, seconds"),
    ("--time-limit", float, "gpu-30b and gpu-moe: the whole suite's wall-clock budget, seconds"),
)
# The suites whose systems run in processes of their own (bench_gpu30b.py), and their options.
_GPU_SUITES = ("gpu-30b", "gpu-moe")
_GPU_ONLY = ("--checkpoint-dir", "--shape", "--system-timeout", "--time-limit")
# Tiny sizes that run every system of a suite end to end in a minute or two.
SMOKE = {"num_prompts": 2, "prompt_len": 32, "gen_len": 4}


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register `flexgen bench` on the `flexgen` command's subparsers."""
    listing = "\n".join(f"  {name:<12} {suite.help}" for name, suite in SUITES.items())
    p = subparsers.add_parser(
        "bench", help="run a benchmark suite against the alternatives (table, JSON and plot)",
        description="Run a benchmark suite: our engine and the alternatives on the same model, prompts and "
                    "memory budget (gpu-30b, gpu-moe: each system in a process of its own); writes "
                    "<out>/<suite>.md, .json and .png.",
        epilog=f"suites:\n{listing}\n\nRuns from a repository checkout (pip install -e .). The scripts in "
               "benchmarks/ take these options and a few more (python benchmarks/<script> --help).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=sorted(SUITES), help="which suite")
    p.add_argument("--num-prompts", type=int, help="prompts (helm: eval instances)")
    p.add_argument("--prompt-len", type=int, help="tokens per prompt (not for helm: its scenario sets them)")
    p.add_argument("--gen-len", type=int, help="tokens generated per prompt (not for helm)")
    p.add_argument("--out", type=Path, help=f"results folder (default {SCRATCH_OUT}; the committed figures: "
                                            "benchmarks/results)")
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny sizes to check the suite end to end ({SMOKE['num_prompts']} prompts of "
                        f"{SMOKE['prompt_len']} tokens, {SMOKE['gen_len']} generated, unless given; quick profile)")
    for flag, kind, what in _PASSED:
        p.add_argument(flag, type=kind, nargs="+" if flag == "--shapes" else None, help=what)
    p.set_defaults(run=run_bench)
    return p


def suite_command(args) -> list[str]:
    """The command line that runs the suite's script."""
    if not BENCHMARKS_DIR.is_dir():
        raise ValueError(f"benchmark scripts not found at {BENCHMARKS_DIR}: `flexgen bench` runs from a repository "
                         "checkout installed with `pip install -e .`")
    suite = SUITES[args.suite]
    for shape in args.shapes or ():
        if not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", shape):
            raise ValueError(f"--shapes takes GPU batch x batches per block, e.g. 16x1 4x4; got {shape!r}")
    out = args.out if args.out is not None else SCRATCH_OUT
    sizes = {name: getattr(args, name) for name in SMOKE}
    if args.smoke:
        sizes = {name: value if value is not None else SMOKE[name] for name, value in sizes.items()}
    command = [sys.executable, str(BENCHMARKS_DIR / suite.script), *suite.script_args]
    passed = {flag: getattr(args, _dest(flag)) for flag, _, _ in _PASSED if getattr(args, _dest(flag)) is not None}
    if args.suite == "helm":
        given = [f"--{n.replace('_', '-')}" for n in ("prompt_len", "gen_len") if getattr(args, n) is not None]
        given += list(passed)
        if given:
            raise ValueError(f"not an option of the helm suite: {', '.join(given)} (its scenario sets prompt and "
                             "generation lengths; --num-prompts sets the number of eval instances)")
        if sizes["num_prompts"] is not None:
            command += ["--instances", str(sizes["num_prompts"]), "--threads", str(sizes["num_prompts"])]
        command += ["--out", str(out / "helm")]
    else:
        for name, value in sizes.items():
            if value is not None:
                command += [f"--{name.replace('_', '-')}", str(value)]
        if args.smoke:
            command += ["--quick-profile"] + (["--batch1-prompts", "1"] if "--batch1-prompts" not in passed else [])
        command += ["--out", str(out)]
        for flag, value in passed.items():
            if flag == "--budget" and args.suite == "cpu-small":
                raise ValueError("--budget does not apply to cpu-small (weights all in RAM or all on disk)")
            if flag in _GPU_ONLY and args.suite not in _GPU_SUITES:
                raise ValueError(f"{flag} applies to {' and '.join(_GPU_SUITES)} only, not {args.suite}")
            if flag == "--shapes" and args.suite in _GPU_SUITES:
                raise ValueError(f"--shapes does not apply to {args.suite}: the planner chooses the engine's blocks")
            command += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return command


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def run_bench(args) -> int:
    command = suite_command(args)
    out = args.out if args.out is not None else private_folder(SCRATCH_OUT, "the benchmarks' output folder")
    print("running: " + " ".join(command), flush=True)
    started = time.time()
    code = subprocess.run(command, cwd=BENCHMARKS_DIR.parent).returncode
    if args.suite == "helm":
        result = out / "helm.json"
        # bench_helm.py writes the table and JSON (also when the speedup target is missed: exit code 1);
        # the plot is drawn from this run's JSON.
        if result.is_file() and result.stat().st_mtime >= started:
            subprocess.run([sys.executable, str(BENCHMARKS_DIR / "plot.py"), str(result), "--helm"],
                           cwd=BENCHMARKS_DIR.parent, check=False)
    if code == SKIPPED_EXIT:
        print(f"error: the {args.suite} suite was skipped (see above); nothing was measured", file=sys.stderr)
    elif code == 0:
        print(f"results in {out}")
    return code
