"""Which builder serves a checkpoint: HF `model_type` (or `architectures`) -> family module and config class."""
from __future__ import annotations

from types import ModuleType

from . import gemma4, llama, qwen
from .hf import ConfigError, read_config

# model_type -> (family module, config class)
FAMILIES: dict[str, tuple[ModuleType, type]] = {
    "llama": (llama, llama.LlamaConfig),
    "mistral": (llama, llama.LlamaConfig),
    "qwen2": (qwen, qwen.QwenConfig),
    "qwen3": (qwen, qwen.QwenConfig),
    "qwen3_moe": (qwen, qwen.QwenConfig),
    **{t: (gemma4, gemma4.Gemma4Config) for t in gemma4.MODEL_TYPES},
}

ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe",
    "Gemma4ForCausalLM": "gemma4_text", "Gemma4ForConditionalGeneration": "gemma4",
    "Gemma4UnifiedForConditionalGeneration": "gemma4_unified", "Gemma4UnifiedForCausalLM": "gemma4_unified_text",
}


def model_type_of(cfg: dict) -> str:
    kind = cfg.get("model_type")
    if kind is None:
        archs = cfg.get("architectures") or []
        kind = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if kind is None:
            raise ConfigError(f"unsupported architecture {archs or 'unknown'} (no model_type); "
                              f"supported: {', '.join(sorted(FAMILIES))}")
    if kind not in FAMILIES:
        raise ConfigError(f"unsupported model_type {kind!r}; supported: {', '.join(sorted(FAMILIES))}")
    return kind


def from_hf(source):
    """(family module, parsed config) for a config.json path, checkpoint directory or dict."""
    cfg = read_config(source)
    kind = model_type_of(cfg)
    module, config_class = FAMILIES[kind]
    cfg.setdefault("model_type", kind)
    return module, config_class.from_hf(cfg)
