"""Config parsing: published (legacy) config.json forms and transformers-v5-saved forms mean the same model."""
import json

import numpy as np
import pytest

import meganeura as mn
import oracle
from meganeura.models import gemma4, llama, qwen, registry, rope
from meganeura.models.hf import ConfigError

MODEL_TYPES = {"LlamaConfig": "llama", "MistralConfig": "mistral", "Qwen2Config": "qwen2", "Qwen3Config": "qwen3",
               "Qwen3MoeConfig": "qwen3_moe", "Gemma4Config": "gemma4", "Gemma4TextConfig": "gemma4_text",
               "Gemma4UnifiedConfig": "gemma4_unified"}


def _graph_text(source) -> str:
    family, cfg = registry.from_hf(source)
    g = mn.Graph()
    g.set_outputs([family.build_graph(g, cfg)])
    return g.to_text()


@pytest.mark.parametrize("case", list(oracle.CASES))
def test_published_and_saved_configs_build_the_same_graph(case, hf_checkpoint):
    path, _ = hf_checkpoint(case)
    _, config_cls, kwargs = oracle.CASES[case]
    published = {"model_type": MODEL_TYPES[config_cls], **json.loads(json.dumps(kwargs))}
    assert _graph_text(published) == _graph_text(path)


def test_rope_tables_equal_transformers_buffers(hf_checkpoint):
    """inv_freq is bit-identical to the buffers transformers computes (fp32 pow, then fp32 reciprocal)."""
    checks = {"llama32": ("llama3", "model.rotary_emb.inv_freq"),
              "llama_bias": ("linear", "model.rotary_emb.inv_freq"),
              "qwen3_yarn_bias": ("yarn", "model.rotary_emb.inv_freq"),
              "gemma4_text_all": ("proportional", "model.rotary_emb.full_attention_inv_freq")}
    for case, (kind, buffer) in checks.items():
        path, hf = hf_checkpoint(case)
        family, cfg = registry.from_hf(path)
        want = dict(hf.named_buffers())[buffer].numpy()
        params = cfg.rope_parameters["full_attention"] if family is gemma4 else cfg.rope_parameters
        head_dim = cfg.layer_head_dim(cfg.num_hidden_layers - 1) if family is gemma4 else cfg.head_dim
        got, scaling = rope.inv_freq(params, head_dim)
        assert params.get("rope_type") == kind
        np.testing.assert_array_equal(got, want, err_msg=case)
        if kind == "yarn":
            assert scaling == pytest.approx(hf.model.rotary_emb.attention_scaling)


def test_presets_build():
    expected_layers = {llama.llama32_1b: 16, qwen.qwen25_05b: 24, qwen.qwen3_06b: 28, qwen.qwen3_30b_a3b: 48,
                       gemma4.gemma4_e2b: 35, gemma4.gemma4_e4b: 42, gemma4.gemma4_12b: 48,
                       gemma4.gemma4_26b_a4b: 30, gemma4.gemma4_31b: 60}
    for preset, layers in expected_layers.items():
        cfg = preset()
        assert cfg.num_hidden_layers == layers
        g = mn.Graph()
        family = {llama.LlamaConfig: llama, qwen.QwenConfig: qwen, gemma4.Gemma4Config: gemma4}[type(cfg)]
        logits = family.build_graph(g, cfg)
        assert g[logits].shape == ("S", cfg.vocab_size)


def test_gemma4_derived_geometry():
    e2b = gemma4.gemma4_e2b()
    assert e2b.first_kv_shared_layer == 15
    assert e2b.kv_producer(20) == 13 and e2b.kv_producer(19) == 14 and e2b.kv_producer(7) == 7
    assert e2b.mlp_width(14) == 6144 and e2b.mlp_width(15) == 12288
    b31 = gemma4.gemma4_31b()
    assert b31.layer_types[5] == "full_attention" and b31.layer_head_dim(5) == 512 and b31.layer_kv_heads(5) == 4
    assert b31.layer_head_dim(0) == 256 and b31.layer_kv_heads(0) == 16
    full = rope.inv_freq(b31.rope_parameters["full_attention"], 512)[0]
    assert np.count_nonzero(full) == 64            # proportional: only 64 of 256 frequencies rotate


def test_qwen_sliding_rules():
    base = dict(model_type="qwen2", vocab_size=8, hidden_size=8, num_hidden_layers=4, num_attention_heads=2)
    assert qwen.QwenConfig.from_hf(base).layer_types == ["full_attention"] * 4
    slid = qwen.QwenConfig.from_hf({**base, "use_sliding_window": True, "sliding_window": 3, "max_window_layers": 2})
    assert [slid.window(i) for i in range(4)] == [None, None, 3, 3]
    moe = qwen.QwenConfig.from_hf({**base, "model_type": "qwen3_moe", "use_sliding_window": True,
                                   "sliding_window": 3, "num_experts": 4, "num_experts_per_tok": 2})
    assert [moe.window(i) for i in range(4)] == [3, 3, 3, 3]


def test_mistral_window_default():
    base = dict(model_type="mistral", vocab_size=8, hidden_size=8, num_hidden_layers=2, num_attention_heads=2)
    assert llama.LlamaConfig.from_hf(base).window(0) == 4096
    assert llama.LlamaConfig.from_hf({**base, "sliding_window": None}).window(0) is None


def test_architectures_without_model_type():
    cfg = dict(architectures=["Qwen3ForCausalLM"], vocab_size=8, hidden_size=8, num_hidden_layers=1,
               num_attention_heads=2)
    family, parsed = registry.from_hf(cfg)
    assert family is qwen and parsed.qk_norm and parsed.head_dim == 128
    with pytest.raises(ConfigError, match="unsupported architecture"):
        registry.from_hf({"architectures": ["BertModel"]})
