"""optimize(graph): cut the graph into layers, optimize each distinct layer kind once with egglog and our
extractor, and stitch the optimized layers back together, renaming weights layer by layer.

A layer is the run of nodes built after a weight named `...layers.N....`; what comes before the first
layer is the head, what comes after the last is the tail. Two layers are of one kind when they are
equal once their layer number is erased from weight names: the same ops, attributes, shapes, wiring,
and the same values leaving the layer. A graph without layer-named weights is one segment.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from ..graph import Graph
from . import rules
from .decode import Emitter, nbytes
from .encode import encode
from .extract import DeviceCost, EGraph, Extractor

LAYER = re.compile(r"layers\.(\d+)\.")
NAME_ATTRS = ("name", "fallback")


def _rename(op: str, attrs: dict, old: str, new: str) -> dict:
    """The names in a weight's or state's attrs with `old` (a layer prefix) replaced by `new`."""
    if op not in ("parameter", "state") or old == new:
        return attrs
    if op == "state":
        return dict(attrs, name=attrs["name"].replace(old, new))
    sub = (lambda s: None if s is None else s.replace(old, new))
    out = dict(attrs)
    for k in NAME_ATTRS:
        out[k] = sub(attrs[k])
    if attrs.get("parts"):
        out["parts"] = tuple(tuple(sub(p) for p in group) for group in attrs["parts"])
    if attrs.get("packed"):
        out["packed"] = tuple((sub(n), sub(f)) for n, f in attrs["packed"])
    return out


@dataclass
class Segment:
    label: object                     # "head", a layer number, "tail", or "all"
    nodes: list[int]
    externals: list[int] = field(default_factory=list)     # values from earlier segments, in first-use order
    outputs: list[int] = field(default_factory=list)       # values later segments or the graph read

    @property
    def prefix(self) -> str | None:
        return f"layers.{self.label}." if isinstance(self.label, int) else None


def segments(graph: Graph) -> list[Segment]:
    label, seen_layer = "head", False
    labels: list = []
    for n in graph.nodes:
        if n.op == "parameter":
            m = LAYER.search(n.attrs["name"])
            if m:
                label, seen_layer = int(m.group(1)), True
            elif seen_layer:
                label = "tail"
        labels.append(label)
    if not seen_layer:
        labels = ["all"] * len(graph)
    order, segs = [], {}
    for i, n in enumerate(graph.nodes):
        if n.op in ("input", "parameter", "state"):
            continue
        if labels[i] not in segs:
            segs[labels[i]] = Segment(labels[i], [])
            order.append(labels[i])
        segs[labels[i]].nodes.append(i)
    owner = {i: lab for lab, s in segs.items() for i in s.nodes}
    wanted = set(graph.outputs)
    for lab, s in segs.items():
        for i in s.nodes:
            for j in graph[i].inputs:
                if j in owner and owner[j] != lab:
                    if j not in segs[lab].externals:
                        segs[lab].externals.append(j)
                    wanted.add(j)
    for s in segs.values():
        s.outputs = [i for i in s.nodes if i in wanted]
    return [segs[lab] for lab in order]


def _subgraph(graph: Graph, seg: Segment) -> Graph:
    """The segment alone: earlier segments' values become inputs named %ext<k>, leaves are copied."""
    sub, new = Graph(), {}
    for k, j in enumerate(seg.externals):
        new[j] = sub.input(f"%ext{k}", graph[j].shape, graph[j].dtype)
    for i in seg.nodes:
        for j in graph[i].inputs:
            if j not in new:
                n = graph[j]
                new[j] = sub.add_node(n.op, (), **n.attrs)
        n = graph[i]
        new[i] = sub.add_node(n.op, tuple(new[j] for j in n.inputs), **n.attrs)
    sub.set_outputs([new[o] for o in seg.outputs])
    return sub


def _signature(sub: Graph, prefix: str | None) -> str:
    rows = []
    for n in sub.nodes:
        attrs = _rename(n.op, n.attrs, prefix, "layers.#.") if prefix else n.attrs
        rows.append((n.op, n.inputs, n.shape, n.dtype, sorted(attrs.items(), key=lambda kv: kv[0])))
    return repr((rows, sub.outputs))


@dataclass
class KindResult:
    graph: Graph                     # the optimized segment (inputs %ext<k>, outputs in segment order)
    labels: list
    report: dict
    program: str = ""
    egraph_json: str = ""
    egraph_dot: str = ""


def optimize_segment(sub: Graph, cost: DeviceCost, tokens: int, keep: bool) -> KindResult:
    import egglog.bindings as eb

    enc = encode(sub)
    program = rules.program_text() + enc.text() + rules.SCHEDULE
    t0 = time.perf_counter()
    eg = eb.EGraph()
    run = eg.run_program(*eg.parse_program(program))[-1].report
    t1 = time.perf_counter()
    serialized = eg.serialize([])
    egraph = EGraph(serialized.to_json())
    ext = Extractor(egraph, enc, cost, tokens)
    roots = [egraph.original[o] for o in sub.outputs]
    best = ext.run(roots)
    roots = ext.settle(roots)
    opt = Graph()
    inputs = {}

    def leaf(op, attrs):
        name = attrs["name"]
        if name not in inputs:
            if op == "state":
                inputs[name] = opt.state(name, attrs["shape"])
            else:
                node = sub[enc.inputs[name]]
                inputs[name] = opt.input(name, node.shape, node.dtype, default=node.attrs["default"])
        return inputs[name]

    emitter = Emitter(opt, best, enc, egraph.nil, leaf)
    opt.set_outputs([emitter.emit(r) for r in roots])
    t2 = time.perf_counter()
    report = dict(eclasses=len(egraph.classes), enodes=egraph.size, saturate_s=t1 - t0, extract_s=t2 - t1,
                  rules_fired={k: v for k, v in run.num_matches_per_rule.items() if v},
                  estimated_ns=ext.dag_cost(roots))
    result = KindResult(opt, [], report)
    if keep:
        result.program, result.egraph_json, result.egraph_dot = program, serialized.to_json(), serialized.to_dot()
    return result


def _stitch(graph: Graph, segs: list[Segment], kind_of: dict, kinds: dict) -> Graph:
    out = Graph()
    value: dict[int, int] = {}               # original node -> node of `out`
    leaves: dict[tuple, int] = {}

    def leaf(op: str, attrs: dict) -> int:
        key = (op, attrs["name"])
        if key not in leaves:
            leaves[key] = out.add_node(op, (), **attrs)
        return leaves[key]

    for seg in segs:
        kind = kinds[kind_of[seg.label]]
        template_seg = kind.labels[0]
        old = f"layers.{template_seg.label}." if template_seg.prefix else None
        new = {}
        for i, n in enumerate(kind.graph.nodes):
            if n.op == "input" and n.attrs["name"].startswith("%ext"):
                new[i] = value[seg.externals[int(n.attrs["name"][4:])]]
            elif n.op in ("input", "parameter", "state"):
                attrs = _rename(n.op, n.attrs, old, seg.prefix) if old else n.attrs
                new[i] = leaf(n.op, attrs)
            else:
                new[i] = out.add_node(n.op, tuple(new[j] for j in n.inputs), **n.attrs)
        for o, produced in zip(seg.outputs, kind.graph.outputs):
            value[o] = new[produced]
    for o in graph.outputs:
        if o not in value:                               # an output that is a leaf
            n = graph[o]
            value[o] = leaf(n.op, n.attrs)
    named = {}
    for o in graph.outputs:
        node = value[o]
        if node in named.values():               # two outputs the optimizer proved equal: a view names the second
            node = out.reshape(node, out[node].shape)
        named[graph.names[o]] = node
    out.set_outputs(named)
    return out


@dataclass
class Optimized:
    graph: Graph
    before: Graph
    report: dict
    kinds: list[KindResult]


def optimize(graph: Graph, cost: DeviceCost | None = None, tokens: int = 1, keep: bool = False) -> Optimized:
    """The cheapest equivalent graph the rules can reach, costed for `tokens` tokens per step (1: decode)."""
    cost = cost or DeviceCost()
    t0 = time.perf_counter()
    segs = segments(graph)
    kinds: dict[str, KindResult] = {}
    kind_of: dict = {}
    for seg in segs:
        sub = _subgraph(graph, seg)
        sig = _signature(sub, seg.prefix)
        if sig not in kinds:
            kinds[sig] = optimize_segment(sub, cost, tokens, keep)
        kinds[sig].labels.append(seg)
        kind_of[seg.label] = sig
    result = _stitch(graph, segs, kind_of, kinds)
    elapsed = time.perf_counter() - t0
    before, after = step_estimate(graph, cost, tokens), step_estimate(result, cost, tokens)
    fired: dict[str, int] = {}
    for k in kinds.values():
        for rule, n in k.report["rules_fired"].items():
            fired[rule] = fired.get(rule, 0) + n * len(k.labels)
    report = dict(
        optimize_s=elapsed, segments=len(segs), layer_kinds=len(kinds),
        eclasses=sum(k.report["eclasses"] for k in kinds.values()),
        enodes=sum(k.report["enodes"] for k in kinds.values()),
        saturate_s=sum(k.report["saturate_s"] for k in kinds.values()),
        extract_s=sum(k.report["extract_s"] for k in kinds.values()),
        rules_fired=fired, tokens=tokens, device_cost=cost.name,
        kernels_before=before[0], kernels_after=after[0], bytes_before=before[1], bytes_after=after[1],
        kinds=[dict(segments=[str(s.label) for s in k.labels], **{kk: v for kk, v in k.report.items()})
               for k in kinds.values()])
    return Optimized(result, graph, report, list(kinds.values()))


def step_estimate(graph: Graph, cost: DeviceCost, tokens: int = 1) -> tuple[int, int]:
    """(kernels, bytes read and written) of one step of `graph` at `tokens` tokens."""
    def size(i):
        n = graph[i]
        return nbytes(n.shape, n.dtype if n.op == "parameter" else "f32", tokens)

    kernels = moved = 0
    for i, n in enumerate(graph.nodes):
        if n.op in ("input", "parameter", "state", "reshape"):
            continue
        kernels += 1
        moved += sum(size(j) for j in set(n.inputs)) + size(i)
    return kernels, moved
