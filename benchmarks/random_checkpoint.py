"""Random-weight checkpoints of any size (OPT, and OLMoE's mixture of experts), written to disk one shard at a time.

For benchmarks of models too large to download or to hold in RAM (the gpu-30b suite: OPT-30B's shape, ~60 GB
in float16; the gpu-moe suite: OLMoE-1B-7B's, 13.8 GB). The model is instantiated on the meta device to learn
transformers' parameter names and shapes, as its `save_pretrained` would write them (a mixture of experts'
fused expert tensors back to one tensor per expert, the hub's layout that the engine and transformers both
read); then each decoder layer's tensors are drawn from a seeded generator (on the GPU when there is one:
fast) and written as their own safetensors shard, so at most one layer is in memory. A shard index makes the
folder a sharded Hugging Face checkpoint that `Engine.from_pretrained`, transformers and Accelerate all read.

Values: normal(0, 0.02) matrices (transformers' init), zero biases, unit norm weights. The EOS token's row of
the output embedding (the input embedding when the two are tied) is zero, so its logit is 0 while the maximum
over 50k random logits is positive: greedy decoding never ends early and every system generates the full
length.

Interrupted builds resume: finished shards are kept, and the index, written last, marks the folder complete.

    python benchmarks/random_checkpoint.py /data/opt-30b-random --shape opt-30b
    python benchmarks/random_checkpoint.py /data/olmoe-random --shape olmoe-1b-7b
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
# Mixtures of experts, as the planner's table of known models has them (flexgen_core/plan/model_shapes.json):
# OLMoE-1B-7B by its hub name there; `olmoe-tiny` is no real model: OLMoE's layout at a size that runs the
# gpu-moe suite on a CPU in seconds (its test).
MOE_SHAPES = {
    "olmoe-1b-7b": "allenai/OLMoE-1B-7B-0125-Instruct",
    "olmoe-tiny": {"family": "olmoe", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 4, "ffn": 32, "vocab": 1024,
                   "max_positions": 2048,
                   "config": {"num_experts": 8, "num_experts_per_tok": 2, "eos_token_id": 2, "pad_token_id": 1}},
}
SHAPES = (*sorted(OPT_SHAPES), *sorted(MOE_SHAPES))
INDEX = "model.safetensors.index.json"
_LAYER = re.compile(r"^model\.(?:decoder\.)?layers\.(\d+)\.")  # OPT's model.decoder.layers.i, OLMoE's model.layers.i


def opt_config(shape: str | dict, **overrides):
    from transformers import OPTConfig

    fields = OPT_SHAPES[shape] if isinstance(shape, str) else dict(shape)
    kwargs = OPT_COMMON | fields | overrides
    if kwargs.get("word_embed_proj_dim") is None:
        kwargs["word_embed_proj_dim"] = kwargs["hidden_size"]
    return OPTConfig(**kwargs)


def model_config(shape: str):
    """transformers' config of a named shape of OPT_SHAPES or MOE_SHAPES."""
    if shape in OPT_SHAPES:
        return opt_config(shape)
    if shape not in MOE_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    from transformers import AutoConfig

    from flexgen_core.plan.shapes import hf_config_from_entry, known_models

    entry = MOE_SHAPES[shape]
    fields = hf_config_from_entry(known_models()[entry] if isinstance(entry, str) else entry)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def is_moe(config) -> bool:
    return bool(getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None))


def describe(config) -> str:
    """The shape in words, for a results file's notes."""
    words = f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads, "
    if is_moe(config):
        experts = getattr(config, "num_experts", None) or config.num_local_experts
        words += (f"{experts} experts per layer of width {config.intermediate_size}, each token routed to "
                  f"{config.num_experts_per_tok}, ")
    else:
        words += f"FFN {getattr(config, 'ffn_dim', None) or config.intermediate_size}, "
    return words + f"vocabulary {config.vocab_size}"


def _parameters(config) -> list[tuple[str, tuple[int, ...]]]:
    """The parameter names and shapes transformers' `save_pretrained` writes for `config`, from a model on the
    meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = dict(model.named_parameters())  # a tied lm_head appears once
    saved = [(name, tuple(p.shape)) for name, p in _as_saved(model, params).items()]
    _check_engine_reads(config, {name for name, _ in saved})
    return saved


def _as_saved(model, params: dict) -> dict:
    """`params` under the names and shapes a checkpoint holds: transformers 5 fuses a mixture of experts'
    weights into one tensor per layer and splits them back into one per expert when it saves."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        try:
            from transformers.modeling_utils import revert_weight_conversion
        except ImportError:  # transformers 4: its modules are laid out as checkpoints are
            return params
    return revert_weight_conversion(model, params)


def _check_engine_reads(config, names: set[str]) -> None:
    """Every weight the engine's family reads is among `names`: a transformers version that cannot write the
    hub's layout fails here, before a checkpoint of many GB is drawn."""
    from flexgen_core.plan.shapes import from_hf_config

    model = from_hf_config("random checkpoint", config.to_dict(), "folder")
    missing = [spec.checkpoint_names[0] for layer in model.layers for spec in layer.specs
               if not any(key in names for key in spec.checkpoint_names)]
    if missing:
        raise ValueError(f"transformers names {len(missing)} of the engine's weights differently, e.g. "
                         f"{missing[:3]}: this checkpoint would not load in the engine")


def checkpoint_bytes(config, dtype: torch.dtype) -> int:
    return sum(torch.Size(shape).numel() for _, shape in _parameters(config)) * dtype.itemsize


def _value(name: str, shape, generator: torch.Generator, dtype: torch.dtype, device, zero_row: int | None):
    if name.endswith("norm.weight"):  # LayerNorm, RMSNorm, q/k norms
        return torch.ones(shape, dtype=dtype, device=device)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    values = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=generator)
    if zero_row is not None:
        values[zero_row] = 0  # the EOS logit is 0: never the greedy choice, so generation runs its full length
    return values


def _output_embedding(names: list[str]) -> str:
    """The tensor the logits are computed with: lm_head, or the input embedding it is tied to."""
    if "lm_head.weight" in names:
        return "lm_head.weight"
    return next(name for name in names if name.endswith("embed_tokens.weight"))


def build_random_checkpoint(folder: str | os.PathLike, config, dtype: str = "float16", seed: int = 0,
                            device: str | None = None, progress: bool = True) -> Path:
    """Write a sharded random-weight checkpoint of `config` into `folder` (kept if already complete)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    folder = Path(folder).expanduser()
    if (folder / INDEX).is_file():
        return folder
    torch_dtype = getattr(torch, dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    params = _parameters(config)
    output = _output_embedding([name for name, _ in params])
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
        tensors = {name: _value(name, shape, generator, torch_dtype, device,
                                config.eos_token_id if name == output else None).cpu()
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
    parser.add_argument("--shape", choices=SHAPES, default="opt-30b")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = model_config(args.shape)
    size = checkpoint_bytes(config, getattr(torch, args.dtype))
    print(f"{args.shape}: {size / 2**30:.1f} GiB in {args.dtype}")
    print(build_random_checkpoint(args.folder, config, args.dtype, args.seed))


if __name__ == "__main__":
    main()
