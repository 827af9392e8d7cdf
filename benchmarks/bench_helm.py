"""Wall time of the same `helm-run` through HELM's HuggingFaceClient and through FlexGenClient.

Acceptance 4 of the HELM plugin issue: on one machine, in one invocation of this script,
`helm-run synthetic_reasoning:mode=pattern_match` (~48 instances, max_tokens 50, stop "\\n") on a
~100M-parameter OPT (`opt-100m` preset of flexgen_core.testing: random weights, built locally)
with everything in RAM, through each client. The generated texts must be identical; FlexGen
should take at least 2x less wall time.

HELM's client gets the same `-n` as FlexGen (and, as a second baseline, HELM's default `-n 4`);
the figure that counts compares the same command. Each run starts from an empty output folder and
cache (its own prod_env/), so no run reads another's results. With --repeats, the configurations run
interleaved and each one's fastest run counts (a shared host's load comes and goes).

    python benchmarks/bench_helm.py --repeats 3           # writes benchmarks/results/helm-cpu.{json,md}
    python benchmarks/bench_helm.py --preset tiny --instances 8 --threads 8 --out /tmp/quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # helm_support: prod_env writer and helm-run runner

DEFAULT_ENTRY = "synthetic_reasoning:mode=pattern_match"


def _texts(run_dir: Path) -> list[list[str]]:
    from helm_support import request_states

    return [[c["text"] for c in state["result"]["completions"]] for state in request_states(run_dir)]


def _timed_run(
    entry: str, deployment: str, prod_env: Path, root: Path, label: str, instances: int, threads: int
) -> dict:
    from helm_support import FLEXGEN_DEPLOYMENT, run_dirs, run_helm, stat_mean

    output_path = root / f"output-{label}"
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started_s = time.perf_counter()
    run_helm([entry], deployment, prod_env, output_path, label, instances, num_threads=threads, timeout_s=3600)
    wall_s = time.perf_counter() - started_s
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU time of the helm-run process, for reference: less sensitive than wall time to other load on a
    # shared host, but it counts OpenMP threads spinning between small operations as work.
    cpu_s = (children_after.ru_utime + children_after.ru_stime) - (children_before.ru_utime + children_before.ru_stime)
    (run_dir,) = run_dirs(output_path, label).values()
    return {
        "repeat": int(label.rsplit("-", 1)[1]),
        "client": "FlexGenClient" if deployment == FLEXGEN_DEPLOYMENT else "HuggingFaceClient",
        "threads": threads,
        "wall_s": round(wall_s, 2),
        "cpu_s": round(cpu_s, 2),
        "load_average_1min_at_end": round(os.getloadavg()[0], 1),
        "requests": len(_texts(run_dir)),
        "mean_batch_size": stat_mean(run_dir, "batch_size"),
        "exact_match": stat_mean(run_dir, "exact_match"),
        "run_dir": run_dir,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entry", default=DEFAULT_ENTRY, help="HELM run entry, without the model")
    parser.add_argument("--instances", type=int, default=48)
    parser.add_argument("--threads", type=int, default=48, help="helm-run -n for both clients")
    parser.add_argument("--preset", default="opt-100m")
    parser.add_argument("--repeats", type=int, default=1, help="runs per client, interleaved; the best counts")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "helm-cpu")
    args = parser.parse_args()

    import torch
    from helm_support import FLEXGEN_DEPLOYMENT, HF_DEPLOYMENT, write_prod_env

    from flexgen_core.testing import PRESETS, build_checkpoint

    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    preset = PRESETS[args.preset]
    checkpoint = build_checkpoint(args.preset, seed=0)
    in_ram = dict(
        gpu_batch_size=args.instances,
        num_gpu_batches=1,
        w_gpu_percent=100,
        w_cpu_percent=0,
        cache_gpu_percent=100,
        cache_cpu_percent=0,
        act_gpu_percent=100,
        act_cpu_percent=0,
    )
    # (label, deployment, -n): FlexGen, HELM's client with the same command, HELM's client at its default -n.
    plan = [("flexgen", FLEXGEN_DEPLOYMENT, args.threads), ("hf", HF_DEPLOYMENT, args.threads)]
    if args.threads != 4:
        plan.append(("hf-n4", HF_DEPLOYMENT, 4))
    runs = []
    texts: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="bench_helm.") as tmp:
        root = Path(tmp)
        for repeat in range(args.repeats):  # interleaved, so slow phases of a shared host hit every client
            for label, deployment, threads in plan:
                name = f"{label}-{repeat}"
                print(f"helm-run {args.entry} via {deployment} (-n {threads}), repeat {repeat} ...", flush=True)
                # A prod_env (so a cache) per run: no run may read another's results.
                prod_env = write_prod_env(
                    root / f"prod_env-{name}", checkpoint, preset.max_positions, flexgen_args={"policy": in_ram}
                )
                run = _timed_run(args.entry, deployment, prod_env, root, name, args.instances, threads)
                run["label"] = label
                print(f"  {run['wall_s']:.1f} s wall, {run['cpu_s']:.1f} s CPU, batch size {run['mean_batch_size']}")
                texts[name] = _texts(run.pop("run_dir"))
                runs.append(run)
        tokens = _token_counts(checkpoint, root / "output-flexgen-0")

    reference = texts["flexgen-0"]
    identical = all(run_texts == reference for run_texts in texts.values())
    best = {label: min((r for r in runs if r["label"] == label), key=lambda r: r["wall_s"]) for label, _, _ in plan}
    same_n = best["hf"]["wall_s"] / best["flexgen"]["wall_s"]
    best_hf = min((best[label] for label, _, _ in plan if label != "flexgen"), key=lambda r: r["wall_s"])
    conservative = best_hf["wall_s"] / best["flexgen"]["wall_s"]
    result = {
        "scenario": args.entry,
        "instances": args.instances,
        "model": f"{args.preset} ({preset.num_params / 1e6:.1f}M parameters, random weights), float32, all in RAM",
        "prompt_tokens_mean": tokens["prompt"],
        "generated_tokens_mean": tokens["generated"],
        "flexgen_policy": in_ram,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
        },
        "runs": runs,
        "texts_identical": identical,
        "speedup_same_command": round(same_n, 2),
        "speedup_vs_fastest_hf": round(conservative, 2),
    }
    lines = [
        "# helm-run wall time: HuggingFaceClient vs FlexGenClient",
        "",
        f"`{args.entry}`, {args.instances} instances, {result['model']}; prompts {tokens['prompt']:.0f} tokens and "
        f"completions {tokens['generated']:.1f} tokens on average; {os.cpu_count()} CPUs, "
        f"CUDA {'yes' if result['machine']['cuda'] else 'no'}. Every run starts with an empty cache.",
        "",
        "| client | -n | repeat | wall time (s) | CPU time (s) | mean batch size | load average at end |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        batch = f"{run['mean_batch_size']:.1f}" if run["mean_batch_size"] else "-"
        cells = [run["client"], run["threads"], run["repeat"], f"{run['wall_s']:.1f}", f"{run['cpu_s']:.1f}", batch]
        cells.append(run["load_average_1min_at_end"])
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    lines += [
        "",
        f"Generated texts identical across all runs: **{identical}**.",
        f"Wall-time speedup, same command (-n {args.threads}), best of {args.repeats}: **{same_n:.2f}x**; "
        f"against HuggingFaceClient's fastest run ({best_hf['label']}): **{conservative:.2f}x**.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path = args.out.with_suffix(".json")
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    json_path.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if same_n >= 2.0 and identical else 1


def _token_counts(checkpoint: Path, output_path: Path) -> dict[str, float]:
    """Mean prompt and completion lengths (tokens) of a FlexGen run, with the model's tokenizer."""
    from helm_support import request_states, run_dirs
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    (run_dir,) = run_dirs(output_path, "flexgen-0").values()
    states = request_states(run_dir)
    prompts = [len(tokenizer(state["request"]["prompt"])["input_ids"]) for state in states]
    generated = [len(state["result"]["completions"][0]["tokens"]) for state in states]
    return {"prompt": sum(prompts) / len(prompts), "generated": sum(generated) / len(generated)}


if __name__ == "__main__":
    sys.exit(main())
