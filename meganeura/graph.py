"""The tensor IR: an append-only graph of typed nodes, and the one table that says what every op is.

A node is ``(op, inputs, attrs, shape, dtype)``. Shapes hold ints and the symbol ``"S"``, the token
count, so one graph serves every prompt length. Each op has exactly one row in ``OPS``: its shape/dtype
rule, its meaning (a numpy function in ``reference.py``) and the kernel archetype that runs it on a GPU.
Shape errors are raised while the graph is built, naming the op, the shapes and the builder's caller.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from . import reference as R

S = "S"                       # the symbolic token dimension
Dim = int | str
Shape = tuple[Dim, ...]
FLOAT_DTYPES = ("f32", "f16", "bf16")
INT_DTYPES = ("i32", "u32")


class ShapeError(ValueError):
    """A node was built from inputs whose shapes or dtypes its op does not accept."""


@dataclass(frozen=True)
class Node:
    op: str
    inputs: tuple[int, ...]
    attrs: dict[str, Any]
    shape: Shape
    dtype: str


# ---------------------------------------------------------------- shape rules
# Each rule gets the input nodes and the attrs and returns (shape, dtype), or raises ShapeError.

def _fail(msg: str):
    raise ShapeError(msg)


def _same_dim(a: Dim, b: Dim) -> bool:
    return a == b


def _broadcast(a: Shape, b: Shape) -> Shape:
    out = []
    for i in range(max(len(a), len(b))):
        da = a[len(a) - 1 - i] if i < len(a) else 1
        db = b[len(b) - 1 - i] if i < len(b) else 1
        if da == db or db == 1:
            out.append(da)
        elif da == 1:
            out.append(db)
        else:
            _fail(f"cannot broadcast {a} with {b}")
    return tuple(reversed(out))


def _numel(shape: Shape) -> tuple[int, int]:
    """(product of the concrete dims, how many times S appears)."""
    n, syms = 1, 0
    for d in shape:
        if isinstance(d, str):
            syms += 1
        else:
            n *= d
    return n, syms


def _float(node: Node, what: str):
    if node.dtype not in FLOAT_DTYPES:
        _fail(f"{what} must be a float tensor, got {node.dtype}")


def _leaf(ins, a):
    return tuple(a["shape"]), a["dtype"]


def _elementwise(ins, a):
    for n in ins:
        _float(n, "operand")
    shape = ins[0].shape
    for n in ins[1:]:
        shape = _broadcast(shape, n.shape)
    return shape, "f32"


def _unary(ins, a):
    _float(ins[0], "operand")
    return ins[0].shape, "f32"


def _embedding(ins, a):
    table, ids = ins
    _float(table, "embedding table")
    if len(table.shape) != 2:
        _fail(f"embedding table must be 2-D [vocab, dim], got {table.shape}")
    if ids.dtype not in INT_DTYPES:
        _fail(f"token ids must be integers, got {ids.dtype}")
    return ids.shape + (table.shape[1],), "f32"


def _matmul(ins, a):
    x, w = ins
    _float(x, "matmul lhs")
    _float(w, "matmul rhs")
    if len(w.shape) != 2 or len(x.shape) < 1:
        _fail(f"matmul wants x[..., K] and a 2-D weight, got {x.shape} and {w.shape}")
    k, n = (w.shape[1], w.shape[0]) if a["transpose_b"] else w.shape
    if not _same_dim(x.shape[-1], k):
        _fail(f"inner dims differ: x{x.shape} @ w{w.shape}{'ᵀ' if a['transpose_b'] else ''}")
    return x.shape[:-1] + (n,), "f32"


def _rms_norm(ins, a):
    x = ins[0]
    _float(x, "rms_norm input")
    if len(ins) == 2 and ins[1].shape != (x.shape[-1],):
        _fail(f"norm weight {ins[1].shape} does not match the last dim of {x.shape}")
    return x.shape, "f32"


def _rope(ins, a):
    x, pos = ins
    _float(x, "rope input")
    if len(x.shape) != 3:
        _fail(f"rope wants [S, heads, head_dim], got {x.shape}")
    if pos.shape != () or pos.dtype not in INT_DTYPES:
        _fail(f"rope position must be an integer scalar, got {pos.shape} {pos.dtype}")
    if len(a["inv_freq"]) * 2 != x.shape[2]:
        _fail(f"rope table has {len(a['inv_freq'])} frequencies for head_dim {x.shape[2]}")
    return x.shape, "f32"


def _attention(ins, a):
    q, k, v = ins[:3]
    for n in ins[:3]:
        _float(n, "attention operand")
    if len(ins) == 4:
        _position(ins[3])
        if not isinstance(k.shape[0], int):
            _fail(f"a cache has a fixed number of slots, got {k.shape}")
    if len(q.shape) != 3 or len(k.shape) != 3 or k.shape != v.shape:
        _fail(f"attention wants q[S,nH,d], k and v [T,nKV,d], got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        _fail(f"q heads/dim {q.shape[1:]} do not fit kv heads/dim {k.shape[1:]}")
    return q.shape, "f32"


def _position(pos: Node):
    if pos.shape != () or pos.dtype not in INT_DTYPES:
        _fail(f"a position must be an integer scalar, got {pos.shape} {pos.dtype}")


def _state(ins, a):
    if any(not isinstance(d, int) for d in a["shape"]):
        _fail(f"state has a fixed shape, got {a['shape']}")
    return tuple(a["shape"]), "f32"


def _cache_write(ins, a):
    cache, x, pos = ins[:3]
    _float(x, "cached value")
    _position(pos)
    if len(cache.shape) != 3:
        _fail(f"the cache must be a [slots, heads, head_dim] state, got {cache.shape}")
    _, heads, d = cache.shape
    width = _row_width(x)
    if width == S or a["at"] + heads * d > width:
        _fail(f"{heads} heads of {d} at column {a['at']} do not fit a row of {x.shape}")
    want = 3 + (a["norm"] == "weighted")
    if len(ins) != want or (want == 4 and ins[3].shape != (d,)):
        _fail(f"expected {want} inputs (norm={a['norm']}), the norm weight [{d}] last")
    if a["rope"] is not None and len(a["rope"][0]) * 2 != d:
        _fail(f"rope table has {len(a['rope'][0])} frequencies for head_dim {d}")
    return cache.shape, "f32"


def _reshape(ins, a):
    x = ins[0]
    new = tuple(a["shape"])
    if _numel(new) != _numel(x.shape):
        _fail(f"cannot reshape {x.shape} to {new}")
    return new, x.dtype


def _slice(ins, a):
    x = ins[0]
    axis, start, stop = a["axis"], a["start"], a["stop"]
    dim = x.shape[axis]
    if isinstance(dim, str) or not (0 <= start < stop <= dim):
        _fail(f"slice [{start}:{stop}] out of range for axis {axis} of {x.shape}")
    return x.shape[:axis] + (stop - start,) + x.shape[axis + 1:], x.dtype


def _last_row(ins, a):
    x = ins[0]
    if not x.shape or x.shape[0] != S:
        _fail(f"last_row takes the last of S rows, got {x.shape}")
    return (1,) + x.shape[1:], x.dtype


def _argmax(ins, a):
    _float(ins[0], "argmax input")
    if not ins[0].shape:
        _fail("argmax wants at least one axis")
    return ins[0].shape[:-1], "u32"


def _linear(ins, a):
    x, w = ins[0], ins[1]
    _float(x, "linear input")
    _float(w, "linear weight")
    if len(w.shape) != 2 or x.shape[-1] != w.shape[1]:
        _fail(f"linear wants x[..., K] and w[N, K], got {x.shape} and {w.shape}")
    n = w.shape[0]
    if a["act"] is not None:
        if n % 2:
            _fail(f"a gated linear needs an even number of weight rows [gate; up], got {n}")
        n //= 2
    extra = list(ins[2:])
    if a["norm"] == "weighted" and extra.pop(0).shape != (x.shape[-1],):
        _fail("norm weight does not match the input width")
    if a["bias"] and extra.pop(0).shape != (w.shape[0],):
        _fail(f"bias does not match the {w.shape[0]} weight rows")
    shape = x.shape[:-1] + (n,)
    if a["residual"] and extra.pop(0).shape != shape:
        _fail(f"residual does not match the output {shape}")
    if extra:
        _fail(f"{len(extra)} inputs more than the attrs announce")
    return shape, "f32"


def _glu(ins, a):
    if ins[0].shape != ins[1].shape:
        _fail(f"gate {ins[0].shape} and up {ins[1].shape} differ")
    return _elementwise(ins, a)


def _row_width(node: Node) -> Dim:
    """Elements per token of a [tokens, ...] tensor."""
    return _numel(node.shape[1:])[0] if _numel(node.shape[1:])[1] == 0 else S


def _fused_attention(ins, a):
    q, k, v = ins[:3]
    for n in ins[:3]:
        _float(n, "attention operand")
    nh, nkv, d = a["heads"], a["kv_heads"], a["head_dim"]
    if nh % nkv or k.shape[0] != v.shape[0]:
        _fail(f"{nh} heads do not fit {nkv} kv heads, or k and v differ in length")
    for node, at, heads in ((q, a["q_at"], nh), (k, a["k_at"], nkv), (v, a["v_at"], nkv)):
        width = _row_width(node)
        if width == S or at + heads * d > width:
            _fail(f"{heads} heads of {d} at column {at} do not fit a row of {node.shape}")
    if a["cached"] and (a["norms"] & 6 or not isinstance(k.shape[0], int)):
        _fail("keys and values read from a cache were normed before they were written; the cache has fixed slots")
    want = 3 + bin(a["norms"] & 3).count("1") + (1 if a["rope"] is not None or a["cached"] else 0)
    if len(ins) != want:
        _fail(f"expected {want} inputs for norms={a['norms']} rope={a['rope'] is not None} "
              f"cached={a['cached']}, got {len(ins)}")
    if a["rope"] is not None and (len(a["rope"][0]) * 2 != d or ins[-1].shape != ()):
        _fail("rope table does not cover head_dim, or position not a scalar")
    return (q.shape[0], nh, d), "f32"


def _add_norm(ins, a):
    h, y = ins[0], ins[1]
    if h.shape != y.shape:
        _fail(f"residual {h.shape} and normed value {y.shape} differ")
    extra = list(ins[2:])
    if a["weighted"] and extra.pop(0).shape != (y.shape[-1],):
        _fail("norm weight does not match the row width")
    if a["scaled"] and extra.pop(0).shape != (1,):
        _fail("the scale must be a [1] tensor")
    return h.shape, "f32"


def _topk_route(ins, a):
    p = ins[0]
    _float(p, "router probabilities")
    if len(p.shape) != 2 or not (0 < a["k"] <= p.shape[1]):
        _fail(f"top-{a['k']} routing wants [S, experts], got {p.shape}")
    return p.shape, "f32"


def _moe(ins, a):
    x, route, gate_up, down = ins
    if len(gate_up.shape) != 3 or len(down.shape) != 3:
        _fail(f"expert weights must be 3-D, got {gate_up.shape} and {down.shape}")
    e, two_im, h = gate_up.shape
    if route.shape[-1] != e or x.shape[-1] != h or down.shape != (e, h, two_im // 2):
        _fail(f"experts do not fit: x{x.shape} route{route.shape} gate_up{gate_up.shape} down{down.shape}")
    return x.shape, "f32"


# ---------------------------------------------------------------- the op table

@dataclass(frozen=True)
class OpDef:
    rule: Callable[[list[Node], dict], tuple[Shape, str]]
    meaning: Callable | None      # numpy reference: meaning(*input_arrays, **attrs)
    archetype: str                # kernel family in shaders/


OPS: dict[str, OpDef] = {
    # leaves: values come from the caller (inputs) or the checkpoint (parameters)
    "input":      OpDef(_leaf, None, "none"),
    "parameter":  OpDef(_leaf, None, "none"),
    "state":      OpDef(_state, None, "none"),          # persistent across runs (the KV cache), zero at first
    # stateful: writes rows into a state in place; its value is the state after the write
    "cache_write": OpDef(_cache_write, R.cache_write, "rowreduce"),
    # gather
    "embedding":  OpDef(_embedding, R.embedding, "gather"),
    # matrix
    "matmul":     OpDef(_matmul, R.matmul, "gemm"),
    "moe":        OpDef(_moe, R.moe, "gemm"),
    # pointwise
    "add":        OpDef(_elementwise, R.add, "pointwise"),
    "mul":        OpDef(_elementwise, R.mul, "pointwise"),
    "scale":      OpDef(_unary, R.scale, "pointwise"),
    "silu":       OpDef(_unary, R.silu, "pointwise"),
    "gelu_tanh":  OpDef(_unary, R.gelu_tanh, "pointwise"),
    "softcap":    OpDef(_unary, R.softcap, "pointwise"),
    "sigmoid":    OpDef(_unary, R.sigmoid, "pointwise"),
    "rope":       OpDef(_rope, R.rope, "pointwise"),
    # row reductions
    "rms_norm":   OpDef(_rms_norm, R.rms_norm, "rowreduce"),
    "softmax":    OpDef(_unary, R.softmax, "rowreduce"),
    "topk_route": OpDef(_topk_route, R.topk_route, "rowreduce"),
    "argmax":     OpDef(_argmax, R.argmax, "rowreduce"),
    # attention
    "attention":  OpDef(_attention, R.attention, "attention"),
    # fused ops: only the optimizer makes these (meganeura/optimize/rules.py says when)
    "glu":             OpDef(_glu, R.glu, "pointwise"),
    "linear":          OpDef(_linear, R.linear, "gemm"),
    "fused_attention": OpDef(_fused_attention, R.fused_attention, "attention"),
    "add_norm":        OpDef(_add_norm, R.add_norm, "rowreduce"),
    # views
    "reshape":    OpDef(_reshape, R.reshape, "view"),
    "slice":      OpDef(_slice, R.slice_, "copy"),
    "last_row":   OpDef(_last_row, R.last_row, "copy"),
}


# ---------------------------------------------------------------- the graph

def _caller() -> str:
    """The first stack frame outside this file: where the user built the bad node."""
    here = os.path.abspath(__file__)
    for frame in reversed(traceback.extract_stack()[:-1]):
        if os.path.abspath(frame.filename) != here:
            return f"{frame.filename}:{frame.lineno}"
    return "?"


@dataclass
class Graph:
    nodes: list[Node] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)      # node -> output name
    outputs: list[int] = field(default_factory=list)

    # -- core
    def add_node(self, op: str, inputs: tuple[int, ...] = (), **attrs) -> int:
        if op not in OPS:
            raise ShapeError(f"unknown op {op!r}")
        ins = [self.nodes[i] for i in inputs]
        try:
            shape, dtype = OPS[op].rule(ins, attrs)
        except ShapeError as e:
            shapes = ", ".join(str(n.shape) for n in ins)
            raise ShapeError(f"{op}({shapes}): {e} (built at {_caller()})") from None
        self.nodes.append(Node(op, tuple(inputs), attrs, shape, dtype))
        return len(self.nodes) - 1

    def __getitem__(self, i: int) -> Node:
        return self.nodes[i]

    def __len__(self) -> int:
        return len(self.nodes)

    def named(self, name: str, node: int) -> int:
        self.names[node] = name
        return node

    def set_outputs(self, outputs):
        if isinstance(outputs, dict):
            for name, node in outputs.items():
                self.names[node] = name
            outputs = list(outputs.values())
        self.outputs = list(outputs)
        for i, node in enumerate(self.outputs):
            self.names.setdefault(node, f"output_{i}")

    def output_names(self) -> list[str]:
        return [self.names[n] for n in self.outputs]

    def leaves(self, op: str) -> dict[str, int]:
        return {n.attrs["name"]: i for i, n in enumerate(self.nodes) if n.op == op}

    # -- builders (one per op)
    def input(self, name: str, shape: Shape, dtype: str = "f32", default=None) -> int:
        return self.add_node("input", name=name, shape=tuple(shape), dtype=dtype, default=default)

    def parameter(self, name: str, shape: Shape, *, fallback: str | None = None, parts=None,
                  packed=None, dtype: str = "f32") -> int:
        """A checkpoint tensor. `fallback` names the tensor to use if `name` is absent (tied weights);
        `parts` lists on-disk tensors stacked along a new axis 0, each a list concatenated along
        its axis 0 (experts saved one file entry each); `packed` lists (name, fallback) pairs of tensors
        concatenated along axis 0 (the optimizer's fused Q|K|V and gate|up weights, packed once at load).
        `dtype` is the type the graph may assume it is stored in (packing needs equal ones)."""
        return self.add_node("parameter", name=name, shape=tuple(shape), dtype=dtype,
                             fallback=fallback, parts=parts, packed=packed)

    def state(self, name: str, shape: Shape) -> int:
        """A float32 tensor that lives across runs of the program (a KV cache), zero before the first."""
        return self.add_node("state", name=name, shape=tuple(shape), dtype="f32")

    def cache_write(self, cache: int, x: int, pos: int, *, at: int = 0, norm: str | None = None,
                    norm_w: int | None = None, eps: float = 0.0, rope=None) -> int:
        """Write the S rows of x [S, heads, head_dim] into `cache` [slots, heads, head_dim] at slots
        (pos + i) mod slots, in place; the value is the cache after the write (attention reads it, which
        orders the write first). The optimizer's fused form reads the heads at column `at` of x's rows and
        RMS-norms (norm "weighted" with norm_w, or "unit") and rotates them (rope = (inv_freq, scaling))
        on the way in."""
        if self.nodes[cache].op != "state":
            raise ShapeError(f"cache_write writes into a state, not a {self.nodes[cache].op} (built at {_caller()})")
        ins = (cache, x, pos) + ((norm_w,) if norm_w is not None else ())
        rope = None if rope is None else (tuple(float(f) for f in rope[0]), float(rope[1]))
        return self.add_node("cache_write", ins, at=int(at), norm=norm, eps=float(eps), rope=rope)

    def embedding(self, table: int, ids: int, scale: float = 1.0) -> int:
        """Rows `ids` of `table`, times `scale`."""
        return self.add_node("embedding", (table, ids), scale=float(scale))

    def matmul(self, x: int, w: int, transpose_b: bool = False) -> int:
        return self.add_node("matmul", (x, w), transpose_b=transpose_b)

    def linear(self, x: int, w: int, b: int | None = None) -> int:
        """HF nn.Linear: x @ W.T (+ b), W stored [out, in]."""
        y = self.matmul(x, w, transpose_b=True)
        return y if b is None else self.add(y, b)

    def add(self, a: int, b: int) -> int:
        return self.add_node("add", (a, b))

    def mul(self, a: int, b: int) -> int:
        return self.add_node("mul", (a, b))

    def scale(self, x: int, c: float) -> int:
        return self.add_node("scale", (x,), c=float(c))

    def silu(self, x: int) -> int:
        return self.add_node("silu", (x,))

    def gelu_tanh(self, x: int) -> int:
        return self.add_node("gelu_tanh", (x,))

    def softcap(self, x: int, cap: float) -> int:
        return self.add_node("softcap", (x,), cap=float(cap))

    def rms_norm(self, x: int, w: int | None, eps: float) -> int:
        return self.add_node("rms_norm", (x,) if w is None else (x, w), eps=float(eps))

    def sigmoid(self, x: int) -> int:
        return self.add_node("sigmoid", (x,))

    def softmax(self, x: int) -> int:
        return self.add_node("softmax", (x,))

    def rope(self, x: int, pos: int, inv_freq, attention_scaling: float = 1.0) -> int:
        return self.add_node("rope", (x, pos), inv_freq=tuple(float(f) for f in inv_freq),
                             attention_scaling=float(attention_scaling))

    def attention(self, q: int, k: int, v: int, scale: float, window: int | None = None,
                  softcap: float | None = None, pos: int | None = None) -> int:
        """Causal attention over [S, heads, head_dim]; GQA when k/v have fewer heads than q.
        A sliding `window` w lets query i see keys i-w+1 .. i. With `pos`, k and v are caches
        [slots, kv_heads, head_dim]: query i is at position p = pos + i and sees the keys of positions
        max(0, p-w+1) .. p, position j held in slot j mod slots."""
        ins = (q, k, v) + ((pos,) if pos is not None else ())
        return self.add_node("attention", ins, scale=float(scale), window=window, softcap=softcap)

    def reshape(self, x: int, shape: Shape) -> int:
        return self.add_node("reshape", (x,), shape=tuple(shape))

    def slice(self, x: int, axis: int, start: int, stop: int) -> int:
        return self.add_node("slice", (x,), axis=axis, start=start, stop=stop)

    def last_row(self, x: int) -> int:
        """[S, ...] -> [1, ...]: the step's last token (all a generating model needs logits for)."""
        return self.add_node("last_row", (x,))

    def argmax(self, x: int) -> int:
        """Index of the largest entry along the last axis (the first one on ties), as u32."""
        return self.add_node("argmax", (x,))

    def topk_route(self, p: int, k: int, normalize: bool) -> int:
        """Dense [S, E] routing weights: the k largest of p per row (renormalised if asked), 0 elsewhere."""
        return self.add_node("topk_route", (p,), k=int(k), normalize=bool(normalize))

    def moe(self, x: int, route: int, gate_up: int, down: int, act: str, k: int) -> int:
        """sum_e route[:, e] * down_e(act(gate_e(x)) * up_e(x)), gate_up packed [E, 2*Im, H] gate first;
        each token routes to at most `k` experts (the non-zero entries of its `route` row)."""
        return self.add_node("moe", (x, route, gate_up, down), act=act, k=int(k))

    # -- fused ops (made by the optimizer; usable directly)
    def glu(self, gate: int, up: int, act: str) -> int:
        """act(gate) * up: SwiGLU (act="silu") and GeGLU (act="gelu_tanh")."""
        return self.add_node("glu", (gate, up), act=act)

    def fused_linear(self, x: int, w: int, *, norm: str | None = None, norm_w: int | None = None,
                     eps: float = 0.0, bias: int | None = None, act: str | None = None,
                     softcap: float | None = None, residual: int | None = None) -> int:
        """One GEMM with everything around it: y = rms_norm(x) @ w.T + bias (norm: None, "weighted",
        "unit"); act gates it (w holds [gate; up] rows: act(y_gate) * y_up); then softcap; then + residual."""
        ins = (x, w) + tuple(i for i in (norm_w, bias, residual) if i is not None)
        return self.add_node("linear", ins, norm=norm, eps=float(eps), bias=bias is not None, act=act,
                             softcap=None if softcap is None else float(softcap), residual=residual is not None)

    def fused_attention(self, q: int, k: int, v: int, *, heads: int, kv_heads: int, head_dim: int,
                        q_at: int = 0, k_at: int = 0, v_at: int = 0, norms: int = 0, q_norm_w: int | None = None,
                        k_norm_w: int | None = None, eps: float = 0.0, pos: int | None = None, rope=None,
                        scale: float = 1.0, window: int | None = None, softcap: float | None = None,
                        cached: bool = False) -> int:
        """Attention that reads its heads straight from projection outputs: head h of q is the `head_dim`
        columns at q_at + h*head_dim of each token's row (likewise k, v), so one packed Q|K|V tensor
        serves all three. On load: RMS-norm q (norms bit 1, weight q_norm_w), k (bit 2, k_norm_w),
        v (bit 4, no weight); then RoPE q and k by `rope` = (inv_freq, attention_scaling) at `pos`.
        `cached`: k and v are caches as in `attention(..., pos=)`, already normed and rotated (only q is)."""
        ins = (q, k, v) + tuple(i for i in (q_norm_w, k_norm_w, pos) if i is not None)
        rope = None if rope is None else (tuple(float(f) for f in rope[0]), float(rope[1]))
        return self.add_node("fused_attention", ins, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                             q_at=q_at, k_at=k_at, v_at=v_at, norms=int(norms), eps=float(eps), rope=rope,
                             scale=float(scale), window=window, softcap=softcap, cached=bool(cached))

    def add_norm(self, h: int, y: int, w: int | None, eps: float, scale_by: int | None = None) -> int:
        """(h + rms_norm(y, w)) * scale_by: a post-norm residual add, optionally with a [1] layer scalar."""
        ins = (h, y) + tuple(i for i in (w, scale_by) if i is not None)
        return self.add_node("add_norm", ins, eps=float(eps), weighted=w is not None, scaled=scale_by is not None)

    # -- reading
    def summary(self) -> str:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return ", ".join(f"{k}×{v}" for k, v in sorted(counts.items()))

    def to_text(self) -> str:
        """One line per node: `%i = op(%inputs) attrs : shape dtype` (weights by name)."""
        lines = []
        for i, n in enumerate(self.nodes):
            if n.op in ("parameter", "input", "state"):
                lines.append(f"%{i} = {n.op} {n.attrs['name']} : {n.shape} {n.dtype}")
                continue
            attrs = {k: v for k, v in n.attrs.items()
                     if v is not None and v is not False and k not in ("inv_freq", "rope")}
            if n.attrs.get("rope") is not None or "inv_freq" in n.attrs:
                attrs["rope"] = "on"
            args = ", ".join(f"%{j}" for j in n.inputs)
            shown = " ".join(f"{k}={v}" for k, v in attrs.items())
            lines.append(f"%{i} = {n.op}({args}){' ' + shown if shown else ''} : {n.shape}")
        return "\n".join(lines)
