"""One GPU batch of a block: its left-padded prompts, the sequences they feed, and the positions and
attention masks that follow from the padding (and from a shared prefix before them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexgen_core.runtime.decoding import SequenceState


@dataclass
class Batch:
    """One GPU batch of a block: left-padded prompts and the sequences they feed."""

    token_ids: torch.Tensor  # (B, prompt_len) on the compute device: the prompts after any shared prefix
    pads: list[int]
    seqs: list[SequenceState]
    offset: int = 0  # tokens of the shared prefix before index 0
    # Sequences that repeat a prompt (sampled completions of one prompt): the prompt pass runs on the
    # distinct prompts (the rows above, `seqs` one sequence each) and the batch then forks into
    # `fork[0]`, every sequence, each continuing row `fork[1][i]`.
    fork: tuple[list[SequenceState], list[int]] | None = None

    @classmethod
    def of(cls, token_ids: torch.Tensor, pads: list[int], seqs: list[SequenceState], offset: int = 0) -> "Batch":
        """A batch of `seqs`, its prompt pass computing each distinct prompt once."""
        first: dict[tuple[int, ...], int] = {}
        rows = [first.setdefault(tuple(seq.prompt), len(first)) for seq in seqs]
        if len(first) == len(seqs):
            return cls(token_ids, pads, seqs, offset)
        unique = [rows.index(row) for row in range(len(first))]
        index = torch.tensor(unique, device=token_ids.device)
        return cls(token_ids.index_select(0, index), [pads[i] for i in unique], [seqs[i] for i in unique], offset,
                   (seqs, rows))

    @property
    def members(self) -> list[SequenceState]:
        """Every sequence the batch generates for."""
        return self.fork[0] if self.fork is not None else self.seqs

    def keep(self, rows: list[int]) -> "Batch":
        """This batch with only `rows` (with repeats, in any order) of its current rows, as one row each."""
        index = torch.tensor(rows, device=self.token_ids.device)
        return Batch(self.token_ids.index_select(0, index), [self.pads[r] for r in rows],
                     [self.seqs[r] for r in rows], self.offset)

    def forked(self) -> "Batch":
        """After the prompt pass: one row per sequence."""
        seqs, rows = self.fork
        return Batch(self.keep(rows).token_ids, [self.pads[r] for r in rows], list(seqs), self.offset)

    def positions(self, start: int, length: int) -> torch.Tensor:
        """Positions of padded indices [start, start+length): offset + index - pad, and -1 on padding."""
        index = torch.arange(start, start + length, device=self.token_ids.device)
        pads = torch.tensor(self.pads, device=self.token_ids.device)[:, None]
        return torch.where(index >= pads, index - pads + self.offset, -1)  # (B, length)

    def prefix_allowed(self, start: int, length: int, device, window: int | None) -> torch.Tensor | None:
        """Which shared-prefix keys each query sees (B, 1, length, offset): all of them (None) unless a
        sliding `window` hides those more than `window` positions back."""
        if window is None or start + length - min(self.pads) + self.offset <= window:
            return None
        query = self.positions(start, length).to(device)[:, None, :, None]  # (B, 1, length, 1)
        key = torch.arange(self.offset, device=device)[None, None, None, :]
        return key > query - window

    def allowed(self, start: int, length: int, key_len: int, device, window: int | None = None) -> torch.Tensor:
        """Attention mask (B, 1, length, key_len): causal, no padding keys, and with a sliding `window`
        only keys less than `window` positions back; each query also sees itself so padding rows stay
        finite (their outputs are never used)."""
        query = torch.arange(start, start + length, device=device)[:, None]
        key = torch.arange(key_len, device=device)[None, :]
        pads = torch.tensor(self.pads, device=device)[:, None, None]
        visible = key <= query
        if window is not None:
            visible = visible & (key > query - window)
        allowed = (visible[None] & (key[None] >= pads)) | (key == query)[None]
        return allowed[:, None]
