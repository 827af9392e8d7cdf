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
    # Share of the tokens that multiply by this weight: 1, or k/E on average for a routed expert's (moe.py).
    tokens_share: float = 1.0

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
class ExpertNames:
    """How a family spells an MoE block's checkpoint keys, below `layers.{i}.`."""

    block: str    # "block_sparse_moe." (Mixtral) or "mlp."
    gate: str     # an expert's gate, up and down projections, "{e}" for its index
    up: str
    down: str


MIXTRAL_NAMES = ExpertNames("block_sparse_moe.", "experts.{e}.w1.weight", "experts.{e}.w3.weight",
                            "experts.{e}.w2.weight")
QWEN_NAMES = ExpertNames("mlp.", "experts.{e}.gate_proj.weight", "experts.{e}.up_proj.weight",
                         "experts.{e}.down_proj.weight")


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    expert_ffn: int
    normalize_top_k: bool        # renormalise the k chosen probabilities to sum to 1
    float32_weights: bool        # weigh expert outputs in float32 (Mixtral) or in the activations' dtype
    names: ExpertNames
    shared_ffn: int = 0          # Qwen2-MoE's shared expert (0: none)

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], got {self.top_k}")


def config_num_experts(hf: Mapping[str, Any]) -> int:
    """The experts of an MoE config: `num_experts` on the hub for the Qwens and OLMoE, `num_local_experts`
    for Mixtral and as transformers 5 writes them all."""
    key = "num_experts" if hf.get("num_experts") is not None else "num_local_experts"
    return config_int(hf, key)


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
    moe: MoESpec | None = None  # the mixture of experts of MoE layers (models/moe.py)

    @property
    def kv_width(self) -> int:
        """Width of one token's K (or V) in one layer."""
        return self.num_kv_heads * self.head_dim

    @property
    def mlp_width(self) -> int:
        """The widest intermediate of any MLP: the dense one's, an expert's or a shared expert's."""
        if self.moe is None:
            return self.ffn_size
        return max(self.ffn_size, self.moe.expert_ffn, self.moe.shared_ffn)


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
    scores: Any  # layers.ScoreRule: the scores' scale and soft cap

    def qkv(self, w: Mapping[str, Any], x: Any, positions: Any) -> tuple[Any, Any, Any]:
        """(B, s, H) -> q (B, s, nh, hd), k and v (B, s, nkv, hd)."""
        ...

    def finish(self, w: Mapping[str, Any], x: Any, attn: Any) -> Any:
        """x: the layer input (B, s, H); attn: (B, s, nh, hd) -> the layer's output (B, s, H)."""
        ...
