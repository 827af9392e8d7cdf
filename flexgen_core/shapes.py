"""Model shapes for planning, without downloading weights.

A model to plan for is its family-independent `ModelShape` plus its list of layers with their weight
specs (what `memory.account` and the cost model read). It comes from, in order:

1. a local checkpoint folder's `config.json`;
2. the packaged table of known models (`model_shapes.json`: OPT, Llama 2/3, Mistral, Qwen2.5), offline;
3. the `config.json` of a Hugging Face hub repository (downloaded alone, no weights).

Families the engine runs (see `models/registry.py`) use their own config class and layer builder, so the
planner accounts exactly what the engine will allocate. Llama-family models (Llama, Mistral, Qwen2) have
no engine family yet: `llama_spec_layers` describes their weights (names and shapes as in transformers'
`modeling_llama.py` / `modeling_qwen2.py`) for planning only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from math import prod
from pathlib import Path
from typing import Any, Mapping

from flexgen_core.models.base import LayerKind, ModelShape, WeightSpec

_TABLE_FILE = Path(__file__).with_name("model_shapes.json")
LLAMA_LIKE = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class PlanModel:
    """What the planner needs of a model: its shape and its layers (each with `.name`, `.kind`, `.specs`)."""

    name: str
    shape: ModelShape
    layers: list
    source: str  # "folder", "table" or "hub"

    @property
    def num_params(self) -> int:
        """Parameters as the engine stores them (a tied output embedding counts twice)."""
        return sum(spec.numel for layer in self.layers for spec in layer.specs)


# ---- the table ------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def known_models() -> dict[str, dict[str, Any]]:
    """Hub name -> shape entry of the packaged table."""
    return json.loads(_TABLE_FILE.read_text())["models"]


def _table_entry(name: str) -> tuple[str, dict[str, Any]] | None:
    """Exact hub name, or a case-insensitive match on the full name or the part after the owner."""
    table = known_models()
    if name in table:
        return name, table[name]
    lowered = name.lower()
    for key, entry in table.items():
        if lowered in (key.lower(), key.split("/", 1)[-1].lower()):
            return key, entry
    return None


def hf_config_from_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A `config.json`-like dict for a table entry, as the family's `from_hf` reads it."""
    family = entry["family"]
    if family == "opt":
        return {
            "model_type": "opt",
            "architectures": ["OPTForCausalLM"],
            "num_hidden_layers": entry["layers"],
            "hidden_size": entry["hidden"],
            "num_attention_heads": entry["heads"],
            "ffn_dim": entry["ffn"],
            "vocab_size": entry["vocab"],
            "max_position_embeddings": entry["max_positions"],
            "word_embed_proj_dim": entry.get("word_embed_proj_dim", entry["hidden"]),
            "do_layer_norm_before": entry.get("do_layer_norm_before", True),
        }
    if family in LLAMA_LIKE:
        return {
            "model_type": family,
            "num_hidden_layers": entry["layers"],
            "hidden_size": entry["hidden"],
            "num_attention_heads": entry["heads"],
            "num_key_value_heads": entry["kv_heads"],
            "intermediate_size": entry["ffn"],
            "vocab_size": entry["vocab"],
            "max_position_embeddings": entry["max_positions"],
            "tie_word_embeddings": entry.get("tie_word_embeddings", False),
        }
    raise ValueError(f"model table entry has unknown family {family!r}; known: opt, {', '.join(LLAMA_LIKE)}")


# ---- Llama-family weights, for planning only ---------------------------------------------------------

@dataclass(frozen=True)
class SpecOnlyLayer:
    """A layer described by its weights alone (no forward): enough for accounting and the cost model."""

    name: str
    kind: LayerKind
    specs: tuple[WeightSpec, ...]


def llama_shape(hf: Mapping[str, Any]) -> ModelShape:
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hidden // heads
    return ModelShape(
        family=hf.get("model_type", "llama"),
        num_layers=hf["num_hidden_layers"],
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        ffn_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        max_positions=hf.get("max_position_embeddings", 4096),
    )


def llama_spec_layers(shape: ModelShape, qkv_bias: bool = False) -> list[SpecOnlyLayer]:
    """Input embedding, (attention, MLP) per block, output (final RMSNorm, lm_head). RoPE has no weights;
    Qwen2 adds q/k/v biases. The output embedding is stored separately, as the engine does for tied ones."""
    h, q_width, kv_width, f = shape.hidden_size, shape.num_heads * shape.head_dim, shape.kv_width, shape.ffn_size

    def matrix(name: str, out_dim: int, in_dim: int) -> WeightSpec:
        return WeightSpec(name, (name,), (out_dim, in_dim), compress_group_dim=0)

    def vector(name: str, dim: int) -> WeightSpec:
        return WeightSpec(name, (name,), (dim,))

    layers = [SpecOnlyLayer("input_embed", LayerKind.INPUT, (matrix("tokens", shape.vocab_size, h),))]
    for i in range(shape.num_layers):
        attention = [matrix("q", q_width, h), matrix("k", kv_width, h), matrix("v", kv_width, h),
                     matrix("o", h, q_width), vector("norm_w", h)]
        if qkv_bias:
            attention += [vector("q_b", q_width), vector("k_b", kv_width), vector("v_b", kv_width)]
        layers.append(SpecOnlyLayer(f"layer{i}.attention", LayerKind.ATTENTION, tuple(attention)))
        mlp = (matrix("gate", f, h), matrix("up", f, h), matrix("down", h, f), vector("norm_w", h))
        layers.append(SpecOnlyLayer(f"layer{i}.mlp", LayerKind.MLP, mlp))
    layers.append(SpecOnlyLayer("output_embed", LayerKind.OUTPUT,
                                (vector("norm_w", h), matrix("lm_head", shape.vocab_size, h))))
    return layers


# ---- resolution -----------------------------------------------------------------------------------

def from_hf_config(name: str, hf: Mapping[str, Any], source: str) -> PlanModel:
    """Shape and layers from a `config.json` dict: the engine's family when it has one, else Llama-like."""
    from flexgen_core.models.registry import family_for

    model_type = hf.get("model_type")
    if model_type in LLAMA_LIKE:
        shape = llama_shape(hf)
        return PlanModel(name, shape, llama_spec_layers(shape, qkv_bias=model_type == "qwen2"), source)
    try:
        family = family_for(hf)
    except ValueError as e:
        raise ValueError(f"cannot plan for {name!r}: {e}; for planning also: {', '.join(LLAMA_LIKE)}") from None
    config = family.config_from_hf(hf)
    return PlanModel(name, config, family.build_layers(config), source)


def load_model(name_or_path: str | os.PathLike) -> PlanModel:
    """A local checkpoint folder, a model of the packaged table, or a hub repository's config.json."""
    path = Path(name_or_path).expanduser()
    name = str(name_or_path)
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ValueError(f"checkpoint folder {name!r} has no config.json")
        try:
            return from_hf_config(name, json.loads(config.read_text()), "folder")
        except json.JSONDecodeError as e:
            raise ValueError(f"{config} is not valid JSON: {e}") from None
    found = _table_entry(name)
    if found is not None:
        key, entry = found
        return from_hf_config(key, hf_config_from_entry(entry), "table")
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ValueError(f"model {name!r} is not a checkpoint folder nor a known model; known: "
                         f"{', '.join(known_models())}")
    return from_hf_config(name, _hub_config(name), "hub")


def _hub_config(repo_id: str) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text())
    except Exception as e:  # offline, unknown or gated repository: all end the same way for the user
        raise ValueError(
            f"cannot find model {repo_id!r}: not a local folder, not in the table of known models, and the hub "
            f"lookup failed ({type(e).__name__}). Known models: {', '.join(known_models())}"
        ) from None


def matrix_params(layer) -> int:
    """Parameters a layer multiplies by (2-D weights); the input embedding only gathers rows."""
    if layer.kind is LayerKind.INPUT:
        return 0
    return sum(prod(spec.shape) for spec in layer.specs if len(spec.shape) == 2)
