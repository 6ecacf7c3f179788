"""Memory planning from config.json alone: what a run will hold on the device, before any weight is read.

`plan_memory` builds the generating graph as a run builds it (the family's builder with the KV cache,
last-token logits; no optimizer) and counts:
  - weights: every parameter once by name, at the checkpoint's stored size (`dtype` / `torch_dtype` of
    config.json: bf16 and f16 2 bytes an element, f32 4; bf16 when absent) or at its quantized size
    (`quant.plan`: both planes of `Format.nbytes`). A tied LM head is the embedding's tensor and counts
    once. MoE experts are the stacked tensors, Gemma-4 per-layer-input tables count like any table;
  - the KV caches: the graph's float32 `state` tensors at the context a run would choose (`choose_cache`,
    the one rule a run uses too);
  - activations: the arena the runtime plans by liveness (`backend.plan.plan_arena`) for one prefill chunk
    of the unoptimized graph (the optimizer fuses ops, leaving fewer values), per-op scratch not counted.
It checks the total against a memory limit (given, or the host's memory on a CPU adapter; WebGPU does
not report a GPU's memory) and every buffer against the adapter's limits: a weight is split into row
windows of one storage binding each (`backend.plan.weight_windows`), so only a row larger than a
binding, or a KV cache larger than one, cannot be placed.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

from meganeura.models import registry
from meganeura.models.cache import KVCache
from meganeura.models.hf import read_config

from . import generate as gen, quant
from .backend.plan import plan_arena, weight_windows
from .graph import Graph

DEFAULT_CHUNK = 256            # prompt tokens per prefill step
# WebGPU's guaranteed limits: what a plan assumes when no adapter can be opened
WEBGPU_MAX_BUFFER, WEBGPU_MAX_BINDING = 256 << 20, 128 << 20
STORED_DTYPES = {"bfloat16": ("bf16", 2), "bf16": ("bf16", 2), "float16": ("f16", 2), "half": ("f16", 2),
                 "f16": ("f16", 2), "float32": ("f32", 4), "float": ("f32", 4), "f32": ("f32", 4),
                 "float64": ("f32", 4)}          # f64 is widened to f32 at load
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
         "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes of a size such as "16GB" (10^9), "16GiB" (2^30), "12000MB", "16G" or "17179869184"."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and m.group(2).lower()
    if not m or unit not in UNITS or float(m.group(1)) * UNITS[unit] < 1:
        raise ValueError(f"--memory-limit: cannot read {text!r} as a size (e.g. 16GB, 16GiB, 12000MB, or bytes)")
    return int(float(m.group(1)) * UNITS[unit])


def human(nbytes: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}" if unit == "GB" else f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} B"


def host_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# ---------------------------------------------------------------- the context a run chooses

def choose_cache(family, cfg, context: int | None, chunk: int | None, max_binding: int | None,
                 copies: int = 1) -> KVCache:
    """The KV cache of a run: `context` positions if given (checked against the model's limit), else the
    model's limit shrunk until the caches fit `generate.memory_budget()` and the largest fits one storage
    binding of `max_binding` bytes (None: no binding limit); prefill chunks of `chunk` (default 256)."""
    limit = int(cfg.max_position_embeddings)
    if context is not None:
        if context < 1:
            raise ValueError(f"context must be at least 1 token, got {context}")
        if context > limit:
            raise ValueError(f"context {context} exceeds the model's limit of {limit} positions")
        chosen = context
    else:
        per_position, largest, fixed = _cache_costs(family, cfg, limit)
        # `copies` of each cache (2 where kernels read a texture copy): the budget holds them all.
        chosen = gen.fit_context(limit, per_position, largest, fixed, max_binding, gen.memory_budget() // copies)
    return KVCache(chosen, min(chunk or DEFAULT_CHUNK, chosen))


def _cache_costs(family, cfg, context: int) -> tuple[int, int, int]:
    """(bytes a position of every full-context cache, bytes a slot of the largest, bytes of the rest:
    the sliding rings) measured from a graph built at `context`."""
    g = Graph()
    family.build_graph(g, cfg, cache=KVCache(context, min(DEFAULT_CHUNK, context)))
    states = [n for n in g.nodes if n.op == "state"]
    per_slot = [4 * n.shape[1] * n.shape[2] for n in states if n.shape[0] == context]
    fixed = sum(4 * math.prod(n.shape) for n in states if n.shape[0] != context)
    return sum(per_slot), max(per_slot, default=0), fixed


# ---------------------------------------------------------------- device limits

@dataclass(frozen=True)
class Limits:
    max_binding: int             # bytes one storage binding (and so one weight window or KV cache) may cover
    max_buffer: int
    memory: int | None           # bytes the device holds, where known (a CPU adapter: the host's memory)
    device: str                  # what the limits describe, for the printout
    textures: bool = False       # the kernels read the KV cache through a texture copy (a CPU device)


def device_limits() -> Limits:
    """The limits of the adapter a run would open; WebGPU's guaranteed ones where none can be opened."""
    from .backend.device import DeviceError, open_device

    try:
        dev = open_device()
    except DeviceError:
        forced = os.environ.get("MEGANEURA_MAX_BINDING")
        binding = min(WEBGPU_MAX_BINDING, int(forced)) if forced else WEBGPU_MAX_BINDING
        return Limits(binding, WEBGPU_MAX_BUFFER, None, "no GPU adapter opened: WebGPU's guaranteed limits")
    cpu = dev.adapter_type == "CPU"
    return Limits(dev.max_binding, int(dev.limits["max-buffer-size"]), host_memory() if cpu else None,
                  f"{dev.name}, {dev.adapter_type} adapter, {dev.backend}", dev.textures)


# ---------------------------------------------------------------- the plan

@dataclass
class Weight:
    name: str
    shape: tuple[int, ...]
    kind: str                    # matrices, embeddings, LM head, norms and vectors
    format: str                  # bf16 / f16 / f32 as stored, or q8 / q4 / q8_0
    nbytes: int
    buffers: int                 # row windows, one buffer each


@dataclass
class Caches:
    kind: str                    # "full" or "sliding"
    layers: int
    shape: tuple[int, ...]       # one layer's K (and V): [slots, kv heads, head_dim]
    nbytes: int                  # K and V of all these layers


@dataclass
class MemoryPlan:
    name: str
    model_type: str
    dtype: str                   # the checkpoint's stored float type
    quantize: str | None
    cache: KVCache
    weights: list[Weight]
    caches: list[Caches]
    activations: int
    limits: Limits
    limit: int | None            # the bytes the plan must fit in (None: not known)
    limit_from: str              # where `limit` comes from
    tied: bool = False           # the LM head is the embedding's tensor
    problems: list[str] = field(default_factory=list)      # buffers the device cannot hold
    _retry: object = None        # plans the same model with other settings (for the suggestion)

    @property
    def weight_bytes(self) -> int:
        return sum(w.nbytes for w in self.weights)

    @property
    def cache_bytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    @property
    def total(self) -> int:
        return self.weight_bytes + self.cache_bytes + self.activations

    @property
    def fits(self) -> bool:
        return not self.problems and (self.limit is None or self.total <= self.limit)

    def weights_label(self) -> str:
        return self.dtype if self.quantize is None else f"{self.quantize} ({self.dtype} stored)"

    def lines(self) -> list[str]:
        """The plan as a short table."""
        def row(label: str, nbytes: int, indent: int = 2) -> str:
            return f"{' ' * indent}{label:<{48 - indent}}{human(nbytes):>10}"

        out = [f"{self.name} ({self.model_type}): weights {self.weights_label()}, context {self.cache.context}, "
               f"prefill chunk {self.cache.chunk}", row("weights", self.weight_bytes)]
        groups: dict[tuple[str, str], list[Weight]] = {}
        for w in self.weights:
            groups.setdefault((w.kind, w.format), []).append(w)
        for (kind, fmt), ws in sorted(groups.items(), key=lambda kv: -sum(w.nbytes for w in kv[1])):
            params = sum(math.prod(w.shape) for w in ws)
            count = next(f"{params / size:.3g}{unit}" for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1))
                         if params >= size or unit == "")
            tied = " +tied head" if kind == "embeddings" and self.tied else ""
            out.append(row(f"{kind} {fmt}: {len(ws)}{tied}, {count} params", sum(w.nbytes for w in ws), 4))
        copies = " (buffer + texture copy)" if self.limits.textures else ""
        out.append(row(f"KV cache f32{copies}, context {self.cache.context}", self.cache_bytes))
        for c in self.caches:
            out.append(row(f"{c.kind}: {c.layers} layers x K,V {list(c.shape)}", c.nbytes, 4))
        out.append(row(f"activations, prefill chunk of {self.cache.chunk}", self.activations))
        out.append(row("total", self.total))
        if self.limit is None:
            out.append(f"  limit: not known ({self.limit_from}); only the buffer limits are checked")
        else:
            out.append(row(f"limit ({self.limit_from})", self.limit))
        out.append(f"  buffers: one binding {self.limits.max_binding / 2**20:g} MiB, one buffer "
                   f"{self.limits.max_buffer / 2**20:g} MiB ({self.limits.device})")
        big = max(self.weights, key=lambda w: w.nbytes, default=None)
        if big is not None:
            split = sum(1 for w in self.weights if w.buffers > 1)
            out.append(f"    largest weight: {big.name} {list(big.shape)} {big.format} {human(big.nbytes)} in "
                       f"{big.buffers} buffer{'s' * (big.buffers != 1)} ({split} weight{'s' * (split != 1)} split)")
        out.extend(f"    cannot be placed: {p}" for p in self.problems[:3])
        if len(self.problems) > 3:
            out.append(f"    and {len(self.problems) - 3} more buffers that cannot be placed")
        out.append("fits" if self.fits else "does not fit")
        return out

    def breakdown(self) -> str:
        return (f"weights {human(self.weight_bytes)} {self.weights_label()}, KV cache {human(self.cache_bytes)} "
                f"at context {self.cache.context}, activations {human(self.activations)}")

    def reason(self) -> str:
        """Why the plan does not fit, and the first of q8, q4, then shorter contexts that does, in one line."""
        if self.problems:
            why = f"{self.name} cannot be placed on this device: {self.problems[0]}"
        else:
            why = (f"{self.name} needs {human(self.total)} ({self.breakdown()}) "
                   f"but the limit is {human(self.limit)}")
        return f"{why}; {self.suggestion()}"

    def suggestion(self) -> str:
        order = [None] + list(quant.MODES)
        stronger = order[order.index(self.quantize) + 1:] if self.quantize in order else []
        for mode in stronger:
            alt = self._retry(mode, self.cache.context)
            if alt.fits:
                return f"--quantize {mode} needs {human(alt.total)}"
        for mode in [self.quantize] + stronger:
            alt = self._retry(mode, self.cache.context)
            context = alt.longest_context()
            if context:
                alt = self._retry(mode, context)
                flags = (f"--quantize {mode} " if mode != self.quantize else "") + f"--context {context}"
                return f"{flags} needs {human(alt.total)}"
        strongest = ([self.quantize] + stronger)[-1]
        alt = self._retry(strongest, 1)
        flags = f"--quantize {strongest} --context 1" if strongest else "--context 1"
        if alt.problems:
            return "no quantization or context places it"
        return f"nothing fits: even {flags} needs {human(alt.total)}"

    def longest_context(self) -> int | None:
        """The longest context below this plan's that fits (the caches grow with it), or None."""
        lo, hi = 0, self.cache.context - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._retry(self.quantize, mid).fits:
                lo = mid
            else:
                hi = mid - 1
        return lo or None


def _stored_dtype(config: dict) -> tuple[str, int]:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    name = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    if name is None:
        return STORED_DTYPES["bfloat16"]
    key = str(name).lower().removeprefix("torch.")
    if key not in STORED_DTYPES:
        raise ValueError(f"config.json dtype {name!r} is not one meganeura loads (bfloat16, float16, float32)")
    return STORED_DTYPES[key]


def _model_name(source: str) -> str:
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        return os.path.basename(os.path.abspath(path))
    if os.path.isfile(path):
        if os.path.basename(path) == "config.json":
            return os.path.basename(os.path.dirname(os.path.abspath(path)))
        return re.sub(r"[-_.]?config$", "", os.path.basename(path).removesuffix(".json")) or path
    return source                          # a repo id


def _weights(g: Graph, dtype: tuple[str, int], quantize: str | None, max_binding: int,
             problems: list[str]) -> tuple[list[Weight], bool]:
    """Every parameter once (and whether a tied LM head was left out as the embedding's tensor)."""
    formats = quant.plan(g, quantize)
    tables = {g[n.inputs[0]].attrs["name"] for n in g.nodes if n.op == "embedding"}
    params = {}
    for n in g.nodes:
        if n.op == "parameter":
            params.setdefault(n.attrs["name"], n)
    out, tied = [], False
    for name, node in params.items():
        if node.attrs["fallback"] in params:
            tied = True
            continue
        shape = tuple(node.shape) or (1,)
        fmt = formats.get(name)
        kind = ("embeddings" if name in tables else "LM head" if name == "lm_head.weight"
                else "matrices" if len(shape) >= 2 else "norms and vectors")
        nbytes = fmt.nbytes(shape) if fmt else math.prod(shape) * dtype[1]
        try:
            buffers = len(weight_windows(shape, dtype[1], max_binding, fmt))
        except ValueError as e:
            problems.append(f"{name}: {e}")
            buffers = 0
        out.append(Weight(name, shape, kind, fmt.name if fmt else dtype[0], nbytes, buffers))
    return out, tied


def _caches(g: Graph, cache: KVCache, limits: Limits, problems: list[str]) -> list[Caches]:
    """The KV caches by kind and shape, each counted once per copy the device holds."""
    max_binding = limits.max_binding
    groups: dict[tuple[str, tuple], list[int]] = {}
    for n in g.nodes:
        if n.op == "state":
            nbytes = 4 * math.prod(n.shape)
            if nbytes > max_binding:
                problems.append(f"the KV cache {n.attrs['name']} {list(n.shape)} f32 ({nbytes} bytes) exceeds "
                                f"the storage binding limit of {max_binding} bytes")
            kind = "full" if n.shape[0] == cache.context else "sliding"
            groups.setdefault((kind, tuple(n.shape)), []).append(nbytes)
    copies = 2 if limits.textures else 1
    return [Caches(kind, len(sizes) // 2, shape, copies * sum(sizes)) for (kind, shape), sizes in groups.items()]


class _Planner:
    """One model's config, stored dtype and device limits, planned at any quantization and context."""

    def __init__(self, source: str, chunk: int | None, limit: int | None, limits: Limits | None):
        from .hub import resolve_config

        path = resolve_config(source)
        self.name = _model_name(source)
        self.family, self.cfg = registry.from_hf(path)
        self.dtype = _stored_dtype(read_config(path))
        self.chunk = chunk
        self.limits = limits or device_limits()
        if limit is not None:
            self.limit, self.limit_from = limit, "--memory-limit"
        elif self.limits.memory is not None:
            self.limit, self.limit_from = self.limits.memory, "host memory of this CPU adapter"
        else:
            self.limit, self.limit_from = None, "WebGPU does not report GPU memory; give --memory-limit"

    def __call__(self, quantize: str | None, context: int | None) -> MemoryPlan:
        cache = choose_cache(self.family, self.cfg, context, self.chunk, self.limits.max_binding,
                             2 if self.limits.textures else 1)
        g = Graph()
        logits = self.family.build_graph(g, self.cfg, cache=cache, last_only=True)
        g.set_outputs({"logits": logits, "next_token": g.argmax(logits)})
        problems: list[str] = []
        weights, tied = _weights(g, self.dtype, quantize, self.limits.max_binding, problems)
        caches = _caches(g, cache, self.limits, problems)
        activations = sum(plan_arena(g, {}, cache.chunk).slot_sizes)
        return MemoryPlan(self.name, self.cfg.model_type, self.dtype[0], quantize, cache, weights, caches,
                          activations, self.limits, self.limit, self.limit_from, tied, problems, self)


def plan_memory(source: str, context: int | None = None, quantize: str | None = None, chunk: int | None = None,
                limit: int | None = None, limits: Limits | None = None) -> MemoryPlan:
    """The memory plan of running `source` (a directory, a config .json file, or a repo id, of which only
    config.json is fetched) with `quantize` at `context` positions (default: as a run chooses) against
    `limit` bytes and the device's `limits` (default: the adapter a run would open)."""
    quant.check_mode(quantize)
    return _Planner(source, chunk, limit, limits)(quantize, context)
