"""Our own extractor: pick one e-node per e-class from egglog's serialized e-graph (JSON).

The cost of a choice is what the device would spend on the kernels it implies, in integer
nanoseconds at a given token count: a fixed cost per dispatch, the bytes it reads and writes at the
device's streaming rate, and its FLOPs at the device's rate. Extraction is DAG-aware: the cost of a
class is the sum over the set of classes its choice needs, so a tensor that two consumers read is
paid for once. Classes are visited once each in dependency order; on a layer-sized e-graph the sets
are small, which is why the optimizer works a layer kind at a time.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from .decode import ClassRef, ENode, Lowered, lower_enode, shape_info


@dataclass(frozen=True)
class DeviceCost:
    """What one step costs on a device: per dispatch, per byte moved, per FLOP (all in ns)."""
    name: str = "gpu"
    dispatch_ns: int = 5_000
    bytes_per_ns: float = 1_000.0       # 1 TB/s
    flops_per_ns: float = 50_000.0      # 50 TFLOP/s

    @staticmethod
    def for_adapter(device_type: str) -> "DeviceCost":
        if device_type == "cpu":                         # lavapipe: DESIGN §6's measurements
            return DeviceCost("cpu", dispatch_ns=30_000, bytes_per_ns=7.0, flops_per_ns=100.0)
        if device_type == "integrated-gpu":
            return DeviceCost("integrated-gpu", dispatch_ns=10_000, bytes_per_ns=100.0, flops_per_ns=5_000.0)
        return DeviceCost()


LITERAL_TYPES = {"String": lambda s: json.loads(s), "i64": int, "f64": float, "bool": lambda s: s == "true"}


class EGraph:
    """The serialized e-graph: tensor classes, their e-nodes with literal arguments resolved."""

    def __init__(self, serialized_json: str):
        data = json.loads(serialized_json)
        nodes = data["nodes"]
        types = {c: d["type"] for c, d in data["class_data"].items()}
        self.classes: dict[str, list[ENode]] = {}
        self.original: dict[int, str] = {}                # node id of the input graph -> class
        self.same: dict[str, set[str]] = {}               # class -> classes equal to it, kept apart (rules.Same)
        literal: dict[str, object] = {}
        for nid, n in nodes.items():
            t = types.get(n["eclass"])
            if t in LITERAL_TYPES:
                literal[nid] = LITERAL_TYPES[t](n["op"])
        for nid, n in nodes.items():
            if n["op"] == "Id":
                self.original[literal[n["children"][1]]] = nodes[n["children"][0]]["eclass"]
            elif n["op"] == "Same":
                old, new = (nodes[c]["eclass"] for c in n["children"])
                self.same.setdefault(old, set()).add(new)
            elif types.get(n["eclass"]) == "T" and not n.get("subsumed"):
                args = tuple(literal[c] if c in literal else ClassRef(nodes[c]["eclass"]) for c in n["children"])
                self.classes.setdefault(n["eclass"], []).append(ENode(n["op"], args))
        self.size = sum(len(v) for v in self.classes.values())
        self.nil = next((c for c, ns in self.classes.items() if any(n.op == "Nil" for n in ns)), None)


class Extractor:
    def __init__(self, egraph: EGraph, tables, cost: DeviceCost, tokens: int = 1):
        self.eg, self.tables, self.cost, self.tokens = egraph, tables, cost, tokens
        self.info: dict[str, tuple] = {}            # class -> (shape, dtype, bytes)
        self.best: dict[str, ENode] = {}
        self.own: dict[str, int] = {}
        self.needs: dict[str, frozenset] = {}
        self.total: dict[str, int] = {}

    def lower(self, enode: ENode) -> Lowered:
        return lower_enode(enode, self.tables, nil=lambda x: isinstance(x, ClassRef) and x.cid == self.eg.nil)

    # -- shapes of classes, from any e-node whose inputs are known
    def class_info(self, cid: str, visiting=frozenset()):
        if cid in self.info:
            return self.info[cid]
        for enode in self.eg.classes[cid]:
            low = self.lower(enode)
            kids = [r.cid for r in low.inputs]
            if any(k in visiting or k == cid for k in kids):
                continue
            try:
                child_infos = {k: self.class_info(k, visiting | {cid}) for k in kids}
            except LookupError:
                continue
            info = shape_info(low, child_infos, self.tables, self.tokens)
            if info is not None:
                self.info[cid] = info
                return info
        raise LookupError(f"no shape for e-class {cid}")

    def node_cost(self, enode: ENode, cid: str) -> int:
        """Nanoseconds for the kernel this e-node is (0 for leaves, packs and views)."""
        low = self.lower(enode)
        if not low.kernel:
            return 0
        ins = {r.cid for r in low.inputs}
        moved = sum(self.class_info(c)[2] for c in ins) + self.class_info(cid)[2]
        flops = low.flops([self.class_info(r.cid)[0] for r in low.inputs], self.class_info(cid)[0], self.tokens)
        c = self.cost
        return c.dispatch_ns + math.ceil(moved / c.bytes_per_ns) + math.ceil(flops / c.flops_per_ns)

    # -- choose
    def run(self, roots: list[str]):
        order = self._order(roots)
        for cid in order:
            best = None
            for enode in self.eg.classes[cid]:
                kids = {a.cid for a in enode.args if isinstance(a, ClassRef)}
                if any(k not in self.total for k in kids):
                    continue                          # an input on a cycle through this class
                needs = frozenset().union(*(self.needs[k] for k in kids)) if kids else frozenset()
                own = self.node_cost(enode, cid)
                total = own + sum(self.own[k] for k in needs)
                if best is None or total < best[0]:
                    best = (total, enode, own, needs)
            if best is None:
                raise ValueError(f"e-class {cid} has no acyclic e-node")
            self.total[cid], self.best[cid], self.own[cid], needs = best
            self.needs[cid] = needs | {cid}
        return self.best

    def settle(self, roots: list[str]) -> list[str]:
        """The roots, each replaced by a class `Same` as it that the other roots' choices already need: a
        cache a later layer reads is the write the packed attention makes, not a second write of its own."""
        out = []
        for i, root in enumerate(roots):
            others = frozenset().union(*(self.needs[r] for j, r in enumerate(roots) if j != i))
            out.append(next((c for c in sorted(self.eg.same.get(root, ())) if c in others), root))
        return out

    def _order(self, roots: list[str]) -> list[str]:
        """Classes reachable from the roots, inputs first (depth-first; back edges are skipped)."""
        order, state = [], {}
        for root in roots:
            stack = [(root, iter(self._kids(root)))]
            state[root] = 1
            while stack:
                cid, it = stack[-1]
                nxt = next(it, None)
                if nxt is None:
                    stack.pop()
                    state[cid] = 2
                    order.append(cid)
                elif nxt not in state:
                    state[nxt] = 1
                    stack.append((nxt, iter(self._kids(nxt))))
        return order

    def _kids(self, cid: str) -> list[str]:
        return [a.cid for e in self.eg.classes[cid] for a in e.args if isinstance(a, ClassRef)]

    def dag_cost(self, roots: list[str]) -> int:
        return sum(self.own[c] for c in frozenset().union(*(self.needs[r] for r in roots)))
