"""A compiled graph, ready to run: `mn.compile(graph, backend=...)` returns one."""
from __future__ import annotations

import time
from typing import Mapping

import numpy as np

from . import quant, reference
from .graph import Graph, INT_DTYPES, S
from .weights import Checkpoint, from_dict, load_f32, plan

BACKENDS = ("wgpu", "numpy")
NP_DTYPES = {"i32": np.int32, "u32": np.uint32, "f32": np.float32}


class Program:
    """Runs `graph` on a backend. Weights are bound on first use of a checkpoint and kept."""

    def __init__(self, graph: Graph, backend: str, optimize: bool = True, keep: bool = False,
                 quantize: str | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
        if not graph.outputs:
            raise ValueError("the graph has no outputs: call graph.set_outputs([...]) first")
        self.source = graph
        self.backend = backend
        self.quantize = quant.check_mode(quantize)
        self._bound: tuple[object, dict] | None = None
        self._runner = None
        self.optimized = None                   # the optimizer's result (report, kinds) when it ran
        self.state: dict[str, np.ndarray] = {}  # the reference backend's persistent tensors
        device = None
        if backend == "wgpu":
            from .backend.device import open_device
            device = open_device()
        self.optimize_s = 0.0                   # seconds the optimizer took (bench reports it)
        if optimize:
            from .optimize import DeviceCost, optimize as run_optimizer
            cost = DeviceCost.for_adapter(device.adapter_type) if device else DeviceCost()
            began = time.perf_counter()
            self.optimized = run_optimizer(graph, cost, keep=keep)
            self.optimize_s = time.perf_counter() - began
            graph = self.optimized.graph
        self.graph = graph
        if device is not None:
            from .backend.runtime import WgpuRunner
            self._runner = WgpuRunner(graph, device, quantize)

    def bind(self, weights, share: "Program | None" = None):
        """Check (and for a GPU, upload) the weights now rather than at the first run. With `share`, a
        program already bound to the same weights lends the device copies of the tensors both use."""
        if self._runner is not None:
            lend = share._runner if share is not None and share._runner is not None else None
            self._runner.bind_weights(self._checked(weights), lend)
        else:
            self.params(weights)

    def _checked(self, weights):
        """A checkpoint as is (the runner checks it against the graph); a dict, validated here first."""
        return weights if isinstance(weights, Checkpoint) else self.params(weights)

    def params(self, weights) -> dict[str, np.ndarray]:
        """float32 values of every parameter, checked against the graph before any math."""
        if self._bound is not None and self._bound[0] is weights:      # holding it keeps its identity unique
            return self._bound[1]
        planned, matrices = quant.plan(self.graph, self.quantize), quant.matrices(self.graph)
        if isinstance(weights, Checkpoint):
            values = {}
            for name, b in plan(self.graph, weights).items():
                tags = [weights.tensors[t].dtype for g in b.parts for t in g]
                fmt = quant.stored_format(tags, planned.get(name), name in matrices, b.shape)
                value = load_f32(weights, b)
                kept = len(set(tags)) == 1 and quant.GGUF_BLOCKS.get(tags[0], (None,))[0] == fmt
                values[name] = value if fmt is None or kept else fmt.roundtrip(value)   # the device's values
        elif isinstance(weights, Mapping):
            values = {name: planned[name].roundtrip(v) if name in planned else v
                      for name, v in from_dict(self.graph, weights).items()}
        else:
            raise TypeError("weights must be a Checkpoint (mn.open_weights) or a dict of arrays")
        self._bound = (weights, values)
        return values

    def feed(self, inputs: Mapping[str, object]) -> tuple[dict[str, np.ndarray], int]:
        """Check and convert the caller's inputs; fill defaults; bind the token count S."""
        fed, tokens = {}, None
        for name, i in self.graph.leaves("input").items():
            node = self.graph[i]
            if name not in inputs:
                if node.attrs["default"] is None:
                    raise ValueError(f"missing input {name!r}")
                value = node.attrs["default"]
            else:
                value = inputs[name]
            arr = np.asarray(value)
            if node.dtype in INT_DTYPES and arr.size and not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"input {name!r} must hold integers, got {arr.dtype}")
            arr = arr.astype(NP_DTYPES[node.dtype])
            if arr.ndim != len(node.shape):
                raise ValueError(f"input {name!r} must have {len(node.shape)} dims {node.shape}, got {arr.shape}")
            for want, got in zip(node.shape, arr.shape):
                if want == S:
                    if tokens not in (None, got):
                        raise ValueError(f"inputs disagree on the token count ({tokens} vs {got})")
                    tokens = got
                elif want != got:
                    raise ValueError(f"input {name!r} has shape {arr.shape}, expected {node.shape}")
            fed[name] = arr
        if tokens == 0:
            raise ValueError("no tokens to run")
        return fed, tokens or 1

    def run(self, inputs: Mapping[str, object], weights, outputs=None) -> dict[str, np.ndarray]:
        """The graph's outputs by name (only those named in `outputs`, when given)."""
        fed, tokens = self.feed(inputs)
        if self._runner is not None:
            return self._runner.run(fed, tokens, self._checked(weights), outputs)
        out = reference.run(self.graph, fed, self.params(weights), self.state)
        return out if outputs is None else {k: v for k, v in out.items() if k in outputs}

    @property
    def chains(self) -> bool:
        """Whether `submit` is available: steps queued on the device without waiting for each other."""
        return self._runner is not None

    def submit(self, inputs: Mapping[str, object], weights, outputs=None, chained: Mapping[str, str] | None = None,
               steps: int = 1):
        """Queue `steps` steps on the device (the first at the inputs' start_pos, each later one right
        after the one before) and return at once; `.read()` on the result gives `run`'s dict for each step.
        Inputs named in `chained` take the value of that output of the step before, copied on the device:
        the first step's from the last step queued before, unless `inputs` holds them."""
        if self._runner is None:
            raise ValueError(f"the {self.backend} backend runs one step at a time (see `chains`)")
        chained = dict(chained or {})
        sources = {name: self.graph[self._output(out)] for name, out in chained.items()}
        carried = {name: n for name, n in sources.items() if name not in inputs}
        stand_ins = {name: np.zeros(n.shape, NP_DTYPES[n.dtype]) for name, n in carried.items()}
        fed, tokens = self.feed({**inputs, **stand_ins})      # a carried value's shape sets its token count
        fed = {name: v for name, v in fed.items() if name not in carried}
        return self._runner.submit(fed, tokens, self._checked(weights), outputs, chained, steps)

    def _output(self, name: str) -> int:
        found = [o for o in self.graph.outputs if self.graph.names[o] == name]
        if not found or S in self.graph[found[0]].shape:
            raise ValueError(f"no output {name!r} of fixed shape; outputs: {', '.join(self.graph.output_names())}")
        return found[0]


def compile(graph: Graph, backend: str = "wgpu", optimize: bool = True, keep: bool = False,
            quantize: str | None = None) -> Program:
    """Prepare `graph` to run: backend="wgpu" on the GPU (lavapipe where there is none),
    backend="numpy" with the reference executor. optimize=True runs the e-graph optimizer first
    (the same fused graph on both backends); the caller's graph is left as it was. keep=True keeps the
    e-graphs and egglog programs for `optimize.dump.dump(program.optimized, dir)`. quantize="q8" | "q4"
    stores the matrix weights quantized (meganeura.quant); both backends compute with the same values."""
    return Program(graph, backend, optimize, keep, quantize)
