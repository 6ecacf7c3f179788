"""Time a decode step's attention over a KV cache: the single-pass kernel (one workgroup per head) against
the split-KV pair (partials over key ranges, then a combine), dispatched `reps` times in one compute pass.
The cache (`slots` positions) is filled with random keys and values; the query is at position `pos`.

    python benches/attention.py [--heads 32 --kv-heads 8 --head-dim 64 --slots 4096 --pos 2999]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

import meganeura as mn
from meganeura import reference as R
from meganeura.backend import kernels
from meganeura.graph import S
from timing import seconds        # benches/timing.py, beside this script


def decode_attention(args, keys_per_split: int, q, kc, vc):
    """(runner, the attention dispatches of a one-token step, output) with the cache lowered at
    `keys_per_split`."""
    nh, kv, d, slots = args.heads, args.kv_heads, args.head_dim, args.slots
    g = mn.Graph()
    pos = g.input("start_pos", (), "i32", default=0)
    x = g.input("x", (S, 2 * kv * d))
    k_cache = g.cache_write(g.state("k_cache", (slots, kv, d)), x, pos, at=0)
    v_cache = g.cache_write(g.state("v_cache", (slots, kv, d)), x, pos, at=kv * d)
    g.set_outputs({"y": g.attention(g.input("q", (S, nh, d)), k_cache, v_cache, scale=d ** -0.5, pos=pos)})
    saved = kernels.KEYS_PER_SPLIT
    kernels.KEYS_PER_SPLIT = keys_per_split
    try:
        prog = mn.compile(g, backend="wgpu", optimize=False)
        feed = {"q": q, "x": np.concatenate([kc[args.pos], vc[args.pos]]).reshape(1, -1), "start_pos": args.pos}
        prog.run(feed, {})                                   # lowers, plans, builds the pipelines
    finally:
        kernels.KEYS_PER_SPLIT = saved
    runner = prog._runner
    runner.write_state("k_cache", kc)
    runner.write_state("v_cache", vc)
    out = prog.run(feed, {})["y"]                             # the step again, over the filled cache
    attention = [(runner.pipeline(k), b, k.grid(1)) for k, b in runner.dispatches
                 if k.label.startswith("attention") and k.runs_for(1)]
    return runner, attention, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--slots", type=int, default=4096)
    ap.add_argument("--pos", type=int, default=2999, help="the query's position (keys 0..pos)")
    ap.add_argument("--reps", type=int, default=10, help="dispatches per timed submit")
    ap.add_argument("--runs", type=int, default=5, help="timed submits (the best is reported)")
    args = ap.parse_args(argv)
    if not 0 <= args.pos < args.slots:
        print("error: --pos must lie in 0 .. slots - 1", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    kc, vc = (rng.standard_normal((args.slots, args.kv_heads, args.head_dim)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((1, args.heads, args.head_dim)).astype(np.float32)
    want = R.attention(q, kc, vc, args.pos, scale=args.head_dim ** -0.5, window=None, softcap=None)
    variants = [decode_attention(args, 1 << 30, q, kc, vc), decode_attention(args, kernels.KEYS_PER_SPLIT, q, kc, vc)]
    err = max(float(np.abs(out - want).max()) for _, _, out in variants)
    best = [float("inf")] * 2
    for _ in range(args.runs):               # alternated, so a busy machine slows both alike
        for v, (runner, dispatches, _) in enumerate(variants):
            best[v] = min(best[v], seconds(runner, dispatches, args.reps))
    single, split, n = best[0], best[1], len(variants[1][1])
    print(f"{args.heads} heads / {args.kv_heads} kv heads x {args.head_dim}, {args.slots} slots, query at {args.pos}: "
          f"single pass {single * 1e3:.2f} ms, split ({n} dispatches) {split * 1e3:.2f} ms, "
          f"speedup x{single / split:.2f}, max |err| {err:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
