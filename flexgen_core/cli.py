"""`flexgen` command line: argument parsing and messages only."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path

from flexgen_core.bench_cli import add_bench_parser
from flexgen_core.cli_support import HelpFormatter, UsageError, add_version, run_command
from flexgen_core.memory import DTYPE_BYTES
from flexgen_core.policy import COMPRESS_CHOICES, SWITCHES, Policy
from flexgen_core.runtime.device_names import DEVICE_CHOICES, check_device_name


def device_arg(value: str) -> str:
    """--device: auto, cpu, cuda, cuda:N or simulated (a simulated GPU on a CPU-only host)."""
    try:
        return check_device_name(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a device: {', '.join(DEVICE_CHOICES)}") from None


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--percent", nargs=6, type=int, metavar=("W_G", "W_C", "C_G", "C_C", "A_G", "A_C"),
                   default=[100, 0, 100, 0, 100, 0],
                   help="percent of weights, KV cache, activations on GPU and CPU (the rest goes to disk)")
    p.add_argument("--gpu-batch-size", type=int, default=1, help="sequences computed together on the GPU")
    p.add_argument("--num-gpu-batches", type=int, default=1,
                   help="GPU batches per block (a block of gpu-batch-size x num-gpu-batches sequences shares each "
                        "layer's weight load)")
    for switch in SWITCHES:
        p.add_argument(switch.flag, dest=switch.name, action="store_false" if switch.default else "store_true",
                       help=switch.flag_help)
    p.add_argument("--offload-dir", default=None, help="folder of your own for disk-resident tensors (default: "
                   "$TMPDIR/flexgen-offload-<uid>, made private)")
    p.add_argument("--device", default="auto", type=device_arg, metavar="{" + ",".join(DEVICE_CHOICES) + "}",
                   help="compute device (auto: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPE_BYTES), help="weights, cache and compute dtype")


def _policy(args) -> Policy:
    return Policy.from_percent(args.percent, gpu_batch_size=args.gpu_batch_size, num_gpu_batches=args.num_gpu_batches,
                               **{switch.name: getattr(args, switch.name) for switch in SWITCHES})


def policy_flags(policy: Policy) -> str:
    """The `flexgen generate` flags that give `policy` back: every field that is not the default."""
    flags = [f"--percent {' '.join(map(str, policy.percent))}", f"--gpu-batch-size {policy.gpu_batch_size}",
             f"--num-gpu-batches {policy.num_gpu_batches}"]
    return " ".join(flags + [s.flag for s in SWITCHES if getattr(policy, s.name) != s.default])


def _prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    try:
        text = sys.stdin.read() if args.prompt_file == "-" else open(args.prompt_file, encoding="utf-8").read()
    except OSError as e:
        raise ValueError(f"cannot read --prompt-file {args.prompt_file!r}: {e.strerror}") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompt-file {args.prompt_file!r} holds no prompt (one per line)")
    return prompts


def _generate(args) -> int:
    import time

    from transformers import AutoTokenizer

    from flexgen_core.engine import Engine, read_model
    from flexgen_core.runtime import checkpoint

    policy = _policy(args)
    if args.compress != "never" and args.policy != "auto":
        raise UsageError("--compress goes with --policy auto (a given policy is compressed with --compress-weight / "
                         "--compress-cache)")
    if args.policy == "auto":
        given = [flag for flag, value, default in (("--percent", args.percent, [100, 0, 100, 0, 100, 0]),
                                                  ("--gpu-batch-size", args.gpu_batch_size, 1),
                                                  ("--num-gpu-batches", args.num_gpu_batches, 1)) if value != default]
        if given:
            raise UsageError(f"--policy auto plans {', '.join(given)} itself: give one or the other")
    prompts = _prompts(args)
    if any(not stop for stop in args.stop):
        raise UsageError("--stop needs a non-empty text")
    folder = checkpoint.resolve(args.model)
    read_model(folder)  # config.json checked before anything else reads it
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # transformers raises several kinds; one line for the user whichever it is
        raise ValueError(f"cannot load a tokenizer from {str(folder)!r}: {str(e).splitlines()[0]}") from None
    prompt_ids = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    stop_ids = [tokenizer(stop, add_special_tokens=False)["input_ids"] for stop in args.stop]
    extra = {}
    if args.policy == "auto":  # planned for this call's shape; the compression flags force it on
        policy = "auto"
        extra = dict(prompt_len_hint=max(map(len, prompt_ids)), gen_len_hint=max(1, args.max_new_tokens),
                     num_prompts_hint=len(prompt_ids) * args.num_completions, compress=args.compress,
                     compress_weight=True if args.compress_weight else None,
                     compress_cache=True if args.compress_cache else None)
    with Engine.from_pretrained(folder, policy=policy, offload_dir=args.offload_dir, device=args.device,
                                dtype=args.dtype, **extra) as engine:
        if args.policy == "auto":
            print(f"policy auto: {policy_flags(engine.policy)}", file=sys.stderr)
        started_s = time.perf_counter()
        results = engine.generate(prompt_ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, num_completions=args.num_completions, stop=stop_ids or None,
                                  seed=args.seed)
        elapsed_s, stats = time.perf_counter() - started_s, engine.stats
    many = len(prompts) > 1 or args.num_completions > 1
    for p_idx, (prompt, result) in enumerate(zip(prompts, results)):
        for c_idx, completion in enumerate(result.completions):
            text = tokenizer.decode(completion.token_ids, skip_special_tokens=True)
            cuts = [text.find(stop) for stop in args.stop if stop in text]
            if cuts:  # a stop can end inside a token: the text ends where the stop text starts
                text = text[:min(cuts)]
            if many:
                print(f"--- prompt {p_idx + 1}, completion {c_idx + 1} ({completion.finish_reason})")
            print(prompt + text)
    tokens = sum(len(c.token_ids) for r in results for c in r.completions)
    print(f"{tokens} tokens for {len(prompts)} prompt(s) in {elapsed_s:.2f} s: {tokens / elapsed_s:.1f} tokens/s; "
          f"first token after {stats.prefill_s:.2f} s (the prompt pass), decode {stats.decode_s:.2f} s",
          file=sys.stderr)
    return 0


# ---- flexgen plan ------------------------------------------------------------------------------------

_SWITCH = {"on": True, "off": False, "auto": None}


def _plan(args) -> int:
    import json

    from flexgen_core.plan import hardware, shapes
    from flexgen_core.plan import search as planner
    from flexgen_core.plan.workload import Workload

    profile = hardware.load_profile(args.hardware)
    try:
        sizes = {tier: hardware.parse_size(value) if value else None
                 for tier, value in (("gpu", args.gpu_mem), ("cpu", args.cpu_mem), ("disk", args.disk_mem))}
    except ValueError as e:
        raise UsageError(str(e)) from None
    profile = profile.with_memory(**sizes)
    if not 0 <= args.shared_prefix_len < args.prompt_len:
        raise UsageError(f"--shared-prefix-len must be in [0, --prompt-len={args.prompt_len}) (each prompt keeps "
                         f"at least one token of its own), got {args.shared_prefix_len}")
    model = shapes.load_model(args.model)
    if args.prompt_len + args.gen_len > model.shape.max_positions:
        raise UsageError(f"--prompt-len {args.prompt_len} + --gen-len {args.gen_len} exceeds {model.name}'s context "
                         f"of {model.shape.max_positions} positions")
    dtype = args.dtype or profile.dtype
    options = planner.PlanOptions(compress_weight=_SWITCH[args.compress_weight],
                                  compress_cache=_SWITCH[args.compress_cache],
                                  cpu_cache_compute=_SWITCH[args.cpu_attention],
                                  memory_fraction=args.memory_fraction, max_block_size=args.max_block_size)
    workload = Workload(args.prompt_len, args.gen_len, args.shared_prefix_len)
    result = planner.plan(model, workload, profile, DTYPE_BYTES[dtype], options, evaluate_all=bool(args.plot))
    if args.plot:
        _plot(result, args.plot)
    if args.json:
        print(json.dumps(result.to_dict() | {"dtype": dtype}, indent=2))
    else:
        print(_plan_table(result, dtype))
        if args.plot:
            print(f"\nplot: {args.plot}")
    return 0


def _plan_table(result, dtype: str) -> str:
    from flexgen_core.plan.hardware import format_size

    best, p, wl = result.best, result.policy, result.workload
    onoff = {True: "on", False: "off"}
    shared = f" ({wl.shared_prefix_len} shared)" if wl.shared_prefix_len else ""
    lines = [
        f"Plan for {result.model.name} on {result.hardware.name}: prompt {wl.prompt_len}{shared}, "
        f"generate {wl.gen_len}, {dtype}",
        "",
        f"  block          {p.gpu_batch_size} x {p.num_gpu_batches} GPU batches = {p.block_size} sequences",
        "                 GPU    CPU    disk",
    ]
    for label, (g, c) in (("weights", p.percent[0:2]), ("KV cache", p.percent[2:4]), ("activations", p.percent[4:6])):
        lines.append(f"  {label:<12}  {g:>4}%  {c:>4}%  {100 - g - c:>4}%")
    lines += [
        f"  switches       overlap {onoff[p.overlap]}, CPU attention {onoff[p.cpu_cache_compute]}, "
        f"compress weights {onoff[p.compress_weight]}, compress cache {onoff[p.compress_cache]}, "
        f"pin weights {onoff[p.pin_weight]}",
        f"  flags          {policy_flags(p)}",
        "",
        f"  throughput     {best.throughput:.4g} tokens/s",
        _tie_note(result),
        f"  prefill        {_seconds(best.prefill_s)} per block",
        f"  decode         {_seconds(best.decode_s)} per block ({_seconds(best.decode_token_s)} per token)",
    ]
    if wl.shared_prefix_len:
        lines.append(f"  shared prefix  {wl.shared_prefix_len} tokens computed once: {_seconds(best.prefix_s)} "
                     f"per run; each block computes and caches {wl.own_len} prompt tokens per sequence")
    lines += [
        "",
        "  memory         peak         usable       size",
    ]
    capacity = result.hardware.capacity()
    for tier in ("gpu", "cpu", "disk"):
        lines.append(f"  {tier:<12}   {format_size(best.peak_memory[tier]):<12} {format_size(result.usable[tier]):<12} "
                     f"{format_size(capacity[tier])}")
    if result.hardware.unified:
        lines.append("                 (CPU-only host: the gpu and cpu tiers share host RAM)")
    per_run = "the shared prefix's pass: per run; " if wl.shared_prefix_len else ""
    lines += ["", f"  time by lane and term, per block ({per_run}the lanes of a layer overlap):"]
    for phase, terms in best.breakdown.items():
        lines.append(f"  {phase:<12}   " + ", ".join(f"{k} {_seconds(v)}" for k, v in terms.items()))
    if best.disk_cached:
        lines.append("  (disk I/O priced at page-cache speed: the plan's disk files fit in RAM it leaves free)")
    return "\n".join(lines)


def _tie_note(result) -> str:
    """Why the chosen policy may not be the fastest predicted: the planner's tie rule."""
    fastest, tol = result.fastest, result.tie_tolerance
    rule = (f"  chosen as      the least offloading, then the smallest block, of the policies predicted within\n"
            f"                 {tol:.0%} of the fastest (the cost model is not more accurate than that)")
    if fastest.throughput <= result.best.throughput:
        return rule + ": this is the fastest"
    p = fastest.policy
    return (rule + f"; the fastest,\n                 {fastest.throughput:.4g} tokens/s, is {p.gpu_batch_size}x"
            f"{p.num_gpu_batches} {' '.join(map(str, p.percent))}")


def _seconds(value: float) -> str:
    if value < 1:
        return f"{value * 1e3:.3g} ms"
    return f"{value:,.0f} s" if value >= 1000 else f"{value:.3g} s"


def _plot(result, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_size = result.throughput_by_block_size()
    sizes = list(by_size)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(sizes, [lp for lp, _ in by_size.values()], ":", color="0.6", label="linear program (fractional placement)")
    exact = [(size, e) for size, (_, e) in by_size.items() if e is not None]
    ax.plot([s for s, _ in exact], [e for _, e in exact], "o-", label="rounded policy, exact memory check")
    best = result.best
    ax.plot([best.policy.block_size], [best.throughput], "r*", markersize=16,
            label=f"chosen: {best.policy.gpu_batch_size}x{best.policy.num_gpu_batches}, "
                  f"{' '.join(map(str, best.policy.percent))}\n(least offloading, then smallest block, within "
                  f"{result.tie_tolerance:.0%} of the fastest)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("effective batch size (sequences per block)")
    ax.set_ylabel("predicted generation throughput (tokens/s)")
    ax.set_title(f"{result.model.name} on {result.hardware.name}, prompt {result.workload.prompt_len}, "
                 f"generate {result.workload.gen_len}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- flexgen profile ---------------------------------------------------------------------------------

def _profile(args) -> int:
    from flexgen_core.plan.profiler import measure, measured_profile_path
    from flexgen_core.runtime.storage import Devices

    device = Devices(args.device).profile_device
    out = Path(args.out or measured_profile_path(device)).expanduser()
    try:  # before minutes of measuring
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_dir() or not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
            raise OSError(errno.EACCES, "not a writable file")
    except OSError as e:
        raise ValueError(f"cannot write the profile to {str(out)!r}: {e.strerror}") from None
    profile = measure(device=args.device, offload_dir=args.offload_dir, quick=args.quick, dtype=args.dtype)
    path = profile.save(out)
    d = profile.to_dict()
    print(f"profile {profile.name} written to {path}")
    for section in ("memory", "bandwidth_GBps", "flops_TFLOPs"):
        print(f"  {section}: " + ", ".join(f"{k} {v}" for k, v in d[section].items()))
    print(f"  overhead per layer and batch: {profile.layer_overhead_s * 1e6:.3g} us; "
          f"I/O-compute overlap: {profile.io_overlap:.2f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexgen", description="Offloaded, block-scheduled LLM inference",
                                     formatter_class=HelpFormatter)
    add_version(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    gen_help = ("generate completions for a prompt or a file of prompts; the throughput and time to first token "
                "go to stderr")
    gen = sub.add_parser("generate", help=gen_help, description=gen_help[0].upper() + gen_help[1:] + ". The "
                         "policy is given by the flags below (flexgen plan prints them) or planned with --policy auto.",
                         formatter_class=HelpFormatter)
    gen.add_argument("--model", required=True, help="hub name or local checkpoint folder")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt (text)")
    source.add_argument("--prompt-file", help="prompts, one per line ('-': standard input), generated as one call")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per completion")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens "
                     "whose mass reaches this")
    gen.add_argument("--num-completions", type=int, default=1, help="completions per prompt")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT",
                     help="end a completion where this text appears (repeatable)")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed (default: a fresh one per prompt)")
    gen.add_argument("--policy", choices=["flags", "auto"], default="flags", help="flags: the policy the flags "
                     "below give; auto: plan the policy for this call (flexgen plan's search on "
                     "this machine's profile) instead of the flags below; exact policies only unless --compress "
                     "allow; --compress-weight/--compress-cache force compression on")
    gen.add_argument("--compress", choices=COMPRESS_CHOICES, default="never",
                     help="with --policy auto: 'allow' lets the planner choose 4-bit weights or cache where it pays "
                          "(lossy: results change); default never")
    _add_policy_args(gen)
    gen.set_defaults(run=_generate)

    plan_help = "choose a policy for a model, a machine and a workload (cost model + LP)"
    pl = sub.add_parser("plan", help=plan_help, formatter_class=HelpFormatter,
                        description="Choose a policy for a model, a machine and a workload: a linear program over "
                                    "the cost model per batch shape, checked against the engine's exact memory "
                                    "accounting. Prints the policy, its flags for flexgen generate, the predicted "
                                    "throughput and where the time goes.")
    pl.add_argument("--model", required=True, help="hub name, local checkpoint folder, or a known model name")
    pl.add_argument("--hardware", required=True, help="built-in profile name (t4-gcp) or a profile JSON file")
    pl.add_argument("--gpu-mem", help="override the profile's GPU memory, e.g. 16GB (a unit is required; "
                    "GB = GiB = 2**30 bytes, as in the profiles)")
    pl.add_argument("--cpu-mem", help="override the profile's CPU memory, e.g. 200GB")
    pl.add_argument("--disk-mem", help="override the profile's disk space, e.g. 1.5TB")
    pl.add_argument("--prompt-len", type=int, default=512, help="tokens per prompt")
    pl.add_argument("--gen-len", type=int, default=32, help="tokens generated per prompt")
    pl.add_argument("--shared-prefix-len", type=int, default=0, metavar="N",
                    help="the first N prompt tokens are the same in every prompt (HELM's instructions and "
                         "in-context examples): computed once and shared (default 0)")
    pl.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default=None,
                    help="weights and cache dtype (default: the profile's, float16 for t4-gcp)")
    for flag, default, what in (("--compress-weight", "off", "4-bit weights"),
                                ("--compress-cache", "off", "4-bit KV cache"),
                                ("--cpu-attention", "auto", "attention over off-GPU cache on the CPU")):
        pl.add_argument(flag, nargs="?", const="on", default=default, choices=sorted(_SWITCH),
                        help=f"{what}: on, off, or auto to let the planner decide (default {default}; bare flag: on)")
    pl.add_argument("--memory-fraction", type=float, default=0.95, help="share of each tier a plan may fill "
                    "(a GPU also keeps the allocator's reserve free)")
    pl.add_argument("--max-block-size", type=int, default=None, help="at most this many sequences per block")
    pl.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    pl.add_argument("--plot", metavar="FILE.png", help="plot predicted throughput against effective batch size")
    pl.set_defaults(run=_plan)

    pr = sub.add_parser("profile", help="measure this machine's hardware profile (about a minute; --quick: seconds)",
                        formatter_class=HelpFormatter,
                        description="Measure this machine's hardware profile (copy bandwidths, disk, matmul and "
                                    "attention rates, per-layer overhead, I/O overlap) and write it as JSON, "
                                    "where policy auto looks for it unless --out says otherwise.")
    pr.add_argument("--out", help="profile JSON to write (default: where policy='auto' looks for it)")
    pr.add_argument("--offload-dir", default=None, help="folder on the disk to measure (default: a temp folder)")
    pr.add_argument("--device", default="auto", type=device_arg, metavar="{" + ",".join(DEVICE_CHOICES) + "}",
                    help="the compute device to measure")
    pr.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default=None,
                    help="dtype of the compute measurements (default float16 on CUDA, float32 on CPU)")
    pr.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (seconds, noisier)")
    pr.set_defaults(run=_profile)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    return run_command(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
