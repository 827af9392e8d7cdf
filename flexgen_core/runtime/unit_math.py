"""The math of one unit of the block schedule, (step, layer, GPU batch): functions over the layer's weights,
the batch's hidden states, its K/V buffers and masks. They return what the schedule stores (new hidden
states, the K/V rows to write back, the chosen tokens); loading, storing and the order of units are the
schedule's (schedule.py). Read top to bottom for one unit: the input layer, attention, MLP, output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexgen_core.models import layers as layer_math
from flexgen_core.runtime.batch import Batch
from flexgen_core.runtime.decoding import DecodeSettings, NonFiniteError, record_prompt_logprobs, select_tokens


@dataclass(frozen=True)
class SegmentInputs:
    """One cache segment of an attention layer (a range of KV heads on one tier), as its attention needs it:
    every tensor already on `device`, where that attention runs."""

    kv_heads: slice        # the segment's KV heads
    query_heads: slice     # the query heads that read them
    device: torch.device
    kv: torch.Tensor | None  # decode: the loaded rows (rows, 2, B, heads, hd), the new row written in place
    mask: torch.Tensor     # (B, 1, queries, keys) of this batch's own keys
    prefix_kv: torch.Tensor | None = None  # a shared prefix's rows (P, 2, 1, heads, hd)
    prefix_mask: torch.Tensor | None = None  # which prefix keys the queries see (None: all)


def input_unit(layer, weights, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Token ids (B, s) to hidden states (B, s, H)."""
    return layer.forward(weights, tokens, positions)


def attention_unit(layer, weights, x: torch.Tensor, positions: torch.Tensor, segments: list[SegmentInputs],
                   start: int, key_len: int, compute: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """An attention layer over one batch: the new hidden states, and per segment the K/V rows to store.

    The prompt pass (segments without `kv`) attends over its fresh K/V, which it returns whole; a decode
    step writes its one new row at `start` into the loaded rows and attends over rows [0, key_len)."""
    q, k, v = layer.qkv(weights, x, positions)  # each (B, s, heads, hd)
    outputs, rows = [], []
    for seg in segments:
        new_kv = torch.stack((k[:, :, seg.kv_heads], v[:, :, seg.kv_heads]))  # (2, B, s, h, hd)
        new_kv = new_kv.permute(2, 0, 1, 3, 4)  # (s, 2, B, h, hd): the cache layout
        if seg.kv is None:
            kv = new_kv
            rows.append(new_kv.contiguous())
        else:
            seg.kv[start].copy_(new_kv[0])
            kv = seg.kv[:key_len]
            rows.append(seg.kv[start:start + 1])
        q_seg = q[:, :, seg.query_heads].to(seg.device)
        if seg.prefix_kv is None:
            out = layer_math.attend(q_seg, kv[:, 0], kv[:, 1], seg.mask, layer.scores)
        else:
            out = layer_math.attend_with_prefix(q_seg, seg.prefix_kv[:, 0, 0], seg.prefix_kv[:, 1, 0], kv[:, 0],
                                                kv[:, 1], seg.mask, seg.prefix_mask, layer.scores)
        outputs.append(out.to(compute))
    attn = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return layer.finish(weights, x, attn), rows


def mlp_unit(layer, weights, x: torch.Tensor, width: int) -> torch.Tensor:
    """A dense MLP or a mixture of experts. Position-wise, so computed in chunks of positions: each chunk's
    intermediates, `width` wide, take at most memory.MLP_CHUNK_BYTES."""
    return layer_math.in_token_chunks(lambda part: layer.forward(weights, part), x, width)


def prefix_output_unit(layer, weights, x: torch.Tensor, batch: Batch) -> tuple[list, torch.Tensor]:
    """The output layer over a shared prefix (one sequence): its tokens' logprobs, and the log-distribution
    (V,) of the token after it, float32 on the host."""
    logits = layer.forward(weights, x)  # (1, P, V)
    record_prompt_logprobs(logits, batch.token_ids, batch.pads, batch.seqs)
    next_logprobs = torch.log_softmax(logits[0, -1].float(), dim=-1).cpu()
    if not torch.isfinite(next_logprobs).all():
        raise NonFiniteError("non-finite logits at the end of the shared prefix")
    return batch.seqs[0].prompt_logprobs, next_logprobs


def output_unit(layer, weights, x: torch.Tensor, batch: Batch, settings: DecodeSettings, echo_prompt: bool,
                prefix) -> torch.Tensor | None:
    """The output layer over one batch: the next token of each of its sequences (None when nothing is
    generated). With `echo_prompt` (the prompt pass only) the prompt tokens' logprobs are recorded too."""
    if echo_prompt:
        logits = layer.forward(weights, x)  # (B, s, V)
        record_prompt_logprobs(logits, batch.token_ids, batch.pads, batch.seqs, prefix)
        if batch.fork is not None:  # a repeated prompt's logprobs are its first occurrence's
            for seq, row in zip(*batch.fork):
                seq.prompt_logprobs = list(batch.seqs[row].prompt_logprobs)
        logits = logits[:, -1]
    else:
        logits = layer.forward(weights, x[:, -1:])[:, 0]  # (B, V)
    if settings.max_new_tokens == 0:
        return None
    if batch.fork is not None:  # each sequence draws its first token from its prompt's row
        logits = logits.index_select(0, torch.tensor(batch.fork[1], device=logits.device))
    return select_tokens(logits, batch.members, settings)
