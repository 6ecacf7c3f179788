"""Op -> WGSL: each graph node becomes one or more dispatches of an archetype template from shaders/.

Templates are specialised by string substitution: shapes (the token count S is read from the per-step
uniform), the stored dtype of every weight (bf16 unpacked with a shift, f16 natively or unpacked,
f32 as is) and, for weights larger than one storage binding, the row window a dispatch covers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from string import Template
from typing import Callable

from ..graph import S, Graph, Node

WG_1D = 256
MAX_GROUPS = 65535


@dataclass(frozen=True)
class Ref:
    """A buffer a kernel binds: an activation ("node", id), a weight window ("param", name, window),
    a RoPE cos/sin table ("rope", key) or per-op scratch ("scratch", node, bytes_per_token)."""
    kind: str
    key: object
    window: int = 0


@dataclass(frozen=True)
class Binding:
    name: str
    ref: Ref
    dtype: str            # f32, u32, i32, bf16, f16
    write: bool = False


@dataclass
class Kernel:
    label: str
    source: str
    entry: str
    bindings: list[Binding]
    grid: Callable[[int], tuple[int, int, int]]      # token count -> workgroups


class LoweringError(ValueError):
    """A graph cannot be lowered to this device (e.g. a tensor too large for a binding)."""


# ---------------------------------------------------------------- helpers

def _template(name: str) -> Template:
    return Template(resources.files("meganeura.shaders").joinpath(f"{name}.wgsl").read_text())


_TEMPLATES: dict[str, Template] = {}


def render(name: str, **subs) -> str:
    if name not in _TEMPLATES:
        _TEMPLATES[name] = _template(name)
    return _TEMPLATES[name].substitute(**subs)


def lit(x: float) -> str:
    """A WGSL f32 literal."""
    r = repr(float(x))
    return r if ("." in r or "e" in r or "inf" in r) else r + ".0"


def dim(d) -> str:
    return "step.S" if d == S else f"{d}u"


def numel(shape) -> str:
    const = math.prod(d for d in shape if d != S)
    syms = sum(1 for d in shape if d == S)
    return " * ".join(["step.S"] * syms + [f"{const}u"])


def numel_at(shape, tokens: int) -> int:
    return math.prod(tokens if d == S else d for d in shape)


def grid_1d(count: int, per_group: int = WG_1D) -> tuple[int, int, int]:
    groups = max(1, -(-count // per_group))
    x = min(groups, MAX_GROUPS)
    return x, -(-groups // x), 1


def declare(bindings: list[Binding], has_f16: bool) -> str:
    """Binding declarations plus one `load_<name>(i) -> f32` accessor per read binding."""
    out = ["struct Step { S: u32, start: u32, pad0: u32, pad1: u32 }",
           "@group(0) @binding(0) var<uniform> step: Step;"]
    if has_f16 and any(b.dtype == "f16" for b in bindings):
        out.insert(0, "enable f16;")
    for slot, b in enumerate(bindings, start=1):
        access = "read_write" if b.write else "read"
        elem = {"f32": "f32", "u32": "u32", "i32": "i32", "bf16": "u32",
                "f16": "f16" if has_f16 else "u32"}[b.dtype]
        out.append(f"@group(0) @binding({slot}) var<storage, {access}> {b.name}: array<{elem}>;")
        if b.write:
            continue
        body = {
            "f32": f"return {b.name}[i];",
            "u32": f"return f32({b.name}[i]);",
            "i32": f"return f32({b.name}[i]);",
            # bf16 is the top half of an f32: shift it into place (exact).
            "bf16": f"let w = {b.name}[i >> 1u]; "
                    f"return bitcast<f32>(select(w << 16u, w & 0xffff0000u, (i & 1u) == 1u));",
            "f16": f"return f32({b.name}[i]);" if has_f16 else f"return unpack2x16float({b.name}[i >> 1u])[i & 1u];",
        }[b.dtype]
        out.append(f"fn load_{b.name}(i: u32) -> f32 {{ {body} }}")
    return "\n".join(out)


TANH = "fn tanh_(x: f32) -> f32 { let e = exp(-2.0 * abs(x)); return sign(x) * (1.0 - e) / (1.0 + e); }"


# ---------------------------------------------------------------- lowering context

@dataclass
class Context:
    graph: Graph
    has_f16: bool
    param_dtype: Callable[[str], str]                    # parameter name -> f32 / bf16 / f16
    param_windows: Callable[[str], list[tuple[int, int]]]  # parameter name -> row windows
    rope_key: Callable[[Node], int]

    def value(self, node_id: int, name: str) -> Binding:
        """Binding for an op input: a weight (whole; windowed ones are handled by their consumer) or an
        activation (reshapes are views of their source)."""
        node = self.graph[node_id]
        if node.op == "parameter":
            pname = node.attrs["name"]
            if len(self.param_windows(pname)) > 1:
                raise LoweringError(f"weight {pname} {list(node.shape)} is larger than one storage binding and "
                                    f"its consumer cannot split it into windows")
            return Binding(name, Ref("param", pname), self.param_dtype(pname))
        if node.op == "input":
            return Binding(name, Ref("node", node_id), "u32" if node.dtype in ("u32", "i32") else "f32")
        return Binding(name, Ref("node", node_id), "f32")


def lower(ctx: Context, node_id: int) -> list[Kernel]:
    node = ctx.graph[node_id]
    if node.op in ("input", "parameter", "reshape"):
        return []
    return LOWERINGS[node.op](ctx, node_id, node)


def _kernel(ctx, label, template, bindings, grid, entry="main", prelude="", **subs) -> Kernel:
    """`prelude`: helper functions placed after the declarations (an `enable` directive must come first)."""
    src = render(template, bindings=declare(bindings, ctx.has_f16) + "\n" + prelude, **subs)
    return Kernel(label, src, entry, bindings, grid)


def _out(node_id) -> Binding:
    return Binding("out", Ref("node", node_id), "f32", write=True)


def _elementwise(ctx, label: str, node: Node, bindings: list[Binding], body: str, prelude: str = "") -> Kernel:
    """A pointwise-template kernel: one invocation per element of `node`'s output."""
    return _kernel(ctx, label, "pointwise", bindings, lambda s: grid_1d(numel_at(node.shape, s)),
                   prelude=prelude, total=numel(node.shape), body=body)


# ---------------------------------------------------------------- pointwise

def _index_expr(in_shape, out_shape) -> str:
    """Flat index into a (broadcast) input for the output coordinates c0..c{r-1}."""
    if tuple(in_shape) == tuple(out_shape):
        return "i"
    r = len(out_shape)
    terms = []
    aligned = (1,) * (r - len(in_shape)) + tuple(in_shape)
    stride_expr = "1u"
    for k in range(r - 1, -1, -1):
        if aligned[k] != 1:
            terms.append(f"c{k} * {stride_expr}")
        stride_expr = f"({stride_expr} * {dim(aligned[k])})"
    return " + ".join(terms) if terms else "0u"


def _coords(out_shape) -> str:
    lines = ["    var rem = i;"]
    for k in range(len(out_shape) - 1, 0, -1):
        lines.append(f"    let c{k} = rem % {dim(out_shape[k])}; rem = rem / {dim(out_shape[k])};")
    lines.append("    let c0 = rem;")
    return "\n".join(lines)


POINTWISE_EXPR = {
    "add": "a + b",
    "mul": "a * b",
    "scale": "a * {c}",
    "silu": "a / (1.0 + exp(-a))",
    "gelu_tanh": "0.5 * a * (1.0 + tanh_(0.7978845608028654 * (a + 0.044715 * a * a * a)))",
    "softcap": "{cap} * tanh_(a / {cap})",
}


def _pointwise(ctx, node_id, node: Node) -> list[Kernel]:
    names = "ab"
    ins = [ctx.value(j, f"in_{names[k]}") for k, j in enumerate(node.inputs)]
    out_shape = node.shape
    loads = [f"    let {names[k]} = load_in_{names[k]}({_index_expr(ctx.graph[j].shape, out_shape)});"
             for k, j in enumerate(node.inputs)]
    expr = POINTWISE_EXPR[node.op].format(**{k: lit(v) for k, v in node.attrs.items()
                                             if isinstance(v, float)})
    body = "\n".join([_coords(out_shape)] + loads + [f"    out[i] = {expr};"])
    return [_elementwise(ctx, node.op, node, ins + [_out(node_id)], body, prelude=TANH if "tanh_" in expr else "")]


def _slice(ctx, node_id, node: Node) -> list[Kernel]:
    x = ctx.graph[node.inputs[0]]
    axis, start = node.attrs["axis"], node.attrs["start"]
    r = len(node.shape)
    terms, stride = [], "1u"
    for k in range(r - 1, -1, -1):
        c = f"(c{k} + {start}u)" if k == axis else f"c{k}"
        terms.append(f"{c} * {stride}")
        stride = f"({stride} * {dim(x.shape[k])})"
    body = "\n".join([_coords(node.shape), f"    out[i] = load_in_a({' + '.join(terms)});"])
    return [_elementwise(ctx, "slice", node, [ctx.value(node.inputs[0], "in_a"), _out(node_id)], body)]


def _rope(ctx, node_id, node: Node) -> list[Kernel]:
    _, n_heads, d = node.shape
    half = d // 2
    body = f"""    let j = i % {d}u;
    let s = i / ({n_heads * d}u);
    let jj = j % {half}u;
    let cs = table[(s * {half}u + jj) * 2u];
    let sn = table[(s * {half}u + jj) * 2u + 1u];
    let partner = select(i - {half}u, i + {half}u, j < {half}u);
    let rotated = select(load_in_a(partner), -load_in_a(partner), j < {half}u);
    out[i] = load_in_a(i) * cs + rotated * sn;"""
    bindings = [ctx.value(node.inputs[0], "in_a"), Binding("table", Ref("rope", ctx.rope_key(node)), "f32"),
                _out(node_id)]
    return [_elementwise(ctx, "rope", node, bindings, body)]


# ---------------------------------------------------------------- row reductions

def _rows(node: Node, width: int) -> tuple[str, Callable]:
    return f"({numel(node.shape)} / {width}u)", lambda s: grid_1d(numel_at(node.shape, s) // width, 1)


def _rms_norm(ctx, node_id, node: Node) -> list[Kernel]:
    n = node.shape[-1]
    weighted = len(node.inputs) == 2
    body = f"""    var ss = 0.0;
    for (var j = li; j < n; j = j + WG) {{ let v = load_x(base + j); ss = ss + v * v; }}
    let r = 1.0 / sqrt(reduce_sum(ss, li) / f32(n) + {lit(node.attrs['eps'])});
    for (var j = li; j < n; j = j + WG) {{
        out[base + j] = load_x(base + j) * r{' * load_w(j)' if weighted else ''};
    }}"""
    bindings = [ctx.value(node.inputs[0], "x")] + ([ctx.value(node.inputs[1], "w")] if weighted else [])
    rows, grid = _rows(node, n)
    return [_kernel(ctx, "rms_norm", "rowreduce", bindings + [_out(node_id)], grid, rows=rows, width=n,
                    body=body)]


def _softmax(ctx, node_id, node: Node) -> list[Kernel]:
    n = node.shape[-1]
    body = """    var mx = -3.0e38;
    for (var j = li; j < n; j = j + WG) { mx = max(mx, load_x(base + j)); }
    mx = reduce_max(mx, li);
    var total = 0.0;
    for (var j = li; j < n; j = j + WG) { total = total + exp(load_x(base + j) - mx); }
    total = reduce_sum(total, li);
    for (var j = li; j < n; j = j + WG) { out[base + j] = exp(load_x(base + j) - mx) / total; }"""
    rows, grid = _rows(node, n)
    return [_kernel(ctx, "softmax", "rowreduce", [ctx.value(node.inputs[0], "x"), _out(node_id)], grid,
                    rows=rows, width=n, body=body)]


def _topk_route(ctx, node_id, node: Node) -> list[Kernel]:
    n, k = node.shape[-1], node.attrs["k"]
    # Thread 0 walks the row k times, each time taking the largest entry ordered after the previous pick
    # (value descending, then index ascending: the reference's stable order).
    body = f"""    if (li == 0u) {{
        for (var j = 0u; j < n; j = j + 1u) {{ out[base + j] = 0.0; }}
        var prev_v = 3.0e38;
        var prev_i = -1;
        var picked_sum = 0.0;
        for (var t = 0u; t < {k}u; t = t + 1u) {{
            var best_v = -3.0e38;
            var best_i = -1;
            for (var j = 0u; j < n; j = j + 1u) {{
                let v = load_x(base + j);
                let after_prev = v < prev_v || (v == prev_v && i32(j) > prev_i);
                if (after_prev && (best_i < 0 || v > best_v)) {{ best_v = v; best_i = i32(j); }}
            }}
            out[base + u32(best_i)] = best_v;
            picked_sum = picked_sum + best_v;
            prev_v = best_v;
            prev_i = best_i;
        }}
        {'for (var j = 0u; j < n; j = j + 1u) { out[base + j] = out[base + j] / picked_sum; }'
         if node.attrs['normalize'] else ''}
    }}"""
    rows, grid = _rows(node, n)
    return [_kernel(ctx, "topk_route", "rowreduce", [ctx.value(node.inputs[0], "x"), _out(node_id)], grid,
                    rows=rows, width=n, body=body)]


# ---------------------------------------------------------------- matrix ops

def _matmul(ctx, node_id, node: Node) -> list[Kernel]:
    x, w = ctx.graph[node.inputs[0]], ctx.graph[node.inputs[1]]
    k = x.shape[-1]
    n_total = node.shape[-1]
    m_expr = f"({numel(x.shape)} / {k}u)"
    t = node.attrs["transpose_b"]
    windows = [(0, w.shape[0])]
    w_binding: Callable[[int], Binding] = lambda i: ctx.value(node.inputs[1], "w")
    if w.op == "parameter":
        pname = w.attrs["name"]
        windows = ctx.param_windows(pname)
        if len(windows) > 1 and not t:
            raise LoweringError(f"weight {pname} is larger than one storage binding; only [out, in] weights "
                                f"(transpose_b) can be split into windows")
        w_binding = lambda i: Binding("w", Ref("param", pname, i), ctx.param_dtype(pname))
    kernels = []
    for i, (r0, r1) in enumerate(windows):
        n = r1 - r0 if t else n_total
        load_b = "load_w(nb * K + kb)" if t else "load_w(kb * N + nb)"
        bindings = [ctx.value(node.inputs[0], "a"), w_binding(i), _out(node_id)]

        def grid(s, n=n):
            m = numel_at(x.shape, s) // k
            return -(-n // 16), -(-m // 16), 1

        kernels.append(_kernel(ctx, "matmul", "gemm", bindings, grid, m=m_expr, n=n, k=k,
                               load_a="load_a(m * K + ka)", load_b=load_b, out_stride=n_total,
                               out_col=f"{r0 if t else 0}u"))
    return kernels


def _embedding(ctx, node_id, node: Node) -> list[Kernel]:
    table = ctx.graph[node.inputs[0]]
    pname = table.attrs["name"]
    width = table.shape[1]
    ids = Binding("ids", Ref("node", node.inputs[1]), "u32")
    kernels = []
    for i, (r0, r1) in enumerate(ctx.param_windows(pname)):
        bindings = [ids, Binding("table", Ref("param", pname, i), ctx.param_dtype(pname)), _out(node_id)]
        kernels.append(_kernel(ctx, "embedding", "gather", bindings,
                               lambda s: grid_1d(numel_at(node.shape, s)),
                               rows=numel(node.shape[:-1]), width=width, row0=r0, row1=r1))
    return kernels


def _attention(ctx, node_id, node: Node) -> list[Kernel]:
    q, k = ctx.graph[node.inputs[0]], ctx.graph[node.inputs[1]]
    _, nh, d = q.shape
    nkv = k.shape[1]
    a = node.attrs
    window = a["window"]
    window_lo = f"if (qi + 1u >= {window}u) {{ lo = qi + 1u - {window}u; }}" if window else ""
    softcap = f"s = {lit(a['softcap'])} * tanh_(s / {lit(a['softcap'])});" if a["softcap"] else ""
    bindings = [ctx.value(node.inputs[0], "q"), ctx.value(node.inputs[1], "k"), ctx.value(node.inputs[2], "v"),
                _out(node_id)]
    return [_kernel(ctx, "attention", "attention", bindings, lambda s: (nh, s, 1), head_dim=d,
                   queries=dim(q.shape[0]), keys=dim(k.shape[0]), group=nh // nkv, q_heads=nh, kv_heads=nkv,
                    scale=lit(a["scale"]), window_lo=window_lo, softcap=softcap, prelude=TANH if softcap else "")]


def _moe(ctx, node_id, node: Node) -> list[Kernel]:
    x, route, gate_up, down = (ctx.graph[j] for j in node.inputs)
    e, two_im, h = gate_up.shape
    im, slots = two_im // 2, node.attrs["k"]
    act = {"silu": "fn act(a: f32) -> f32 { return a / (1.0 + exp(-a)); }",
           "gelu_tanh": TANH + "\nfn act(a: f32) -> f32 { return 0.5 * a * (1.0 + tanh_(0.7978845608028654 * "
                               "(a + 0.044715 * a * a * a))); }"}[node.attrs["act"]]
    hidden = Binding("hidden", Ref("scratch", node_id, slots * im * 4), "f32", write=True)
    subs = dict(experts=e, hidden=h, inter=im, slots=slots, prelude=act, tokens=dim(x.shape[0]))
    x_b, route_b = ctx.value(node.inputs[0], "x"), ctx.value(node.inputs[1], "route")

    def weight(j, name):
        """(binding per window, windows) of an expert tensor, whole or split by experts."""
        w = ctx.graph[node.inputs[j]]
        if w.op != "parameter":
            return [ctx.value(node.inputs[j], name)], [(0, e)]
        pname = w.attrs["name"]
        wins = ctx.param_windows(pname)
        return [Binding(name, Ref("param", pname, i), ctx.param_dtype(pname)) for i in range(len(wins))], wins

    kernels = []
    gate_up_b, gate_up_w = weight(2, "gate_up")
    down_b, down_w = weight(3, "down")
    for b, (e0, e1) in zip(gate_up_b, gate_up_w):
        kernels.append(_kernel(ctx, "moe_up", "experts", [x_b, route_b, b, down_b[0], hidden, _out(node_id)],
                               lambda s: (-(-im // 64), slots, s), entry="expert_up", e0=e0, e1=e1,
                               accumulate="total", **subs))
    for i, (b, (e0, e1)) in enumerate(zip(down_b, down_w)):
        kernels.append(_kernel(ctx, "moe_down", "experts", [x_b, route_b, gate_up_b[0], b, hidden, _out(node_id)],
                               lambda s: (-(-h // 64), min(s, MAX_GROUPS), -(-s // MAX_GROUPS)),
                               entry="expert_down", e0=e0, e1=e1,
                               accumulate="total" if i == 0 else "out[s * H + n] + total", **subs))
    return kernels


LOWERINGS = {
    "add": _pointwise, "mul": _pointwise, "scale": _pointwise, "silu": _pointwise, "gelu_tanh": _pointwise,
    "softcap": _pointwise, "slice": _slice, "rope": _rope,
    "rms_norm": _rms_norm, "softmax": _softmax, "topk_route": _topk_route,
    "matmul": _matmul, "embedding": _embedding, "attention": _attention, "moe": _moe,
}
