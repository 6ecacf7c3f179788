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
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="meganeura", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("graph", help="build a model's graph from its config.json and print a summary")
    p.add_argument("model", help="checkpoint directory or config.json")
    p.add_argument("--seq-len", type=int, default=None)
    p.set_defaults(func=cmd_graph)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:           # bad input: config, checkpoint, shapes
        print(f"meganeura: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
