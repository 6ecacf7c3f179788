"""Helpers for GPU-path tests."""
from __future__ import annotations

import meganeura as mn


def run_both(g: mn.Graph, inputs: dict, weights) -> tuple[dict, dict]:
    """(wgpu outputs, reference outputs) of graph `g` as built (the op under test is not rewritten)."""
    gpu = mn.compile(g, backend="wgpu", optimize=False).run(inputs, weights)
    ref = mn.compile(g, backend="numpy", optimize=False).run(inputs, weights)
    return gpu, ref
