"""What the cost model is asked about: the workload (prompt and generation lengths, a shared prefix) and
the policy's switches that change costs."""

from __future__ import annotations

from dataclasses import dataclass

from flexgen_core.policy import SWITCHES, Policy


@dataclass(frozen=True)
class Workload:
    """Prompts of `prompt_len` tokens (as padded in a block), each generating `gen_len`. The first
    `shared_prefix_len` tokens of every prompt are one prefix that the engine computes once and shares
    (it does so for a prefix flexgen_core/prefix.py calls sharable);
    the other `own_len` are each sequence's own."""

    prompt_len: int
    gen_len: int
    shared_prefix_len: int = 0

    def __post_init__(self) -> None:
        for name in ("prompt_len", "gen_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Workload.{name} must be an integer >= 1, got {value!r}")
        prefix = self.shared_prefix_len
        if isinstance(prefix, bool) or not isinstance(prefix, int) or not 0 <= prefix < self.prompt_len:
            raise ValueError(f"Workload.shared_prefix_len must be an integer in [0, prompt_len={self.prompt_len}) "
                             f"(each prompt keeps at least one token of its own), got {prefix!r}")

    @property
    def own_len(self) -> int:
        """Tokens of each prompt after the shared prefix: what a block's prompt pass computes."""
        return self.prompt_len - self.shared_prefix_len

    @property
    def total_len(self) -> int:
        return self.prompt_len + self.gen_len

    @property
    def cache_len(self) -> int:
        """Rows of each sequence in a block's KV cache: its own prompt tokens and the generated ones."""
        return self.own_len + self.gen_len

    def unshared(self) -> "Workload":
        """The same prompts with nothing shared (as a policy with share_prefix off runs them)."""
        return Workload(self.prompt_len, self.gen_len)

    def as_run_by(self, switches: "Switches | Policy") -> "Workload":
        """The workload as a policy runs it: with share_prefix off, nothing is shared."""
        return self if switches.share_prefix else self.unshared()

    @property
    def decode_steps(self) -> int:
        return self.gen_len - 1

    @property
    def decode_rows_loaded(self) -> float:
        """Rows of each sequence's own cache read per decode step, averaged over steps 1..gen_len-1 (step t
        reads own + t - 1). A shared prefix's rows are read apart: once per step and layer, for all batches."""
        return self.own_len + (self.gen_len - 2) / 2

    @property
    def decode_keys(self) -> float:
        """Keys each sequence attends per decode step, averaged (prompt + t at step t, a shared prefix's
        keys included)."""
        return self.prompt_len + self.gen_len / 2

    @property
    def decode_own_keys(self) -> float:
        """Of those, the keys in the sequence's own cache (own + t at step t)."""
        return self.own_len + self.gen_len / 2


@dataclass(frozen=True)
class Switches:
    """The policy's switches that change costs (placement fractions and batch shape aside)."""

    overlap: bool = True
    cpu_cache_compute: bool = False
    compress_weight: bool = False
    compress_cache: bool = False
    share_prefix: bool = True

    @classmethod
    def of(cls, policy: Policy) -> "Switches":
        return cls(**{switch.name: getattr(policy, switch.name) for switch in SWITCHES if switch.costed})
