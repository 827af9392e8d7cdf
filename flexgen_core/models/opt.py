"""OPT (Zhang et al., 2022) as in transformers' `models/opt/modeling_opt.py`.

Learned positions offset by 2, LayerNorm, ReLU MLP, input and output embeddings tied. The
opt-350m variant projects 512-wide embeddings in and out of the 1024-wide decoder and applies
LayerNorm after each block instead of before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from flexgen_core.models import layers as L
from flexgen_core.models.base import CheckpointNames, LayerKind, ModelShape, WeightSpec, config_int

# OPT's learned positional embedding reserves the first two rows (a fairseq legacy).
POSITION_OFFSET = 2
LAYER_NORM_EPS = 1e-5


@dataclass(frozen=True)
class OPTConfig(ModelShape):
    word_embed_proj_dim: int = 0
    do_layer_norm_before: bool = True
    final_layer_norm: bool = True
    activation: str = "relu"
    bias: bool = True
    eos_token_id: int | None = 2

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "OPTConfig":
        hidden = config_int(hf, "hidden_size")
        heads = config_int(hf, "num_attention_heads")
        num_layers, ffn = config_int(hf, "num_hidden_layers"), config_int(hf, "ffn_dim")
        vocab, positions = config_int(hf, "vocab_size"), config_int(hf, "max_position_embeddings")
        word_embed_proj_dim = config_int(hf, "word_embed_proj_dim", hidden)
        if hidden % heads:
            raise ValueError(f"OPT hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        if not hf.get("layer_norm_elementwise_affine", True):
            raise ValueError("OPT checkpoints with layer_norm_elementwise_affine=false are not supported")
        pre_norm = hf.get("do_layer_norm_before", True)
        return cls(
            family="opt",
            num_layers=num_layers,
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            ffn_size=ffn,
            vocab_size=vocab,
            max_positions=positions,
            word_embed_proj_dim=word_embed_proj_dim,
            do_layer_norm_before=pre_norm,
            final_layer_norm=pre_norm and not hf.get("_remove_final_layer_norm", False),
            activation=hf.get("activation_function", "relu"),
            bias=hf.get("enable_bias", True),
            eos_token_id=hf.get("eos_token_id", 2),
        )

    @property
    def projects_embeddings(self) -> bool:
        return self.word_embed_proj_dim != self.hidden_size


# Full causal-LM checkpoints prefix "model.decoder."; bare OPTModel ones "decoder.".
_NAMES = CheckpointNames(("model.decoder.", "decoder."))


class OPTInput:
    kind = LayerKind.INPUT

    def __init__(self, cfg: OPTConfig):
        self.cfg = cfg
        self.name = "input_embed"
        self.specs = [
            _NAMES.matrix("tokens", "embed_tokens.weight", cfg.vocab_size, cfg.word_embed_proj_dim),
            _NAMES.matrix("positions", "embed_positions.weight", cfg.max_positions + POSITION_OFFSET, cfg.hidden_size),
        ]
        if cfg.projects_embeddings:
            self.specs.append(_NAMES.matrix("project_in", "project_in.weight", cfg.hidden_size, cfg.word_embed_proj_dim))

    def forward(self, w: dict[str, torch.Tensor], token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # positions: (B, s), -1 at left padding; transformers maps padding to row 1 the same way.
        x = torch.nn.functional.embedding(token_ids, w["tokens"])
        if self.cfg.projects_embeddings:
            x = L.linear(x, w["project_in"])
        return x + torch.nn.functional.embedding(positions.clamp(min=-1) + POSITION_OFFSET, w["positions"])


class OPTAttention:
    kind = LayerKind.ATTENTION
    sliding_window = None  # full causal attention
    scores = L.STANDARD_SCORES

    def __init__(self, cfg: OPTConfig, index: int):
        self.cfg = cfg
        self.name = f"layer{index}.attention"
        h, p = cfg.hidden_size, f"layers.{index}."
        self.specs = [_NAMES.matrix(n, p + f"self_attn.{n}_proj.weight", h, h) for n in ("q", "k", "v", "out")]
        self.specs += [_NAMES.vector("norm_w", p + "self_attn_layer_norm.weight", h),
                       _NAMES.vector("norm_b", p + "self_attn_layer_norm.bias", h)]
        if cfg.bias:
            self.specs += [_NAMES.vector(n + "_b", p + f"self_attn.{n}_proj.bias", h) for n in ("q", "k", "v", "out")]

    def qkv(self, w, x: torch.Tensor, positions: torch.Tensor):
        """(B, s, H) -> q, k, v each (B, s, nh, hd). Positions are unused: OPT adds them at input."""
        if self.cfg.do_layer_norm_before:
            x = L.layer_norm(x, w["norm_w"], w["norm_b"], LAYER_NORM_EPS)
        nh = self.cfg.num_heads
        return tuple(L.split_heads(L.linear(x, w[n], w.get(n + "_b")), nh) for n in ("q", "k", "v"))

    def finish(self, w, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """x: the layer input (B, s, H); attn: (B, s, nh, hd) -> layer output (B, s, H)."""
        x = x + L.linear(attn.flatten(2), w["out"], w.get("out_b"))
        if not self.cfg.do_layer_norm_before:  # opt-350m normalises after the residual
            x = L.layer_norm(x, w["norm_w"], w["norm_b"], LAYER_NORM_EPS)
        return x


class OPTMLP:
    kind = LayerKind.MLP

    def __init__(self, cfg: OPTConfig, index: int):
        h, f, p = cfg.hidden_size, cfg.ffn_size, f"layers.{index}."
        specs = [_NAMES.matrix("fc1", p + "fc1.weight", f, h), _NAMES.matrix("fc2", p + "fc2.weight", h, f),
                 _NAMES.vector("norm_w", p + "final_layer_norm.weight", h),
                 _NAMES.vector("norm_b", p + "final_layer_norm.bias", h)]
        if cfg.bias:
            specs += [_NAMES.vector("fc1_b", p + "fc1.bias", f), _NAMES.vector("fc2_b", p + "fc2.bias", h)]
        self.cfg, self.name, self.specs = cfg, f"layer{index}.mlp", specs
        self.act = L.activation(cfg.activation)

    def forward(self, w, x: torch.Tensor) -> torch.Tensor:
        y = L.layer_norm(x, w["norm_w"], w["norm_b"], LAYER_NORM_EPS) if self.cfg.do_layer_norm_before else x
        y = L.linear(self.act(L.linear(y, w["fc1"], w.get("fc1_b"))), w["fc2"], w.get("fc2_b"))
        x = x + y
        if not self.cfg.do_layer_norm_before:
            x = L.layer_norm(x, w["norm_w"], w["norm_b"], LAYER_NORM_EPS)
        return x


class OPTOutput:
    kind = LayerKind.OUTPUT

    def __init__(self, cfg: OPTConfig):
        self.cfg = cfg
        self.name = "output_embed"
        self.specs = []
        if cfg.final_layer_norm:
            self.specs += [
                _NAMES.vector("norm_w", "final_layer_norm.weight", cfg.hidden_size),
                _NAMES.vector("norm_b", "final_layer_norm.bias", cfg.hidden_size),
            ]
        if cfg.projects_embeddings:
            self.specs.append(_NAMES.matrix("project_out", "project_out.weight", cfg.word_embed_proj_dim, cfg.hidden_size))
        # Tied to the input embedding; a separate copy is stored so each layer's weights move as a unit.
        tied = WeightSpec("lm_head", ("lm_head.weight",) + _NAMES.keys("embed_tokens.weight"),
                          (cfg.vocab_size, cfg.word_embed_proj_dim), compress_group_dim=0)
        self.specs.append(tied)

    def forward(self, w, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.final_layer_norm:
            x = L.layer_norm(x, w["norm_w"], w["norm_b"], LAYER_NORM_EPS)
        if self.cfg.projects_embeddings:
            x = L.linear(x, w["project_out"])
        return L.linear(x, w["lm_head"])  # (B, s, V)


def build_layers(cfg: OPTConfig) -> list:
    layers: list = [OPTInput(cfg)]
    for i in range(cfg.num_layers):
        layers += [OPTAttention(cfg, i), OPTMLP(cfg, i)]
    layers.append(OPTOutput(cfg))
    return layers
