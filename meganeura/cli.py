"""The `meganeura` command. Exit codes: 0 ok, 2 bad input (one line on stderr), 1 internal error."""
from __future__ import annotations

import argparse
import sys

from .graph import Graph


def cmd_graph(args) -> int:
    from meganeura.models import registry

    family, cfg = registry.from_hf(args.model)
    g = Graph()
    g.set_outputs([family.build_graph(g, cfg, seq_len=args.seq_len)])
    kernels = sum(1 for n in g.nodes if n.op not in ("input", "parameter", "reshape"))
    params = sum(1 for n in g.nodes if n.op == "parameter")
    print(f"{cfg.model_type}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}")
    print(f"graph: {len(g)} nodes, {params} parameters, {kernels} compute ops")
    print(f"ops: {g.summary()}")
    if args.no_optimize:
        return 0
    from .optimize import optimize
    from .optimize.dump import dump, report_text

    opt = optimize(g, keep=args.dump_egraph is not None)
    print(f"optimized ops: {opt.graph.summary()}")
    print(report_text(opt), end="")
    if args.dump_egraph:
        dump(opt, args.dump_egraph)
        print(f"e-graph, programs, graphs and report written to {args.dump_egraph}")
    return 0


def cmd_devices(args) -> int:
    from .backend.device import list_adapters

    for a in list_adapters():
        print(f"[{a['index']}] {a['name']}  backend={a['backend']} type={a['type']} "
              f"features={','.join(a['features']) or '-'}")
        print("    " + " ".join(f"{k}={v}" for k, v in a["limits"].items()))
    return 0


def cmd_bench(args) -> int:
    import json

    from .bench import bench

    result = bench(args.model, prompt_len=args.prompt_len, new_tokens=args.new_tokens, backend=args.backend)
    if not args.json:
        for k, v in result.items():
            print(f"{k:24s} {v}")
    print(json.dumps(result))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="meganeura", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("graph", help="build and optimize a model's graph from its config.json; print a summary")
    p.add_argument("model", help="checkpoint directory or config.json")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--dump-egraph", metavar="DIR", help="write the e-graphs, egglog programs, graphs and report")
    p.add_argument("--no-optimize", action="store_true", help="only build the graph")
    p.set_defaults(func=cmd_graph)
    p = sub.add_parser("devices", help="list GPU adapters with backend, type, features and limits")
    p.set_defaults(func=cmd_devices)
    p = sub.add_parser("bench", help="prefill/decode speed against the device's read ceiling (random ids)")
    p.add_argument("model", help="checkpoint directory, or a config.json (random bf16 weights)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--backend", default="wgpu", choices=["wgpu", "numpy"])
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.set_defaults(func=cmd_bench)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError) as e:   # bad input: config, checkpoint, shapes; no device
        print(f"meganeura: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
