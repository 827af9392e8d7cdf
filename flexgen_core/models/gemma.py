"""Gemma 2 and Gemma 3 (text), as transformers' `models/gemma2/modeling_gemma2.py` and
`models/gemma3/modeling_gemma3.py` (`Gemma3ForCausalLM`): Llama-style decoders (llama.py) with
- the token embedding scaled by sqrt(hidden_size), that factor rounded to the activations' dtype;
- RMSNorms that scale by (1 + weight) in float32 (layers.gemma_rms_norm), before and after attention
  (`input_layernorm`, `post_attention_layernorm`) and before and after the MLP (`pre_feedforward_layernorm`,
  `post_feedforward_layernorm`);
- a GeGLU MLP (`hidden_activation`: GELU, tanh approximation);
- attention scores scaled by `query_pre_attn_scalar` ** -0.5, not head_dim ** -0.5;
- local (sliding-window) and global layers as `layer_types` says, else Gemma 2's alternation (even layers
  local) or Gemma 3's pattern (every `sliding_window_pattern`-th layer global, 6 by default);
- Gemma 2: attention scores and the final logits soft-capped (`attn_logit_softcapping`,
  `final_logit_softcapping`: cap * tanh(x / cap));
- Gemma 3: per-head q/k RMSNorm; the local layers' RoPE with a base of their own (`rope_local_base_freq`, or
  `rope_parameters["sliding_attention"]` as transformers 5 writes it), the global layers' with `rope_theta`
  and its scaling.
The output embedding is tied. Bidirectional attention (`use_bidirectional_attention`, EmbeddingGemma) is
refused; the multimodal Gemma 3 checkpoints (`Gemma3ForConditionalGeneration`) are not read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from flexgen_core.models import layers as L
from flexgen_core.models.llama import (DEFAULT_ROPE_THETA, NAMES, LlamaAttention, LlamaConfig, LlamaInput, LlamaMLP,
                                       LlamaOutput, RopeScaling, Rotary, common_fields, rope_from_hf, rope_inv_freq)

LAYER_TYPES = ("sliding_attention", "full_attention")
GEMMA3_GLOBAL_THETA, GEMMA3_LOCAL_THETA = 1_000_000.0, 10_000.0  # transformers' Gemma3TextConfig defaults


@dataclass(frozen=True)
class GemmaConfig(LlamaConfig):
    query_pre_attn_scalar: float = 256.0
    attn_softcap: float | None = None
    final_softcap: float | None = None
    local_layers: tuple[bool, ...] = ()  # per decoder layer: a local (sliding-window) layer
    local_rope_theta: float = DEFAULT_ROPE_THETA  # the local layers' RoPE (Gemma 2: the global layers')
    local_rope_scaling: RopeScaling | None = None


def gemma2_config_from_hf(hf: Mapping[str, Any]) -> GemmaConfig:
    fields = _fields(hf, hf)
    local = _local_layers(hf, fields["num_layers"], pattern=2)
    return GemmaConfig(**fields, **_gemma_fields(hf, fields, local), family="gemma2",
                       attn_softcap=_cap(hf, "attn_logit_softcapping", 50.0),
                       final_softcap=_cap(hf, "final_logit_softcapping", 30.0),
                       local_rope_theta=fields["rope_theta"], local_rope_scaling=fields["rope_scaling"])


def gemma3_config_from_hf(hf: Mapping[str, Any]) -> GemmaConfig:
    params = hf.get("rope_parameters") or {}
    if any(key in params for key in LAYER_TYPES):  # transformers 5: RoPE per layer type
        global_rope = dict(params.get("full_attention") or {})
        local_rope = dict(params.get("sliding_attention") or {})
    else:  # the hub's 4.x layout: rope_theta and rope_scaling for the global layers
        global_rope = {**(hf.get("rope_scaling") or {}), **params}
        global_rope.setdefault("rope_theta", hf.get("rope_theta"))
        local_rope = {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq")}
    global_rope["rope_theta"] = global_rope.get("rope_theta") or GEMMA3_GLOBAL_THETA
    local_rope["rope_theta"] = local_rope.get("rope_theta") or GEMMA3_LOCAL_THETA
    fields = _fields(hf, {**hf, "rope_parameters": global_rope, "rope_scaling": None, "rope_theta": None})
    local_theta, local_scaling = rope_from_hf({"rope_parameters": local_rope}, fields["max_positions"])
    local = _local_layers(hf, fields["num_layers"], pattern=hf.get("sliding_window_pattern") or 6)
    return GemmaConfig(**fields, **_gemma_fields(hf, fields, local), family="gemma3_text", qk_norm="head",
                       attn_softcap=_cap(hf, "attn_logit_softcapping", None),
                       final_softcap=_cap(hf, "final_logit_softcapping", None),
                       local_rope_theta=local_theta, local_rope_scaling=local_scaling)


def _fields(hf: Mapping[str, Any], rope_view: Mapping[str, Any]) -> dict[str, Any]:
    if hf.get("use_bidirectional_attention"):
        raise ValueError("Gemma with use_bidirectional_attention (an embedding model) is not supported")
    fields = common_fields(rope_view)
    fields["activation"] = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    fields["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", True))
    return fields


def _gemma_fields(hf: Mapping[str, Any], fields: Mapping[str, Any], local: tuple[bool, ...]) -> dict[str, Any]:
    bias = bool(hf.get("attention_bias", False))
    window = hf.get("sliding_window")
    if window is not None and window >= fields["max_positions"]:
        window = None  # a window as long as the context never masks anything
    scalar = hf.get("query_pre_attn_scalar", 256)
    if not isinstance(scalar, (int, float)) or isinstance(scalar, bool) or scalar <= 0:
        raise ValueError(f"config.json field 'query_pre_attn_scalar' must be a positive number, got {scalar!r}")
    return dict(qkv_bias=bias, o_bias=bias, query_pre_attn_scalar=float(scalar), local_layers=local,
                sliding_windows=tuple(window if is_local else None for is_local in local))


def _local_layers(hf: Mapping[str, Any], num_layers: int, pattern: int) -> tuple[bool, ...]:
    """Which layers are local: `layer_types`, else all but every `pattern`-th."""
    layer_types = hf.get("layer_types")
    if layer_types is None:
        return tuple(bool((i + 1) % pattern) for i in range(num_layers))
    if len(layer_types) != num_layers or not set(layer_types) <= set(LAYER_TYPES):
        raise ValueError(f"config.json field 'layer_types' must give one of {LAYER_TYPES} for each of the "
                         f"{num_layers} layers, got {layer_types!r}")
    return tuple(t == "sliding_attention" for t in layer_types)


def _cap(hf: Mapping[str, Any], key: str, default: float | None) -> float | None:
    cap = hf.get(key, default)
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap <= 0):
        raise ValueError(f"config.json field {key!r} must be a positive number or null, got {cap!r}")
    return None if cap is None else float(cap)


class GemmaInput(LlamaInput):
    def forward(self, w, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.embedding(token_ids, w["tokens"])  # (B, s, H)
        # sqrt(H) as transformers rounds it (a float32 buffer cast to the weights' dtype); a product of two
        # values of that dtype is exact in float32, so a Python float of it gives the same result.
        return x * torch.tensor(self.cfg.hidden_size ** 0.5).to(x.dtype).item()


class GemmaAttention(LlamaAttention):
    norm = staticmethod(L.gemma_rms_norm)

    def __init__(self, cfg: GemmaConfig, index: int, rotary: Rotary):
        super().__init__(cfg, index, rotary)
        self.specs.append(NAMES.vector("post_norm", f"layers.{index}.post_attention_layernorm.weight", cfg.hidden_size))
        self.scores = L.ScoreRule(cfg.query_pre_attn_scalar ** -0.5, cfg.attn_softcap)

    def finish(self, w, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        out = L.linear(attn.flatten(2), w["o"], w.get("o_b"))
        return x + self.norm(out, w["post_norm"], self.cfg.rms_norm_eps)


class GemmaMLP(LlamaMLP):
    def __init__(self, cfg: GemmaConfig, index: int):
        super().__init__(cfg, index)
        p, h = f"layers.{index}.", cfg.hidden_size
        # Gemma normalises before the MLP with a norm of its own (post_attention_layernorm is GemmaAttention's).
        assert self.specs[-1].name == "norm_w", "LlamaMLP's specs end with its norm (no MLP biases in Gemma)"
        self.specs[-1] = NAMES.vector("norm_w", p + "pre_feedforward_layernorm.weight", h)
        self.specs.append(NAMES.vector("post_norm", p + "post_feedforward_layernorm.weight", h))

    def forward(self, w, x: torch.Tensor) -> torch.Tensor:
        eps = self.cfg.rms_norm_eps
        y = L.gemma_rms_norm(x, w["norm_w"], eps)
        gated = self.act(L.linear(y, w["gate"]))  # (B, s, F)
        gated.mul_(L.linear(y, w["up"]))  # in place: two (B, s, F) tensors at most
        return x + L.gemma_rms_norm(L.linear(gated, w["down"]), w["post_norm"], eps)


class GemmaOutput(LlamaOutput):
    def forward(self, w, x: torch.Tensor) -> torch.Tensor:
        logits = L.linear(L.gemma_rms_norm(x, w["norm_w"], self.cfg.rms_norm_eps), w["lm_head"])  # (B, s, V)
        return L.soft_cap_(logits, self.cfg.final_softcap)


def build_layers(cfg: GemmaConfig) -> list:
    global_rotary = Rotary(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    local_rotary = global_rotary
    if (cfg.local_rope_theta, cfg.local_rope_scaling) != (cfg.rope_theta, cfg.rope_scaling):
        local_rotary = Rotary(rope_inv_freq(cfg.head_dim, cfg.local_rope_theta, cfg.local_rope_scaling))
    layers: list = [GemmaInput(cfg)]
    for i in range(cfg.num_layers):
        layers += [GemmaAttention(cfg, i, local_rotary if cfg.local_layers[i] else global_rotary), GemmaMLP(cfg, i)]
    layers.append(GemmaOutput(cfg))
    return layers
