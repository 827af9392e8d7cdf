"""Small, deterministic, offline OPT and Llama-style checkpoints for tests, benchmarks and the demo.

The public API: `PRESETS` (shapes by name), `build_checkpoint` (a random-weight checkpoint with its
tokenizer, saved with `save_pretrained` so `from_pretrained(path)` works offline for model and
tokenizer), `build_tokenizer`, `sample_prompts` and `greedy_stats`. The families live in their own
modules: `testing.opt` (OPT presets, an OPT-layout byte-level BPE tokenizer, weights) and
`testing.llama` (Llama 2/3, Mistral, Qwen2 presets, a Llama-2-like tokenizer, weights); what they
share (cache, corpus, weight scales) is in `testing.common`. No network is touched: tokenizers are
trained on a fixed, sorted list of Python standard-library source files.

Why the weights are not HF's default init: with std 0.02 everywhere, logits come out nearly uniform
and greedy choices are decided by float noise, so parity tests against HF would compare coin flips;
and random pre-LN models with tied embeddings tend to repeat one token forever. Each family's
`_scaled_weight` scales each tensor so that the logits spread over several nats (top-1/top-2 gaps far
above float16 noise), generations vary, every bias and norm parameter is nonzero (an engine that
drops one fails parity), and special tokens are practically never generated (generation runs to
`max_new_tokens`). `greedy_stats` measures this; `python -m flexgen_core.testing` prints it.

Checkpoints are cached under `default_cache_root()` keyed by preset, seed, dtype, sharding, the
factory version and a digest of the tokenizer corpus; each is built in a temporary folder and moved
into place with `os.rename`, so concurrent test processes can race safely.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from flexgen_core.testing import llama, opt
from flexgen_core.testing.common import (
    DEFAULT_MODEL_MAX_LENGTH,
    DTYPES,
    FACTORY_VERSION,
    build_cached,
    corpus_digest,
    corpus_texts,
    default_cache_root,
)
from flexgen_core.testing.llama import LLAMA_PRESETS, LlamaPreset
from flexgen_core.testing.opt import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    OPT_PRESETS,
    PAD_TOKEN_ID,
    SPECIAL_TOKENS,
    TOKENIZER_FILES,
    Preset,
    build_tokenizer,
)

if TYPE_CHECKING:  # torch and transformers are imported lazily: importing this module stays cheap.
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "BOS_TOKEN_ID", "DEFAULT_MODEL_MAX_LENGTH", "DTYPES", "EOS_TOKEN_ID", "FACTORY_VERSION", "PAD_TOKEN_ID",
    "PRESETS", "SPECIAL_TOKENS", "TOKENIZER_FILES", "GreedyStats", "LlamaPreset", "Preset", "build_checkpoint",
    "build_tokenizer", "default_cache_root", "greedy_stats", "preset_table", "sample_prompts",
]

PRESETS: dict[str, Preset | LlamaPreset] = {
    preset.name: preset for preset in (*OPT_PRESETS, *LLAMA_PRESETS)  # tiny, odd, proj, opt-100m, large, llama, ...
}


def _checkpoint_key(preset: Preset | LlamaPreset, seed: int, sharded: bool, dtype: str) -> str:
    layout = "sharded" if sharded else "single"
    shape = hashlib.sha256(repr(preset).encode()).hexdigest()[:8]  # an edited preset is built anew
    return f"model-{preset.name}-{shape}-seed{seed}-{dtype}-{layout}-v{FACTORY_VERSION}-{corpus_digest()}"


def build_checkpoint(
    preset: str = "tiny",
    root: str | os.PathLike | None = None,
    seed: int = 0,
    sharded: bool = False,
    dtype: str = "float32",
) -> Path:
    """Build (or reuse) a random-weight checkpoint (OPT or Llama-style) with its tokenizer; returns its folder.

    The folder loads with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`. Same
    arguments, same files: weights come from `seed` alone (not from HF's init or the global RNG).
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {list(DTYPES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    spec = PRESETS[preset]
    cache_root = Path(root) if root is not None else default_cache_root()
    if isinstance(spec, LlamaPreset):
        tokenizer_dir = llama.build_llama_tokenizer(spec.tokenizer_vocab, cache_root)
        save = llama.save_checkpoint
    else:
        tokenizer_dir = build_tokenizer(spec.tokenizer_vocab, root=cache_root)
        save = opt.save_checkpoint
    target = cache_root / _checkpoint_key(spec, seed, bool(sharded), dtype)
    return build_cached(target, lambda folder: save(spec, seed, bool(sharded), dtype, tokenizer_dir, folder))


# ---------------------------------------------------------------------------------------------------
# Prompts


def _load_tokenizer(tokenizer_or_path: "PreTrainedTokenizerBase | str | os.PathLike") -> "PreTrainedTokenizerBase":
    if isinstance(tokenizer_or_path, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.fspath(tokenizer_or_path))
    return tokenizer_or_path


def _corpus_chunks(max_chars: int = 1000):
    """Corpus text in pieces of whole lines, short enough to encode without length warnings."""
    for text in corpus_texts():
        chunk: list[str] = []
        chunk_chars = 0
        for line in text.splitlines(keepends=True):
            if chunk and chunk_chars + len(line) > max_chars:
                yield "".join(chunk)
                chunk, chunk_chars = [], 0
            chunk.append(line)
            chunk_chars += len(line)
        if chunk:
            yield "".join(chunk)


def sample_prompts(
    tokenizer_or_path: "PreTrainedTokenizerBase | str | os.PathLike",
    n: int,
    min_len: int = 4,
    max_len: int = 32,
    seed: int = 0,
) -> list[list[int]]:
    """`n` token-id prompts of ragged lengths in [min_len, max_len], each starting with the tokenizer's BOS
    (`</s>` for OPT, `<s>` for the Llama-style presets).

    The ids after BOS are consecutive tokens of standard-library source text, so the prompts look
    like what the tokenizer produces for real text; no other special token occurs in them.
    Deterministic for a tokenizer and `seed`. `tokenizer_or_path` is a tokenizer, or a folder that
    `AutoTokenizer` loads (a checkpoint from `build_checkpoint`, or `build_tokenizer`'s folder).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if not (isinstance(min_len, int) and isinstance(max_len, int) and 1 <= min_len <= max_len):
        raise ValueError(f"need integers 1 <= min_len <= max_len, got min_len={min_len!r}, max_len={max_len!r}")
    tokenizer = _load_tokenizer(tokenizer_or_path)
    if tokenizer.bos_token_id is None:
        raise ValueError(f"Tokenizer {tokenizer.name_or_path!r} has no BOS token")
    special_ids = set(tokenizer.all_special_ids)
    token_ids: list[int] = []
    wanted_tokens = max(4096, 64 * max_len)  # room for windows at many offsets
    for chunk in _corpus_chunks():
        ids = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        token_ids.extend(token_id for token_id in ids if token_id not in special_ids)
        if len(token_ids) >= wanted_tokens:
            break
    if len(token_ids) < max_len:
        raise ValueError(f"The corpus encodes to only {len(token_ids)} tokens, fewer than max_len={max_len}")
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)  # BOS included
        start = rng.randrange(len(token_ids) - (length - 1) + 1)
        prompts.append([tokenizer.bos_token_id] + token_ids[start : start + length - 1])
    return prompts


# ---------------------------------------------------------------------------------------------------
# Measuring a checkpoint


@dataclass(frozen=True)
class GreedyStats:
    """How decisive and how varied greedy decoding is, measured with Hugging Face's model."""

    steps: int  # greedy steps measured (prompts x max_new_tokens)
    decisive_fraction: float  # share of steps whose top-1 minus top-2 logprob exceeds the threshold
    median_gap: float  # median top-1 minus top-2 logprob, in nats
    min_gap: float
    distinct_fraction: float  # distinct tokens / generated tokens, averaged over prompts
    longest_run: int  # longest run of one token repeated, over all prompts
    all_finite: bool  # no inf/NaN among the logits


def _longest_run(token_ids: Sequence[int]) -> int:
    """Length of the longest run of one token repeated back to back."""
    longest = run = 0
    previous = None
    for token_id in token_ids:
        run = run + 1 if token_id == previous else 1
        longest = max(longest, run)
        previous = token_id
    return longest


def greedy_stats(
    checkpoint: str | os.PathLike,
    n_prompts: int = 4,
    max_new_tokens: int = 16,
    threshold: float = 1e-3,
    dtype: str = "float32",
    seed: int = 0,
) -> GreedyStats:
    """Greedy-decode `n_prompts` sampled prompts with `transformers` and summarise the logprob gaps.

    Runs on the CPU, one prompt at a time (no padding), in `dtype`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {list(DTYPES)}")
    if n_prompts < 1 or max_new_tokens < 1:
        raise ValueError(f"need n_prompts >= 1 and max_new_tokens >= 1, got {n_prompts} and {max_new_tokens}")
    model = AutoModelForCausalLM.from_pretrained(os.fspath(checkpoint), dtype=getattr(torch, dtype)).eval()
    prompts = sample_prompts(checkpoint, n_prompts, min_len=8, max_len=24, seed=seed)
    gaps: list[float] = []
    distinct_fractions: list[float] = []
    longest_run = 0
    all_finite = True
    with torch.no_grad():
        for prompt in prompts:
            token_ids = list(prompt)
            generated: list[int] = []
            for _ in range(max_new_tokens):
                # The whole sequence each step, no KV cache: slower, but the plainest reference.
                logits = model(torch.tensor([token_ids])).logits[0, -1]  # (vocab,)
                all_finite = all_finite and bool(torch.isfinite(logits).all())
                top2 = torch.log_softmax(logits.float(), dim=-1).topk(2).values
                gaps.append(float(top2[0] - top2[1]))
                next_id = int(logits.argmax())
                generated.append(next_id)
                token_ids.append(next_id)
            distinct_fractions.append(len(set(generated)) / len(generated))
            longest_run = max(longest_run, _longest_run(generated))
    sorted_gaps = sorted(gaps)
    return GreedyStats(
        steps=len(gaps),
        decisive_fraction=sum(gap > threshold for gap in gaps) / len(gaps),
        median_gap=sorted_gaps[len(sorted_gaps) // 2],
        min_gap=sorted_gaps[0],
        distinct_fraction=sum(distinct_fractions) / len(distinct_fractions),
        longest_run=longest_run,
        all_finite=all_finite,
    )


def preset_table() -> list[dict]:
    """One row per preset, for docs and reports: shape fields plus the parameter count."""
    return [dict(dataclasses.asdict(spec), num_params=spec.num_params) for spec in PRESETS.values()]


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flexgen_core.testing",
                                     description="Build synthetic checkpoints and print their greedy statistics.")
    parser.add_argument("presets", nargs="*", default=["tiny", "odd", "proj"], choices=sorted(PRESETS))
    parser.add_argument("--root", default=None, help=f"cache folder (default {default_cache_root()})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--sharded", action="store_true")
    parser.add_argument("--no-stats", action="store_true", help="build only")
    parser.add_argument("--path-only", action="store_true", help="build only and print just the folder(s)")
    args = parser.parse_args(argv)
    for name in args.presets:
        started_s = time.perf_counter()
        path = build_checkpoint(name, root=args.root, seed=args.seed, sharded=args.sharded, dtype=args.dtype)
        if args.path_only:
            print(path)
            continue
        build_s = time.perf_counter() - started_s
        weight_mb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
        line = (
            f"{name:9s} params={PRESETS[name].num_params / 1e6:8.2f}M weights={weight_mb:8.1f}MiB"
            f" build_or_reuse={build_s:6.1f}s"
        )
        if not args.no_stats:
            stats = greedy_stats(path, dtype=args.dtype)
            line += (
                f" gap>1e-3={stats.decisive_fraction:.3f} median_gap={stats.median_gap:.3f} min_gap={stats.min_gap:.2e}"
                f" distinct={stats.distinct_fraction:.2f} longest_run={stats.longest_run} finite={stats.all_finite}"
            )
        print(line, "\n   ", path)
