"""The shared prefixes an engine keeps between calls: HELM runs one run entry's blocks after another, each
entry's prompts starting with the same instructions and examples, so a prefix computed for one call is
often what the next call starts with. At most `MAX_KEPT_PREFIXES` are kept, the least recently used
freed first (the rules: flexgen_core/prefix.py)."""

from __future__ import annotations

from typing import Sequence

from flexgen_core.prefix import MAX_KEPT_PREFIXES, reuse_kept_prefix
from flexgen_core.runtime.schedule import SharedPrefix


class PrefixCache:
    """Kept prefixes, most recently used last; each owns its K/V buffers and files until freed."""

    def __init__(self, limit: int = MAX_KEPT_PREFIXES):
        self.limit = limit
        self._kept: list[SharedPrefix] = []

    def __len__(self) -> int:
        return len(self._kept)

    def find(self, prompts: Sequence[Sequence[int]], common_len: int) -> SharedPrefix | None:
        """The longest kept prefix that every prompt starts with (they share `common_len` tokens), if
        reusing it beats computing their own; it becomes the most recently used."""
        usable = [p for p in self._kept if p.length <= common_len and tuple(prompts[0][:p.length]) == p.tokens]
        kept = max(usable, key=lambda p: p.length, default=None)
        if kept is None or not reuse_kept_prefix(kept.length, common_len, len(prompts)):
            return None
        self._kept.remove(kept)
        self._kept.append(kept)
        return kept

    def make_room(self) -> None:
        """Free the least recently used prefixes until one more may be kept."""
        while len(self._kept) >= self.limit:
            self._kept.pop(0).close()

    def add(self, prefix: SharedPrefix) -> None:
        self._kept.append(prefix)

    def drop(self, keep: SharedPrefix | None = None) -> bool:
        """Free every kept prefix but `keep`; whether there was any."""
        freed = [p for p in self._kept if p is not keep]
        for prefix in freed:
            prefix.close()
            self._kept.remove(prefix)
        return bool(freed)

    @property
    def newest(self) -> SharedPrefix | None:
        return self._kept[-1] if self._kept else None
