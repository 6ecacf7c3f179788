"""`meganeura bench`: prefill and decode speed of a model, each stated against what the device can do
(its streaming-read and fma ceilings, measured by kernels in the same run), against the unoptimized
graph and against PyTorch on the same weights, all in one run. Random token ids; a config without
weights gets random bf16 weights."""
from __future__ import annotations

import math
import os
import tempfile
import time

import numpy as np

from . import quant
from .hub import resolve
from .model import load_model
from .roofline import decode_bytes, step_flops

ROUNDS = 6                   # each timed sequence runs this often (at least 2: the first prompt is cold);
                             # the fastest run counts, as other work on the machine only ever slows one
                             # (the ceilings are timed again after each run and keep their best: as many
                             # tries, over the same stretch of time)


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


def _sig(x: float, digits: int = 4) -> float:
    """x rounded to `digits` significant digits (reported numbers, and the ratios taken from them)."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def _sequence(model, prompt, new_tokens: int, between=None) -> dict:
    """Time a greedy sequence through the model's generating program, ROUNDS times from a fresh cache:
    the first prompt (cold: pipelines are built at the first step), the best prompt, and the decode steps
    (as generation runs them, queued ahead of their read-back) of the faster round with the host time
    spent preparing them. `between()` runs after each round."""
    session = model.session()
    runner = model.decoder._runner
    prefill, best = [], None
    for _ in range(ROUNDS):
        session.reset()
        t0 = time.perf_counter()
        token = session.feed(prompt)
        prefill.append(time.perf_counter() - t0)
        encoded = runner.encode_s if runner is not None else math.nan
        t0 = time.perf_counter()
        for token in session.greedy(int(token), new_tokens):
            pass
        decode = time.perf_counter() - t0
        encode = runner.encode_s - encoded if runner is not None else math.nan
        if best is None or decode < best[0]:
            best = (decode, encode)
        if between is not None:
            between()
    decode, encode = best
    return {"ttft_s": prefill[0], "prefill_s": min(prefill[1:]), "decode_s": decode / new_tokens,
            "encode_fraction": encode / decode}


TORCH_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def torch_sequence(path: str, prompt, new_tokens: int) -> dict:
    """PyTorch (transformers, on the CPU) on the same checkpoint in its stored dtype, the same greedy
    sequence with the KV cache: {"prefill_s", "decode_s" (per token, prefill excluded), "threads" (of the
    faster decode), "dtype"}, or
    {"error": why} when torch/transformers are missing or the checkpoint does not load into them whole."""
    try:
        import torch
        import transformers
    except ImportError as e:
        return {"error": f"not installed ({e.name})"}
    from .weights import open_weights

    tags = [t.dtype for t in open_weights(path).tensors.values() if t.dtype in TORCH_DTYPES]
    tag = max(set(tags), key=tags.count) if tags else "F32"
    dtype = getattr(torch, TORCH_DTYPES[tag])
    log = transformers.utils.logging
    level, bars = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()                   # the bench's output is its own lines
    log.disable_progress_bar()
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    except Exception as e:                      # the checkpoint is ours to bench even where transformers fails
        return {"error": f"transformers cannot load it: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    finally:
        log.set_verbosity(level)
        if bars:
            log.enable_progress_bar()
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):     # else it would not be the same model
        if info.get(kind):
            keys = sorted(info[kind])
            return {"error": f"transformers reports {len(keys)} {kind.replace('_', ' ')}, e.g. {keys[0]}"}
    model.eval()
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    # Each thread count torch may run best with: all cores (its default) and one, which wins when other
    # work holds a core and torch's threads wait on each other. The faster of each counts.
    default = torch.get_num_threads()
    best = {"prefill_s": math.inf, "decode_s": math.inf}
    try:
        for threads in sorted({default, 1}, reverse=True):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                for first in [True] + [False] * ROUNDS:       # the first round warms up
                    t0 = time.perf_counter()
                    out = model(ids, use_cache=True)
                    prefill = time.perf_counter() - t0
                    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                    t0 = time.perf_counter()
                    for _ in range(new_tokens):
                        out = model(token, past_key_values=past, use_cache=True)
                        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                    decode = (time.perf_counter() - t0) / new_tokens
                    if not first:
                        best["prefill_s"] = min(best["prefill_s"], prefill)
                        if decode < best["decode_s"]:
                            best.update(decode_s=decode, threads=threads)
    finally:
        torch.set_num_threads(default)
    return {**best, "dtype": TORCH_DTYPES[tag]}


def bench(model: str, prompt_len: int = 64, new_tokens: int = 8, backend: str = "wgpu",
          quantize: str | None = None) -> dict:
    """One run of every measurement `meganeura bench` reports (see the README's bench section)."""
    if prompt_len < 1:
        raise ValueError(f"--prompt-len must be at least 1, got {prompt_len}")
    if new_tokens < 1:
        raise ValueError(f"--new-tokens must be at least 1, got {new_tokens}")
    tmp = None
    path = model if os.path.isfile(model) and not model.endswith(".gguf") else resolve(model)
    has_weights = path.endswith(".gguf") or os.path.isdir(path) and any(f.endswith(".safetensors")
                                                                          for f in os.listdir(path))
    if not has_weights:
        tmp = tempfile.TemporaryDirectory()
        _random_checkpoint(path, tmp.name)
        path = tmp.name
    try:
        return _bench(path, prompt_len, new_tokens, backend, quantize)
    finally:
        if tmp:
            tmp.cleanup()


def _bench(path: str, prompt_len: int, new_tokens: int, backend: str, quantize: str | None) -> dict:
    context = prompt_len + new_tokens + 1
    m = load_model(path, backend=backend, context=context, chunk=prompt_len, quantize=quantize)
    prompt = np.random.default_rng(0).integers(0, m.config.vocab_size, prompt_len)
    decoder = m.decoder                               # optimize, compile, upload (timed in m.times)
    graph, runner = decoder.graph, decoder._runner
    ceiling_rounds = []
    if runner is not None:
        from .backend import ceilings
        ceiling_rounds = [ceilings.stream_read_rounds(runner.dev), ceilings.fma_rounds(runner.dev)]
    run = _sequence(m, prompt, new_tokens, between=lambda: [round_() for round_ in ceiling_rounds])
    # The decode steps run at positions prompt_len .. prompt_len + new_tokens - 1: their mean bytes.
    formats = ({n: w.fmt for n, w in runner.params.items() if w.fmt} if runner is not None
               else quant.plan(graph, quantize))
    bytes_step = round(sum(decode_bytes(graph, m.weights, p, formats)
                           for p in range(prompt_len, prompt_len + new_tokens)) / new_tokens)
    flops = step_flops(graph, prompt_len, 0)

    # The optimizer's worth: the same sequence on the unoptimized graph, timed in this run.
    plain = load_model(path, backend=backend, optimize=False, context=context, chunk=prompt_len, quantize=quantize)
    plain_run = _sequence(plain, prompt, new_tokens)
    plain_runner = plain.decoder._runner
    del plain

    read, gflops = [round_() for round_ in ceiling_rounds] or [{}, {}]
    ref = torch_sequence(path, prompt, new_tokens)

    decode_tps = _sig(1 / run["decode_s"])
    prefill_tps = _sig(prompt_len / run["prefill_s"])
    read_gbps = _sig(max(read.values())) if read else None
    peak = _sig(max(gflops.values())) if gflops else None
    return {
        "model": m.config.model_type, "layers": m.config.num_hidden_layers, "hidden": m.config.hidden_size,
        "prompt_len": prompt_len, "new_tokens": new_tokens, "backend": backend, "quantize": quantize,
        "device": runner.dev.name if runner else "numpy",
        "device_backend": runner.dev.backend if runner else None,
        "load_s": _sig(m.times["load_s"]), "compile_s": _sig(m.times["compile_s"]),
        "optimize_s": _sig(decoder.optimize_s),
        "ttft_s": _sig(run["ttft_s"]),
        "prefill_tokens_per_s": prefill_tps,
        "decode_tokens_per_s": decode_tps, "decode_mode": "kv-cache",
        "dispatches_per_decode_step": len(runner.encoding(1)) if runner else None,
        "dispatches_per_decode_step_unoptimized": len(plain_runner.encoding(1)) if plain_runner else None,
        "opt_speedup": _sig(plain_run["decode_s"] / run["decode_s"]),
        "opt_speedup_prefill": _sig(plain_run["prefill_s"] / run["prefill_s"]),
        "host_encode_fraction": _sig(run["encode_fraction"]) if runner else None,
        "bytes_per_decode_step": bytes_step,
        "device_read_gbps": read_gbps,
        "device_read_pattern": max(read, key=read.get) if read else None,
        "decode_efficiency": _sig(bytes_step * decode_tps / (read_gbps * 1e9)) if read else None,
        "prefill_flops": flops,
        "device_gflops": peak,
        "device_fma_chains": max(gflops, key=gflops.get) if gflops else None,
        "prefill_efficiency": _sig(flops * prefill_tps / prompt_len / (peak * 1e9)) if gflops else None,
        "torch_dtype": ref.get("dtype"), "torch_threads": ref.get("threads"),
        "torch_prefill_tokens_per_s": _sig(prompt_len / ref["prefill_s"]) if "prefill_s" in ref else None,
        "torch_decode_tokens_per_s": _sig(1 / ref["decode_s"]) if "decode_s" in ref else None,
        **({"torch_error": ref["error"]} if "error" in ref else {}),
    }


def summary(r: dict) -> list[str]:
    """A few aligned lines of a bench result for people (the JSON line carries every field)."""
    def num(v, fmt: str = ".4g", unit: str = "") -> str:
        return "-" if v is None else f"{v:{fmt}}{unit}"

    def pct(v) -> str:
        return num(None if v is None else 100 * v, ".1f", "%")

    rows = [
        ("model", f"{r['model']}, {r['layers']} layers, hidden {r['hidden']}",
         f"prompt {r['prompt_len']}, {r['new_tokens']} new tokens on {r['device']}"
         + (f" ({r['device_backend']})" if r.get("device_backend") else "")),
        ("prefill", num(r["prefill_tokens_per_s"], ".1f", " tok/s"),
         f"{pct(r['prefill_efficiency'])} of {num(r['device_gflops'])} GFLOP/s, opt {r['opt_speedup_prefill']}x, "
         f"torch {num(r['torch_prefill_tokens_per_s'], '.1f', ' tok/s')}, first token {r['ttft_s']} s"),
        ("decode", num(r["decode_tokens_per_s"], ".1f", " tok/s"),
         f"{pct(r['decode_efficiency'])} of {num(r['device_read_gbps'])} GB/s, opt {r['opt_speedup']}x, "
         f"torch {num(r['torch_decode_tokens_per_s'], '.1f', ' tok/s')}"),
        ("step", f"{r['bytes_per_decode_step'] / 1e6:.2f} MB",
         f"{r['dispatches_per_decode_step']} dispatches ({r['dispatches_per_decode_step_unoptimized']} "
         f"unoptimized), host encoding {pct(r['host_encode_fraction'])}"),
        ("setup", f"{r['load_s']} s load", f"compile {r['compile_s']} s, of it optimizer {r['optimize_s']} s"),
    ]
    width = max(len(value) for _, value, _ in rows[1:])
    return [f"{label:8s} {value:>{width}s}  {detail}" if label != "model" else f"{label:8s} {value}; {detail}"
            for label, value, detail in rows]
