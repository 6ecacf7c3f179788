"""The KV cache of a generating model: graph state that every family's attention writes and reads.

Each attention layer that computes K/V keeps two states, `<layer prefix>k_cache` and `v_cache`, of shape
[slots, kv_heads, head_dim]; position j lives in slot j mod slots. A full-attention layer keeps the
whole context. A sliding layer keeps a ring of window + chunk - 1 slots: a step writes at most `chunk`
tokens, and the oldest key its first query still sees must survive those writes.
"""
from __future__ import annotations

from dataclasses import dataclass

from meganeura.graph import Graph


@dataclass(frozen=True)
class KVCache:
    context: int        # positions a sequence may reach (prompt + generated)
    chunk: int          # the most tokens one step brings (a prefill chunk)

    def __post_init__(self):
        if not 0 < self.chunk <= self.context:
            raise ValueError(f"a prefill chunk of {self.chunk} tokens does not fit a context of {self.context}")

    def slots(self, window: int | None) -> int:
        return self.context if window is None else min(self.context, window + self.chunk - 1)


def write(g: Graph, cache: KVCache, prefix: str, k: int, v: int, pos: int, window: int | None) -> tuple[int, int]:
    """k and v [S, kv_heads, head_dim] written at positions pos..pos+S-1; returns the caches to attend over."""
    _, heads, d = g[k].shape
    shape = (cache.slots(window), heads, d)
    return (g.cache_write(g.state(prefix + "k_cache", shape), k, pos),
            g.cache_write(g.state(prefix + "v_cache", shape), v, pos))
