"""Helpers for GPU-path tests."""
from __future__ import annotations

import meganeura as mn


def run_both(g: mn.Graph, inputs: dict, weights) -> tuple[dict, dict]:
    """(wgpu outputs, reference outputs) of graph `g`."""
    gpu = mn.compile(g, backend="wgpu").run(inputs, weights)
    ref = mn.compile(g, backend="numpy").run(inputs, weights)
    return gpu, ref
