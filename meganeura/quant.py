"""Weight-only quantization: the formats, which parameters take them, and their bytes.

A quantized matrix `[rows, K]` is stored as two planes, one after the other in one device buffer:
  - quants: signed 8-bit values (q8), or 4-bit values `q + 8` packed two to a byte, element 2m in the low
    nibble of byte m (q4), so one 32-bit word holds 8 consecutive elements;
  - scales: one f16 per group of `group` consecutive elements of a row (the whole row for q8).
An element is `q * scale`. Kernels read the planes directly (`kernels.declare`), never a widened copy.

The rounding is llama.cpp's (Q8_0: round(x / d) with d = absmax / 127; Q4_0: d = -signed_max / 8 and
q = trunc(x / d + 8.5) clipped to 0..15), so q8_0 and q4 are bit for bit GGUF's Q8_0 and Q4_0 blocks,
only laid out as two planes with the nibbles in element order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MODES = ("q8", "q4")      # what `--quantize` offers; `quantize=` takes q8_0 and q4_0 too (GGUF's pure block types)


@dataclass(frozen=True)
class Format:
    name: str
    bits: int                        # 8 or 4
    group: int | None                # elements per scale along a row; None: the whole row

    def group_of(self, k: int) -> int:
        return k if self.group is None else self.group

    def fits(self, shape) -> bool:
        """Whether a [..., K] tensor can take this format (whole groups per row, whole 32-bit words)."""
        if len(shape) < 2:
            return False
        k = shape[-1]
        return k % self.group_of(k) == 0 and k % 8 == 0

    def quant_bytes(self, shape) -> int:
        return math.prod(shape) * self.bits // 8

    def scales_at(self, shape) -> int:
        """The word offset of the scale plane in the device buffer (the quant plane padded to a word)."""
        return -(-self.quant_bytes(shape) // 4)

    def nbytes(self, shape) -> int:
        """Bytes the tensor takes on the device: both planes, each padded to a word."""
        scales = math.prod(shape) // self.group_of(shape[-1])
        return 4 * self.scales_at(shape) + 4 * -(-scales // 2)

    def quantize(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(quants as uint8 [rows, K * bits / 8], scales f16 [rows, K / group]) of float32 `a` [..., K]."""
        k = a.shape[-1]
        g = self.group_of(k)
        blocks = np.ascontiguousarray(a, dtype=np.float32).reshape(-1, g)
        if self.bits == 8:
            d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
            with np.errstate(divide="ignore"):
                inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            x = np.abs(blocks * inv)          # rounded half away from zero, as ggml's roundf
            whole = np.floor(x)
            q = (np.sign(blocks) * (whole + np.floor(2 * (x - whole)))).astype(np.int8).view(np.uint8)
        else:
            at = np.abs(blocks).argmax(axis=1)[:, None]
            d = np.take_along_axis(blocks, at, axis=1) / np.float32(-8)
            with np.errstate(divide="ignore"):
                inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            q = np.trunc(blocks * inv + np.float32(8.5)).astype(np.uint8).clip(0, 15)
            q = q[:, 0::2] | (q[:, 1::2] << np.uint8(4))
        rows = math.prod(a.shape[:-1])
        return q.reshape(rows, -1), d.astype(np.float16).reshape(rows, -1)

    def dequantize(self, quants: np.ndarray, scales: np.ndarray, shape) -> np.ndarray:
        k = shape[-1]
        if self.bits == 8:
            q = quants.reshape(-1).view(np.int8).astype(np.float32)
        else:
            b = quants.reshape(-1)
            q = np.stack([b & 15, b >> 4], axis=1).reshape(-1).astype(np.float32) - 8
        d = np.repeat(scales.reshape(-1).astype(np.float32), self.group_of(k))
        return (q * d).reshape(shape)

    def roundtrip(self, a: np.ndarray) -> np.ndarray:
        """What the device computes with: `a` quantized and widened back (float32)."""
        return self.dequantize(*self.quantize(a), a.shape)

    def device_bytes(self, quants: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """The device buffer's contents: the quant plane, padded to a word, then the scale plane."""
        q = quants.reshape(-1).view(np.uint8)
        s = scales.reshape(-1).astype(np.float16).view(np.uint8)
        return np.concatenate([q, np.zeros(-q.size % 4, np.uint8), s, np.zeros(-s.size % 4, np.uint8)])


FORMATS = {"q8": Format("q8", 8, None), "q4": Format("q4", 4, 32), "q8_0": Format("q8_0", 8, 32),
           "q4_0": Format("q4", 4, 32)}
# GGUF block types kept as they are (as two planes): tag -> (format, bytes per block of 32)
GGUF_BLOCKS = {"Q8_0": (FORMATS["q8_0"], 34), "Q4_0": (FORMATS["q4_0"], 18)}


def from_blocks(raw: np.ndarray, tag: str, shape) -> tuple[np.ndarray, np.ndarray]:
    """(quants, scales) planes of GGUF blocks (`raw`: the tensor's bytes, rows of blocks of 32 elements)."""
    fmt, size = GGUF_BLOCKS[tag]
    blocks = np.ascontiguousarray(raw).reshape(-1).view(np.uint8).reshape(-1, size)
    rows = math.prod(shape[:-1])
    scales = blocks[:, :2].copy().view(np.float16).reshape(rows, -1)
    body = blocks[:, 2:]
    if fmt.bits == 8:
        return body.reshape(rows, -1), scales
    # Q4_0 holds elements 0..15 of a block in the low nibbles of its 16 bytes and 16..31 in the high ones.
    q = np.concatenate([body & 15, body >> 4], axis=1)
    return (q[:, 0::2] | (q[:, 1::2] << np.uint8(4))).reshape(rows, -1), scales


def check_mode(mode: str | None) -> str | None:
    if mode is not None and mode not in FORMATS:
        raise ValueError(f"quantize must be one of {', '.join(MODES)} (or GGUF's q8_0, q4_0), got {mode!r}")
    return mode


# How each op reads a weight input: (op, input index) pairs whose weight is a [rows, K] matrix read along K.
MATRIX_INPUTS = {("linear", 1), ("matmul", 1), ("moe", 2), ("moe", 3), ("embedding", 0)}
TABLE_FORMAT = "q8"        # embeddings and the LM head under q8 and q4: one scale per row (see README)
# Under q4 the attention's input projections take q8 too: their rounding error reaches the scores, which the
# softmax exponentiates (on the tiny test models it costs q4 0.01 of logit cosine; llama.cpp's q4 mixes
# likewise keep attn_v wider). Matched by name: every family names them so, packed or not.
ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj")


def routers(graph) -> set[int]:
    """MoE router weights: the matrices whose products pick experts (through softmax) in a topk_route.
    They stay as stored, as llama.cpp keeps them: a rounding error there flips a token's experts."""
    out, todo = set(), [n.inputs[0] for n in graph.nodes if n.op == "topk_route"]
    while todo:
        node = graph[todo.pop()]
        if node.op in ("softmax", "scale", "reshape"):
            todo.append(node.inputs[0])
        elif node.op in ("linear", "matmul"):
            out.add(node.inputs[1])
    return out


def matrices(graph) -> dict[str, bool]:
    """Parameters whose every reader streams them along their rows (linear, matmul with transpose_b, expert
    weights, embedding tables), routers excepted: the ones a quantized format can serve. Name -> whether it
    is a table (an embedding, or the LM head)."""
    readers: dict[int, set[str]] = {j: {"other"} for j in routers(graph)}
    for node in graph.nodes:
        for pos, j in enumerate(node.inputs):
            if graph[j].op == "parameter":
                ok = (node.op, pos) in MATRIX_INPUTS and (node.op != "matmul" or node.attrs["transpose_b"])
                readers.setdefault(j, set()).add(node.op if ok else "other")
    return {graph[j].attrs["name"]: "embedding" in ops or graph[j].attrs["name"] == "lm_head.weight"
            for j, ops in readers.items() if "other" not in ops and len(graph[j].shape) >= 2}


def plan(graph, mode: str | None) -> dict[str, Format]:
    """The format `mode` gives each matrix (see `matrices`) that fits it. Under q8 and q4 the tables take
    q8 (per row), and under q4 the attention's q/k/v projections too; under q8_0 and q4_0 (GGUF's blocks)
    every matrix takes the mode's format."""
    if check_mode(mode) is None:
        return {}
    shapes = {n.attrs["name"]: n.shape for n in graph.nodes if n.op == "parameter"}
    out = {}
    for name, table in matrices(graph).items():
        wider = table or (mode == "q4" and any(p in name for p in ATTENTION_INPUTS))
        fmt = FORMATS[TABLE_FORMAT if wider and mode in MODES else mode]
        if fmt.fits(shapes[name]):
            out[name] = fmt
    return out


def stored_format(tags: list[str], planned: Format | None, matrix: bool, shape) -> Format | None:
    """How a parameter made of checkpoint tensors with dtype `tags` is kept on the device. Tensors already
    quantized (GGUF Q8_0/Q4_0) keep their blocks when all parts share one type; mixed parts are requantized
    as q8_0. A parameter not read as a matrix is widened instead; float tensors take `planned`."""
    blocks = {t for t in tags if t in GGUF_BLOCKS}
    if not blocks or not matrix:
        return planned
    fmt = GGUF_BLOCKS[tags[0]][0] if len(set(tags)) == 1 else FORMATS["q8_0"]
    return fmt if fmt.fits(shape) else None
