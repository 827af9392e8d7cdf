"""The exact bytes each tier holds (shared by the engine and the planner); where each tensor lives is
placement.py's.

Pure arithmetic: no torch. The engine allocates exactly the buffers these functions describe, and a
test checks the engine's real allocations against `account()`.

Terms (per tier "gpu" = the compute device, "cpu" = host RAM, "disk" = files under the offload dir):
- weights: each layer's weights, split by the policy's weight percentages (midpoint rule below);
- weight_staging: buffers that receive a layer's off-device weights for compute, one per slot
  (2 slots when overlapping, so layer l+1 streams in while layer l computes);
- cache: K and V of every attention layer for every GPU batch of a block, split by KV heads;
- cache_staging: buffers that receive a batch's off-device cache for attention, one per slot;
- activations: the hidden state of every GPU batch between layers, split by batch rows (and a host
  staging buffer for the rows on disk);
- workspace: an upper bound on the transient tensors of one layer's compute on one GPU batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Iterable, Sequence

from flexgen_core.compression import CompressionConfig, compressed_nbytes, stored_parts
from flexgen_core.placement import TIERS, cache_segments, cache_staging_tiers, split_counts, weight_tiers

ALIGN_BYTES = 64  # offsets of tensors packed into one buffer or file

# The dtypes the engine computes in, with their sizes: the one table every part reads.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


# Attention runs in chunks of queries whose (batch x heads x queries x keys) scores, counted as float32
# (the widest dtype a kernel keeps them in), take at most this many bytes (layers.attend): a kernel
# that materialises its scores (PyTorch's math path, the matmul path with a shared prefix) never needs
# more, whichever kernel CUDA picks; workspace_bound counts it.
ATTENTION_CHUNK_BYTES = 64 * 2**20
SCORE_BYTES = 4


def query_chunk(batch: int, num_heads: int, num_queries: int, num_keys: int) -> int:
    """Queries per attention chunk (all of them when their scores fit ATTENTION_CHUNK_BYTES)."""
    per_query = batch * num_heads * num_keys * SCORE_BYTES
    return max(1, min(num_queries, ATTENTION_CHUNK_BYTES // max(per_query, 1)))


# Position-wise layers (the MLP) run in chunks of positions whose intermediate activations, (batch x
# positions x FFN width), take at most this many bytes each (layers.in_token_chunks).
MLP_CHUNK_BYTES = 64 * 2**20


def token_chunk(batch: int, num_tokens: int, width: int, dtype_bytes: int) -> int:
    """Positions per MLP chunk (all of them when their intermediate fits MLP_CHUNK_BYTES)."""
    per_position = batch * width * dtype_bytes
    return max(1, min(num_tokens, MLP_CHUNK_BYTES // max(per_position, 1)))


def align(nbytes: int) -> int:
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


def packed_offsets(sizes: Iterable[int]) -> tuple[list[int], int]:
    """Offsets of tensors packed one after another at ALIGN_BYTES boundaries, and the total size."""
    offsets, end = [], 0
    for size in sizes:
        offsets.append(end)
        end += align(size)
    return offsets, end


@dataclass(frozen=True)
class WeightPlacement:
    """One weight's place: its tier and its stored size in bytes."""

    name: str
    tier: str
    nbytes: int
    part_nbytes: tuple[int, ...] = ()  # sizes of the stored tensors (one, or a compressed weight's parts)


# The paper's compression: 4 bits, groups of 64 along the output channel (weights) or the head
# dimension (KV cache), asymmetric min-max.
WEIGHT_COMPRESSION = CompressionConfig(num_bits=4, group_size=64, group_dim=0)
CACHE_COMPRESSION = CompressionConfig(num_bits=4, group_size=64, group_dim=-1)
_PART_BYTES = {"uint8": 1, "float16": 2}


def weight_compression(policy) -> CompressionConfig | None:
    return WEIGHT_COMPRESSION if policy.compress_weight else None


def weight_part_nbytes(spec, dtype_bytes: int, compression=None) -> list[int]:
    """Bytes of each tensor stored for one weight: the weight itself, or its compressed parts."""
    if compression is not None and spec.compress_group_dim is not None:
        config = compression.with_group_dim(spec.compress_group_dim)
        return [prod(shape) * _PART_BYTES[dtype] for _, dtype, shape in stored_parts(spec.shape, config)]
    return [spec.numel * dtype_bytes]


def weight_nbytes(spec, dtype_bytes: int, compression=None) -> int:
    """Stored bytes of one weight; compressed when a compression config is given and the weight allows it."""
    return sum(weight_part_nbytes(spec, dtype_bytes, compression))


def place_layer_weights(specs, policy, dtype_bytes: int, compression=None) -> list[WeightPlacement]:
    compression = compression or weight_compression(policy)
    by_shape: dict = {}  # an MoE layer's experts share a few shapes: each sized once (planning calls this a lot)
    parts = []
    for spec in specs:
        key = (spec.shape, spec.compress_group_dim)
        if key not in by_shape:
            by_shape[key] = weight_part_nbytes(spec, dtype_bytes, compression)
        parts.append(by_shape[key])
    tiers = weight_tiers([sum(p) for p in parts], policy.w_gpu_percent, policy.w_cpu_percent)
    return [WeightPlacement(s.name, t, sum(p), tuple(p)) for s, t, p in zip(specs, tiers, parts)]


def _bytes_by_tier(placements: Sequence[WeightPlacement]) -> dict[str, int]:
    """Bytes per tier of one layer's weights as stored: each part packed at aligned offsets off the
    compute device, separate tensors on it."""
    out = dict.fromkeys(TIERS, 0)
    for p in placements:
        out[p.tier] += p.nbytes if p.tier == "gpu" else sum(align(n) for n in p.part_nbytes)
    return out


def cache_nbytes(shape, batch: int, total_len: int, num_heads: int, dtype_bytes: int, compress: bool) -> int:
    """Stored bytes of one segment's K and V: (total_len, 2, B, heads, head_dim), maybe compressed."""
    dims = (total_len, 2, batch, num_heads, shape.head_dim)
    if compress:
        return compressed_nbytes(dims, CACHE_COMPRESSION)
    return prod(dims) * dtype_bytes


@dataclass
class MemoryReport:
    """Bytes per tier, by term. `peak` sums the terms; workspace is an upper bound, the rest exact."""

    weights: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    weight_staging: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    cache: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    cache_staging: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    activations: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    workspace: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))

    TERMS = ("weights", "weight_staging", "cache", "cache_staging", "activations", "workspace")

    @property
    def peak(self) -> dict[str, int]:
        return {tier: sum(getattr(self, term)[tier] for term in self.TERMS) for tier in TIERS}

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {term: dict(getattr(self, term)) for term in self.TERMS} | {"peak": self.peak}


def num_slots(policy) -> int:
    """Staging slots per buffer kind: two when overlapping (one loads while the other computes).
    Reads `.overlap` of a Policy or of the planner's switches."""
    return 2 if policy.overlap else 1


def account(layers, shape, policy, prompt_len: int, gen_len: int, dtype_bytes: int, separate_device: bool,
            echo_prompt: bool = False, compression=None, prefix_len: int = 0) -> MemoryReport:
    """Exact bytes per tier for generating `gen_len` tokens after prompts padded to `prompt_len`.
    `separate_device`: the compute tier is memory of its own (CUDA, the simulated device), so off-device data is
    staged there by copies; on a plain CPU it is used where it lies. Compression follows the policy's
    switches (`compression` overrides the weights' config). With a shared prefix of `prefix_len` tokens,
    `prompt_len` counts each sequence's own tokens (the prefix's K/V: add_shared_prefix_terms)."""
    report = MemoryReport()
    add_weight_terms(report, layers, policy, dtype_bytes, separate_device, compression)
    add_block_terms(report, layers, shape, policy, prompt_len, gen_len, dtype_bytes, separate_device, echo_prompt,
                    prefix_len)
    return report


def add_weight_terms(report: MemoryReport, layers, policy, dtype_bytes: int, separate_device: bool,
                     compression=None) -> None:
    """The weights and their staging slots: what the engine holds from loading on."""
    slots = num_slots(policy)
    compression = compression or weight_compression(policy)

    # Weights and their staging slots (each slot fits the largest layer's off-device share); compressed
    # weights are decompressed into a dense buffer per slot on the compute device.
    max_host_stage = max_device_stage = max_dense = 0
    for layer in layers:
        placements = place_layer_weights(layer.specs, policy, dtype_bytes, compression)
        per_tier = _bytes_by_tier(placements)
        for tier in TIERS:
            report.weights[tier] += per_tier[tier]
        max_host_stage = max(max_host_stage, per_tier["disk"])
        if separate_device:
            max_device_stage = max(max_device_stage, per_tier["cpu"] + per_tier["disk"])
        if compression is not None:
            dense = [align(s.numel * dtype_bytes) for s in layer.specs if s.compress_group_dim is not None]
            max_dense = max(max_dense, sum(dense))
    report.weight_staging["cpu"] += slots * max_host_stage
    report.weight_staging["gpu"] += slots * (max_device_stage + max_dense)


def add_block_terms(report: MemoryReport, layers, shape, policy, prompt_len: int, gen_len: int, dtype_bytes: int,
                    separate_device: bool, echo_prompt: bool = False, prefix_len: int = 0) -> None:
    """The KV cache, activations and workspace of one block: allocated per block, freed after it.
    `prompt_len` counts each sequence's own tokens; a shared prefix of `prefix_len` tokens before them
    (held apart, see add_shared_prefix_terms) only widens the prompt pass's attention."""
    slots = num_slots(policy)
    # KV cache: per attention layer, per GPU batch, K and V of (total_len, B, heads, head_dim).
    total_len = prompt_len + gen_len
    batch = policy.gpu_batch_size
    num_attention = sum(1 for layer in layers if layer.kind.value == "attention")
    for seg in cache_segments(shape.num_kv_heads, policy, separate_device):
        stored = cache_nbytes(shape, batch, total_len, seg.num_heads, dtype_bytes, policy.compress_cache)
        report.cache[seg.tier] += num_attention * policy.num_gpu_batches * stored
        for tier in cache_staging_tiers(seg, separate_device):
            report.cache_staging[tier] += slots * stored
        if policy.compress_cache:  # decompressed rows for attention, where attention runs
            dense = cache_nbytes(shape, batch, total_len, seg.num_heads, dtype_bytes, False)
            report.cache_staging[seg.compute_on] += slots * dense

    # Activations: hidden (B, s, H) of every GPU batch, split by rows; the prompt pass is the peak. Rows
    # on disk are read through one host staging buffer of a batch's disk rows.
    row_hidden = prompt_len * shape.hidden_size * dtype_bytes
    counts = split_counts(batch, policy.act_gpu_percent, policy.act_cpu_percent)
    for tier, count in zip(TIERS, counts):
        report.activations[tier] += policy.num_gpu_batches * count * row_hidden
    report.activations["cpu"] += counts[2] * row_hidden

    report.workspace["gpu"] = workspace_bound(shape, batch, prompt_len, total_len, dtype_bytes, echo_prompt,
                                              prefix_len)


def add_shared_prefix_terms(report: MemoryReport, layers, shape, policy, prefix_len: int, dtype_bytes: int,
                            separate_device: bool) -> None:
    """A shared prefix of `prefix_len` tokens: the pass that computes it (one sequence, echoing its
    logprobs) and what it holds after: the exact K/V of one sequence, plus a compressed copy with
    compress_cache (cache and cache_staging terms)."""
    one = policy.replace(gpu_batch_size=1, num_gpu_batches=1)
    add_block_terms(report, layers, shape, one.replace(compress_cache=False), prefix_len, 0, dtype_bytes,
                    separate_device, True)
    if policy.compress_cache:
        packed = MemoryReport()
        add_block_terms(packed, layers, shape, one, prefix_len, 0, dtype_bytes, separate_device)
        for term in ("cache", "cache_staging"):
            for tier in TIERS:
                getattr(report, term)[tier] += getattr(packed, term)[tier]


def workspace_bound(shape, batch: int, prompt_len: int, total_len: int, dtype_bytes: int, echo_prompt: bool,
                    prefix_len: int = 0) -> int:
    """Upper bound on the transient tensors on the compute device while one layer computes on one GPU
    batch (the prompt pass dominates): the largest of the attention, MLP and output layers' own, plus
    what the schedule keeps in flight beside them (the next batch's hidden states loading, the last
    batch's output and new K/V still being stored). With a shared prefix, the prompt's queries also
    score the prefix's keys (layers.attend_with_prefix)."""
    tokens = batch * prompt_len
    hidden = tokens * shape.hidden_size * dtype_bytes
    kv = 2 * tokens * shape.kv_width * dtype_bytes
    # Inputs, norms (RMSNorm works in float32: twice the bytes), q, attention output, projected output,
    # layer output; scores of one query chunk of the unfused attention path (scores, masked scores,
    # softmax); the mask, as booleans and as the additive float masks a fused kernel makes of it (one
    # converted, one padded); the fused kernel's log-sum-exp rows; a shared prefix's K/V brought to the
    # device for CPU-attention heads.
    keys = prefix_len + prompt_len
    chunk = query_chunk(batch, shape.num_heads, prompt_len, keys)
    scores = 3 * batch * shape.num_heads * chunk * keys * SCORE_BYTES
    mask = batch * prompt_len * (prefix_len + total_len + 16) * (1 + 2 * SCORE_BYTES)
    lse = batch * shape.num_heads * (prompt_len + 32) * SCORE_BYTES
    prefix_kv = 2 * prefix_len * shape.kv_width * dtype_bytes
    attention = 8 * hidden + kv + scores + mask + lse + prefix_kv
    mlp = mlp_workspace(shape, batch, prompt_len, dtype_bytes)
    logit_rows = tokens if echo_prompt else batch
    output = 2 * hidden + logit_rows * shape.vocab_size * (dtype_bytes + 4 + 4)  # logits, fp32 log-softmax
    in_flight = 2 * hidden + kv
    return max(attention, mlp, output) + in_flight


def mlp_workspace(shape, batch: int, num_tokens: int, dtype_bytes: int) -> int:
    """Upper bound on an MLP layer's transient tensors over (batch, num_tokens) hidden states: the input,
    its norm (float32 in RMSNorm), each chunk's output and their concatenation; per chunk of positions up
    to three (B, chunk, width) intermediates (fc1 and its activation; gate, its activation and up). A
    mixture of experts adds, per chunk, the router's logits, their float32 softmax and the top-k, and per
    expert, at worst every token of the chunk, its gathered inputs, its output, that output weighed (in
    float32 for Mixtral) and the running sum."""
    hidden = batch * num_tokens * shape.hidden_size * dtype_bytes
    positions = token_chunk(batch, num_tokens, shape.mlp_width, dtype_bytes)
    mlp = 6 * hidden + 3 * batch * positions * shape.mlp_width * dtype_bytes
    if shape.moe is not None:
        rows = batch * positions
        router = rows * shape.moe.num_experts * (dtype_bytes + 4) + rows * shape.moe.top_k * (4 + 8 + 8)
        mlp += router + rows * shape.hidden_size * (3 * dtype_bytes + 4 + 4)
    return mlp
