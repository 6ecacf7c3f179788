"""Tiny random HF transformers models: the oracle every family and feature is checked against.

Every case builds a small model from a config dict, randomises every parameter and persistent buffer
(norm gains, biases, layer scalars and router scales included, so a wrong convention cannot hide behind
an init of ones or zeros) and saves it with `save_pretrained`, as a published checkpoint would be.
"""
from __future__ import annotations

import math

import numpy as np

GEMMA_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
              "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}}


def _gemma_text(**over):
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=5,
                layer_types=["sliding_attention"] * 4 + ["full_attention"], hidden_size_per_layer_input=0,
                vocab_size_per_layer_input=128, num_kv_shared_layers=0, use_double_wide_mlp=False,
                final_logit_softcapping=None, attention_k_eq_v=False, num_global_key_value_heads=None,
                enable_moe_block=False, rope_parameters=GEMMA_ROPE, max_position_embeddings=4096)
    text.update(over)
    return text


# name -> (HF class name, config class name, config kwargs). Mirrors the feature matrix of the
# architecture reference: each case switches on a distinct set of features.
CASES = {
    "llama_basic": ("LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "llama32": ("LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192})),
    "llama_bias": ("LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, attention_bias=True, mlp_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "mistral_sliding": ("MistralForCausalLM", "MistralConfig", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=5, head_dim=16)),
    "qwen25": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True)),
    "qwen2_sliding": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, rope_theta=1e6, tie_word_embeddings=True)),
    "qwen3_yarn_bias": ("Qwen3ForCausalLM", "Qwen3Config", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, attention_bias=True, max_position_embeddings=32768,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192})),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=3,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1])),
    "qwen3_moe_plain": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2,
        norm_topk_prob=False, decoder_sparse_step=2)),
    "gemma4_e2b_like": ("Gemma4ForConditionalGeneration", "Gemma4Config", dict(text_config=_gemma_text(
        num_hidden_layers=10, num_key_value_heads=1, sliding_window=6,
        layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 2, hidden_size_per_layer_input=8,
        num_kv_shared_layers=4, use_double_wide_mlp=True, final_logit_softcapping=3.0))),
    "gemma4_31b_like": ("Gemma4ForConditionalGeneration", "Gemma4Config", dict(text_config=_gemma_text(
        num_hidden_layers=6, layer_types=["sliding_attention"] * 5 + ["full_attention"], attention_k_eq_v=True,
        num_global_key_value_heads=1, final_logit_softcapping=30.0))),
    "gemma4_26b_like": ("Gemma4ForConditionalGeneration", "Gemma4Config", dict(text_config=_gemma_text(
        attention_k_eq_v=True, num_global_key_value_heads=1, enable_moe_block=True, num_experts=6,
        top_k_experts=2, moe_intermediate_size=24, final_logit_softcapping=30.0))),
    "gemma4_text_all": ("Gemma4ForCausalLM", "Gemma4TextConfig", _gemma_text(
        num_hidden_layers=6, layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        attention_bias=True, hidden_size_per_layer_input=8, num_kv_shared_layers=2, use_double_wide_mlp=True,
        attention_k_eq_v=True, num_global_key_value_heads=1, enable_moe_block=True, num_experts=4,
        top_k_experts=2, moe_intermediate_size=16, final_logit_softcapping=5.0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                         "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5,
                                            "rope_theta": 1e6}})),
    "gemma4_12b_like": ("Gemma4UnifiedForConditionalGeneration", "Gemma4UnifiedConfig", dict(text_config={
        k: v for k, v in _gemma_text(attention_k_eq_v=True, num_global_key_value_heads=1,
                                     final_logit_softcapping=30.0).items()
        if k not in ("hidden_size_per_layer_input", "vocab_size_per_layer_input", "enable_moe_block")})),
}


def build(case: str, seed: int = 0):
    """The HF model of `case`, float32, eval mode, every parameter randomised."""
    import torch
    import transformers

    model_cls, config_cls, kwargs = CASES[case]
    kwargs = dict(kwargs)
    if config_cls in ("Gemma4Config", "Gemma4UnifiedConfig"):
        kwargs.update(vision_config=None, audio_config=None)
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).float().eval()
    randomise(model, seed)
    return model


def randomise(model, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            if t.ndim <= 1 and ("norm" in name or "scale" in leaf or leaf == "layer_scalar"):
                t.copy_(1.0 + 0.6 * (torch.rand(t.shape, generator=gen) - 0.5))     # gains around 1 ± 0.3
            elif leaf == "bias":
                t.copy_(0.1 * torch.randn(t.shape, generator=gen))
            else:
                fan_in = t.shape[-1] if t.ndim >= 2 else 1
                t.copy_(torch.randn(t.shape, generator=gen) * (1.0 / math.sqrt(fan_in)))


def hf_logits(model, ids, start_pos: int = 0) -> np.ndarray:
    import torch

    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]
    pos = torch.arange(start_pos, start_pos + ids.shape[1])[None]
    with torch.no_grad():
        return model(input_ids=ids, position_ids=pos).logits[0].float().numpy()


def tolerance(reference: np.ndarray, rel: float = 2e-4) -> float:
    """The parity bound: rel × max(1, max|logit| / 10)."""
    return rel * max(1.0, float(np.abs(reference).max()) / 10)
