"""Llama (2, 3, 3.1, 3.2) and Mistral: the pre-norm decoder the other families start from.

    h = E[ids]
    for each layer:  h += o_proj(attention(rope(q), rope(k), v));  h += down(silu(gate(x)) * up(x))
    logits = RMS(h) @ W_lm.T

Qwen reuses `decoder_layer` with its own switches (q/k/v biases, q/k norms, MoE feed-forward).
"""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field

from meganeura.graph import S, Graph

from . import cache as kv, rope
from .hf import ConfigError, field, read_config, require

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass
class LlamaConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rope_parameters: dict = dc_field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    attention_bias: bool = False        # bias on q, k, v and o
    qkv_bias: bool = False              # bias on q, k, v only (Qwen2)
    mlp_bias: bool = False
    qk_norm: bool = False               # RMS over head_dim of q and k before RoPE (Qwen3)
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    layer_types: list[str] = dc_field(default_factory=list)
    eos_token_id: int | list[int] | None = None
    bos_token_id: int | None = None

    @classmethod
    def from_hf(cls, source) -> "LlamaConfig":
        cfg = read_config(source)
        c = cls._common(cfg)
        c.attention_bias = field(cfg, "attention_bias", False, bool)
        c.mlp_bias = field(cfg, "mlp_bias", False, bool)
        if c.model_type == "mistral":
            # Mistral slides on every layer; an absent key means HF's default 4096, an explicit null none.
            explicit_none = "sliding_window" in cfg and cfg["sliding_window"] is None
            c.sliding_window = None if explicit_none else field(cfg, "sliding_window", 4096, int)
        c.layer_types = cfg.get("layer_types") or [SLIDING if c.sliding_window else FULL] * c.num_hidden_layers
        return c.validate()

    @classmethod
    def _common(cls, cfg: dict, head_dim_default=None) -> "LlamaConfig":
        """The fields every Llama-like config.json shares, with HF's defaults."""
        c = cls()
        c.model_type = cfg.get("model_type", cls.model_type)
        c.vocab_size = require(cfg, "vocab_size", int)
        c.hidden_size = require(cfg, "hidden_size", int)
        c.intermediate_size = field(cfg, "intermediate_size", c.intermediate_size, int)
        c.num_hidden_layers = require(cfg, "num_hidden_layers", int)
        c.num_attention_heads = require(cfg, "num_attention_heads", int)
        c.num_key_value_heads = field(cfg, "num_key_value_heads", c.num_attention_heads, int)
        if c.num_attention_heads <= 0 or c.num_key_value_heads <= 0 \
                or c.num_attention_heads % c.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {c.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {c.num_key_value_heads}")
        c.head_dim = field(cfg, "head_dim", head_dim_default or c.hidden_size // c.num_attention_heads, int)
        c.rms_norm_eps = field(cfg, "rms_norm_eps", 1e-6, float)
        c.hidden_act = field(cfg, "hidden_act", "silu", str)
        c.max_position_embeddings = field(cfg, "max_position_embeddings", 2048, int)
        c.rope_parameters = rope.hf_rope_params(cfg)
        c.tie_word_embeddings = field(cfg, "tie_word_embeddings", c.tie_word_embeddings, bool)
        c.eos_token_id = cfg.get("eos_token_id")
        c.bos_token_id = cfg.get("bos_token_id")
        return c

    def validate(self):
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (only silu)")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for "
                              f"{self.num_hidden_layers} layers")
        if any(t not in (SLIDING, FULL) for t in self.layer_types):
            raise ConfigError(f"layer_types may only hold {SLIDING!r} and {FULL!r}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for RoPE")
        rope.inv_freq(self.rope_parameters, self.head_dim)       # raises on an unsupported rope_type
        return self

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == SLIDING else None


def llama32_1b() -> LlamaConfig:
    """meta-llama/Llama-3.2-1B."""
    return LlamaConfig.from_hf({
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": 128001})


def small_test() -> LlamaConfig:
    """A tiny Llama-3.2-shaped model for tests and examples."""
    return LlamaConfig.from_hf({
        "model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
        "max_position_embeddings": 4096})


# ---------------------------------------------------------------- the forward pass

def param(g: Graph, name: str, *shape: int) -> int:
    return g.parameter(name, shape)


def attention_block(g: Graph, cfg: LlamaConfig, layer: int, x: int, pos: int, cache: kv.KVCache | None) -> int:
    p = f"model.layers.{layer}.self_attn."
    hsz, nh, nkv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv_bias = cfg.attention_bias or cfg.qkv_bias

    def proj(name, heads):
        w = param(g, p + f"{name}.weight", heads * d, hsz)
        b = param(g, p + f"{name}.bias", heads * d) if qkv_bias else None
        return g.reshape(g.linear(x, w, b), (S, heads, d))

    q, k, v = proj("q_proj", nh), proj("k_proj", nkv), proj("v_proj", nkv)
    if cfg.qk_norm:
        q = g.rms_norm(q, param(g, p + "q_norm.weight", d), cfg.rms_norm_eps)
        k = g.rms_norm(k, param(g, p + "k_norm.weight", d), cfg.rms_norm_eps)
    inv, scaling = rope.inv_freq(cfg.rope_parameters, d)
    q, k = g.rope(q, pos, inv, scaling), g.rope(k, pos, inv, scaling)
    window = cfg.window(layer)
    if cache is None:
        a = g.attention(q, k, v, scale=d ** -0.5, window=window)
    else:
        k, v = kv.write(g, cache, p, k, v, pos, window)
        a = g.attention(q, k, v, scale=d ** -0.5, window=window, pos=pos)
    o_bias = param(g, p + "o_proj.bias", hsz) if cfg.attention_bias else None
    return g.linear(g.reshape(a, (S, nh * d)), param(g, p + "o_proj.weight", hsz, nh * d), o_bias)


def mlp(g: Graph, cfg: LlamaConfig, prefix: str, x: int, width: int) -> int:
    """down(silu(gate(x)) * up(x))."""
    hsz = cfg.hidden_size

    def lin(name, n_out, n_in, inp):
        b = param(g, prefix + f"{name}.bias", n_out) if cfg.mlp_bias else None
        return g.linear(inp, param(g, prefix + f"{name}.weight", n_out, n_in), b)

    act = g.mul(g.silu(lin("gate_proj", width, hsz, x)), lin("up_proj", width, hsz, x))
    return lin("down_proj", hsz, width, act)


def dense_mlp(g: Graph, cfg: LlamaConfig, layer: int, x: int) -> int:
    return mlp(g, cfg, f"model.layers.{layer}.mlp.", x, cfg.intermediate_size)


def decoder_layer(g: Graph, cfg, layer: int, h: int, pos: int, feed_forward=dense_mlp, cache=None) -> int:
    p = f"model.layers.{layer}."
    eps = cfg.rms_norm_eps
    x = g.rms_norm(h, param(g, p + "input_layernorm.weight", cfg.hidden_size), eps)
    h = g.add(h, attention_block(g, cfg, layer, x, pos, cache))
    x = g.rms_norm(h, param(g, p + "post_attention_layernorm.weight", cfg.hidden_size), eps)
    return g.add(h, feed_forward(g, cfg, layer, x))


def build_graph(g: Graph, cfg: LlamaConfig, seq_len: int | None = None, feed_forward=dense_mlp,
                cache: kv.KVCache | None = None, last_only: bool = False) -> int:
    """The logits [S, vocab] of one forward pass over the tokens fed as input "token_ids" starting at
    position "start_pos". The token count S is symbolic; `seq_len` is accepted for API symmetry.
    With a `cache`, attention also sees the positions before start_pos that earlier steps wrote;
    `last_only` gives the logits [1, vocab] of the last token only (what generation needs)."""
    v, hsz = cfg.vocab_size, cfg.hidden_size
    ids = g.input("token_ids", (S,), "u32")
    pos = g.input("start_pos", (), "i32", default=0)
    embed = g.parameter("model.embed_tokens.weight", (v, hsz))
    h = g.embedding(embed, ids)
    for layer in range(cfg.num_hidden_layers):
        h = decoder_layer(g, cfg, layer, h, pos, feed_forward, cache)
    norm_w = param(g, "model.norm.weight", hsz)
    if last_only:
        h = g.last_row(h)
    h = g.rms_norm(h, norm_w, cfg.rms_norm_eps)
    lm_head = g.parameter("lm_head.weight", (v, hsz),
                          fallback="model.embed_tokens.weight" if cfg.tie_word_embeddings else None)
    return g.named("logits", g.matmul(h, lm_head, transpose_b=True))
