"""GGUF checkpoints (llama.cpp's format) read as the Hugging Face checkpoints they were converted from.

`GGUFCheckpoint` presents a .gguf file with the interface of `weights.Checkpoint`: HF tensor names and
shapes (GGUF lists dims fastest first; here they are reversed back), read from the file's mmap.
What llama.cpp's converter (`convert_hf_to_gguf.py`) did to a tensor is undone on read:

- names: `blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`, per architecture (tables below,
  keyed by gguf's own MODEL_TENSOR names);
- LLaMA's q/k rows: the converter permutes them for ggml's interleaved RoPE; they are permuted back;
- stacked experts (Qwen3-MoE `ffn_gate_exps` [E, I, H]) are presented as the per-expert tensors HF names,
  each a slice of the stack; Gemma-4's fused expert tensors keep their own HF names;
- Gemma-4 norms need nothing (its converter adds no 1, unlike Gemma-3's) and embeddings are not scaled.

Storage types: F32, F16 and BF16 are read as safetensors' are; Q8_0 and Q4_0 keep their blocks (`raw`
gives the bytes, rows of blocks, and the device keeps them quantized, see quant.from_blocks); every
other type gguf can dequantize (Q4_K, Q6_K, Q5_0, ...) is widened to float32 when read and presented as
F32, so for those `TensorInfo.end - begin` is the widened size (what `raw` returns and the device holds),
not their extent in the file.

`config_from_gguf` rebuilds the config.json dict from the file's metadata, and `tokenizer` gives a
text tokenizer: tokenizer.json beside the file if there is one, else one built from the GGUF vocabulary.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

import numpy as np

from meganeura.models.hf import ConfigError

from .quant import GGUF_BLOCKS
from .weights import STORAGE, Checkpoint, CheckpointError, TensorInfo, to_f32

SLIDING, FULL = "sliding_attention", "full_attention"
KEPT = ("F32", "F16", "BF16", "F64", *GGUF_BLOCKS)       # GGML types read as they are stored


def _first_line(e: Exception) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


# ---------------------------------------------------------------- the file

@functools.lru_cache(maxsize=4)
def _reader(path: str, stamp: tuple[int, int]):
    from gguf import GGUFReader

    try:
        r = GGUFReader(path)
    except Exception as e:   # a corrupt file fails anywhere in the parser (struct, numpy, unicode errors)
        raise CheckpointError(f"{path} is not a readable GGUF file, truncated or corrupt ({_first_line(e)})") from None
    if r.byte_order != "I":
        raise CheckpointError(f"{path} is a big-endian GGUF file; only little-endian files are read")
    return r


def reader(path):
    """The parsed file (metadata and tensor table; tensor data stays in the mmap), cached per version."""
    path = os.path.realpath(os.fspath(path))
    try:
        st = os.stat(path)
    except OSError:
        raise CheckpointError(f"no such GGUF file: {path}") from None
    return _reader(path, (st.st_size, st.st_mtime_ns))


def field(r, key: str):
    """A metadata value (scalars as Python values, arrays as lists), or None when absent."""
    f = r.get_field(key)
    return None if f is None else f.contents()


# ---------------------------------------------------------------- tensor names per architecture

def _names() -> dict[str, dict[str, str]]:
    """arch -> {GGUF name template -> HF name template}; `{bid}` is the layer, `{e}` an expert of a stack."""
    from gguf import MODEL_TENSOR as T, TENSOR_NAMES

    layer = "model.layers.{bid}."

    def table(hf: dict, suffixes=(".weight", ".bias")) -> dict[str, str]:
        return {TENSOR_NAMES[t] + s: name + s for t, name in hf.items() for s in suffixes}

    llama = table({
        T.TOKEN_EMBD: "model.embed_tokens", T.OUTPUT_NORM: "model.norm", T.OUTPUT: "lm_head",
        T.ATTN_NORM: layer + "input_layernorm", T.ATTN_Q: layer + "self_attn.q_proj",
        T.ATTN_K: layer + "self_attn.k_proj", T.ATTN_V: layer + "self_attn.v_proj",
        T.ATTN_OUT: layer + "self_attn.o_proj", T.FFN_NORM: layer + "post_attention_layernorm",
        T.FFN_GATE: layer + "mlp.gate_proj", T.FFN_UP: layer + "mlp.up_proj", T.FFN_DOWN: layer + "mlp.down_proj"})
    qwen3 = {**llama, **table({T.ATTN_Q_NORM: layer + "self_attn.q_norm", T.ATTN_K_NORM: layer + "self_attn.k_norm"})}
    qwen3moe = {**qwen3, **table({
        T.FFN_GATE_INP: layer + "mlp.gate", T.FFN_GATE_EXP: layer + "mlp.experts.{e}.gate_proj",
        T.FFN_UP_EXP: layer + "mlp.experts.{e}.up_proj", T.FFN_DOWN_EXP: layer + "mlp.experts.{e}.down_proj"})}
    gemma4 = table({
        T.TOKEN_EMBD: "model.embed_tokens", T.OUTPUT_NORM: "model.norm", T.OUTPUT: "lm_head",
        T.ATTN_NORM: layer + "input_layernorm", T.ATTN_Q: layer + "self_attn.q_proj",
        T.ATTN_K: layer + "self_attn.k_proj", T.ATTN_V: layer + "self_attn.v_proj",
        T.ATTN_OUT: layer + "self_attn.o_proj", T.ATTN_Q_NORM: layer + "self_attn.q_norm",
        T.ATTN_K_NORM: layer + "self_attn.k_norm", T.ATTN_POST_NORM: layer + "post_attention_layernorm",
        T.FFN_PRE_NORM: layer + "pre_feedforward_layernorm", T.FFN_POST_NORM: layer + "post_feedforward_layernorm",
        T.FFN_GATE: layer + "mlp.gate_proj", T.FFN_UP: layer + "mlp.up_proj", T.FFN_DOWN: layer + "mlp.down_proj",
        T.FFN_PRE_NORM_2: layer + "pre_feedforward_layernorm_2",
        T.FFN_POST_NORM_1: layer + "post_feedforward_layernorm_1",
        T.FFN_POST_NORM_2: layer + "post_feedforward_layernorm_2", T.FFN_GATE_INP: layer + "router.proj",
        T.PER_LAYER_TOKEN_EMBD: "model.embed_tokens_per_layer",
        T.PER_LAYER_MODEL_PROJ: "model.per_layer_model_projection",
        T.PER_LAYER_PROJ_NORM: "model.per_layer_projection_norm",
        T.PER_LAYER_INP_GATE: layer + "per_layer_input_gate", T.PER_LAYER_PROJ: layer + "per_layer_projection",
        T.PER_LAYER_POST_NORM: layer + "post_per_layer_input_norm"})
    # HF names without a .weight suffix, and the router's vectors the converter files under other tensors
    gemma4.update({
        TENSOR_NAMES[T.FFN_GATE_UP_EXP] + ".weight": layer + "experts.gate_up_proj",
        TENSOR_NAMES[T.FFN_DOWN_EXP] + ".weight": layer + "experts.down_proj",
        TENSOR_NAMES[T.LAYER_OUT_SCALE] + ".weight": layer + "layer_scalar",
        TENSOR_NAMES[T.FFN_GATE_INP] + ".scale": layer + "router.scale",
        TENSOR_NAMES[T.FFN_DOWN_EXP] + ".scale": layer + "router.per_expert_scale"})
    return {"llama": llama, "qwen2": llama, "qwen3": qwen3, "qwen3moe": qwen3moe, "gemma4": gemma4}


ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe", "gemma4")
_LAYER = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class _Source:
    """Where an HF tensor lives in the file: a GGUF tensor, one expert of a stack, rows to un-permute."""
    tensor: object                 # gguf ReaderTensor
    expert: int | None = None
    heads: int | None = None       # LLaMA q/k: the converter's row permutation over this many heads


def _ggml_type(tensor) -> str:
    return tensor.tensor_type.name


@functools.lru_cache(maxsize=None)
def _widenable(type_name: str) -> bool:
    """Whether gguf's numpy code can dequantize this GGML type (it raises for the ones it cannot)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[type_name]
    try:
        quants.dequantize(np.zeros(GGML_QUANT_SIZES[qtype][1], np.uint8), qtype)
    except (NotImplementedError, ValueError, TypeError):
        return False
    return True


def _unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's LlamaModel.permute (reshape(h, 2, r/h/2, ...).swapaxes(1, 2)) along axis 0."""
    shape = rows.shape
    return rows.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


class GGUFCheckpoint(Checkpoint):
    """A .gguf file's tensors under their HF names and shapes, memory-mapped (see the module docstring)."""

    def __init__(self, path):
        path = os.fspath(path)
        r = reader(path)
        arch = _arch(r, path)
        names = _names()[arch]
        heads = _llama_heads(r, arch)
        self.path = path
        self.arch = arch
        self.tensors: dict[str, TensorInfo] = {}
        self._src: dict[str, _Source] = {}
        for t in r.tensors:
            m = _LAYER.match(t.name)
            template = _LAYER.sub("blk.{bid}.", t.name, count=1) if m else t.name
            if template not in names:
                continue                 # rope_freqs (read by config_from_gguf), vision/audio towers, ...
            hf = names[template].replace("{bid}", m.group(1)) if m else names[template]
            kind = _ggml_type(t)
            if kind not in KEPT and not _widenable(kind):
                raise CheckpointError(f"{path}: tensor {t.name} has GGML type {kind}, which cannot be read")
            tag = kind if kind in KEPT else "F32"
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            experts = shape[0] if "{e}" in hf else None
            per_head = heads.get(template) if heads else None
            if per_head and shape[0] % (2 * per_head):
                raise CheckpointError(f"{path}: {t.name} has {shape[0]} rows, not pairs for {per_head} heads")
            for e in range(experts) if experts else [None]:
                one = shape[1:] if e is not None else shape
                size = (t.n_bytes // experts if e is not None else t.n_bytes) if tag == kind \
                    else 4 * int(np.prod(one, dtype=np.int64))
                begin = t.data_offset + (0 if e is None else e * size)
                name = hf.replace("{e}", str(e)) if e is not None else hf
                self.tensors[name] = TensorInfo(path, tag, one, begin, begin + size)
                self._src[name] = _Source(t, e, per_head)

    def raw(self, name: str) -> np.ndarray:
        """F32/F16/F64 as their arrays, BF16 as its uint16 bits, Q8_0/Q4_0 as uint8 block rows [..., row
        bytes]; widened types as float32. All in HF shape (q/k rows of LLaMA un-permuted: then a copy)."""
        src, info = self._src[name], self.tensors[name]
        data = src.tensor.data
        if src.expert is not None:
            data = data[src.expert]
        kind = _ggml_type(src.tensor)
        if info.dtype == "BF16":
            data = data.view(np.uint16)
        elif kind != info.dtype:
            from gguf import GGMLQuantizationType, quants
            data = quants.dequantize(data, GGMLQuantizationType[kind]).astype(np.float32, copy=False)
        elif info.dtype in STORAGE:
            data = data.view(STORAGE[info.dtype])
        if info.dtype not in GGUF_BLOCKS:
            data = data.reshape(info.shape)
        return _unpermute(data, src.heads) if src.heads else data

    def f32(self, name: str) -> np.ndarray:
        tag = self.tensors[name].dtype
        if tag in GGUF_BLOCKS:
            from gguf import GGMLQuantizationType, quants
            return quants.dequantize(self.raw(name), GGMLQuantizationType[tag]).reshape(self.tensors[name].shape)
        return to_f32(self.raw(name), tag)


def _arch(r, path) -> str:
    arch = field(r, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    return arch


def _llama_heads(r, arch: str) -> dict[str, int]:
    """LLaMA's permuted q/k tensors -> the head count the converter permuted them over."""
    if arch != "llama":
        return {}
    heads = field(r, "llama.attention.head_count")
    kv = field(r, "llama.attention.head_count_kv")
    kv = heads if kv is None else kv
    if not isinstance(heads, int) or not isinstance(kv, int):
        raise ConfigError("llama.attention.head_count and head_count_kv must be single numbers")
    return {"blk.{bid}.attn_q.weight": heads, "blk.{bid}.attn_q.bias": heads,
            "blk.{bid}.attn_k.weight": kv, "blk.{bid}.attn_k.bias": kv}


# ---------------------------------------------------------------- config.json from the metadata

class _Meta:
    """The file's `{arch}.*` keys with clear errors for missing or malformed ones."""

    def __init__(self, path: str):
        self.path = path
        r = self.reader = reader(path)
        self.arch = _arch(r, path)
        self.tensors = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in r.tensors}
        self.rope_freqs = next((t for t in r.tensors if t.name == "rope_freqs.weight"), None)

    def get(self, key: str, default=None):
        value = field(self.reader, key.replace("{arch}", self.arch))
        return default if value is None else value

    def need(self, key: str):
        value = self.get(key)
        if value is None:
            raise ConfigError(f"{self.path} lacks the metadata key {key.replace('{arch}', self.arch)}")
        return value

    def per_layer(self, key: str, layers: int, default=None) -> list:
        """A key that is one number for every layer or an array of one per layer."""
        value = self.get(key, default)
        if value is None:
            value = self.need(key)
        if isinstance(value, list):
            if len(value) != layers:
                raise ConfigError(f"{self.path}: {key.replace('{arch}', self.arch)} has {len(value)} entries "
                                  f"for {layers} layers")
            return value
        return [value] * layers

    def uniform(self, key: str, layers: int, default=None):
        values = set(self.per_layer(key, layers, default))
        if len(values) != 1:
            raise ConfigError(f"{self.path}: {key.replace('{arch}', self.arch)} differs between layers, "
                              f"which {self.arch} does not support")
        return values.pop()

    def has(self, name: str) -> bool:
        return name in self.tensors


def _decimal(value) -> float:
    """A float32 key as the shortest decimal that rounds to it: what config.json held (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))


def config_from_gguf(path) -> dict:
    """The HF config.json dict of the model in a .gguf file (model_type, sizes, RoPE, norms, tying, MoE,
    sliding windows, BOS/EOS ids), from its metadata and which tensors it holds."""
    m = _Meta(os.fspath(path))
    if not m.has("token_embd.weight"):
        raise ConfigError(f"{m.path} holds no token_embd.weight")
    layers = int(m.need("{arch}.block_count"))
    cfg = {"vocab_size": m.tensors["token_embd.weight"][0],
           "hidden_size": int(m.need("{arch}.embedding_length")),
           "num_hidden_layers": layers,
           "num_attention_heads": int(m.uniform("{arch}.attention.head_count", layers)),
           "rms_norm_eps": _decimal(m.need("{arch}.attention.layer_norm_rms_epsilon")),
           "tie_word_embeddings": not m.has("output.weight")}
    if m.get("{arch}.context_length") is not None:
        cfg["max_position_embeddings"] = int(m.get("{arch}.context_length"))
    cfg.update(_special_ids(m.reader))
    if m.arch == "gemma4":
        cfg.update(_gemma4(m, layers))
        return cfg
    cfg["model_type"] = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe"}[m.arch]
    cfg["num_key_value_heads"] = int(m.uniform("{arch}.attention.head_count_kv", layers,
                                               cfg["num_attention_heads"]))
    cfg["head_dim"] = int(m.get("{arch}.attention.key_length", cfg["hidden_size"] // cfg["num_attention_heads"]))
    if m.get("{arch}.feed_forward_length") is not None:
        cfg["intermediate_size"] = int(m.uniform("{arch}.feed_forward_length", layers))
    rope = _rope_scaling(m)
    cfg["rope_theta"] = _decimal(m.get("{arch}.rope.freq_base", 10000.0))
    if rope:
        cfg["rope_scaling"] = rope
    if m.arch == "llama":
        cfg["attention_bias"] = m.has("blk.0.attn_q.bias") or m.has("blk.0.attn_output.bias")
        cfg["mlp_bias"] = m.has("blk.0.ffn_gate.bias")
    elif m.arch in ("qwen3", "qwen3moe"):
        cfg["attention_bias"] = m.has("blk.0.attn_q.bias")
    if m.arch == "qwen3moe":
        cfg.update(num_experts=int(m.need("{arch}.expert_count")),
                   num_experts_per_tok=int(m.need("{arch}.expert_used_count")),
                   moe_intermediate_size=int(m.need("{arch}.expert_feed_forward_length")),
                   # llama.cpp's qwen3moe graph always renormalises the chosen experts' weights
                   norm_topk_prob=bool(m.get("{arch}.expert_weights_norm", True)),
                   decoder_sparse_step=1,
                   mlp_only_layers=[i for i in range(layers) if not m.has(f"blk.{i}.ffn_gate_inp.weight")])
    return cfg


def _special_ids(r) -> dict:
    """bos_token_id, and eos_token_id: every id llama.cpp ends generation on (EOS, EOT, EOM)."""
    out = {}
    if field(r, "tokenizer.ggml.bos_token_id") is not None:
        out["bos_token_id"] = int(field(r, "tokenizer.ggml.bos_token_id"))
    eos = [int(field(r, f"tokenizer.ggml.{k}_token_id")) for k in ("eos", "eot", "eom")
           if field(r, f"tokenizer.ggml.{k}_token_id") is not None]
    if eos:
        out["eos_token_id"] = list(dict.fromkeys(eos))
    return out


def _rope_factors(m: _Meta) -> list[float] | None:
    if m.rope_freqs is None:
        return None
    return [float(x) for x in np.asarray(m.rope_freqs.data, dtype=np.float32).reshape(-1)]


def _rope_scaling(m: _Meta) -> dict | None:
    """HF rope_scaling of a LLaMA/Qwen file: linear or YaRN from the rope.scaling.* keys, and llama.cpp's
    rope_freqs tensor (LLaMA-3's frequency-dependent scaling, written as one divisor per frequency)."""
    kind = m.get("{arch}.rope.scaling.type", "none")
    factors = _rope_factors(m)
    if m.get("{arch}.rope.scaling.attn_factor") not in (None, 1.0):
        raise ConfigError(f"{m.path}: rope.scaling.attn_factor is not supported")
    if kind in ("none", None) or (kind == "linear" and _decimal(m.get("{arch}.rope.scaling.factor", 1.0)) == 1.0):
        return {"rope_type": "default", "freq_factors": factors} if factors else None
    if factors:
        raise ConfigError(f"{m.path}: rope_freqs together with rope scaling {kind!r} is not supported")
    factor = _decimal(m.need("{arch}.rope.scaling.factor"))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        out = {"rope_type": "yarn", "factor": factor,
               "original_max_position_embeddings": int(m.need("{arch}.rope.scaling.original_context_length"))}
        for key, hf in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if m.get("{arch}.rope.scaling." + key) is not None:
                out[hf] = _decimal(m.get("{arch}.rope.scaling." + key))
        return out
    raise ConfigError(f"{m.path}: unsupported rope scaling type {kind!r} (supported: linear, yarn)")


def _gemma4(m: _Meta, layers: int) -> dict:
    """Gemma-4's text config: per-layer sliding/full attention, each with its head_dim and KV heads."""
    pattern = m.get("{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        sliding = [bool(p) for p in pattern]
    elif isinstance(pattern, int) and pattern > 0:      # llama.cpp's period form: n-1 sliding layers, then full
        sliding = [i % pattern < pattern - 1 for i in range(layers)]
    else:
        raise ConfigError(f"{m.path} lacks gemma4.attention.sliding_window_pattern")
    if len(sliding) != layers:
        raise ConfigError(f"{m.path}: sliding_window_pattern has {len(sliding)} entries for {layers} layers")
    full_dim = int(m.need("{arch}.attention.key_length"))
    swa_dim = int(m.get("{arch}.attention.key_length_swa", full_dim))
    kv = m.per_layer("{arch}.attention.head_count_kv", layers)
    ff = [int(x) for x in m.per_layer("{arch}.feed_forward_length", layers)]
    shared = int(m.get("{arch}.attention.shared_kv_layers", 0))
    first_shared = layers - shared
    if any(f != ff[0] for f in ff[:first_shared]) or any(f not in (ff[0], 2 * ff[0]) for f in ff[first_shared:]):
        raise ConfigError(f"{m.path}: gemma4.feed_forward_length {ff} is not one width (doubled on KV-shared layers)")
    if int(m.get("{arch}.rope.dimension_count_swa", swa_dim)) != swa_dim:
        raise ConfigError(f"{m.path}: partial RoPE on sliding layers is not supported")
    full = [i for i in range(first_shared) if not sliding[i]]
    swa_kv = int(next((kv[i] for i in range(layers) if sliding[i]), kv[0]))
    cfg = {
        "model_type": "gemma4_text",
        "intermediate_size": ff[0],
        "use_double_wide_mlp": any(f == 2 * ff[0] for f in ff[first_shared:]),
        "num_key_value_heads": swa_kv,
        "head_dim": swa_dim,
        "global_head_dim": full_dim,
        "layer_types": [SLIDING if s else FULL for s in sliding],
        # the layers whose geometry differs from the sliding layers' (as HF's config lists them)
        "per_layer_config": {str(i): {"head_dim": swa_dim if sliding[i] else full_dim,
                                      "num_key_value_heads": int(kv[i])} for i in range(layers)
                             if (swa_dim if sliding[i] else full_dim, int(kv[i])) != (swa_dim, swa_kv)},
        # full layers whose K doubles as V have no v projection
        "attention_k_eq_v": bool(full) and all(not m.has(f"blk.{i}.attn_v.weight") for i in full),
        "sliding_window": int(m.get("{arch}.attention.sliding_window", 512)),
        "final_logit_softcapping": _decimal(m.get("{arch}.final_logit_softcapping", 0.0)) or None,
        "attention_bias": m.has("blk.0.attn_q.bias"),
        "hidden_size_per_layer_input": int(m.get("{arch}.embedding_length_per_layer_input", 0)),
        "num_kv_shared_layers": shared,
        "rope_parameters": {
            SLIDING: {"rope_type": "default", "rope_theta": _decimal(m.get("{arch}.rope.freq_base_swa", 10000.0))},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": _partial_rotary(m, full_dim),
                   "rope_theta": _decimal(m.get("{arch}.rope.freq_base", 1000000.0))}},
    }
    if m.has("per_layer_token_embd.weight"):
        cfg["vocab_size_per_layer_input"] = m.tensors["per_layer_token_embd.weight"][0]
    experts = int(m.get("{arch}.expert_count", 0))
    if experts:
        cfg.update(enable_moe_block=True, num_experts=experts, top_k_experts=int(m.need("{arch}.expert_used_count")),
                   moe_intermediate_size=int(m.need("{arch}.expert_feed_forward_length")))
    return cfg


def _partial_rotary(m: _Meta, head_dim: int) -> float:
    """Full layers rotate the first pairs only; llama.cpp marks the rest with a frequency divisor of 1e30."""
    factors = _rope_factors(m)
    if factors is None:
        return int(m.get("{arch}.rope.dimension_count", head_dim)) / head_dim
    rotated = sum(1 for f in factors if f == 1.0)
    if len(factors) != head_dim // 2 or any(f != 1.0 for f in factors[:rotated]) \
            or any(f < 1e20 for f in factors[rotated:]):
        raise ConfigError(f"{m.path}: rope_freqs is not a proportional RoPE of the full layers")
    return 2 * rotated / head_dim


# ---------------------------------------------------------------- the tokenizer

# BPE pre-tokenizer regexes by tokenizer.ggml.pre, as the HF tokenizer.json of those models splits text
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_PRE = {"gpt-2": None, "llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
CONTROL, USER_DEFINED = 3, 4                  # gguf TokenType values of added tokens


def tokenizer(path):
    """The text tokenizer of a .gguf model: tokenizer.json beside the file when there is one (with its
    tokenizer_config.json, as for a checkpoint directory), else one built from the GGUF vocabulary:
    byte-level BPE ("gpt2": the GPT-2, LLaMA-3 and Qwen2 pre-tokenizers) or SentencePiece-style BPE
    ("llama": merges from the file, else from the piece scores, with byte fallback)."""
    from .tokenizer import Tokenizer, TokenizerError

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return Tokenizer.from_dir(folder)
    r = reader(path)
    kind = field(r, "tokenizer.ggml.model")
    tokens = field(r, "tokenizer.ggml.tokens")
    if not tokens:
        raise TokenizerError(f"no tokenizer.json next to {path}, and the file holds no vocabulary")
    if kind not in ("gpt2", "llama"):
        raise TokenizerError(f"no tokenizer.json next to {path}, and its {kind} vocabulary cannot be turned "
                             "into one (supported: gpt2, llama)")
    types = field(r, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = field(r, "tokenizer.ggml.merges")
    bos, eos = (field(r, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos"))
    if kind == "gpt2":
        pre = field(r, "tokenizer.ggml.pre")
        if pre not in BPE_PRE:
            raise TokenizerError(f"no tokenizer.json next to {path}, and its BPE pre-tokenizer {pre!r} is not one "
                                 f"this loader knows ({', '.join(BPE_PRE)})")
        backend = _byte_level(tokens, merges or [], pre)
        add_bos = bool(field(r, "tokenizer.ggml.add_bos_token"))
    else:
        scores = field(r, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = field(r, "tokenizer.ggml.unknown_token_id")
        prefix = field(r, "tokenizer.ggml.add_space_prefix")
        backend = _sentencepiece(tokens, scores, types, merges, unk, True if prefix is None else bool(prefix))
        add_bos = field(r, "tokenizer.ggml.add_bos_token") is not False
    added = [(t, ty) for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)]
    _add_tokens(backend, added)
    _post_process(backend, tokens, bos if add_bos else None,
                  eos if field(r, "tokenizer.ggml.add_eos_token") else None)
    specials = {name: tokens[i] for name, i in (("bos_token", bos), ("eos_token", eos)) if i is not None}
    return Tokenizer(backend, specials=specials, chat_template=field(r, "tokenizer.chat_template"),
                     bos_id=bos, eos_ids=_special_ids(r).get("eos_token_id", []), name=path)


def _byte_level(tokens: list[str], merges: list[str], pre: str):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    # LLaMA-3's tokenizer takes a whole word that is in the vocabulary before any merge (as llama.cpp does)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre == "llama-bpe"))
    split = BPE_PRE[pre]
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "qwen2":
        backend.normalizer = normalizers.NFC()
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece(tokens, scores, types, merges, unk, prefix: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        pairs = _merges_from_scores(tokens, scores, types, vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=None if unk is None else tokens[unk],
                                   byte_fallback=True, fuse_unk=True))
    # spaces become "▁"; with add_space_prefix the text's start gets one too (not each piece between tokens)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                     split=False)
    strip = [decoders.Strip(content=" ", left=1)] if prefix else []
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + strip)
    return backend


def _merges_from_scores(tokens, scores, types, vocab) -> list[tuple[str, str]]:
    """SentencePiece BPE merges the adjacent pair whose joined piece scores highest: every split of a normal
    piece into two pieces is a merge, ranked by the joined piece's score (as transformers converts them)."""
    found = []
    for piece, score, kind in zip(tokens, scores, types):
        if kind != 1:
            continue
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        found += [(score, p) for p in local]
    found.sort(key=lambda x: -x[0])          # stable: ties keep vocabulary order
    return [p for _, p in found]


def _add_tokens(backend, added) -> None:
    """Control tokens as special added tokens, user-defined ones as plain added tokens (their own ids)."""
    from tokenizers import AddedToken

    for text, kind in added:
        token = AddedToken(text, special=kind == CONTROL, normalized=False)
        (backend.add_special_tokens if kind == CONTROL else backend.add_tokens)([token])


def _post_process(backend, tokens, bos: int | None, eos: int | None) -> None:
    from tokenizers import processors

    if bos is None and eos is None:
        return
    single = " ".join(["$A"] if bos is None else [tokens[bos], "$A"]) + ("" if eos is None else f" {tokens[eos]}")
    specials = [(tokens[i], i) for i in dict.fromkeys(x for x in (bos, eos) if x is not None)]
    backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
