"""Sparse mixture-of-experts MLPs, as transformers' Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE compute them
(`models/{mixtral,qwen2_moe,qwen3_moe,olmoe}/modeling_*.py`, their `*SparseMoeBlock`).

A router (E x H) scores every token; the softmax of its logits, in float32, picks each token's top-k
experts (ties as `torch.topk` breaks them, on the same float32 probabilities). Mixtral renormalises the
k probabilities to sum to 1 and weighs the experts' outputs by them in float32; the Qwens and OLMoE
renormalise only with `norm_topk_prob` and cast the weights to the activations' dtype first. Each expert
is a SwiGLU MLP; tokens are grouped by expert, so an expert runs one matmul over the tokens routed to it,
experts in ascending order, their weighted outputs summed per token. Qwen2-MoE adds a shared expert that
every token goes through, scaled by sigmoid(shared_gate(x)).

Experts are weights like any other: each is placed on a tier by the policy (byte midpoints in spec
order), 4-bit compressible, and loaded with its layer once per (step, layer) for the whole block. The
cost model charges each expert's matmul to k/E of the tokens (`WeightSpec.tokens_share`).
"""

from __future__ import annotations

import torch

from flexgen_core.models import layers as L
from flexgen_core.models.base import CheckpointNames, LayerKind, MoESpec, WeightSpec


class SparseMoE:
    """An MLP layer whose feed-forward is a routed mixture of experts (with RMSNorm before it)."""

    kind = LayerKind.MLP

    def __init__(self, cfg, index: int, moe: MoESpec, names: CheckpointNames):
        self.cfg, self.moe = cfg, moe
        self.name = f"layer{index}.moe"
        self.act = L.activation(cfg.activation)
        h, f, p = cfg.hidden_size, moe.expert_ffn, f"layers.{index}."
        block = p + moe.names.block
        self.specs = [
            names.vector("norm_w", p + "post_attention_layernorm.weight", h),
            names.matrix("router", block + "gate.weight", moe.num_experts, h),
        ]
        if moe.shared_ffn:
            s = moe.shared_ffn
            self.specs += [
                names.matrix("shared_gate", block + "shared_expert.gate_proj.weight", s, h),
                names.matrix("shared_up", block + "shared_expert.up_proj.weight", s, h),
                names.matrix("shared_down", block + "shared_expert.down_proj.weight", h, s),
                names.matrix("shared_router", block + "shared_expert_gate.weight", 1, h),
            ]
        share = moe.top_k / moe.num_experts  # of the tokens, on average, multiply by one expert's weights
        self.expert_names = [(f"e{e}.gate", f"e{e}.up", f"e{e}.down") for e in range(moe.num_experts)]
        for e in range(moe.num_experts):
            for part, key, shape in (("gate", moe.names.gate, (f, h)), ("up", moe.names.up, (f, h)),
                                     ("down", moe.names.down, (h, f))):
                self.specs.append(WeightSpec(f"e{e}.{part}", names.keys(block + key.format(e=e)), shape,
                                             compress_group_dim=0, tokens_share=share))

    def route(self, w, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (T, H) -> the weights (T, k) and indices (T, k) of their top-k experts."""
        logits = L.linear(y, w["router"])  # (T, E)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top_weights, top_experts = torch.topk(probs, self.moe.top_k, dim=-1)
        if self.moe.normalize_top_k:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        if not self.moe.float32_weights:
            top_weights = top_weights.to(logits.dtype)
        return top_weights, top_experts

    def forward(self, w, x: torch.Tensor) -> torch.Tensor:
        y = L.rms_norm(x, w["norm_w"], self.cfg.rms_norm_eps).reshape(-1, x.shape[-1])  # (T, H)
        top_weights, top_experts = self.route(w, y)
        out = torch.zeros_like(y)
        for e in torch.unique(top_experts).tolist():  # ascending, as transformers sums them
            gate, up, down = self.expert_names[e]
            token, slot = torch.where(top_experts == e)
            part = y[token]
            gated = self.act(L.linear(part, w[gate]))
            gated.mul_(L.linear(part, w[up]))
            expert_out = L.linear(gated, w[down]) * top_weights[token, slot, None]
            out.index_add_(0, token, expert_out.to(out.dtype))
        if self.moe.shared_ffn:
            shared = self.act(L.linear(y, w["shared_gate"]))
            shared.mul_(L.linear(y, w["shared_up"]))
            out = out + torch.sigmoid(L.linear(y, w["shared_router"])) * L.linear(shared, w["shared_down"])
        return x + out.view_as(x)
