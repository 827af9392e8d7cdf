"""Train a small OPT on the Python standard library's sources, for the compression benchmark.

Random weights say nothing about how 4-bit quantisation moves perplexity, so bench_compression.py
needs a model that has learned something. This script trains one in a few minutes on a CPU:
a transformers `OPTForCausalLM` (4 layers, hidden 256, 4 heads of head_dim 64 -- the KV cache is
grouped along head_dim in groups of 64, so each group is exactly one head's key or value) with the
project's 8192-token BPE tokenizer (`flexgen_core.testing.build_tokenizer`), on the standard library's
non-test `.py` files. Files are split into train and held-out sets by a hash of their path, so the
split does not depend on the file listing's order; held-out text is never trained on. (The tokenizer
was fitted on the first 3 MB of the top-level modules, which includes some held-out files: that only
shapes the vocabulary, not the model.)

Deterministic: a fixed seed and a fixed number of steps (not a time budget). The result is saved
with `save_pretrained` (safetensors) next to the tokenizer in
`~/.cache/flexgen-helm/trained/opt-small-<digest of the recipe>` and reused when present.

    python benchmarks/train_small_opt.py            # train (or reuse) and print the folder
    python benchmarks/train_small_opt.py --force    # retrain
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from flexgen_core.testing import (  # noqa: E402
    BOS_TOKEN_ID,
    TOKENIZER_FILES,
    Preset,
    build_tokenizer,
)

RECIPE_VERSION = 1  # bump when anything below changes what gets trained
HELDOUT_BUCKETS = 10  # a file is held out when hash(path) % HELDOUT_BUCKETS == 0: ~10% of files
SKIPPED_DIRS = ("test", "tests", "idle_test", "site-packages")


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights; its digest names the cache folder."""

    layers: int = 4
    hidden: int = 256
    heads: int = 4  # head_dim 64 = the KV cache's group size
    ffn: int = 1024
    vocab: int = 8192
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 300
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    # One intra-op thread: on this 2-core machine shared with other jobs, two threads ran a step 5-10x
    # slower (each parallel op waits at a barrier for a thread that another process has descheduled).
    threads: int = 1
    autocast_bf16: bool = True  # bf16 matmuls (avx512_bf16) ~1.5x faster here; master weights stay fp32
    version: int = RECIPE_VERSION

    @property
    def preset(self) -> Preset:
        return Preset("opt-small-trained", layers=self.layers, hidden=self.hidden, heads=self.heads, ffn=self.ffn,
                      vocab=self.vocab, tokenizer_vocab=self.vocab, max_positions=self.seq_len)

    def digest(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


def cache_root() -> Path:
    configured = os.environ.get("FLEXGEN_TRAINED_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "flexgen-helm" / "trained"


# ---------------------------------------------------------------------------------------------------
# Data


def source_files() -> tuple[list[Path], list[Path]]:
    """(train, held-out) standard-library sources, each sorted; the split is by a hash of the relative path."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train, heldout = [], []
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib).as_posix()
        if any(part in SKIPPED_DIRS for part in path.relative_to(stdlib).parts[:-1]):
            continue
        bucket = int(hashlib.sha256(relative.encode()).hexdigest()[:8], 16) % HELDOUT_BUCKETS
        (heldout if bucket == 0 else train).append(path)
    if not train or not heldout:
        raise FileNotFoundError(f"No standard-library sources to split under {stdlib}")
    return train, heldout


def encode_files(tokenizer, paths: list[Path]) -> list[int]:
    """One token stream: each file's tokens preceded by </s> (OPT's document separator and BOS)."""
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in paths]
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    stream: list[int] = []
    for ids in encoded:
        stream.append(BOS_TOKEN_ID)
        stream.extend(ids)
    return stream


def heldout_windows(tokenizer, num_windows: int, window_len: int) -> list[list[int]]:
    """`num_windows` windows of `window_len` tokens from held-out files, evenly spaced over all candidates.

    Candidates are the non-overlapping chunks inside one file, so no window holds </s>: the engine
    would stop a scored continuation at that EOS.
    """
    paths = source_files()[1]
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in paths]
    candidates = []
    for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        for start in range(0, len(ids) - window_len + 1, window_len):
            window = ids[start:start + window_len]
            if BOS_TOKEN_ID not in window:
                candidates.append(window)
    if len(candidates) < num_windows:
        raise ValueError(f"held-out files give only {len(candidates)} windows of {window_len} tokens, "
                         f"{num_windows} requested")
    stride = len(candidates) // num_windows
    return [candidates[i * stride] for i in range(num_windows)]


# ---------------------------------------------------------------------------------------------------
# Training


def _lr_at(step: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(recipe.steps - recipe.warmup_steps, 1)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(recipe: Recipe, folder: Path) -> dict:
    """Train from scratch and save model + tokenizer into `folder`; returns a summary."""
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    tokenizer_dir = build_tokenizer(vocab_size=recipe.vocab)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    started_s = time.perf_counter()
    train_files, heldout_files = source_files()
    data = torch.tensor(encode_files(tokenizer, train_files), dtype=torch.long)
    eval_windows = torch.tensor(heldout_windows(tokenizer, 16, recipe.seq_len), dtype=torch.long)
    tokenize_s = time.perf_counter() - started_s

    model = OPTForCausalLM(OPTConfig(**recipe.preset.opt_config_kwargs()))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(recipe.seed)
    num_starts = len(data) - recipe.seq_len

    def heldout_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = model(input_ids=eval_windows, labels=eval_windows).loss.item()
        model.train()
        return loss

    model.train()
    losses: list[float] = []
    train_started_s = time.perf_counter()
    progress = tqdm(range(recipe.steps), desc="training", unit="step")
    for step in progress:
        starts = torch.randint(num_starts, (recipe.batch_size,), generator=generator)
        batch = torch.stack([data[s:s + recipe.seq_len] for s in starts.tolist()])  # (B, T)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, recipe)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.autocast_bf16):
            loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        recent = sum(losses[-20:]) / len(losses[-20:])
        progress.set_postfix(loss=f"{recent:.3f}", lr=f"{_lr_at(step, recipe):.1e}")
        if (step + 1) % 100 == 0 or step + 1 == recipe.steps:
            progress.write(f"step {step + 1}: train loss (last 20) {recent:.3f}, held-out loss {heldout_loss():.3f}")
    train_s = time.perf_counter() - train_started_s

    model.eval()
    model.save_pretrained(folder)  # safetensors
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, folder / name)
    tokenizer_config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    tokenizer_config["model_max_length"] = recipe.seq_len
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    summary = {
        "recipe": dataclasses.asdict(recipe),
        "num_params": sum(p.numel() for p in model.parameters()),
        "train_files": len(train_files),
        "heldout_files": len(heldout_files),
        "train_tokens_available": len(data),
        "tokens_seen": recipe.steps * recipe.batch_size * recipe.seq_len,
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        "heldout_loss_16_windows": heldout_loss(),
        "tokenize_s": round(tokenize_s, 1),
        "train_s": round(train_s, 1),
    }
    (folder / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def trained_model(recipe: Recipe = Recipe(), force: bool = False) -> Path:
    """The folder of the model trained by `recipe`, training it first unless cached."""
    target = cache_root() / f"opt-small-{recipe.digest()}"
    if target.is_dir() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        summary = train(recipe, temp)
        print(json.dumps({k: v for k, v in summary.items() if k != "recipe"}, indent=2))
        if target.is_dir():
            shutil.rmtree(target)
        os.rename(temp, target)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="retrain even if the cached model exists")
    parser.add_argument("--steps", type=int, default=Recipe.steps, help="training steps (changes the cache key)")
    args = parser.parse_args()
    started_s = time.perf_counter()
    folder = trained_model(Recipe(steps=args.steps), force=args.force)
    print(f"{folder} ({time.perf_counter() - started_s:.0f} s)")


if __name__ == "__main__":
    main()
