"""Choosing tokens from logits and deciding when a sequence ends. Independent of placement."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch


class NonFiniteError(RuntimeError):
    """The model produced NaN or infinite logits (corrupt weights or cache, or an overflow); nothing
    of the call is returned. The engine's message names where the values came from."""


def _check_finite(logprobs: list[float], seqs: list[SequenceState], what: str) -> None:
    """Free: the values are on the host already. A NaN or inf anywhere in a row of logits makes its
    log-softmax, so every logprob read from it, non-finite."""
    bad = sum(1 for lp, seq in zip(logprobs, seqs) if not seq.done and not math.isfinite(lp))
    if bad:
        raise NonFiniteError(f"non-finite logits for {bad} of {len(seqs)} sequences ({what})")


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None  # "length", "stop" or "eos"


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    completions: list[Completion]
    prompt_logprobs: list[float | None] | None = None


@dataclass(frozen=True)
class DecodeSettings:
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k_logprobs: int
    stop: tuple[tuple[int, ...], ...]
    eos_token_id: int | None


def sequence_generator(seed: int, completion_idx: int) -> torch.Generator:
    """A CPU generator for one sequence: depends only on the request's seed and completion index, so a
    sequence samples the same tokens whatever else shares its batch."""
    digest = hashlib.sha256(f"{seed}:{completion_idx}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class SequenceState:
    """One completion being generated."""

    def __init__(self, prompt: list[int], generator: torch.Generator | None, forced: list[int] | None = None):
        self.prompt = prompt
        self.generator = generator
        self.forced = forced  # tokens fed instead of chosen ones (scoring through the decode path)
        self.out = Completion()
        self.prompt_logprobs: list[float | None] | None = None

    @property
    def done(self) -> bool:
        return self.out.finish_reason is not None

    def append(self, token: int, logprob: float, top: dict[int, float] | None, settings: DecodeSettings) -> None:
        out = self.out
        out.token_ids.append(token)
        out.logprobs.append(logprob)
        if top is not None:
            out.top_logprobs.append(top)
        if settings.eos_token_id is not None and token == settings.eos_token_id:
            out.finish_reason = "eos"
            return
        for stop in settings.stop:
            if len(stop) <= len(out.token_ids) and tuple(out.token_ids[-len(stop):]) == stop:
                # The stop sequence ends the completion and is not part of it.
                del out.token_ids[-len(stop):], out.logprobs[-len(stop):]
                if top is not None:
                    del out.top_logprobs[-len(stop):]
                out.finish_reason = "stop"
                return
        if len(out.token_ids) >= settings.max_new_tokens:
            out.finish_reason = "length"


def _sample(logits: torch.Tensor, settings: DecodeSettings, generator: torch.Generator) -> int:
    """Sample one token from (V,) float32 CPU logits with temperature and nucleus (top-p) filtering.

    In float64, so a tiny temperature or top_p (1e-46, 1e-300) keeps its value; a temperature so small
    that the scaled logits overflow even float64 samples its limit, the most likely token (as 0 does)."""
    scaled = logits.double() / settings.temperature
    if not bool(torch.isfinite(scaled[torch.isfinite(logits)]).all()):
        return int(logits.argmax())
    probs = torch.softmax(scaled, dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(0) - sorted_probs >= settings.top_p
        drop[0] = False
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def select_tokens(logits: torch.Tensor, seqs: list[SequenceState], settings: DecodeSettings) -> torch.Tensor:
    """Pick each sequence's next token from its last-position logits (B, V); record logprobs.

    Returns the chosen ids (B,) on the logits' device. Logprobs are the model's own log-softmax of
    the raw logits, whatever the temperature and top-p used to choose.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    if settings.temperature == 0.0:
        chosen = logprobs.argmax(dim=-1)
    else:
        host_logits = logits.float().cpu()
        chosen = torch.tensor(
            [_sample(host_logits[row], settings, seq.generator) if not seq.done else 0 for row, seq in enumerate(seqs)],
            device=logits.device,
        )
    if any(seq.forced is not None for seq in seqs):
        forced = [seq.forced[len(seq.out.token_ids)] if seq.forced is not None and not seq.done else None
                  for seq in seqs]
        keep = torch.tensor([f is None for f in forced], device=chosen.device)
        chosen = torch.where(keep, chosen, torch.tensor([f or 0 for f in forced], device=chosen.device))
    chosen_logprobs = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
    _check_finite(chosen_logprobs, seqs, "choosing a token")
    tops: list[dict[int, float] | None] = [None] * len(seqs)
    if settings.top_k_logprobs:
        values, ids = logprobs.topk(min(settings.top_k_logprobs, logprobs.shape[-1]), dim=-1)
        tops = [dict(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    for seq, token, logprob, top in zip(seqs, chosen.tolist(), chosen_logprobs, tops):
        if not seq.done:
            seq.append(token, logprob, top, settings)
    return chosen


def record_prompt_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, pads: list[int], seqs: list[SequenceState],
                           prefix=None) -> None:
    """Prompt logprobs from the prompt pass: logits (B, s, V) over left-padded token_ids (B, s). With a
    shared `prefix` (its `prompt_logprobs` and `next_logprobs`), token_ids hold what follows it: the
    prefix's logprobs come first, then the first own token's from the prefix's next-token row."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    scores = logprobs.gather(2, token_ids[:, 1:, None])[:, :, 0].tolist()  # (B, s-1)
    for seq, pad, row, ids in zip(seqs, pads, scores, token_ids.tolist()):
        _check_finite(row[pad:], [seq] * len(row[pad:]), "prompt logprobs")
        if prefix is None:
            seq.prompt_logprobs = [None] + row[pad:]
        else:
            seq.prompt_logprobs = prefix.prompt_logprobs + [prefix.next_logprobs[ids[pad]].item()] + row[pad:]
