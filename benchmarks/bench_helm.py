"""Wall time of the same `helm-run` through HELM's HuggingFaceClient and through FlexGenClient.

By default on the real model (SmolLM2-135M-Instruct, `flexgen_core.testing.real`: Llama architecture,
30 layers; its weights went through Q4_1 before we dequantised them) over three run entries of the
FlexGen paper's kinds, with data written in HELM's layout: MMLU 5-shot multiple_choice_joint
(max_tokens 1), synthetic_reasoning pattern_match (max_tokens 50, stop "\\n") and wikifact k=5
(5 samples at temperature 1, max_tokens 8). Clients, everything in RAM:
  - HELM's HuggingFaceClient at `-n`, at `-n 1`, `-n 2` and HELM's default `-n 4` (its fastest run counts);
  - FlexGenClient with shared-prefix execution (the default) and with `share_prefix: false`; its policy
    holds everything in RAM in one GPU batch of up to 240 sequences (wikifact's 48 prompts x 5
    samples): on a CPU that is the compute batch, and one batch reads the weights once per step.
Greedy texts must be identical across all (wikifact samples: not comparable, see
../shared/reference/helm-workload.md). Prefill work per client: HELM's client runs every prompt of
every sampled completion through the model; FlexGen's figures come from the engine's own counters
(`request_log`). A second pair of runs times MMLU alone, sharing on vs off.

Each run starts from an empty output folder and cache (its own prod_env/), so no run reads another's
results. With --repeats, the configurations run interleaved and each one's fastest run counts.

    python benchmarks/bench_helm.py --repeats 2        # writes benchmarks/results/helm-real.{json,md}
    python benchmarks/bench_helm.py --model opt-100m --entries synthetic_reasoning:mode=pattern_match \\
        --instances 48 --out benchmarks/results/helm-cpu-shared-prefix
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # helm_support: prod_env writer, data writers, helm-run runner

MMLU = "mmlu:subject=college_mathematics,method=multiple_choice_joint"
REAL_ENTRIES = [MMLU, "synthetic_reasoning:mode=pattern_match", "wikifact:k=5,subject=plaintiff"]
SAMPLED = ("wikifact",)  # temperature 1: samples of two clients cannot match


def _write_data(output_path: Path, instances: int) -> None:
    from helm_support import write_mmlu, write_wikifact

    write_mmlu(output_path, "college_mathematics", num_test=instances)
    write_wikifact(output_path, "plaintiff", num_test=instances)


def _states(run_dirs: dict) -> dict[str, list[dict]]:
    from helm_support import request_states

    return {entry: request_states(run_dir) for entry, run_dir in run_dirs.items()}


def _timed_run(entries, deployment, prod_env: Path, root: Path, label: str, instances: int, threads: int) -> dict:
    from helm_support import FLEXGEN_DEPLOYMENT, run_dirs, run_helm

    output_path = root / f"output-{label}"
    _write_data(output_path, instances)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started_s = time.perf_counter()
    run_helm(entries, deployment, prod_env, output_path, label, instances, num_threads=threads, timeout_s=3600)
    wall_s = time.perf_counter() - started_s
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU time of the helm-run process, for reference: less sensitive than wall time to other load on a
    # shared host, but it counts OpenMP threads spinning between small operations as work.
    cpu_s = (children_after.ru_utime + children_after.ru_stime) - (children_before.ru_utime + children_before.ru_stime)
    states = _states(run_dirs(output_path, label))
    return {
        "client": "FlexGenClient" if deployment == FLEXGEN_DEPLOYMENT else "HuggingFaceClient",
        "threads": threads,
        "wall_s": round(wall_s, 2),
        "cpu_s": round(cpu_s, 2),
        "load_average_1min_at_end": round(os.getloadavg()[0], 1),
        "requests": sum(len(s) for s in states.values()),
        "states": states,
    }


def _engine_stats(request_log: Path) -> dict | None:
    """The engine's counters after its last batch (the request log's largest cumulative entry)."""
    if not request_log.is_file():
        return None
    entries = [json.loads(line) for line in request_log.read_text().splitlines() if line.strip()]
    return max((e["engine_stats"] for e in entries), key=lambda stats: stats["sequences"], default=None)


def _hf_prompt_tokens(states: dict[str, list[dict]], tokenizer) -> int:
    """Prompt tokens HELM's HuggingFaceClient runs through the model: each request's prompt, once per
    returned sequence (transformers' generate expands the batch before the first forward pass)."""
    total = 0
    for entry_states in states.values():
        for state in entry_states:
            request = state["request"]
            sequences = request["num_completions"] if request["temperature"] > 0 else 1
            total += len(tokenizer(request["prompt"])["input_ids"]) * sequences
    return total


def _texts(states: dict[str, list[dict]]) -> dict[str, list[list[str]]]:
    return {entry: [[c["text"] for c in s["result"]["completions"]] for s in entry_states]
            for entry, entry_states in states.items() if not entry.startswith(SAMPLED)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="real", help="'real' (SmolLM2-135M-Instruct) or a testing preset")
    parser.add_argument("--entries", nargs="+", help="HELM run entries, without the model (default: the three)")
    parser.add_argument("--instances", type=int, default=48, help="--max-eval-instances")
    parser.add_argument("--threads", type=int, default=48, help="helm-run -n for FlexGen and for HELM's client")
    parser.add_argument("--gpu-batch", type=int, default=240, help="FlexGen's gpu_batch_size")
    parser.add_argument("--num-gpu-batches", type=int, default=1, help="FlexGen's GPU batches per block")
    parser.add_argument("--hf-threads", type=int, nargs="*", default=[1, 2, 4],
                        help="more -n values for HELM's client, besides --threads (its fastest run counts)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per client, interleaved; the best counts")
    parser.add_argument("--policies", nargs="+", default=[], metavar="GxK|auto",
                        help="more FlexGenClient runs, each under a fixed all-in-RAM policy of G sequences per GPU "
                             "batch and K batches per block, or `policy: auto` (exact, planned for each run entry "
                             "on this machine's profile); table and speedups per policy")
    parser.add_argument("--no-ablations", action="store_true",
                        help="skip the share_prefix-off runs (all entries and MMLU alone)")
    parser.add_argument("--no-mmlu-ablation", action="store_true", help="skip the MMLU-alone sharing on/off pair")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "helm-real")
    args = parser.parse_args()

    import torch
    from helm_support import FLEXGEN_DEPLOYMENT, HF_DEPLOYMENT, write_prod_env
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import commit, machine

    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if args.model == "real":
        from flexgen_core.testing.real import DESCRIPTION, real_checkpoint

        checkpoint, model = real_checkpoint(), DESCRIPTION
        env_args = dict(max_positions=8192, prefix_token="", end_of_text_token="<|im_end|>",
                        hf_args={"apply_chat_template": False}, client_args={"apply_chat_template": False})
        entries = args.entries or REAL_ENTRIES
    else:
        from flexgen_core.testing import PRESETS, build_checkpoint

        preset = PRESETS[args.model]
        checkpoint = build_checkpoint(args.model, seed=0)
        model = f"{args.model} ({preset.num_params / 1e6:.1f}M parameters, random weights), float32"
        env_args = dict(max_positions=preset.max_positions, client_args={})
        entries = args.entries or ["synthetic_reasoning:mode=pattern_match"]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    in_ram = dict(gpu_batch_size=args.gpu_batch, num_gpu_batches=args.num_gpu_batches, w_gpu_percent=100, w_cpu_percent=0,
                  cache_gpu_percent=100, cache_cpu_percent=0, act_gpu_percent=100, act_cpu_percent=0)
    # (label, entries, deployment, -n, share_prefix)
    plan = [("flexgen", entries, FLEXGEN_DEPLOYMENT, args.threads, True)]
    plan += [(f"flexgen-{spec}", entries, FLEXGEN_DEPLOYMENT, args.threads, True) for spec in args.policies]
    if not args.no_ablations:
        plan.append(("flexgen-no-sharing", entries, FLEXGEN_DEPLOYMENT, args.threads, False))
    if args.threads in args.hf_threads or not args.policies:
        plan.append(("hf", entries, HF_DEPLOYMENT, args.threads, None))
    plan += [(f"hf-n{n}", entries, HF_DEPLOYMENT, n, None) for n in args.hf_threads if n != args.threads]
    mmlu = [e for e in entries if e.startswith("mmlu:")]
    if mmlu and len(entries) > 1 and not args.no_mmlu_ablation and not args.no_ablations:
        plan += [("mmlu-flexgen", mmlu, FLEXGEN_DEPLOYMENT, args.threads, True),
                 ("mmlu-flexgen-no-sharing", mmlu, FLEXGEN_DEPLOYMENT, args.threads, False)]
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_helm.") as tmp:
        root = Path(tmp)
        for repeat in range(args.repeats):  # interleaved, so slow phases of a shared host hit every client
            for label, run_entries, deployment, threads, share in plan:
                name = f"{label}-{repeat}"
                print(f"helm-run {' '.join(run_entries)} via {label} (-n {threads}), repeat {repeat} ...", flush=True)
                # A prod_env (so a cache) per run: no run may read another's results.
                request_log = root / f"requests-{name}.jsonl"
                spec = label.removeprefix("flexgen-") if label.startswith("flexgen-") else ""
                if spec == "auto":
                    policy = "auto"
                elif "x" in spec and spec.replace("x", "").isdigit():
                    gpu_batch, num_batches = map(int, spec.split("x"))
                    policy = dict(in_ram, gpu_batch_size=gpu_batch, num_gpu_batches=num_batches, share_prefix=True)
                else:
                    policy = dict(in_ram, share_prefix=bool(share))
                flexgen_args = {"policy": policy, "request_log": str(request_log), **env_args["client_args"]}
                prod_env = write_prod_env(root / f"prod_env-{name}", checkpoint, env_args["max_positions"],
                                          flexgen_args=flexgen_args,
                                          **{k: v for k, v in env_args.items() if k not in ("max_positions", "client_args")})
                run = _timed_run(run_entries, deployment, prod_env, root, name, args.instances, threads)
                run.update(label=label, repeat=repeat, entries=run_entries)
                stats = _engine_stats(request_log)
                if stats is not None:
                    run["engine_stats"] = stats
                    run["prompt_tokens_computed"] = stats["prefill_tokens"] + stats["prefix_tokens"]
                else:
                    run["prompt_tokens_computed"] = _hf_prompt_tokens(run["states"], tokenizer)
                print(f"  {run['wall_s']:.1f} s wall, {run['cpu_s']:.1f} s CPU, "
                      f"{run['prompt_tokens_computed']} prompt tokens computed", flush=True)
                runs.append(run)

    def best(label):
        return min((r for r in runs if r["label"] == label), key=lambda r: r["wall_s"])

    reference = _texts(best("flexgen")["states"])
    mismatches = {}
    for run in runs:
        texts = _texts(run["states"])
        for entry, entry_texts in texts.items():
            diff = sum(a != b for a, b in zip(entry_texts, reference.get(entry, [])))
            if diff or len(entry_texts) != len(reference.get(entry, [])):
                mismatches[f"{run['label']}-{run['repeat']}:{entry}"] = diff
    hf_best = min((best(label) for label, *_ in plan if label.startswith("hf")), key=lambda r: r["wall_s"])
    speedups = {"vs_fastest_hf": hf_best["wall_s"] / best("flexgen")["wall_s"]}
    for spec in args.policies:
        speedups[f"{spec}_vs_fastest_hf"] = hf_best["wall_s"] / best(f"flexgen-{spec}")["wall_s"]
    if not args.no_ablations:
        speedups["vs_no_sharing"] = best("flexgen-no-sharing")["wall_s"] / best("flexgen")["wall_s"]
    if any(label == "mmlu-flexgen" for label, *_ in plan):
        speedups["mmlu_vs_no_sharing"] = best("mmlu-flexgen-no-sharing")["wall_s"] / best("mmlu-flexgen")["wall_s"]
    params = _matmul_params(checkpoint)
    for run in runs:
        run["prefill_tflops"] = round(2 * params * run["prompt_tokens_computed"] / 1e12, 2)
        run["mean_completion_tokens"] = _mean_completion(run["states"])
        del run["states"]
    result = {"model": model, "entries": entries, "instances": args.instances, "flexgen_policy": in_ram,
              "machine": machine(), "commit": commit(), "runs": runs, "greedy_text_mismatches": mismatches,
              "speedups": {k: round(v, 2) for k, v in speedups.items()}}
    lines = [
        "# helm-run wall time: HuggingFaceClient vs FlexGenClient",
        "",
        f"{model}; all in RAM, {machine()['cores']} CPUs ({machine()['cpu']}), CUDA "
        f"{'yes' if torch.cuda.is_available() else 'no'}; commit {result['commit']}. Run entries "
        f"(--max-eval-instances {args.instances}): " + ", ".join(f"`{e}`" for e in entries) + ". "
        "Every run starts with an empty cache. Prefill TFLOPs = 2 x parameters x prompt tokens computed "
        "(attention not counted).",
        "",
        "| client | run entries | -n | repeat | wall time (s) | CPU time (s) | prompt tokens computed | prefill TFLOPs "
        "| requests | load average at end |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        what = run["client"] + (" (share_prefix off)" if "no-sharing" in run["label"] else "")
        if run["label"].startswith("flexgen-") and "no-sharing" not in run["label"]:
            what += f" (policy {run['label'].removeprefix('flexgen-')})"
        scope = "MMLU only" if run["label"].startswith("mmlu") else "all"
        cells = [what, scope, run["threads"], run["repeat"], f"{run['wall_s']:.1f}", f"{run['cpu_s']:.1f}",
                 run["prompt_tokens_computed"], run["prefill_tflops"], run["requests"], run["load_average_1min_at_end"]]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    lines += [
        "",
        f"Greedy texts identical across all runs: **{not mismatches}**" + (f" (mismatches: {mismatches})" if mismatches else "") + ".",
        f"FlexGenClient vs HuggingFaceClient's fastest run ({hf_best['label']}), best of {args.repeats}: "
        f"**{speedups['vs_fastest_hf']:.2f}x**"
        + "".join(f"; policy {spec}: **{speedups[f'{spec}_vs_fastest_hf']:.2f}x**" for spec in args.policies)
        + (f"; vs FlexGenClient with share_prefix off: **{speedups['vs_no_sharing']:.2f}x**" if "vs_no_sharing" in speedups else "")
        + (f"; MMLU alone, sharing on vs off: **{speedups['mmlu_vs_no_sharing']:.2f}x**" if "mmlu_vs_no_sharing" in speedups else "")
        + ".",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path = args.out.with_suffix(".json")
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    json_path.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if not mismatches else 1


def _matmul_params(checkpoint: Path) -> int:
    """Parameters every prompt token is multiplied by: all but the embeddings and the head (a prompt
    pass computes the head for its last token only)."""
    from math import prod

    from safetensors import safe_open

    total = 0
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                if "embed" not in key and "lm_head" not in key:
                    total += prod(handle.get_slice(key).get_shape())
    return total


def _mean_completion(states: dict[str, list[dict]]) -> float:
    lengths = [len(c["tokens"]) for entry_states in states.values() for s in entry_states for c in s["result"]["completions"]]
    return round(sum(lengths) / max(1, len(lengths)), 2)


if __name__ == "__main__":
    sys.exit(main())
