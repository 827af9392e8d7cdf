"""4-bit compression (FlexGen paper, Sec. 5): perplexity cost, throughput with weights on disk, and the
share of decode time spent decompressing.

1. Perplexity. A small OPT trained on standard-library sources (train_small_opt.py; head_dim 64, the
   cache's group size) scores held-out windows through the engine in four settings: fp32, 4-bit
   weights, 4-bit KV cache, both. The cache is read only in decode steps, so each window goes through
   the decode path: its first PROMPT_LEN tokens are the prompt and the rest is fed token by token with
   `generate(forced_tokens=...)`, which returns each fed token's logprob. Perplexity =
   exp(-mean logprob) over all continuation tokens. transformers scores the same tokens with one
   teacher-forced forward per window, as a check on the engine's fp32 figure. The goal is the paper's:
   compressed within 2% of fp32. A few fake-quantised transformers runs (compress + decompress of one
   kind of weight at a time) show where the weight-compression loss comes from.
2. Throughput. The `opt-100m` preset (random weights), weights wholly on disk, prompt 512, 32 new
   tokens, batch 8: uncompressed, 4-bit weights, 4-bit weights and cache, all in one invocation (each
   policy run twice after a warm-up, the faster run reported: the machine is shared).
3. Decompression share. Every engine run above counts the time spent in `decompress` (weights and
   cache) by wrapping it where weights.py and kv_cache.py call it, and times prefill and decode apart
   (the first token choice ends the prefill). A last run without overlap makes the share exact: there
   the decompression is serial with the compute instead of running on the I/O thread beside it.

    python benchmarks/bench_compression.py          # writes benchmarks/results/compression-cpu.{md,json}
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import Timer, markdown_table, write_results  # noqa: E402
from train_small_opt import Recipe, heldout_windows, trained_model  # noqa: E402

import flexgen_core.runtime.kv_cache  # noqa: E402
import flexgen_core.runtime.schedule  # noqa: E402
import flexgen_core.runtime.weights  # noqa: E402
from flexgen_core import Engine, Policy  # noqa: E402
from flexgen_core.compression import compress, decompress  # noqa: E402
from flexgen_core.memory import CACHE_COMPRESSION, WEIGHT_COMPRESSION  # noqa: E402
from flexgen_core.testing import build_checkpoint, sample_prompts  # noqa: E402

WINDOW_LEN, PROMPT_LEN = 256, 32
THROUGHPUT_PROMPT_LEN, THROUGHPUT_GEN_LEN = 512, 32
GOAL_RELATIVE = 0.02  # the paper: 4-bit within ~1.4% of fp16 perplexity on OPT-30B


# ---------------------------------------------------------------------------------------------------
# Instrumentation: time spent in decompress, and when the prefill ends


class DecodeClock:
    """Wraps `decompress` where the engine calls it and the first token choice of each run.

    Counts are summed over threads: with overlap the weight loads run on the I/O thread, so their
    decompression overlaps the compute rather than adding to the wall time one for one.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.seconds = {"weights": 0.0, "cache": 0.0}
        self.calls = {"weights": 0, "cache": 0}
        self.first_choice_s: float | None = None

    def _timed(self, kind: str):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return decompress(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                with self.lock:
                    self.seconds[kind] += elapsed
                    self.calls[kind] += 1
        return wrapper

    @contextmanager
    def installed(self):
        original_select = flexgen_core.runtime.schedule.select_tokens

        def select(*args, **kwargs):
            if self.first_choice_s is None:
                self.first_choice_s = time.perf_counter()
            return original_select(*args, **kwargs)

        flexgen_core.runtime.weights.decompress = self._timed("weights")
        flexgen_core.runtime.kv_cache.decompress = self._timed("cache")
        flexgen_core.runtime.schedule.select_tokens = select
        try:
            yield self
        finally:
            flexgen_core.runtime.weights.decompress = decompress
            flexgen_core.runtime.kv_cache.decompress = decompress
            flexgen_core.runtime.schedule.select_tokens = original_select

    def timed_generate(self, engine, prompts, max_new_tokens, **kwargs) -> tuple[list, dict]:
        """Run one `generate` (a single block) and return its results and timing."""
        self.reset()
        start = time.perf_counter()
        results = engine.generate(prompts, max_new_tokens=max_new_tokens, **kwargs)
        end = time.perf_counter()
        steps = max_new_tokens  # the prefill (step 0) and max_new_tokens - 1 decode steps
        # Every step loads (and decompresses) every layer's weights once: the prefill's share is 1/steps.
        # The cache is decompressed only when decode steps read it.
        decode_decompress_s = self.seconds["weights"] * (steps - 1) / steps + self.seconds["cache"]
        prefill_s = self.first_choice_s - start
        decode_s = end - self.first_choice_s
        timing = {
            "seconds": end - start,
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "decompress_weights_s": self.seconds["weights"],
            "decompress_cache_s": self.seconds["cache"],
            "decompress_calls": dict(self.calls),
            "decode_decompress_s": decode_decompress_s,
            "decompress_share_of_decode": decode_decompress_s / decode_s if decode_s > 0 else 0.0,
        }
        return results, timing


# ---------------------------------------------------------------------------------------------------
# 1. Perplexity


def perplexity(logprobs: list[list[float]]) -> float:
    flat = [lp for row in logprobs for lp in row]
    return math.exp(-sum(flat) / len(flat))


def transformers_logprobs(model, windows: list[list[int]]) -> list[list[float]]:
    """Teacher-forced logprobs of each window's tokens PROMPT_LEN.. (one forward per batch of windows)."""
    ids = torch.tensor(windows)  # (W, T)
    rows = []
    with torch.no_grad():
        for start in range(0, len(windows), 8):
            chunk = ids[start:start + 8]
            logits = model(input_ids=chunk).logits.float()  # (b, T, V)
            logprobs = torch.log_softmax(logits[:, PROMPT_LEN - 1:-1], dim=-1)  # predicts tokens PROMPT_LEN..T-1
            rows += logprobs.gather(2, chunk[:, PROMPT_LEN:, None])[:, :, 0].tolist()
    return rows


def fake_quantised(model, select) -> dict[str, torch.Tensor]:
    """Replace the weights named by `select(name)` with decompress(compress(w)) in place; returns originals."""
    originals = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and select(name):
                originals[name] = param.detach().clone()
                param.copy_(decompress(compress(param.detach(), WEIGHT_COMPRESSION)))
    return originals


def restore(model, originals: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in originals.items():
            params[name].copy_(value)


def perplexity_rows(path: Path, windows: list[list[int]], clock: DecodeClock, batch: int) -> tuple[list, dict]:
    from transformers import AutoModelForCausalLM

    prompts = [w[:PROMPT_LEN] for w in windows]
    continuations = [w[PROMPT_LEN:] for w in windows]
    new_tokens = WINDOW_LEN - PROMPT_LEN
    base = dict(gpu_batch_size=batch, num_gpu_batches=max(len(windows) // batch, 1))
    cases = [
        ("fp32", Policy(**base)),
        ("4-bit weights", Policy(**base, compress_weight=True)),
        ("4-bit KV cache", Policy(**base, compress_cache=True)),
        ("4-bit weights + KV cache", Policy(**base, compress_weight=True, compress_cache=True)),
    ]
    rows, engine_logprobs = [], {}
    for name, policy in tqdm(cases, desc="perplexity (engine)"):
        with tempfile.TemporaryDirectory() as offload:
            with Engine.from_pretrained(path, policy=policy, offload_dir=offload, device="cpu") as engine:
                results, timing = clock.timed_generate(engine, prompts, new_tokens, forced_tokens=continuations)
        assert all(r.completions[0].token_ids == c for r, c in zip(results, continuations)), "forced tokens not fed"
        engine_logprobs[name] = [r.completions[0].logprobs for r in results]
        rows.append({"system": f"engine, {name}", "perplexity": perplexity(engine_logprobs[name]),
                     "seconds": timing["seconds"], "decompress_share": timing["decompress_share_of_decode"],
                     **{k: timing[k] for k in ("decode_s", "decompress_weights_s", "decompress_cache_s")}})
    fp32 = rows[0]["perplexity"]
    for row in rows:
        row["relative_change"] = row["perplexity"] / fp32 - 1
        row["within_goal"] = abs(row["relative_change"]) <= GOAL_RELATIVE

    # transformers: the fp32 check, and fake-quantised weights by kind (where the weight loss comes from).
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with Timer() as t:
        reference = transformers_logprobs(model, windows)
    max_diff = max(abs(a - b) for ref, eng in zip(reference, engine_logprobs["fp32"]) for a, b in zip(ref, eng))
    rows.append({"system": "transformers, fp32 (teacher-forced)", "perplexity": perplexity(reference),
                 "relative_change": perplexity(reference) / fp32 - 1, "seconds": t.seconds})
    checks = {"max_abs_logprob_diff_engine_vs_transformers_fp32": max_diff}
    ablations = [
        ("all 2-D weights (= engine's 4-bit weights)", lambda n: True),
        ("token embedding / tied lm_head only", lambda n: "embed_tokens" in n),
        ("position embedding only", lambda n: "embed_positions" in n),
        ("attention q/k/v/out only", lambda n: "self_attn." in n),
        ("MLP fc1/fc2 only", lambda n: ".fc1." in n or ".fc2." in n),
    ]
    for name, select in tqdm(ablations, desc="fake-quantised (transformers)"):
        originals = fake_quantised(model, select)
        with Timer() as t:
            value = perplexity(transformers_logprobs(model, windows))
        restore(model, originals)
        rows.append({"system": f"transformers, 4-bit {name}", "perplexity": value,
                     "relative_change": value / fp32 - 1, "seconds": t.seconds})
    return rows, checks


# ---------------------------------------------------------------------------------------------------
# 2 and 3. Throughput with weights on disk, and the decompression share


def throughput_rows(clock: DecodeClock, num_prompts: int, batch: int, repeats: int) -> list[dict]:
    path = build_checkpoint("opt-100m")
    prompts = sample_prompts(path, num_prompts, THROUGHPUT_PROMPT_LEN, THROUGHPUT_PROMPT_LEN, seed=0)
    disk = dict(w_gpu_percent=0, w_cpu_percent=0, gpu_batch_size=batch, num_gpu_batches=max(num_prompts // batch, 1))
    cases = [
        ("weights on disk", Policy(**disk)),
        ("weights on disk, 4-bit weights", Policy(**disk, compress_weight=True)),
        ("weights on disk, 4-bit weights + cache", Policy(**disk, compress_weight=True, compress_cache=True)),
        ("weights on disk, 4-bit weights + cache, no overlap",
         Policy(**disk, compress_weight=True, compress_cache=True, overlap=False)),
    ]
    rows = []
    for name, policy in tqdm(cases, desc="throughput (opt-100m)"):
        with tempfile.TemporaryDirectory() as offload:
            with Engine.from_pretrained(path, policy=policy, offload_dir=offload, device="cpu") as engine:
                engine.generate(prompts[:1], max_new_tokens=2)  # warm-up
                runs = [clock.timed_generate(engine, prompts, THROUGHPUT_GEN_LEN)[1] for _ in range(repeats)]
                disk_bytes = engine.weights.allocated()["weights"]["disk"]
        timing = min(runs, key=lambda run: run["seconds"])  # the run least disturbed by other jobs
        rows.append({"system": name, "overlap": policy.overlap, "weights_on_disk_mib": disk_bytes / 2**20,
                     "tokens_per_s": num_prompts * THROUGHPUT_GEN_LEN / timing["seconds"], **timing,
                     "runs_tokens_per_s": [num_prompts * THROUGHPUT_GEN_LEN / run["seconds"] for run in runs]})
    return rows


def decompress_breakdown() -> list[dict]:
    """Milliseconds of one `decompress` and of its steps, for tensors the throughput runs decompress."""

    def median_ms(fn, reps: int = 25) -> float:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[reps // 2] * 1e3

    cases = [("opt-100m fc1 weight", (3072, 768), WEIGHT_COMPRESSION),
             ("opt-100m lm_head", (8192, 768), WEIGHT_COMPRESSION),
             ("opt-100m KV cache, one layer, 528 rows", (528, 2, 8, 12, 64), CACHE_COMPRESSION)]
    rows = []
    torch.manual_seed(0)
    for name, shape, config in cases:
        x = torch.randn(shape)
        compressed = compress(x, config)
        out = torch.empty_like(x)
        # The steps of decompress for these layouts (no padding, float32): unpack the low and the high
        # nibbles into alternate floats, then scale and shift by each group's scale and min.
        group_dim = config.group_dim % x.dim()
        outer, inner = math.prod(shape[:group_dim]), math.prod(shape[group_dim + 1:])
        groups = shape[group_dim] // config.group_size
        data = compressed.data.reshape(outer, groups, -1)  # (O, N, bytes)
        pairs = out.view(outer, groups, -1, 2)  # (O, N, bytes, 2)
        values = out.view(outer, groups, config.group_size, inner)  # (O, N, gs, I)
        scale = compressed.scale.reshape(outer, groups, 1, inner).float()
        minimum = compressed.min.reshape(outer, groups, 1, inner).float()
        rows.append({
            "tensor": name, "elements": x.numel(),
            "decompress_ms": median_ms(lambda: decompress(compressed, out=out)),
            "unpack_nibbles_ms": median_ms(lambda: (pairs[..., 0].copy_(data & 0x0F), pairs[..., 1].copy_(data >> 4))),
            "scale_and_min_ms": median_ms(lambda: values.mul_(scale).add_(minimum) if inner == 1
                                          else torch.addcmul(minimum, values, scale, out=values)),
            "memcpy_of_output_ms": median_ms(lambda: out.copy_(x)),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=32, help="held-out windows of 256 tokens")
    parser.add_argument("--batch", type=int, default=8, help="engine gpu_batch_size")
    parser.add_argument("--num-prompts", type=int, default=8, help="prompts of the throughput runs")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on this shared 2-core machine two threads made "
                             "every op wait for a descheduled thread, 5-10x slower)")
    parser.add_argument("--repeats", type=int, default=2, help="throughput runs per policy; the fastest is reported")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--name", default="compression-cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started_s = time.perf_counter()

    with Timer() as train_t:
        model_path = trained_model(Recipe())
    from transformers import AutoTokenizer

    windows = heldout_windows(AutoTokenizer.from_pretrained(model_path), args.windows, WINDOW_LEN)
    clock = DecodeClock()
    with clock.installed():
        with Timer() as ppl_t:
            ppl_rows, checks = perplexity_rows(model_path, windows, clock, args.batch)
        with Timer() as tp_t:
            tp_rows = [] if args.skip_throughput else throughput_rows(clock, args.num_prompts, args.batch, args.repeats)
    breakdown = decompress_breakdown()

    training = json.loads((model_path / "training.json").read_text())
    ppl_columns = ["system", "perplexity", "relative_change", "within_goal", "seconds", "decompress_share"]
    tp_columns = ["system", "overlap", "weights_on_disk_mib", "seconds", "prefill_s", "decode_s", "tokens_per_s",
                  "decompress_weights_s", "decompress_cache_s", "decompress_share_of_decode"]
    recipe = training["recipe"]
    notes = [
        f"Model: OPT trained by `benchmarks/train_small_opt.py` ({recipe['layers']} layers, hidden {recipe['hidden']}, "
        f"{recipe['heads']} heads of head_dim {recipe['hidden'] // recipe['heads']}, ffn {recipe['ffn']}, vocabulary "
        f"{recipe['vocab']}, {training['num_params'] / 1e6:.1f}M parameters; {recipe['steps']} AdamW steps of "
        f"{recipe['batch_size']}x{recipe['seq_len']} tokens = {training['tokens_seen']} tokens of standard-library "
        f"source, {training['train_s']:.0f} s; held-out loss {training['heldout_loss_16_windows']:.2f} nats). "
        f"Cached as `{model_path.name}`.",
        f"Perplexity: {len(windows)} held-out windows of {WINDOW_LEN} tokens (files never trained on), prompt "
        f"{PROMPT_LEN} tokens, the other {WINDOW_LEN - PROMPT_LEN} fed through the decode path "
        f"(`generate(forced_tokens=...)`) and scored: {len(windows) * (WINDOW_LEN - PROMPT_LEN)} tokens. Engine "
        f"policy: everything on the compute device (CPU), gpu_batch_size {args.batch}. Compression: 4 bits, group 64, "
        "asymmetric min-max; weights grouped along the output channel, the cache along head_dim. "
        f"Goal: |relative change| <= {GOAL_RELATIVE:.0%}. `decompress_share` = seconds in decompress during decode "
        "steps / decode wall time. Largest |engine fp32 - transformers fp32| per-token logprob: "
        f"{checks['max_abs_logprob_diff_engine_vs_transformers_fp32']:.2e}. The `transformers, 4-bit ...` rows "
        "fake-quantise one kind of weight (compress then decompress in place) and score teacher-forced.",
        "",
        "## Throughput, weights on disk (`opt-100m` preset)",
        "",
        markdown_table(tp_rows, tp_columns) if tp_rows else "(skipped)",
        "",
        f"`opt-100m` preset (random weights, ~93M parameters, float32), {args.num_prompts} prompts of "
        f"{THROUGHPUT_PROMPT_LEN} tokens, {THROUGHPUT_GEN_LEN} new tokens, greedy, gpu_batch_size {args.batch}, "
        f"percent 0 0 100 0 100 0; each policy loaded once, warmed up, then run {args.repeats} times in this "
        "invocation, the fastest run reported (`runs_tokens_per_s` in the JSON has all). tokens_per_s = prompts x "
        "new tokens / (prefill + decode). decompress_*_s: seconds inside decompress summed over threads; "
        "decompress_share_of_decode = the decode steps' part of those (weights: 31 of 32 loads; cache: all) / "
        "decode wall time. With overlap the weight decompression runs on the I/O thread beside the compute; "
        "the no-overlap row makes it serial, so its share is exact. Disk reads go through the OS page cache. "
        "The machine's 2 cores were shared with other jobs: compare rows of this run only. "
        f"torch threads: {args.threads} (the engine's I/O thread runs beside the main thread).",
        "",
        "## Where decompression time goes (one call, median of 25)",
        "",
        markdown_table(breakdown, list(breakdown[0])),
        "",
        "Decompression writes the dense float32 tensor, 4 bytes per element, from 0.56: it costs a few times a "
        "memcpy of its own output, most of it spent unpacking nibbles into every other float. A dense weight read "
        "from the page cache costs about one such memcpy, so on a CPU host whose 'disk' is the page cache, "
        "4-bit weights save bytes on disk and in RAM but not time.",
        "",
        f"Script wall time: training (or reuse) {train_t.seconds:.0f} s, perplexity {ppl_t.seconds:.0f} s, "
        f"throughput {tp_t.seconds:.0f} s, total {time.perf_counter() - started_s:.0f} s.",
    ]
    out = write_results(args.name, "4-bit compression: perplexity, throughput, decompression share", ppl_rows,
                        ppl_columns, "\n".join(notes),
                        extra={"throughput_rows": tp_rows, "decompress_breakdown": breakdown, "checks": checks,
                               "training": training})
    print(out.read_text())


if __name__ == "__main__":
    main()
