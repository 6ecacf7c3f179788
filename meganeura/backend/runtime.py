"""Running a graph on a wgpu device: weights uploaded once, pipelines and bind groups built once per token
capacity, and each forward step encoded as one compute pass; consecutive steps may share one submit.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .. import quant, reference
from ..graph import Graph, Node
from ..weights import Binding as WeightBinding, Checkpoint, from_dict, load_f32, load_rows, plan as plan_weights
from .device import Device, open_device
from .kernels import TEXEL_ROW, Context, Kernel, Ref, lower, numel_at
from .plan import ArenaPlan, base_of, padded, plan_arena, weight_windows

STORED = {"BF16": "bf16", "F16": "f16", "F32": "f32"}
CHUNK = 32 << 20          # upload granularity: bounds the host memory an upload needs beyond the mmap


def native_lib():
    """wgpu-native's C functions and cffi's null pointer (wgpu is pinned, so its private module is stable)."""
    from wgpu.backends.wgpu_native._api import ffi, lib
    return lib, ffi.NULL


@dataclass
class WeightBuffers:
    dtype: str                              # f32 / bf16 / f16 / q8 / q4 as stored on the GPU
    windows: list[tuple[int, int]]          # row ranges along axis 0, one buffer (or texture) each
    buffers: list
    fmt: quant.Format | None = None         # q8/q4: the format, elements per scale, and each window's
    group: int = 0                          # scale-plane word
    scales_at: tuple[int, ...] = ()


class Dispatch(NamedTuple):
    """One dispatch of a step, and the values copied into their textures just before it."""
    pipeline: object
    group: object
    grid: tuple[int, int, int]
    mirrors: tuple[int, ...]                # values (base nodes) to mirror first (`WgpuRunner._mirror`)


TEXEL = 16                                  # bytes per rgba32uint texel
ROW_BYTES = TEXEL_ROW * TEXEL


class _Progress:
    """Bytes-uploaded progress on stderr, only when stderr is a terminal."""

    def __init__(self, total: int, what: str):
        self.total, self.done, self.what = total, 0, what
        self.on = sys.stderr.isatty() and total > (64 << 20)

    def add(self, n: int):
        self.done += n
        if self.on:
            print(f"\r{self.what}: {self.done >> 20}/{self.total >> 20} MiB", end="", file=sys.stderr, flush=True)

    def close(self):
        if self.on:
            print(file=sys.stderr)


class _Stream:
    """Bytes appended in order to one buffer from offset 0. Whole 4-byte words go straight from the source
    (an mmap view) to the queue; a part ending mid-word leaves its last bytes to be joined with the next."""

    def __init__(self, runner, buf, progress):
        self.runner, self.buf, self.progress = runner, buf, progress
        self.offset = 0                         # always a multiple of 4; `tail` waits to be written there
        self.tail = np.zeros(0, np.uint8)

    def put(self, data: np.ndarray):
        if self.tail.size:
            need = 4 - self.tail.size
            self.tail = np.concatenate([self.tail, data[:need]])
            data = data[need:]
            if self.tail.size < 4:
                return
            self.runner._write(self.buf, self.offset, self.tail, self.progress)
            self.offset += 4
            self.tail = np.zeros(0, np.uint8)
        whole = data.size - data.size % 4
        if whole:
            self.runner._write(self.buf, self.offset, data[:whole], self.progress)
            self.offset += whole
        self.tail = np.array(data[whole:])

    def close(self):
        if self.tail.size:
            self.runner._write(self.buf, self.offset, self.tail, self.progress)     # padded to a word


class WgpuRunner:
    def __init__(self, graph: Graph, device: Device | None = None, quantize: str | None = None):
        import wgpu

        self.wgpu = wgpu
        self.native, self.null = native_lib()
        self.graph = graph
        self.quantize = quantize
        self.dev = device or open_device()
        self.gpu = self.dev.wgpu_device
        self.weights = None
        self.params: dict[str, WeightBuffers] = {}
        self.kernels: dict[int, list[Kernel]] = {}
        self.arena: ArenaPlan | None = None
        self.rope_tables: dict[tuple, int] = {}
        self.states: dict[str, object] = {}        # persistent tensors (KV caches), kept across steps
        self.state_textures: dict[str, object] = {}  # their copies as textures, where kernels read them so
        self.profiler = None                        # a profile.Profiler times each dispatch while attached
        self._last: Submission | None = None        # the submit before: its last step's values fill the arena
        # CPU seconds the submitting thread spends preparing submits (bench reports it): on a CPU device the
        # device's threads share the cores, and a wait for one of them is the device working, not the host.
        self.encode_s = 0.0
        scalars = [n.attrs["name"] for n in graph.nodes if n.op == "input" and n.shape == ()]
        if any(s != "start_pos" for s in scalars):
            raise ValueError(f"the wgpu backend passes only 'start_pos' as a scalar input, got {scalars}")

    # -- weights
    def bind_weights(self, weights, lender: "WgpuRunner | None" = None):
        """Upload the graph's weights; tensors `lender` (bound to the same weights) already holds are shared."""
        if self.weights is weights:               # holding it keeps its identity unique
            return
        planned, matrices = quant.plan(self.graph, self.quantize), quant.matrices(self.graph)
        if isinstance(weights, Checkpoint):
            bindings = plan_weights(self.graph, weights)
            formats = {n: quant.stored_format([weights.tensors[t].dtype for g in b.parts for t in g],
                                              planned.get(n), n in matrices, b.shape)
                       for n, b in bindings.items()}
            # A tied LM head names the embedding's tensor: one upload serves both names.
            first, aliases = {}, {}
            for n, b in bindings.items():
                key = (b.parts, b.stacked, b.shape, formats[n])
                aliases[n] = first.setdefault(key, n)
            bindings = {n: b for n, b in bindings.items() if aliases[n] == n}
            if lender is not None and lender.weights is weights and lender.dev is self.dev:
                shared = {n: lender.params[n] for n in bindings
                          if n in lender.params and lender.params[n].fmt == formats[n]}
                bindings = {n: b for n, b in bindings.items() if n not in shared}
            else:
                shared = {}
            total = sum(weights.tensors[n].end - weights.tensors[n].begin
                        for b in bindings.values() for g in b.parts for n in g)
            progress = _Progress(total, "uploading weights")
            self.params = {name: self._upload_checkpoint(weights, b, formats[name], progress)
                           for name, b in bindings.items()}
            self.params.update(shared)
            self.params.update({n: self.params[a] for n, a in aliases.items() if a != n})
            progress.close()
        else:
            self.params = {name: self._upload_array(arr, planned.get(name))
                           for name, arr in from_dict(self.graph, weights).items()}
        self.weights = weights
        self._lower()

    def _new_buffer(self, nbytes: int):
        u = self.wgpu.BufferUsage
        return self.gpu.create_buffer(size=padded(nbytes), usage=u.STORAGE | u.COPY_DST | u.COPY_SRC)

    @property
    def textures(self) -> bool:
        return self.dev.textures

    def _new_texture(self, nbytes: int):
        """A texture of at least `nbytes` bytes laid out as kernels.TEXEL_ROW texels to a row, bound as a storage
        texture (kernels read it read-only, or write it write-only)."""
        texels = padded(nbytes) // TEXEL
        u = self.wgpu.TextureUsage
        return self.gpu.create_texture(size=(min(texels, TEXEL_ROW), -(-texels // TEXEL_ROW), 1),
                                       format=self.wgpu.TextureFormat.rgba32uint,
                                       usage=u.STORAGE_BINDING | u.COPY_DST | u.COPY_SRC)

    def _copy_to_texture(self, enc, buf, texture, begin: int, end: int):
        """Bytes [begin, end) of `buf` to the same bytes of `texture` (16-byte aligned): the rest of the
        first texture row, the whole rows, then the start of the last."""
        t0, t1 = begin // TEXEL, padded(end) // TEXEL
        while t0 < t1:
            y, x = divmod(t0, TEXEL_ROW)
            width, height = min(TEXEL_ROW - x, t1 - t0), 1
            if x == 0 and t1 - t0 >= TEXEL_ROW:
                width, height = TEXEL_ROW, (t1 - t0) // TEXEL_ROW
            enc.copy_buffer_to_texture(
                {"buffer": buf, "offset": t0 * TEXEL, "bytes_per_row": ROW_BYTES, "rows_per_image": height},
                {"texture": texture, "origin": (x, y, 0)}, (width, height, 1))
            t0 += width * height

    def _mirror(self, enc, j: int, tokens: int, start: int):
        """Copy what a step of `tokens` tokens at `start` wrote to value `j` into its texture: all of an
        activation; of a KV cache ([slots, ...], position p in slot p mod slots), the step's positions."""
        node, buf, texture = self.graph[j], self._buffer(Ref("node", j), j), self.mirrors[j]
        if node.op != "state":
            self._copy_to_texture(enc, buf, texture, 0, numel_at(node.shape, tokens) * 4)
            return
        slots, row = node.shape[0], numel_at(node.shape[1:], 0) * 4
        first, count = start % slots, min(tokens, slots)
        if count == slots:
            first = 0
        self._copy_to_texture(enc, buf, texture, first * row, min(slots, first + count) * row)
        if first + count > slots:                   # the positions wrapped round the ring
            self._copy_to_texture(enc, buf, texture, 0, (first + count - slots) * row)

    def _stored(self, buf):
        """A weight's uploaded buffer as the device will read it: the buffer, or its bytes moved to a texture."""
        if not self.textures:
            return buf
        texture = self._new_texture(buf.size)
        enc = self.gpu.create_command_encoder()
        self._copy_to_texture(enc, buf, texture, 0, buf.size)
        self.gpu.queue.submit([enc.finish()])
        return texture

    def held_bytes(self) -> tuple[int, int]:
        """Device bytes of (the weights, the KV caches with their texture copies), each counted once."""
        def size(store) -> int:
            return store.size if isinstance(store.size, int) else store.size[0] * store.size[1] * TEXEL

        weights = {id(b): size(b) for w in self.params.values() for b in w.buffers}
        caches = [size(b) for b in (*self.states.values(), *self.state_textures.values())]
        return sum(weights.values()), sum(caches)

    def read_weight(self, name: str, window: int = 0) -> bytes:
        """The bytes of one window of a weight as the device holds them (for tests and tools)."""
        store = self.params[name].buffers[window]
        if not self.textures:
            return bytes(self.gpu.queue.read_buffer(store))
        w, h, _ = store.size
        data = self.gpu.queue.read_texture({"texture": store}, {"bytes_per_row": w * TEXEL, "rows_per_image": h},
                                           (w, h, 1))
        return bytes(data)

    def _write(self, buf, offset: int, data: np.ndarray, progress=None):
        flat = data.reshape(-1).view(np.uint8)
        for start in range(0, flat.size, CHUNK):
            piece = flat[start:start + CHUNK]
            if piece.size % 4:
                piece = np.concatenate([piece, np.zeros(4 - piece.size % 4, np.uint8)])
            self.gpu.queue.write_buffer(buf, offset + start, piece)
            if progress:
                progress.add(piece.size)

    def _upload_array(self, arr: np.ndarray, fmt: quant.Format | None = None) -> WeightBuffers:
        shape = arr.shape if arr.ndim else (1,)
        arr = np.ascontiguousarray(arr.reshape(shape))
        if fmt is not None:
            return self._upload_quantized(shape, fmt, lambda r0, r1: fmt.quantize(arr[r0:r1]))
        windows = weight_windows(shape, 4, self.dev.max_binding)
        bufs = []
        for r0, r1 in windows:
            buf = self._new_buffer(arr[r0:r1].nbytes)
            self._write(buf, 0, arr[r0:r1])
            bufs.append(self._stored(buf))
        return WeightBuffers("f32", windows, bufs)

    def _upload_quantized(self, shape, fmt: quant.Format, planes, progress=None) -> WeightBuffers:
        """One buffer per window of rows: `planes(r0, r1)` gives those rows' (quants, scales)."""
        windows = weight_windows(shape, 0, self.dev.max_binding, fmt)
        bufs, scales_at = [], []
        for r0, r1 in windows:
            data = fmt.device_bytes(*planes(r0, r1))
            buf = self._new_buffer(data.size)
            self._write(buf, 0, data, progress)
            bufs.append(self._stored(buf))
            scales_at.append(fmt.scales_at((r1 - r0, *shape[1:])))
        return WeightBuffers(f"q{fmt.bits}", windows, bufs, fmt, fmt.group_of(shape[-1]), tuple(scales_at))

    def _upload_checkpoint(self, ckpt: Checkpoint, b: WeightBinding, fmt: quant.Format | None,
                           progress) -> WeightBuffers:
        tags = {ckpt.tensors[n].dtype for g in b.parts for n in g}
        if fmt is not None:
            if len(tags) == 1 and quant.GGUF_BLOCKS.get(next(iter(tags)), (None,))[0] == fmt:
                # Blocks stored in this format: rows regrouped into planes, never widened.
                tag = next(iter(tags))
                planes = lambda r0, r1: quant.from_blocks(load_rows(ckpt, b, r0, r1, raw=True), tag,
                                                          (r1 - r0, *b.shape[1:]))
            else:
                planes = lambda r0, r1: fmt.quantize(load_rows(ckpt, b, r0, r1))
            return self._upload_quantized(b.shape, fmt, planes, progress)
        if len(tags) != 1 or next(iter(tags)) not in STORED:
            # Mixed or unusual dtypes (e.g. F64) are widened to f32 on the host once.
            return self._upload_array(load_f32(ckpt, b))
        tag = next(iter(tags))
        dtype, itemsize = STORED[tag], (4 if tag == "F32" else 2)
        shape = b.shape if b.shape else (1,)
        windows = weight_windows(shape, itemsize, self.dev.max_binding)
        row_bytes = (int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1) * itemsize
        # The weight is the byte stream of its parts in order (stacked: each row's group, packed: the one
        # group, else the one tensor); each window gets the slice [r0 * row_bytes, r1 * row_bytes) of it,
        # read from the mmap piece by piece, so a window may begin or end inside a part.
        parts, at = [], 0
        for name in (n for g in b.parts for n in g):
            t = ckpt.tensors[name]
            parts.append((at, name))
            at += t.end - t.begin
        bufs = []
        for r0, r1 in windows:
            lo, hi = r0 * row_bytes, r1 * row_bytes
            buf = self._new_buffer(hi - lo)
            out = _Stream(self, buf, progress)
            for p0, name in parts:
                data = ckpt.raw(name).reshape(-1).view(np.uint8)
                a, z = max(lo, p0), min(hi, p0 + data.size)
                if a < z:
                    out.put(data[a - p0:z - p0])
            out.close()
            bufs.append(self._stored(buf))
        return WeightBuffers(dtype, windows, bufs)

    # -- kernels and arena
    def _rope_key(self, node: Node) -> int:
        key = (node.attrs["inv_freq"], node.attrs["attention_scaling"])
        return self.rope_tables.setdefault(key, len(self.rope_tables))

    def _lower(self):
        ctx = Context(self.graph, self.dev.has_f16, self.dev.has_subgroups, self.dev.layout,
                      lambda n: self.params[n].dtype, lambda n: self.params[n].windows, self._rope_key,
                      lambda n, w: (self.params[n].group, self.params[n].scales_at[w]) if self.params[n].fmt
                      else (0, 0), self.textures, self.dev.subgroup_size,
                      self.dev.limits.get("max-compute-invocations-per-workgroup", 256), self.dev.read_write_textures)
        self.kernels = {i: lower(ctx, i) for i in range(len(self.graph))}
        self.arena = None

    def _layout(self, kernel: Kernel):
        """The bind group layout of a kernel's bindings (the step uniform, then each binding)."""
        wgpu = self.wgpu
        entries = [{"binding": 0, "visibility": wgpu.ShaderStage.COMPUTE, "buffer": {"type": "uniform"}}]
        for slot, b in enumerate(kernel.bindings, start=1):
            if b.texture:
                entries.append({"binding": slot, "visibility": wgpu.ShaderStage.COMPUTE,
                                "storage_texture": {"access": "read-write" if b.reads else
                                                    "write-only" if b.write else "read-only",
                                                    "format": "rgba32uint", "view_dimension": "2d"}})
                continue
            kind = "storage" if b.write else "read-only-storage"
            entries.append({"binding": slot, "visibility": wgpu.ShaderStage.COMPUTE, "buffer": {"type": kind}})
        key = repr(entries)
        if key not in self.dev.layouts:
            self.dev.layouts[key] = self.gpu.create_bind_group_layout(entries=entries)
        return self.dev.layouts[key]

    def pipeline(self, kernel: Kernel):
        """The kernel's compute pipeline, compiled the first time a step needs it: variants for step sizes
        that never run (the longest steps) cost no compile."""
        key = (kernel.source, kernel.entry)
        if key not in self.dev.pipelines:
            module = self.gpu.create_shader_module(code=kernel.source)
            self.dev.pipelines[key] = self.gpu.create_compute_pipeline(
                layout=self.gpu.create_pipeline_layout(bind_group_layouts=[self._layout(kernel)]),
                compute={"module": module, "entry_point": kernel.entry})
        return self.dev.pipelines[key]

    def _prepare(self, capacity: int):
        """Arena buffers, RoPE tables, bind groups and output staging for up to `capacity` tokens."""
        u = self.wgpu.BufferUsage
        self.arena = plan_arena(self.graph, self.kernels, capacity)
        self.slots = [self.gpu.create_buffer(size=s, usage=u.STORAGE | u.COPY_DST | u.COPY_SRC)
                      for s in self.arena.slot_sizes]
        self.step = self.gpu.create_buffer(size=16, usage=u.UNIFORM | u.COPY_DST)
        self.rope_buffers = {key: self.gpu.create_buffer(size=padded(capacity * len(inv) * 8),
                                                         usage=u.STORAGE | u.COPY_DST)
                             for (inv, _), key in self.rope_tables.items()}
        # An activation a kernel reads through a texture is copied there from its slot before the first
        # such reader of each step runs (`encoding`), unless the kernels that write it write its texture too;
        # a KV cache's texture persists with it, as it holds every step's keys.
        bound = [b for ks in self.kernels.values() for k in ks for b in k.bindings]
        read = {self._mirrored(b) for b in bound} - {None}
        self.written = {self._mirrored(b) for b in bound if b.write} - {None}
        self.mirrors = {j: self._state(self.graph[j], texture=True) if self.graph[j].op == "state" else
                        self._new_texture(numel_at(self.graph[j].shape, capacity) * 4) for j in read}
        self.dispatches = []
        for i, kernels in self.kernels.items():
            for k in kernels:
                layout = self._layout(k)
                entries = [{"binding": 0, "resource": {"buffer": self.step, "offset": 0, "size": 16}}]
                for slot, b in enumerate(k.bindings, start=1):
                    if b.texture:
                        j = self._mirrored(b)
                        store = self.mirrors[j] if j is not None else self._buffer(b.ref, i)
                        entries.append({"binding": slot, "resource": store.create_view()})
                        continue
                    buf = self._buffer(b.ref, i)
                    entries.append({"binding": slot, "resource": {"buffer": buf, "offset": 0, "size": buf.size}})
                group = self.gpu.create_bind_group(layout=layout, entries=entries)
                self.dispatches.append((k, group))
        self._encodings: dict[int, list] = {}
        # Outputs are read back through two sets of staging buffers (output -> buffer, grown as steps need)
        # used by turns, so one submit's outputs stay readable while the next one is queued.
        self.staging: list[dict[int, object]] = [{}, {}]
        self._turns: list[Submission | None] = [None, None]
        self.uploads = None                         # per-step uniforms and RoPE tables, copied in by each step

    def _mirrored(self, b) -> int | None:
        """The value (base node) binding `b` reads through its texture copy, if it does."""
        return base_of(self.graph, b.ref.key) if b.texture and b.ref.kind == "node" else None

    def _state(self, node: Node, texture: bool = False):
        """A persistent tensor's buffer, or the texture copy kernels read it through (both zeroed by wgpu)."""
        name = node.attrs["name"]
        if name not in self.states:
            self.states[name] = self._new_buffer(numel_at(node.shape, 0) * 4)
        if not texture:
            return self.states[name]
        if name not in self.state_textures:
            self.state_textures[name] = self._new_texture(self.states[name].size)
        return self.state_textures[name]

    def write_state(self, name: str, data: np.ndarray):
        """Overwrite a persistent tensor (a KV cache) from the host, and its texture copy if it has one."""
        buf = self._state(self.graph[self.graph.leaves("state")[name]])
        self._write(buf, 0, np.ascontiguousarray(data, np.float32))
        if name in self.state_textures:
            enc = self.gpu.create_command_encoder()
            self._copy_to_texture(enc, buf, self.state_textures[name], 0, buf.size)
            self.gpu.queue.submit([enc.finish()])

    def _value(self, node_id: int):
        """The arena slot holding an input's or an output's value."""
        return self.slots[self.arena.value_slot[base_of(self.graph, node_id)]]

    def _buffer(self, ref: Ref, node_id: int):
        if ref.kind == "node":
            base = self.graph[base_of(self.graph, ref.key)]
            if base.op == "state":
                return self._state(base)
            return self.slots[self.arena.value_slot[base_of(self.graph, ref.key)]]
        if ref.kind == "param":
            return self.params[ref.key].buffers[ref.window]
        if ref.kind == "rope":
            return self.rope_buffers[ref.key]
        return self.slots[self.arena.scratch_slot[node_id]]

    # -- a forward step
    def encoding(self, tokens: int) -> list[Dispatch]:
        """Each dispatch a step of `tokens` tokens runs: a node may have variants for different step sizes
        (a GEMV for one token, a GEMM for many). Built once per size."""
        if tokens not in self._encodings:
            steps, mirrored = [], set()
            for k, group in self.dispatches:
                if not k.runs_for(tokens):
                    continue
                mirrors = []
                for j in map(self._mirrored, k.bindings):
                    if j is not None and j not in mirrored and j not in self.written:
                        mirrored.add(j)
                        mirrors.append(j)
                steps.append(Dispatch(self.pipeline(k), group, k.grid(tokens), tuple(mirrors)))
            self._encodings[tokens] = steps
        return self._encodings[tokens]

    def encode_step(self, enc, tokens: int, start: int):
        """The dispatches of a step of `tokens` tokens at position `start`, in compute passes broken only
        where a value is copied to its texture. The dispatches go straight to wgpu-native: its Python wrapper
        costs more than the call (an error check around each), and an encoding error still surfaces at the
        encoder's finish()."""
        native, null = self.native, self.null
        cp = None
        for d in self.encoding(tokens):
            if d.mirrors and cp is not None:
                cp.end()
                cp = None
            for j in d.mirrors:
                self._mirror(enc, j, tokens, start)
            if cp is None:
                cp = enc.begin_compute_pass()
                handle = cp._internal
            native.wgpuComputePassEncoderSetPipeline(handle, d.pipeline._internal)
            native.wgpuComputePassEncoderSetBindGroup(handle, 0, d.group._internal, 0, null)
            native.wgpuComputePassEncoderDispatchWorkgroups(handle, *d.grid)
        if cp is not None:
            cp.end()

    def run(self, fed: dict[str, np.ndarray], tokens: int, weights, outputs=None) -> dict[str, np.ndarray]:
        """One step; reads back the outputs named in `outputs` (all when None)."""
        return self.submit(fed, tokens, weights, outputs).read()[0]

    def submit(self, fed: dict[str, np.ndarray], tokens: int, weights, outputs=None,
               chained: dict[str, str] | None = None, steps: int = 1) -> "Submission":
        """Encode `steps` steps of `tokens` tokens each, the first at fed's start_pos and each later one at
        the positions after the one before, and submit them at once without waiting; `read()` on the
        result waits and gives each step's outputs named in `outputs` (all when None). `chained` maps
        inputs to outputs: a step takes those inputs from the step before it, copied on the device (the
        first step from the last one submitted before, unless `fed` holds them), so the host need not read
        a step back before queuing the next. Other array inputs come from `fed`, for the first step only."""
        self.dev.awake()
        began = time.thread_time()
        chained = chained or {}
        self.bind_weights(weights)
        if self.arena is None or tokens > self.arena.capacity:
            self._prepare(max(tokens, 2 * self.arena.capacity if self.arena else 16))
        arrays = {name: i for name, i in self.graph.leaves("input").items() if self.graph[i].shape != ()}
        if steps > 1 and set(arrays) - set(chained):
            raise ValueError(f"steps after the first take every array input from the step before; "
                             f"{sorted(set(arrays) - set(chained))} are not chained")
        carried = [name for name in chained if name not in fed]
        if carried and (self._last is None or self._last.arena is not self.arena):
            raise RuntimeError("chained inputs need a step submitted before on the same arena")
        outputs_by_name = {self.graph.names[o]: o for o in self.graph.outputs}
        copies = {}                                  # chained input -> (source, destination, bytes)
        for name, out in chained.items():
            i, o = arrays[name], outputs_by_name[out]
            sizes = {numel_at(self.graph[i].shape, tokens), numel_at(self.graph[o].shape, tokens)}
            if name in carried:
                sizes.add(numel_at(self.graph[o].shape, self._last.tokens))
            if len(sizes) > 1 or self._value(i) is self._value(o):    # (a copy onto itself is invalid)
                raise ValueError(f"input {name!r} cannot take the value of output {out!r}")
            copies[name] = (self._value(o), self._value(i), sizes.pop() * 4)
        # Host values reach the device by queue writes, which land after every earlier submit's commands:
        # they may overwrite what a submit still in flight reads.
        for name, i in arrays.items():
            if name in fed:
                arr = np.ascontiguousarray(fed[name]).view(np.uint8).reshape(-1)
                if arr.size:
                    self._write(self._value(i), 0, arr)
        start = int(fed.get("start_pos", 0))
        places = self._step_values(start, tokens, steps)
        enc = self.gpu.create_command_encoder()
        index = self._last.index + 1 if self._last else 0
        turn = index % 2
        if self._turns[turn] is not None:
            self._turns[turn].release()
        sub = self._turns[turn] = Submission(self, index, self.arena, tokens, steps)
        strides = {o: padded(numel_at(self.graph[o].shape, tokens) * 4) for o in self.graph.outputs
                   if outputs is None or self.graph.names[o] in outputs}
        for o, stride in strides.items():
            if o not in self.staging[turn] or self.staging[turn][o].size < steps * stride:
                u = self.wgpu.BufferUsage
                self.staging[turn][o] = self.gpu.create_buffer(size=steps * stride, usage=u.MAP_READ | u.COPY_DST)
            sub.staged[o] = (self.staging[turn][o], stride)
        for k in range(steps):
            for dst, at, nbytes in places[k]:
                enc.copy_buffer_to_buffer(self.uploads, at, dst, 0, nbytes)
            for name, (src, dst, nbytes) in copies.items():
                if k or name in carried:
                    enc.copy_buffer_to_buffer(src, 0, dst, 0, nbytes)
            if self.profiler is not None:
                self.profiler.encode(enc, self, tokens, start + k * tokens)
            else:
                self.encode_step(enc, tokens, start + k * tokens)
            for o, (staging, stride) in sub.staged.items():
                enc.copy_buffer_to_buffer(self._value(o), 0, staging, k * stride, stride)
            if self.profiler is not None:           # its timestamps are read back one step at a time
                self.gpu.queue.submit([enc.finish()])
                self.profiler.collect()
                enc = self.gpu.create_command_encoder()
        cmds = enc.finish()
        self.encode_s += time.thread_time() - began
        self.gpu.queue.submit([cmds])
        self._last = sub
        sub.map()
        return sub

    def _step_values(self, start: int, tokens: int, steps: int) -> list[list[tuple]]:
        """Write each step's uniform (token count, first position) and RoPE tables to the uploads buffer;
        returns, per step, where each goes: (destination buffer, offset in uploads, bytes)."""
        parts, places, at = [], [], 0
        for k in range(steps):
            first = start + k * tokens
            mine = [(self.step, np.array([tokens, first, 0, 0], np.uint32))]
            for (inv, scaling), key in self.rope_tables.items():
                ang = reference.rope_angles(first, tokens, inv)
                table = np.stack([np.cos(ang) * np.float32(scaling), np.sin(ang) * np.float32(scaling)], axis=-1)
                mine.append((self.rope_buffers[key], table.astype(np.float32)))
            places.append([])
            for dst, arr in mine:
                parts.append(arr.view(np.uint8).reshape(-1))
                places[-1].append((dst, at, arr.nbytes))
                at += arr.nbytes
        blob = np.concatenate(parts)
        if self.uploads is None or self.uploads.size < blob.size:
            u = self.wgpu.BufferUsage
            self.uploads = self.gpu.create_buffer(size=padded(blob.size), usage=u.COPY_SRC | u.COPY_DST)
        self._write(self.uploads, 0, blob)
        return places


class Submission:
    """Steps submitted together. `read()` waits for them and gives each one's outputs; it must come before
    the second submit after this one (which reuses its staging buffers)."""

    def __init__(self, runner: WgpuRunner, index: int, arena: ArenaPlan, tokens: int, steps: int):
        self.runner, self.index, self.arena, self.tokens, self.steps = runner, index, arena, tokens, steps
        self.staged: dict[int, tuple] = {}          # output node -> (staging buffer, bytes a step)
        self.mapping: dict[int, object] = {}        # output node -> its staging buffer's map promise

    def map(self):
        # Asked for at once, so the wait covers this submit and not a later one. wgpu-py's plain READ
        # mode first submits an empty command buffer, which on some drivers (lavapipe) waits for the work
        # in flight; these buffers are only written by submitted copies, which need no such flush.
        self.mapping = {o: staging.map_async("READ_NOSYNC") for o, (staging, _) in self.staged.items()}

    def read(self) -> list[dict[str, np.ndarray]]:
        if self.runner._last.index > self.index + 1:
            raise RuntimeError("a submit's outputs were read after its staging buffers were reused")
        graph, out = self.runner.graph, [{} for _ in range(self.steps)]
        for o, (staging, stride) in self.staged.items():
            self.mapping.pop(o).sync_wait()
            kind = np.uint32 if graph[o].dtype == "u32" else np.float32
            shape = tuple(self.tokens if d == "S" else d for d in graph[o].shape)
            data = np.frombuffer(staging.read_mapped(0, self.steps * stride), kind).reshape(self.steps, -1)
            for k in range(self.steps):
                out[k][graph.names[o]] = data[k, :numel_at(graph[o].shape, self.tokens)].reshape(shape).copy()
            staging.unmap()
        return out

    def release(self):
        """Give the staging buffers back unread (a speculative step nobody wants)."""
        for o, promise in self.mapping.items():
            promise.sync_wait()
            self.staged[o][0].unmap()
        self.mapping = {}
