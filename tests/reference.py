"""Tie-aware comparison of the engine against transformers on the same weights.

The reference is a teacher-forced transformers forward pass over each prompt followed by the
engine's own tokens: it gives the model's logprob of every token the engine produced, and the best
logprob at every step. A greedy token must be the reference's argmax unless the reference's top
choices are within `tie_tol` (a tie that float noise may break either way).
"""

from __future__ import annotations

import torch


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), V) float32 log-softmax of transformers' logits for a single unpadded sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=model.device)).logits[0]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def check_result(model, prompt, result, *, logprob_tol, tie_tol, greedy=True, echo=False, top_k=0):
    """Assert one engine result against transformers; returns the number of tie-broken steps."""
    ties = 0
    for completion in result.completions:
        ids = list(prompt) + list(completion.token_ids)
        ref = reference_logprobs(model, ids)
        for step, token in enumerate(completion.token_ids):
            row = ref[len(prompt) - 1 + step]
            got = completion.logprobs[step]
            assert abs(got - row[token].item()) <= logprob_tol, (
                f"step {step}: logprob {got} vs reference {row[token].item()}")
            if greedy:
                gap = row.max().item() - row[token].item()
                assert gap <= tie_tol, f"step {step}: greedy token {token} is {gap} below the reference argmax"
                ties += gap > 0
            if top_k:
                top = completion.top_logprobs[step]
                values, _ = row.topk(top_k)
                assert len(top) == top_k
                assert list(top.values()) == sorted(top.values(), reverse=True), "top logprobs out of order"
                for tok, lp in top.items():
                    assert abs(lp - row[tok].item()) <= logprob_tol
                assert abs(min(top.values()) - values[-1].item()) <= logprob_tol
    if echo:
        ref = reference_logprobs(model, list(prompt))
        assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(prompt)
        for i in range(1, len(prompt)):
            assert abs(result.prompt_logprobs[i] - ref[i - 1, prompt[i]].item()) <= logprob_tol, f"prompt token {i}"
    return ties


def quantised_weights_model(model, config):
    """A copy of `model` whose matrices went through compress/decompress as the engine stores them
    with compress_weight: every 2-D weight grouped along its output channel (dim 0)."""
    import copy

    from flexgen_core.compression import compress, decompress

    quantised = copy.deepcopy(model)
    with torch.no_grad():
        for param in quantised.parameters():  # tied embeddings are one parameter: quantised once
            if param.dim() == 2:
                param.copy_(decompress(compress(param.data, config.with_group_dim(0))))
    return quantised


def quantised_cache_logprobs(model, ids: list[int], prompt_len: int, config) -> torch.Tensor:
    """Teacher-forced logprobs with the engine's compress_cache semantics: the prompt pass attends over
    exact K/V; each later step attends over quantised past rows plus its own exact row."""
    from transformers import DynamicCache

    from flexgen_core.compression import compress, decompress

    def quantise_new_rows(cache, new):
        for layer in cache.layers:
            for name in ("keys", "values"):
                rows = getattr(layer, name)[:, :, -new:]  # (B, kv_heads, new, head_dim), groups along head_dim
                rows.copy_(decompress(compress(rows.contiguous(), config)))

    cache, rows = DynamicCache(), []
    with torch.no_grad():
        out = model(torch.tensor([ids[:prompt_len]]), **cache_kwargs(model, cache), use_cache=True)
        rows.append(out.logits[0].float())
        quantise_new_rows(cache, prompt_len)
        for pos in range(prompt_len, len(ids)):
            out = model(torch.tensor([[ids[pos]]]), **cache_kwargs(model, cache), use_cache=True)
            rows.append(out.logits[0].float())
            quantise_new_rows(cache, 1)
    return torch.log_softmax(torch.cat(rows), dim=-1)


def cache_kwargs(model, cache) -> dict:
    """The keyword that passes a KV cache to a transformers model: `cache` since transformers 5.2x
    (`past_key_values` is deprecated there), `past_key_values` before."""
    import inspect

    return {"cache": cache} if "cache" in inspect.signature(model.forward).parameters else {"past_key_values": cache}


def check_against(ref_fn, prompt, result, *, logprob_tol, tie_tol):
    """Like check_result, with teacher-forced reference logprobs from `ref_fn(ids) -> (len(ids), V)`.
    Returns the absolute logprob errors of every step."""
    errors = []
    for completion in result.completions:
        ref = ref_fn(list(prompt) + list(completion.token_ids))
        for step, token in enumerate(completion.token_ids):
            row = ref[len(prompt) - 1 + step]
            errors.append(abs(completion.logprobs[step] - row[token].item()))
            assert errors[-1] <= logprob_tol, f"step {step}: logprob error {errors[-1]}"
            assert row.max().item() - row[token].item() <= tie_tol, f"step {step}: not the reference's argmax"
    return errors
