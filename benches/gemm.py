"""Time the tiled GEMM of one linear: x[M, K] · w[N, K]^T with bf16 weights, dispatched `reps` times in
one compute pass, and report GFLOP/s (2·M·N·K per dispatch). Run with MEGANEURA_LAYOUT=gpu so that a
CPU adapter (lavapipe) also takes the tiled kernel rather than the streamed one.

    python benches/gemm.py [--m 64 --n 1536 --k 512 --reps 20 --runs 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

import meganeura as mn
from meganeura.graph import S
from meganeura.weights import write_safetensors
from timing import seconds        # benches/timing.py, beside this script


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--n", type=int, default=1536)
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--reps", type=int, default=20, help="dispatches per timed submit")
    ap.add_argument("--runs", type=int, default=5, help="timed submits (the best is reported)")
    args = ap.parse_args(argv)
    m, n, k = args.m, args.n, args.k

    g = mn.Graph()
    y = g.matmul(g.input("x", (S, k)), g.parameter("w", (n, k)), transpose_b=True)
    g.set_outputs({"y": y})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "w.safetensors")
        write_safetensors(path, {"w": (w, "bf16")})
        weights = mn.open_weights(path)
        prog = mn.compile(g, backend="wgpu", optimize=False)
        got = prog.run({"x": x}, weights)["y"]          # uploads, builds the pipelines, warms up
        runner = prog._runner
        gemms = runner.encoding(m)
        ref = x @ mn.weights.to_f32(mn.weights.bf16_bits(w), "BF16").reshape(n, k).T
        err = float(np.abs(got - ref).max())

        per = min(seconds(runner, gemms, args.reps) for _ in range(args.runs))
    print(f"{runner.dev.name} layout={runner.dev.layout}: [{m} x {k}] x [{n} x {k}]^T bf16, "
          f"{len(gemms)} dispatch(es), {per * 1e3:.2f} ms per GEMM, {2 * m * n * k / per / 1e9:.2f} GFLOP/s, "
          f"max |err| {err:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
