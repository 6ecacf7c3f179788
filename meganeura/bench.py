"""`meganeura bench`: prefill and decode speed of a model, stated against the device's own ceilings
measured in the same run. Random token ids; a config without weights gets random bf16 weights."""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from .backend.device import open_device
from .backend.kernels import render


def stream_read_gbps(device=None, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """GB/s of a kernel that only reads a large buffer (the bound a weight-streaming decode step can reach)."""
    import wgpu

    dev = device or open_device()
    gpu = dev.wgpu_device
    nbytes = min(nbytes, dev.max_binding) // (256 * 16 * 64) * (256 * 16 * 64)
    threads = 256 * 64 * 16
    per = nbytes // 16 // threads
    u = wgpu.BufferUsage
    data = gpu.create_buffer(size=nbytes, usage=u.STORAGE | u.COPY_DST)
    sink = gpu.create_buffer(size=threads * 4, usage=u.STORAGE | u.COPY_SRC)
    module = gpu.create_shader_module(code=render("stream_read", per_thread=per))
    pipe = gpu.create_compute_pipeline(layout="auto", compute={"module": module, "entry_point": "main"})
    group = gpu.create_bind_group(layout=pipe.get_bind_group_layout(0), entries=[
        {"binding": 0, "resource": {"buffer": data, "offset": 0, "size": nbytes}},
        {"binding": 1, "resource": {"buffer": sink, "offset": 0, "size": threads * 4}}])

    def go(n):
        enc = gpu.create_command_encoder()
        cp = enc.begin_compute_pass()
        cp.set_pipeline(pipe)
        cp.set_bind_group(0, group)
        for _ in range(n):
            cp.dispatch_workgroups(threads // 256)
        cp.end()
        gpu.queue.submit([enc.finish()])
        gpu.queue.read_buffer(sink, 0, 16)          # waits for the work

    go(1)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        go(repeats)
        best = min(best, (time.perf_counter() - t) / repeats)
    return nbytes / best / 1e9


def _random_checkpoint(config_path: str, dest: str, seed: int = 0) -> None:
    """config.json + random bf16 weights of the right names and shapes."""
    import shutil

    from meganeura.models import registry

    from .graph import Graph
    from .weights import write_safetensors

    family, cfg = registry.from_hf(config_path)
    g = Graph()
    family.build_graph(g, cfg)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, node in g.leaves("parameter").items():
        shape = g[node].shape
        if g[node].attrs["parts"] is not None or (g[node].attrs["fallback"] and name == "lm_head.weight"):
            continue            # tied lm_head reuses the embedding; packed experts are bench-unsupported
        fan_in = shape[-1] if len(shape) > 1 else 1
        tensors[name] = ((rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in))
                         if len(shape) > 1 else 1 + 0.1 * rng.standard_normal(shape, dtype=np.float32), "bf16")
    write_safetensors(os.path.join(dest, "model.safetensors"), tensors)
    src = config_path if os.path.isfile(config_path) else os.path.join(config_path, "config.json")
    shutil.copy(src, os.path.join(dest, "config.json"))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(model: str, prompt_len: int = 64, new_tokens: int = 8, backend: str = "wgpu") -> dict:
    from .model import load_model

    has_weights = os.path.isdir(model) and any(f.endswith(".safetensors") for f in os.listdir(model))
    tmp = None
    if not has_weights:
        tmp = tempfile.TemporaryDirectory()
        _random_checkpoint(model, tmp.name)
        model = tmp.name
    rng = np.random.default_rng(0)
    context = prompt_len + new_tokens + 1
    m = load_model(model, backend=backend, context=context, chunk=prompt_len)
    prompt = rng.integers(0, m.config.vocab_size, prompt_len)

    def steps(mm, n_new: int) -> tuple[float, float, float]:
        """(first prefill, best prefill, mean decode step) seconds: prompt into a fresh cache, then greedy."""
        session = mm.session()
        prefill = []
        for _ in range(3):
            session.reset()
            t0 = time.perf_counter()
            token = session.feed(prompt)
            prefill.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(n_new):
            token = session.feed([int(token)])
        return prefill[0], min(prefill[1:]), (time.perf_counter() - t0) / max(1, n_new)

    decoder = m.decoder                               # optimize, compile, upload (timed in m.times)
    first, prefill_s, decode_s = steps(m, new_tokens)
    runner = getattr(decoder, "_runner", None)
    weight_bytes = sum(m.weights.tensors[n].end - m.weights.tensors[n].begin
                       for n in set(m.weights.tensors)) if runner else 0
    read = stream_read_gbps() if backend == "wgpu" else float("nan")

    # The optimizer's worth: the same steps on the unoptimized graph, timed in this run.
    plain = load_model(model, backend=backend, optimize=False, context=context, chunk=prompt_len)
    _, plain_prefill_s, plain_decode_s = steps(plain, new_tokens)
    plain_runner = getattr(plain.decoder, "_runner", None)
    result = {
        "model": m.config.model_type, "layers": m.config.num_hidden_layers, "hidden": m.config.hidden_size,
        "prompt_len": prompt_len, "new_tokens": new_tokens, "backend": backend,
        "device": runner.dev.name if runner else "numpy",
        "load_s": round(m.times["load_s"], 3), "compile_s": round(m.times["compile_s"], 3),
        "ttft_s": round(first, 4),
        "prefill_tokens_per_s": round(prompt_len / prefill_s, 2),
        "decode_tokens_per_s": round(1 / decode_s, 2), "decode_mode": "kv-cache",
        "dispatches_per_step": len(runner.encoding(1)) if runner else None,
        "dispatches_per_step_unoptimized": len(plain_runner.encoding(1)) if plain_runner else None,
        "opt_speedup": round(plain_decode_s / decode_s, 3),
        "opt_speedup_prefill": round(plain_prefill_s / prefill_s, 3),
        "bytes_per_decode_step": weight_bytes,
        "device_read_gbps": round(read, 2),
        "decode_efficiency": round(weight_bytes / decode_s / (read * 1e9), 4) if runner else None,
    }
    if tmp:
        tmp.cleanup()
    return result
