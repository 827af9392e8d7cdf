"""Group-wise min-max quantisation of weights and the KV cache (FlexGen paper, Sec. 5 "Approximate methods").

A tensor is cut into groups of `group_size` consecutive elements along one dimension, `group_dim`
(the paper: 4 bits, group 64; weights grouped along the output channel, the KV cache along the head
dimension). Each group is quantised on its own range:

- asymmetric: per group `min` and `scale = (max - min) / (2**bits - 1)`; code `q` in [0, 2**bits - 1]
  decodes to `min + q * scale`.
- symmetric: per group `scale = max(|x|) / (2**(bits-1) - 1)` only; code `q` in [-B, B] with
  `B = 2**(bits-1) - 1` decodes to `q * scale`, so values span [-max|x|, max|x|].

`scale` and `min` are stored in float16 whatever the input dtype, rounded down (toward -inf) so that
no decoded value lies outside its group's [min, max]: fp16 data up to +-65504 decodes without
overflow. Codes are chosen against the stored, rounded scale and min. Inputs must be finite and within
float16 range; larger values (possible in bf16/fp32) make the stored min -inf or saturate the scale.
Each element then decodes to within half a quantisation step plus the fp16 rounding of scale and min
(the bound is derived in tests/test_compression.py).

Layout. Write the input shape as (*outer, G, *inner) with G the size of `group_dim`, and let
O = prod(outer), I = prod(inner), N = ceil(G / group_size). The grouped dimension is padded to
N * group_size by repeating its last real element (which lies in the last group, so no group's min or
max changes); the tensor is then viewed, without moving any dimension, as (O, N, group_size, I), and
each group is the group_size * I block of one (o, n): group_size consecutive positions along
`group_dim`, for each of the I inner positions, every inner position with its own scale (and min).

- `data`: uint8, shape (*outer, N, bytes_per_group) with
  bytes_per_group = ceil(group_size * I * bits / 8). The group's codes are taken in (group_size, I)
  row-major order; 8 bits store one code per byte, 4 bits two per byte, the even-indexed code in the
  low nibble and the odd-indexed one in the high nibble (a zero nibble completes an odd count).
  Asymmetric codes are unsigned; symmetric codes are two's complement (int8 / signed nibble).
- `scale`, `min`: float16, shape (*outer, N, *inner).

Because the leading `outer` dimensions survive in `data`, `scale` and `min`, a slice along any
dimension before `group_dim` (e.g. token positions of a cache grouped on the head dim) is the same
slice of each stored part. `compressed_nbytes` gives the stored size from the shape alone, without
torch, for the memory accounting and the planner.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:  # torch is imported lazily so that `compressed_nbytes` works without it.
    import torch

_SUPPORTED_BITS = (4, 8)
_SCALE_ITEMSIZE = 2  # scale and min are float16


@dataclass(frozen=True)
class CompressionConfig:
    """How to quantise: bits per value, group length, grouped dimension, symmetric or not."""

    num_bits: int = 4
    group_size: int = 64
    group_dim: int = 0
    symmetric: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.num_bits, bool) or self.num_bits not in _SUPPORTED_BITS:
            raise ValueError(f"CompressionConfig.num_bits must be one of {_SUPPORTED_BITS}, got {self.num_bits!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"CompressionConfig.group_size must be an integer >= 1, got {self.group_size!r}")
        if isinstance(self.group_dim, bool) or not isinstance(self.group_dim, int):
            raise ValueError(f"CompressionConfig.group_dim must be an integer, got {self.group_dim!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"CompressionConfig.symmetric must be a bool, got {self.symmetric!r}")

    def with_group_dim(self, group_dim: int) -> CompressionConfig:
        """This config grouped along `group_dim` (each weight names its own grouped dimension)."""
        return dataclasses.replace(self, group_dim=group_dim)


@dataclass(frozen=True)
class _Layout:
    """Where the groups lie in a tensor of a given shape (see the module docstring)."""

    outer_shape: tuple[int, ...]
    inner_shape: tuple[int, ...]
    group_len: int  # G: real elements along group_dim
    num_groups: int  # N = ceil(G / group_size)
    group_size: int
    bytes_per_group: int

    @property
    def outer(self) -> int:
        return math.prod(self.outer_shape)

    @property
    def inner(self) -> int:
        return math.prod(self.inner_shape)

    @property
    def padded_len(self) -> int:
        return self.num_groups * self.group_size

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (*self.outer_shape, self.num_groups, self.bytes_per_group)

    @property
    def scale_shape(self) -> tuple[int, ...]:
        return (*self.outer_shape, self.num_groups, *self.inner_shape)


def _layout(shape: Sequence[int], config: CompressionConfig) -> _Layout:
    shape = tuple(int(size) for size in shape)
    if any(size < 0 for size in shape):
        raise ValueError(f"shape must have non-negative sizes, got {shape}")
    # Like torch, a 0-d tensor accepts dim 0 and -1; it is treated as shape (1,).
    ndim = max(len(shape), 1)
    if not -ndim <= config.group_dim < ndim:
        raise ValueError(
            f"CompressionConfig.group_dim={config.group_dim} is out of range for a tensor of shape {shape} "
            f"(allowed: {-ndim}..{ndim - 1})"
        )
    dims = shape or (1,)
    group_dim = config.group_dim % ndim
    inner_shape = dims[group_dim + 1 :]
    group_len = dims[group_dim]
    codes_per_group = config.group_size * math.prod(inner_shape)
    return _Layout(
        outer_shape=dims[:group_dim],
        inner_shape=inner_shape,
        group_len=group_len,
        num_groups=-(-group_len // config.group_size),
        group_size=config.group_size,
        bytes_per_group=-(-codes_per_group * config.num_bits // 8),
    )


def stored_parts(shape: Sequence[int], config: CompressionConfig) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype name, shape) of each tensor `compress` stores for an input of `shape`, without torch."""
    layout = _layout(shape, config)
    parts = [("data", "uint8", layout.data_shape), ("scale", "float16", layout.scale_shape)]
    if not config.symmetric:
        parts.append(("min", "float16", layout.scale_shape))
    return parts


def compressed_nbytes(shape: Sequence[int], config: CompressionConfig) -> int:
    """Bytes that `compress` stores for a tensor of `shape`: packed codes plus float16 scales (and mins).

    Independent of the input dtype; equals `compress(t, config).nbytes` for every `t` of that shape.
    """
    layout = _layout(shape, config)
    num_scales = layout.outer * layout.num_groups * layout.inner
    per_scale = _SCALE_ITEMSIZE * (1 if config.symmetric else 2)
    return layout.outer * layout.num_groups * layout.bytes_per_group + num_scales * per_scale


@dataclass(frozen=True)
class CompressedMeta:
    """The non-tensor part of a `CompressedTensor`: plain values, picklable and JSON-able via `to_dict`."""

    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float16"
    config: CompressionConfig

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "config": dataclasses.asdict(self.config)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CompressedMeta:
        return cls(tuple(values["shape"]), values["dtype"], CompressionConfig(**values["config"]))


@dataclass(frozen=True, eq=False)
class CompressedTensor:
    """A quantised tensor: packed codes, per-group float16 scale (and min), and what is needed to decode."""

    data: torch.Tensor  # uint8, (*outer, num_groups, bytes_per_group)
    scale: torch.Tensor  # float16, (*outer, num_groups, *inner)
    min: torch.Tensor | None  # float16 like scale; None when config.symmetric
    shape: tuple[int, ...]
    dtype: torch.dtype
    config: CompressionConfig

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def device(self) -> torch.device:
        return self.data.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored parts by name ("data", "scale" and, when asymmetric, "min")."""
        parts = {"data": self.data, "scale": self.scale}
        if self.min is not None:
            parts["min"] = self.min
        return parts

    def meta(self) -> CompressedMeta:
        return CompressedMeta(tuple(self.shape), str(self.dtype).removeprefix("torch."), self.config)

    @classmethod
    def from_tensors(
        cls, meta: CompressedMeta | Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
    ) -> CompressedTensor:
        """Rebuild from `meta()` (or its `to_dict()`) and `tensors()`, e.g. after storage moved the parts."""
        import torch

        if isinstance(meta, Mapping):
            meta = CompressedMeta.from_dict(meta)
        layout = _layout(meta.shape, meta.config)
        expected = {"data": (torch.uint8, layout.data_shape), "scale": (torch.float16, layout.scale_shape)}
        if not meta.config.symmetric:
            expected["min"] = (torch.float16, layout.scale_shape)
        if set(tensors) != set(expected):
            raise ValueError(f"tensors must have keys {sorted(expected)}, got {sorted(tensors)}")
        for name, (dtype, shape) in expected.items():
            tensor = tensors[name]
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise ValueError(
                    f"tensors[{name!r}] must be {dtype} of shape {shape}, "
                    f"got {tensor.dtype} of shape {tuple(tensor.shape)}"
                )
        devices = {tensor.device for tensor in tensors.values()}
        if len(devices) != 1:
            raise ValueError(f"tensors must all be on one device, got {sorted(map(str, devices))}")
        dtype = getattr(torch, meta.dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"meta.dtype must name a torch floating-point dtype, got {meta.dtype!r}")
        return cls(tensors["data"], tensors["scale"], tensors.get("min"), tuple(meta.shape), dtype, meta.config)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CompressedTensor:
        moved = {name: t.to(device, non_blocking=non_blocking) for name, t in self.tensors().items()}
        return dataclasses.replace(self, data=moved["data"], scale=moved["scale"], min=moved.get("min"))


def _to_float16_rounding_down(values: torch.Tensor) -> torch.Tensor:
    """`values` (fp32) to the nearest fp16 at or below each, by stepping the round-to-nearest result."""
    import torch

    rounded = values.to(torch.float16)
    bits = rounded.view(torch.int16)  # sign-magnitude: +1 on a negative moves down, -1 on a positive
    step = torch.where(bits < 0, 1, -1).to(torch.int16)
    return torch.where(rounded.float() > values, bits + step, bits).view(torch.float16)


def compress(tensor: torch.Tensor, config: CompressionConfig) -> CompressedTensor:
    """Quantise `tensor` group-wise; the result lives on `tensor`'s device."""
    import torch

    if not tensor.dtype.is_floating_point:
        raise ValueError(f"compress expects a floating-point tensor, got dtype {tensor.dtype}")
    layout = _layout(tensor.shape, config)
    outer, group_len, inner = layout.outer, layout.group_len, layout.inner
    num_groups, group_size = layout.num_groups, config.group_size
    device = tensor.device
    if tensor.numel() == 0:
        scale = torch.empty(layout.scale_shape, dtype=torch.float16, device=device)
        minimum = None if config.symmetric else torch.empty_like(scale)
        data = torch.empty(layout.data_shape, dtype=torch.uint8, device=device)
        return CompressedTensor(data, scale, minimum, tuple(tensor.shape), tensor.dtype, config)

    x = tensor.reshape(outer, group_len, inner)  # (O, G, I); a view when tensor is contiguous
    pad = layout.padded_len - group_len
    if pad:
        # Repeat the last real element: it is in the last group, so that group's min/max stay the same.
        x = torch.cat((x, x[:, -1:, :].expand(outer, pad, inner)), dim=1)
    x = x.view(outer, num_groups, group_size, inner)  # (O, N, gs, I)
    lo, hi = torch.aminmax(x, dim=2, keepdim=True)  # (O, N, 1, I), exact in the input dtype
    lo, hi = lo.float(), hi.float()

    # Scale and min are rounded down to fp16, so the decoded range [min, min + max_code * scale] stays
    # inside the group's real range: no decoded value can overflow past the input's own extremes.
    if config.symmetric:
        max_code = 2 ** (config.num_bits - 1) - 1
        scale = _to_float16_rounding_down(torch.maximum(-lo, hi) / max_code)
        minimum = None
    else:
        max_code = 2**config.num_bits - 1
        scale = _to_float16_rounding_down((hi - lo) / max_code)  # difference in fp32: may exceed fp16
        minimum = _to_float16_rounding_down(lo)

    # Quantise against the stored (fp16-rounded) scale and min, so codes match what decompress uses.
    scale32 = scale.float()
    inv_scale = scale32.reciprocal().masked_fill_(scale32 == 0, 0.0)  # constant group: every code is 0
    if config.symmetric:
        codes = (x.float() * inv_scale).round_().clamp_(-max_code, max_code)
        codes = codes.to(torch.int8).view(torch.uint8)  # two's complement
    else:
        codes = (x.float() - minimum.float()).mul_(inv_scale).round_().clamp_(0, max_code)
        codes = codes.to(torch.uint8)
    codes = codes.view(outer, num_groups, group_size * inner)  # (O, N, codes_per_group)

    if config.num_bits == 4:
        if codes.shape[-1] % 2:
            codes = torch.nn.functional.pad(codes, (0, 1))
        data = (codes[..., 0::2] & 0x0F) | (codes[..., 1::2] << 4)  # (O, N, bytes_per_group)
    else:
        data = codes
    return CompressedTensor(
        data=data.reshape(layout.data_shape),
        scale=scale.reshape(layout.scale_shape),
        min=None if minimum is None else minimum.reshape(layout.scale_shape),
        shape=tuple(tensor.shape),
        dtype=tensor.dtype,
        config=config,
    )


def decompress(compressed: CompressedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode to a tensor of the original shape and dtype on `compressed.device`.

    `out`, if given, must be a tensor of that shape, dtype and device; it is filled and returned, which
    lets a caller that decompresses every layer reuse one buffer instead of allocating each time.
    """
    import torch

    c = compressed
    config = c.config
    layout = _layout(c.shape, config)
    outer, group_len, inner = layout.outer, layout.group_len, layout.inner
    num_groups, group_size = layout.num_groups, config.group_size
    device = c.data.device
    if out is not None and (tuple(out.shape) != tuple(c.shape) or out.dtype != c.dtype or out.device != device):
        raise ValueError(
            f"out must be {c.dtype} of shape {tuple(c.shape)} on {device}, "
            f"got {out.dtype} of shape {tuple(out.shape)} on {out.device}"
        )
    if math.prod(c.shape) == 0:
        return out if out is not None else torch.empty(c.shape, dtype=c.dtype, device=device)

    # Decode in the output dtype where it holds fp16 scales exactly (fp16, fp32, fp64); else in fp32.
    # On CPU and CUDA, fp16 addcmul computes in fp32 and rounds once.
    compute_dtype = c.dtype if c.dtype in (torch.float16, torch.float32, torch.float64) else torch.float32
    codes_per_group = group_size * inner
    num_codes = outer * num_groups * layout.bytes_per_group * 8 // config.num_bits  # with completing nibbles
    # Direct: the decoded codes are already the result (no padding, no completing nibble, no cast).
    direct = compute_dtype == c.dtype and num_codes == math.prod(c.shape)
    writable_out = out if out is not None and out.is_contiguous() else None
    if direct and writable_out is not None:
        buffer = writable_out.view(-1)
    else:
        buffer = torch.empty(num_codes, dtype=compute_dtype, device=device)

    data = c.data.reshape(outer, num_groups, layout.bytes_per_group)  # (O, N, B)
    if config.num_bits == 4:
        pairs = buffer.view(outer, num_groups, layout.bytes_per_group, 2)  # (O, N, B, 2): low, high nibble
        if config.symmetric:  # sign-extend each nibble with an arithmetic shift of int8
            pairs[..., 0].copy_((data << 4).view(torch.int8) >> 4)
            pairs[..., 1].copy_(data.view(torch.int8) >> 4)
        else:
            pairs[..., 0].copy_(data & 0x0F)
            pairs[..., 1].copy_(data >> 4)
    else:
        buffer.view(data.shape).copy_(data.view(torch.int8) if config.symmetric else data)
    values = buffer.view(outer, num_groups, -1)[..., :codes_per_group]  # drop a completing nibble
    values = values.view(outer, num_groups, group_size, inner)  # (O, N, gs, I)

    scale = c.scale.reshape(outer, num_groups, 1, inner).to(compute_dtype)
    if config.symmetric:
        values.mul_(scale)
    else:
        minimum = c.min.reshape(outer, num_groups, 1, inner).to(compute_dtype)
        # On CPU, addcmul vectorises only if at most one operand is broadcast along the innermost loop;
        # with inner == 1 both min and scale are, and it runs ~5x slower than a multiply and an add.
        # Those round twice and, in fp16, overflow in `code * scale` once a group spans > 65504.
        two_passes = values.device.type == "cpu" and inner == 1
        if two_passes and compute_dtype == torch.float16:
            two_passes = float(c.scale.max()) * (2**config.num_bits - 1) <= torch.finfo(torch.float16).max
        if two_passes:
            values.mul_(scale).add_(minimum)
        else:
            torch.addcmul(minimum, values, scale, out=values)  # one rounding; fp16 math runs in fp32

    if direct:
        result = writable_out if writable_out is not None else buffer.view(c.shape)
    else:
        result = writable_out if writable_out is not None else torch.empty(c.shape, dtype=c.dtype, device=device)
        target = result.view(outer, group_len, inner)  # (O, G, I)
        full_groups = group_len // group_size
        split = full_groups * group_size
        if full_groups:
            target[:, :split].view(outer, full_groups, group_size, inner).copy_(values[:, :full_groups])
        if group_len > split:  # the padded last group: keep its real elements only
            target[:, split:].copy_(values[:, full_groups, : group_len - split])
    if out is not None and result is not out:
        return out.copy_(result)
    return result
