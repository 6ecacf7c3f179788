"""GGUF files written from a safetensors checkpoint the way llama.cpp's convert_hf_to_gguf.py writes them.

Independently of meganeura's reader: tensor names come from gguf's own name map for the architecture
(`gguf.get_tensor_name_map`), LLaMA's q/k rows are permuted for ggml's RoPE, Qwen3-MoE experts are stacked,
Gemma-4's router vectors and layer scalars get the converter's names, LLaMA-3 RoPE scaling becomes a
rope_freqs tensor and Gemma-4's partial RoPE one of 1 and 1e30, and the metadata keys are the converter's.
Types follow the converter too: vectors, biases and MoE routers stay F32; matrices take the file's type,
F16 where a row does not fill whole blocks of 32. `vocab` adds a tokenizer.json's vocabulary as
`_set_vocab_gpt2` / `_set_vocab_sentencepiece` would.
"""
from __future__ import annotations

import json
import math
import os

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q, MODEL_ARCH as A

ARCHS = {"llama": A.LLAMA, "mistral": A.LLAMA, "qwen2": A.QWEN2, "qwen3": A.QWEN3, "qwen3_moe": A.QWEN3MOE,
         "gemma4_text": A.GEMMA4, "gemma4_unified_text": A.GEMMA4}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(rope: dict, dim: int) -> np.ndarray:
    """LlamaModel.generate_extra_tensors: LLaMA-3's scaling as one divisor per frequency."""
    base = rope["rope_theta"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, lo, hi = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(path, checkpoint, qtype: str = "F16", blocks: dict | None = None, vocab: dict | None = None) -> None:
    """A .gguf of the safetensors checkpoint directory `checkpoint` with matrices in `qtype` (F32, F16, BF16,
    Q8_0, Q4_0, Q5_0). `blocks`: GGUF name -> (data, GGML type) stored as given instead."""
    from safetensors.torch import load_file

    top = json.load(open(os.path.join(checkpoint, "config.json")))
    h = {**top, **(top.get("text_config") or {})}
    arch = ARCHS[h["model_type"]]
    n = h["num_hidden_layers"]
    names = gguf.get_tensor_name_map(arch, n)
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    state = {k: v.float().numpy() for k, v in load_file(os.path.join(checkpoint, "model.safetensors")).items()}
    w.add_block_count(n)
    w.add_context_length(h["max_position_embeddings"])
    w.add_embedding_length(h["hidden_size"])
    w.add_head_count(h["num_attention_heads"])
    w.add_layer_norm_rms_eps(h["rms_norm_eps"])
    rope = h.get("rope_parameters") or h.get("rope_scaling") or {}
    if arch == A.GEMMA4:
        tensors = _gemma4(w, h, rope, state, names, n)
    else:
        tensors = _llama_qwen(w, h, rope, state, names, h["model_type"])
    if h.get("bos_token_id") is not None:
        w.add_bos_token_id(h["bos_token_id"])
    eos = h.get("eos_token_id")
    if eos is not None:
        w.add_eos_token_id(eos if isinstance(eos, int) else eos[0])
    if vocab:
        _vocab(w, **vocab)
    for name, value in tensors.items():
        if blocks and name in blocks:
            data, kind = blocks[name]
            w.add_tensor(name, data, raw_dtype=kind)
            continue
        kind = Q[qtype]
        if value.ndim <= 1 or not name.endswith(".weight") or ".ffn_gate_inp." in name or name == "rope_freqs.weight":
            kind = Q.F32
        elif kind not in (Q.F32, Q.F16) and value.shape[-1] % 32:
            kind = Q.F16                          # the converter's fallback for rows of partial blocks
        data = gguf.quants.quantize(np.ascontiguousarray(value, np.float32), kind)
        w.add_tensor(name, data, raw_dtype=None if kind in (Q.F32, Q.F16) else kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _llama_qwen(w, h, rope, state, names, kind) -> dict:
    w.add_feed_forward_length(h["intermediate_size"])
    w.add_head_count_kv(h["num_key_value_heads"])
    w.add_rope_freq_base(rope.get("rope_theta", h.get("rope_theta", 10000.0)))
    head_dim = h.get("head_dim") or h["hidden_size"] // h["num_attention_heads"]
    if h.get("head_dim"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if kind in ("llama", "mistral"):
        w.add_vocab_size(h["vocab_size"])
        w.add_rope_dimension_count(head_dim)
    tensors = {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif rope_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif rope_type == "llama3":
        tensors["rope_freqs.weight"] = llama3_rope_factors(rope, head_dim)
    if kind == "qwen3_moe":
        w.add_expert_count(h.get("num_experts") or h["num_local_experts"])
        w.add_expert_used_count(h["num_experts_per_tok"])
        w.add_expert_feed_forward_length(h["moe_intermediate_size"])
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for k, v in state.items():
        if kind in ("llama", "mistral"):
            if k.endswith(("q_proj.weight", "q_proj.bias")):
                v = permute(v, h["num_attention_heads"])
            if k.endswith(("k_proj.weight", "k_proj.bias")):
                v = permute(v, h["num_key_value_heads"])
        if ".mlp.experts." in k:                   # model.layers.B.mlp.experts.E.gate_proj.weight
            parts = k.split(".")
            experts.setdefault((int(parts[2]), parts[6]), {})[int(parts[5])] = v
            continue
        tensors[_mapped(names, k)] = v
    for (bid, which), per_expert in experts.items():
        stacked = np.stack([per_expert[e] for e in range(len(per_expert))])
        tensors[_mapped(names, f"model.layers.{bid}.mlp.experts.{which}.weight")] = stacked
    return tensors


def _gemma4(w, h, rope, state, names, n) -> dict:
    sliding = [t == "sliding_attention" for t in h["layer_types"]]
    per_layer = {int(k): v for k, v in (h.get("per_layer_config") or {}).items()}
    kv = [per_layer.get(i, {}).get("num_key_value_heads", h["num_key_value_heads"]) for i in range(n)]
    full_dim = next(per_layer[i]["head_dim"] for i in range(n) if not sliding[i] and i in per_layer)
    shared = h.get("num_kv_shared_layers") or 0
    ff = h["intermediate_size"]
    w.add_head_count_kv(kv if len(set(kv)) > 1 else kv[0])
    w.add_feed_forward_length([ff if i < n - shared else 2 * ff for i in range(n)]
                              if h.get("use_double_wide_mlp") else ff)
    w.add_rope_freq_base(rope["full_attention"]["rope_theta"])
    w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    if h.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(h["final_logit_softcapping"])
    w.add_sliding_window(h["sliding_window"])
    w.add_shared_kv_layers(shared)
    w.add_embedding_length_per_layer_input(h.get("hidden_size_per_layer_input") or 0)
    w.add_sliding_window_pattern(sliding)
    w.add_key_length(full_dim)
    w.add_value_length(full_dim)
    w.add_key_length_swa(h["head_dim"])
    w.add_value_length_swa(h["head_dim"])
    w.add_rope_dimension_count(full_dim)
    w.add_rope_dimension_count_swa(h["head_dim"])
    if h.get("enable_moe_block"):
        w.add_expert_count(h["num_experts"])
        w.add_expert_used_count(h["top_k_experts"])
        w.add_expert_feed_forward_length(h["moe_intermediate_size"])
    rotated = int(full_dim * rope["full_attention"]["partial_rotary_factor"] / 2)
    tensors = {"rope_freqs.weight": np.array([1.0] * rotated + [1e30] * (full_dim // 2 - rotated), np.float32)}
    for k, v in state.items():
        k = k.replace("model.language_model.", "model.")
        if k.endswith("router.scale"):
            tensors[f"blk.{k.split('.')[2]}.ffn_gate_inp.scale"] = v
        elif k.endswith("router.per_expert_scale"):
            tensors[f"blk.{k.split('.')[2]}.ffn_down_exps.scale"] = v
        else:
            if k.endswith("layer_scalar") or (".experts." in k and not k.endswith(".weight")):
                k += ".weight"                       # Gemma4Model.filter_tensors
            tensors[_mapped(names, k)] = v
    return tensors


def _mapped(names, hf_name: str) -> str:
    new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    assert new is not None, f"gguf maps no tensor to {hf_name}"
    return new


def write_vocab(path, tokenizer_json: str, model: str, bos: str | None = None, eos: str | None = None,
                **kw) -> None:
    """A .gguf holding only a tokenizer.json's vocabulary (see `_vocab`) and its BOS/EOS ids."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(tokenizer_json)
    w = gguf.GGUFWriter(str(path), "llama")
    _vocab(w, tokenizer_json, model, add_bos=bos is not None, **kw)
    for token, add in ((bos, w.add_bos_token_id), (eos, w.add_eos_token_id)):
        if token is not None:
            add(backend.token_to_id(token))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _vocab(w, tokenizer_json: str, model: str, pre: str | None = None, add_bos: bool = False,
           merges: bool = True) -> None:
    """tokenizer.ggml.* from a tokenizer.json: tokens by id, control / user-defined types for added tokens
    (byte pieces <0xXX> of SentencePiece vocabularies as BYTE), merges, scores -id (SentencePiece BPE)."""
    from tokenizers import Tokenizer

    spec = json.load(open(tokenizer_json))
    backend = Tokenizer.from_file(tokenizer_json)
    by_id = {i: t for t, i in backend.get_vocab(with_added_tokens=True).items()}
    added = {a["id"]: a for a in spec["added_tokens"]}
    tokens = [by_id[i] for i in range(len(by_id))]
    types = [(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED) if i in added
             else gguf.TokenType.BYTE if model == "llama" and len(t) == 6 and t.startswith("<0x")
             else gguf.TokenType.NORMAL for i, t in enumerate(tokens)]
    w.add_tokenizer_model(model)
    if pre:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if model == "llama":
        w.add_token_scores([-float(i) for i in range(len(tokens))])
    if merges:
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_add_bos_token(add_bos)
