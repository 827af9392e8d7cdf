"""Model shapes for planning, without downloading weights.

A model to plan for is its family-independent `ModelShape` plus its list of layers with their weight
specs (what `memory.account` and the cost model read). It comes from, in order:

1. a local checkpoint folder's `config.json`;
2. the packaged table of known models (`model_shapes.json`: OPT, Llama 2/3, Mistral, Qwen2.5, Qwen3, Phi-3, and the
   mixtures of experts Mixtral, OLMoE, Qwen1.5-MoE and Qwen3-MoE), offline;
3. the `config.json` of a Hugging Face hub repository (downloaded alone, no weights).

Every model is built by its engine family (`models/registry.py`): the family's config class and layer
builder, so the planner accounts exactly the weights the engine will allocate.
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
from flexgen_core.models.registry import family_for, supported_model_types

_TABLE_FILE = Path(__file__).with_name("model_shapes.json")


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
    if family in supported_model_types():
        return {
            **entry.get("config", {}),  # what else the family reads (experts, head_dim, ...)
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
    raise ValueError(f"model table entry has unknown family {family!r}; known: {', '.join(supported_model_types())}")


@dataclass(frozen=True)
class SpecOnlyLayer:
    """A layer described by its weights alone (no forward): enough for accounting and the cost model
    (hand-built layers in tests)."""

    name: str
    kind: LayerKind
    specs: tuple[WeightSpec, ...]


# ---- resolution -----------------------------------------------------------------------------------

def from_hf_config(name: str, hf: Mapping[str, Any], source: str) -> PlanModel:
    """Shape and layers from a `config.json` dict, built by the engine's own family (the weights the
    engine will allocate, biases included)."""
    try:
        family = family_for(hf)
    except ValueError as e:
        raise ValueError(f"cannot plan for {name!r}: {e}") from None
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
    """Parameters a layer multiplies each token by (2-D weights; a routed expert's for the share of tokens
    routed to it, on average); the input embedding only gathers rows."""
    if layer.kind is LayerKind.INPUT:
        return 0
    return round(sum(prod(spec.shape) * spec.tokens_share for spec in layer.specs if len(spec.shape) == 2))
