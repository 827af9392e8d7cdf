"""Attention over a shared prefix plus each sequence's own keys (`layers.attend_with_prefix`), both ways
it is computed: the fused CPU kernel with a log-sum-exp merge, and scores + one softmax (the path for
other devices and for sliding windows). Checked against a float64 reference built here that gives
every sequence its own copy of the prefix, expands K/V per query head and runs one masked softmax.
"""

from __future__ import annotations

import pytest
import torch

from flexgen_core.models import layers

TOL = 2e-6


def _reference(q, prefix_k, prefix_v, k, v, allowed, prefix_allowed, scale=None, softcap=None):
    batch, s_q, nh, hd = q.shape
    num_prefix, nkv = prefix_k.shape[:2]
    full_k = torch.cat((prefix_k[:, None].expand(-1, batch, -1, -1), k)).double()  # (P + s_k, B, nkv, hd)
    full_v = torch.cat((prefix_v[:, None].expand(-1, batch, -1, -1), v)).double()
    full_k = full_k.repeat_interleave(nh // nkv, dim=2).permute(1, 2, 0, 3)  # (B, nh, P + s_k, hd)
    full_v = full_v.repeat_interleave(nh // nkv, dim=2).permute(1, 2, 0, 3)
    if prefix_allowed is None:
        prefix_allowed = torch.ones(batch, 1, s_q, num_prefix, dtype=torch.bool)
    mask = torch.cat((prefix_allowed, allowed), dim=-1)  # (B, 1, s_q, P + s_k)
    scale = hd ** -0.5 if scale is None else scale
    scores = q.double().transpose(1, 2) @ full_k.transpose(-1, -2) * scale  # (B, nh, s_q, P + s_k)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (probs @ full_v).transpose(1, 2)  # (B, s_q, nh, hd)


def _case(batch, s_q, s_k, num_prefix, nh, nkv, hd=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, s_q, nh, hd, generator=gen)
    prefix_k, prefix_v = (torch.randn(num_prefix, nkv, hd, generator=gen) for _ in range(2))
    k, v = (torch.randn(s_k, batch, nkv, hd, generator=gen) for _ in range(2))
    # Causal over the last s_q of s_k own keys, left padding of 0..2 keys (each query sees itself).
    query_idx = torch.arange(s_k - s_q, s_k)[:, None]
    key_idx = torch.arange(s_k)[None, :]
    pads = torch.tensor([row % 3 for row in range(batch)])[:, None, None]
    allowed = ((key_idx <= query_idx)[None] & (key_idx[None] >= pads)) | (key_idx == query_idx)[None]
    return q, prefix_k, prefix_v, k, v, allowed[:, None]


CASES = {  # (batch, s_q, s_k, prefix, heads, kv heads)
    "prompt-pass-gqa": (5, 7, 7, 11, 6, 2),
    "decode-gqa": (6, 1, 9, 13, 6, 3),
    "decode-mha": (3, 1, 4, 5, 4, 4),
    "one-sequence": (1, 3, 3, 2, 2, 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_both_paths_match_one_softmax_over_prefix_and_own_keys(case):
    args = _case(*CASES[case])
    expected = _reference(*args, None)
    matmul = layers._attend_matmul(*args[:5], layers.STANDARD_SCORES, args[5], None)
    assert (matmul.double() - expected).abs().max() < TOL
    if layers._FLASH_CPU is None:
        pytest.skip("this torch has no fused CPU attention kernel with log-sum-exp; the matmul path serves")
    merged = layers._attend_with_prefix_merged(*args, None)
    assert (merged.double() - expected).abs().max() < TOL
    # What the engine calls, on the CPU: the merged path.
    assert torch.equal(layers.attend_with_prefix(*args, None), merged)


def test_a_window_that_hides_prefix_keys_takes_the_softmax_path():
    q, prefix_k, prefix_v, k, v, allowed = _case(4, 2, 5, 9, 4, 2)
    # Query rows 0 of sequences 0 and 1 see none of the prefix: the merge by log-sum-exp cannot
    # express an empty part, the single softmax can.
    prefix_allowed = torch.ones(4, 1, 2, 9, dtype=torch.bool)
    prefix_allowed[:2, :, 0] = False
    prefix_allowed[2, :, :, :4] = False
    expected = _reference(q, prefix_k, prefix_v, k, v, allowed, prefix_allowed)
    out = layers.attend_with_prefix(q, prefix_k, prefix_v, k, v, allowed, prefix_allowed)
    assert (out.double() - expected).abs().max() < TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_scale_and_a_soft_cap_are_the_scores_rule(case):
    """Gemma's scores (q.k * query_pre_attn_scalar ** -0.5, then cap * tanh(. / cap)) on every path: with a
    prefix (the merged path takes the scale, the matmul path the cap too) and without one."""
    q, prefix_k, prefix_v, k, v, allowed = _case(*CASES[case])
    q = q * 3  # scores of std ~5: a cap of 2 bites
    for rule in (layers.ScoreRule(scale=0.1), layers.ScoreRule(scale=0.3, softcap=2.0)):
        expected = _reference(q, prefix_k, prefix_v, k, v, allowed, None, rule.scale, rule.softcap)
        out = layers.attend_with_prefix(q, prefix_k, prefix_v, k, v, allowed, None, rule)
        assert (out.double() - expected).abs().max() < TOL
        no_prefix = _reference(q, prefix_k[:0], prefix_v[:0], k, v, allowed, None, rule.scale, rule.softcap)
        assert (layers.attend(q, k, v, allowed, rule).double() - no_prefix).abs().max() < TOL
    uncapped = _reference(q, prefix_k, prefix_v, k, v, allowed, None, 0.3)
    assert (expected - uncapped).abs().max() > 100 * TOL  # the cap changes the result
