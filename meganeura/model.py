"""`mn.load_model`: a checkpoint turned into a model you can call, score and generate with.

Two programs come from one checkpoint, each compiled when first needed and sharing the weights on the
device: the full forward (`logits`: every token, no cache) and the generating one (a KV cache as graph
state, the last token's logits and its argmax).
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from meganeura.models import registry
from meganeura.models.cache import KVCache

from . import generate as gen
from .graph import Graph
from .memory import choose_cache
from .program import compile
from .quant import check_mode
from .weights import open_weights, plan


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def eos_ids(path: str, cfg) -> list[int]:
    """generation_config.json's eos_token_id if it names any, else config.json's."""
    try:
        with open(os.path.join(path, "generation_config.json"), encoding="utf-8") as f:
            found = _ids(json.load(f).get("eos_token_id"))
    except (OSError, ValueError, AttributeError):
        found = []
    return found or _ids(getattr(cfg, "eos_token_id", None))


class Model:
    def __init__(self, path: str, backend: str = "wgpu", optimize: bool = True, context: int | None = None,
                 chunk: int | None = None, keep_egraphs: bool = False, quantize: str | None = None):
        t0 = time.perf_counter()
        self.path, self.backend, self.optimize, self.keep_egraphs = path, backend, optimize, keep_egraphs
        self.quantize = check_mode(quantize)
        self.family, self.config = registry.from_hf(path)
        self.weights = open_weights(path)
        full = Graph()
        full.set_outputs([self.family.build_graph(full, self.config)])
        plan(full, self.weights)                  # names and shapes are checked now, not at the first call
        self._full_graph = full
        self.eos_ids = eos_ids(path, self.config)
        self.cache = self._cache(context, chunk)
        self._program = self._decoder = self._tokenizer = None
        self.stats = gen.Stats()
        self.times = {"load_s": time.perf_counter() - t0, "compile_s": 0.0}

    # -- the two programs
    def _compile(self, graph: Graph):
        t0 = time.perf_counter()
        prog = compile(graph, backend=self.backend, optimize=self.optimize, keep=self.keep_egraphs,
                       quantize=self.quantize)
        t1 = time.perf_counter()
        other = self._program or self._decoder
        prog.bind(self.weights, share=other)
        t2 = time.perf_counter()
        self.times["compile_s"] += t1 - t0
        self.times["load_s"] += t2 - t1
        return prog

    @property
    def program(self):
        """The full forward: logits of every token, attention among the tokens of the call."""
        if self._program is None:
            self._program = self._compile(self._full_graph)
        return self._program

    @property
    def decoder(self):
        """The generating program: KV cache, last-token logits and next_token (the argmax)."""
        if self._decoder is None:
            g = Graph()
            logits = self.family.build_graph(g, self.config, cache=self.cache, last_only=True)
            g.set_outputs({"logits": logits, "next_token": g.argmax(logits)})
            self._decoder = self._compile(g)
        return self._decoder

    def _cache(self, context: int | None, chunk: int | None) -> KVCache:
        max_binding, copies = None, 1
        if self.backend == "wgpu":
            from .backend.device import open_device
            dev = open_device()
            max_binding, copies = dev.max_binding, 2 if dev.textures else 1
        return choose_cache(self.family, self.config, context, chunk, max_binding, copies)

    # -- scoring
    def logits(self, ids, start_pos: int = 0) -> np.ndarray:
        """float32 [len(ids), vocab]: one full forward over `ids`, the first at position `start_pos`."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"ids must be a non-empty 1-D sequence of token ids, got shape {ids.shape}")
        return self.program.run({"token_ids": ids, "start_pos": start_pos}, self.weights)["logits"]

    # -- generation
    def session(self) -> gen.Session:
        return gen.Session(self.decoder, self.weights, self.cache)

    def generate_ids(self, ids, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
                     top_p: float | None = None, seed: int | None = None) -> list[int]:
        """The new token ids after `ids` (the prompt is not repeated): greedy by default, stopping after
        an EOS id (which is included) or at the context's end."""
        return list(self.stream_ids(ids, max_new_tokens, gen.Sampling(temperature, top_k, top_p, seed)))

    def stream_ids(self, ids, max_new_tokens: int, sampling: gen.Sampling):
        ids = np.asarray(ids)
        if ids.ndim == 2 and ids.shape[0] == 1:          # a batch of one, as transformers' input_ids
            ids = ids[0]
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"ids must be a non-empty 1-D sequence of token ids, got shape {ids.shape}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must be in 0..{self.config.vocab_size - 1}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if max_new_tokens == 0:
            return iter(())
        session = self.session()
        return gen.generate_ids(session, ids, max_new_tokens, sampling, self.eos_ids, self.stats)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.path.endswith(".gguf"):
                from .gguf_file import tokenizer
                self._tokenizer = tokenizer(self.path)
            else:
                from .tokenizer import Tokenizer
                self._tokenizer = Tokenizer.from_dir(self.path)
        return self._tokenizer

    def encode_prompt(self, prompt, chat: bool = False) -> list[int]:
        """Token ids of a prompt: the chat template applied first when `chat` (a string is one user turn)."""
        if isinstance(prompt, str) and not prompt.strip() and not chat:
            raise ValueError("the prompt is empty")
        tok = self.tokenizer
        if chat:
            return tok.encode(tok.apply_chat_template(prompt, add_generation_prompt=True), add_special_tokens=False)
        return tok.encode(prompt)

    def generate(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, chat: bool = False):
        """Stream the continuation of `prompt` as text pieces (never half a character); EOS is not printed."""
        sampling = gen.Sampling(temperature, top_k, top_p, seed)
        ids = self.encode_prompt(prompt, chat)
        stream = self.tokenizer.decoder_stream(skip_special_tokens=True)
        eos = set(self.eos_ids) | set(self.tokenizer.eos_ids)
        for token in self.stream_ids(ids, max_new_tokens, sampling):
            if token in eos:
                break
            piece = stream.push(token)
            if piece:
                yield piece
        rest = stream.flush()
        if rest:
            yield rest


def load_model(path, backend: str = "wgpu", optimize: bool = True, dtype: str = "auto", context: int | None = None,
               chunk: int | None = None, quantize: str | None = None) -> Model:
    """Load a checkpoint: a local directory, or a Hugging Face repo id (from the local cache, downloaded
    when online). `context` caps the positions a generated sequence may reach (default: the model's
    limit, shrunk to fit the device); `chunk` is the most prompt tokens one prefill step takes.
    `quantize` ("q8" or "q4", see meganeura.quant) stores the matrix weights quantized on the device."""
    if dtype != "auto":
        raise ValueError(f"dtype {dtype!r} is not supported: weights keep the checkpoint's dtype (\"auto\")")
    from .hub import resolve
    return Model(resolve(os.fspath(path)), backend, optimize, context, chunk, quantize=quantize)
