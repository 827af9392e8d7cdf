"""What a model family provides to the engine: a config, a list of layers, their weight specs.

The engine treats a model as a sequence of layers (FlexGen paper, Sec. 4: input embedding,
then attention and MLP of every decoder block as separate layers, then the output embedding).
Each layer declares its weights (`WeightSpec`) so storage can place them on tiers without
knowing the family, and exposes pure forward functions that take those weights as tensors.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from math import prod
from typing import Any, Mapping, Protocol, runtime_checkable


class LayerKind(enum.Enum):
    INPUT = "input"          # token ids (B, s) -> hidden (B, s, H)
    ATTENTION = "attention"  # hidden -> hidden, reading and extending the KV cache (AttentionLayer)
    MLP = "mlp"              # hidden -> hidden
    OUTPUT = "output"        # hidden -> logits (B, s, V)


@dataclass(frozen=True)
class WeightSpec:
    name: str                     # engine-side name, unique within its layer
    checkpoint_names: tuple[str, ...]  # keys tried in the checkpoint, in order (tied weights share one)
    shape: tuple[int, ...]
    # Dimension grouped by 4-bit compression (the output channel for matrices); None = never compressed.
    compress_group_dim: int | None = None

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True)
class CheckpointNames:
    """How a family spells its checkpoint keys: a key is looked up under each prefix, in order."""

    prefixes: tuple[str, ...]

    def keys(self, key: str) -> tuple[str, ...]:
        return tuple(prefix + key for prefix in self.prefixes)

    def matrix(self, name: str, key: str, out_dim: int, in_dim: int) -> WeightSpec:
        """A 2-D weight (out, in); 4-bit compression groups it along the output channel."""
        return WeightSpec(name, self.keys(key), (out_dim, in_dim), compress_group_dim=0)

    def vector(self, name: str, key: str, dim: int) -> WeightSpec:
        return WeightSpec(name, self.keys(key), (dim,))


_REQUIRED = object()


def config_int(hf: Mapping[str, Any], key: str, default: Any = _REQUIRED, minimum: int = 1) -> int:
    """An integer field of config.json, checked when the config is read: a missing, non-integer or
    too small value is a ValueError naming the field and the value (not a ZeroDivisionError or a
    missing-tensor error later). A field set to null takes `default`."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"config.json has no {key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"config.json field {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class ModelShape:
    """Family-independent shape: what memory accounting and the cost model need."""

    family: str
    num_layers: int          # decoder blocks
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_size: int
    vocab_size: int
    max_positions: int

    @property
    def kv_width(self) -> int:
        """Width of one token's K (or V) in one layer."""
        return self.num_kv_heads * self.head_dim


@runtime_checkable
class Layer(Protocol):
    """What the engine needs of every layer: its kind, a unique name and its weights' specs. INPUT,
    MLP and OUTPUT layers also have `forward(w, x)` (INPUT: `forward(w, token_ids, positions)`)."""

    kind: LayerKind
    name: str
    specs: list[WeightSpec]


@runtime_checkable
class AttentionLayer(Layer, Protocol):
    """An ATTENTION layer: the engine runs the attention itself (over its KV cache, on the tier the
    placement says) between `qkv` and `finish`."""

    sliding_window: int | None  # keys more than this many positions back are hidden (Mistral); None: all

    def qkv(self, w: Mapping[str, Any], x: Any, positions: Any) -> tuple[Any, Any, Any]:
        """(B, s, H) -> q (B, s, nh, hd), k and v (B, s, nkv, hd)."""
        ...

    def finish(self, w: Mapping[str, Any], x: Any, attn: Any) -> Any:
        """x: the layer input (B, s, H); attn: (B, s, nh, hd) -> the layer's output (B, s, H)."""
        ...
