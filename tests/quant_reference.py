"""An independent implementation of the paper's group-wise quantisation, in numpy, for references.

Written from the format's description (flexgen_core/compression.py's docstring and the FlexGen paper,
Sec. 5), not from its code: per group of `group_size` consecutive elements along one axis, min-max
asymmetric codes in [0, 2**bits - 1]; scale = (max - min) / (2**bits - 1) and min stored in float16,
each rounded toward -inf; codes chosen against the stored scale and min by round-half-to-even of
(x - min) * (1 / scale); a short last group is padded with its last element. IEEE float32
arithmetic throughout, so the codes equal the engine's bit for bit on every CPU.

The paper's settings are pinned here, independently of flexgen_core.memory: 4 bits, groups of 64,
weights grouped along the output channel (dim 0), the KV cache along the head dimension (last).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PAPER_BITS = 4
PAPER_GROUP = 64
WEIGHT_AXIS = 0  # output channel of an (out, in) matrix
CACHE_AXIS = -1  # head_dim of (..., heads, head_dim)


def _round_down_fp16(values: np.ndarray) -> np.ndarray:
    """The largest float16 at or below each float32 value."""
    rounded = values.astype(np.float16)  # round to nearest even
    above = rounded.astype(np.float32) > values
    return np.where(above, np.nextafter(rounded, np.float16(-np.inf)), rounded)


@dataclass
class Quantised:
    """Codes (..., N, group) uint8, scale and min (..., N) float16, with the grouped axis moved last."""

    codes: np.ndarray
    scale: np.ndarray
    minimum: np.ndarray
    length: int  # real elements along the grouped axis

    def decode(self) -> np.ndarray:
        """(..., length) float32: min + code * scale."""
        values = self.minimum[..., None].astype(np.float32) + self.codes.astype(np.float32) * self.scale[..., None].astype(np.float32)
        return values.reshape(*values.shape[:-2], -1)[..., :self.length]

    def packed(self) -> np.ndarray:
        """4-bit codes two per byte, the even-indexed one in the low nibble: (..., N, group // 2)."""
        assert self.codes.shape[-1] % 2 == 0
        return (self.codes[..., 0::2] | (self.codes[..., 1::2] << 4)).astype(np.uint8)


def quantise(x: np.ndarray, bits: int = PAPER_BITS, group_size: int = PAPER_GROUP, axis: int = CACHE_AXIS) -> Quantised:
    x = np.moveaxis(np.asarray(x, dtype=np.float32), axis, -1)  # (..., G)
    length = x.shape[-1]
    num_groups = -(-length // group_size)
    pad = num_groups * group_size - length
    if pad:
        x = np.concatenate([x, np.repeat(x[..., -1:], pad, axis=-1)], axis=-1)
    groups = x.reshape(*x.shape[:-1], num_groups, group_size)  # (..., N, group)
    lo, hi = groups.min(axis=-1), groups.max(axis=-1)
    max_code = np.float32(2**bits - 1)
    scale = _round_down_fp16((hi - lo) / max_code)
    minimum = _round_down_fp16(lo)
    scale32 = scale.astype(np.float32)
    with np.errstate(divide="ignore"):
        inverse = np.where(scale32 == 0, np.float32(0), np.float32(1) / scale32)
    codes = np.rint((groups - minimum[..., None].astype(np.float32)) * inverse[..., None])
    codes = np.clip(codes, 0, max_code).astype(np.uint8)
    return Quantised(codes, scale, minimum, length)


def unpack(data: np.ndarray) -> np.ndarray:
    """Stored 4-bit data (..., N, group // 2) -> codes (..., N, group)."""
    codes = np.empty((*data.shape[:-1], data.shape[-1] * 2), dtype=np.uint8)
    codes[..., 0::2] = data & 0x0F
    codes[..., 1::2] = data >> 4
    return codes


def quantise_weight(weight: torch.Tensor) -> torch.Tensor:
    """A 2-D weight as the paper stores it, decoded back (float32, same shape)."""
    q = quantise(weight.detach().float().numpy(), axis=WEIGHT_AXIS)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(q.decode(), -1, WEIGHT_AXIS)))


def quantised_weights_model(model):
    """A copy of `model` whose matrices went through the paper's 4-bit weight quantisation.

    Mixture-of-experts layers hold their experts as 3-D tensors in transformers (E, 2F, H) for the fused
    gate and up projections, (E, H, F) for down; checkpoints, and so the engine, hold one matrix per
    expert and projection: each is quantised as the matrix it is stored as."""
    import copy

    quantised = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in quantised.named_parameters():  # tied embeddings are one parameter: quantised once
            if param.dim() == 2:
                param.copy_(quantise_weight(param.data))
            elif param.dim() == 3 and name.endswith("gate_up_proj"):
                for expert in param:
                    gate, up = expert.chunk(2, dim=0)
                    gate.copy_(quantise_weight(gate))
                    up.copy_(quantise_weight(up))
            elif param.dim() == 3 and name.endswith("down_proj"):
                for expert in param:
                    expert.copy_(quantise_weight(expert))
            elif param.dim() > 2:
                raise AssertionError(f"no quantisation rule for {name} {tuple(param.shape)}")
    return quantised
