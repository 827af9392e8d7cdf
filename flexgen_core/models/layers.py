"""Shared layer math. Pure functions on tensors: no idea of tiers, batches in a block or files."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}") from None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers' LlamaRMSNorm: normalise in float32, cast back, then scale."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the halves of the last dimension (the GPT-NeoX / HF Llama convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding. x: (B, s, heads, hd); cos, sin: (B, s, 1, hd) in x's dtype."""
    return x * cos + rotate_half(x) * sin


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, seq, width = x.shape
    return x.view(batch, seq, num_heads, width // num_heads)  # (B, s, nh, hd)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention.

    q: (B, s_q, nh, hd); k, v: (s_k, B, nkv, hd), the cache layout (positions first, so appending a
    token is one contiguous write); allowed: (B, 1, s_q, s_k) bool. nh may be a multiple of nkv
    (grouped-query attention). Returns (B, s_q, nh, hd).
    """
    q = q.transpose(1, 2)      # (B, nh, s_q, hd)
    k = k.permute(1, 2, 0, 3)  # (B, nkv, s_k, hd)
    v = v.permute(1, 2, 0, 3)
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    enable_gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=enable_gqa)
    return out.transpose(1, 2)  # (B, s_q, nh, hd)


def attend_with_prefix(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, allowed: torch.Tensor, prefix_allowed: torch.Tensor | None) -> torch.Tensor:
    """Attention over a prefix shared by every sequence of the batch, then each sequence's own keys.

    q: (B, s_q, nh, hd); prefix_k, prefix_v: (P, nkv, hd), one copy for the whole batch; k, v: (s_k, B,
    nkv, hd) and allowed: (B, 1, s_q, s_k) as in `attend`; prefix_allowed: (B, 1, s_q, P) bool, or None
    when every query sees every prefix key. One softmax runs over [prefix keys] + [own keys]. The
    prefix's scores and its share of the output are each one matrix multiply over every query of the
    batch (Hydragen, Juravsky et al. 2024), so the prefix is read once, not once per sequence.
    """
    batch, s_q, nh, hd = q.shape
    num_prefix, nkv = prefix_k.shape[0], prefix_k.shape[1]
    group = nh // nkv
    if prefix_k.dtype != q.dtype:
        prefix_k, prefix_v, k, v = prefix_k.to(q.dtype), prefix_v.to(q.dtype), k.to(q.dtype), v.to(q.dtype)
    scale = hd ** -0.5
    q5 = q.view(batch, s_q, nkv, group, hd)
    # Every query of the batch against the prefix, per KV head: (nkv, B * s_q * g, hd) @ (nkv, hd, P).
    q_rows = q5.permute(2, 0, 1, 3, 4).reshape(nkv, batch * s_q * group, hd)
    prefix_scores = torch.bmm(q_rows, prefix_k.permute(1, 2, 0)) * scale  # (nkv, B * s_q * g, P)
    prefix_scores = prefix_scores.view(nkv, batch, s_q, group, num_prefix).permute(1, 0, 3, 2, 4)  # (B, nkv, g, s_q, P)
    q_own = q5.permute(0, 2, 3, 1, 4)  # (B, nkv, g, s_q, hd)
    k_own = k.permute(1, 2, 0, 3)[:, :, None]  # (B, nkv, 1, s_k, hd)
    own_scores = torch.matmul(q_own, k_own.transpose(-1, -2)) * scale  # (B, nkv, g, s_q, s_k)
    own_scores = own_scores.masked_fill(~allowed[:, :, None], float("-inf"))
    if prefix_allowed is not None:
        prefix_scores = prefix_scores.masked_fill(~prefix_allowed[:, :, None], float("-inf"))
    probs = torch.softmax(torch.cat((prefix_scores, own_scores), dim=-1).float(), dim=-1).to(q.dtype)
    prefix_probs, own_probs = probs[..., :num_prefix], probs[..., num_prefix:]
    prefix_rows = prefix_probs.permute(1, 0, 3, 2, 4).reshape(nkv, batch * s_q * group, num_prefix)
    out = torch.bmm(prefix_rows, prefix_v.permute(1, 0, 2))  # (nkv, B * s_q * g, hd)
    out = out.view(nkv, batch, s_q, group, hd).permute(1, 2, 0, 3, 4)  # (B, s_q, nkv, g, hd)
    own_out = torch.matmul(own_probs, v.permute(1, 2, 0, 3)[:, :, None])  # (B, nkv, g, s_q, hd)
    out = out + own_out.permute(0, 3, 1, 2, 4)
    return out.reshape(batch, s_q, nh, hd)
