"""Buffer planning: which arena slot holds each activation, by liveness, for a given token capacity;
and the row windows a weight is split into, one buffer each, so each fits one storage binding.

Reshapes are views (they share their source's slot); a cache write's value is its state, which lives
outside the arena (states persist across steps). A slot is reused by a later value once every
reader of its current value (every node with a kernel that binds it) has been dispatched; graph outputs
and inputs keep their slots. Per-op scratch lives only during its op, sized for the largest step its
kernels run for.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import quant
from ..graph import Graph
from .kernels import Kernel, numel_at


def base_of(graph: Graph, node_id: int) -> int:
    """The node whose storage `node_id` views (following reshapes and cache writes to their state)."""
    while graph[node_id].op in ("reshape", "cache_write"):
        node_id = graph[node_id].inputs[0]
    return node_id


def padded(nbytes: int) -> int:
    """Buffer and copy sizes: a multiple of 16 bytes, never zero."""
    return max(16, -(-nbytes // 16) * 16)


def weight_windows(shape, itemsize: float, max_binding: int, fmt: quant.Format | None = None) -> list[tuple[int, int]]:
    """Row ranges of a weight (along axis 0), each within one storage binding of `max_binding` bytes;
    `itemsize` is the stored element size, or `fmt` its quantized format (a quantized window's two planes
    each end on a word: 8 bytes of slack). A row larger than a binding is a ValueError."""
    rows = shape[0] if shape else 1
    row_elems = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    if fmt is not None:
        row_bytes = row_elems * fmt.bits // 8 + 2 * (row_elems // fmt.group_of(shape[-1]))   # quants, scales
        room = max_binding - 8
    else:
        row_bytes, room = row_elems * itemsize, max_binding
    per = max(1, room // max(1, row_bytes))
    if fmt is None and itemsize == 2 and row_elems % 2 and per > 1:
        per -= per % 2                  # keep every window 4-byte aligned
    if row_bytes > room:
        raise ValueError(f"one row of a {list(shape)} weight ({row_bytes} bytes) exceeds the device's "
                         f"storage binding limit of {max_binding} bytes")
    return [(r, min(rows, r + per)) for r in range(0, rows, per)] or [(0, rows)]


def value_bytes(graph: Graph, node_id: int, tokens: int) -> int:
    return padded(numel_at(graph[node_id].shape, tokens) * 4)


@dataclass
class ArenaPlan:
    capacity: int
    slot_sizes: list[int] = field(default_factory=list)
    value_slot: dict[int, int] = field(default_factory=dict)      # base node -> slot
    scratch_slot: dict[int, int] = field(default_factory=dict)    # node with scratch -> slot


def plan_arena(graph: Graph, kernels: dict[int, list[Kernel]], capacity: int) -> ArenaPlan:
    plan = ArenaPlan(capacity)
    # What each node's kernels read: its inputs, and any value they bind besides (a product computing the
    # add_norm before it in its prologue reads that one's inputs).
    reads = [{base_of(graph, j) for j in node.inputs} |
             {base_of(graph, b.ref.key) for k in kernels.get(i, []) for b in k.bindings if b.ref.kind == "node"}
             - {i} for i, node in enumerate(graph.nodes)]
    last_use: dict[int, int] = {}
    for i, values in enumerate(reads):
        for j in values:
            last_use[j] = i
    pinned = {base_of(graph, o) for o in graph.outputs}
    pinned |= {i for i, n in enumerate(graph.nodes) if n.op == "input" and n.shape != ()}
    free: list[int] = []

    def take(nbytes: int) -> int:
        fits = [s for s in free if plan.slot_sizes[s] >= nbytes]
        if fits:
            best = min(fits, key=lambda s: plan.slot_sizes[s])
            free.remove(best)
            return best
        plan.slot_sizes.append(nbytes)
        return len(plan.slot_sizes) - 1

    for i, node in enumerate(graph.nodes):
        views = node.op in ("parameter", "state", "reshape", "cache_write")
        if not views and not (node.op == "input" and node.shape == ()):
            plan.value_slot[i] = take(value_bytes(graph, i, capacity))
            users = [(b.ref, k.tokens[1]) for k in kernels.get(i, []) for b in k.bindings if b.ref.kind == "scratch"]
            if users:   # window: bytes per token; only steps the scratch's kernels run for need room
                tokens = min(capacity, max(most for _, most in users))
                plan.scratch_slot[i] = take(padded(users[0][0].window * tokens))
                free.append(plan.scratch_slot[i])
        for j in reads[i]:
            if last_use.get(j) == i and j in plan.value_slot and j not in pinned:
                free.append(plan.value_slot[j])
    return plan
