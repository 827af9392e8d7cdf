"""The planner's block size against measured runs of its neighbours, on this host and the real model.

SmolLM2-135M-Instruct (flexgen_core.testing.real), a HELM-like workload: prompts of `--prompt-len`
tokens whose first `--prefix-len` are shared (instructions and in-context examples), `--gen-len`
generated, `--num-prompts` of them. The planner plans for this machine's profile (measured once and kept,
as `policy="auto"` does); then every block size of a list (the planner's choice among them) runs the same
prompts with the chosen placement, and the table gives predicted and measured throughput. The planner's
choice should be within 10% of the fastest measured.

    python benchmarks/bench_planner_blocks.py [--blocks 4 8 16 24 48] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import Timer, write_results  # noqa: E402

from flexgen_core import Engine  # noqa: E402
from flexgen_core.plan.cost_model import CostModel  # noqa: E402
from flexgen_core.plan.workload import Workload  # noqa: E402
from flexgen_core.plan.profiler import resolve  # noqa: E402
from flexgen_core.plan.search import PlanOptions, plan  # noqa: E402
from flexgen_core.plan.shapes import load_model  # noqa: E402
from flexgen_core.testing import sample_prompts  # noqa: E402
from flexgen_core.testing.real import real_checkpoint  # noqa: E402

DTYPE_BYTES = 4  # the real model's checkpoint is float32


def prompts_with_prefix(path, num: int, length: int, prefix_len: int) -> list[list[int]]:
    shared = sample_prompts(path, 1, prefix_len, prefix_len, seed=1)[0]
    own = sample_prompts(path, num, length - prefix_len, length - prefix_len, seed=2)
    return [shared + row[1:] + row[:1] for row in own]  # own rows without a second BOS up front


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--prompt-len", type=int, default=300)
    parser.add_argument("--prefix-len", type=int, default=250)
    parser.add_argument("--gen-len", type=int, default=50)
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 16, 24, 48])
    parser.add_argument("--out", default=None, help="write <out>/planner-blocks-real.md/.json (default: print only)")
    args = parser.parse_args(argv)

    path = real_checkpoint()
    model = load_model(path)
    profile = resolve(None, "cpu", None)
    workload = Workload(args.prompt_len, args.gen_len, args.prefix_len)
    result = plan(model, workload, profile, DTYPE_BYTES,
                  PlanOptions(compress_weight=False, compress_cache=False, max_block_size=args.num_prompts))
    chosen = result.policy
    blocks = sorted(set(args.blocks) | {chosen.block_size})
    cost = CostModel(model, workload, profile, DTYPE_BYTES)
    prompts = prompts_with_prefix(path, args.num_prompts, args.prompt_len, args.prefix_len)
    rows = []
    with tempfile.TemporaryDirectory() as offload:
        for block in blocks:
            policy = chosen.replace(gpu_batch_size=block, num_gpu_batches=1)
            predicted = cost.estimate(policy)
            with Engine.from_pretrained(path, policy=policy, offload_dir=offload, device="cpu") as engine:
                engine.generate(prompts[:2], max_new_tokens=2)  # warm-up (and the shared prefix kept)
                with Timer() as timer:
                    results = engine.generate(prompts, max_new_tokens=args.gen_len)
            tokens = sum(len(c.token_ids) for r in results for c in r.completions)
            rows.append({"block": f"{block}x1", "chosen": "<- planner" if block == chosen.block_size else "",
                         "predicted_tokens_per_s": round(predicted.throughput, 1),
                         "measured_tokens_per_s": round(tokens / timer.seconds, 1), "seconds": round(timer.seconds, 1)})
            print(rows[-1], flush=True)
    fastest = max(rows, key=lambda r: r["measured_tokens_per_s"])
    mine = next(r for r in rows if r["chosen"])
    ratio = mine["measured_tokens_per_s"] / fastest["measured_tokens_per_s"]
    verdict = (f"The planner chose {mine['block']}: {ratio:.0%} of the fastest measured ({fastest['block']}, "
               f"{fastest['measured_tokens_per_s']} tokens/s); the acceptance bound is 90%.")
    print(verdict)
    if args.out:
        notes = (f"SmolLM2-135M-Instruct (float32), {args.num_prompts} prompts of {args.prompt_len} tokens, the first "
                 f"{args.prefix_len} shared, {args.gen_len} generated, greedy; the planner's placement "
                 f"({' '.join(map(str, chosen.percent))}) at every block size; profile {profile.name}. {verdict}")
        write_results("planner-blocks-real", "Planner's block size vs measured neighbours (real model, this host)",
                      rows, ["block", "chosen", "predicted_tokens_per_s", "measured_tokens_per_s", "seconds"],
                      notes=notes, out_dir=args.out)
    return 0 if ratio >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
