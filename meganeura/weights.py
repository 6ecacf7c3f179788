"""Checkpoint tensors: safetensors files read by mmap (one file or shards), bound to a graph's parameters.

Binding checks every parameter's name and shape before any math and reports all problems in one error.
Tensors keep their stored dtype until a backend asks for them; `to_f32` widens bf16 and f16 exactly.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import numpy as np

from .quant import GGUF_BLOCKS

# safetensors dtype tag -> numpy storage dtype (bf16 is stored as its 16 raw bits)
STORAGE = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
FLOAT_TAGS = {"F32": "f32", "F16": "f16", "BF16": "bf16", "F64": "f64"}
MULTIMODAL_PREFIX = ("model.", "model.language_model.")   # Gemma-4 multimodal checkpoints nest the decoder


class CheckpointError(ValueError):
    """The checkpoint cannot be read, or does not hold what the model needs."""


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str          # safetensors tag: F32, BF16, ...; GGUF blocks kept as stored: Q8_0, Q4_0
    shape: tuple[int, ...]
    begin: int          # absolute byte offsets in the file; end - begin is the size of what raw() gives
    end: int            # (GGUF types widened when read: the widened size, see gguf_file)


def _read_header(path: str) -> dict[str, TensorInfo]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise CheckpointError(f"{path} is not a safetensors file (header length {n} exceeds the file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path} is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (header is not an object)")
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed safetensors entry for {name!r}") from None
        if dtype not in STORAGE:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        want = int(np.prod(shape, dtype=np.int64)) * np.dtype(STORAGE[dtype]).itemsize
        if e - b != want or 8 + n + e > size:
            raise CheckpointError(f"{path}: tensor {name} {list(shape)} {dtype} has a bad byte range (truncated file?)")
        out[name] = TensorInfo(path, dtype, shape, 8 + n + b, 8 + n + e)
    return out


def to_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    """Widen a stored tensor to float32 exactly (bf16: the 16 bits are the top half of an f32)."""
    if dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


class Checkpoint:
    """The tensors of a checkpoint directory (or one .safetensors file), memory-mapped on demand."""

    def __init__(self, path: str):
        path = os.fspath(path)
        if os.path.isdir(path):
            index = os.path.join(path, "model.safetensors.index.json")
            if os.path.exists(index):
                try:
                    weight_map = json.load(open(index))["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise CheckpointError(f"{index} is not a valid safetensors index") from None
                files = sorted({os.path.join(path, f) for f in weight_map.values()})
            else:
                files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"no .safetensors weights in {path}")
        elif os.path.isfile(path):
            files = [path]
        else:
            raise CheckpointError(f"no such checkpoint: {path}")
        self.path = path
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            if not os.path.isfile(f):
                raise CheckpointError(f"shard {f} named by the index is missing")
            self.tensors.update(_read_header(f))
        self._maps: dict[str, np.memmap] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def resolve(self, name: str) -> str | None:
        """The stored name for `name`, looking under the multimodal decoder prefix too."""
        if name in self.tensors:
            return name
        plain, nested = MULTIMODAL_PREFIX
        if name.startswith(plain) and nested + name[len(plain):] in self.tensors:
            return nested + name[len(plain):]
        return None

    def raw(self, name: str) -> np.ndarray:
        """The tensor in its stored dtype, as a read-only view of the mmap."""
        t = self.tensors[name]
        if t.file not in self._maps:
            self._maps[t.file] = np.memmap(t.file, dtype=np.uint8, mode="r")
        buf = self._maps[t.file][t.begin:t.end]
        return buf.view(STORAGE[t.dtype]).reshape(t.shape)

    def f32(self, name: str) -> np.ndarray:
        return to_f32(self.raw(name), self.tensors[name].dtype)


def open_weights(path) -> Checkpoint:
    """A checkpoint directory or .safetensors file, or a .gguf file (see meganeura.gguf_file)."""
    if os.fspath(path).endswith(".gguf"):
        from .gguf_file import GGUFCheckpoint
        return GGUFCheckpoint(path)
    return Checkpoint(path)


def readable(tag: str) -> bool:
    """Whether a stored tensor of this dtype can serve a parameter: a float type, or GGUF blocks."""
    return tag in FLOAT_TAGS or tag in GGUF_BLOCKS


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bf16 (round to nearest even), as the raw 16 bits."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(path, tensors: dict[str, tuple[np.ndarray, str]]) -> None:
    """Write `name -> (values, stored dtype "f32" | "f16" | "bf16")` as a safetensors file."""
    encode = {"f32": ("F32", lambda a: a.astype(np.float32)), "f16": ("F16", lambda a: a.astype(np.float16)),
              "bf16": ("BF16", bf16_bits)}
    header, offset = {}, 0
    for name, (arr, dtype) in tensors.items():
        tag, _ = encode[dtype]
        nbytes = int(np.prod(np.shape(arr), dtype=np.int64)) * (4 if dtype == "f32" else 2)
        header[name] = {"dtype": tag, "shape": list(np.shape(arr)), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for arr, dtype in tensors.values():
            f.write(encode[dtype][1](np.asarray(arr)).tobytes())


# ---------------------------------------------------------------- binding a graph's parameters

@dataclass(frozen=True)
class Binding:
    """Where one parameter's value comes from: one stored tensor, stored tensors concatenated along axis 0
    (a packed parameter: one group of several parts), or groups stacked on a new axis 0 (experts)."""
    param: str
    shape: tuple[int, ...]
    parts: tuple[tuple[str, ...], ...]      # outer: stacked on a new axis 0 (or one entry: no stack);
    stacked: bool                           # inner: concatenated along axis 0


def _shape(shape) -> list:
    return [int(d) for d in shape]


def _join_problem(names, shapes, want, one: str = "", many: str = "") -> str | None:
    """Why tensors `names` of `shapes` do not concatenate along axis 0 to `want` (None if they do);
    `one` / `many` prefix the message about one tensor / all of them."""
    want = tuple(want)
    if not want:
        return f"{many}{', '.join(names)} cannot be packed into a scalar"
    for name, s in zip(names, shapes):
        if len(s) != len(want) or tuple(s[1:]) != want[1:]:
            expected = [int(s[0]) if s else "?"] + _shape(want[1:])
            return f"{one}{name} has shape {_shape(s)}, expected {expected}"
    if sum(s[0] for s in shapes) != want[0]:
        return (f"{many}{', '.join(names)} have shapes {[_shape(s) for s in shapes]}, "
                f"expected together {_shape(want)}")
    return None


def _packed_members(a) -> tuple[tuple[str, str | None], ...] | None:
    packed = a.get("packed")
    return None if not packed else tuple((m[0], m[1]) for m in packed)


def _plan_one(ckpt: Checkpoint, node, problems: list[str]) -> Binding | None:
    a = node.attrs
    shape = tuple(node.shape)
    members = _packed_members(a)
    if members is not None:
        stored, ok = [], True
        for name, fallback in members:
            s = ckpt.resolve(name) or (fallback and ckpt.resolve(fallback))
            if s is None:
                problems.append(f"missing {name} (packed into {a['name']} {list(shape)})")
                ok = False
            elif not readable(ckpt.tensors[s].dtype):
                problems.append(f"{s} has dtype {ckpt.tensors[s].dtype}, expected a float type")
                ok = False
            else:
                stored.append(s)
        if not ok:
            return None
        why = _join_problem(stored, [ckpt.tensors[s].shape for s in stored], shape)
        if why:
            problems.append(why)
            return None
        return Binding(a["name"], shape, (tuple(stored),), stacked=False)
    if a["parts"] is None:
        stored = ckpt.resolve(a["name"]) or (a["fallback"] and ckpt.resolve(a["fallback"]))
        if stored is None:
            problems.append(f"missing {a['name']} {list(shape)}")
            return None
        got = ckpt.tensors[stored].shape
        if got != shape and not (shape == () and got == (1,)) and not (got == () and shape == (1,)):
            problems.append(f"{stored} has shape {list(got)}, expected {list(shape)}")
            return None
        if not readable(ckpt.tensors[stored].dtype):
            problems.append(f"{stored} has dtype {ckpt.tensors[stored].dtype}, expected a float type")
            return None
        return Binding(a["name"], shape, ((stored,),), stacked=False)
    groups, ok = [], True
    for group in a["parts"]:
        names = []
        for part in group:
            stored = ckpt.resolve(part)
            if stored is None:
                problems.append(f"missing {part}")
                ok = False
            else:
                names.append(stored)
        groups.append(tuple(names))
    if not ok:
        return None
    inner = shape[1:]
    for names in groups:
        shapes = [ckpt.tensors[n].shape for n in names]
        joined = (sum(s[0] for s in shapes),) + shapes[0][1:]
        if joined != inner or any(s[1:] != shapes[0][1:] for s in shapes):
            problems.append(f"{', '.join(names)} have shapes {[list(s) for s in shapes]}, "
                            f"expected together {list(inner)}")
            return None
    return Binding(a["name"], shape, tuple(groups), stacked=True)


def plan(graph, ckpt: Checkpoint) -> dict[str, Binding]:
    """Check every parameter of `graph` against `ckpt`; one CheckpointError lists all problems."""
    problems: list[str] = []
    out = {}
    for node in graph.nodes:
        if node.op == "parameter" and node.attrs["name"] not in out:
            b = _plan_one(ckpt, node, problems)
            if b is not None:
                out[b.param] = b
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"checkpoint {ckpt.path} does not fit the model: {shown}")
    return out


def load_f32(ckpt: Checkpoint, b: Binding) -> np.ndarray:
    """The parameter's value as float32 (packing stacked/concatenated parts)."""
    if not b.stacked:
        (group,) = b.parts
        if len(group) == 1:
            return ckpt.f32(group[0]).reshape(b.shape)
        return np.concatenate([ckpt.f32(n) for n in group], axis=0).reshape(b.shape)
    return np.stack([np.concatenate([ckpt.f32(n) for n in group], axis=0) for group in b.parts])


def load_rows(ckpt: Checkpoint, b: Binding, r0: int, r1: int, raw: bool = False) -> np.ndarray:
    """Rows r0..r1 (along axis 0) of the parameter, read from the mmap piece by piece: float32, or with
    `raw` the stored rows as they are (e.g. quantized blocks, which all parts must share)."""
    def rows(name: str, a: int, z: int) -> np.ndarray:
        if raw:
            return ckpt.raw(name)[a:z]
        tag = ckpt.tensors[name].dtype
        return to_f32(ckpt.raw(name)[a:z], tag) if tag in FLOAT_TAGS else ckpt.f32(name)[a:z]

    def joined(group, a: int, z: int) -> np.ndarray:
        out, at = [], 0
        for name in group:
            n = ckpt.tensors[name].shape[0]
            if a < at + n and z > at:
                out.append(rows(name, max(a, at) - at, min(z, at + n) - at))
            at += n
        return out[0] if len(out) == 1 else np.concatenate(out, axis=0)

    if not b.stacked:
        (group,) = b.parts
        return joined(group, r0, r1)
    return np.stack([joined(group, 0, sum(ckpt.tensors[n].shape[0] for n in group)) for group in b.parts[r0:r1]])


def from_dict(graph, weights) -> dict[str, np.ndarray]:
    """float32 values of every parameter of `graph` from a dict of arrays, checked before any math.

    A packed parameter is taken as is if the dict holds its own name (e.g. values a Program produced),
    else concatenated along axis 0 from its members (each its name, else its fallback), once, here."""
    values = {}
    for node in graph.nodes:
        if node.op != "parameter" or node.attrs["name"] in values:
            continue
        name, shape = node.attrs["name"], tuple(node.shape)
        members = _packed_members(node.attrs)
        if members is None or name in weights:
            if name not in weights:
                raise ValueError(f"missing weight {name}")
            arr = np.asarray(weights[name], dtype=np.float32)
            if arr.shape != shape:
                raise ValueError(f"weight {name} has shape {list(arr.shape)}, expected {list(shape)}")
            values[name] = arr
            continue
        names, arrs = [], []
        for member, fallback in members:
            key = member if member in weights or fallback is None or fallback not in weights else fallback
            if key not in weights:
                raise ValueError(f"missing weight {member}")
            names.append(key)
            arrs.append(np.asarray(weights[key], dtype=np.float32))
        why = _join_problem(names, [a.shape for a in arrs], shape, one="weight ", many="weights ")
        if why:
            raise ValueError(why)
        values[name] = np.concatenate(arrs, axis=0)
    return values
