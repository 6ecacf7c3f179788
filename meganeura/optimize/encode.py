"""Graph -> egglog program: one `let` per node, with its shape facts, after the rules.

Attributes egglog need not see (RoPE frequency tables, attention settings, a weight's loading recipe)
stay here in side tables, and the term holds a key into them. `Id` facts tie every original node to
its e-class, so the extractor can find the roots and the shapes of the original tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..graph import Graph, Node, S


def shape_text(shape) -> str:
    return ",".join(str(d) for d in shape)


def parse_shape(text: str) -> tuple:
    return tuple(S if d == S else int(d) for d in text.split(",")) if text else ()


def f64(x: float) -> str:
    r = repr(float(x))
    return r if any(c in r for c in ".en") else r + ".0"


def q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class Encoding:
    """The egglog text for a graph and the side tables its terms point into."""
    graph: Graph
    lines: list[str] = field(default_factory=list)
    params: dict[str, Node] = field(default_factory=dict)         # key -> parameter node
    states: dict[str, Node] = field(default_factory=dict)         # name -> state node
    inputs: dict[str, int] = field(default_factory=dict)          # name -> input node id
    ropes: list[tuple] = field(default_factory=list)              # table id -> (inv_freq, attention_scaling)
    attention: dict[str, dict] = field(default_factory=dict)      # key -> attention attrs

    def rope_id(self, inv_freq, scaling) -> int:
        key = (tuple(inv_freq), float(scaling))
        if key not in self.ropes:
            self.ropes.append(key)
        return self.ropes.index(key)

    def attention_key(self, attrs: dict) -> str:
        key = " ".join(f"{k}={v}" for k, v in attrs.items())
        self.attention[key] = attrs
        return key

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _norm_mode(node: Node) -> str:
    return {None: '""', "weighted": '"weighted"', "unit": '"unit"'}[node.attrs.get("norm")]


def term(enc: Encoding, i: int) -> str:
    """The egglog term of node `i`, its inputs named by their `let`s."""
    g = enc.graph
    n = g[i]
    a = n.attrs
    v = [f"$n{j}" for j in n.inputs]
    op = n.op
    if op == "input":
        enc.inputs[a["name"]] = i
        return f"(Input {q(a['name'])} {q(shape_text(n.shape))} {q(n.dtype)})"
    if op == "parameter":
        enc.params[a["name"]] = n
        plain = a["parts"] is None and a.get("packed") is None
        return f"({'Param' if plain else 'Stacked'} {q(a['name'])} {q(shape_text(n.shape))} {q(n.dtype)})"
    if op == "state":
        enc.states[a["name"]] = n
        return f"(State {q(a['name'])} {q(shape_text(n.shape))})"
    if op == "cache_write":
        nw = v[3] if a["norm"] == "weighted" else "(Nil)"
        rope = enc.rope_id(*a["rope"]) if a["rope"] is not None else -1
        return f"(CWrite {v[0]} {v[1]} {v[2]} {a['at']} {nw} {q(a['norm'] or '')} {f64(a['eps'])} {rope})"
    if op == "matmul":
        return f"({'MatMulT' if a['transpose_b'] else 'MatMul'} {v[0]} {v[1]})"
    if op == "rope":
        return f"(Rope {v[0]} {v[1]} {enc.rope_id(a['inv_freq'], a['attention_scaling'])})"
    if op == "rms_norm":
        return f"(RmsNorm {v[0]} {v[1]} {f64(a['eps'])})" if len(v) == 2 else f"(RmsNormU {v[0]} {f64(a['eps'])})"
    if op == "attention":
        qs, ks = g[n.inputs[0]].shape, g[n.inputs[1]].shape
        cached = len(v) == 4
        key = enc.attention_key(dict(heads=qs[1], kv_heads=ks[1], head_dim=qs[2], scale=a["scale"],
                                     window=a["window"], softcap=a["softcap"], cached=cached))
        if cached:
            return f"(CachedAttention {v[0]} {v[1]} {v[2]} {v[3]} {q(key)})"
        return f"(Attention {v[0]} {v[1]} {v[2]} {q(key)})"
    if op == "fused_attention":
        rest = list(v[3:])
        qw = rest.pop(0) if a["norms"] & 1 else "(Nil)"
        kw = rest.pop(0) if a["norms"] & 2 else "(Nil)"
        pos = rest.pop(0) if a["rope"] is not None or a["cached"] else "(Nil)"
        rope = enc.rope_id(*a["rope"]) if a["rope"] is not None else -1
        key = enc.attention_key({k: a[k] for k in ("heads", "kv_heads", "head_dim", "scale", "window", "softcap",
                                                   "cached")})
        return (f"(Attn {v[0]} {v[1]} {v[2]} {a['q_at']} {a['k_at']} {a['v_at']} {a['norms']} {qw} {kw} "
                f"{f64(a['eps'])} {pos} {rope} {q(key)})")
    if op == "linear":
        rest = list(v[2:])
        nw = rest.pop(0) if a["norm"] == "weighted" else "(Nil)"
        b = rest.pop(0) if a["bias"] else "(Nil)"
        r = rest.pop(0) if a["residual"] else "(Nil)"
        return (f"(Lin {v[0]} {v[1]} {nw} {b} {r} {_norm_mode(n)} {q(a['act'] or '')} "
                f"{f64(a['softcap'] or 0.0)} {f64(a['eps'])})")
    if op == "add_norm":
        rest = list(v[2:])
        w = rest.pop(0) if a["weighted"] else "(Nil)"
        c = rest.pop(0) if a["scaled"] else "(Nil)"
        return f"(AddNorm {v[0]} {v[1]} {w} {c} {f64(a['eps'])})"
    simple = {
        "embedding": lambda: f"(Embedding {v[0]} {v[1]} {f64(a['scale'])})",
        "moe": lambda: f"(Moe {v[0]} {v[1]} {v[2]} {v[3]} {q(a['act'])} {a['k']})",
        "add": lambda: f"(Add {v[0]} {v[1]})",
        "mul": lambda: f"(Mul {v[0]} {v[1]})",
        "scale": lambda: f"(Scale {v[0]} {f64(a['c'])})",
        "silu": lambda: f"(Silu {v[0]})",
        "sigmoid": lambda: f"(Sigmoid {v[0]})",
        "gelu_tanh": lambda: f"(Gelu {v[0]})",
        "softcap": lambda: f"(Softcap {v[0]} {f64(a['cap'])})",
        "softmax": lambda: f"(Softmax {v[0]})",
        "topk_route": lambda: f"(TopK {v[0]} {a['k']} {int(a['normalize'])})",
        "reshape": lambda: f"(Reshape {v[0]} {q(shape_text(n.shape))})",
        "slice": lambda: f"(Slice {v[0]} {a['axis']} {a['start']} {a['stop']})",
        "glu": lambda: f"(Glu {q(a['act'])} {v[0]} {v[1]})",
        "last_row": lambda: f"(LastRow {v[0]})",
        "argmax": lambda: f"(Argmax {v[0]})",
    }
    if op not in simple:
        raise ValueError(f"the optimizer cannot encode op {op!r}")
    return simple[op]()


def encode(graph: Graph) -> Encoding:
    enc = Encoding(graph)
    for i, n in enumerate(graph.nodes):
        enc.lines.append(f"(let $n{i} {term(enc, i)})")
        enc.lines.append(f"(Id $n{i} {i}) (Shp $n{i} {q(shape_text(n.shape))}) (Rank $n{i} {len(n.shape)})"
                         + (f" (Last $n{i} {n.shape[-1]})" if n.shape and n.shape[-1] != S else ""))
    return enc
