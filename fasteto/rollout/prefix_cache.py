"""A store of key/value caches keyed by the token ids they were computed for.

The KV-reusing engine looks up the longest stored prefix of each new prompt and computes only the rest.
An ongoing episode finds its own previous turn (prompt + reply); a new episode finds the instruction
exchange and one-shot example that every episode of its environment starts with. Entries are evicted
least recently used first once their tokens exceed the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, kv_heads, L, head_dim]


@dataclass(eq=False)
class CacheEntry:
    """The KV of ``ids`` (``[L]`` int64): ``kv[layer]`` is (keys, values), each ``[1, H_kv, L, D]``.
    ``prompt_len`` tokens of ``ids`` were a prompt; the rest, if any, the reply generated after it."""

    ids: np.ndarray
    kv: KV
    prompt_len: int
    last_used: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def prefix_kv(self, n: int) -> KV:
        """The KV of the first ``n`` tokens (views, no copy)."""
        return [(k[:, :, :n], v[:, :, :n]) for k, v in self.kv]


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two 1-D integer arrays."""
    m = min(len(a), len(b))
    differ = np.flatnonzero(a[:m] != b[:m])
    return int(differ[0]) if len(differ) else m


class PrefixCache:
    """Entries of (token ids, KV), at most ``max_tokens`` tokens in all (the newest entry is always kept,
    even alone over the budget)."""

    def __init__(self, max_tokens: int):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be ≥ 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self.entries: list[CacheEntry] = []
        self._clock = 0
        self.hits = 0  # tokens served from the cache by lookups
        self.misses = 0  # tokens looked up and not found

    @property
    def tokens(self) -> int:
        return sum(len(e) for e in self.entries)

    def lookup(self, ids: np.ndarray) -> tuple[CacheEntry | None, int]:
        """The entry sharing the longest prefix with ``ids``, and that prefix's length (0: no entry)."""
        best, best_n = None, 0
        for entry in self.entries:
            n = common_prefix(entry.ids, ids)
            if n > best_n:
                best, best_n = entry, n
        if best is not None:
            self._touch(best)
        return best, best_n

    def count(self, served: int, total: int) -> None:
        """Record that ``served`` of ``total`` looked-up tokens came from the cache."""
        self.hits += served
        self.misses += total - served

    def put(self, ids: np.ndarray, kv: KV, prompt_len: int, replaces: CacheEntry | None = None) -> CacheEntry:
        """Store ``kv`` for ``ids`` (dropping ``replaces``, an entry it extends), then evict to budget."""
        if kv and kv[0][0].shape[2] != len(ids):
            raise ValueError(f"KV covers {kv[0][0].shape[2]} tokens but {len(ids)} ids were given")
        if replaces is not None and replaces in self.entries:
            self.entries.remove(replaces)
        entry = CacheEntry(ids=ids, kv=kv, prompt_len=prompt_len)
        self._touch(entry)
        self.entries.append(entry)
        self._evict(keep=entry)
        return entry

    def clear(self) -> None:
        """Drop every entry (after a weight update the stored KV no longer matches the model)."""
        self.entries.clear()

    def _touch(self, entry: CacheEntry) -> None:
        self._clock += 1
        entry.last_used = self._clock

    def _evict(self, keep: CacheEntry) -> None:
        total = self.tokens
        for entry in sorted(self.entries, key=lambda e: e.last_used):
            if total <= self.max_tokens:
                break
            if entry is not keep:
                self.entries.remove(entry)
                total -= len(entry)
