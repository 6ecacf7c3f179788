"""`mn.load_model`: a checkpoint directory turned into a compiled model you can call."""
from __future__ import annotations

import os

import numpy as np

from meganeura.models import registry

from .graph import Graph
from .program import compile
from .weights import CheckpointError, open_weights


class Model:
    def __init__(self, path: str, backend: str, optimize: bool):
        self.path = path
        self.family, self.config = registry.from_hf(path)
        self.weights = open_weights(path)
        self.graph = Graph()
        logits = self.family.build_graph(self.graph, self.config)
        self.graph.set_outputs([logits])
        self.program = compile(self.graph, backend=backend, optimize=optimize)
        self.program.bind(self.weights)          # names and shapes are checked now, not at the first call

    def logits(self, ids, start_pos: int = 0) -> np.ndarray:
        """float32 [len(ids), vocab]: one full forward over `ids`, the first at position `start_pos`."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"ids must be a non-empty 1-D sequence of token ids, got shape {ids.shape}")
        out = self.program.run({"token_ids": ids, "start_pos": start_pos}, self.weights)
        return out["logits"]


def load_model(path, backend: str = "wgpu", optimize: bool = True, dtype: str = "auto") -> Model:
    """Load a checkpoint directory (config.json + safetensors)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"no such model directory: {path}")
    return Model(path, backend, optimize)
