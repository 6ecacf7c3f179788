"""Op -> WGSL: each graph node becomes one or more dispatches of an archetype template from shaders/.

Templates are specialised by string substitution: shapes (the token count S is read from the per-step
uniform), the stored dtype of every weight (bf16 unpacked with a shift, f16 natively or unpacked,
f32 as is, q8/q4 dequantized from their two planes, see meganeura/quant.py) and, for weights larger than
one storage binding, the row window a dispatch covers.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from importlib import resources
from string import Template
from typing import Callable

from ..graph import S, Graph, Node

WG_1D = 256
MAX_GROUPS = 65535
# The cores this process may run on: a CPU device (lavapipe) runs a thread per core.
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
# lavapipe ends every loop of an invocation, silently, once the invocation has made 65535 loop iterations
# in all (gallivm's loop limiter), so a kernel whose invocations walk rows or packs in a loop keeps each
# invocation below this many, with room for its other loops.
LOOP_TRIPS = 32768


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
    dtype: str            # f32, u32, i32, bf16, f16, q8, q4
    write: bool = False
    packs: bool = False   # read as packs of 8 elements (`pack_<name>(i)`: elements 8i..8i+7), see stream.wgsl
    group: int = 0        # q8/q4: elements per scale
    scales_at: int = 0    # q8/q4: the word where the scale plane begins
    texture: bool = False  # read through a texture (see TEXEL_ROW) rather than a storage buffer
    quads: bool = False   # f32 held as vec4s: `quad_<name>(q)` reads elements 4q..4q+3, a write stores a vec4
    reads: bool = False   # a write binding the kernel reads too: read_write, with a read binding's accessors


@dataclass
class Kernel:
    label: str
    source: str
    entry: str
    bindings: list[Binding]
    grid: Callable[[int], tuple[int, int, int]]      # token count -> workgroups
    tokens: tuple[int, float] = (1, math.inf)        # the step sizes this variant runs for (inclusive)

    def runs_for(self, tokens: int) -> bool:
        return self.tokens[0] <= tokens <= self.tokens[1]


@dataclass(frozen=True)
class LanePiece:
    """An attention's one-token lanes as the product after it runs them (`_attention_reader`): the bindings
    and helpers they need, the source defining `attend(lane, writer)`, and its output's floats (`att`)."""
    bindings: list[Binding]
    parts: list[str]
    source: str
    width: int


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
        if b.texture:
            out += _declare_texture(slot, b)
            continue
        if b.dtype in QUANTIZED:
            out += _declare_quantized(slot, b)
            continue
        if b.packs:
            out += _declare_packs(slot, b)
            continue
        if b.quads:
            # One 16-byte access where lavapipe would take four, each a loop over the SIMD lanes.
            out.append(f"@group(0) @binding({slot}) var<storage, {access}> {b.name}: array<vec4<f32>>;")
            if not b.write or b.reads:
                out += [f"fn quad_{b.name}(at: u32) -> vec4<f32> {{ return {b.name}[at]; }}",
                        f"fn load_{b.name}(i: u32) -> f32 {{ return {b.name}[i >> 2u][i & 3u]; }}"]
            continue
        elem = {"f32": "f32", "u32": "u32", "i32": "i32", "bf16": "u32",
                "f16": "f16" if has_f16 else "u32"}[b.dtype]
        out.append(f"@group(0) @binding({slot}) var<storage, {access}> {b.name}: array<{elem}>;")
        if b.write and not b.reads:
            continue
        body = {
            "f32": f"return {b.name}[i];",
            "u32": f"return f32({b.name}[i]);",
            "i32": f"return f32({b.name}[i]);",
            "bf16": f"let w = {b.name}[i >> 1u]; {BF16_SELECT}",
            "f16": f"return f32({b.name}[i]);" if has_f16 else
                   f"let v = unpack2x16float({b.name}[i >> 1u]); return select(v.x, v.y, (i & 1u) == 1u);",
        }[b.dtype]
        out.append(f"fn load_{b.name}(i: u32) -> f32 {{ {body} }}")
        if b.dtype == "bf16":       # elements i..i+3 (4 | i)
            words = f"vec2<u32>({b.name}[i >> 1u], {b.name}[(i >> 1u) + 1u])"
            out.append(f"fn load4_{b.name}(i: u32) -> vec4<f32> {{ return {BF16_QUAD.format(words)}; }}")
    return "\n".join(out)


# A texture holds a buffer's bytes in order, 16 to a texel (rgba32uint), TEXEL_ROW texels to a row: texel t
# is at (t % TEXEL_ROW, t / TEXEL_ROW). Lavapipe fetches texels with plain vector loads but reads a storage
# buffer one lane at a time behind a branch, so on a CPU device weights and the activations a GEMM streams
# are read through textures (several times faster, see stream_read_rounds in meganeura.backend.ceilings).
# They are bound as read-only storage textures, not sampled ones: a storage texture has no mip levels, so a
# fetch skips the level's lookups and clamps, and lavapipe streams it about 1.5x faster.
TEXEL_ROW = 4096


def _declare_texture(slot: int, b: Binding) -> list[str]:
    """A read-only storage texture, `texel_<name>(t)` and `word_<name>(j)` (u32 word j), and the accessors a
    storage binding of the same dtype has, read through them; or a write-only one and `store_<name>(t, v)`;
    or (`reads`) a read_write one with both."""
    name, shift = b.name, TEXEL_ROW.bit_length() - 1
    store = (f"fn store_{name}(t: u32, value: vec4<u32>) {{ textureStore({name}, vec2<u32>(t & {TEXEL_ROW - 1}u, "
             f"t >> {shift}u), value); }}")
    if b.write and not b.reads:
        return [f"@group(0) @binding({slot}) var {name}: texture_storage_2d<rgba32uint, write>;", store]
    texel, word = f"texel_{name}", f"word_{name}"
    access = "read_write" if b.write else "read"
    out = [f"@group(0) @binding({slot}) var {name}: texture_storage_2d<rgba32uint, {access}>;", *[store] * b.write,
           f"fn {texel}(t: u32) -> vec4<u32> {{ return textureLoad({name}, vec2<u32>(t & {TEXEL_ROW - 1}u, "
           f"t >> {shift}u)); }}",
           f"fn {word}(j: u32) -> u32 {{ return {texel}(j >> 2u)[j & 3u]; }}"]
    if b.dtype in QUANTIZED:
        return out + _quantized_accessors(b, lambda j: f"{word}({j})",
                                          lambda i: f"{texel}({i} >> 1u)[2u * ({i} & 1u) + {{c}}u]")
    if b.packs:
        if b.dtype == "f32":
            return out + [f"fn pack_{name}(i: u32) -> Pack {{ return Pack(bitcast<vec4<f32>>({texel}(2u * i)), "
                          f"bitcast<vec4<f32>>({texel}(2u * i + 1u)), 1.0); }}"]
        return out + [f"fn pack_{name}(i: u32) -> Pack {{ let q = {texel}(i); return {PACK_UNPACK[b.dtype]}; }}"]
    if b.dtype == "f32":
        out.append(f"fn quad_{name}(at: u32) -> vec4<f32> {{ return bitcast<vec4<f32>>({texel}(at)); }}")
    body = {"f32": f"return bitcast<f32>({word}(i));",
            "u32": f"return f32({word}(i));",
            "i32": f"return f32(bitcast<i32>({word}(i)));",
            "bf16": f"let w = {word}(i >> 1u); {BF16_SELECT}",
            "f16": f"let v = unpack2x16float({word}(i >> 1u)); return select(v.x, v.y, (i & 1u) == 1u);"}[b.dtype]
    out.append(f"fn load_{name}(i: u32) -> f32 {{ {body} }}")
    if b.dtype == "bf16":           # elements i..i+3 (4 | i): half a texel, one fetch
        out.append(f"fn load4_{name}(i: u32) -> vec4<f32> {{ let t = {texel}(i >> 3u); "
                   f"return {BF16_QUAD.format('select(t.xy, t.zw, (i & 4u) != 0u)')}; }}")
    return out


# A 16-byte word of 8 bf16 or f16 elements `q` as a Pack (the low half of each word is the even element).
PACK_UNPACK = {
    "bf16": ("Pack(bitcast<vec4<f32>>(vec4<u32>(q.x << 16u, q.x & 0xffff0000u, q.y << 16u, q.y & 0xffff0000u)), "
             "bitcast<vec4<f32>>(vec4<u32>(q.z << 16u, q.z & 0xffff0000u, q.w << 16u, q.w & 0xffff0000u)), 1.0)"),
    "f16": ("Pack(vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y)), "
            "vec4<f32>(unpack2x16float(q.z), unpack2x16float(q.w)), 1.0)"),
}
# bf16 is the top half of an f32: element i of word w, shifted into place (exact).
BF16_SELECT = "return bitcast<f32>(select(w << 16u, w & 0xffff0000u, (i & 1u) == 1u));"
# The four bf16 elements of a vec2<u32> of words, as f32.
BF16_QUAD = ("bitcast<vec4<f32>>(vec4<u32>(({0}).x << 16u, ({0}).x & 0xffff0000u, ({0}).y << 16u, "
             "({0}).y & 0xffff0000u))")


def _declare_packs(slot: int, b: Binding) -> list[str]:
    """A read binding of 16-byte words and `pack_<name>(i) -> Pack`, its elements 8i..8i+7 as f32."""
    name = b.name
    if b.dtype == "f32":
        return [f"@group(0) @binding({slot}) var<storage, read> {name}: array<vec4<f32>>;",
                f"fn pack_{name}(i: u32) -> Pack {{ return Pack({name}[2u * i], {name}[2u * i + 1u], 1.0); }}"]
    if b.dtype not in PACK_UNPACK:
        raise ValueError(f"no packed loads for {b.dtype}")
    return [f"@group(0) @binding({slot}) var<storage, read> {name}: array<vec4<u32>>;",
            f"fn pack_{name}(i: u32) -> Pack {{ let q = {name}[i]; return {PACK_UNPACK[b.dtype]}; }}"]


QUANTIZED = ("q8", "q4")


def _declare_quantized(slot: int, b: Binding) -> list[str]:
    """A quantized weight's words in a storage binding, and its accessors (`_quantized_accessors`)."""
    return [f"@group(0) @binding({slot}) var<storage, read> {b.name}: array<u32>;",
            *_quantized_accessors(b, lambda j: f"{b.name}[{j}]", lambda i: f"{b.name}[2u * {i} + {{c}}u]")]


def _quantized_accessors(b: Binding, word, pair) -> list[str]:
    """A quantized weight (quant plane, then f16 scales at word `scales_at`): its scale per group,
    `unpack_<name>(words.., s)` (a pack of 8 elements from its words, q8's two or q4's one, times s) and
    `load_<name>(i)`, or for packs `pack_<name>(i)` (a group holds whole packs: 8 | group). `word(j)` is the
    expression of u32 word j, `pair(i)` that of word 2i + {c} (c = 0, 1)."""
    name, g = b.name, b.group
    out = [f"fn scale_{name}(g: u32) -> f32 {{ let v = unpack2x16float({word(f'{b.scales_at}u + (g >> 1u)')}); "
           f"return select(v.x, v.y, (g & 1u) == 1u); }}"]
    if b.dtype == "q8":
        # A byte shifted to the top of the word, then arithmetically back down: its sign extended.
        load = f"f32(bitcast<i32>({word('i >> 2u')} << (24u - 8u * (i & 3u))) >> 24u)"
        bytes4 = "vec4<f32>(bitcast<vec4<i32>>(vec4<u32>({0} << 24u, {0} << 16u, {0} << 8u, {0})) >> vec4<u32>(24u))"
        out.append(f"fn unpack_{name}(a: u32, b: u32, s: f32) -> Pack {{ return Pack({bytes4.format('a')}, "
                   f"{bytes4.format('b')}, s); }}")
        pack = f"return unpack_{name}({pair('i').format(c=0)}, {pair('i').format(c=1)}, scale_{name}(i / {g // 8}u));"
    else:
        load = f"(f32(({word('i >> 3u')} >> (4u * (i & 7u))) & 15u) - 8.0)"
        nibbles = "(vec4<f32>((vec4<u32>(q) >> vec4<u32>({})) & vec4<u32>(15u)) - 8.0)"
        out.append(f"fn unpack_{name}(q: u32, s: f32) -> Pack {{ return Pack({nibbles.format('0u, 4u, 8u, 12u')}, "
                   f"{nibbles.format('16u, 20u, 24u, 28u')}, s); }}")
        pack = f"return unpack_{name}({word('i')}, scale_{name}(i / {g // 8}u));"
    if not b.packs:
        return out[:1] + [f"fn load_{name}(i: u32) -> f32 {{ return {load} * scale_{name}(i / {g}u); }}"]
    return out + [f"fn pack_{name}(i: u32) -> Pack {{ {pack} }}"]


TANH = "fn tanh_(x: f32) -> f32 { let e = exp(-2.0 * abs(x)); return sign(x) * (1.0 - e) / (1.0 + e); }"


def act_fn(act: str) -> tuple[str, ...]:
    """Helpers defining `fn act(a)`, a gated op's activation (for `helpers`)."""
    expr = POINTWISE_EXPR[act]
    return (TANH,) * ("tanh_" in expr) + (f"fn act(a: f32) -> f32 {{ return {expr}; }}",)


def helpers(*parts: str) -> str:
    """A kernel prelude of module-scope helpers, each once (an activation and a softcap both want tanh_)."""
    return "\n".join(dict.fromkeys(p for p in parts if p))


# ---------------------------------------------------------------- lowering context

@dataclass
class Context:
    graph: Graph
    has_f16: bool
    has_subgroups: bool
    layout: str                                          # "cpu" or "gpu" (Device.layout)
    param_dtype: Callable[[str], str]                    # parameter name -> f32 / bf16 / f16 / q8 / q4
    param_windows: Callable[[str], list[tuple[int, int]]]  # parameter name -> row windows
    rope_key: Callable[[Node], int]
    param_quant: Callable[[str, int], tuple[int, int]] = lambda name, window: (0, 0)   # -> (group, scales_at)
    textures: bool = False                               # weights, and activations streamed, in textures
    subgroup_size: int = 0                               # 0 without subgroups
    max_workgroup: int = 256                             # invocations a workgroup may have (WebGPU's default)
    read_write_textures: bool = False                    # Device.read_write_textures

    def weight(self, name: str, pname: str, window: int = 0) -> Binding:
        """Binding `name` for window `window` of parameter `pname`."""
        group, scales_at = self.param_quant(pname, window)
        return Binding(name, Ref("param", pname, window), self.param_dtype(pname), group=group, scales_at=scales_at,
                       texture=self.textures)

    def value(self, node_id: int, name: str) -> Binding:
        """Binding for an op input: a weight (whole; windowed ones are handled by their consumer) or an
        activation (reshapes are views of their source)."""
        node = self.graph[node_id]
        if node.op == "parameter":
            pname = node.attrs["name"]
            if len(self.param_windows(pname)) > 1:
                raise LoweringError(f"weight {pname} {list(node.shape)} is larger than one storage binding and "
                                    f"its consumer cannot split it into windows")
            return self.weight(name, pname)
        if node.op == "input":
            return Binding(name, Ref("node", node_id), "u32" if node.dtype in ("u32", "i32") else "f32")
        return Binding(name, Ref("node", node_id), "f32")


def lower(ctx: Context, node_id: int) -> list[Kernel]:
    node = ctx.graph[node_id]
    if node.op in ("input", "parameter", "state", "reshape"):
        return []
    return LOWERINGS[node.op](ctx, node_id, node)


# rowreduce.wgsl's workgroup: one row's lanes
ROW_WG = 64


def _power_of_two_at_most(n: int) -> int:
    """A rowreduce workgroup size for up to n lanes: its tree reduction halves the workgroup."""
    return 1 << (max(1, n).bit_length() - 1)


def _kernel(ctx, label, template, bindings, grid, entry="main", prelude="", **subs) -> Kernel:
    """`prelude`: helper functions placed after the declarations (an `enable` directive must come first)."""
    if template == "rowreduce":      # (a GPU may choose a pipeline's subgroup size: there the tree, always)
        one_subgroup = ctx.layout == "cpu" and subs["wg"] == ctx.subgroup_size
        subs["reductions"] = render("reduce_subgroup" if one_subgroup else "reduce_tree")
        subs["group"] = CPU_ROW_GROUP if one_subgroup else 1
        subs["size"] = subs["wg"] * subs["group"]
        grid = _grouped(grid, subs["group"])
    elif template == "attention":
        subs["reductions"] = render("reduce_tree")
    src = render(template, bindings=declare(bindings, ctx.has_f16) + "\n" + prelude, **subs)
    return Kernel(label, src, entry, bindings, grid)


# Rows of one subgroup each that a CPU workgroup takes together: lavapipe hands each workgroup to its pool as
# a task, and a 64-token step writes 512 cache heads (as 64 tasks, not 512).
CPU_ROW_GROUP = 8


def _grouped(grid: Callable, group: int) -> Callable:
    """A grid of a workgroup per row as one of a workgroup per `group` rows."""
    if group == 1:
        return grid
    return lambda s: grid_1d(math.prod(grid(s)), group)


def _out(node_id, dtype: str = "f32") -> Binding:
    return Binding("out", Ref("node", node_id), dtype, write=True)


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
    "sigmoid": "1.0 / (1.0 + exp(-a))",
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


def _glu(ctx, node_id, node: Node) -> list[Kernel]:
    bindings = [ctx.value(node.inputs[0], "gate"), ctx.value(node.inputs[1], "up"), _out(node_id)]
    body = "    out[i] = act(load_gate(i)) * load_up(i);"
    return [_elementwise(ctx, "glu", node, bindings, body, prelude=helpers(*act_fn(node.attrs["act"])))]


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


def _last_row(ctx, node_id, node: Node) -> list[Kernel]:
    if _last_row_reader(ctx, node_id) is not None:
        return []           # its product reads row S - 1 of the source itself
    width = math.prod(node.shape[1:])
    body = f"    out[i] = load_in_a((step.S - 1u) * {width}u + i);"
    return [_elementwise(ctx, "last_row", node, [ctx.value(node.inputs[0], "in_a"), _out(node_id)], body)]


def _readers(g: Graph, node_id: int) -> list[int]:
    return [i for i in range(node_id + 1, len(g.nodes)) if node_id in g[i].inputs]


def _streamed_weight(ctx, product: Node) -> str | None:
    """The name of `product`'s weight where it is a parameter that the streamed variants read, else None."""
    w = ctx.graph[product.inputs[1]]
    name = w.attrs["name"] if w.op == "parameter" else None
    return name if name is not None and ctx.param_dtype(name) in STREAMED_DTYPES else None


def _last_row_reader(ctx, node_id: int) -> int | None:
    """The streamed product that reads last_row `node_id` in place (row S - 1 of its source), or None.

    The LM head after last_row is a one-row product (`_with_streamed`'s fixed rows) whatever the step, so
    its loads can take the row from the [S, K] source: the copy (a dispatch, 4% of a 34M-parameter decode
    step's time on lavapipe) is never made, and the add_norm before it folds into the product's prologue
    (`_add_norm_reader`)."""
    g = ctx.graph
    readers = _readers(g, node_id)
    if g[node_id].op != "last_row" or len(readers) != 1 or node_id in g.outputs:
        return None
    reader = g[readers[0]]
    x = g[g[node_id].inputs[0]]
    if reader.op != "linear" or reader.inputs[0] != node_id or node_id in reader.inputs[1:] or reader.attrs["act"]:
        return None
    if x.shape[-1] % 8 or x.op in ("input", "parameter", "state") or _streamed_weight(ctx, reader) is None:
        return None
    return readers[0]


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

def _row_wg(ctx) -> int:
    """A rowreduce workgroup: on a CPU device with subgroups one subgroup (a SIMD vector, reduced without
    barriers: a one-token add_norm took 100 us in a 64-lane tree, most of it barriers), else ROW_WG lanes."""
    sub = ctx.subgroup_size
    return sub if ctx.layout == "cpu" and sub > 1 and sub & (sub - 1) == 0 else ROW_WG


def _rows(node: Node, width: int) -> tuple[str, Callable]:
    return f"({numel(node.shape)} / {width}u)", lambda s: grid_1d(numel_at(node.shape, s) // width, 1)


def _row_rms(name: str, eps: float, base: str = "base", quads: bool = False) -> str:
    """Rowreduce lines that leave in `r` the 1/rms of binding `name`'s n elements from `base`, read an
    element a lane, or with `quads` a vec4 a lane."""
    if quads:
        walk = f"for (var q = li; q < n / 4u; q = q + WG) {{ let v = quad_{name}({base} / 4u + q); ss = ss + dot(v, v); }}"
    else:
        walk = f"for (var j = li; j < n; j = j + WG) {{ let v = load_{name}({base} + j); ss = ss + v * v; }}"
    return f"""    var ss = 0.0;
    {walk}
    let r = 1.0 / sqrt(reduce_sum(ss, li) / f32(n) + {lit(eps)});"""


def _load4(b: Binding, i: str) -> str:
    """Elements i..i+3 (4 | i) of read binding `b` as a vec4<f32>: one fetch for bf16 (`load4_`), else four."""
    if b.dtype == "bf16":
        return f"load4_{b.name}({i})"
    if b.quads:
        return f"quad_{b.name}(({i}) / 4u)"
    return "vec4<f32>(" + ", ".join(f"load_{b.name}({i}{f' + {c}u' * bool(c)})" for c in range(4)) + ")"


def _quad_rows(node: Node, *bindings: Binding) -> list[Binding] | None:
    """The row op's activations (and output) as quads, where its rows are whole vec4s; else None."""
    if node.shape[-1] % 4 or any(b.dtype != "f32" or (b.texture and b.write) for b in bindings):
        return None
    return [replace(b, quads=True) for b in bindings]


def _norm_rows(ctx, node_id, node: Node, label: str, acts: list[Binding], params: list[Binding],
               x: str, value: Callable[[Callable[[str], str], str], str]) -> list[Kernel]:
    """A row's 1/rms (r) of activation `x`, then out = value(load, w) element by element, or a vec4 at a time
    where rows are whole vec4s: load(a) is activation a's element(s) there, w the norm weight's."""
    n = node.shape[-1]
    rows, grid = _rows(node, n)
    quads = _quad_rows(node, *acts, _out(node_id))
    if quads is None:
        body = _row_rms(x, node.attrs["eps"]) + f"""
    for (var j = li; j < n; j = j + WG) {{ out[base + j] = {value(lambda a: f"load_{a}(base + j)", "load_w(j)")}; }}"""
        return [_kernel(ctx, label, "rowreduce", acts + params + [_out(node_id)], grid, wg=_row_wg(ctx), rows=rows,
                        width=n, body=body)]
    w = [b for b in params if b.name == "w"]
    body = _row_rms(x, node.attrs["eps"], quads=True) + f"""
    for (var q = li; q < n / 4u; q = q + WG) {{
        let j = 4u * q;
        out[base / 4u + q] = {value(lambda a: f"quad_{a}(base / 4u + q)", _load4(w[0], "j") if w else "")};
    }}"""
    return [_kernel(ctx, label, "rowreduce", quads[:-1] + params + quads[-1:], grid, wg=_row_wg(ctx), rows=rows,
                    width=n, body=body)]


def _rms_norm(ctx, node_id, node: Node) -> list[Kernel]:
    weighted = len(node.inputs) == 2
    params = [ctx.value(node.inputs[1], "w")] if weighted else []
    return _norm_rows(ctx, node_id, node, "rms_norm", [ctx.value(node.inputs[0], "x")], params, "x",
                      lambda load, w: f"{load('x')} * r" + f" * {w}" * weighted)


def _add_norm(ctx, node_id, node: Node) -> list[Kernel]:
    a = node.attrs
    h, y, params = _add_norm_bindings(ctx, node)

    def value(load, w):
        y = f"{load('h')} + {load('y')} * r" + f" * {w}" * a["weighted"]
        return f"({y}) * load_s(0u)" if a["scaled"] else y

    def rows(*acts: Binding) -> list[Kernel]:
        return _norm_rows(ctx, node_id, node, "add_norm", list(acts), params, "y", value)
    reader = _add_norm_reader(ctx, node_id)
    if reader is not None and ctx.graph[reader].inputs[0] != node_id:
        return []           # read through a last_row: every step's is its reader's prologue
    folded = reader is not None         # a one-token step's is its reader's prologue
    if not ctx.textures:
        return [replace(k, tokens=(2, math.inf)) for k in rows(h, y)] if folded else rows(h, y)
    # On a CPU device a step of several tokens reads h and y through their texture copies (h's is made for
    # the product that reads it anyway): lavapipe reads a storage buffer a lane at a time. The 16 add_norms
    # of a 64-token gemma4-34m step took 10.3 ms from buffers, 3.0 ms from textures.
    many = [replace(k, tokens=(2, math.inf)) for k in rows(replace(h, texture=True), replace(y, texture=True))]
    return many if folded else many + [replace(k, tokens=(1, 1)) for k in rows(h, y)]


def _add_norm_bindings(ctx, node: Node) -> tuple[Binding, Binding, list[Binding]]:
    """An add_norm's bindings: h, y, and its parameters (the norm weight w, the scale s, where it has them)."""
    extra = list(node.inputs[2:])
    params = [ctx.value(extra.pop(0), "w")] if node.attrs["weighted"] else []
    if node.attrs["scaled"]:
        params.append(ctx.value(extra.pop(0), "s"))
    return ctx.value(node.inputs[0], "h"), ctx.value(node.inputs[1], "y"), params


def _add_norm_reader(ctx, node_id: int) -> int | None:
    """The linear that computes add_norm `node_id` in the prologue of its one-token product, or None.

    On a CPU device a one-token add_norm is a few microseconds of work behind a dispatch's fixed 20-35 us,
    and the product that first reads it loads the whole row anyway: `_gemv_kernel` adds the normed row to
    the residual in registers and its first subgroup stores the sum for the later readers (Gemma's two
    add_norms a layer: 16 of a gemma4-34m decode step's 69 dispatches). The LM head reading the add_norm
    alone through a last_row (`_last_row_reader`) computes its row S - 1 so in every step, and nothing
    stores it."""
    g = ctx.graph
    node = g[node_id]
    if ctx.layout != "cpu" or ctx.subgroup_size == 0 or len(node.shape) != 2 or node.shape[0] != S:
        return None
    readers = _readers(g, node_id)
    if not readers:
        return None
    first, x = readers[0], node_id
    if g[first].op == "last_row" and len(readers) == 1 and node_id not in g.outputs:
        first, x = _last_row_reader(ctx, first), first
        if first is None:
            return None
    reader = g[first]
    k = node.shape[1]
    if reader.op != "linear" or reader.inputs[0] != x or node_id in reader.inputs[1:]:
        return None
    if k % 8 or not _gemv_fits(ctx, k) or _streamed_weight(ctx, reader) is None:
        return None
    return first


def _viewed(g: Graph, node_id: int) -> int:
    """The node a chain of reshapes views."""
    while g[node_id].op == "reshape":
        node_id = g[node_id].inputs[0]
    return node_id


# Workgroup memory a product may give the attention output it computes (WebGPU's guaranteed minimum).
ATTENTION_MEMORY = 16384


def _attention_reader(ctx, node_id: int) -> int | None:
    """The product that runs attention `node_id`'s one-token lanes in its own one-token kernel, or None.

    On a CPU device a decode step's attention (at contexts of one split) is one subgroup's work: its lanes
    are its heads, on one core, while the others idle, behind a dispatch's fixed 30-45 us. The product that
    reads its output (the output projection) runs in workgroups of one subgroup too: each computes the
    attention first, in parallel on every core, keeps the output in workgroup memory, and goes on to its
    rows; one of them stores the step's key and value (`_folded_cache_writes`)."""
    g = ctx.graph
    node = g[node_id]
    if node.op not in ("attention", "fused_attention") or ctx.layout != "cpu" or not ctx.subgroup_size:
        return None
    a = _attention_attrs(ctx, node)
    lane_layout, splits = _lane_plan(ctx, a, g[node.inputs[1]], g[node.inputs[2]])
    width = a["heads"] * a["head_dim"]
    if (not lane_layout or splits > 1 or a["heads"] > GEMV_SUBGROUPS * ctx.subgroup_size
            or 4 * width > ATTENTION_MEMORY or width % 8 or not _gemv_fits(ctx, width)):
        return None
    x, readers = node_id, _readers(g, node_id)
    while len(readers) == 1 and g[readers[0]].op == "reshape" and x not in g.outputs:
        x, readers = readers[0], _readers(g, readers[0])
    if len(readers) != 1 or x in g.outputs:
        return None
    reader = g[readers[0]]
    if (reader.op not in ("linear", "matmul") or reader.inputs[0] != x or x in reader.inputs[1:]
            or (reader.op == "matmul" and not reader.attrs["transpose_b"])):
        return None
    weight = _streamed_weight(ctx, reader)
    if weight is None or len(ctx.param_windows(weight)) != 1:
        return None
    return readers[0]


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
                    wg=_row_wg(ctx), rows=rows, width=n, body=body)]


ARGMAX_LOADS = 4            # loads a GPU lane of argmax has in flight


def _argmax(ctx, node_id, node: Node) -> list[Kernel]:
    n = ctx.graph[node.inputs[0]].shape[-1]
    # A row as long as a vocabulary is one workgroup's walk, so on a GPU the workgroup is as wide as the
    # device allows and each lane's loads go ARGMAX_LOADS at a time: its walk is latency, not bandwidth.
    wg = _row_wg(ctx) if ctx.layout == "cpu" else _power_of_two_at_most(min(ctx.max_workgroup, 1024))
    loads = 1 if ctx.layout == "cpu" else ARGMAX_LOADS
    # Each thread keeps its first maximum (it visits its indices in increasing order); of the threads holding
    # the row's maximum the lowest index wins (indices are exact in f32 below 2^24): numpy's first-on-ties.
    visit = "\n".join(f"        {{ let t = j + {u}u * WG; if (t < n) {{ let v = load_x(base + t); "
                      f"if (v > best) {{ best = v; at = t; }} }} }}" for u in range(loads))
    body = f"""    var best = -3.0e38;
    var at = 0u;
    for (var j = li; j < n; j = j + {loads}u * WG) {{
{visit}
    }}
    let top = reduce_max(best, li);
    let first = -reduce_max(-select(3.0e38, f32(at), best == top), li);
    if (li == 0u) {{ out[row] = u32(first); }}"""
    rows = f"({numel(node.shape)})" if node.shape else "1u"
    return [_kernel(ctx, "argmax", "rowreduce", [ctx.value(node.inputs[0], "x"), _out(node_id, "u32")],
                    lambda s: grid_1d(numel_at(node.shape, s), 1), wg=wg, rows=rows, width=n, body=body)]


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
                    wg=_row_wg(ctx), rows=rows, width=n, body=body)]


# ---------------------------------------------------------------- matrix ops

# Tiled GEMM (gemm.wgsl): output tile (token rows, weight rows) per workgroup and the K step. Each thread
# holds a 4x4 block, so 64x64 runs 256 threads (tiles must keep that at most 256 and each thread staging
# whole elements); workgroup memory (two k-major tiles of TK x (T + 4) f32, a third for a gated op's up
# rows, the norm's row scales) is 13 KiB at most, within WebGPU's default 16 KiB.
GEMM_TILE = (64, 64, 16)

# Whole, each row's 1/rms then scales the finished sums; split, the first column of tiles stores each row's
# share of its sum of squares for the summing pass (after the rows' sums, at the end of the scratch).
ROW_SQUARES = """    // Each row's sum of squares from the partial sums of the TK threads that staged it (in a_tile),
    // then {use}.
    for (var j = 0u; j < A_LOADS; j = j + 1u) {{
        let e = j * WG + li;
        a_tile[e % TK][(e / TK) / 4u][(e / TK) % 4u] = ss[j];
    }}
    workgroupBarrier();
    if (li < TM) {{
        var total = 0.0;
        for (var kk = 0u; kk < TK; kk = kk + 1u) {{ total = total + a_tile[kk][li / 4u][li % 4u]; }}
        {store}
    }}
    workgroupBarrier();"""


def _finish(softcap: float | None, residual_index: str | None) -> list[str]:
    """Epilogue statements shared by the gemm and the split-gate pass: softcap, then the residual add."""
    lines = []
    if softcap is not None:
        lines.append(f"y = {lit(softcap)} * tanh_(y / {lit(softcap)});")
    if residual_index is not None:
        lines.append(f"y = y + load_residual({residual_index});")
    return lines


def _gemm(ctx, node_id, x_id: int, w_id: int, label: str, *, transpose: bool = True, out: Binding | None = None,
          norm: str | None = None, norm_w: int | None = None, eps: float = 0.0, bias: int | None = None,
          act: str | None = None, softcap: float | None = None, residual: int | None = None) -> list[Kernel]:
    """out[m, col] = epilogue(rms_norm(x[m]) · w(col)), one dispatch per row window of the weight.

    Output column `col` is the weight row's index, so windows fill disjoint columns; a gated GEMM (act)
    pairs gate row n with up row n + rows/2 and needs them in one window (its caller ensures that)."""
    x, w = ctx.graph[x_id], ctx.graph[w_id]
    k = x.shape[-1]
    rows = w.shape[0] if transpose else w.shape[1]
    windows = [(0, rows)]
    w_binding: Callable[[int], Binding] = lambda i: ctx.value(w_id, "w")
    if w.op == "parameter":
        pname = w.attrs["name"]
        if len(ctx.param_windows(pname)) > 1:
            if not transpose:
                raise LoweringError(f"weight {pname} is larger than one storage binding; only [out, in] weights "
                                    f"(transpose_b) can be split into windows")
            windows = ctx.param_windows(pname)
        w_binding = lambda i: ctx.weight("w", pname, i)
    assert act is None or len(windows) == 1, "a gated GEMM needs its gate and up rows in one window"

    tile_m, tile_n, tile_k = GEMM_TILE
    shared = [ctx.value(x_id, "a")]
    tile_decls, norm_sum, scale_a, norm_finish, row_scale = [], "", "", "", "1.0"
    if norm is not None:
        # rms_norm(x) · w = (1/rms) (x · w): the rows' scales multiply the finished sums.
        tile_decls.append("var<workgroup> row_scale: array<f32, TM>;")
        norm_sum = "            ss[j] = ss[j] + v * v;"
        norm_finish = ROW_SQUARES.format(use="its 1/rms",
                                         store=f"row_scale[li] = 1.0 / sqrt(total / f32(K) + {lit(eps)});")
        row_scale = "row_scale[4u * ty + i]"
        if norm_w is not None:
            shared.append(ctx.value(norm_w, "nw"))
            scale_a = " * load_nw(ka)"
    out_stride = rows // 2 if act else rows
    epilogue, parts = [], []
    if bias is not None:
        shared.append(ctx.value(bias, "bias"))
        epilogue.append("y = y + load_bias(col);")
    stage_up = accumulate_up = ""
    if act is not None:
        parts += act_fn(act)
        tile_decls.append("var<workgroup> up_tile: array<array<vec4<f32>, TN / 4u + 1u>, TK>;")
        stage_up = "            up_tile[kk][c / 4u][c % 4u] = select(0.0, load_w((n + N) * K + kb), inside);"
        accumulate_up = "\n".join(["            let u = up_tile[kk][tx];"] + [
            f"            up_sums[{i}] = up_sums[{i}] + a.{c} * u;" for i, c in enumerate("xyzw")])
        epilogue.append(f"y = act(y) * (acc_up{' + load_bias(col + N)' if bias is not None else ''});")
    if residual is not None:
        shared.append(ctx.value(residual, "residual"))
    epilogue += _finish(softcap, f"m * {out_stride}u + col" if residual is not None else None)
    if softcap is not None:
        parts.append(TANH)

    splits = _k_splits(ctx, windows, k) if out is None else 1     # (`out`: a gate pass's scratch, already taken)
    out = out or _out(node_id)
    # A step of at most TM tokens (one row of tiles) shares K among `splits` workgroups a tile. Their raw sums
    # go to scratch, [splits][rows of the step][width] (the up rows' after the gate rows'), then with a norm
    # each share's sums of squares [splits][rows], for the pass that adds them up; longer steps, or splits 1,
    # run whole.
    width = 2 * out_stride if act else out_stride
    rows_per_token = math.prod(d for d in ctx.graph[node_id].shape if d != S) // out_stride
    part = Binding("part", Ref("scratch", node_id, splits * rows_per_token * (width + (norm is not None)) * 4), "f32",
                   write=True)
    split_squares = ROW_SQUARES.format(use="its share's sum, for the summing pass", store=(
        f"if (wg.x == 0u && tm + li < M) {{ part[SPLITS * M * {width}u + wg.z * M + tm + li] = total; }}"))
    partial = [f"part[(wg.z * M + m) * {width}u + col] = y;"] + \
        [f"part[(wg.z * M + m) * {width}u + {out_stride}u + col] = acc_up;"] * (act is not None)
    kernels = []
    for whole in ([False, True] if splits > 1 else [True]):
        for i, (r0, r1) in enumerate(windows):
            n = (r1 - r0) // 2 if act else r1 - r0

            def grid(s, n=n, z=1 if whole else splits):
                return -(-n // tile_n), -(-(numel_at(x.shape, s) // k) // tile_m), z

            # B tile element e of this thread: a weight row [N, K] is read along k by consecutive threads, a
            # plain matmul's B [K, N] along n, so that either way the reads are coalesced.
            b_coords = "let c = e / TK;\n            let kk = e % TK;" if transpose else \
                       "let c = e % TN;\n            let kk = e / TN;"
            store = [*epilogue, f"{out.name}[m * {out_stride}u + col] = y;"] if whole else partial
            kernel = _kernel(
                ctx, label, "gemm", shared[:1] + [w_binding(i)] + shared[1:] + [out if whole else part], grid,
                prelude=helpers(*parts), tile_m=tile_m, tile_n=tile_n, tile_k=tile_k, splits=1 if whole else splits,
                tile_decls="\n".join(tile_decls), m=f"({numel(x.shape)} / {k}u)", n=n, k=k, norm_sum=norm_sum,
                scale_a=scale_a, b_coords="            " + b_coords, load_b="load_w(n * K + kb)" if transpose
                else "load_w(kb * N + n)", stage_up=stage_up, accumulate_up=accumulate_up, col0=r0,
                norm_finish=norm_finish if whole or norm is None else split_squares,
                row_scale=row_scale if whole else "1.0", store="\n".join("                " + line for line in store))
            kernels.append(kernel if splits == 1 else replace(kernel, tokens=(tile_m + 1, math.inf) if whole
                                                              else (1, tile_m)))
        if not whole:
            summed = _summed_splits(ctx, node_id, label, part, splits, out_stride, width, k, norm, eps,
                                    [b for b in shared[1:] if b.name != "nw"], out, epilogue, parts)
            kernels.append(replace(summed, tokens=(1, tile_m)))
    if transpose and k % 8 == 0 and shared[0].dtype == "f32":
        kernels = _with_streamed(ctx, kernels, node_id, label, x, windows, w_binding, shared, out,
                                 epilogue, out_stride, act=act, norm=norm, norm_w=norm_w, eps=eps, softcap=softcap)
    return kernels


# A GPU GEMM of one row of tiles (a short step) whose tiles are fewer than GEMM_SPLIT_WGS shares K among up to
# that many workgroups, each share at least GEMM_SPLIT_MIN_K long. A CPU (one workgroup a core) never splits.
# On an H100 a 64-token bf16 [64 x 8192] x [2048 x 8192]^T product took 1.62 ms whole and 0.52, 0.29 and 0.19
# ms split for 128, 256 and 512 workgroups (benches/gemm.py); 512 was also the fastest on the 2048- and
# 3072-row products of K 2048.
GEMM_SPLIT_WGS = 512
GEMM_SPLIT_MIN_K = 256


def _k_splits(ctx, windows, k: int) -> int:
    """The workgroups among which a short step's GEMM shares each tile's K (`_gemm`)."""
    if ctx.layout != "gpu":
        return 1
    tiles = sum(-(-(r1 - r0) // GEMM_TILE[1]) for r0, r1 in windows)
    return max(1, min(-(-GEMM_SPLIT_WGS // tiles), k // GEMM_SPLIT_MIN_K))


def _summed_splits(ctx, node_id, label, part: Binding, splits: int, out_stride: int, width: int, k: int,
                   norm: str | None, eps: float, inputs: list[Binding], out: Binding, epilogue: list[str],
                   parts) -> Kernel:
    """The pass after a split GEMM: an invocation per output element adds up its splits' sums (and the up
    row's where `width` holds up rows, and its row's sums of squares for the 1/rms) and applies the
    epilogue."""
    node = ctx.graph[node_id]
    total = numel(node.shape)
    lines = [f"let m = i / {out_stride}u;", f"let col = i % {out_stride}u;", f"let M = {total} / {out_stride}u;",
             f"let N = {out_stride}u;", "var r = 1.0;"]
    if norm is not None:
        lines += ["var squares = 0.0;",
                  f"for (var z = 0u; z < {splits}u; z = z + 1u) {{ squares = squares + "
                  f"load_part({splits}u * M * {width}u + z * M + m); }}",
                  f"r = 1.0 / sqrt(squares / {k}.0 + {lit(eps)});"]
    lines += ["var y = 0.0;", "var acc_up = 0.0;",
              f"for (var z = 0u; z < {splits}u; z = z + 1u) {{",
              f"    let at = (z * M + m) * {width}u + col;", "    y = y + load_part(at);",
              *([f"    acc_up = acc_up + load_part(at + {out_stride}u);"] if width > out_stride else []), "}",
              "y = y * r;", "acc_up = acc_up * r;", *epilogue, "out[i] = y;"]
    return _elementwise(ctx, f"{label}_splits", node, [replace(part, write=False), *inputs, out],
                        "\n".join("    " + line for line in lines), prelude=helpers(*parts))


# Streamed variants (stream.wgsl), by layout: (step sizes, weight rows per block, token rows per block).
# On a CPU every step streams (its tiled GEMM's barriers are emulated in software); block sizes measured on
# lavapipe (benches/stream_blocks.py): 6 rows for one token; for a 64-token step 4x32 ran 1.3-1.7x faster than
# 4x8 (each weight texel, fetched lane by lane, then serves 32 tokens), and 4x8 wastes less on short steps.
# On a GPU steps of a few tokens stream and larger ones use the tiled GEMM; a one-token step's workgroup
# takes one weight row (an H100's llama-1b decode step 1.77 ms against 1.91 with two and 2.02 with four).
STREAMED = {"cpu": [((1, 1), 6, 1), ((2, 15), 4, 8), ((16, math.inf), 4, 32)],
            "gpu": [((1, 1), 1, 1), ((2, 8), 2, 4)]}
STREAM_WG = 64
STREAMED_DTYPES = ("f32", "bf16", "f16", *QUANTIZED)    # weights the streamed variants read


def _loop_bounded(ctx, k: int, variants: list[tuple]) -> list[tuple]:
    """The STREAMED variants whose invocations loop at most LOOP_TRIPS times (on a CPU a lane walks each of
    its blocks of tokens over all of a row's packs): a variant's step sizes are cut to that, and the ones
    after a cut are left to the tiled kernels, so that the streamed ones still cover steps from 1 up."""
    if ctx.layout != "cpu":
        return list(variants)
    out = []
    for (lo, hi), rows, token_block in variants:
        bound = LOOP_TRIPS // max(1, k // 8) * token_block
        if min(hi, bound) >= lo:
            out.append(((lo, min(hi, bound)), rows, token_block))
        if bound < hi:
            break
    return out


def _with_streamed(ctx, tiled: list[Kernel], node_id, label, x: Node, windows, w_binding, shared: list[Binding],
                   out: Binding, epilogue: list[str], out_stride: int, *, act, norm, norm_w, eps, softcap
                   ) -> list[Kernel]:
    """The tiled kernels restricted to the step sizes no streamed variant covers, plus the streamed ones."""
    k = x.shape[-1]
    variants = _loop_bounded(ctx, k, STREAMED[ctx.layout])
    if not variants or any(w_binding(i).dtype not in STREAMED_DTYPES for i in range(len(windows))):
        return tiled
    fixed = None if S in x.shape else math.prod(x.shape) // k
    if fixed is not None:       # rows that do not grow with the step (the head after last_row): one variant
        variants = [v for v in variants if v[0][0] <= fixed <= v[0][1]][:1]
        if not variants:
            return tiled
    largest = max(hi for (_, hi), _, _ in variants)
    kernels = _within(tiled, largest + 1) if largest < math.inf and fixed is None else []
    parts = [*(act_fn(act) if act else ()), TANH if softcap is not None else ""]
    x_id, row0 = shared[0].ref.key, ""
    attention = None
    source = _viewed(ctx.graph, x_id)
    if _attention_reader(ctx, source) == node_id:
        node = ctx.graph[source]
        attention = _attend(ctx, source, node.inputs, _attention_attrs(ctx, node), node.op, piece=True)
    if ctx.graph[x_id].op == "last_row" and _last_row_reader(ctx, x_id) == node_id:
        x_id, row0 = ctx.graph[x_id].inputs[0], "step.S - 1u"        # the source's last row, in place
        shared[0] = replace(ctx.value(x_id, "a"), name=shared[0].name)
    # The activations and the norm weight (streamed with them) are read in packs too.
    shared = [replace(shared[0], packs=True, texture=ctx.textures),
              *(replace(b, packs=True) if b.name == "nw" else b for b in shared[1:])]
    folded = ctx.graph[x_id].op == "add_norm" and _add_norm_reader(ctx, x_id) == node_id
    for i, (r0, r1) in enumerate(windows):
        n = (r1 - r0) // 2 if act else r1 - r0
        bindings = [shared[0], replace(w_binding(i), packs=True), *shared[1:], out]
        for tokens, rows, token_block in variants:
            if tokens == (1, 1) and _gemv_fits(ctx, k):
                prologue = [replace(shared[0], texture=False)]
                if folded:      # x is computed from the add_norm's inputs; the first window stores it
                    h, y, params = _add_norm_bindings(ctx, ctx.graph[x_id])
                    prologue = [replace(h, packs=True), *(replace(b, packs=b.name != "s", name=f"add_{b.name}")
                                                          for b in [y] + params)]
                    if i == 0 and not row0:
                        prologue.append(Binding("add_out", Ref("node", x_id), "f32", write=True, quads=True))
                kernel = _gemv_kernel(ctx, label, [prologue[0], *bindings[1:], *prologue[1:]], parts, x, k,
                                      n, r0, epilogue, out_stride, gated=act is not None, norm=norm, eps=eps,
                                      weighted=norm_w is not None,
                                      add_norm=ctx.graph[x_id].attrs if folded else None, row0=row0,
                                      attention=attention)
            else:
                kernel = _stream_kernel(ctx, label, bindings, parts, x, k, n, r0, tokens, rows, token_block,
                                        epilogue, out_stride, gated=act is not None, norm=norm, eps=eps,
                                        weighted=norm_w is not None, row0=row0)
            kernels.append(replace(kernel, tokens=(1, math.inf)) if fixed is not None else kernel)
    return kernels


# gemv_subgroup.wgsl: a lane holds K / 8 / L of the token's packs in registers, so K is bounded (beyond it the
# decode step streams as stream.wgsl does); subgroups are spread so that each walks at least GEMV_MIN_ROWS rows,
# in at most one workgroup per core: lavapipe hands each workgroup to its pool as a task, and on 2 cores one
# workgroup a core decoded llama-34m about 5% faster than 4 (more tasks, each a handoff) or 1 (one core idle).
# A workgroup is GEMV_SUBGROUPS subgroups, each walking its own range of rows: one a core walking half the rows
# ran a llama-34m decode step's products 15-30% faster than eight a core (best and median of 30 interleaved
# rounds; gemma4-34m's decode step 20% faster, q4 level), as each subgroup first loads its share of the token.
# Where a lane has at most GEMV_PAIRED_STEPS loads of a row, rows go in pairs (measured on lavapipe: a 512x512
# q4 product 2x, 512x1536 3x faster; bf16 the same or a little faster).
GEMV_MAX_PACKS_PER_LANE = 32
GEMV_MIN_ROWS = 16
GEMV_PAIRED_STEPS = 8
GEMV_SUBGROUPS = 1


def _gemv_fits(ctx, k: int) -> bool:
    lanes = ctx.subgroup_size
    return ctx.layout == "cpu" and lanes > 0 and -(-k // 8 // lanes) <= GEMV_MAX_PACKS_PER_LANE


def _gemv_kernel(ctx, label, bindings, parts, x: Node, k: int, n: int, col0: int, epilogue: list[str],
                 out_stride: int, *, gated: bool, norm, eps: float, weighted: bool, add_norm: dict | None = None,
                 row0: str = "", attention: LanePiece | None = None) -> Kernel:
    """The one-token variant of a streamed product on a CPU device with subgroups (gemv_subgroup.wgsl).
    With `add_norm` (its attrs) the token is that of an add_norm (`_add_norm_reader`), computed from the
    bindings h, add_y, add_w, add_s here, and stored to add_out where that is bound. With `row0` the
    token's rows are read from that row of the inputs on (a last_row read in place). With `attention` the
    token is that attention's output, computed by each workgroup (`_attention_reader`)."""
    lanes, packs, w = ctx.subgroup_size, k // 8, bindings[1]
    # A lane's step: a pack, or a whole texel of a quantized weight in a texture (2 q8 or 4 q4 packs under
    # one scale), so that no lane picks its words out of a texel by a lane-varying index (a scalar loop).
    per = {"q8": 2, "q4": 4}.get(w.dtype, 1) if w.texture else 1
    if packs % per or (w.group // 8) % per:
        per = 1
    steps = packs // per
    shares = -(-steps // lanes)                     # steps per lane; the last share may be partial
    # Rows are walked in twos (gated: a gate and an up row; otherwise rows n and n + N / 2) where a lane's
    # share of a row is short, so that it has more than one row's loads in flight.
    paired = not gated and n % 2 == 0 and shares <= GEMV_PAIRED_STEPS
    n = n // 2 if paired else n
    wg = GEMV_SUBGROUPS * lanes
    x_rows = numel_at(x.shape, 1) // k                              # rows of x a one-token step has
    subgroups = max(1, min(CORES * GEMV_SUBGROUPS, n // GEMV_MIN_ROWS), -(-n * x_rows // LOOP_TRIPS))
    rows = -(-n // subgroups)
    load_x, body = [], []
    row_at = f"({row0} + m) * PACKS" if row0 else "m * PACKS"      # where the token's row of the inputs is
    places = per == 4
    side = any(b.name == "add_out" for b in bindings)
    if places:
        parts = [*parts, Q4_PLACES]
    if per > 1 and w.group == k:            # q8's one scale a row
        body.append("            let s_row = scale_w(n);" + " let s_up = scale_w(n + N);" * (gated or paired))

    def packs_of(c: int):
        """(t, inside, [(pack index, name)]) of a lane's c-th share: its step t along a row, and `inside` the
        condition that t is in the row."""
        t = f"{c * lanes}u + lane"
        inside = f"{t} < STEPS" if (c + 1) * lanes > steps else ""
        at = f"min({t}, STEPS - 1u)" if inside else t
        return t, inside, [(f"{per}u * ({at}) + {j}u" if per > 1 else at, f"x{c}_{j}") for j in range(per)]

    def loaded(pack: str, inside: str) -> str:
        return f"masked({pack}, {inside})" if inside else pack

    if add_norm is not None:
        # h + rms_norm(y) * w (times s): y's sum of squares first, over the whole row.
        load_x.append("        var ss_add = 0.0;")
        for c in range(shares):
            _, inside, share = packs_of(c)
            for p, xc in share:
                load_x.append(f"        let add{xc} = {loaded(f'pack_add_y({row_at} + {p})', inside)};")
                load_x.append(f"        ss_add = ss_add + dot(add{xc}.lo, add{xc}.lo) + dot(add{xc}.hi, add{xc}.hi);")
        load_x.append(f"        let r_add = 1.0 / sqrt(subgroupAdd(ss_add) / f32(K) + {lit(add_norm['eps'])});")
    for c in range(shares):
        t, inside, share = packs_of(c)
        xs = []
        for p, xc in share:
            xs.append(xc)
            if add_norm is None:
                load_x.append(f"        let raw{xc} = {loaded(f'pack_a({row_at} + {p})', inside)};")
            else:
                load_x.append(f"        let h{xc} = {loaded(f'pack_h({row_at} + {p})', inside)};")
                lo, hi = (f"h{xc}.{half} + add{xc}.{half} * r_add" + f" * aw{xc}.{half}" * add_norm["weighted"]
                          for half in ("lo", "hi"))
                if add_norm["weighted"]:
                    load_x.append(f"        let aw{xc} = pack_add_w({p});")
                s = " * load_add_s(0u)" if add_norm["scaled"] else ""
                load_x.append(f"        let raw{xc} = Pack(({lo}){s}, ({hi}){s}, 1.0);")
                if side:    # the first subgroup stores the row for add_norm's other readers
                    guard = f"first == 0u" + f" && {inside}" * bool(inside)
                    load_x.append(f"        if ({guard}) {{ add_out[(m * K) / 4u + 2u * ({p})] = raw{xc}.lo; "
                                  f"add_out[(m * K) / 4u + 2u * ({p}) + 1u] = raw{xc}.hi; }}")
            if norm is not None:
                load_x.append(f"        ss = ss + dot(raw{xc}.lo, raw{xc}.lo) + dot(raw{xc}.hi, raw{xc}.hi);")
            if weighted:
                load_x.append(f"        let nw{xc} = pack_nw({p});")
                load_x.append(f"        let {xc} = Pack(raw{xc}.lo * nw{xc}.lo, raw{xc}.hi * nw{xc}.hi, 1.0);")
            else:
                load_x.append(f"        let {xc} = raw{xc};")
        if places:
            # q4 nibbles are taken in place (Q4_PLACES), so the token's packs are scaled by 16^-e (a power of
            # two: exact), and their offset of 8 is taken once a texel: 8 * the sum of its packs' elements.
            load_x.append(f"        let sum{c} = 8.0 * (" + " + ".join(
                f"dot({xc}.lo, vec4<f32>(1.0)) + dot({xc}.hi, vec4<f32>(1.0))" for xc in xs) + ");")
            for xc in xs:
                load_x.append(f"        let p{xc} = Pack({xc}.lo * PLACE_LO, {xc}.hi * PLACE_HI, 1.0);")

        def product(sum_: str, row: str, scale: str) -> str:
            if per == 1:
                return (f"let w = pack_w({row} * PACKS + {t}); "
                        f"{sum_} = {sum_} + (dot(w.lo, {xs[0]}.lo) + dot(w.hi, {xs[0]}.hi)) * w.s;")
            q = f"let q = texel_w({row} * STEPS + {t}); "
            if places:              # q4: four packs of nibbles
                dots = " + ".join(f"dot(lo_places(q.{c}), p{xc}.lo) + dot(hi_places(q.{c}), p{xc}.hi)"
                                  for c, xc in zip("xyzw", xs))
                return f"{q}{sum_} = {sum_} + ({dots} - sum{c}) * {scale};"
            unpacked = "let w0 = unpack_w(q.x, q.y, 1.0); let w1 = unpack_w(q.z, q.w, 1.0);"     # q8: two packs
            dots = " + ".join(f"dot(w{j}.lo, {xc}.lo) + dot(w{j}.hi, {xc}.hi)" for j, xc in enumerate(xs))
            return f"{q}{unpacked} {sum_} = {sum_} + ({dots}) * {scale};"

        def scale(row: str, whole_row: str) -> str:
            return whole_row if w.group == k else f"scale_w(({row} * PACKS + {per}u * ({t})) / {w.group // 8}u)"

        lines = [product("acc", "n", scale("n", "s_row"))]
        if gated or paired:
            lines.append(product("up", "(n + N)", scale("(n + N)", "s_up")))
        inner = " ".join(f"{{ {line} }}" for line in lines)
        body.append(f"            if ({inside}) {{ {inner} }}" if inside else f"            {inner}")
    row_scale = f"1.0 / sqrt(subgroupAdd(ss) / f32(K) + {lit(eps)})" if norm is not None else "1.0"

    def finish(total: str, col: str, acc_up: str) -> str:
        lines = [f"let col = {col0}u + {col};", f"var y = {total} * r;", f"let acc_up = {acc_up};", *epilogue,
                 f"out[m * {out_stride}u + col] = y;"]
        return "                { " + " ".join(lines) + " }"

    store = finish("total", "n", "total_up * r") if not paired else \
        finish("total", "n", "0.0") + "\n" + finish("total_up", "n + N", "0.0")
    blocks = -(-n // rows)
    prelude, before = helpers(*parts), ""
    if attention is not None:
        bindings = [b for b in bindings if b.name != "a"] + attention.bindings
        prelude = "\n".join([helpers(*parts, *attention.parts), attention.source,
                             f"var<workgroup> att: array<vec4<f32>, {attention.width // 4}>;",
                             "fn pack_a(i: u32) -> Pack { return Pack(att[2u * i], att[2u * i + 1u], 1.0); }"])
        before = "    attend(li, wg.x == 0u && wg.y == 0u);\n    workgroupBarrier();"
        label = f"attention_{label}"
    kernel = _kernel(ctx, f"{label}_gemv", "gemv_subgroup", bindings, lambda s: grid_1d(blocks * lanes, wg),
                     prelude=prelude, before=before, wg=wg, lanes=lanes, packs=packs, steps=steps, rows=rows,
                     m=f"({numel(x.shape)} / {k}u)", n=n, col0=col0, out_stride=out_stride,
                     total_up="subgroupAdd(up)" if gated or paired else "0.0", store=store,
                     load_x="\n".join(load_x), row_scale=row_scale, body="\n".join(body))
    return replace(kernel, tokens=(1, 1))


# A q4 word's eight nibbles n_e in place, as f32: n_e * 16^e for e < 7 (a mask: below 2^31, exact) and n_7
# shifted down, so that a nibble costs a mask and a conversion; the token's packs are scaled by PLACE_LO/HI.
Q4_PLACES = """const PLACE_LO = vec4<f32>(1.0, 0.0625, 0.00390625, 0.000244140625);
const PLACE_HI = vec4<f32>(0.0000152587890625, 0.00000095367431640625, 0.000000059604644775390625, 1.0);
fn lo_places(q: u32) -> vec4<f32> {
    return vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(q) & vec4<u32>(0xfu, 0xf0u, 0xf00u, 0xf000u)));
}
fn hi_places(q: u32) -> vec4<f32> {
    return vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(q & 0xf0000u, q & 0xf00000u, q & 0xf000000u, q >> 28u)));
}"""


def _stream_kernel(ctx, label, bindings, parts, x: Node, k: int, n: int, col0: int, tokens, rows: int,
                   token_block: int, epilogue: list[str], out_stride: int, *, gated: bool, norm, eps: float,
                   weighted: bool, row0: str = "") -> Kernel:
    lanes = 1 if ctx.layout == "cpu" else STREAM_WG
    rows = min(rows, n)
    blocks = -(-n // rows)
    R, T = range(rows), range(token_block)
    sums = [f"acc{r}_{t}" for r in R for t in T] + [f"up{r}_{t}" for r in R for t in T] * gated
    sums += [f"ss{t}" for t in T] * (norm is not None)
    body = [f"            let w{r} = pack_w(min(n0 + {r}u, N - 1u) * PACKS + p);" for r in R]
    body += [f"            let u{r} = pack_w((min(n0 + {r}u, N - 1u) + N) * PACKS + p);" for r in R] * gated
    if weighted:
        body.append("            let nw = pack_nw(p);")
    # On a CPU every lane of a subgroup reads the same activation packs: with subgroups, each lane fetches a
    # share of the block's texels once and the rest are broadcast from the lanes that hold them.
    shared_x = lanes == 1 and ctx.subgroup_size > 0 and bindings[0].texture
    row = (lambda r: f"({row0} + {r})") if row0 else (lambda r: r)     # a token's row of the inputs
    if shared_x:
        fetched, group = 2 * token_block, ctx.subgroup_size        # two texels of f32 to a pack
        for c in range(-(-fetched // group)):
            e = f"min({c * group}u + sg_lane, {fetched - 1}u)"
            pack = f"{row(f'min(m0 + {e} / 2u, M - 1u)')} * PACKS + p"
            body.append(f"            let v{c} = bitcast<vec4<f32>>(texel_a(({pack}) * 2u + ({e} & 1u)));")
    for t in T:
        if shared_x:
            lo, hi = divmod(2 * t, group), divmod(2 * t + 1, group)
            body.append(f"            let raw{t} = Pack(subgroupBroadcast(v{lo[0]}, {lo[1]}u), "
                        f"subgroupBroadcast(v{hi[0]}, {hi[1]}u), 1.0);")
        else:
            body.append(f"            let raw{t} = pack_a({row(f'min(m0 + {t}u, M - 1u)')} * PACKS + p);")
        if norm is not None:
            body.append(f"            ss{t} = ss{t} + dot(raw{t}.lo, raw{t}.lo) + dot(raw{t}.hi, raw{t}.hi);")
        scaled = f"Pack(raw{t}.lo * nw.lo, raw{t}.hi * nw.hi, 1.0)" if weighted else f"raw{t}"
        body.append(f"            let x{t} = {scaled};")
        body += [f"            acc{r}_{t} = acc{r}_{t} + (dot(w{r}.lo, x{t}.lo) + dot(w{r}.hi, x{t}.hi)) * w{r}.s;"
                 for r in R]
        body += [f"            up{r}_{t} = up{r}_{t} + (dot(u{r}.lo, x{t}.lo) + dot(u{r}.hi, x{t}.hi)) * u{r}.s;"
                 for r in R] * gated
    store = []
    for t in T:
        scale = f"1.0 / sqrt(ss{t} / f32(K) + {lit(eps)})" if norm is not None else "1.0"
        store.append(f"            let r{t} = {scale};")
        for r in R:
            lines = [f"let m = m0 + {t}u;", f"let col = {col0}u + n0 + {r}u;",
                     f"var y = acc{r}_{t} * r{t};", f"let acc_up = {f'up{r}_{t} * r{t}' if gated else '0.0'};",
                     *epilogue, f"out[m * {out_stride}u + col] = y;"]
            store.append(f"            if (m0 + {t}u < M && n0 + {r}u < N) {{ " + " ".join(lines) + " }")
    reduce_decl = subgroup_args = reduce = ""
    if lanes > 1:
        count = len(sums)
        reduce_decl = f"var<workgroup> red: array<f32, {count * STREAM_WG}>;"
        if ctx.has_subgroups:
            # Each subgroup's sum, then lane 0 adds the subgroups' (any subgroup size divides the workgroup).
            subgroup_args = (",\n        @builtin(subgroup_invocation_id) sg_lane: u32, "
                             "@builtin(subgroup_size) sg_size: u32")
            lines = [f"{{ let v = subgroupAdd({v}); if (sg_lane == 0u) {{ red[(li / sg_size) * {count}u + {c}u] = v; }} }}"
                     for c, v in enumerate(sums)]
            lines.append("workgroupBarrier();")
            lines += [f"if (li == 0u) {{ var t = 0.0; for (var j = 0u; j < WG / sg_size; j = j + 1u) "
                      f"{{ t = t + red[j * {count}u + {c}u]; }} {v} = t; }}" for c, v in enumerate(sums)]
        else:
            lines = [f"red[li * {count}u + {c}u] = {v};" for c, v in enumerate(sums)]
            lines += ["workgroupBarrier();",
                      "for (var s = WG / 2u; s > 0u; s = s >> 1u) {",
                      f"    if (li < s) {{ for (var c = 0u; c < {count}u; c = c + 1u) "
                      f"{{ red[li * {count}u + c] = red[li * {count}u + c] + red[(li + s) * {count}u + c]; }} }}",
                      "    workgroupBarrier();", "}"]
            lines += [f"if (li == 0u) {{ {v} = red[{c}u]; }}" for c, v in enumerate(sums)]
        lines.append("workgroupBarrier();          // red is written again by the next token block")
        reduce = "\n".join("        " + line for line in lines)
    leave = "if (n0 >= N) { return; }"
    if shared_x:    # every lane stays to the end, for the broadcasts: past N it loads row N - 1, stores nothing
        subgroup_args, leave = ",\n        @builtin(subgroup_invocation_id) sg_lane: u32", ""
    if lanes == 1:
        block, grid = "(wg.y * nwg.x + wg.x) * WG + li", grid_1d(blocks, STREAM_WG)
    else:   # the block is the workgroup's, so the exit below and the barriers after it stay uniform
        block, grid = "wg.y * nwg.x + wg.x", grid_1d(blocks, 1)
    kernel = _kernel(ctx, f"{label}_stream", "stream", bindings, lambda s: grid, prelude=helpers(*parts),
                   wg=STREAM_WG, lanes=lanes, packs=k // 8, reduce_decl=reduce_decl, subgroup_args=subgroup_args,
                   m=f"({numel(x.shape)} / {k}u)", n=n, rows=rows, tokens=token_block, block=block,
                   lane="0u" if lanes == 1 else "li", leave=leave,
                   declare_acc="\n".join(f"        var {v} = 0.0;" for v in sums), body="\n".join(body),
                   reduce=reduce, store="\n".join(store))
    return replace(kernel, tokens=tokens)


def _matmul(ctx, node_id, node: Node) -> list[Kernel]:
    return _gemm(ctx, node_id, *node.inputs, "matmul", transpose=node.attrs["transpose_b"])


def _linear(ctx, node_id, node: Node) -> list[Kernel]:
    a = node.attrs
    x_id, w_id = node.inputs[:2]
    extra = list(node.inputs[2:])
    norm_w = extra.pop(0) if a["norm"] == "weighted" else None
    bias = extra.pop(0) if a["bias"] else None
    residual = extra.pop(0) if a["residual"] else None
    before_gate = dict(norm=a["norm"], norm_w=norm_w, eps=a["eps"], bias=bias)
    w = ctx.graph[w_id]
    if a["act"] is None or w.op != "parameter" or len(ctx.param_windows(w.attrs["name"])) == 1:
        return _gemm(ctx, node_id, x_id, w_id, "linear", act=a["act"], softcap=a["softcap"], residual=residual,
                     **before_gate)
    # A gated weight split into windows may hold gate row n and up row n + N in different ones: run the
    # plain GEMM into scratch [.., 2N] (columns land by weight row, whatever the window), then gate.
    width, half = w.shape[0], w.shape[0] // 2
    scratch = Ref("scratch", node_id, 2 * 4 * math.prod(d for d in node.shape if d != S))   # bytes per token
    kernels = _gemm(ctx, node_id, x_id, w_id, "linear", out=Binding("out", scratch, "f32", write=True),
                    **before_gate)
    bindings = [Binding("hid", scratch, "f32")]
    if residual is not None:
        bindings.append(ctx.value(residual, "residual"))
    lines = [f"let row = (i / {half}u) * {width}u + i % {half}u;",
             f"var y = act(load_hid(row)) * load_hid(row + {half}u);",
             *_finish(a["softcap"], "i" if residual is not None else None), "out[i] = y;"]
    parts = (*act_fn(a["act"]), TANH if a["softcap"] is not None else "")
    kernels.append(_elementwise(ctx, "linear_gate", node, bindings + [_out(node_id)],
                                "\n".join("    " + line for line in lines), prelude=helpers(*parts)))
    return kernels


def _embedding(ctx, node_id, node: Node) -> list[Kernel]:
    table = ctx.graph[node.inputs[0]]
    pname = table.attrs["name"]
    width = table.shape[1]
    ids = Binding("ids", Ref("node", node.inputs[1]), "u32")
    kernels = []
    for i, (r0, r1) in enumerate(ctx.param_windows(pname)):
        bindings = [ids, ctx.weight("table", pname, i), _out(node_id)]
        kernels.append(_kernel(ctx, "embedding", "gather", bindings,
                               lambda s: grid_1d(numel_at(node.shape, s)),
                               rows=numel(node.shape[:-1]), width=width, row0=r0, row1=r1,
                               scale="" if node.attrs["scale"] == 1.0 else f" * {lit(node.attrs['scale'])}"))
    return kernels


ROTATE = """fn rotate(x: f32, partner_x: f32, row: u32, d: u32) -> f32 {
    let c = (row * HALF + d % HALF) * 2u;     // the token's cos/sin pair for frequency d mod D/2
    return x * table[c] + select(partner_x, -partner_x, d < HALF) * table[c + 1u];
}"""


# rotate for elements d..d+3 (4 | d, 4 | HALF) of a table bound as vec4s: their cos/sin pairs are two quads.
ROTATE4 = """fn rotate4(x: vec4<f32>, partner_x: vec4<f32>, row: u32, d: u32) -> vec4<f32> {
    let c = (row * HALF + d % HALF) / 2u;
    let a = table[c];
    let b = table[c + 1u];
    return x * vec4<f32>(a.x, a.z, b.x, b.z) + select(partner_x, -partner_x, d < HALF) * vec4<f32>(a.y, a.w, b.y, b.w);
}"""


def _row_width(node: Node) -> int:
    """Elements per token of a [tokens, ...] tensor."""
    return math.prod(node.shape[1:])


def _attention(ctx, node_id, node: Node) -> list[Kernel]:
    return _attend(ctx, node_id, node.inputs, _attention_attrs(ctx, node), node.op)


def _attention_attrs(ctx, node: Node) -> dict:
    """A fused_attention's attrs, or those an attention's plain [tokens, heads, head_dim] inputs have."""
    if node.op == "fused_attention":
        return node.attrs
    q, k = ctx.graph[node.inputs[0]], ctx.graph[node.inputs[1]]
    return {**node.attrs, **dict(heads=q.shape[1], kv_heads=k.shape[1], head_dim=q.shape[2], q_at=0, k_at=0,
                                 v_at=0, norms=0, eps=0.0, rope=None, cached=len(node.inputs) == 4)}


# 1/rms of a head from its sum of squares and an eps (D is a template constant, EPS the attention's eps).
HEAD_RMS = "1.0 / sqrt({} / f32(D) + {})"


def _head_rms(target: str, ss: str, load: str, indent: str, eps: str = "EPS") -> str:
    """Lines summing the squares of a head's D elements `load` (an expression of d) into `ss` and setting
    `target` to the head's 1/rms: the first line unindented, the others after `indent`."""
    return (f"var {ss} = 0.0;\n{indent}for (var d = 0u; d < D; d = d + 1u) {{ let x = {load}; {ss} = {ss} + x * x; }}\n"
            f"{indent}{target} = {HEAD_RMS.format(ss, eps)};")


def _attend(ctx, node_id, inputs, a: dict, label: str, piece: bool = False) -> list[Kernel] | LanePiece:
    """Attention over heads read at column offsets of [tokens, row] tensors (the fused_attention attrs):
    attention_lanes.wgsl on a CPU device and for a GPU's decode steps with subgroups, attention.wgsl
    elsewhere. `piece`: the one-token lanes as a product's prologue runs them (`_attention_reader`)."""
    q, k, v = (ctx.graph[j] for j in inputs[:3])
    nh, nkv, d = a["heads"], a["kv_heads"], a["head_dim"]
    norms, extra = a["norms"], list(inputs[3:])
    # Keys and values are read once per query: through textures where those are faster (q, read once per
    # lane, is not worth the copy).
    bindings = [ctx.value(inputs[0], "q"),
                *(replace(ctx.value(j, name), texture=ctx.textures) for j, name in zip(inputs[1:3], "kv"))]
    if norms & 1:
        bindings.append(ctx.value(extra.pop(0), "q_norm"))
    if norms & 2:
        bindings.append(ctx.value(extra.pop(0), "k_norm"))
    parts = []
    if a["rope"] is not None:
        # The host fills one cos/sin row per token of the step (position step.start + row), as for `rope`.
        inv_freq, scaling = a["rope"]
        key = ctx.rope_key(Node("rope", (), {"inv_freq": inv_freq, "attention_scaling": scaling}, (), "f32"))
        bindings.append(Binding("table", Ref("rope", key), "f32"))
        parts.append(ROTATE)
    softcap = f"s = {lit(a['softcap'])} * tanh_(s / {lit(a['softcap'])});" if a["softcap"] else ""
    if softcap:
        parts.append(TANH)
    cached = a["cached"]
    subs = dict(prelude=helpers(*parts), parts=parts, head_dim=d, half=d // 2, eps=lit(a["eps"]),
                queries=dim(q.shape[0]),
                keys="(step.start + step.S)" if cached else dim(k.shape[0]),
                slot=f"j % {k.shape[0]}u" if cached else "j", group=nh // nkv, q_row=_row_width(q),
                k_row=_row_width(k), v_row=_row_width(v), q_at=a["q_at"], k_at=a["k_at"], v_at=a["v_at"],
                scale=lit(a["scale"]), key_bounds=_key_bounds(a["window"]), softcap=softcap)
    lane_layout, splits = _lane_plan(ctx, a, k, v)
    fold = _folded_cache_writes(ctx, node_id)
    if ctx.layout == "cpu" and lane_layout:
        if piece:
            return _attend_lanes(ctx, node_id, label, bindings, a, splits, subs, fold=fold, piece=True)
        if _attention_reader(ctx, node_id) is not None:
            one_token = []          # the product after it attends in its one-token kernel
        else:
            one_token = fold and _attend_lanes(ctx, node_id, label, bindings, a, splits, subs, fold=fold)
        return _with_fold(_attend_lanes(ctx, node_id, label, bindings, a, splits, subs), one_token)
    # attention.wgsl: q is staged in workgroup memory (q_raw), its norm reduced across the workgroup.
    q_rms, q_elem = "let rq = 1.0;", "return q_raw[d];"
    if norms & 1:
        q_rms = ("var q_ss = 0.0;\n    for (var d = li; d < D; d = d + WG) { q_ss = q_ss + q_raw[d] * q_raw[d]; }\n"
                 f"    let rq = {HEAD_RMS.format('reduce_sum(q_ss, li)', 'EPS')};")
        q_elem = "return q_raw[d] * r * load_q_norm(d);"
    k_rms, k_elem = "let rk = 1.0;", "return load_k(k_base + d);"
    if norms & 2:
        k_rms = _head_rms("let rk", "k_ss", "load_k(k_base + d)", "            ")
        k_elem = "return load_k(k_base + d) * r * load_k_norm(d);"
    v_rms, v_value = "", "load_v(v_base + d)"
    if norms & 4:
        v_rms = (f"let v_base = slot(j) * {_row_width(v)}u + {a['v_at']}u + g * D;\n            "
                 + _head_rms("v_scale[li]", "v_ss", "load_v(v_base + d)", "            "))
        v_value = "(load_v(v_base + d) * v_scale[t])"
    q_value, k_value = "q_elem(d, rq)", "k_elem(k_base, d, rk)"
    if a["rope"] is not None:
        q_value = "rotate(q_elem(d, rq), q_elem(partner(d), rq), i, d)"
        if not cached:                      # a cache holds keys already rotated
            k_value = "rotate(k_elem(k_base, d, rk), k_elem(k_base, partner(d), rk), j, d)"
    subs.update(q_rms=q_rms, q_elem=q_elem, k_rms=k_rms, k_elem=k_elem, q_value=q_value, k_value=k_value,
                v_rms=v_rms, v_value=v_value)
    normalise = f"    for (var d = li; d < D; d = d + WG) {{ out[(i * {nh}u + h) * D + d] = acc[d] / l_run; }}"
    whole = _kernel(ctx, label, "attention", bindings + [_out(node_id)], lambda s: (nh, s, 1),
                    epilogue=normalise, **subs)
    sub = ctx.subgroup_size
    if cached and lane_layout and sub > 1 and GPU_LANES_WG % sub == 0:
        # A decode step's workgroup walks its keys in serial loops between barriers: latency. The lanes of a
        # subgroup split one query's keys instead and merge with subgroup operations, in one pass.
        return _with_fold([replace(whole, tokens=(SPLIT_TOKENS + 1, math.inf)),
                           *_attend_lanes(ctx, node_id, label, bindings, a, sub, subs, decode_only=True)],
                          fold and _attend_lanes(ctx, node_id, label, bindings, a, sub, subs, decode_only=True,
                                                 fold=fold))
    if splits < 2:
        return [whole]
    return [replace(whole, tokens=(SPLIT_TOKENS + 1, math.inf)),
            *_split_attention(ctx, node_id, label, bindings, nh, d, splits, a["window"], subs)]


def _with_fold(kernels: list[Kernel], folded: list[Kernel] | None) -> list[Kernel]:
    """An attention's kernels, the one-token step left to `folded` (its kernel that writes the cache too, or
    none where a product runs it); with None, as they are."""
    if folded is None:
        return kernels
    return _within(kernels, 2) + [replace(k, tokens=(1, 1)) for k in folded]


def _attend_lanes(ctx, node_id, label, bindings, a: dict, splits: int, subs: dict, decode_only: bool = False,
                  fold: tuple[int, int] | None = None, piece: bool = False, keys: int | None = None
                  ) -> list[Kernel] | LanePiece:
    """attention_lanes.wgsl: the same attention (and split records) with a lane per (query, head, split).
    `decode_only`: just the kernel of steps of up to SPLIT_TOKENS tokens that splits one query's keys across
    a subgroup (a GPU's decode attention; its caller checks that a subgroup fits GPU_LANES_WG).
    `fold` (`_folded_cache_writes`): just the kernel of one-token steps, which writes the cache too.
    `piece`: the one-token lanes of `splits` 1 as a product's prologue runs them (`_attention_reader`).
    `keys`: the most keys a query sees, which sets how many a lane's loop visits a trip (`_key_trips`); by
    default the window or the cache (for a piece, which runs one-token steps: one). Without either, a
    query sees the step's tokens: the kernels then come in two sets, for steps of up to LOOP_TRIPS tokens
    and for longer ones (visiting OWN_KEY_TRIPS keys a trip)."""
    if keys is None:
        cache = ctx.graph[ctx.graph[node_id].inputs[1]].shape[0] if a["cached"] else None
        keys = min((n for n in (a["window"], cache) if n), default=1 if piece else None)
        if keys is None:
            again = lambda n: _attend_lanes(ctx, node_id, label, bindings, a, splits, subs, keys=n)
            return [*_within(again(LOOP_TRIPS), 1, LOOP_TRIPS),
                    *_within(again(OWN_KEY_TRIPS * LOOP_TRIPS), LOOP_TRIPS + 1)]
    nh, d, norms = a["heads"], a["head_dim"], a["norms"]
    wg = GPU_LANES_WG if decode_only else LANES_WG
    # Statements over a head's quads are written out, not looped: a GPU then has every quad's loads in
    # flight at once (a loop waits on each load in turn) and keeps q and acc in registers.
    each_quad = lambda line, indent="        ": "\n".join(indent + line.replace("@c", f"{c}u")
                                                     for c in range(d // 4))
    # A key's or value's head's sum of squares, `k_ss` or `v_ss`, over its quads written out: a loop over the
    # head would cost D of the lane's loop trips a key (see LOOP_TRIPS).
    head_squares = lambda name: f"var {name}_ss = 0.0;\n" + each_quad(
        f"{{ let x = {name}4({name}_base / 4u + @c); {name}_ss = {name}_ss + dot(x, x); }}")
    fresh, fresh_parts = "", []
    if fold:
        bindings, fresh_parts, fresh = _fresh_kv(ctx, fold, bindings, a, subs, each_quad)
    q_rms = ""
    if norms & 1:
        q_rms = _head_rms("rq", "q_ss", "load_q(q_base + d)", "    ")
    q_elem = "return load_q(q_base + d) * r" + " * load_q_norm(d)" * bool(norms & 1) + ";"
    k_elem = "return load_k(k_base + d) * r" + " * load_k_norm(d)" * bool(norms & 2) + ";"
    rotate_k = a["rope"] is not None and not a["cached"]
    q_value = "rotate(q_elem(q_base, d, r), q_elem(q_base, partner(d), r), i, d)" if a["rope"] is not None \
        else "q_elem(q_base, d, r)"
    k_value = "rotate(k_elem(k_base, d, r), k_elem(k_base, partner(d), r), j, d)" if rotate_k \
        else "k_elem(k_base, d, r)"
    if norms & 2 or rotate_k:       # keys computed element by element
        score = ["        var rk = 1.0;"]
        if norms & 2:
            score.append("        " + head_squares("k") + f"\n        rk = {HEAD_RMS.format('k_ss', 'EPS')};")
        score.append(each_quad("{ let d = 4u * @c; dot4 = fma(query[@c], vec4<f32>(k_value(k_base, d, rk, j), "
                               "k_value(k_base, d + 1u, rk, j), k_value(k_base, d + 2u, rk, j), "
                               "k_value(k_base, d + 3u, rk, j)), dot4); }"))
    else:
        score = [each_quad("dot4 = fma(query[@c], k4(k_base / 4u + @c), dot4);")]
    v_rms = ""
    if norms & 4:
        v_rms = head_squares("v") + f"\n        p = p * {HEAD_RMS.format('v_ss', 'EPS')};"
    quads = []
    for name, b in (("k", bindings[1]), ("v", bindings[2])):
        body = f"bitcast<vec4<f32>>(texel_{name}(t))" if b.texture else _load4(b, "4u * t")
        quads.append(f"fn {name}4(t: u32) -> vec4<f32> {{ return {body}; }}")
    per_lane = {"subgroup_args": "", "first_key": "lo", "end_key": "hi", "seen": "true", "lanes": (
        "    let z = lane % SPLITS;               // share of the keys (with subgroups, the lane in its subgroup)\n"
        "    let h = (lane / SPLITS) % HEADS;     // query head\n"
        "    let i = lane / (HEADS * SPLITS);     // query row\n"
        "    if (i >= S) { return; }"), "accumulate": each_quad(
        "acc[@c] = fma(v4(v_base / 4u + @c), vec4<f32>(p), acc[@c] * correction);")}
    if fold:
        per_lane["end_key"] = "min(hi, qi)"      # the step's own key is `fresh`
    parts = [*subs["parts"], *quads, *fresh_parts]
    common = {**subs, **per_lane, **_key_trips(keys), "prelude": helpers(*parts), "fresh": fresh,
              "main": _lanes_main(wg),
              "heads": nh, "quads": d // 4,
              "q_rms": q_rms, "q_elem": q_elem, "q_value": q_value, "k_elem": k_elem, "k_value": k_value,
              "score": "\n".join(score), "v_rms": v_rms, "load_q": each_quad(
                  "query[@c] = vec4<f32>(q_value(q_base, 4u * @c, rq, i), q_value(q_base, 4u * @c + 1u, rq, i), "
                  "q_value(q_base, 4u * @c + 2u, rq, i), q_value(q_base, 4u * @c + 3u, rq, i));", "    ")}

    def stores(out: str, at: str, scale: str) -> str:
        return each_quad(f"{{ let a = acc[@c]{scale}; let o = {at} + 4u * @c; "
                         f"{out}[o] = a.x; {out}[o + 1u] = a.y; {out}[o + 2u] = a.z; {out}[o + 3u] = a.w; }}", "    ")

    lanes = lambda per_query: lambda s: grid_1d(s * per_query, wg)
    sub = ctx.subgroup_size
    if piece:
        att = each_quad("att[(i * HEADS + h) * (D / 4u) + @c] = acc[@c] / l_run;", "    ")
        source = render("attention_lanes", bindings="", **{**common, "main": "", "splits": 1, "epilogue": att})
        return LanePiece(bindings, parts, source, nh * d)

    def subgroup_split() -> Kernel:
        # The lanes of a subgroup share the keys (lanes in step walk equal shares) and merge their online
        # softmaxes with subgroup operations, in the same dispatch.
        merge = ("    let m_all = subgroupMax(m_run);\n    let weight = exp(m_run - m_all);\n"
                 "    let l_all = subgroupAdd(l_run * weight);\n"
                 + each_quad("acc[@c] = subgroupAdd(acc[@c] * weight);", "    ") + "\n"
                 "    if (z == 0u) {\n" + stores("out", "(i * HEADS + h) * D", " / l_all") + "\n    }")
        shared = _kernel(ctx, f"{label}_split", "attention_lanes", bindings + [_out(node_id)], lanes(nh * sub),
                         splits=sub, wg=wg, epilogue=merge, **{**common, **_key_trips(-(-keys // sub)),
                                                               "key_bounds": _key_bounds(a["window"], "z", sub)})
        return replace(shared, tokens=(1, SPLIT_TOKENS))

    if decode_only or (fold and splits >= 2):
        return [subgroup_split()]
    whole = _kernel(ctx, label, "attention_lanes", bindings + [_out(node_id)], lanes(nh), splits=1, wg=wg,
                    epilogue=stores("out", "(i * HEADS + h) * D", " / l_run"), **common)
    if fold:
        return [whole]
    longer = whole          # the kernel of steps of more than SPLIT_TOKENS
    if (sub > 1 and wg % sub == 0 and (d // 4) % sub == 0 and all(b.texture for b in bindings[1:3])
            and not (norms & 2 or rotate_k or norms & 4)):
        # Such steps with subgroups: a subgroup's lanes take consecutive queries of one head.
        fetch = lambda name: [f"        let {name}t{r} = {name}4({name}_base / 4u + {r * sub}u + sg_lane);"
                              for r in range(d // 4 // sub)]
        broadcast = lambda name, c: f"subgroupBroadcast({name}t{c // sub}, {c % sub}u)"
        longer = _kernel(ctx, label, "attention_lanes", bindings + [_out(node_id)],
                         lambda s: grid_1d(-(-s // sub) * sub * nh, wg), splits=1, wg=wg, **{
                             **common, **_key_trips(keys, sg_lane=True), "subgroup_args": ", sg_lane: u32",
                             "main": _lanes_main(wg, sg_lane=True),
                             "lanes": f"    let h = (lane / {sub}u) % HEADS;     // query head\n"
                                      f"    let row = lane / (HEADS * {sub}u) * {sub}u + lane % {sub}u;\n"
                                      "    let i = min(row, S - 1u);            // query row (past S, row S - 1 again)",
                             "first_key": "subgroupMin(lo)", "end_key": "subgroupMax(hi)", "seen": "j >= lo && j < hi",
                             "score": "\n".join(fetch("k") + [f"        dot4 = fma(query[{c}], {broadcast('k', c)}, dot4);"
                                                            for c in range(d // 4)]),
                             "accumulate": "\n".join(fetch("v") + [
                                 f"        acc[{c}] = fma({broadcast('v', c)}, vec4<f32>(p), acc[{c}] * correction);"
                                 for c in range(d // 4)]),
                             "epilogue": "    if (row < S) {\n" + stores("out", "(i * HEADS + h) * D", " / l_run")
                                         + "\n    }"})
    if splits < 2:
        if longer is whole:
            return [whole]
        return [replace(whole, tokens=(1, SPLIT_TOKENS)), replace(longer, tokens=(SPLIT_TOKENS + 1, math.inf))]
    if sub > 1 and wg % sub == 0:
        return [replace(longer, tokens=(SPLIT_TOKENS + 1, math.inf)), subgroup_split()]
    record = d + 2
    scratch = Ref("scratch", node_id, nh * splits * record * 4)
    epilogue = (f"    let rec = ((i * HEADS + h) * SPLITS + z) * {record}u;\n    part[rec] = m_run; part[rec + 1u] = l_run;\n"
                + stores("part", "rec + 2u", ""))
    split_bounds = _key_bounds(a["window"], "z", splits, LANE_KEYS)
    partials = _kernel(ctx, f"{label}_split", "attention_lanes", bindings + [Binding("part", scratch, "f32", write=True)],
                       lanes(nh * splits), splits=splits, wg=wg, epilogue=epilogue,
                       **{**common, **_key_trips(-(-keys // splits)), "key_bounds": split_bounds})
    return [replace(longer, tokens=(SPLIT_TOKENS + 1, math.inf)), replace(partials, tokens=(1, SPLIT_TOKENS)),
            _combine_splits(ctx, node_id, label, scratch, nh, d, splits)]


# A step's own keys (attention with no cache or window) that attention_lanes.wgsl walks within lavapipe's
# loop limit (`_key_trips`), in LOOP_TRIPS: 8 covers the longest context of the families (262144).
OWN_KEY_TRIPS = 8


def _key_trips(keys: int, sg_lane: bool = False) -> dict:
    """attention_lanes.wgsl's key loop for lanes that walk up to `keys` keys: KEYS_PER_TRIP visits a trip,
    so that the loop trips at most LOOP_TRIPS times (lavapipe's loop limiter). `sg_lane`: visit takes it."""
    per = max(1, -(-keys // LOOP_TRIPS))
    args = ", g, lo, hi" + ", sg_lane" * sg_lane
    visits = [f"        visit(j{args});"] + [f"        if (j + {u}u < keys_to) {{ visit(j + {u}u{args}); }}"
                                              for u in range(1, per)]
    return {"keys_per_trip": per, "visits": "\n".join(visits)}


def _within(kernels: list[Kernel], lo: int, hi: float = math.inf) -> list[Kernel]:
    """The kernels restricted to steps of lo .. hi tokens (those left with none dropped)."""
    out = [replace(k, tokens=(max(lo, k.tokens[0]), min(hi, k.tokens[1]))) for k in kernels]
    return [k for k in out if k.tokens[0] <= k.tokens[1]]


def _lanes_main(wg: int, sg_lane: bool = False) -> str:
    """attention_lanes.wgsl's entry point: an invocation a lane, each its lane's writer."""
    builtin = ", @builtin(subgroup_invocation_id) sg_lane: u32" if sg_lane else ""
    return (f"@compute @workgroup_size({wg})\nfn main(@builtin(global_invocation_id) gid: vec3<u32>, "
            f"@builtin(num_workgroups) nwg: vec3<u32>{builtin}) {{\n"
            f"    attend(gid.y * nwg.x * {wg}u + gid.x, true{', sg_lane' * sg_lane});\n}}")


def _fresh_kv(ctx, fold: tuple[int, int], bindings: list[Binding], a: dict, subs: dict, each_quad
              ) -> tuple[list[Binding], list[str], str]:
    """The folded cache writes of a one-token attention kernel (`_folded_cache_writes`): its bindings (the
    caches now written too), helpers, and the lines after the key loop that attend to the step's own key
    and value, made as `_cache_head` makes them, and store them."""
    g = ctx.graph
    kc, vc = g[fold[0]], g[fold[1]]
    slots, kv_heads, d = kc.shape
    bindings = list(bindings)
    stores = []
    for index, (name, cache_id) in enumerate((("k", fold[0]), ("v", fold[1])), start=1):
        cache = replace(bindings[index], write=True, reads=True, quads=not bindings[index].texture)
        bindings[index] = cache
        if cache.texture:       # its buffer, beside the texture attention reads
            bindings.append(Binding(f"{name}_cache", Ref("node", cache_id), "f32", write=True, quads=True))
            stores.append(f"{name}_cache[at + @c] = {name}f[@c]; "
                          f"store_{name}(at + @c, bitcast<vec4<u32>>({name}f[@c]));")
        else:
            stores.append(f"{name}[at + @c] = {name}f[@c];")
    parts, lines = [], []
    for name, node in (("k", kc), ("v", vc)):
        attrs = node.attrs
        weight = f" * load_{name}_norm_w(d)" if attrs["norm"] == "weighted" else ""
        if weight:
            bindings.append(ctx.value(node.inputs[3], f"{name}_norm_w"))
        elem = f"load_q(base + d) * r{weight}"
        if attrs["rope"] is not None:       # the attention's own table (`_folded_cache_writes` checks they agree)
            parts.append(f"fn fresh_{name}_elem(base: u32, d: u32, r: f32) -> f32 {{ return {elem}; }}")
            elem = f"rotate(fresh_{name}_elem(base, d, r), fresh_{name}_elem(base, partner(d), r), row, d)"
        parts.append(f"fn fresh_{name}(base: u32, d: u32, r: f32, row: u32) -> f32 {{ return {elem}; }}")
        lines.append(f"        let {name}_at = i * {subs['q_row']}u + {attrs['at']}u + g * D;\n        var r{name} = 1.0;")
        if attrs["norm"] is not None:
            lines.append("        " + _head_rms(f"r{name}", f"{name}_ss", f"load_q({name}_at + d)", "        ",
                                                  lit(attrs["eps"])))
        lines.append(f"        var {name}f: array<vec4<f32>, {d // 4}>;\n" + each_quad(
            f"{name}f[@c] = vec4<f32>(" + ", ".join(f"fresh_{name}({name}_at, 4u * @c + {j}u, r{name}, i)"
                                                   for j in range(4)) + ");"))
    block = "\n".join([
        "    // The step's own key and value, made from its row rather than read back from the cache this pass",
        "    // writes; the lane of the share that holds the key attends to them, and for a kv head's first",
        "    // query head stores them.",
        "    if (lo <= qi && qi < hi) {", *lines,
        "        var dot4 = vec4<f32>(0.0);", each_quad("dot4 = fma(query[@c], kf[@c], dot4);"),
        f"        var s = (dot4.x + dot4.y + dot4.z + dot4.w) * {subs['scale']};", f"        {subs['softcap']}",
        "        let m_new = max(m_run, s);\n        let correction = exp(m_run - m_new);",
        "        let p = exp(s - m_new);\n        l_run = l_run * correction + p;\n        m_run = m_new;",
        each_quad("acc[@c] = fma(vf[@c], vec4<f32>(p), acc[@c] * correction);"),
        f"        if (writer && h % {a['heads'] // kv_heads}u == 0u) {{",
        f"            let at = ((step.start + i) % {slots}u * {kv_heads * d}u + g * D) / 4u;",
        *(each_quad(line, "            ") for line in stores), "        }", "    }"])
    return bindings, parts, block


# Split-KV attention (flash-decoding) for steps of up to SPLIT_TOKENS tokens over a cache: each query's
# keys are shared among ceil(slots / KEYS_PER_SPLIT) workgroups (at most MAX_SPLITS), so a decode step
# fills the machine at long contexts instead of running one workgroup per head.
SPLIT_TOKENS = 4
KEYS_PER_SPLIT = 256
MAX_SPLITS = 32
# attention_lanes.wgsl: workgroups of one SIMD vector, so that even a decode step's few lanes spread over
# the cores; lanes wanted in all (a few per core: lavapipe runs a thread per core); keys a split's share is
# rounded to.
LANES_WG = 8
GPU_LANES_WG = 64           # a GPU's decode attention (two 32-wide subgroups, or one of 64)
CPU_LANES = 2 * LANES_WG * CORES
LANE_KEYS = 16


def _split_attention(ctx, node_id, label, bindings, nh: int, d: int, splits: int, window: int | None,
                     subs: dict) -> list[Kernel]:
    """The attention template with its keys split across grid z, writing partials (m, l, acc[d]) per
    (query, head, split) to scratch, then a pass per output element that merges them."""
    record = d + 2
    scratch = Ref("scratch", node_id, nh * splits * record * 4)       # bytes per token
    key_bounds = _key_bounds(window, "wg.z", splits, min(64, KEYS_PER_SPLIT))
    epilogue = (f"    let rec = ((i * {nh}u + h) * {splits}u + wg.z) * {record}u;\n"
                "    if (li == 0u) { part[rec] = m_run; part[rec + 1u] = l_run; }\n"
                "    for (var d = li; d < D; d = d + WG) { part[rec + 2u + d] = acc[d]; }")
    partials = _kernel(ctx, f"{label}_split", "attention", bindings + [Binding("part", scratch, "f32", write=True)],
                       lambda s: (nh, s, splits), epilogue=epilogue, **{**subs, "key_bounds": key_bounds})
    return [replace(partials, tokens=(1, SPLIT_TOKENS)), _combine_splits(ctx, node_id, label, scratch, nh, d, splits)]


def _key_bounds(window: int | None, split: str = "", splits: int = 1, align: int = 1) -> str:
    """Attention's lines setting lo .. hi - 1, the keys the query at index qi among the keys sees: causal,
    within the sliding window, and with `splits` > 1 narrowed to share `split` of them. The shares are
    equal shares of the keys the query sees (known only at run time: they grow with step.start), rounded
    up to whole blocks of `align` keys (attention.wgsl's 64-key blocks, so no split visits more blocks
    than needed). Late shares may be empty (lo == hi): their partial is neutral (m = -3e38, l = 0) and
    weighs nothing in the merge."""
    lines = ["var lo = 0u;"]
    if window:
        lines.append(f"if (qi + 1u >= {window}u) {{ lo = qi + 1u - {window}u; }}")
    lines.append("var hi = qi + 1u;")
    if splits > 1:
        lines += [f"let share = ((hi - lo + {splits - 1}u) / {splits}u + {align - 1}u) / {align}u * {align}u;",
                  f"lo = min(hi, lo + {split} * share);", "hi = min(hi, lo + share);"]
    return "\n".join("    " + line for line in lines)


def _combine_splits(ctx, node_id, label, scratch: Ref, nh: int, d: int, splits: int) -> Kernel:
    """An invocation per output element merging its (query, head)'s split partials (m, l, acc[d])."""
    record = d + 2
    node = ctx.graph[node_id]
    body = f"""    // The element's (query, head) has {splits} records of [m, l, acc[{d}]], rescaled to their common max.
    let rec = (i / {d}u) * {splits * record}u;
    var mx = -3.0e38;
    for (var z = 0u; z < {splits}u; z = z + 1u) {{ mx = max(mx, load_part(rec + z * {record}u)); }}
    var total = 0.0;
    var a = 0.0;
    for (var z = 0u; z < {splits}u; z = z + 1u) {{
        let at = rec + z * {record}u;
        let weight = exp(load_part(at) - mx);
        total = total + weight * load_part(at + 1u);
        a = a + weight * load_part(at + 2u + i % {d}u);
    }}
    out[i] = a / total;"""
    combine = _elementwise(ctx, f"{label}_combine", node, [Binding("part", scratch, "f32"), _out(node_id)], body)
    return replace(combine, tokens=(1, SPLIT_TOKENS))


def _cache_write(ctx, node_id, node: Node) -> list[Kernel]:
    """The cache writes of a step's keys and values (every cache_write of the same x and position, with
    the same head size) share one dispatch (`_cache_writes`). A head is read at column `at` of the token's
    row, RMS-normed, rotated and stored in slot (start + token) mod slots of its cache (bound as that node's
    output); the first node lowers them all."""
    group = _cache_group(ctx.graph, node_id)
    if group[0] != node_id:
        return []
    kernel = _cache_writes(ctx, group)
    readers = _readers(ctx.graph, node_id)
    if readers and sorted(_folded_cache_writes(ctx, readers[0]) or ()) == group:
        kernel = replace(kernel, tokens=(2, math.inf))      # a one-token step's are its attention's
    return [kernel]


def _cache_group(g: Graph, node_id: int) -> list[int]:
    """The cache writes that share cache_write `node_id`'s dispatch."""
    node = g[node_id]
    group = [i for i, n in enumerate(g.nodes) if n.op == "cache_write" and n.inputs[1:3] == node.inputs[1:3]
             and g[n.inputs[0]].shape[2] == g[node.inputs[0]].shape[2]]
    # Moved to the first write's place, a write must not pass a reader of its cache's old contents, and
    # the rotation reads one table.
    group = [i for i in group if not any(g[i].inputs[0] in g[j].inputs for j in range(group[0] + 1, i))]
    if len({g[i].attrs["rope"] for i in group} - {None}) > 1:
        group = [node_id]
    return group


def _folded_cache_writes(ctx, node_id: int) -> tuple[int, int] | None:
    """The cache writes (of its keys, of its values) that fused_attention `node_id` makes itself in a
    one-token step, or None.

    A one-token cache write is a few microseconds of work behind a dispatch's fixed 25-40 us (8 of a
    34M-parameter decode step's 52 dispatches). Its attention has the lanes to do it: each lane computes the
    step's own key and value from the row they come from (the row its query comes from) instead of reading
    them back, and one lane per kv head stores them. No lane reads the slot they go to: it held a position
    the query no longer sees (see models/cache.py). This needs the CPU layout's texture copy of the cache
    bound read-write, or on a GPU the subgroup decode kernel (the split-record pass is left as it is)."""
    g = ctx.graph
    node = g[node_id]
    if node.op != "fused_attention" or not node.attrs["cached"]:
        return None
    a = node.attrs
    k_id, v_id = node.inputs[1:3]
    kc, vc = g[k_id], g[v_id]
    if (kc.op != "cache_write" or vc.op != "cache_write" or kc.inputs[1] != node.inputs[0]
            or sorted(_cache_group(g, k_id)) != sorted((k_id, v_id)) or kc.attrs["rope"] != a["rope"]
            or vc.attrs["rope"] is not None or a["norms"] & 6):
        return None
    if any(k in g[i].inputs for i in range(node_id) for k in (k_id, v_id)):
        return None     # a reader before the attention would miss the step's key
    lane_layout, splits = _lane_plan(ctx, a, kc, vc)
    sub = ctx.subgroup_size
    if not lane_layout:
        return None
    if ctx.layout == "cpu":
        one_token_kernel = splits < 2 or (sub > 1 and LANES_WG % sub == 0)
        if not one_token_kernel or (ctx.textures and not ctx.read_write_textures):
            return None
    elif not (sub > 1 and GPU_LANES_WG % sub == 0):
        return None
    return k_id, v_id


def _lane_plan(ctx, a: dict, k: Node, v: Node) -> tuple[bool, int]:
    """Whether attention_lanes.wgsl can read the heads (whole vec4s), and the splits of a decode step's keys."""
    splits = min(MAX_SPLITS, -(-k.shape[0] // KEYS_PER_SPLIT)) if a["cached"] else 1
    lane_layout = a["head_dim"] % 4 == 0 and all(x % 4 == 0 for x in (_row_width(k), _row_width(v), a["k_at"],
                                                                      a["v_at"]))
    if ctx.layout == "cpu" and lane_layout:
        # A CPU has few lanes: enough splits to give each a query head's share, and each more keys.
        splits = min(splits, -(-CPU_LANES // a["heads"]))
    return lane_layout, splits


def _cache_writes(ctx, group: list[int]) -> Kernel:
    """The dispatch of a group of cache writes: a row (rowreduce's workgroup, or subgroup) per (token, head of
    any of them)."""
    g = ctx.graph
    node = g[group[0]]
    x, d = g[node.inputs[1]], g[node.inputs[0]].shape[2]
    bindings, parts, first = [ctx.value(node.inputs[1], "x")], [], 0
    heads_in_all = sum(g[g[i].inputs[0]].shape[1] for i in group)
    # Whole vec4s everywhere (a rotation's halves too): the heads are read and written by quads.
    quads = (d % 8 == 0 and _row_width(x) % 4 == 0 and all(g[i].attrs["at"] % 4 == 0 for i in group)
             and bindings[0].dtype == "f32" and not bindings[0].texture)
    if quads:
        bindings = [replace(bindings[0], quads=True)]
    body = [f"    let token = row / {heads_in_all}u;\n    let hrow = row % {heads_in_all}u;"]
    for k, i in enumerate(group):
        mine, p, lines = _cache_head(ctx, i, g[i], x, k, f"hrow - {first}u", quads)
        bindings += [b for b in mine if b not in bindings]
        parts += p
        first += g[g[i].inputs[0]].shape[1]
        if len(group) > 1:              # each head belongs to one of the caches
            branch = "if" if k == 0 else "} else" if k == len(group) - 1 else "} else if"
            guard = f" (hrow < {first}u)" if not branch.endswith("else") else ""
            body.append(f"    {branch}{guard} {{   // {g[g[i].inputs[0]].attrs['name']}")
        body += ["    " * (len(group) > 1) + line for text in lines for line in text.split("\n")]
    if len(group) > 1:
        body.append("    }")
    # On a CPU every invocation of a workgroup runs, so a head gets one subgroup (`_row_wg`), or about a lane a
    # texel (a power of two, for the norm's tree): 16 for 64-wide heads writes a 64-token step's keys 2-3x
    # faster than 64 lanes.
    wg = _row_wg(ctx) if ctx.layout == "cpu" else ROW_WG
    if ctx.layout == "cpu" and wg == ROW_WG:
        wg = min(ROW_WG, max(8, _power_of_two_at_most(d // 4)))
    return _kernel(ctx, "cache_write", "rowreduce", bindings, lambda s: grid_1d(s * heads_in_all, 1),
                   prelude=helpers(*parts), wg=wg, rows=f"(step.S * {heads_in_all}u)", width=d, body="\n".join(body))


def _cache_head(ctx, node_id, node: Node, x: Node, k: int, head: str, quads: bool
                ) -> tuple[list[Binding], list[str], list[str]]:
    """(bindings, helpers, body lines) writing head `head` of cache_write `node` (the k-th of its dispatch),
    an element a lane, or with `quads` a vec4 a lane (x, the cache and the rope table then read and written as
    vec4s: lavapipe takes a storage access lane by lane, whatever its width)."""
    cache = ctx.graph[node.inputs[0]]
    slots, heads, d = cache.shape
    a = node.attrs
    bindings, parts, w, out, texels = [], [], f"w{k}", f"out{k}", f"texels{k}"
    body = [f"    let src = token * {_row_width(x)}u + {a['at']}u + ({head}) * n;",
            f"    let dst = ((step.start + token) % {slots}u) * {heads * d}u + ({head}) * n;"]
    if a["norm"] is not None:
        body.append(_row_rms("x", a["eps"], "src", quads))
    weighted = ctx.value(node.inputs[3], w) if a["norm"] == "weighted" else None
    if weighted:
        bindings.append(weighted)

    def elem(j: str) -> str:
        """Element j of the head after its norm (with quads: elements j..j+3)."""
        if not quads:
            return f"load_x(src + {j})" + " * r" * (a["norm"] is not None) + f" * load_{w}({j})" * bool(weighted)
        scale = f" * {_load4(weighted, j)}" if weighted else ""
        return f"quad_x((src + {j}) / 4u)" + " * r" * (a["norm"] is not None) + scale

    value = elem("j")
    if a["rope"] is not None:
        inv_freq, scaling = a["rope"]
        key = ctx.rope_key(Node("rope", (), {"inv_freq": inv_freq, "attention_scaling": scaling}, (), "f32"))
        bindings.append(Binding("table", Ref("rope", key), "f32", quads=quads))
        parts += [f"const HALF: u32 = {d // 2}u;", ROTATE4 if quads else ROTATE]
        value = f"rotate{'4' * quads}({value}, {elem('select(j - HALF, j + HALF, j < HALF)')}, token, j)"
    bindings.append(Binding(out, Ref("node", node_id), "f32", write=True, quads=quads))
    texture = ctx.textures and d % 4 == 0
    if texture:         # the cache's texture copy (read by attention) is written here too
        bindings.append(Binding(texels, Ref("node", node_id), "f32", write=True, texture=True))
    if quads:
        body.append(f"""    for (var q = li; q < n / 4u; q = q + WG) {{
        let j = 4u * q;
        let v = {value};
        {out}[dst / 4u + q] = v;""" + f"\n        store_{texels}(dst / 4u + q, bitcast<vec4<u32>>(v));" * texture
                    + "\n    }")
    elif texture:
        body.append(f"""    for (var t = li; t < n / 4u; t = t + WG) {{
        var v: vec4<f32>;
        for (var c = 0u; c < 4u; c = c + 1u) {{ let j = 4u * t + c; v[c] = {value}; {out}[dst + j] = v[c]; }}
        store_{texels}(dst / 4u + t, bitcast<vec4<u32>>(v));
    }}""")
    else:
        body.append(f"    for (var j = li; j < n; j = j + WG) {{ {out}[dst + j] = {value}; }}")
    return bindings, parts, body


def _moe(ctx, node_id, node: Node) -> list[Kernel]:
    x, route, gate_up, down = (ctx.graph[j] for j in node.inputs)
    e, two_im, h = gate_up.shape
    im, slots = two_im // 2, node.attrs["k"]
    hidden = Binding("hidden", Ref("scratch", node_id, slots * im * 4), "f32", write=True)
    subs = dict(experts=e, hidden=h, inter=im, slots=slots, prelude=helpers(*act_fn(node.attrs["act"])),
                tokens=dim(x.shape[0]))
    x_b, route_b = ctx.value(node.inputs[0], "x"), ctx.value(node.inputs[1], "route")

    def weight(j, name):
        """(binding per window, windows) of an expert tensor, whole or split by experts."""
        w = ctx.graph[node.inputs[j]]
        if w.op != "parameter":
            return [ctx.value(node.inputs[j], name)], [(0, e)]
        pname = w.attrs["name"]
        wins = ctx.param_windows(pname)
        return [ctx.weight(name, pname, i) for i in range(len(wins))], wins

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
    "softcap": _pointwise, "sigmoid": _pointwise, "glu": _glu, "slice": _slice, "rope": _rope,
    "last_row": _last_row, "argmax": _argmax,
    "rms_norm": _rms_norm, "softmax": _softmax, "topk_route": _topk_route, "add_norm": _add_norm,
    "matmul": _matmul, "linear": _linear, "embedding": _embedding, "moe": _moe,
    "attention": _attention, "fused_attention": _attention, "cache_write": _cache_write,
}
