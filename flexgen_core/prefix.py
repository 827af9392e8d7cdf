"""The shared-prefix rules, in one place (torch-free): when prompts share a prefix worth computing once,
and how many computed prefixes an engine keeps.

HELM builds every prompt of a run entry from the same instructions and in-context examples, so the
prompts of one engine call usually start with the same tokens. The engine computes that prefix once
and every sequence attends to its K/V (engine.py, runtime/schedule.py); the batcher groups requests by
it, the planner and the suite plan cost it (plan/cost_model.py, flexgen_helm/suite_plan.py), and the
HELM client plans for it (flexgen_helm/client.py). All of them read these rules from here.
"""

from __future__ import annotations

from typing import Sequence

# A new shared prefix needs this many tokens to be worth its own pass over the layers.
SHARED_PREFIX_MIN_TOKENS = 16
# Shared prefixes an engine keeps for later calls (each holds one sequence's K/V of its length).
MAX_KEPT_PREFIXES = 4


def common_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens at the start of every prompt, leaving each prompt at least one token of its own."""
    first = prompts[0]
    length = max(0, min(len(p) for p in prompts) - 1)
    for prompt in prompts[1:]:
        length = next((i for i in range(length) if prompt[i] != first[i]), length)
    return length


def sharable_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """The common prefix a call of these prompts shares (0 when too short to pay, or one prompt)."""
    common = common_prefix_len(prompts)
    return common if common >= SHARED_PREFIX_MIN_TOKENS and len(prompts) > 1 else 0


def reuse_kept_prefix(kept_len: int, common_len: int, num_prompts: int) -> bool:
    """Whether prompts whose common prefix is `common_len` tokens use a kept prefix of `kept_len` of them
    (all prompts start with it) rather than computing their longer one: unless the longer prefix saves more
    prompt tokens ((num_prompts - 1) x the difference) than its own pass costs (common_len)."""
    return (num_prompts - 1) * (common_len - kept_len) <= common_len


__all__ = ["MAX_KEPT_PREFIXES", "SHARED_PREFIX_MIN_TOKENS", "common_prefix_len", "reuse_kept_prefix",
           "sharable_prefix_len"]
