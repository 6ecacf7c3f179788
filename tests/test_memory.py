"""Memory planning from config.json alone (`meganeura run MODEL --dry-run`, `--memory-limit`): byte counts
against real checkpoints and the device buffers a loaded model holds, the context rule a run uses, the
verdicts and their one-line reasons."""
import json
import math
import os

import pytest

import meganeura as mn
from meganeura import quant
from meganeura.cli import main
from meganeura.graph import Graph
from meganeura.memory import Limits, parse_size, plan_memory
from meganeura.models import registry
from meganeura.weights import open_weights, plan as bind

GEMMA_12B = os.path.join(os.path.dirname(__file__), "data", "gemma-4-12b-config.json")
NO_MEMORY = Limits(128 << 20, 256 << 20, None, "test limits")


def run(capsys, *args):
    code = main(["run", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_gemma_4_12b_at_q4_fits_16gb(capsys):
    code, out, err = run(capsys, GEMMA_12B, "--dry-run", "--quantize", "q4", "--memory-limit", "16GB")
    assert code == 0, err
    assert err == ""
    assert out.strip().splitlines()[-1] == "fits"
    assert "model.embed_tokens.weight [262144, 3840] q8" in out      # the table (and the tied head) once, split
    assert "full: 8 layers" in out and "sliding: 40 layers" in out
    plan = plan_memory(GEMMA_12B, quantize="q4", limit=16 * 10**9)
    # 10.9G matrix and 1.0G table parameters, all at 8 bits or less plus their scales
    assert 6.5e9 < plan.weight_bytes < 8.5e9
    assert plan.total <= 16 * 10**9


def test_gemma_4_12b_at_bf16_does_not_fit_16gb(capsys):
    code, out, err = run(capsys, GEMMA_12B, "--dry-run", "--memory-limit", "16GB")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("meganeura: error: gemma-4-12b needs ")
    assert "weights 23.81 GB bf16" in err                          # 11.9G parameters x 2 bytes
    assert "KV cache" in err and "activations" in err and "the limit is 16.00 GB" in err
    assert "--quantize q" in err
    assert out.strip().splitlines()[-1] == "does not fit"


def _tiny_llama(tmp_path, **over):
    cfg = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, torch_dtype="float32")
    cfg.update(over)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


def test_tiny_limit_suggests_quantization_then_a_shorter_context(tmp_path, capsys):
    path = _tiny_llama(tmp_path)
    limit = plan_memory(path, context=4096, quantize="q8").total
    code, _, err = run(capsys, path, "--dry-run", "--context", "4096", "--memory-limit", str(limit))
    assert code == 2 and err.count("\n") == 1
    assert "the limit is" in err and "--quantize q8 needs" in err
    q4 = plan_memory(path, context=4096, quantize="q4")
    tight = q4.weight_bytes + q4.activations + q4.cache_bytes // 3
    code, _, err = run(capsys, path, "--dry-run", "--context", "4096", "--memory-limit", str(tight), "--quantize", "q4")
    assert code == 2 and err.count("\n") == 1 and "--quantize" not in err.split(";")[1]
    context = int(err.split("--context ")[1].split()[0])
    assert 0 < context < 4096
    assert plan_memory(path, context=context, quantize="q4", limit=tight).fits
    assert not plan_memory(path, context=context + 1, quantize="q4", limit=tight).fits


@pytest.mark.parametrize("bad", ["16XB", "GB", "-1GB", "0", "1e9", "16 G B", ""])
def test_bad_memory_limit_is_one_line(bad, capsys):
    code, _, err = run(capsys, GEMMA_12B, "--dry-run", f"--memory-limit={bad}")
    assert code == 2 and err.count("\n") == 1 and "--memory-limit" in err


def test_sizes():
    assert parse_size("16GB") == 16 * 10**9 == parse_size("16G") == parse_size("16 gb")
    assert parse_size("16GiB") == 16 << 30
    assert parse_size("12000MB") == 12 * 10**9
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("17179869184") == 16 << 30


def test_a_row_larger_than_a_binding_names_the_tensor(tmp_path, capsys, monkeypatch):
    path = _tiny_llama(tmp_path, torch_dtype="bfloat16")
    monkeypatch.setenv("MEGANEURA_MAX_BINDING", "200")       # down_proj rows are 128 x 2 bytes
    code, out, err = run(capsys, path, "--dry-run", "--context", "2")
    assert code == 2 and err.count("\n") == 1
    assert "model.layers.0.mlp.down_proj.weight" in err and "storage binding limit of 200 bytes" in err
    assert "cannot be placed" in out


def test_without_a_limit_only_buffers_are_checked():
    plan = plan_memory(GEMMA_12B, limits=NO_MEMORY)
    assert plan.fits and plan.limit is None
    assert any("only the buffer limits are checked" in line for line in plan.lines())
    embed = next(w for w in plan.weights if w.name == "model.embed_tokens.weight")
    assert embed.buffers == math.ceil(262144 / ((128 << 20) // 7680))    # whole 7680-byte rows per binding
    assert plan.cache.context == 65536          # the largest full-attention cache fills one 128 MiB binding


def _device_bytes(path, g, mode=None) -> int:
    """Bytes of the distinct checkpoint tensors the graph's parameters bind (a tied head binds the table's),
    each at its size in the file, or at its quantized size where `quant.plan` quantizes it."""
    ckpt = open_weights(path)
    formats = quant.plan(g, mode)
    tensors = {}
    for name, b in bind(g, ckpt).items():
        stored = sum(ckpt.tensors[t].end - ckpt.tensors[t].begin for group in b.parts for t in group)
        tensors[b.parts] = formats[name].nbytes(b.shape) if name in formats else stored
    return sum(tensors.values())


@pytest.mark.parametrize("case", ["llama_basic", "llama32", "qwen3_moe", "gemma4_e2b_like", "gemma4_31b_like"])
def test_weight_bytes_are_the_checkpoint_tensors(case, hf_checkpoint):
    path, _ = hf_checkpoint(case)
    plan = plan_memory(path, context=64, limits=NO_MEMORY)
    assert plan.dtype == "f32"
    family, cfg = registry.from_hf(path)
    g = Graph()
    family.build_graph(g, cfg, cache=plan.cache, last_only=True)
    assert plan.weight_bytes == _device_bytes(path, g)
    if case.startswith("llama"):             # every tensor of the file, a tied head counted once
        ckpt = open_weights(path)
        assert plan.weight_bytes == sum(t.end - t.begin for t in ckpt.tensors.values())
    for mode in quant.MODES:
        assert plan_memory(path, context=64, quantize=mode, limits=NO_MEMORY).weight_bytes == \
            _device_bytes(path, g, mode)


@pytest.mark.parametrize("quantize", [None, "q4"])
def test_plan_matches_the_device_buffers_of_a_run(quantize, hf_checkpoint, monkeypatch):
    """What a loaded model's generating program holds: its weights (packed by the optimizer, split into
    windows, the tied head shared) and its KV caches, against the plan, up to buffer padding."""
    path, _ = hf_checkpoint("llama32")
    monkeypatch.setenv("MEGANEURA_MAX_BINDING", "8192")
    model = mn.load_model(path, context=64, quantize=quantize)
    model.session().feed([1, 2, 3])
    runner = model.decoder._runner
    windows = sum(len(w.windows) for w in runner.params.values())
    weight_bytes, cache_bytes = runner.held_bytes()
    plan = plan_memory(path, context=64, quantize=quantize)
    assert len(runner.params["model.embed_tokens.weight"].windows) > 1
    assert abs(weight_bytes - plan.weight_bytes) <= 24 * windows
    assert cache_bytes == plan.cache_bytes


def test_default_context_is_the_one_a_run_chooses(hf_checkpoint):
    path, _ = hf_checkpoint("llama32")               # max_position_embeddings 131072
    model = mn.load_model(path)
    plan = plan_memory(path)
    assert plan.cache == model.cache


def test_a_run_over_its_memory_limit_stops_before_reading_weights(tmp_path, capsys):
    path = _tiny_llama(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    code, out, err = run(capsys, path, "--prompt", "hi", "--memory-limit", "100kB")
    assert code == 2 and err.count("\n") == 1
    assert "needs" in err and "the limit is 100.0 kB" in err and "safetensors" not in err
    assert out == ""


def test_a_repo_id_not_cached_offline_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run(capsys, "google/gemma-4-12b", "--dry-run")
    assert code == 2 and err.count("\n") == 1 and "google/gemma-4-12b is not in the local Hugging Face cache" in err


def test_without_an_adapter_the_plan_takes_webgpu_defaults(capsys, monkeypatch):
    monkeypatch.setenv("MEGANEURA_DEVICE", "no-such-adapter")        # open_device finds none
    code, out, err = run(capsys, GEMMA_12B, "--dry-run", "--quantize", "q4", "--memory-limit", "16GB")
    assert code == 0, err
    assert "one binding 128 MiB, one buffer 256 MiB (no GPU adapter opened: WebGPU's guaranteed limits)" in out
