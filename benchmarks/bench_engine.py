"""Engine throughput on this machine: several policies, overlap on/off, against transformers.

A ~100M-parameter OPT (random weights, built locally), prompt 512, 32 generated tokens, greedy.
Throughput = sequences x generated tokens / (prefill + decode) wall time, as in the FlexGen paper.

    python benchmarks/bench_engine.py [--num-prompts 16] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import Timer, write_results  # noqa: E402

from flexgen_core import Engine, Policy  # noqa: E402
from flexgen_core.testing import build_checkpoint, sample_prompts  # noqa: E402

PROMPT_LEN, GEN_LEN = 512, 32


def engine_rows(path, prompts, device, batch):
    disk = dict(w_gpu_percent=0, w_cpu_percent=0)
    cases = [
        ("engine: all in RAM", Policy(gpu_batch_size=batch, num_gpu_batches=1)),
        ("engine: all in RAM, 2 batches/block", Policy(gpu_batch_size=batch // 2, num_gpu_batches=2)),
        ("engine: weights on disk", Policy(gpu_batch_size=batch, num_gpu_batches=1, **disk)),
        ("engine: weights on disk, 2 batches/block", Policy(gpu_batch_size=batch // 2, num_gpu_batches=2, **disk)),
        ("engine: weights on disk, no overlap", Policy(gpu_batch_size=batch, num_gpu_batches=1, overlap=False, **disk)),
        ("engine: weights 50% disk, cache on disk", Policy(gpu_batch_size=batch, num_gpu_batches=1, w_gpu_percent=50,
                                                          w_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=0)),
    ]
    rows = []
    for name, policy in tqdm(cases, desc="engine policies"):
        with tempfile.TemporaryDirectory() as offload:
            with Engine.from_pretrained(path, policy=policy, offload_dir=offload, device=device) as engine:
                engine.generate(prompts[:1], max_new_tokens=2)  # warm-up
                with Timer() as t:
                    engine.generate(prompts, max_new_tokens=GEN_LEN)
        rows.append({"system": name, "batch": f"{policy.gpu_batch_size}x{policy.num_gpu_batches}",
                     "percent": " ".join(map(str, policy.percent)), "overlap": policy.overlap,
                     "seconds": t.seconds, "tokens_per_s": len(prompts) * GEN_LEN / t.seconds})
    return rows


def transformers_rows(path, prompts, device, batch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    rows = []
    for size in tqdm((1, batch), desc="transformers"):
        with torch.no_grad(), Timer() as t:
            for start in range(0, len(prompts), size):
                chunk = prompts[start:start + size]
                width = max(map(len, chunk))
                ids = torch.tensor([[1] * (width - len(p)) + p for p in chunk], device=device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
                model.generate(ids, attention_mask=mask, max_new_tokens=GEN_LEN, min_new_tokens=GEN_LEN,
                               do_sample=False, pad_token_id=1)
        rows.append({"system": "transformers generate", "batch": f"{size}", "percent": "100 0 100 0 100 0",
                     "overlap": "", "seconds": t.seconds, "tokens_per_s": len(prompts) * GEN_LEN / t.seconds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="GPU batch size of the engine and of batched transformers")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default=None, help="results file name (default engine-<device>)")
    args = parser.parse_args()

    path = build_checkpoint("opt-100m")
    prompts = sample_prompts(path, args.num_prompts, PROMPT_LEN, PROMPT_LEN, seed=0)
    rows = engine_rows(path, prompts, args.device, args.batch) + transformers_rows(path, prompts, args.device, args.batch)
    columns = ["system", "batch", "percent", "overlap", "seconds", "tokens_per_s"]
    notes = (f"Model: `opt-100m` preset (opt-125m shape, vocabulary 8192, ~93M parameters, float32, random "
             f"weights). {args.num_prompts} prompts of {PROMPT_LEN} tokens, {GEN_LEN} new tokens each, greedy. "
             "Disk reads go through the OS page cache: on this machine the offload files stay cached, "
             "so 'disk' measures the engine's read path, not SSD bandwidth.")
    out = write_results(args.name or f"engine-{args.device}", "Engine throughput", rows, columns, notes)
    print(out.read_text())


if __name__ == "__main__":
    main()
