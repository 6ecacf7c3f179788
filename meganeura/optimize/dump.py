"""--dump-egraph DIR: everything needed to see what the optimizer did.

  report.txt / report.json   rules fired, e-classes, e-nodes, times, kernels and bytes before/after
  before.txt / after.txt     the graph before and after, one node per line
  kind<k>.egg                the egglog program run for layer kind k (datatype, rules, the layer's terms)
  kind<k>.json / kind<k>.dot the saturated e-graph of kind k (egraph-serialize JSON, Graphviz DOT)
"""
from __future__ import annotations

import json
import os

from .optimizer import Optimized


def report_text(opt: Optimized) -> str:
    r = opt.report
    lines = [
        f"optimized in {r['optimize_s']:.3f} s: {r['segments']} segments, {r['layer_kinds']} distinct kinds "
        f"(saturation {r['saturate_s']:.3f} s, extraction {r['extract_s']:.3f} s)",
        f"e-graphs: {r['eclasses']} e-classes, {r['enodes']} e-nodes",
        f"kernels per step: {r['kernels_before']} -> {r['kernels_after']} "
        f"({r['kernels_before'] / max(1, r['kernels_after']):.2f}x fewer)",
        f"estimated bytes per step at {r['tokens']} token(s): {r['bytes_before']:,} -> {r['bytes_after']:,}",
        "rules fired (matches, over all layers):",
    ]
    lines += [f"  {name:28s} {n}" for name, n in sorted(r["rules_fired"].items(), key=lambda kv: -kv[1])]
    lines.append("layer kinds:")
    for k, kind in enumerate(r["kinds"]):
        segs = kind["segments"]
        shown = ", ".join(segs[:8]) + (f", … ({len(segs)} in all)" if len(segs) > 8 else "")
        lines.append(f"  kind{k}: {shown}: {kind['eclasses']} e-classes, {kind['enodes']} e-nodes, "
                     f"saturate {kind['saturate_s'] * 1e3:.1f} ms, extract {kind['extract_s'] * 1e3:.1f} ms")
    return "\n".join(lines) + "\n"


def dump(opt: Optimized, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)

    def write(name: str, text: str):
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)

    write("report.txt", report_text(opt))
    write("report.json", json.dumps(opt.report, indent=1, default=str) + "\n")
    write("before.txt", opt.before.to_text() + "\n")
    write("after.txt", opt.graph.to_text() + "\n")
    for k, kind in enumerate(opt.kinds):
        write(f"kind{k}.egg", kind.program)
        write(f"kind{k}.json", kind.egraph_json)
        write(f"kind{k}.dot", kind.egraph_dot)
