"""Time the matrix kernels' block sizes on this device, interleaved in one run.

    python benches/stream_blocks.py [--config FILE] [--quantize q8|q4] [--rounds N] VARIANT...

Each VARIANT is JSON. A list replaces this device's layout's STREAMED entry in meganeura/backend/kernels.py
(step sizes, weight rows per block, token rows per block; null is no upper bound), e.g.
'[[[1, 1], 6, 1], [[2, null], 4, 8]]'; an object may hold that list as "streamed" and also set "tile"
(GEMM_TILE: token rows, weight rows, k step of the tiled GEMM) and "wg" (STREAM_WG), and any other upper-case
key sets the kernels module's constant of that name (e.g. '{"GEMV_MIN_ROWS": 8}'). A random-weight model of
the config (default llama-34m) is prefilled with 64 tokens, then its one-token decode step and its 64-token
step are timed, dispatched back to back in one pass, variants taking turns so other work on the machine slows
all alike; the fastest of the rounds (--rounds, default 5) is printed.
"""
import argparse
import json
import tempfile

import numpy as np

import meganeura as mn
import meganeura.backend.kernels as kernels
from meganeura.backend.device import open_device
from meganeura.bench import _random_checkpoint
from timing import seconds        # benches/timing.py, beside this script


def step_seconds(runner, tokens: int, start: int, reps: int = 3) -> float:
    """One step of `tokens` tokens at `start`, dispatched `reps` times in one pass: seconds per step."""
    runner.gpu.queue.write_buffer(runner.step, 0, np.array([tokens, start, 0, 0], np.uint32))
    return seconds(runner, runner.encoding(tokens), reps)


def parse(variant: str) -> dict:
    v = json.loads(variant)
    return {"streamed": v} if isinstance(v, list) else v


def configure(v: dict, layout: str) -> None:
    if "streamed" in v:
        kernels.STREAMED[layout] = [((lo, hi if hi is not None else float("inf")), rows, tokens)
                                    for (lo, hi), rows, tokens in v["streamed"]]
    if "tile" in v:
        kernels.GEMM_TILE = tuple(v["tile"])
    if "wg" in v:
        kernels.STREAM_WG = v["wg"]
    for name, value in v.items():          # any other of the kernels' module constants, by its own name
        if name.isupper():
            setattr(kernels, name, value)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="benches/configs/llama-34m.json")
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("variants", nargs="+")
    args = ap.parse_args(argv)
    path = tempfile.mkdtemp()
    _random_checkpoint(args.config, path)
    layout = open_device().layout
    variants = [parse(v) for v in args.variants]
    defaults = (list(kernels.STREAMED[layout]), kernels.GEMM_TILE, kernels.STREAM_WG)
    constants = {name: getattr(kernels, name) for v in variants for name in v if name.isupper()}
    runners = []
    for v in variants:
        kernels.STREAMED[layout], kernels.GEMM_TILE, kernels.STREAM_WG = list(defaults[0]), *defaults[1:]
        for name, value in constants.items():
            setattr(kernels, name, value)
        configure(v, layout)
        model = mn.load_model(path, context=80, chunk=64, quantize=args.quantize)
        model.session().feed(np.arange(64) % 100)
        runners.append(model.decoder._runner)
    best = [[float("inf")] * 2 for _ in args.variants]
    for _ in range(args.rounds):
        for i, runner in enumerate(runners):
            best[i][0] = min(best[i][0], step_seconds(runner, 1, 70))
            best[i][1] = min(best[i][1], step_seconds(runner, 64, 0, reps=1))
    for v, (decode, prefill) in zip(args.variants, best):
        print(f"{v}: decode step {decode * 1e3:.3f} ms, 64-token step {prefill * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
