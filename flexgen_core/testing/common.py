"""What the synthetic-checkpoint factories (`testing.opt`, `testing.llama`) share: the on-disk cache,
the tokenizer training corpus, the weight scales and per-tensor generators, and file writing.

The public API is `flexgen_core.testing` (`build_checkpoint`, `sample_prompts`, `PRESETS`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from flexgen_core.memory import DTYPE_BYTES

if TYPE_CHECKING:  # torch is imported lazily: importing this module stays cheap.
    import torch

logger = logging.getLogger(__name__)

# Bump when anything that changes the files produced changes (weights, shapes, tokenizer layout).
FACTORY_VERSION = 1

DTYPES = tuple(DTYPE_BYTES)
DEFAULT_MODEL_MAX_LENGTH = 2048  # OPT's context length; a checkpoint's tokenizer uses its preset's

# Tokenizer corpus: the first files of the sorted standard-library listing, up to this many bytes.
CORPUS_MAX_BYTES = 3_000_000


def default_cache_root() -> Path:
    """`$FLEXGEN_TEST_CACHE`, or `~/.cache/flexgen-helm/test-models`."""
    configured = os.environ.get("FLEXGEN_TEST_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "flexgen-helm" / "test-models"



def _corpus_paths() -> list[Path]:
    """Sorted top-level standard-library modules, capped at `CORPUS_MAX_BYTES` in total."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths: list[Path] = []
    total_bytes = 0
    for path in sorted(stdlib.glob("*.py")):
        if total_bytes >= CORPUS_MAX_BYTES:
            break
        paths.append(path)
        total_bytes += path.stat().st_size
    if not paths:
        raise FileNotFoundError(f"No standard-library sources found under {stdlib} to train a tokenizer on")
    return paths


@functools.lru_cache(maxsize=1)
def corpus_texts() -> tuple[str, ...]:
    return tuple(path.read_text(encoding="utf-8", errors="replace") for path in _corpus_paths())


@functools.lru_cache(maxsize=1)
def corpus_digest() -> str:
    """Short digest of the training text: another Python's stdlib gives another tokenizer (and cache key)."""
    digest = hashlib.sha256()
    for text in corpus_texts():
        digest.update(text.encode("utf-8"))
    return digest.hexdigest()[:10]


def write_json(path: Path, content: dict) -> None:
    """A tokenizer or config file as Hugging Face writes them: indented, with a final newline."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2)
        handle.write("\n")


@dataclass(frozen=True)
class InitScales:
    """Scales of the synthetic weights, chosen so greedy decoding is decisive (see `_scaled_weight`)."""

    logit_std: float = 6.0  # std of a logit across the vocabulary; sets the top-1/top-2 gaps
    token_norm: float = 0.25  # norm of a token embedding row: small beside the blocks' outputs
    position_std: float = 0.5  # relative to a token's per-component std in the hidden stream
    special_row_scale: float = 0.1  # rows for special tokens and ids past the tokenizer's vocabulary
    qk_gain: float = 2.5  # attention scores of std ~qk_gain**2: peaked, so that context matters
    attn_out_gain: float = 1.0  # std of a block's attention output, per component
    mlp_out_gain: float = 1.0  # std of a block's MLP output, per component
    bias_std: float = 0.1
    norm_weight_std: float = 0.1  # LayerNorm weight = 1 + noise
    norm_bias_std: float = 0.1
    anti_repeat: float = 1.5  # pre-LN only: layer 0's attention pushes down tokens already in context


def param_generator(seed: int, name: str) -> "torch.Generator":
    """A generator per tensor, seeded from (seed, name): a tensor's values do not depend on module order."""
    import torch

    digest = hashlib.sha256(f"{seed}:{name}".encode("utf-8")).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def fill_seeded(model: "torch.nn.Module", seed: int,
                value: Callable[[str, "torch.Tensor"], "torch.Tensor"]) -> None:
    """Overwrite every parameter of a float32 model with `value(name, noise)`, where `noise` is standard
    normal from `param_generator(seed, name)`. A tied head appears once, as the token embedding."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=param_generator(seed, name), dtype=torch.float32)
            param.copy_(value(name, noise))


def save_model(model: "torch.nn.Module", folder: Path, dtype: str, sharded: bool, tokenizer_dir: Path,
               tokenizer_files: tuple[str, ...]) -> None:
    """`save_pretrained` in `dtype` (recorded in config.json), in about four shards if `sharded`, next to
    copies of the tokenizer's files."""
    import torch

    model.to(getattr(torch, dtype))
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size=max(total_bytes // 4, 1) if sharded else "50GB")
    if sharded and not (folder / "model.safetensors.index.json").exists():
        files = sorted(p.name for p in folder.iterdir())
        raise AssertionError(f"save_pretrained wrote no shard index in {folder}: {files}")
    for file_name in tokenizer_files:
        shutil.copyfile(tokenizer_dir / file_name, folder / file_name)


def build_cached(target: Path, build: Callable[[Path], None]) -> Path:
    """Return `target`, building it first with `build(temp_folder)` unless it exists.

    The folder appears atomically (`os.rename` of a finished sibling temp folder); a process that loses
    a race discards its own build and uses the winner's.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    temp_folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        started_s = time.perf_counter()
        build(temp_folder)
        # mkdtemp makes the folder private; the cache is meant to be shared like any other cache.
        os.chmod(temp_folder, 0o755)
        for file_path in temp_folder.iterdir():
            os.chmod(file_path, 0o644)
        try:
            os.rename(temp_folder, target)
        except OSError:
            if not target.is_dir():
                raise
            logger.debug("Another process built %s first; using its copy", target)
        else:
            logger.info("Built %s in %.1f s", target, time.perf_counter() - started_s)
    finally:
        if temp_folder.exists():
            shutil.rmtree(temp_folder, ignore_errors=True)
    return target


