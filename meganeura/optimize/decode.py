"""E-nodes back to graph ops: one table says which IR op every term constructor is.

The same table gives the extractor each e-class's shape (through the op's own shape rule in
graph.OPS) and gives `emit` the node to append to the optimized graph.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

from ..graph import OPS, Graph, Node, S, ShapeError
from .encode import parse_shape


@dataclass(frozen=True)
class ClassRef:
    cid: str


@dataclass(frozen=True)
class ENode:
    op: str
    args: tuple        # literals and ClassRefs, in the constructor's order


@dataclass
class Lowered:
    op: str                 # an IR op, or "input" / "parameter" / "pack" / "nil"
    attrs: dict
    inputs: list            # ClassRefs in the IR op's input order
    kernel: bool            # does running it cost a dispatch?

    def flops(self, in_shapes, out_shape, tokens: int) -> int:
        def n(shape):
            return math.prod(tokens if d == S else d for d in shape)
        if self.op in ("linear", "matmul"):
            k = in_shapes[0][-1]
            w = in_shapes[1]
            return 2 * (n(in_shapes[0]) // k) * k * (w[0] if self.op == "linear" else n(w) // k)
        if self.op in ("attention", "fused_attention"):
            return 4 * n(out_shape) * (tokens if in_shapes[1][0] == S else in_shapes[1][0])
        return n(out_shape)


def _opt(ref) -> list:
    return [] if ref is None else [ref]


def _lower_lin(a, t):
    x, w, nw, b, r, norm, act, cap, eps = a
    return Lowered("linear", dict(norm=norm or None, eps=eps, bias=b is not None, act=act or None,
                                  softcap=cap or None, residual=r is not None),
                   [x, w] + (_opt(nw) if norm == "weighted" else []) + _opt(b) + _opt(r), True)


def _lower_attn(a, t):
    q, k, v, q_at, k_at, v_at, norms, qw, kw, eps, pos, rope, key = a
    attrs = dict(t.attention[key], q_at=q_at, k_at=k_at, v_at=v_at, norms=norms, eps=eps,
                 rope=t.ropes[rope] if rope >= 0 else None)
    ins = [q, k, v] + (_opt(qw) if norms & 1 else []) + (_opt(kw) if norms & 2 else []) + \
        (_opt(pos) if rope >= 0 or attrs["cached"] else [])
    return Lowered("fused_attention", attrs, ins, True)


def _lower_attention(a, t):
    attrs = t.attention[a[-1]]
    return Lowered("attention", dict(scale=attrs["scale"], window=attrs["window"], softcap=attrs["softcap"]),
                   list(a[:-1]), True)


def _lower_cache_write(a, t):
    c, x, pos, at, nw, norm, eps, rope = a
    return Lowered("cache_write", dict(at=at, norm=norm or None, eps=eps, rope=t.ropes[rope] if rope >= 0 else None),
                   [c, x, pos] + (_opt(nw) if norm == "weighted" else []), True)


def _k(op, **fixed):
    """A constructor whose class arguments are the op's inputs and whose literals are named attrs."""
    names = list(fixed.pop("attrs", ()))

    def lower(a, t):
        refs = [x for x in a if isinstance(x, ClassRef)]
        lits = [x for x in a if not isinstance(x, ClassRef)]
        return Lowered(op, dict(zip(names, lits), **fixed), refs, True)
    return lower


LOWER: dict[str, Callable] = {
    "Input": lambda a, t: Lowered("input", dict(name=a[0], shape=parse_shape(a[1]), dtype=a[2]), [], False),
    "Param": lambda a, t: Lowered("parameter", dict(name=a[0]), [], False),
    "State": lambda a, t: Lowered("state", dict(name=a[0], shape=parse_shape(a[1])), [], False),
    "Stacked": lambda a, t: Lowered("parameter", dict(name=a[0]), [], False),
    "Pack2": lambda a, t: Lowered("pack", {}, list(a), False),
    "Pack3": lambda a, t: Lowered("pack", {}, list(a), False),
    "Nil": lambda a, t: Lowered("nil", {}, [], False),
    "Embedding": _k("embedding", attrs=("scale",)),
    "MatMul": _k("matmul", transpose_b=False),
    "MatMulT": _k("matmul", transpose_b=True),
    "Moe": _k("moe", attrs=("act", "k")),
    "Add": _k("add"),
    "Mul": _k("mul"),
    "Scale": _k("scale", attrs=("c",)),
    "Silu": _k("silu"),
    "Sigmoid": _k("sigmoid"),
    "Gelu": _k("gelu_tanh"),
    "Softcap": _k("softcap", attrs=("cap",)),
    "Rope": lambda a, t: Lowered("rope", dict(inv_freq=t.ropes[a[2]][0], attention_scaling=t.ropes[a[2]][1]),
                                 [a[0], a[1]], True),
    "RmsNorm": _k("rms_norm", attrs=("eps",)),
    "RmsNormU": _k("rms_norm", attrs=("eps",)),
    "Softmax": _k("softmax"),
    "TopK": lambda a, t: Lowered("topk_route", dict(k=a[1], normalize=bool(a[2])), [a[0]], True),
    "Attention": _lower_attention,
    "CachedAttention": _lower_attention,
    "CWrite": _lower_cache_write,
    "Reshape": lambda a, t: Lowered("reshape", dict(shape=parse_shape(a[1])), [a[0]], False),
    "Slice": _k("slice", attrs=("axis", "start", "stop")),
    "LastRow": _k("last_row"),
    "Argmax": _k("argmax"),
    "Glu": lambda a, t: Lowered("glu", dict(act=a[0]), [a[1], a[2]], True),
    "Lin": _lower_lin,
    "Attn": _lower_attn,
    "AddNorm": lambda a, t: Lowered("add_norm", dict(eps=a[4], weighted=a[2] is not None, scaled=a[3] is not None),
                                    [a[0], a[1]] + _opt(a[2]) + _opt(a[3]), True),
}


def lower_enode(enode: ENode, tables, nil: Callable[[object], bool] | None = None) -> Lowered:
    """The IR op an e-node stands for. Optional operands that are (Nil) come through as None."""
    args = tuple(None if nil is not None and nil(x) else x for x in enode.args)
    return LOWER[enode.op](args, tables)


PARAM_BYTES = {"f32": 4, "f16": 2, "bf16": 2}


def nbytes(shape, dtype: str, tokens: int) -> int:
    """Bytes of a tensor at `tokens` tokens (16-bit weights at 2 bytes, everything else at 4)."""
    return math.prod(tokens if d == S else d for d in shape) * PARAM_BYTES.get(dtype, 4)


def shape_info(lowered: Lowered, child_infos: dict, tables, tokens: int):
    """(shape, dtype, bytes at `tokens`) of the value a lowered e-node makes, or None for (Nil)."""
    if lowered.op == "nil":
        return None
    if lowered.op == "input":
        a = lowered.attrs
        return a["shape"], a["dtype"], nbytes(a["shape"], a["dtype"], tokens)
    if lowered.op == "parameter":
        node = tables.params[lowered.attrs["name"]]
        return node.shape, node.dtype, nbytes(node.shape, node.dtype, tokens)
    if lowered.op == "state":
        return lowered.attrs["shape"], "f32", nbytes(lowered.attrs["shape"], "f32", tokens)
    infos = [child_infos[r.cid] for r in lowered.inputs]
    if lowered.op == "pack":
        first = infos[0][0]
        shape = (sum(i[0][0] for i in infos),) + tuple(first[1:])
        return shape, infos[0][1], sum(i[2] for i in infos)
    fake = [Node("?", (), {}, i[0], i[1]) for i in infos]
    try:
        shape, dtype = OPS[lowered.op].rule(fake, lowered.attrs)
    except ShapeError:
        return None
    return shape, dtype, nbytes(shape, "f32", tokens)


def packed_name(names: list[str]) -> str:
    """`a.q_proj.weight`, `a.k_proj.weight` -> `a.q_proj|k_proj.weight`: what was packed, readably."""
    head = names[0][:len(os.path.commonprefix(names))]
    head = head[:head.rfind(".") + 1]
    tails = [n[len(head):] for n in names]
    rev = os.path.commonprefix([t[::-1] for t in tails])[::-1]
    tail = rev[rev.find("."):] if "." in rev else ""
    return head + "|".join(t[:len(t) - len(tail)] for t in tails) + tail


class Emitter:
    """Appends the chosen e-nodes to a graph, each class once, inputs first."""

    def __init__(self, graph: Graph, best: dict, tables, nil_class: str | None, leaf: Callable[[str, dict], int]):
        self.g, self.best, self.tables, self.nil_class, self.leaf = graph, best, tables, nil_class, leaf
        self.done: dict[str, int] = {}
        self.params: dict[str, int] = {n.attrs["name"]: i for i, n in enumerate(graph.nodes) if n.op == "parameter"}

    def lowered(self, cid: str) -> Lowered:
        return lower_enode(self.best[cid], self.tables, nil=lambda x: isinstance(x, ClassRef) and x.cid == self.nil_class)

    def param(self, name: str, shape, **attrs) -> int:
        if name not in self.params:
            self.params[name] = self.g.parameter(name, shape, **attrs)
        return self.params[name]

    def emit(self, cid: str) -> int:
        stack = [cid]
        while stack:
            top = stack[-1]
            if top in self.done:
                stack.pop()
                continue
            low = self.lowered(top)
            todo = [r.cid for r in low.inputs if r.cid not in self.done] if low.op != "pack" else []
            if todo:
                stack.extend(todo)
                continue
            stack.pop()
            self.done[top] = self._make(low)
        return self.done[cid]

    def _make(self, low: Lowered) -> int:
        if low.op in ("input", "state"):
            return self.leaf(low.op, low.attrs)
        if low.op == "parameter":
            n = self.tables.params[low.attrs["name"]]
            a = n.attrs
            return self.param(a["name"], n.shape, fallback=a["fallback"], parts=a["parts"],
                              packed=a.get("packed"), dtype=n.dtype)
        if low.op == "pack":
            members = [self.tables.params[self.lowered(r.cid).attrs["name"]] for r in low.inputs]
            shape = (sum(m.shape[0] for m in members),) + tuple(members[0].shape[1:])
            return self.param(packed_name([m.attrs["name"] for m in members]), shape,
                              packed=tuple((m.attrs["name"], m.attrs["fallback"]) for m in members),
                              dtype=members[0].dtype)
        return self.g.add_node(low.op, tuple(self.done[r.cid] for r in low.inputs), **low.attrs)
