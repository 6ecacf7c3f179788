"""The least work a step of a graph needs, counted from the graph itself: the bytes a decode step must read
and the FLOPs a step must compute. `meganeura bench` divides them by the measured step times and the
device's measured ceilings, so its efficiencies say how close a step came to what the device can do.

Both count what the model's math requires, not what the kernels happen to do: a kernel that reads a
weight twice or computes masked attention scores makes the step slower, never the count larger.
"""
from __future__ import annotations

import math

from .graph import S, Graph
from .weights import Checkpoint, plan

STATE_BYTES = 4              # KV caches are float32 states (models/cache.py)


def _base(graph: Graph, i: int) -> int:
    """The node a chain of reshapes views."""
    while graph[i].op == "reshape":
        i = graph[i].inputs[0]
    return i


def _rows(shape, tokens: int) -> int:
    """How many rows of the last dimension a [.., K] tensor has in a step of `tokens` tokens."""
    return math.prod(tokens if d == S else d for d in shape[:-1])


def _keys_visited(tokens: int, start: int, window: int | None, cached: bool) -> int:
    """Keys all queries of a step see together: query i at position start + i sees the keys of positions
    up to its own (from the cache when `cached`, else only the step's), the last `window` of them at most."""
    total = 0
    for i in range(tokens):
        keys = (start + i + 1) if cached else (i + 1)
        total += keys if window is None else min(keys, window)
    return total


def _attention_shape(graph: Graph, node) -> tuple[int, int, bool]:
    """(query heads, head_dim, reads a cache) of an attention or fused_attention node."""
    if node.op == "fused_attention":
        return node.attrs["heads"], node.attrs["head_dim"], node.attrs["cached"]
    q = graph[node.inputs[0]]
    return q.shape[1], q.shape[2], len(node.inputs) == 4


def decode_bytes(graph: Graph, weights: Checkpoint, position: float, formats: dict | None = None) -> int:
    """Bytes one decode step (one token, at `position`) of `graph` must read at least, at stored sizes
    (a parameter in `formats`, name -> quant.Format, at its quantized size):

    - every weight a node reads (matrix weights, norm weights, biases, scalars), in full, once however many
      nodes read it: parameters are resolved to the checkpoint tensors they are stored as, so a tied LM head
      and the embedding it shares are one tensor, and a packed Q|K|V weight is its parts;
    - of an embedding table that nothing else reads, the one row the token gathers;
    - of MoE expert weights, the `k` experts the token is routed to (k / experts of each);
    - of each KV cache an attention reads, the keys and values it sees: position + 1 of them, the last
      `window` only on a sliding layer. Caches are float32 states; a cache read by two layers (Gemma-4's
      KV sharing) is read twice, and one state serving as both k and v once.

    Activations are not counted: at one token they are a few rows, next to megabytes of weights. `position`
    may be fractional (a mean over steps); the cache part then lies between those of the positions around it."""
    formats = formats or {}
    parts = {name: {t for group in b.parts for t in group} for name, b in plan(graph, weights).items()}
    size = {t: formats[name].nbytes(weights.tensors[t].shape) if name in formats
            else weights.tensors[t].end - weights.tensors[t].begin for name, ts in parts.items() for t in ts}
    read: dict[str, float] = {}              # stored tensor -> the fraction of it the step reads

    def reads(param: int, fraction: float = 1.0):
        for t in parts[graph[param].attrs["name"]]:
            read[t] = max(read.get(t, 0.0), min(1.0, fraction))

    cache = 0.0
    for node in graph.nodes:
        leaves = [_base(graph, i) for i in node.inputs]
        params = [i for i in leaves if graph[i].op == "parameter"]
        partly = {}                          # parameter -> the fraction of it this node reads
        if node.op == "embedding":
            partly = {leaves[0]: 1 / graph[leaves[0]].shape[0]}            # the token's row
        elif node.op == "moe":
            partly = {e: node.attrs["k"] / graph[e].shape[0] for e in leaves[2:4]}     # the routed experts
        for p in params:
            reads(p, partly.get(p, 1.0))
        if node.op in ("attention", "fused_attention"):
            if _attention_shape(graph, node)[2]:
                window = node.attrs["window"]
                keys = position + 1 if window is None else min(position + 1, window)
                states = {_state(graph, leaves[1]), _state(graph, leaves[2])}
                cache += keys * sum(math.prod(graph[s].shape[1:]) * STATE_BYTES for s in states)
    return round(sum(size[t] * f for t, f in read.items()) + cache)


def _state(graph: Graph, i: int) -> int:
    """The state a cache read comes from (a cache_write's value is the state after the write)."""
    while graph[i].op == "cache_write":
        i = _base(graph, graph[i].inputs[0])
    return i


def step_flops(graph: Graph, tokens: int, start: int = 0) -> int:
    """FLOPs a step of `tokens` tokens (the first at position `start`) must compute: 2·M·N·K of every matrix
    product (linear, matmul; a gated linear's weight holds gate and up rows, both computed; MoE: the k
    routed experts of each token, gate|up and down), plus attention's 4·head_dim·heads per key a query
    sees (scores and the weighted sum of values; causal, so query i sees i + 1 keys of the step, or
    start + i + 1 with a cache, at most `window`). Norms, activations and softmax are not counted."""
    total = 0
    for node in graph.nodes:
        if node.op in ("matmul", "linear"):
            x = graph[node.inputs[0]]
            w = graph[node.inputs[1]]
            if node.op == "linear":
                n = w.shape[0]
            else:
                n = w.shape[0] if node.attrs["transpose_b"] else w.shape[1]
            total += 2 * _rows(x.shape, tokens) * n * x.shape[-1]
        elif node.op == "moe":
            x, gate_up, down = (graph[node.inputs[i]] for i in (0, 2, 3))
            per_expert = gate_up.shape[1] * gate_up.shape[2] + down.shape[1] * down.shape[2]
            total += 2 * _rows(x.shape, tokens) * node.attrs["k"] * per_expert
        elif node.op in ("attention", "fused_attention"):
            heads, head_dim, cached = _attention_shape(graph, node)
            total += 4 * heads * head_dim * _keys_visited(tokens, start, node.attrs["window"], cached)
    return total
