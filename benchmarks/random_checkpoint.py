"""Random-weight OPT checkpoints of any size, written to disk one shard at a time.

For benchmarks of models too large to download or to hold in RAM (the gpu-30b suite: OPT-30B's shape, ~60 GB
in float16). The model is instantiated on the meta device to learn transformers' parameter names and shapes;
then each decoder layer's tensors are drawn from a seeded generator (on the GPU when there is one: fast) and
written as their own safetensors shard, so at most one layer is in memory. A shard index makes the folder a
sharded Hugging Face checkpoint that `Engine.from_pretrained`, transformers and Accelerate all read.

Values: normal(0, 0.02) matrices (transformers' OPT init), zero biases, unit LayerNorm weights. The row of the
EOS token in the (tied) embedding is zero, so its logit is 0 while the maximum over 50k random logits is
positive: greedy decoding never ends early and every system generates the full length.

Interrupted builds resume: finished shards are kept, and the index, written last, marks the folder complete.

    python benchmarks/random_checkpoint.py /data/opt-30b-random --shape opt-30b
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

import torch

# Shapes of OPT models (transformers' OPTConfig fields), from the facebook/opt-* config.json files; `opt-tiny`
# is no real model: OPT's layout at a size that runs a whole benchmark suite on a CPU in seconds (CI).
OPT_SHAPES = {
    "opt-30b": dict(num_hidden_layers=48, hidden_size=7168, num_attention_heads=56, ffn_dim=28672),
    "opt-13b": dict(num_hidden_layers=40, hidden_size=5120, num_attention_heads=40, ffn_dim=20480),
    "opt-6.7b": dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, ffn_dim=16384),
    "opt-1.3b": dict(num_hidden_layers=24, hidden_size=2048, num_attention_heads=32, ffn_dim=8192),
    "opt-tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, ffn_dim=256),
}
OPT_COMMON = dict(vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=None, do_layer_norm_before=True,
                  activation_function="relu", enable_bias=True, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                  tie_word_embeddings=True, dropout=0.0, attention_dropout=0.0)
INDEX = "model.safetensors.index.json"
_LAYER = re.compile(r"^model\.decoder\.layers\.(\d+)\.")


def opt_config(shape: str | dict, **overrides):
    from transformers import OPTConfig

    fields = OPT_SHAPES[shape] if isinstance(shape, str) else dict(shape)
    kwargs = OPT_COMMON | fields | overrides
    if kwargs.get("word_embed_proj_dim") is None:
        kwargs["word_embed_proj_dim"] = kwargs["hidden_size"]
    return OPTConfig(**kwargs)


def _parameters(config) -> list[tuple[str, tuple[int, ...]]]:
    """transformers' parameter names and shapes for `config`, from a model on the meta device (no memory)."""
    from transformers import OPTForCausalLM

    with torch.device("meta"):
        model = OPTForCausalLM(config)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]  # the tied lm_head appears once


def checkpoint_bytes(config, dtype: torch.dtype) -> int:
    return sum(torch.Size(shape).numel() for _, shape in _parameters(config)) * dtype.itemsize


def _value(name: str, shape, generator: torch.Generator, dtype: torch.dtype, device, eos_token_id: int | None):
    if name.endswith("layer_norm.weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    values = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=generator)
    if name.endswith("embed_tokens.weight") and eos_token_id is not None:
        values[eos_token_id] = 0  # logit 0: never the greedy choice, so generation runs its full length
    return values


def build_random_opt(folder: str | os.PathLike, config, dtype: str = "float16", seed: int = 0,
                     device: str | None = None, progress: bool = True) -> Path:
    """Write a sharded random-weight OPT checkpoint of `config` into `folder` (kept if already complete)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    folder = Path(folder).expanduser()
    if (folder / INDEX).is_file():
        return folder
    torch_dtype = getattr(torch, dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    params = _parameters(config)
    total = sum(torch.Size(shape).numel() for _, shape in params) * torch_dtype.itemsize
    folder.mkdir(parents=True, exist_ok=True)
    done = sum(f.stat().st_size for f in folder.glob("model-*.safetensors"))
    free = shutil.disk_usage(folder).free
    if free + done < total * 1.02:
        raise OSError(f"building a {total / 2**30:.1f} GiB checkpoint in {folder} needs "
                      f"{(total - done) / 2**30:.1f} GiB more disk, only {free / 2**30:.1f} GiB free")
    shards: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
    for name, shape in params:  # shard 0: embeddings and final norm; shard i + 1: decoder layer i
        match = _LAYER.match(name)
        shards.setdefault(int(match.group(1)) + 1 if match else 0, []).append((name, shape))
    count = len(shards)
    weight_map = {}
    config.save_pretrained(folder)
    for shard_idx in tqdm(sorted(shards), desc=f"random checkpoint {folder.name}", unit="shard", disable=not progress):
        file_name = f"model-{shard_idx + 1:05d}-of-{count:05d}.safetensors"
        for name, _ in shards[shard_idx]:
            weight_map[name] = file_name
        if (folder / file_name).is_file():
            continue  # written by an earlier, interrupted build
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + shard_idx)
        tensors = {name: _value(name, shape, generator, torch_dtype, device, config.eos_token_id).cpu()
                   for name, shape in shards[shard_idx]}
        partial = folder / (file_name + ".partial")
        save_file(tensors, str(partial), metadata={"format": "pt"})
        os.replace(partial, folder / file_name)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--shape", choices=sorted(OPT_SHAPES), default="opt-30b")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = opt_config(args.shape)
    size = checkpoint_bytes(config, getattr(torch, args.dtype))
    print(f"{args.shape}: {size / 2**30:.1f} GiB in {args.dtype}")
    print(build_random_opt(args.folder, config, args.dtype, args.seed))


if __name__ == "__main__":
    main()
