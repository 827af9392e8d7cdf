"""Llama-style decoders: Llama 2/3, Mistral and Qwen2, as in transformers' `models/llama/modeling_llama.py`,
`models/mistral/modeling_mistral.py` and `models/qwen2/modeling_qwen2.py`; and the layers that Qwen3,
Phi-3, Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE (their own files: qwen3.py, phi3.py, mixtral.py,
qwen2_moe.py, olmoe.py) build on.

One family with switches, since the three differ only in details:
- all: RMSNorm before attention and MLP, rotary position embeddings (RoPE) on q and k, grouped-query
  attention (`num_key_value_heads` <= `num_attention_heads`; the KV cache holds the KV heads only),
  SwiGLU MLP (`down(silu(gate(x)) * up(x))`), output embedding tied or not (`tie_word_embeddings`);
- Llama: optional biases on q/k/v/o (`attention_bias`) and on the MLP (`mlp_bias`); RoPE scaling of
  type `linear` or `llama3` (Llama 3.1's frequency-dependent scaling);
- Mistral: a sliding attention window (`sliding_window`) in every layer;
- Qwen2: biases on q/k/v (never on o); a sliding window only when `use_sliding_window`, and then only
  in layers `>= max_window_layers` (or as `layer_types` says).

The others add: q/k RMSNorm, per head before RoPE (Qwen3, `qk_norm="head"`) or over the whole projection
(OLMoE, `qk_norm="full"`, with `clip_qkv`); fused qkv and gate_up projections (Phi-3, `fused_projections`);
mixture-of-experts MLPs (moe.py) in the layers `moe_layers` names.

Sliding windows are applied as an attention mask (a query at index i sees keys (i - window, i]), as
transformers does; the KV cache still holds every position, so memory is that of full attention.

Config fields are read in both the transformers 4.x layout (`rope_theta`, `rope_scaling`) and the 5.x
one (`rope_parameters`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from flexgen_core.models import layers as L
from flexgen_core.models.base import CheckpointNames, LayerKind, ModelShape, WeightSpec, config_int
from flexgen_core.models.moe import SparseMoE

log = logging.getLogger(__name__)

VARIANTS = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")
DEFAULT_ROPE_THETA = 10000.0
MAX_KEPT_ANGLES = 64  # decode steps' cos/sin kept by `Rotary`: more than a block's GPU batches


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: `linear` divides every frequency by `factor`; `llama3` divides only the
    low frequencies and interpolates the middle band (see `rope_inv_freq`)."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192


@dataclass(frozen=True)
class LlamaConfig(ModelShape):
    rms_norm_eps: float = 1e-6
    rope_theta: float = DEFAULT_ROPE_THETA
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    activation: str = "silu"
    sliding_windows: tuple[int | None, ...] = ()  # per decoder layer; None = full causal attention
    eos_token_id: int | None = 2
    qk_norm: str | None = None   # "head": RMSNorm of each head of q and k (Qwen3); "full": of q and k (OLMoE)
    clip_qkv: float | None = None  # q, k and v clamped to [-clip, clip] (OLMoE)
    moe_layers: tuple[bool, ...] = ()  # per decoder layer: a mixture of experts (else the dense MLP)
    fused_projections: bool = False  # one qkv_proj (q, then k, then v rows) and one gate_up_proj (Phi-3)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], variant: str | None = None) -> "LlamaConfig":
        variant = variant or hf.get("model_type", "llama")
        if variant not in VARIANTS:
            raise ValueError(f"Llama-style variant must be one of {VARIANTS}, got {variant!r}")
        fields = common_fields(hf)
        if variant == "llama":
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
            mlp_bias = bool(hf.get("mlp_bias", False))
        else:
            qkv_bias, o_bias, mlp_bias = variant == "qwen2", False, False  # as the HF modules hard-code them
        if variant == "mistral":
            windows = mistral_windows(hf, fields["num_layers"], fields["max_positions"])
        elif variant == "qwen2":
            windows = qwen_windows(hf, fields["num_layers"], fields["max_positions"])
        else:
            windows = (None,) * fields["num_layers"]
        return cls(**fields, family=variant, qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias,
                   sliding_windows=windows)


def common_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The fields every Llama-style config.json gives alike: shape, RoPE, norms, activation, tied head, EOS."""
    hidden, heads = config_int(hf, "hidden_size"), config_int(hf, "num_attention_heads")
    kv_heads = config_int(hf, "num_key_value_heads", heads)
    head_dim = config_int(hf, "head_dim", hidden // heads)
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor {hf['partial_rotary_factor']} is not supported (only 1.0)")
    max_positions = config_int(hf, "max_position_embeddings", 4096)
    theta, scaling = rope_from_hf(hf, max_positions)
    return dict(
        num_layers=config_int(hf, "num_hidden_layers"),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_size=config_int(hf, "intermediate_size"),
        vocab_size=config_int(hf, "vocab_size"),
        max_positions=max_positions,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        activation=hf.get("hidden_act", "silu"),
        eos_token_id=_eos_token_id(hf),
    )


def rope_from_hf(hf: Mapping[str, Any], max_positions: int) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4.x)."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    if any(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(f"per-layer-type rope_parameters are not supported: {sorted(params)}")
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or DEFAULT_ROPE_THETA)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling type {kind!r}; supported: {', '.join(ROPE_TYPES)}")
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", float(params["factor"]))
    return theta, RopeScaling(
        "llama3",
        float(params["factor"]),
        float(params["low_freq_factor"]),
        float(params["high_freq_factor"]),
        int(params.get("original_max_position_embeddings") or max_positions),
    )


def mistral_windows(hf: Mapping[str, Any], num_layers: int, max_positions: int) -> tuple:
    """Mistral and Mixtral: `sliding_window` in every layer (None: full attention)."""
    window = hf.get("sliding_window")
    if window is None or window >= max_positions:
        return (None,) * num_layers  # a window as long as the context never masks anything
    return (window,) * num_layers


def qwen_windows(hf: Mapping[str, Any], num_layers: int, max_positions: int, default_layers: str = "upper") -> tuple:
    """The Qwens: a window only with `use_sliding_window` (off in released models), in the layers that
    `layer_types` says, else in those >= `max_window_layers` ("upper": Qwen2, Qwen3) or in all ("all":
    Qwen3-MoE)."""
    window = hf.get("sliding_window")
    if not hf.get("use_sliding_window", False) or window is None or window >= max_positions:
        return (None,) * num_layers
    layer_types = hf.get("layer_types")
    if layer_types is None and default_layers == "upper":
        layer_types = ["sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
                       for i in range(num_layers)]
    if layer_types is None:
        return (window,) * num_layers
    return tuple(window if t == "sliding_attention" else None for t in layer_types)


def _eos_token_id(hf: Mapping[str, Any]) -> int | None:
    eos = hf.get("eos_token_id")
    if isinstance(eos, (list, tuple)):
        if not eos:
            return None
        if len(eos) > 1:
            log.warning("config lists several eos_token_id %s; generation stops only at the first, %d", eos, eos[0])
        return int(eos[0])
    return eos


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """(head_dim / 2,) float32 inverse frequencies, computed as transformers' `modeling_rope_utils` does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # llama3: wavelengths longer than original_len / low_freq_factor are slowed by `factor`, those
    # shorter than original_len / high_freq_factor kept, the band between interpolated smoothly.
    old_len = scaling.original_max_positions
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class Rotary:
    """cos/sin of the rotary embedding at given positions, shared by a model's attention layers.

    No (max_positions, head_dim) cos/sin table: it would take 128 MiB for Qwen2.5's 131072 positions
    outside the memory accounting, and sizing a smaller one to the positions seen needs a device sync
    per call. cos/sin cost O(B * s * head_dim), nil beside a prompt pass's matmuls; in decode, where
    the layers are small, they are computed once per (step, GPU batch) and reused by every layer. As
    in transformers, angles are computed in float32 and cast to the activations' dtype.
    """

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq = inv_freq  # (hd / 2,) float32, on the host
        self._per_device: dict[torch.device, torch.Tensor] = {}
        # Decode steps' cos/sin, by positions tensor: every layer of a (step, GPU batch) is given the same
        # positions object, so they are computed once per step and GPU batch, not once per layer. The
        # entries hold their `positions`, which keeps the identity check sound (an object cannot be
        # freed and its id reused while held). Prompt passes are not kept: (B, s, 1, hd) tensors, and
        # their cost beside the pass's matmuls is nil.
        self._decode: dict[int, tuple] = {}

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, s), -1 on left padding -> cos, sin each (B, s, 1, hd) in `dtype`."""
        if positions.shape[1] != 1:
            return self._angles(positions, dtype)
        hit = self._decode.get(id(positions))
        if hit is not None and hit[0] is positions and hit[1] == dtype:
            return hit[2], hit[3]
        cos, sin = self._angles(positions, dtype)
        if len(self._decode) >= MAX_KEPT_ANGLES:
            self._decode.pop(next(iter(self._decode)))  # the oldest
        self._decode[id(positions)] = (positions, dtype, cos, sin)
        return cos, sin

    def _angles(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self._per_device.get(positions.device)
        if inv_freq is None:
            inv_freq = self._per_device.setdefault(positions.device, self.inv_freq.to(positions.device))
        # Padding rows are masked out of attention; any valid angle will do for them.
        freqs = positions.clamp(min=0)[..., None].float() * inv_freq  # (B, s, hd / 2)
        angles = torch.cat((freqs, freqs), dim=-1)[:, :, None]  # (B, s, 1, hd)
        return angles.cos().to(dtype), angles.sin().to(dtype)


# Causal-LM checkpoints prefix "model."; bare LlamaModel ones do not.
NAMES = CheckpointNames(("model.", ""))


class LlamaInput:
    kind = LayerKind.INPUT

    def __init__(self, cfg: LlamaConfig):
        self.specs = [NAMES.matrix("tokens", "embed_tokens.weight", cfg.vocab_size, cfg.hidden_size)]
        self.cfg, self.name = cfg, "input_embed"

    def forward(self, w, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Positions enter through RoPE in every attention layer, not here."""
        return torch.nn.functional.embedding(token_ids, w["tokens"])  # (B, s, H)


class LlamaAttention:
    kind = LayerKind.ATTENTION
    scores = L.STANDARD_SCORES
    norm = staticmethod(L.rms_norm)  # Gemma's: L.gemma_rms_norm

    def __init__(self, cfg: LlamaConfig, index: int, rotary: Rotary):
        self.cfg = cfg
        self.rotary = rotary
        self.name = f"layer{index}.attention"
        # Read by the schedule's attention mask: keys more than this many positions back are hidden.
        self.sliding_window = cfg.sliding_windows[index]
        h, p = cfg.hidden_size, f"layers.{index}."
        q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.kv_width
        # Order matters for placement (placement.weight_tiers: byte midpoints in spec order).
        if cfg.fused_projections:
            projections = [NAMES.matrix("qkv", p + "self_attn.qkv_proj.weight", q_width + 2 * kv_width, h)]
        else:
            projections = [NAMES.matrix("q", p + "self_attn.q_proj.weight", q_width, h),
                           NAMES.matrix("k", p + "self_attn.k_proj.weight", kv_width, h),
                           NAMES.matrix("v", p + "self_attn.v_proj.weight", kv_width, h)]
        self.specs = projections + [
            NAMES.matrix("o", p + "self_attn.o_proj.weight", h, q_width),
            NAMES.vector("norm_w", p + "input_layernorm.weight", h),
        ]
        if cfg.qkv_bias:
            self.specs += [NAMES.vector("q_b", p + "self_attn.q_proj.bias", q_width),
                           NAMES.vector("k_b", p + "self_attn.k_proj.bias", kv_width),
                           NAMES.vector("v_b", p + "self_attn.v_proj.bias", kv_width)]
        if cfg.o_bias:
            self.specs.append(NAMES.vector("o_b", p + "self_attn.o_proj.bias", h))
        if cfg.qk_norm is not None:
            per_head = cfg.qk_norm == "head"
            q_norm, k_norm = (cfg.head_dim, cfg.head_dim) if per_head else (q_width, kv_width)
            self.specs += [NAMES.vector("q_norm", p + "self_attn.q_norm.weight", q_norm),
                           NAMES.vector("k_norm", p + "self_attn.k_norm.weight", k_norm)]

    def qkv(self, w, x: torch.Tensor, positions: torch.Tensor):
        """(B, s, H) -> q (B, s, nh, hd), k and v (B, s, nkv, hd); q and k rotated by position."""
        cfg = self.cfg
        y = self.norm(x, w["norm_w"], cfg.rms_norm_eps)
        if cfg.fused_projections:
            q, k, v = L.linear(y, w["qkv"]).split((cfg.num_heads * cfg.head_dim, cfg.kv_width, cfg.kv_width), dim=-1)
        else:
            q, k, v = (L.linear(y, w[name], w.get(f"{name}_b")) for name in ("q", "k", "v"))
        if cfg.qk_norm == "full":
            q, k = self.norm(q, w["q_norm"], cfg.rms_norm_eps), self.norm(k, w["k_norm"], cfg.rms_norm_eps)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q = L.split_heads(q, cfg.num_heads)
        k, v = L.split_heads(k, cfg.num_kv_heads), L.split_heads(v, cfg.num_kv_heads)
        if cfg.qk_norm == "head":
            q, k = self.norm(q, w["q_norm"], cfg.rms_norm_eps), self.norm(k, w["k_norm"], cfg.rms_norm_eps)
        cos, sin = self.rotary(positions, q.dtype)
        return L.apply_rotary(q, cos, sin), L.apply_rotary(k, cos, sin), v

    def finish(self, w, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """x: the layer input (B, s, H); attn: (B, s, nh, hd) -> layer output (B, s, H)."""
        return x + L.linear(attn.flatten(2), w["o"], w.get("o_b"))


class LlamaMLP:
    kind = LayerKind.MLP

    def __init__(self, cfg: LlamaConfig, index: int):
        self.cfg = cfg
        self.name = f"layer{index}.mlp"
        self.act = L.activation(cfg.activation)
        h, f, p = cfg.hidden_size, cfg.ffn_size, f"layers.{index}."
        if cfg.fused_projections:
            projections = [NAMES.matrix("gate_up", p + "mlp.gate_up_proj.weight", 2 * f, h)]
        else:
            projections = [NAMES.matrix("gate", p + "mlp.gate_proj.weight", f, h),
                           NAMES.matrix("up", p + "mlp.up_proj.weight", f, h)]
        self.specs = projections + [
            NAMES.matrix("down", p + "mlp.down_proj.weight", h, f),
            NAMES.vector("norm_w", p + "post_attention_layernorm.weight", h),
        ]
        if cfg.mlp_bias:
            self.specs += [NAMES.vector("gate_b", p + "mlp.gate_proj.bias", f), NAMES.vector("up_b", p + "mlp.up_proj.bias", f),
                           NAMES.vector("down_b", p + "mlp.down_proj.bias", h)]

    def forward(self, w, x: torch.Tensor) -> torch.Tensor:
        y = L.rms_norm(x, w["norm_w"], self.cfg.rms_norm_eps)
        if self.cfg.fused_projections:
            gate, up = L.linear(y, w["gate_up"]).chunk(2, dim=-1)  # (B, s, 2F): three F-wide at most
            gated = self.act(gate)
            gated.mul_(up)
        else:
            gated = self.act(L.linear(y, w["gate"], w.get("gate_b")))  # (B, s, F)
            gated.mul_(L.linear(y, w["up"], w.get("up_b")))  # in place: two (B, s, F) tensors at most
        return x + L.linear(gated, w["down"], w.get("down_b"))


class LlamaOutput:
    kind = LayerKind.OUTPUT

    def __init__(self, cfg: LlamaConfig):
        self.cfg = cfg
        self.name = "output_embed"
        # A tied head reads the input embedding (HF checkpoints then usually omit lm_head.weight); an
        # untied one must have its own tensor, never silently the embedding's. Either way the engine
        # stores a separate copy, so each layer's weights move as a unit.
        names = ("lm_head.weight",) + (NAMES.keys("embed_tokens.weight") if cfg.tie_word_embeddings else ())
        self.specs = [
            NAMES.vector("norm_w", "norm.weight", cfg.hidden_size),
            WeightSpec("lm_head", names, (cfg.vocab_size, cfg.hidden_size), compress_group_dim=0),
        ]

    def forward(self, w, x: torch.Tensor) -> torch.Tensor:
        return L.linear(L.rms_norm(x, w["norm_w"], self.cfg.rms_norm_eps), w["lm_head"])  # (B, s, V)


def build_layers(cfg: LlamaConfig) -> list:
    rotary = Rotary(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    layers: list = [LlamaInput(cfg)]
    for i in range(cfg.num_layers):
        mlp = SparseMoE(cfg, i, cfg.moe, NAMES) if cfg.moe_layers and cfg.moe_layers[i] else LlamaMLP(cfg, i)
        layers += [LlamaAttention(cfg, i, rotary), mlp]
    layers.append(LlamaOutput(cfg))
    return layers
