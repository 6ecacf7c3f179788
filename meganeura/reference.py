"""The meaning of every op, in numpy (the golden semantics), and an executor that runs a Graph with them.

All math is float32. Checkpoint tensors arrive already upcast (bf16 and f16 to f32 are exact).
Attention and RoPE take the absolute position of the first query from their inputs, so the same
functions serve a whole-prompt forward and a step over a KV cache.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

f32 = np.float32


# ---------------------------------------------------------------- op meanings

def embedding(table, ids, scale=1.0):
    ids = np.asarray(ids).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        raise ValueError(f"token id {int(ids.max())} is outside the vocabulary of {table.shape[0]}")
    rows = table[ids].astype(f32)
    return rows if scale == 1.0 else (rows * f32(scale)).astype(f32, copy=False)


def matmul(x, w, transpose_b):
    return np.matmul(x, w.T if transpose_b else w, dtype=f32)


def add(a, b):
    return (a + b).astype(f32, copy=False)


def mul(a, b):
    return (a * b).astype(f32, copy=False)


def scale(x, c):
    return (x * f32(c)).astype(f32, copy=False)


def silu(x):
    return (x / (f32(1) + np.exp(-x))).astype(f32, copy=False)


def gelu_tanh(x):
    c = f32(np.sqrt(2.0 / np.pi))
    return (f32(0.5) * x * (f32(1) + np.tanh(c * (x + f32(0.044715) * x * x * x)))).astype(f32, copy=False)


def sigmoid(x):
    return (f32(1) / (f32(1) + np.exp(-x))).astype(f32, copy=False)


def softcap(x, cap):
    return (f32(cap) * np.tanh(x / f32(cap))).astype(f32, copy=False)


def rms_norm(x, w=None, *, eps):
    y = x * (f32(1) / np.sqrt(np.mean(x * x, axis=-1, keepdims=True, dtype=f32) + f32(eps)))
    return (y if w is None else y * w).astype(f32, copy=False)


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(f32, copy=False)


def rope_angles(start, count, inv_freq):
    """fp32(position) * inv_freq, one fp32 multiply per entry, as transformers computes it."""
    pos = (np.int64(start) + np.arange(count, dtype=np.int64)).astype(f32)
    return pos[:, None] * np.asarray(inv_freq, dtype=f32)[None, :]


def rope(x, start, *, inv_freq, attention_scaling):
    """Rotate pairs (j, j + d/2) of every head (the "rotate_half" layout) by position * inv_freq[j]."""
    ang = rope_angles(int(start), x.shape[0], inv_freq)            # [S, d/2]
    cos = (np.cos(ang) * f32(attention_scaling))[:, None, :]
    sin = (np.sin(ang) * f32(attention_scaling))[:, None, :]
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).astype(f32, copy=False)


def attention(q, k, v, start=None, *, scale, window, softcap):
    """Causal softmax attention. q: [S, nH, d], k/v: [T, nKV, d] with the S queries being the last S
    of the T positions. Query i (absolute index T-S+i) sees keys j with i-w < j <= i.
    With `start`, k/v are caches of C slots holding position j in slot j mod C, and the queries are at
    positions start .. start+S-1: the cache is unrolled to T = start + S positions first."""
    if start is not None:
        t = int(start) + q.shape[0]
        k, v = unroll_cache(k, t, q.shape[0], window), unroll_cache(v, t, q.shape[0], window)
    s, n_heads, _ = q.shape
    t, n_kv, _ = k.shape
    group = n_heads // n_kv
    qi = np.arange(t - s, t)[:, None]
    kj = np.arange(t)[None, :]
    allowed = kj <= qi
    if window is not None:
        allowed &= kj > qi - window
    kh = np.repeat(k, group, axis=1)                               # [T, nH, d]
    vh = np.repeat(v, group, axis=1)
    scores = np.einsum("shd,thd->hst", q, kh, dtype=f32) * f32(scale)
    if softcap is not None:
        scores = f32(softcap) * np.tanh(scores / f32(softcap))
    scores = np.where(allowed[None], scores, -np.inf).astype(f32)
    p = softmax(scores)
    return np.einsum("hst,thd->shd", p, vh, dtype=f32)


def unroll_cache(cache, t, s, window):
    """Positions 0..t-1 of a ring-buffer cache after the step that wrote positions t-s .. t-1. Positions
    before the first query's window may have been overwritten: they come out as whatever the slot holds,
    and the mask hides them. A cache too small for what the queries see is an error, not a wrong answer."""
    slots = cache.shape[0]
    first_seen = 0 if window is None else max(0, t - s - window + 1)
    if t - first_seen > slots:
        raise ValueError(f"a cache of {slots} slots cannot hold the {t - first_seen} positions these "
                         f"{s} queries see")
    return cache[np.arange(t) % slots]


def cache_write(cache, x, start, *extra, at, norm, eps, rope):
    """Write x's rows (heads read at column `at`, then normed and rotated) into cache slots
    (start + i) mod slots, in place, and return the cache."""
    slots, heads, d = cache.shape
    rows = x.reshape(x.shape[0], -1)[:, at:at + heads * d].reshape(x.shape[0], heads, d)
    if norm is not None:
        rows = rms_norm(rows, extra[0] if norm == "weighted" else None, eps=eps)
    if rope is not None:
        rows = globals()["rope"](rows, start, inv_freq=rope[0], attention_scaling=rope[1])
    if rows.shape[0] > slots:
        raise ValueError(f"{rows.shape[0]} tokens do not fit a cache of {slots} slots")
    cache[(int(start) + np.arange(rows.shape[0])) % slots] = rows
    return cache


def reshape(x, *, shape):
    return x.reshape(tuple(-1 if isinstance(d, str) else d for d in shape))


def slice_(x, *, axis, start, stop):
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(start, stop)
    return np.ascontiguousarray(x[tuple(idx)])


def last_row(x):
    return np.ascontiguousarray(x[-1:])


def argmax(x):
    return np.argmax(x, axis=-1).astype(np.uint32)


def topk_route(p, *, k, normalize):
    """Keep each row's k largest entries (ties: lower expert index first), zero the rest."""
    idx = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(p, idx, axis=-1)
    if normalize:
        w = w / w.sum(axis=-1, keepdims=True)
    out = np.zeros_like(p, dtype=f32)
    np.put_along_axis(out, idx, w.astype(f32), axis=-1)
    return out


ACTIVATIONS = {"silu": silu, "gelu_tanh": gelu_tanh}


# ---------------------------------------------------------------- fused ops: compositions of the above

def glu(g, u, *, act):
    return mul(ACTIVATIONS[act](g), u)


def linear(x, w, *extra, norm, eps, bias, act, softcap, residual):
    extra = list(extra)
    if norm is not None:
        x = rms_norm(x, extra.pop(0) if norm == "weighted" else None, eps=eps)
    y = matmul(x, w, transpose_b=True)
    if bias:
        y = add(y, extra.pop(0))
    if act is not None:
        half = y.shape[-1] // 2
        y = glu(y[..., :half], y[..., half:], act=act)
    if softcap is not None:
        y = globals()["softcap"](y, softcap)
    if residual:
        y = add(y, extra.pop(0))
    return y


def fused_attention(q, k, v, *extra, heads, kv_heads, head_dim, q_at, k_at, v_at, norms, eps, rope,
                    scale, window, softcap, cached):
    extra = list(extra)

    def heads_of(t, at, n):
        return t.reshape(t.shape[0], -1)[:, at:at + n * head_dim].reshape(t.shape[0], n, head_dim)

    q, k, v = heads_of(q, q_at, heads), heads_of(k, k_at, kv_heads), heads_of(v, v_at, kv_heads)
    if norms & 1:
        q = rms_norm(q, extra.pop(0), eps=eps)
    if norms & 2:
        k = rms_norm(k, extra.pop(0), eps=eps)
    if norms & 4:
        v = rms_norm(v, None, eps=eps)
    start = extra.pop(0) if rope is not None or cached else None
    if rope is not None:
        q = globals()["rope"](q, start, inv_freq=rope[0], attention_scaling=rope[1])
        if not cached:
            k = globals()["rope"](k, start, inv_freq=rope[0], attention_scaling=rope[1])
    return attention(q, k, v, start if cached else None, scale=scale, window=window, softcap=softcap)


def add_norm(h, y, *extra, eps, weighted, scaled):
    extra = list(extra)
    out = add(h, rms_norm(y, extra.pop(0) if weighted else None, eps=eps))
    return mul(out, extra.pop(0)) if scaled else out


def moe(x, route, gate_up, down, *, act, k):
    """Each token's output is the routing-weighted sum of its chosen experts' gated MLPs."""
    out = np.zeros(x.shape, dtype=f32)
    im = gate_up.shape[1] // 2
    for e in np.flatnonzero(route.any(axis=0)):
        rows = np.flatnonzero(route[:, e])
        y = x[rows] @ gate_up[e].T
        h = ACTIVATIONS[act](y[:, :im]) * y[:, im:]
        out[rows] += route[rows, e, None] * (h @ down[e].T)
    return out


# ---------------------------------------------------------------- the executor

def run(graph, inputs: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray],
        state: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Evaluate `graph`'s outputs. `inputs` by input name, `params` (float32) by parameter name; `state`
    holds the graph's persistent tensors by name (created as zeros when absent) and is updated in place."""
    from .graph import OPS

    last_use = {}
    for i, n in enumerate(graph.nodes):
        for j in n.inputs:
            last_use[j] = i
    keep = set(graph.outputs)
    values: dict[int, np.ndarray] = {}
    for i, n in enumerate(graph.nodes):
        if n.op == "input":
            values[i] = inputs[n.attrs["name"]]
        elif n.op == "parameter":
            values[i] = params[n.attrs["name"]]
        elif n.op == "state":
            if state is None:
                state = {}
            if n.attrs["name"] not in state:
                state[n.attrs["name"]] = np.zeros(n.shape, f32)
            values[i] = state[n.attrs["name"]]
        else:
            values[i] = OPS[n.op].meaning(*(values[j] for j in n.inputs), **n.attrs)
        for j in n.inputs:
            if last_use[j] == i and j not in keep:
                values.pop(j, None)
    return {graph.names[o]: values[o] for o in graph.outputs}
