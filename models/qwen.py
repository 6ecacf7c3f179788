"""Qwen2/2.5, Qwen3 and Qwen3-MoE: the Llama decoder with Qwen's switches.

    qwen2:      q/k/v always biased (o never); sliding only with use_sliding_window, on layers >= max_window_layers
    qwen3:      RMS q_norm/k_norm over head_dim before RoPE; head_dim defaults to 128; attention_bias on q,k,v,o
    qwen3_moe:  qwen3 attention; layer i is sparse iff i not in mlp_only_layers and (i+1) % decoder_sparse_step == 0:
                p = softmax(x @ Wg.T); keep the top-k (renormalised if norm_topk_prob); sum of the chosen experts
"""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field

from meganeura.graph import Graph

from . import llama
from .hf import ConfigError, field, read_config
from .llama import FULL, SLIDING, LlamaConfig, param


@dataclass
class QwenConfig(LlamaConfig):
    model_type: str = "qwen2"
    use_sliding_window: bool = False
    max_window_layers: int = 28
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = dc_field(default_factory=list)

    @classmethod
    def from_hf(cls, source) -> "QwenConfig":
        cfg = read_config(source)
        kind = cfg.get("model_type", "qwen2")
        if kind not in ("qwen2", "qwen3", "qwen3_moe"):
            raise ConfigError(f"not a Qwen config: model_type {kind!r}")
        c = cls._common(cfg, head_dim_default=128 if kind == "qwen3" else None)
        c.model_type = kind
        if kind == "qwen2":
            c.qkv_bias = True
        else:
            c.qk_norm = True
            c.attention_bias = field(cfg, "attention_bias", False, bool)
        c.use_sliding_window = field(cfg, "use_sliding_window", False, bool)
        c.sliding_window = field(cfg, "sliding_window", 4096, int) if c.use_sliding_window else None
        c.max_window_layers = field(cfg, "max_window_layers", 28, int)
        if cfg.get("layer_types"):
            c.layer_types = list(cfg["layer_types"])
        elif kind == "qwen3_moe":
            c.layer_types = [SLIDING if c.sliding_window else FULL] * c.num_hidden_layers
        else:
            c.layer_types = [SLIDING if c.sliding_window and i >= c.max_window_layers else FULL
                             for i in range(c.num_hidden_layers)]
        if kind == "qwen3_moe":
            experts = cfg.get("num_experts", cfg.get("num_local_experts"))
            c.num_experts = 128 if experts is None else field({"num_experts": experts}, "num_experts", 0, int)
            c.num_experts_per_tok = field(cfg, "num_experts_per_tok", 8, int)
            c.moe_intermediate_size = field(cfg, "moe_intermediate_size", 768, int)
            c.norm_topk_prob = field(cfg, "norm_topk_prob", False, bool)
            c.decoder_sparse_step = field(cfg, "decoder_sparse_step", 1, int)
            c.mlp_only_layers = list(cfg.get("mlp_only_layers") or [])
            if c.num_experts and not 0 < c.num_experts_per_tok <= c.num_experts:
                raise ConfigError(f"num_experts_per_tok {c.num_experts_per_tok} must be in 1..{c.num_experts}")
        return c.validate()

    def is_sparse(self, layer: int) -> bool:
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)


def qwen25_05b() -> QwenConfig:
    """Qwen/Qwen2.5-0.5B."""
    return QwenConfig.from_hf({
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": True,
        "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 24,
        "bos_token_id": 151643, "eos_token_id": 151643})


def qwen3_06b() -> QwenConfig:
    """Qwen/Qwen3-0.6B."""
    return QwenConfig.from_hf({
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
        "tie_word_embeddings": True, "attention_bias": False, "use_sliding_window": False,
        "bos_token_id": 151643, "eos_token_id": 151645})


def qwen3_30b_a3b() -> QwenConfig:
    """Qwen/Qwen3-30B-A3B."""
    return QwenConfig.from_hf({
        "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
        "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
        "tie_word_embeddings": False, "num_experts": 128, "num_experts_per_tok": 8,
        "moe_intermediate_size": 768, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "bos_token_id": 151643, "eos_token_id": 151645})


def small_test() -> QwenConfig:
    """A tiny Qwen3-MoE-shaped model (q/k norms, 8 experts top-2, one dense layer) for tests."""
    return QwenConfig.from_hf({
        "model_type": "qwen3_moe", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True,
        "mlp_only_layers": [1], "rope_theta": 1e6, "tie_word_embeddings": True})


# ---------------------------------------------------------------- the forward pass

def sparse_moe(g: Graph, cfg: QwenConfig, layer: int, x: int) -> int:
    p = f"model.layers.{layer}.mlp."
    e, hsz, im = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    probs = g.softmax(g.linear(x, param(g, p + "gate.weight", e, hsz)))
    route = g.topk_route(probs, cfg.num_experts_per_tok, normalize=cfg.norm_topk_prob)
    # On disk each expert is three tensors; packed at load into [E, 2*Im, H] (gate rows first) and [E, H, Im].
    experts = [f"{p}experts.{i}." for i in range(e)]
    gate_up = g.parameter(p + "experts.gate_up_proj", (e, 2 * im, hsz),
                          parts=[[x + "gate_proj.weight", x + "up_proj.weight"] for x in experts])
    down = g.parameter(p + "experts.down_proj", (e, hsz, im), parts=[[x + "down_proj.weight"] for x in experts])
    return g.moe(x, route, gate_up, down, act="silu", k=cfg.num_experts_per_tok)


def feed_forward(g: Graph, cfg: QwenConfig, layer: int, x: int) -> int:
    return sparse_moe(g, cfg, layer, x) if cfg.is_sparse(layer) else llama.dense_mlp(g, cfg, layer, x)


def build_graph(g: Graph, cfg: QwenConfig, seq_len: int | None = None, cache=None, last_only: bool = False) -> int:
    return llama.build_graph(g, cfg, seq_len, feed_forward=feed_forward, cache=cache, last_only=last_only)
