"""Generation: a Session steps a compiled cached program through a sequence, and sampling picks tokens.

The program is a model graph built with a KV cache (graph state) and logits for the last token only,
plus a `next_token` output (the argmax, computed on the GPU). A prompt is fed in chunks of at most
`cache.chunk` tokens, then each new token is one step of the same kernels. Greedy decoding reads back
four bytes per token and never makes the device wait for the host: each step takes its token from the
step before on the device, and steps are queued in groups ahead of their read-back. Sampling reads back
the last token's logits and draws on the host.
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass

import numpy as np

from meganeura.models.cache import KVCache

STEPS_PER_SUBMIT = 4        # greedy steps a submit queues: its fixed cost (on lavapipe ~2 ms of device idle) once for them
KV_BUDGET = 4 << 30          # bytes the caches may take by default (a context can be asked for instead)


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; otherwise softmax(logits / temperature), cut to the top_k most likely
    tokens, then to the smallest set whose probability reaches top_p, drawn with `seed`."""
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probabilities(logits: np.ndarray, s: Sampling) -> np.ndarray:
    """The distribution a sampled token is drawn from (float64, zero outside top-k / top-p)."""
    z = np.asarray(logits, np.float64) / s.temperature
    if s.top_k is not None and s.top_k < z.size:
        kth = np.partition(z, -s.top_k)[-s.top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if s.top_p is not None and s.top_p < 1:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[:int(np.searchsorted(cum, s.top_p)) + 1]       # the smallest prefix reaching top_p
        cut = np.zeros_like(p)
        cut[keep] = p[keep]
        p = cut / cut.sum()
    return p


def sample(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    if s.greedy:
        return int(np.argmax(logits))
    p = probabilities(logits, s)
    return int(rng.choice(p.size, p=p))


def memory_budget() -> int:
    """Bytes the KV caches may take: KV_BUDGET, or a quarter of the host's memory if that is less."""
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        host = 4 * KV_BUDGET
    return min(KV_BUDGET, host // 4)


def fit_context(limit: int, per_position: int, per_slot_of_largest: int, fixed: int, max_binding: int | None,
                budget: int) -> int:
    """The longest context up to `limit` whose caches fit: `per_position` bytes for every position over
    all full-attention caches plus `fixed` bytes of sliding rings within `budget`, and the largest cache
    (`per_slot_of_largest` bytes a position) within one storage binding."""
    ctx = limit
    if per_position:
        ctx = min(ctx, max(1, (budget - fixed) // per_position))
    if max_binding and per_slot_of_largest:
        ctx = min(ctx, max_binding // per_slot_of_largest)
    return max(1, ctx)


@dataclass
class Stats:
    """Times of the last generation (seconds) and its token counts."""
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0               # the whole prompt, to the first token's logits
    decode_s: float = 0.0                # every later step

    def rates(self) -> dict:
        return dict(prompt_tokens=self.prompt_tokens, new_tokens=self.new_tokens, ttft_s=self.prefill_s,
                    prefill_tokens_per_s=self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0,
                    decode_tokens_per_s=(self.new_tokens - 1) / self.decode_s if self.decode_s else 0.0)


class Session:
    """One sequence through a cached program: `feed` tokens, get the last one's logits or argmax."""

    def __init__(self, program, weights, cache: KVCache):
        self.program, self.weights, self.cache = program, weights, cache
        self.pos = 0

    def reset(self):
        """Start a new sequence. Slots of the old one need no clearing: attention reads only positions
        below the current one, and each of those was written by this sequence."""
        self.pos = 0

    def feed(self, ids, want: str = "next_token") -> np.ndarray:
        """Run `ids` at the next positions, in chunks; return the last token's `want` ("next_token" or
        "logits")."""
        ids = np.asarray(ids, dtype=np.uint32).reshape(-1)
        if self.pos + ids.size > self.cache.context:
            raise ValueError(f"{self.pos + ids.size} tokens do not fit the context of {self.cache.context}")
        out = None
        for at in range(0, ids.size, self.cache.chunk):
            chunk = ids[at:at + self.cache.chunk]
            out = self.program.run({"token_ids": chunk, "start_pos": self.pos}, self.weights, outputs=(want,))[want]
            self.pos += chunk.size
        return out[0]

    def greedy(self, token: int, steps: int):
        """Yield up to `steps` greedy tokens, each the argmax after the one before, starting with `token`
        at the next position; fewer where the context ends. `pos` counts the tokens fed so far, as `feed`
        does. On a program that chains steps, each step takes its token from the step before on the
        device, steps go in groups of up to STEPS_PER_SUBMIT per submit, and the next group is queued
        before this one is read back. A caller that stops early leaves up to 2 * group - 1 steps queued
        past its last token: they write cache slots from `pos` on, which no earlier position reads and a
        later feed overwrites before reading them; in a ring of `window + chunk - 1` slots they spare the
        last `window` positions because the group is at most (chunk + 1) // 2."""
        steps = min(steps, self.cache.context - self.pos)
        if not self.program.chains:
            for _ in range(steps):
                token = int(self.feed([token]))
                yield token
            return
        group = max(1, min(STEPS_PER_SUBMIT, (self.cache.chunk + 1) // 2))
        sizes = [min(group, steps - at) for at in range(0, steps, group)]
        chain, want = {"token_ids": "next_token"}, ("next_token",)
        first = {"token_ids": [token], "start_pos": self.pos}
        ahead = self.program.submit(first, self.weights, want, chain, sizes[0]) if sizes else None
        for n, size in enumerate(sizes):
            queued = ahead
            if n + 1 < len(sizes):          # the next group's first token is this group's last, on the device
                ahead = self.program.submit({"start_pos": self.pos + size}, self.weights, want, chain, sizes[n + 1])
            for out in queued.read():
                self.pos += 1
                yield int(out["next_token"][0])


def generate_ids(session: Session, ids, max_new_tokens: int, sampling: Sampling, eos_ids, stats: Stats | None = None):
    """Yield new token ids one by one (an EOS id is yielded, then generation stops; so does a full context)."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if not ids:
        raise ValueError("the prompt has no tokens")
    if len(ids) > session.cache.context:
        raise ValueError(f"the prompt has {len(ids)} tokens; the context holds {session.cache.context}")
    rng = np.random.default_rng(sampling.seed)
    want = "next_token" if sampling.greedy else "logits"
    stats = stats if stats is not None else Stats()
    stats.prompt_tokens, stats.new_tokens = len(ids), 0
    session.reset()
    t0 = time.perf_counter()
    out = session.feed(ids, want)
    stats.prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    eos = set(int(e) for e in eos_ids)
    if max_new_tokens < 1:
        return
    token = int(out) if sampling.greedy else sample(out, sampling, rng)
    later = (session.greedy(token, max_new_tokens - 1) if sampling.greedy
             else _sampled(session, token, max_new_tokens - 1, sampling, rng))
    for n, token in enumerate(itertools.chain([token], later)):
        stats.new_tokens = n + 1
        stats.decode_s = time.perf_counter() - t1
        yield token
        if token in eos:
            return


def _sampled(session: Session, token: int, steps: int, sampling: Sampling, rng):
    """Up to `steps` sampled tokens after `token`, each drawn from the logits after the one before."""
    for _ in range(min(steps, session.cache.context - session.pos)):
        token = sample(session.feed([token], "logits"), sampling, rng)
        yield token
