"""The device's own ceilings, measured by kernels: how fast it streams bytes in, how fast it does fma.

A speed is only meaningful against what the device can do at all, so `meganeura bench` states decode
against the streaming-read ceiling and prefill against the arithmetic ceiling, both measured in the same
run. Each ceiling is the best of a few variants of one template (access patterns for reads, independent
fma chains for arithmetic): the fastest variant differs by device, and a ceiling set by a slow variant
would flatter every ratio taken against it. So would one timed only while other work held the machine:
`stream_read_rounds` and `fma_rounds` time their variants a round at a time, between the timed runs of a
model, so that the best of each is taken over the same stretch of time.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from .device import Device, open_device
from .kernels import TEXEL_ROW, render

WG = 256
TARGET_S = 0.05              # the least time a timed batch of dispatches runs: timer and submit noise stay small

# name -> (element, scalar, combine, index of read r, reads per loop trip, read through a texture: no, or
# as a sampled or a read-only storage texture)
READ_PATTERNS = {
    # lane i reads element r * invocations + i: adjacent lanes on adjacent elements (coalesced on a GPU)
    "strided-vec4f32": ("vec4<f32>", "f32", "+", "r * invocations + invocation", 1, None),
    # each invocation reads its own contiguous run
    "contiguous-vec4f32": ("vec4<f32>", "f32", "+", "invocation * PER + r", 1, None),
    # the strided pattern through integer loads (no float unpacking or adds on the way)
    "strided-vec4u32": ("vec4<u32>", "u32", "^", "r * invocations + invocation", 1, None),
    # a workgroup reads one contiguous block, its lanes adjacent: one long run per CPU core on lavapipe
    "block-vec4f32": ("vec4<f32>", "f32", "+", "(group * PER + r) * WG + lane", 4, None),
    "block-vec4u32": ("vec4<u32>", "u32", "^", "(group * PER + r) * WG + lane", 4, None),
    # texels (16 bytes) of a texture holding the same bytes, as kernels read weights on a CPU device
    "texture-strided-vec4u32": ("vec4<u32>", "u32", "^", "r * invocations + invocation", 1, "sampled"),
    "texture-contiguous-vec4u32": ("vec4<u32>", "u32", "^", "invocation * PER + r", 1, "sampled"),
    "storage-texture-strided-vec4u32": ("vec4<u32>", "u32", "^", "r * invocations + invocation", 1, "storage"),
    "storage-texture-contiguous-vec4u32": ("vec4<u32>", "u32", "^", "invocation * PER + r", 1, "storage"),
}
FMA_CHAINS = (8, 16, 32)     # independent vec4 chains per invocation (the ILP variants)


def _seconds_per_dispatch(dev: Device, pipe, group, groups: int, sink) -> float:
    """Seconds one dispatch of `groups` workgroups takes: dispatches back to back in one pass, as many as
    run TARGET_S, best of three batches (after one warm-up batch); timed as a step runs (`awake`)."""
    gpu = dev.wgpu_device

    def batch(n: int) -> float:
        dev.awake()
        t = time.perf_counter()
        enc = gpu.create_command_encoder()
        cp = enc.begin_compute_pass()
        cp.set_pipeline(pipe)
        cp.set_bind_group(0, group)
        for _ in range(n):
            cp.dispatch_workgroups(groups)
        cp.end()
        gpu.queue.submit([enc.finish()])
        gpu.queue.read_buffer(sink, 0, 4)         # waits for the work
        return time.perf_counter() - t

    n, took = 1, batch(1)
    while took < TARGET_S and n < 4096:
        n = min(4096, max(2 * n, int(n * TARGET_S / max(took, 1e-6)) + 1))
        took = batch(n)
    return min([took] + [batch(n) for _ in range(2)]) / n


def _kernel(gpu, source: str, buffers):
    module = gpu.create_shader_module(code=source)
    pipe = gpu.create_compute_pipeline(layout="auto", compute={"module": module, "entry_point": "main"})
    group = gpu.create_bind_group(layout=pipe.get_bind_group_layout(0), entries=[
        {"binding": i, "resource": b.create_view() if hasattr(b, "create_view") else
         {"buffer": b, "offset": 0, "size": b.size}} for i, b in enumerate(buffers)])
    return pipe, group


def _rates(dev: Device, variants: dict, sink) -> Callable[[], dict]:
    """A round of variants {name: (pipeline, bind group, workgroups, work per dispatch)}: a function that
    times each once more and returns {variant: best work per second so far}. Rounds interleave the
    variants, so a moment of interference from other processes does not decide which one wins."""
    best = {name: 0.0 for name in variants}

    def round_() -> dict:
        for name, (pipe, group, groups, work) in variants.items():
            best[name] = max(best[name], work / _seconds_per_dispatch(dev, pipe, group, groups, sink))
        return dict(best)
    return round_


def _chains(n: int, first: str, step: str, join: str, kind: str = "vec4<f32>") -> tuple[str, str, str]:
    """(declarations, loop body, reduction) of n independent accumulators a0..a{n-1}."""
    declare = "\n".join(f"    var a{i} = {first.format(i=i, kind=kind)};" for i in range(n))
    body = "\n".join(f"        {step.format(i=i)}" for i in range(n))
    total = f" {join} ".join(f"a{i}" for i in range(n))
    return declare, body, total


def stream_read_rounds(device: Device | None = None, nbytes: int = 256 << 20) -> Callable[[], dict[str, float]]:
    """GB/s of each READ_PATTERNS variant reading one buffer of up to `nbytes` (the bound a weight-streaming
    decode step can reach), a round at a time: a function that times each variant once more and returns
    the best of each so far, {pattern: GB/s}."""
    import wgpu

    dev = device or open_device()
    gpu = dev.wgpu_device
    invocations = WG * 1024
    nbytes = min(nbytes, dev.max_binding) // (invocations * 16 * 4) * (invocations * 16 * 4)
    per = nbytes // 16 // invocations
    u = wgpu.BufferUsage
    data = gpu.create_buffer(size=nbytes, usage=u.STORAGE | u.COPY_DST | u.COPY_SRC)
    # Written with data, not left zero: on a CPU device untouched zero pages may all share one physical
    # page, and reading them would measure a cache instead of memory.
    piece = np.arange(min(nbytes, 32 << 20) // 4, dtype=np.uint32)
    for at in range(0, nbytes, piece.nbytes):
        gpu.queue.write_buffer(data, at, piece[:(nbytes - at) // 4])
    sink = gpu.create_buffer(size=invocations * 4, usage=u.STORAGE | u.COPY_SRC)
    texture = None
    if any(pattern[-1] for pattern in READ_PATTERNS.values()):
        texture = gpu.create_texture(size=(TEXEL_ROW, nbytes // (16 * TEXEL_ROW), 1),
                                     format=wgpu.TextureFormat.rgba32uint,
                                     usage=wgpu.TextureUsage.TEXTURE_BINDING | wgpu.TextureUsage.STORAGE_BINDING |
                                     wgpu.TextureUsage.COPY_DST)
        enc = gpu.create_command_encoder()
        enc.copy_buffer_to_texture({"buffer": data, "offset": 0, "bytes_per_row": 16 * TEXEL_ROW,
                                    "rows_per_image": texture.size[1]}, {"texture": texture}, texture.size)
        gpu.queue.submit([enc.finish()])
    variants = {}
    for name, (elem, scalar, op, index, unroll, textured) in READ_PATTERNS.items():
        declare, _, total = _chains(unroll, "{kind}()", "", op, elem)
        body = "\n".join(f"        a{j} = a{j} {op} load(index(r + {j}u, gid.x, lane, wid.x, invocations));"
                         for j in range(unroll))
        if textured:
            kind, level = ("texture_2d<u32>", ", 0") if textured == "sampled" else \
                ("texture_storage_2d<rgba32uint, read>", "")
            source = (f"@group(0) @binding(0) var data: {kind};\n"
                      f"fn load(i: u32) -> vec4<u32> {{ return textureLoad(data, vec2<u32>(i % {TEXEL_ROW}u, "
                      f"i / {TEXEL_ROW}u){level}); }}")
        else:
            source = (f"@group(0) @binding(0) var<storage, read> data: array<{elem}>;\n"
                      f"fn load(i: u32) -> {elem} {{ return data[i]; }}")
        source = render("stream_read", data=source, elem=elem, scalar=scalar, per_thread=per, wg=WG, index=index,
                        declare=declare, body=body, unroll=unroll, reduce=_horizontal(f"({total})", op))
        variants[name] = _kernel(gpu, source, [texture if textured else data, sink]) + (invocations // WG,
                                                                                      nbytes / 1e9)
    return _rates(dev, variants, sink)


def _horizontal(v: str, op: str) -> str:
    return f" {op} ".join(f"{v}.{c}" for c in "xyzw")


def fma_rounds(device: Device | None = None, groups: int = 1024, iterations: int = 64
               ) -> Callable[[], dict[int, float]]:
    """GFLOP/s of the fma kernel for each FMA_CHAINS variant, a round at a time (as `stream_read_rounds`):
    {chains: GFLOP/s}."""
    import wgpu

    dev = device or open_device()
    gpu = dev.wgpu_device
    invocations = groups * WG
    u = wgpu.BufferUsage
    sink = gpu.create_buffer(size=invocations * 4, usage=u.STORAGE | u.COPY_SRC)
    variants = {}
    for chains in FMA_CHAINS:
        declare, body, total = _chains(chains, "{kind}(seed + {i}.0)", "a{i} = fma(a{i}, m, c);", "+")
        source = render("fma", wg=WG, iterations=iterations, declare=declare, body=body,
                        reduce=_horizontal(f"({total})", "+"))
        variants[chains] = _kernel(gpu, source, [sink]) + (groups, invocations * iterations * chains * 8 / 1e9)
    return _rates(dev, variants, sink)
