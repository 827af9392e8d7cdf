"""Reading Hugging Face checkpoints one tensor at a time (never the whole model in RAM).

A checkpoint is a folder with `config.json` and weights as safetensors (one file or shards with an
index) or, failing that, PyTorch `.bin` files read with `torch.load(weights_only=True, mmap=True)`.
Hub names resolve through `huggingface_hub` (online, or from its cache when offline).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path, PurePosixPath
from typing import Iterator

import torch

log = logging.getLogger(__name__)

_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model"]


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local folder for a local path or a hub model name."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ValueError(f"checkpoint folder {name!r} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=_WEIGHT_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated model: all end the same way for the user
        raise ValueError(
            f"cannot find model {name!r}: not a local folder, and the hub lookup failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"Pass a local checkpoint folder, or download it first with `hf download {name}`."
        ) from None


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"checkpoint folder {str(folder)!r} has no config.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object of config fields, got a {type(config).__name__}")
    return config


def _shard_names(index: Path) -> list[str]:
    """The shard files an index names, each a path inside the checkpoint folder (no absolute path, no
    `..`: an index must not make the loader read files elsewhere). Symlinks inside the folder are
    followed as usual: the hub's cache links each snapshot's files to its blobs."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index} is not a checkpoint index (a JSON object with a weight_map of tensor "
                         f"names to shard files): {type(e).__name__}: {e}") from None
    for shard in shards:
        if not isinstance(shard, str) or not shard or PurePosixPath(shard).is_absolute() or \
                ".." in PurePosixPath(shard).parts or "\\" in shard:
            raise ValueError(f"{index} names shard file {shard!r}, which is not a file inside the checkpoint "
                             f"folder")
    return shards


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files, safetensors preferred."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            shards = _shard_names(index)
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise ValueError(f"checkpoint {str(folder)!r} is missing shard file(s) {missing} named in {index_name}")
            return [folder / s for s in shards]
        if (folder / single).is_file():
            return [folder / single]
    found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not found:
        raise ValueError(f"checkpoint folder {str(folder)!r} has no weights (*.safetensors or *.bin)")
    return found


def iter_tensors(files: list[Path], wanted: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for each wanted name, one tensor in memory at a time."""
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                handle = safe_open(str(path), framework="pt")
                names = list(handle.keys())
            except Exception as e:
                raise ValueError(f"cannot read safetensors file {str(path)!r} (truncated or corrupt?): {e}") from None
            for name in names:
                if name in wanted:
                    try:
                        yield name, handle.get_tensor(name)
                    except Exception as e:
                        raise ValueError(f"cannot read tensor {name!r} from {str(path)!r}: {e}") from None
        else:
            try:
                # mmap keeps the file's pages out of anonymous memory; weights_only never runs pickled code.
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise ValueError(f"cannot read PyTorch weights file {str(path)!r}: {e}") from None
            for name in list(state):
                tensor = state.pop(name)
                if name in wanted:
                    yield name, tensor
            del state


def checkpoint_keys(files: list[Path]) -> set[str]:
    keys: set[str] = set()
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                keys.update(safe_open(str(path), framework="pt").keys())
            except Exception as e:
                raise ValueError(f"cannot read safetensors file {str(path)!r} (truncated or corrupt?): {e}") from None
        else:
            try:
                keys.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True).keys())
            except Exception as e:
                raise ValueError(f"cannot read PyTorch weights file {str(path)!r}: {e}") from None
    return keys
