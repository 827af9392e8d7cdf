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
                assert sorted(top.values(), reverse=True) == sorted(top.values(), reverse=True)
                for tok, lp in top.items():
                    assert abs(lp - row[tok].item()) <= logprob_tol
                assert abs(min(top.values()) - values[-1].item()) <= logprob_tol
    if echo:
        ref = reference_logprobs(model, list(prompt))
        assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(prompt)
        for i in range(1, len(prompt)):
            assert abs(result.prompt_logprobs[i] - ref[i - 1, prompt[i]].item()) <= logprob_tol, f"prompt token {i}"
    return ties
