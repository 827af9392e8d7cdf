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
