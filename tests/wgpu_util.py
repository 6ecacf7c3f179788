"""Helpers for GPU-path tests: checkpoints written in any float dtype, and a graph runner on both backends."""
from __future__ import annotations

import json
import struct

import numpy as np

import meganeura as mn

TAGS = {"f32": "F32", "f16": "F16", "bf16": "BF16"}


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even f32 -> bf16, as raw uint16."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(path, tensors: dict[str, tuple[np.ndarray, str]]):
    """tensors: name -> (float32 values, stored dtype f32/f16/bf16)."""
    header, blobs, offset = {}, [], 0
    for name, (arr, dtype) in tensors.items():
        raw = {"f32": lambda a: a.astype(np.float32), "f16": lambda a: a.astype(np.float16),
               "bf16": to_bf16_bits}[dtype](np.asarray(arr)).tobytes()
        header[name] = {"dtype": TAGS[dtype], "shape": list(np.shape(arr)), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def run_both(g: mn.Graph, inputs: dict, weights) -> tuple[dict, dict]:
    """(wgpu outputs, reference outputs) of graph `g`."""
    gpu = mn.compile(g, backend="wgpu").run(inputs, weights)
    ref = mn.compile(g, backend="numpy").run(inputs, weights)
    return gpu, ref
