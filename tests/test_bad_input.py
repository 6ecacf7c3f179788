"""Bad checkpoints and configs fail early with one clear ValueError-family error naming the problem."""
import json
import os
import shutil

import numpy as np
import pytest

import meganeura as mn
from meganeura.models.hf import ConfigError


@pytest.fixture
def ckpt(hf_checkpoint, tmp_path):
    """A writable copy of a small checkpoint."""
    src, _ = hf_checkpoint("llama_basic")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, drop=(), change=None):
    """Re-save model.safetensors without `drop` and with `change` (name -> array) applied."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    for name in drop:
        del tensors[name]
    tensors.update(change or {})
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_tensor_is_named(ckpt):
    _rewrite(ckpt, drop=["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(mn.CheckpointError, match=r"missing model\.layers\.1\.mlp\.up_proj\.weight"):
        mn.load_model(ckpt, backend="numpy")


def test_wrong_shape_is_named(ckpt):
    _rewrite(ckpt, change={"model.norm.weight": np.ones(63, np.float32)})
    with pytest.raises(mn.CheckpointError, match=r"model\.norm\.weight has shape \[63\], expected \[64\]"):
        mn.load_model(ckpt, backend="numpy")


def test_all_problems_in_one_error(ckpt):
    _rewrite(ckpt, drop=["model.layers.0.self_attn.q_proj.weight"],
             change={"model.norm.weight": np.ones(3, np.float32)})
    with pytest.raises(mn.CheckpointError) as e:
        mn.load_model(ckpt, backend="numpy")
    assert "q_proj" in str(e.value) and "model.norm.weight" in str(e.value)


def test_broken_config_json(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        mn.load_model(ckpt, backend="numpy")


def test_config_missing_required_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="hidden_size"):
        mn.load_model(ckpt, backend="numpy")


def test_config_field_of_wrong_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_hidden_layers"] = "two"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        mn.load_model(ckpt, backend="numpy")


def test_unknown_architecture_lists_supported(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"unsupported model_type 'gpt2'.*gemma4.*llama.*qwen3_moe"):
        mn.load_model(ckpt, backend="numpy")


def test_unsupported_rope_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 1e4}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="longrope"):
        mn.load_model(ckpt, backend="numpy")


def test_non_safetensors_file(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"PK\x03\x04 this is a zip archive, not safetensors" * 4)
    with pytest.raises(mn.CheckpointError, match="not a safetensors file"):
        mn.load_model(ckpt, backend="numpy")


def test_truncated_safetensors_file(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(mn.CheckpointError, match="truncated"):
        mn.load_model(ckpt, backend="numpy")


def test_no_weights_and_no_directory(ckpt, tmp_path):
    os.remove(ckpt / "model.safetensors")
    with pytest.raises(mn.CheckpointError, match="no .safetensors weights"):
        mn.load_model(ckpt, backend="numpy")
    from meganeura.hub import HubError
    with pytest.raises(HubError, match="no such model directory"):
        mn.load_model(tmp_path / "nowhere", backend="numpy")


def test_token_outside_vocabulary(hf_checkpoint):
    path, _ = hf_checkpoint("llama_basic")
    model = mn.load_model(path, backend="numpy")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.logits([1, 2, 500])
    with pytest.raises(ValueError, match="non-empty"):
        model.logits([])
