"""Time the streamed matrix kernels' block sizes on this device, interleaved in one run.

    python benches/stream_blocks.py '[[[1, 1], 6, 1], [[2, null], 4, 8]]' '[[[1, 1], 4, 1], [[2, null], 8, 4]]'

Each argument replaces the CPU layout's STREAMED entry in meganeura/backend/kernels.py (step sizes, weight
rows per block, token rows per block; null is no upper bound). A random-weight llama-34m is prefilled
with 64 tokens, then its one-token decode step and its 64-token step are timed, variants taking turns so
other work on the machine slows all alike; the fastest of the rounds is printed.
"""
import json
import sys
import tempfile

import numpy as np

import meganeura as mn
import meganeura.backend.kernels as kernels
from meganeura.bench import _random_checkpoint
from timing import seconds        # benches/timing.py, beside this script

CONFIG = "benches/configs/llama-34m.json"


def step_seconds(runner, tokens: int, start: int, reps: int = 3) -> float:
    """One step of `tokens` tokens at `start`, dispatched `reps` times in one pass: seconds per step."""
    runner.gpu.queue.write_buffer(runner.step, 0, np.array([tokens, start, 0, 0], np.uint32))
    return seconds(runner, runner.encoding(tokens), reps)


def main(variants: list[str]):
    path = tempfile.mkdtemp()
    _random_checkpoint(CONFIG, path)
    runners = []
    for v in variants:
        kernels.STREAMED["cpu"] = [((lo, hi if hi is not None else float("inf")), rows, tokens)
                                   for (lo, hi), rows, tokens in json.loads(v)]
        model = mn.load_model(path, context=80, chunk=64)
        model.session().feed(np.arange(64) % 100)
        runners.append(model.decoder._runner)
    best = [[float("inf")] * 2 for _ in variants]
    for _ in range(5):
        for i, runner in enumerate(runners):
            best[i][0] = min(best[i][0], step_seconds(runner, 1, 70))
            best[i][1] = min(best[i][1], step_seconds(runner, 64, 0, reps=1))
    for v, (decode, prefill) in zip(variants, best):
        print(f"{v}: decode step {decode * 1e3:.2f} ms, 64-token step {prefill * 1e3:.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1:])
