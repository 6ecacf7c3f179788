"""Gemma-4 text decoder (E2B, E4B, 12B "unified", 26B-A4B, 31B).

    h = E[ids] * sqrt(H)                         per-layer inputs (PLE) from a second table when P > 0
    for each layer l (sliding or full attention, each with its own head_dim, kv heads and RoPE table):
        h = h + RMS(o_proj(attention(rope(RMS(q)), rope(RMS(k)), RMS(v), scale=1)))      sandwich norms
        h = h + RMS(mlp(RMS(h)) [+ parallel MoE branch])
        h = h + RMS(proj(gelu(gate(h)) * ple_l))                                            if P > 0
        h = h * layer_scalar_l
    logits = softcap(RMS(h) @ E.T)

The last `num_kv_shared_layers` layers compute no K/V: they attend with the K/V of the last earlier
layer of their own type. Full layers with `attention_k_eq_v` have no v_proj: V is the raw k projection.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field as dc_field

from meganeura.graph import S, Graph

from . import cache as kv, rope
from .hf import ConfigError, field, read_config, require

SLIDING, FULL = "sliding_attention", "full_attention"
MODEL_TYPES = ("gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text")
DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
}


@dataclass
class Gemma4Config:
    model_type: str = "gemma4_text"
    vocab_size: int = 262144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256                       # sliding layers
    global_head_dim: int = 512                # full layers
    num_global_key_value_heads: int | None = None
    per_layer_config: dict = dc_field(default_factory=dict)    # layer -> {"head_dim", "num_key_value_heads"}
    attention_k_eq_v: bool = False
    layer_types: list[str] = dc_field(default_factory=list)
    sliding_window: int = 512
    rope_parameters: dict = dc_field(default_factory=lambda: dict(DEFAULT_ROPE))
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    final_logit_softcapping: float | None = None
    hidden_size_per_layer_input: int = 256
    vocab_size_per_layer_input: int = 262144
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    enable_moe_block: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 131072
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2

    @classmethod
    def from_hf(cls, source) -> "Gemma4Config":
        top = read_config(source)
        kind = top.get("model_type", "gemma4_text")
        if kind not in MODEL_TYPES:
            raise ConfigError(f"not a Gemma-4 config: model_type {kind!r}")
        cfg = top
        if kind in ("gemma4", "gemma4_unified") and "text_config" in top:
            cfg = top["text_config"] or {}
            if not isinstance(cfg, dict):
                raise ConfigError("text_config must be an object")
        unified = kind.startswith("gemma4_unified")
        c = cls()
        c.model_type = kind
        c.vocab_size = require(cfg, "vocab_size", int)
        c.hidden_size = require(cfg, "hidden_size", int)
        c.intermediate_size = field(cfg, "intermediate_size", 9216, int)
        c.num_hidden_layers = require(cfg, "num_hidden_layers", int)
        c.num_attention_heads = field(cfg, "num_attention_heads", 8, int)
        c.num_key_value_heads = field(cfg, "num_key_value_heads", 4, int)
        c.head_dim = field(cfg, "head_dim", 256, int)
        c.global_head_dim = field(cfg, "global_head_dim", 512, int)
        c.num_global_key_value_heads = field(cfg, "num_global_key_value_heads", None, int)
        c.attention_k_eq_v = field(cfg, "attention_k_eq_v", False, bool)
        c.sliding_window = field(cfg, "sliding_window", 1024 if unified else 512, int)
        c.hidden_activation = field(cfg, "hidden_activation", "gelu_pytorch_tanh", str)
        c.rms_norm_eps = field(cfg, "rms_norm_eps", 1e-6, float)
        c.attention_bias = field(cfg, "attention_bias", False, bool)
        c.final_logit_softcapping = field(cfg, "final_logit_softcapping", None, float)
        c.hidden_size_per_layer_input = 0 if unified else field(cfg, "hidden_size_per_layer_input", 256, int)
        c.vocab_size_per_layer_input = field(cfg, "vocab_size_per_layer_input", 262144, int)
        c.num_kv_shared_layers = field(cfg, "num_kv_shared_layers", 0, int)
        c.use_double_wide_mlp = field(cfg, "use_double_wide_mlp", False, bool)
        c.enable_moe_block = False if unified else field(cfg, "enable_moe_block", False, bool)
        if c.enable_moe_block:
            c.num_experts = require(cfg, "num_experts", int)
            c.top_k_experts = require(cfg, "top_k_experts", int)
            c.moe_intermediate_size = require(cfg, "moe_intermediate_size", int)
        c.max_position_embeddings = field(cfg, "max_position_embeddings", 262144 if unified else 131072, int)
        # The top-level flag governs the multimodal wrapper's lm_head.
        c.tie_word_embeddings = field(top, "tie_word_embeddings", True, bool)
        c.eos_token_id = top.get("eos_token_id", cfg.get("eos_token_id", 1))
        c.bos_token_id = top.get("bos_token_id", cfg.get("bos_token_id", 2))
        if cfg.get("use_bidirectional_attention") == "all":
            raise ConfigError("use_bidirectional_attention='all' (a non-causal encoder) is not supported")

        n = c.num_hidden_layers
        c.layer_types = list(cfg.get("layer_types") or
                             [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n)])
        if len(c.layer_types) != n or any(t not in (SLIDING, FULL) for t in c.layer_types):
            raise ConfigError(f"layer_types must list {n} entries of {SLIDING!r}/{FULL!r}")
        c.layer_types[-1] = FULL                 # transformers forces the last layer to full attention
        c.rope_parameters = {t: dict(DEFAULT_ROPE[t]) for t in (SLIDING, FULL)}
        for t, params in (cfg.get("rope_parameters") or {}).items():
            if t in c.rope_parameters and isinstance(params, dict):
                c.rope_parameters[t] = {"rope_type": "default", **params}

        if "per_layer_config" in cfg and cfg["per_layer_config"] is not None:
            try:
                c.per_layer_config = {int(k): dict(v) for k, v in cfg["per_layer_config"].items()}
            except (AttributeError, TypeError, ValueError):
                raise ConfigError("per_layer_config must map layer indices to objects") from None
        else:
            full = {"head_dim": c.global_head_dim}
            if c.attention_k_eq_v and c.num_global_key_value_heads is not None:
                full["num_key_value_heads"] = c.num_global_key_value_heads
            c.per_layer_config = {i: dict(full) for i, t in enumerate(c.layer_types) if t == FULL}
        return c.validate()

    def validate(self):
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"hidden_activation {self.hidden_activation!r} is not supported")
        for layer in range(self.num_hidden_layers):
            d, kv = self.layer_head_dim(layer), self.layer_kv_heads(layer)
            if d % 2 or kv <= 0 or self.num_attention_heads % kv:
                raise ConfigError(f"layer {layer}: head_dim {d} / {kv} kv heads do not fit "
                                  f"{self.num_attention_heads} attention heads")
        if not 0 <= self.num_kv_shared_layers < self.num_hidden_layers:
            raise ConfigError(f"num_kv_shared_layers {self.num_kv_shared_layers} must be below the layer count")
        if self.num_kv_shared_layers:
            first = self.first_kv_shared_layer
            if set(self.layer_types[:first]) != set(self.layer_types):
                raise ConfigError("every layer type reading shared K/V needs an earlier layer of that type producing it")
        if self.enable_moe_block and not 0 < self.top_k_experts <= self.num_experts:
            raise ConfigError(f"top_k_experts {self.top_k_experts} must be in 1..{self.num_experts}")
        for t in (SLIDING, FULL):
            rope.inv_freq(self.rope_parameters[t], 2)
        return self

    # -- derived per-layer geometry
    def layer_head_dim(self, layer: int) -> int:
        return self.per_layer_config.get(layer, {}).get("head_dim", self.head_dim)

    def layer_kv_heads(self, layer: int) -> int:
        return self.per_layer_config.get(layer, {}).get("num_key_value_heads", self.num_key_value_heads)

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_producer(self, layer: int) -> int:
        """The layer whose K/V `layer` attends with (itself unless it is a KV-sharing consumer)."""
        first = self.first_kv_shared_layer
        if not self.num_kv_shared_layers or layer < first:
            return layer
        kind = self.layer_types[layer]
        return max(i for i in range(first) if self.layer_types[i] == kind)

    def mlp_width(self, layer: int) -> int:
        shared = self.num_kv_shared_layers and layer >= self.first_kv_shared_layer
        return self.intermediate_size * (2 if self.use_double_wide_mlp and shared else 1)


def _preset(text: dict, **top) -> Gemma4Config:
    return Gemma4Config.from_hf({"model_type": "gemma4", "text_config": {"model_type": "gemma4_text", **text},
                                 "tie_word_embeddings": True, **top})


_REAL_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
              "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0}}


def gemma4_e2b() -> Gemma4Config:
    """google/gemma-4-E2B."""
    return _preset(dict(vocab_size=262144, hidden_size=1536, intermediate_size=6144, num_hidden_layers=35,
                        num_attention_heads=8, num_key_value_heads=1, head_dim=256, global_head_dim=512,
                        sliding_window=512, layer_types=[FULL if i % 5 == 4 else SLIDING for i in range(35)],
                        hidden_size_per_layer_input=256, vocab_size_per_layer_input=262144,
                        num_kv_shared_layers=20, use_double_wide_mlp=True, final_logit_softcapping=30.0,
                        rope_parameters=_REAL_ROPE, max_position_embeddings=131072))


def gemma4_e4b() -> Gemma4Config:
    """google/gemma-4-E4B."""
    return _preset(dict(vocab_size=262144, hidden_size=2560, intermediate_size=10240, num_hidden_layers=42,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=256, global_head_dim=512,
                        sliding_window=512, hidden_size_per_layer_input=256, vocab_size_per_layer_input=262144,
                        num_kv_shared_layers=18, final_logit_softcapping=30.0,
                        rope_parameters=_REAL_ROPE, max_position_embeddings=131072))


def gemma4_12b() -> Gemma4Config:
    """google/gemma-4-12B (the "unified" encoder-free multimodal model)."""
    return Gemma4Config.from_hf({
        "model_type": "gemma4_unified", "tie_word_embeddings": True,
        "text_config": dict(model_type="gemma4_unified_text", vocab_size=262144, hidden_size=3840,
                            intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                            num_key_value_heads=8, head_dim=256, global_head_dim=512,
                            num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=1024,
                            final_logit_softcapping=30.0, rope_parameters=_REAL_ROPE,
                            max_position_embeddings=262144)})


def gemma4_26b_a4b() -> Gemma4Config:
    """google/gemma-4-26B-A4B."""
    return _preset(dict(vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                        num_global_key_value_heads=2, attention_k_eq_v=True, sliding_window=1024,
                        hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=128, top_k_experts=8,
                        moe_intermediate_size=704, final_logit_softcapping=30.0, rope_parameters=_REAL_ROPE,
                        max_position_embeddings=262144))


def gemma4_31b() -> Gemma4Config:
    """google/gemma-4-31B."""
    return _preset(dict(vocab_size=262144, hidden_size=5376, intermediate_size=21504, num_hidden_layers=60,
                        num_attention_heads=32, num_key_value_heads=16, head_dim=256, global_head_dim=512,
                        num_global_key_value_heads=4, attention_k_eq_v=True, sliding_window=1024,
                        hidden_size_per_layer_input=0, final_logit_softcapping=30.0, rope_parameters=_REAL_ROPE,
                        max_position_embeddings=262144))


def small_test() -> Gemma4Config:
    """A tiny E2B-shaped model: PLE, KV sharing, double-wide MLP, K=V full layers, softcap."""
    return Gemma4Config.from_hf(dict(
        model_type="gemma4_text", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=128, num_kv_shared_layers=2,
        use_double_wide_mlp=True, final_logit_softcapping=30.0, rope_parameters=_REAL_ROPE))


# ---------------------------------------------------------------- the forward pass

def build_graph(g: Graph, cfg: Gemma4Config, seq_len: int | None = None, cache: kv.KVCache | None = None,
                last_only: bool = False) -> int:
    """The logits [S, vocab] of the tokens fed as "token_ids", the first at position "start_pos". With a
    `cache`, attention also sees what earlier steps wrote; a KV-sharing layer reads its producer's cache
    and writes none. `last_only` gives the logits [1, vocab] of the last token only."""
    hsz, n_layers, eps = cfg.hidden_size, cfg.num_hidden_layers, cfg.rms_norm_eps
    ple_dim = cfg.hidden_size_per_layer_input

    def w(name, *shape):
        return g.parameter("model." + name, shape)

    def norm(x, name=None, size=hsz):
        return g.rms_norm(x, None if name is None else w(name, size), eps)

    ids = g.input("token_ids", (S,), "u32")
    pos = g.input("start_pos", (), "i32", default=0)
    embed = w("embed_tokens.weight", cfg.vocab_size, hsz)
    h = g.scale(g.embedding(embed, ids), math.sqrt(hsz))

    if ple_dim:
        # Per-layer inputs: a token-identity table plus a projection of the scaled embedding.
        tok = g.scale(g.embedding(w("embed_tokens_per_layer.weight", cfg.vocab_size_per_layer_input,
                                    n_layers * ple_dim), ids), math.sqrt(ple_dim))
        proj = g.scale(g.linear(h, w("per_layer_model_projection.weight", n_layers * ple_dim, hsz)), hsz ** -0.5)
        proj = norm(g.reshape(proj, (S, n_layers, ple_dim)), "per_layer_projection_norm.weight", ple_dim)
        ple = g.scale(g.add(proj, g.reshape(tok, (S, n_layers, ple_dim))), 2 ** -0.5)

    tables: dict[tuple[str, int], tuple] = {}      # (layer type, head_dim) -> RoPE table
    shared_kv: dict[int, tuple[int, int]] = {}
    for layer in range(n_layers):
        p = f"layers.{layer}."
        kind = cfg.layer_types[layer]
        nh, d, nkv = cfg.num_attention_heads, cfg.layer_head_dim(layer), cfg.layer_kv_heads(layer)
        if (kind, d) not in tables:
            tables[kind, d] = rope.inv_freq(cfg.rope_parameters[kind], d)
        inv, scaling = tables[kind, d]
        window = cfg.sliding_window if kind == SLIDING else None

        def lin(x, name, n_out, n_in):
            b = w(p + name + ".bias", n_out) if cfg.attention_bias else None
            return g.linear(x, w(p + name + ".weight", n_out, n_in), b)

        # --- attention (sandwich norm; scale 1: q and k are unit-RMS with learned gains)
        x = norm(h, p + "input_layernorm.weight")
        q = g.reshape(lin(x, "self_attn.q_proj", nh * d, hsz), (S, nh, d))
        q = g.rope(norm(q, p + "self_attn.q_norm.weight", d), pos, inv, scaling)
        producer = cfg.kv_producer(layer)
        if producer == layer:
            k_raw = g.reshape(lin(x, "self_attn.k_proj", nkv * d, hsz), (S, nkv, d))
            v_raw = k_raw if cfg.attention_k_eq_v and kind == FULL else \
                g.reshape(lin(x, "self_attn.v_proj", nkv * d, hsz), (S, nkv, d))
            k = g.rope(norm(k_raw, p + "self_attn.k_norm.weight", d), pos, inv, scaling)
            v = norm(v_raw)
            if cache is not None:
                k, v = kv.write(g, cache, "model." + p + "self_attn.", k, v, pos, window)
            shared_kv[layer] = (k, v)
        else:
            k, v = shared_kv[producer]
        a = g.attention(q, k, v, scale=1.0, window=window, pos=None if cache is None else pos)
        a = g.reshape(a, (S, nh * d))
        h = g.add(h, norm(lin(a, "self_attn.o_proj", hsz, nh * d), p + "post_attention_layernorm.weight"))

        # --- feed-forward: dense gated MLP, with a parallel MoE branch on the same residual
        r = h
        m = _gated_mlp(g, w, p + "mlp.", norm(r, p + "pre_feedforward_layernorm.weight"), hsz, cfg.mlp_width(layer))
        if cfg.enable_moe_block:
            m1 = norm(m, p + "post_feedforward_layernorm_1.weight")
            m2 = norm(_moe(g, w, cfg, p, r), p + "post_feedforward_layernorm_2.weight")
            m = g.add(m1, m2)
        h = g.add(r, norm(m, p + "post_feedforward_layernorm.weight"))

        # --- per-layer input
        if ple_dim:
            gate = g.gelu_tanh(g.linear(h, w(p + "per_layer_input_gate.weight", ple_dim, hsz)))
            ple_l = g.reshape(g.slice(ple, 1, layer, layer + 1), (S, ple_dim))
            y = g.linear(g.mul(gate, ple_l), w(p + "per_layer_projection.weight", hsz, ple_dim))
            h = g.add(h, norm(y, p + "post_per_layer_input_norm.weight"))
        h = g.mul(h, w(p + "layer_scalar", 1))

    norm_w = w("norm.weight", hsz)
    if last_only:
        h = g.last_row(h)
    h = g.rms_norm(h, norm_w, eps)
    lm_head = g.parameter("lm_head.weight", (cfg.vocab_size, hsz),
                          fallback="model.embed_tokens.weight" if cfg.tie_word_embeddings else None)
    logits = g.matmul(h, lm_head, transpose_b=True)
    if cfg.final_logit_softcapping:
        logits = g.softcap(logits, cfg.final_logit_softcapping)
    return g.named("logits", logits)


def _gated_mlp(g: Graph, w, prefix: str, x: int, hsz: int, width: int) -> int:
    gate = g.gelu_tanh(g.linear(x, w(prefix + "gate_proj.weight", width, hsz)))
    up = g.linear(x, w(prefix + "up_proj.weight", width, hsz))
    return g.linear(g.mul(gate, up), w(prefix + "down_proj.weight", hsz, width))


def _moe(g: Graph, w, cfg: Gemma4Config, p: str, r: int) -> int:
    """Router on the un-normed residual; experts on its own pre-norm; top-k renormalised, then scaled per expert."""
    hsz, e, im = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    z = g.scale(g.mul(g.rms_norm(r, None, cfg.rms_norm_eps), w(p + "router.scale", hsz)), hsz ** -0.5)
    probs = g.softmax(g.linear(z, w(p + "router.proj.weight", e, hsz)))
    route = g.mul(g.topk_route(probs, cfg.top_k_experts, normalize=True), w(p + "router.per_expert_scale", e))
    xe = g.rms_norm(r, w(p + "pre_feedforward_layernorm_2.weight", hsz), cfg.rms_norm_eps)
    return g.moe(xe, route, w(p + "experts.gate_up_proj", e, 2 * im, hsz), w(p + "experts.down_proj", e, hsz, im),
                 act="gelu_tanh", k=cfg.top_k_experts)
