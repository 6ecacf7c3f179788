"""The `meganeura` command. Exit codes: 0 ok, 2 bad input (one line on stderr), 1 internal error,
130 interrupted (Ctrl-C)."""
from __future__ import annotations

import argparse
import os
import sys

from .graph import Graph
from .quant import check_mode


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

    from .bench import bench, summary

    _backend_note(args.backend)
    result = bench(args.model, prompt_len=args.prompt_len, new_tokens=args.new_tokens, backend=args.backend,
                   quantize=args.quantize)
    if not args.json:
        print("\n".join(summary(result)))
    print(json.dumps(result))
    return 0


def _backend_note(backend: str) -> None:
    """One line on stderr where the device runs through OpenGL (see device.backend_note)."""
    if backend == "wgpu":
        from .backend.device import backend_note, open_device
        note = backend_note(open_device())
        if note:
            print(f"meganeura: {note}", file=sys.stderr)


def _progress(msg: str = "") -> None:
    """A transient status line on stderr, shown only on a terminal ("" clears it)."""
    if sys.stderr.isatty():
        print(f"\r\033[K{msg}", end="", file=sys.stderr, flush=True)


def _check_run_args(args) -> None:
    if args.dry_run or args.memory_limit is not None:
        if args.backend != "wgpu":
            raise ValueError("--dry-run and --memory-limit plan GPU memory; they need --backend wgpu")
        if args.memory_limit is not None:
            from .memory import parse_size
            parse_size(args.memory_limit)
    if args.dry_run:
        return
    if args.prompt is None:
        raise ValueError("the prompt is missing (--prompt)")
    if not args.chat and not args.prompt.strip():
        raise ValueError("the prompt is empty (--prompt)")
    if not args.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.context is not None and args.context < 1:
        raise ValueError(f"--context must be at least 1, got {args.context}")
    check_mode(args.quantize)
    if args.dump_egraph and args.no_optimize:
        raise ValueError("--dump-egraph needs the optimizer; drop --no-optimize")
    if args.profile is not None:
        if args.backend != "wgpu":
            raise ValueError("--profile times GPU kernels; it needs --backend wgpu")
        folder = os.path.dirname(os.path.abspath(args.profile))
        if not os.path.isdir(folder):
            raise ValueError(f"--profile: the directory {folder} does not exist")


def cmd_run(args) -> int:
    _check_run_args(args)
    from .hub import resolve
    from .model import Model

    if args.profile:                 # before the model loads: a device that cannot time kernels fails fast
        from .backend.device import open_device
        from .backend.profile import check_device
        check_device(open_device())

    if args.model is None:
        from .default_model import PATH as model_name
    else:
        model_name = args.model
    if args.dry_run or args.memory_limit is not None:     # from config.json alone, before any weight is read
        from .memory import parse_size, plan_memory
        plan = plan_memory(model_name, context=args.context, quantize=args.quantize,
                           limit=parse_size(args.memory_limit) if args.memory_limit is not None else None)
        if args.dry_run:
            print("\n".join(plan.lines()))
        if not plan.fits:
            raise ValueError(plan.reason())
        if args.dry_run:
            return 0
    _backend_note(args.backend)
    _progress(f"loading {model_name}")
    model = Model(resolve(model_name), backend=args.backend, optimize=not args.no_optimize, context=args.context,
                  keep_egraphs=args.dump_egraph is not None, quantize=args.quantize)
    ids = model.encode_prompt(args.prompt, chat=args.chat)
    if len(ids) > model.cache.context:
        raise ValueError(f"the prompt has {len(ids)} tokens; the context holds {model.cache.context}")
    _progress("compiling")
    decoder = model.decoder
    _progress()
    if args.dump_egraph:
        from .optimize.dump import dump

        dump(decoder.optimized, args.dump_egraph)
        print(f"e-graph, programs, graphs and report written to {args.dump_egraph}", file=sys.stderr)
    profiler = None
    if args.profile:
        from .backend.profile import attach
        profiler = attach(decoder)
    pieces = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, chat=args.chat)
    try:
        for piece in pieces:
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        print(flush=True)
        if profiler is not None:             # the steps run so far are worth keeping
            profiler.write(args.profile, model=args.model or "built-in")
        return 130
    print(flush=True)
    if profiler is not None:
        profiler.write(args.profile, model=args.model or "built-in")
        print(f"kernel times of {profiler.steps} steps written to {args.profile}", file=sys.stderr)
    if args.stats:
        r = model.stats.rates()
        print(f"load: {model.times['load_s']:.3f} s\n"
              f"compile: {model.times['compile_s']:.3f} s\n"
              f"time to first token: {r['ttft_s']:.3f} s\n"
              f"prefill: {r['prefill_tokens_per_s']:.1f} tokens/s\n"
              f"decode: {r['decode_tokens_per_s']:.1f} tokens/s\n"
              f"tokens: {r['prompt_tokens']} prompt, {r['new_tokens']} new", file=sys.stderr)
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
    p.add_argument("--quantize", default=None, help="quantize the weights at load: q8 or q4")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("run", help="generate text from a prompt, streamed to stdout")
    p.add_argument("model", nargs="?", help="checkpoint directory or Hugging Face repo id (default: the small "
                   "built-in model)")
    p.add_argument("--prompt", help="the text to continue (with --chat: the user's message)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    p.add_argument("--context", type=int, default=None, help="positions the KV cache holds (default: the "
                   "model's limit, capped to fit the device)")
    p.add_argument("--dump-egraph", metavar="DIR", help="write the generating program's e-graphs and report")
    p.add_argument("--no-optimize", action="store_true", help="run the graph as built, without the optimizer")
    p.add_argument("--backend", default="wgpu", choices=["wgpu", "numpy"])
    p.add_argument("--quantize", default=None, help="weights quantized at load: q8 (int8, "
                   "a scale per row) or q4 (4 bits, a scale per 32); embeddings and the LM head take q8")
    p.add_argument("--dry-run", action="store_true", help="print the memory plan (weights, KV cache, activations "
                   "against the device's limits) from config.json alone and exit: 0 if it fits, else 2")
    p.add_argument("--memory-limit", metavar="SIZE", help="device memory the plan must fit in, checked before any "
                   "weight is read: e.g. 16GB (GB = 10^9 bytes; K, M, G, T likewise), 16GiB (GiB = 2^30), or bytes")
    p.add_argument("--stats", action="store_true", help="print load/compile times and token rates to stderr")
    p.add_argument("--profile", metavar="FILE", help="write every kernel's GPU time per step as a Chrome/Perfetto "
                   "trace (JSON; open in ui.perfetto.dev or chrome://tracing)")
    p.set_defaults(func=cmd_run)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError) as e:   # bad input: config, checkpoint, shapes; no device
        _progress()
        print(f"meganeura: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
