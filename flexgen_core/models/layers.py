"""Shared layer math. Pure functions on tensors: no idea of tiers, batches in a block or files."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flexgen_core.memory import query_chunk, token_chunk

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),  # Gemma's
}


@dataclass(frozen=True)
class ScoreRule:
    """How attention turns q.k into the softmax's inputs: q.k * `scale` (None: head_dim ** -0.5), then, with
    `softcap`, cap * tanh(score / cap) before the mask (Gemma 2's attention logit soft-capping)."""

    scale: float | None = None
    softcap: float | None = None


STANDARD_SCORES = ScoreRule()


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


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers' Gemma2RMSNorm/Gemma3RMSNorm: normalise and scale by (1 + weight), both in
    float32, then cast back (the checkpoint stores the scale's offset from 1)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * (1.0 + weight.float())).to(x.dtype)


def soft_cap_(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap), in place (Gemma 2's logit soft-capping); x itself when `cap` is None."""
    if cap is None:
        return x
    return x.div_(cap).tanh_().mul_(cap)


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


def _in_query_chunks(fn, q: torch.Tensor, num_keys: int, masks: tuple[torch.Tensor | None, ...], *args):
    """fn(q_chunk, *args, *mask_chunks) over chunks of queries (dim 1 of q, dim 2 of each mask), so
    that a kernel that materialises its scores never holds more than memory.ATTENTION_CHUNK_BYTES of
    them, whichever kernel the device picks."""
    batch, s_q, nh, _ = q.shape
    step = query_chunk(batch, nh, s_q, num_keys)
    if step >= s_q:
        return fn(q, *args, *masks)
    return torch.cat([fn(q[:, i:i + step], *args, *(m if m is None else m[:, :, i:i + step] for m in masks))
                      for i in range(0, s_q, step)], dim=1)


def in_token_chunks(fn, x: torch.Tensor, width: int) -> torch.Tensor:
    """A position-wise layer `fn` (B, s, H) -> (B, s, H) over chunks of positions, so that its
    intermediate activations, `width` wide, never take more than memory.MLP_CHUNK_BYTES at once."""
    batch, num_tokens, _ = x.shape
    step = token_chunk(batch, num_tokens, width, x.element_size())
    if step >= num_tokens:
        return fn(x)
    return torch.cat([fn(x[:, i:i + step]) for i in range(0, num_tokens, step)], dim=1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
           scores: ScoreRule = STANDARD_SCORES) -> torch.Tensor:
    """Scaled dot-product attention.

    q: (B, s_q, nh, hd); k, v: (s_k, B, nkv, hd), the cache layout (positions first, so appending a
    token is one contiguous write); allowed: (B, 1, s_q, s_k) bool. nh may be a multiple of nkv
    (grouped-query attention). Returns (B, s_q, nh, hd). Soft-capped scores take the matmul path (no fused
    kernel caps them).
    """
    if scores.softcap is not None:
        return _in_query_chunks(_attend_matmul, q, k.shape[0], (allowed, None), None, None, k, v, scores)
    return _in_query_chunks(_attend, q, k.shape[0], (allowed,), k, v, scores.scale)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
            allowed: torch.Tensor) -> torch.Tensor:
    q = q.transpose(1, 2)      # (B, nh, s_q, hd)
    k = k.permute(1, 2, 0, 3)  # (B, nkv, s_k, hd)
    v = v.permute(1, 2, 0, 3)
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    enable_gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=enable_gqa, scale=scale)
    return out.transpose(1, 2)  # (B, s_q, nh, hd)


def attend_with_prefix(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, allowed: torch.Tensor, prefix_allowed: torch.Tensor | None,
                       scores: ScoreRule = STANDARD_SCORES) -> torch.Tensor:
    """Attention over a prefix shared by every sequence of the batch, then each sequence's own keys.

    q: (B, s_q, nh, hd); prefix_k, prefix_v: (P, nkv, hd), one copy for the whole batch; k, v: (s_k, B,
    nkv, hd) and allowed: (B, 1, s_q, s_k) as in `attend`, where each query sees at least itself;
    prefix_allowed: (B, 1, s_q, P) bool, or None when every query sees every prefix key. The result is
    one softmax over [prefix keys] + [own keys]. Every query of the batch meets the prefix in one
    product per KV head (Hydragen, Juravsky et al. 2024), so the prefix is read once, not once per
    sequence, and a KV head's group of query heads are rows of one product (no K/V copy per head).
    """
    if prefix_k.dtype != q.dtype:
        prefix_k, prefix_v, k, v = prefix_k.to(q.dtype), prefix_v.to(q.dtype), k.to(q.dtype), v.to(q.dtype)
    if q.device.type == "cpu" and prefix_allowed is None and _FLASH_CPU is not None and scores.softcap is None:
        return _attend_with_prefix_merged(q, prefix_k, prefix_v, k, v, allowed, scores.scale)
    return _in_query_chunks(_attend_matmul, q, prefix_k.shape[0] + k.shape[0], (allowed, prefix_allowed),
                            prefix_k, prefix_v, k, v, scores)


def _query_rows(q: torch.Tensor, nkv: int) -> torch.Tensor:
    """(B, s_q, nh, hd) -> (B, nkv, s_q * g, hd): a KV head's queries, ordered (query, head of its group)."""
    batch, s_q, nh, hd = q.shape
    return q.view(batch, s_q, nkv, nh // nkv, hd).transpose(1, 2).reshape(batch, nkv, s_q * (nh // nkv), hd)


def _row_mask(allowed: torch.Tensor, group: int) -> torch.Tensor:
    """(B, 1, s_q, n) -> (B, 1, s_q * g, n), each query's row repeated for the heads of its group."""
    batch, _, s_q, n = allowed.shape
    return allowed[:, :, :, None].expand(-1, -1, -1, group, -1).reshape(batch, 1, s_q * group, n)


def _from_query_rows(out: torch.Tensor, q_shape) -> torch.Tensor:
    """(B, nkv, s_q * g, hd) -> (B, s_q, nh, hd)."""
    batch, s_q, nh, hd = q_shape
    nkv = out.shape[1]
    return out.reshape(batch, nkv, s_q, nh // nkv, hd).transpose(1, 2).reshape(batch, s_q, nh, hd)


def _attend_matmul(q, prefix_k, prefix_v, k, v, scores: ScoreRule, allowed, prefix_allowed) -> torch.Tensor:
    """Scores over [prefix] + [own keys] (no prefix when `prefix_k` is None) in one tensor, soft-capped when
    the rule says so, one float32 softmax, a product back per part."""
    batch, s_q, nh, hd = q.shape
    nkv = k.shape[2]
    num_prefix = 0 if prefix_k is None else prefix_k.shape[0]
    group, rows = nh // nkv, s_q * (nh // nkv)
    scale = hd ** -0.5 if scores.scale is None else scores.scale
    q_rows = _query_rows(q * scale, nkv)  # scaled once here: q has fewer elements than the scores
    # The cache's (s_k, B, nkv, hd) read as (B, nkv, hd, s_k) and (B, nkv, s_k, hd): strided views.
    logits = torch.matmul(q_rows, k.permute(1, 2, 3, 0))  # (B, nkv, rows, s_k)
    if prefix_k is not None:
        # (nkv, B * rows, hd) @ (nkv, hd, P): every query of the batch against the prefix.
        prefix_scores = torch.bmm(q_rows.transpose(0, 1).reshape(nkv, batch * rows, hd), prefix_k.permute(1, 2, 0))
        prefix_scores = prefix_scores.view(nkv, batch, rows, num_prefix).transpose(0, 1)  # (B, nkv, rows, P)
        logits = torch.cat((prefix_scores, logits), dim=-1)
    soft_cap_(logits, scores.softcap)
    if prefix_allowed is not None:
        logits[..., :num_prefix].masked_fill_(~_row_mask(prefix_allowed, group), float("-inf"))
    logits[..., num_prefix:].masked_fill_(~_row_mask(allowed, group), float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs[..., num_prefix:], v.permute(1, 2, 0, 3))  # (B, nkv, rows, hd)
    if prefix_k is not None:
        prefix_probs = probs[..., :num_prefix].transpose(0, 1).reshape(nkv, batch * rows, num_prefix)
        prefix_out = torch.bmm(prefix_probs, prefix_v.transpose(0, 1)).view(nkv, batch, rows, hd).transpose(0, 1)
        out = prefix_out + out
    return _from_query_rows(out, q.shape)


def _flash_cpu_op():
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    except (AttributeError, RuntimeError):  # not in this torch build: the matmul path serves
        return None


# PyTorch's fused CPU attention kernel, which also returns each query's log-sum-exp of scores (the
# public scaled_dot_product_attention does not).
_FLASH_CPU = _flash_cpu_op()


def _attend_with_prefix_merged(q, prefix_k, prefix_v, k, v, allowed, scale: float | None) -> torch.Tensor:
    """On the CPU: the prefix part and the own part each through the fused attention kernel, merged by
    their log-sum-exps, o = sum_i o_i * exp(lse_i - logaddexp(lse_1, lse_2)), which is the one softmax
    over both key sets. No (queries x keys) score tensor is materialised: several times faster in a
    prompt pass than scores, mask and softmax as separate passes. Needs every query to see at least
    one key of each part: all prefix keys (no `prefix_allowed`) and itself among its own keys."""
    batch, s_q, nh, hd = q.shape
    nkv = prefix_k.shape[1]
    group, rows = nh // nkv, s_q * (nh // nkv)
    q_rows = _query_rows(q, nkv)  # (B, nkv, rows, hd)
    prefix_out, prefix_lse = _FLASH_CPU(q_rows.transpose(0, 1).reshape(1, nkv, batch * rows, hd),
                                        prefix_k.transpose(0, 1)[None], prefix_v.transpose(0, 1)[None], scale=scale)
    prefix_out = prefix_out.view(nkv, batch, rows, hd).transpose(0, 1)  # (B, nkv, rows, hd)
    prefix_lse = prefix_lse.view(nkv, batch, rows).transpose(0, 1)
    bias = torch.zeros((batch, 1, rows, k.shape[0]), dtype=q.dtype).masked_fill_(~_row_mask(allowed, group),
                                                                                   float("-inf"))
    own_out, own_lse = _FLASH_CPU(q_rows, k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), attn_mask=bias, scale=scale)
    lse = torch.logaddexp(prefix_lse, own_lse)  # float32
    out = (prefix_out.float() * (prefix_lse - lse).exp()[..., None]
           + own_out.float() * (own_lse - lse).exp()[..., None])
    return _from_query_rows(out.to(q.dtype), q.shape)
