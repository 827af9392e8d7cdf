"""Tests for flexgen_core/compression.py: group-wise min-max quantisation and its byte accounting."""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from flexgen_core.compression import (
    CompressedMeta,
    CompressedTensor,
    CompressionConfig,
    compress,
    compressed_nbytes,
    decompress,
)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ODD_SHAPES = ((3, 70, 5), (1,), (129,), (2, 1, 3, 65))
# Unit roundoff (half an ulp of 1.0) of each output dtype.
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}


def fp16_rounding_bound(values: torch.Tensor) -> torch.Tensor:
    """Largest |fp16(v) - v| for v within fp16 range: 2^-11 relative, or 2^-25 (half the smallest subnormal)."""
    return torch.maximum(values.abs() * 2.0**-11, torch.full_like(values, 2.0**-25))


def reference_group_range(x: torch.Tensor, config: CompressionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element, the float64 min and max of the real elements of its group.

    Independent of the implementation: it moves the grouped dimension last and pads with +-inf.
    """
    x64 = x.double().reshape(x.shape or (1,))
    x64 = x64.movedim(config.group_dim, -1)  # (..., G)
    group_len, group_size = x64.shape[-1], config.group_size
    num_groups = -(-group_len // group_size)
    pad = num_groups * group_size - group_len

    def per_element(padded: torch.Tensor, reduce) -> torch.Tensor:
        stats = reduce(padded.unflatten(-1, (num_groups, group_size)), -1)  # (..., N)
        return stats.repeat_interleave(group_size, -1)[..., :group_len].movedim(-1, config.group_dim)

    lo = per_element(F.pad(x64, (0, pad), value=math.inf), torch.amin)
    hi = per_element(F.pad(x64, (0, pad), value=-math.inf), torch.amax)
    return lo.reshape(x.shape), hi.reshape(x.shape)


def error_bound(x: torch.Tensor, config: CompressionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element, (allowed |decompress(compress(x)) - x|, quantisation step of its group).

    Derivation. Asymmetric: step = (max - min) / (2^b - 1). The stored scale s and min m are step and
    min rounded down to fp16 (so m + (2^b - 1)s <= max and nothing decodes past the group's range), each
    at most one fp16 ulp, i.e. 2 * fp16_rounding_bound, below the true value. Codes are chosen against
    s and m: inside [m, m + (2^b - 1)s] the nearest code is within s/2 <= step/2; above it (clamped to
    the top code) the miss is at most (min - m) + (2^b - 1)(step - s); nothing lies below m <= min. So
        |err| <= step/2 + 2 * fp16_rounding_bound(min) + 2 (2^b - 1) fp16_rounding_bound(step).
    Symmetric: step = max|x| / B with B = 2^(b-1) - 1, no min: the same with B and without the min
    term. Decoding computes q*s (+ m) in the output dtype with at most two roundings, each at most
    u * |operand| with u the output dtype's unit roundoff: 2u(|x| + |min| + step) covers both.
    Finally 2^-24 absolute (fp16 subnormal output) and 2^-20 * step for ties that fp32 rounding can
    send to the other code. For random data in fp16/fp32 with 4 bits this stays below 0.52 step, so a
    code off by one is caught (see test_error_bound_catches_a_code_off_by_one).
    """
    lo, hi = reference_group_range(x, config)
    if config.symmetric:
        max_code = 2 ** (config.num_bits - 1) - 1
        step = torch.maximum(-lo, hi) / max_code
        min_error = torch.zeros_like(lo)
    else:
        max_code = 2**config.num_bits - 1
        step = (hi - lo) / max_code
        min_error = 2 * fp16_rounding_bound(lo)
    unit = UNIT_ROUNDOFF[x.dtype]
    bound = (
        step / 2
        + 2 * max_code * fp16_rounding_bound(step)
        + min_error
        + 2 * unit * (x.double().abs() + lo.abs() + step)
        + 2.0**-24
        + step * 2.0**-20
    )
    return bound, step


def assert_round_trip(x: torch.Tensor, config: CompressionConfig) -> CompressedTensor:
    compressed = compress(x, config)
    y = decompress(compressed)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert_within_bound(x, y, config)
    return compressed


def assert_within_bound(x: torch.Tensor, y: torch.Tensor, config: CompressionConfig) -> None:
    x, y = x.cpu(), y.cpu()
    bound, _ = error_bound(x, config)
    error = (y.double() - x.double()).abs()
    worst = int(torch.argmax(error - bound)) if x.numel() else 0
    assert bool((error <= bound).all()), (
        f"{config} {tuple(x.shape)} {x.dtype}: element {worst} off by {error.flatten()[worst]:.3g}, "
        f"allowed {bound.flatten()[worst]:.3g}"
    )


def test_4bit_group64_meets_paper_ratio_and_error_bound():
    torch.manual_seed(0)
    x = torch.randn(256, 192, dtype=torch.float16)
    for group_dim in (0, 1):
        config = CompressionConfig(num_bits=4, group_size=64, group_dim=group_dim, symmetric=False)
        compressed = assert_round_trip(x, config)
        # Per element: half a byte of code plus 4 bytes (scale, min) per 64 elements = 0.5625 of 2 bytes.
        assert compressed.nbytes == x.numel() * (0.5 + 4 / 64)
        assert compressed.nbytes <= 0.30 * x.numel() * x.element_size()
        assert compressed.data.dtype == torch.uint8
        assert compressed.scale.dtype == torch.float16 and compressed.min.dtype == torch.float16


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_bits", (4, 8))
@pytest.mark.parametrize("symmetric", (False, True), ids=("asym", "sym"))
@pytest.mark.parametrize("group_size", (64, 7, 1))
def test_round_trip_odd_shapes_every_group_dim(dtype, num_bits, symmetric, group_size):
    torch.manual_seed(1)
    for shape in ODD_SHAPES:
        x = (torch.randn(shape) * 3 + 0.5).to(dtype)
        for group_dim in range(-len(shape), len(shape)):
            config = CompressionConfig(num_bits, group_size, group_dim, symmetric)
            assert_round_trip(x, config)


def test_scalar_and_empty_tensors():
    config = CompressionConfig()
    scalar = torch.tensor(1.5)
    assert_round_trip(scalar, config)
    assert decompress(compress(scalar, config)).shape == ()
    empty = torch.randn(3, 0, 4)
    y = decompress(compress(empty, CompressionConfig(group_dim=1)))
    assert y.shape == (3, 0, 4) and y.dtype == empty.dtype


def test_error_bound_catches_a_code_off_by_one():
    """The tolerance is tight: one 4-bit code moved by one step, away from its value, must break it."""
    torch.manual_seed(2)
    x = torch.randn(128, 64, dtype=torch.float32)
    config = CompressionConfig(num_bits=4, group_size=64, group_dim=0)
    compressed = assert_round_trip(x, config)
    bound, step = error_bound(x, config)
    assert bool((bound < 0.55 * step).all())
    # Element (0, 0) is code 0 of group (0, column 0): the low nibble of the first byte.
    data = compressed.data.clone()
    code = int(data[0, 0]) & 0x0F
    assert 1 <= code <= 14, "the seed should give an interior code"
    below = bool(x[0, 0] >= decompress(compressed)[0, 0])  # then moving down misses by >= one step
    data[0, 0] = (int(data[0, 0]) & 0xF0) | (code - 1 if below else code + 1)
    broken = CompressedTensor.from_tensors(compressed.meta(), {**compressed.tensors(), "data": data})
    error = (decompress(broken) - x).abs()
    assert error[0, 0] > bound[0, 0]
    assert bool((error.flatten()[1:] <= bound.flatten()[1:]).all())


def test_padding_does_not_widen_last_group():
    # 70 = 64 + 6: the last group holds 6 real values in [10, 10.5]; padding with anything outside that
    # range (zeros, say) would widen the group's scale from 0.5/15 to more than 10/15.
    x = torch.cat((torch.randn(64), torch.linspace(10.0, 10.5, 6)))
    config = CompressionConfig(num_bits=4, group_size=64, group_dim=0)
    compressed = assert_round_trip(x, config)
    assert compressed.scale.shape == (2,)
    assert compressed.scale[1].item() == pytest.approx(0.5 / 15, rel=2**-10)
    assert compressed.min[1].item() == pytest.approx(10.0, rel=2**-10)


@pytest.mark.parametrize("num_bits", (4, 8))
@pytest.mark.parametrize("symmetric", (False, True), ids=("asym", "sym"))
def test_fp16_extremes_do_not_overflow(num_bits, symmetric):
    # Groups that reach +-65504 (the fp16 maximum) and span more than 65504. group_dim=-1 puts the
    # scale on the innermost loop (the CPU two-pass decode), group_dim=0 does not.
    torch.manual_seed(8)
    x = torch.randn(4, 64) * 100
    x[0, :2] = torch.tensor([-65504.0, 65504.0])  # span 131008
    x[1, :2] = torch.tensor([65000.0, 65504.0])  # min rounds up in fp16 under round-to-nearest
    x[2, :] = 65504.0
    x = x.to(torch.float16)
    for group_dim in (-1, 0):
        config = CompressionConfig(num_bits, 64, group_dim, symmetric)
        y = decompress(compress(x, config))
        assert bool(torch.isfinite(y).all()), config
        assert_round_trip(x, config)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_bits", (4, 8))
def test_constant_groups_round_trip_exactly(dtype, num_bits):
    # Constants representable in fp16 (the stored min); the last group along dim 1 is padded (70 = 64 + 6).
    values = torch.tensor([0.0, -3.25, 1.0, 65504.0, 2.0**-14, -0.1], dtype=torch.float16).to(dtype)
    x = values[:, None].expand(6, 70).contiguous()  # every row constant
    for group_dim in (1, -1):
        config = CompressionConfig(num_bits=num_bits, group_size=64, group_dim=group_dim)
        assert torch.equal(decompress(compress(x, config)), x)
    # Symmetric: all-zero groups are exact; other constants come back within the error bound.
    symmetric = CompressionConfig(num_bits=num_bits, group_size=64, group_dim=1, symmetric=True)
    zeros = torch.zeros(3, 70, dtype=dtype)
    assert torch.equal(decompress(compress(zeros, symmetric)), zeros)
    assert_round_trip(x, symmetric)


def test_symmetric_stores_no_min_and_spans_plus_minus_max():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0])
    config = CompressionConfig(num_bits=4, group_size=8, group_dim=0, symmetric=True)
    compressed = assert_round_trip(x, config)
    assert compressed.min is None and set(compressed.tensors()) == {"data", "scale"}
    assert compressed.scale.item() == pytest.approx(2.0 / 7, rel=2**-10)
    assert decompress(compressed)[0].item() == pytest.approx(-2.0, rel=2**-10)


@pytest.mark.parametrize("num_bits", (4, 8))
@pytest.mark.parametrize("symmetric", (False, True), ids=("asym", "sym"))
def test_compressed_nbytes_matches_compress(num_bits, symmetric):
    shapes = ((), (0,), (1,), (129,), (64,), (3, 0, 4), (3, 70, 5), (2, 1, 3, 65), (128, 64))
    for group_size in (1, 3, 64, 100):
        for shape in shapes:
            ndim = max(len(shape), 1)
            for group_dim in range(-ndim, ndim):
                config = CompressionConfig(num_bits, group_size, group_dim, symmetric)
                x = torch.zeros(shape, dtype=torch.bfloat16)
                assert compressed_nbytes(shape, config) == compress(x, config).nbytes, (shape, config)


def test_compressed_nbytes_hand_computed():
    # (128, 64) grouped on dim 0 by 64: 2 groups x 64 columns; 4 bits -> 128*64/2 bytes of codes.
    assert compressed_nbytes((128, 64), CompressionConfig(4, 64, 0, False)) == 4096 + 2 * 64 * 2 * 2
    assert compressed_nbytes((128, 64), CompressionConfig(4, 64, 0, True)) == 4096 + 2 * 64 * 2
    assert compressed_nbytes((128, 64), CompressionConfig(8, 64, 1, False)) == 8192 + 128 * 2 * 2
    # (5,) by 3, 4 bits: groups of 3 codes take 2 bytes each (the padded group included).
    assert compressed_nbytes((5,), CompressionConfig(4, 3, 0, False)) == 2 * 2 + 2 * 2 * 2


def test_with_group_dim_replaces_only_the_dim():
    config = CompressionConfig(num_bits=8, group_size=32, group_dim=0, symmetric=True)
    assert config.with_group_dim(-1) == CompressionConfig(num_bits=8, group_size=32, group_dim=-1, symmetric=True)
    with pytest.raises(ValueError, match="group_dim"):
        config.with_group_dim(1.0)


def test_compressed_nbytes_needs_no_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "from flexgen_core.compression import CompressionConfig, compressed_nbytes\n"
        "print(compressed_nbytes((128, 64), CompressionConfig()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(4096 + 512)


def test_tensors_meta_round_trip():
    torch.manual_seed(3)
    x = torch.randn(3, 70, 5, dtype=torch.bfloat16)
    for symmetric in (False, True):
        compressed = compress(x, CompressionConfig(4, 64, 1, symmetric))
        meta = compressed.meta()
        assert pickle.loads(pickle.dumps(meta)) == meta
        meta_via_json = CompressedMeta.from_dict(json.loads(json.dumps(meta.to_dict())))
        assert meta_via_json == meta
        parts = {name: t.clone() for name, t in compressed.tensors().items()}
        rebuilt = CompressedTensor.from_tensors(meta_via_json, parts)
        assert rebuilt.dtype == torch.bfloat16 and rebuilt.shape == (3, 70, 5)
        assert rebuilt.nbytes == compressed.nbytes == sum(t.nbytes for t in parts.values())
        assert torch.equal(decompress(rebuilt), decompress(compressed))
        moved = compressed.to("cpu")
        assert moved.device == torch.device("cpu") and torch.equal(decompress(moved), decompress(compressed))


def test_from_tensors_rejects_mismatched_parts():
    compressed = compress(torch.randn(3, 70), CompressionConfig(group_dim=1))
    meta, parts = compressed.meta(), compressed.tensors()
    with pytest.raises(ValueError, match="keys"):
        CompressedTensor.from_tensors(meta, {"data": parts["data"], "scale": parts["scale"]})
    with pytest.raises(ValueError, match="'data'"):
        CompressedTensor.from_tensors(meta, {**parts, "data": parts["data"][:, :1]})
    with pytest.raises(ValueError, match="'scale'"):
        CompressedTensor.from_tensors(meta, {**parts, "scale": parts["scale"].float()})


def test_leading_dims_slice_like_the_tensor():
    """Dimensions before group_dim survive in every stored part, so a slice there is a slice of each."""
    torch.manual_seed(4)
    cache = torch.randn(10, 4, 128, dtype=torch.float16)  # (tokens, heads, head_dim)
    config = CompressionConfig(num_bits=4, group_size=64, group_dim=-1)
    whole, part = compress(cache, config), compress(cache[3:7], config)
    for name, tensor in part.tensors().items():
        assert torch.equal(whole.tensors()[name][3:7], tensor), name


def test_decompress_into_out_and_input_untouched():
    torch.manual_seed(5)
    for shape, config in (((64, 128), CompressionConfig()), ((3, 70, 5), CompressionConfig(group_dim=1))):
        x = torch.randn(shape)
        original = x.clone()
        compressed = compress(x, config)
        assert torch.equal(x, original)
        expected = decompress(compressed)
        out = torch.empty_like(x)
        assert decompress(compressed, out=out) is out and torch.equal(out, expected)
        strided = torch.empty(tuple(reversed(shape))).permute(*reversed(range(len(shape))))
        assert decompress(compressed, out=strided) is strided and torch.equal(strided, expected)
        with pytest.raises(ValueError, match="out must be"):
            decompress(compressed, out=torch.empty(shape, dtype=torch.float16))


def test_non_contiguous_input():
    torch.manual_seed(6)
    x = torch.randn(70, 3).t()  # (3, 70), not contiguous
    assert_round_trip(x, CompressionConfig(group_dim=1))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    (
        ({"num_bits": 3}, "num_bits"),
        ({"num_bits": 16}, "num_bits"),
        ({"num_bits": True}, "num_bits"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": -64}, "group_size"),
        ({"group_size": 2.5}, "group_size"),
        ({"group_dim": "0"}, "group_dim"),
        ({"symmetric": 1}, "symmetric"),
    ),
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CompressionConfig(**kwargs)


@pytest.mark.parametrize("group_dim", (2, -3))
def test_group_dim_out_of_range(group_dim):
    config = CompressionConfig(group_dim=group_dim)
    with pytest.raises(ValueError, match="group_dim"):
        compress(torch.zeros(3, 4), config)
    with pytest.raises(ValueError, match="group_dim"):
        compressed_nbytes((3, 4), config)


def test_integer_input_rejected():
    with pytest.raises(ValueError, match="floating-point"):
        compress(torch.zeros(4, dtype=torch.int32), CompressionConfig())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("symmetric", (False, True), ids=("asym", "sym"))
@pytest.mark.parametrize("num_bits", (4, 8))
def test_cuda_round_trip_and_transfer(num_bits, symmetric):
    torch.manual_seed(7)
    x = torch.randn(3, 70, 130, dtype=torch.float16)
    for group_dim in (0, 1, -1):
        config = CompressionConfig(num_bits, 64, group_dim, symmetric)
        on_gpu = assert_round_trip(x.cuda(), config)
        assert on_gpu.device.type == "cuda" and all(t.is_cuda for t in on_gpu.tensors().values())
        # Compressed on one side, decoded on the other. (CPU and CUDA may decode 1 ulp apart: on CPU,
        # group_dim=-1 multiplies and adds in two passes; CUDA fuses them.)
        on_cpu = compress(x, config)
        assert_within_bound(x, decompress(on_cpu.to("cuda", non_blocking=True)), config)
        back = on_gpu.to("cpu")
        assert back.device.type == "cpu" and back.nbytes == on_gpu.nbytes
        assert_within_bound(x, decompress(back), config)
