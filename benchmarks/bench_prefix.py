"""Shared-prefix execution on this machine: prompts that share most of their tokens, sharing on vs off.

A ~100M-parameter OPT (random weights, built locally). Each prompt is one 448-token prefix (HELM's
instructions and in-context examples stand for it) plus 64 tokens of its own, 32 generated, greedy;
weights in RAM and on disk. Throughput = sequences x generated tokens / wall time of one
`generate` call, as in the FlexGen paper; "prefill" and "KV cache" are what the block computes and
holds, from the engine's own accounting. The greedy tokens of each pair must be identical.

    python benchmarks/bench_prefix.py [--num-prompts 16] [--batch 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import Timer, write_results  # noqa: E402

from flexgen_core import Engine, Policy, memory  # noqa: E402
from flexgen_core.testing import build_checkpoint, sample_prompts  # noqa: E402

PREFIX_LEN, OWN_LEN, GEN_LEN = 448, 64, 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="GPU batch size (blocks of 2 GPU batches)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    path = build_checkpoint("opt-100m")
    prefix = sample_prompts(path, 1, PREFIX_LEN, PREFIX_LEN, seed=0)[0]
    prompts = [prefix + own[1:] for own in sample_prompts(path, args.num_prompts, OWN_LEN + 1, OWN_LEN + 1, seed=1)]
    placements = {"weights in RAM": {}, "weights on disk": dict(w_gpu_percent=0, w_cpu_percent=0)}
    rows, tokens = [], {}
    for (where, placement), share in tqdm([(p, s) for p in placements.items() for s in (False, True)], desc="cases"):
        policy = Policy(gpu_batch_size=args.batch // 2, num_gpu_batches=2, share_prefix=share, **placement)
        with tempfile.TemporaryDirectory() as offload:
            with Engine.from_pretrained(path, policy=policy, offload_dir=offload, device=args.device) as engine:
                engine.generate(sample_prompts(path, 1, 8, 8, seed=2), max_new_tokens=2)  # warm-up
                with Timer() as t:
                    results = engine.generate(prompts, max_new_tokens=GEN_LEN)
                own = OWN_LEN if share else PREFIX_LEN + OWN_LEN
                cache = memory.MemoryReport()
                memory.add_block_terms(cache, engine.layers, engine.config, policy, own, GEN_LEN, 4, False)
        tokens[(where, share)] = [r.completions[0].token_ids for r in results]
        prefill_tokens = len(prompts) * own + (PREFIX_LEN if share else 0)
        rows.append({"system": f"engine, {where}, sharing {'on' if share else 'off'}",
                     "batch": f"{policy.gpu_batch_size}x{policy.num_gpu_batches}",
                     "prefill_tokens": prefill_tokens,
                     "block_cache_MiB": round(sum(cache.cache.values()) / 2**20, 1),
                     "seconds": t.seconds, "tokens_per_s": len(prompts) * GEN_LEN / t.seconds})
    for where in placements:
        assert tokens[(where, True)] == tokens[(where, False)], f"{where}: sharing changed the greedy tokens"
    columns = ["system", "batch", "prefill_tokens", "block_cache_MiB", "seconds", "tokens_per_s"]
    notes = (f"Model: `opt-100m` preset (opt-125m shape, vocabulary 8192, float32, random weights). "
             f"{args.num_prompts} prompts of {PREFIX_LEN} shared + {OWN_LEN} own tokens, {GEN_LEN} generated, "
             "greedy; identical tokens with sharing on and off. With sharing on, the prefix is computed once "
             "(prefill_tokens counts it once) and the block's KV cache holds only each sequence's own tokens "
             "(the prefix's K/V, one sequence's worth, is held beside it). Disk reads go through the page cache.")
    out = write_results(f"prefix-{args.device}", "Shared-prefix execution", rows, columns, notes)
    print(out.read_text())


if __name__ == "__main__":
    main()
