"""`meganeura bench`: every field in one run, efficiencies that follow from the other fields, and the byte
and FLOP counts behind them checked against hand computations on tiny configs."""
import importlib.util
import json
import math
import subprocess
import sys

import pytest

from meganeura.bench import _random_checkpoint, summary
from meganeura.graph import S, Graph
from meganeura.model import Model
from meganeura.roofline import decode_bytes, step_flops

# hidden 64, 2 layers, 4 heads of 16 (2 kv heads), MLP 128, vocab 128
TINY = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
LAYERS, HIDDEN, MLP, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 2, 64, 128, 128, 4, 2, 16
BF16 = 2


def _model(tmp_path, optimize=True, quantize=None, **over):
    cfg = dict(TINY, **over)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ckpt = tmp_path / "ckpt"
    if not ckpt.exists():
        ckpt.mkdir()
        _random_checkpoint(str(tmp_path / "config.json"), str(ckpt))
    return Model(str(ckpt), backend="numpy", optimize=optimize, context=40, chunk=16, quantize=quantize)


def _layer_weights() -> int:
    """Elements of one layer's weights: q, k, v, o, gate, up, down and two norms."""
    q_o = 2 * HIDDEN * HEADS * HEAD_DIM
    k_v = 2 * HIDDEN * KV_HEADS * HEAD_DIM
    return q_o + k_v + 3 * HIDDEN * MLP + 2 * HIDDEN


def _kv_bytes(keys: float) -> float:
    """Bytes of the f32 k and v caches of every layer for `keys` keys."""
    return LAYERS * 2 * keys * KV_HEADS * HEAD_DIM * 4


@pytest.mark.parametrize("optimize", [True, False])
def test_decode_bytes_by_hand_tied(tmp_path, optimize):
    m = _model(tmp_path, optimize)
    # Tied: the LM head reads the whole embedding, so it counts once, in full, and no gathered row on top.
    weights = (LAYERS * _layer_weights() + VOCAB * HIDDEN + HIDDEN) * BF16
    for position in (0, 7, 30):
        assert decode_bytes(m.decoder.graph, m.weights, position) == weights + _kv_bytes(position + 1)
    assert decode_bytes(m.decoder.graph, m.weights, 7.5) == weights + _kv_bytes(8.5)


def test_decode_bytes_by_hand_untied_and_sliding(tmp_path):
    m = _model(tmp_path, model_type="mistral", tie_word_embeddings=False, sliding_window=4)
    # Untied: the LM head is its own weight; of the embedding only the token's row is read.
    weights = (LAYERS * _layer_weights() + VOCAB * HIDDEN + HIDDEN + HIDDEN) * BF16
    for position in (0, 2, 3, 20):
        keys = min(position + 1, 4)                          # a sliding layer reads its window only
        assert decode_bytes(m.decoder.graph, m.weights, position) == weights + _kv_bytes(keys)


@pytest.mark.parametrize("mode", ["q8", "q4"])
def test_decode_bytes_by_hand_quantized(tmp_path, mode):
    from meganeura import quant

    m = _model(tmp_path, quantize=None)
    graph = m.decoder.graph
    formats = quant.plan(graph, mode)
    # Per tensor: int8 or two 4-bit values a byte, plus an f16 scale per row (q8) or per 32 (q4); the tied
    # table (and LM head) is q8 under both, the norms stay bf16.
    def size(rows, k, fmt):
        return rows * k * (1 if fmt == "q8" else 0.5) + 2 * rows * (1 if fmt == "q8" else k // 32)
    # q, k, v take q8 under q4 too (quant.ATTENTION_INPUTS).
    layer = (size(HEADS * HEAD_DIM, HIDDEN, "q8") + size(HIDDEN, HEADS * HEAD_DIM, mode)
             + size(KV_HEADS * HEAD_DIM, HIDDEN, "q8") * 2
             + size(MLP, HIDDEN, mode) * 2 + size(HIDDEN, MLP, mode) + 2 * HIDDEN * BF16)
    weights = LAYERS * layer + size(VOCAB, HIDDEN, "q8") + HIDDEN * BF16
    assert decode_bytes(graph, m.weights, 5, formats) == weights + _kv_bytes(6)


def _linear_flops(tokens: int) -> int:
    """2·M·N·K of every projection of both layers (M = tokens), plus the LM head of the last token."""
    per_token = HIDDEN * HEADS * HEAD_DIM * 2 + HIDDEN * KV_HEADS * HEAD_DIM * 2 + 3 * HIDDEN * MLP
    return LAYERS * 2 * tokens * per_token + 2 * 1 * VOCAB * HIDDEN


@pytest.mark.parametrize("optimize", [True, False])
def test_step_flops_by_hand(tmp_path, optimize):
    g = _model(tmp_path, optimize).decoder.graph
    attention = 4 * HEADS * HEAD_DIM * LAYERS            # per key a query sees
    # Prefill of 5 tokens from position 0: query i sees i + 1 keys: 1+2+3+4+5 = 15.
    assert step_flops(g, 5, 0) == _linear_flops(5) + attention * 15
    # 3 tokens from position 10 over the cache: 11 + 12 + 13 keys.
    assert step_flops(g, 3, 10) == _linear_flops(3) + attention * 36
    # A decode step at position 20.
    assert step_flops(g, 1, 20) == _linear_flops(1) + attention * 21


def test_step_flops_window_and_experts():
    g = Graph()
    x = g.input("x", (S, 8), "f32")
    q = g.reshape(x, (S, 2, 4))
    a = g.attention(q, q, q, scale=0.5, window=3)        # no cache: keys of the step only, at most 3
    route = g.input("route", (S, 6), "f32")
    moe = g.moe(x, route, g.parameter("gu", (6, 2 * 5, 8)), g.parameter("down", (6, 8, 5)), act="silu", k=2)
    g.set_outputs([a, moe])
    per_expert = 2 * 5 * 8 + 8 * 5                       # gate|up [10, 8] and down [8, 5]
    # 5 tokens: query i sees min(i + 1, 3) keys (1+2+3+3+3); each token runs 2 experts.
    assert step_flops(g, 5, 0) == 4 * 2 * 4 * (1 + 2 + 3 + 3 + 3) + 2 * 5 * 2 * per_expert
    assert step_flops(g, 4, 0) == 4 * 2 * 4 * (1 + 2 + 3 + 3) + 2 * 4 * 2 * per_expert

def meganeura(*args):
    return subprocess.run([sys.executable, "-m", "meganeura.cli", *args], capture_output=True, text=True,
                          timeout=300)


NUMBERS = ["decode_tokens_per_s", "prefill_tokens_per_s", "ttft_s", "load_s", "compile_s", "optimize_s",
           "dispatches_per_decode_step", "dispatches_per_decode_step_unoptimized", "bytes_per_decode_step",
           "device_read_gbps", "device_gflops", "decode_efficiency", "prefill_efficiency", "prefill_flops",
           "opt_speedup", "opt_speedup_prefill", "host_encode_fraction"]
TORCH = ["torch_decode_tokens_per_s", "torch_prefill_tokens_per_s"]


def test_bench_reports_every_field(tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    r = meganeura("bench", str(cfg), "--prompt-len", "12", "--new-tokens", "3", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for key in NUMBERS:
        assert isinstance(out[key], (int, float)) and math.isfinite(out[key]) and out[key] > 0, (key, out[key])
    has_torch = all(importlib.util.find_spec(p) for p in ("torch", "transformers"))
    for key in TORCH:
        if has_torch:
            assert isinstance(out[key], float) and math.isfinite(out[key]) and out[key] > 0, (key, out)
        else:
            assert out[key] is None
    assert out["device"] and out["host_encode_fraction"] < 1
    from meganeura.backend.device import backend_note, open_device
    dev = open_device()
    assert out["device"] == dev.name and out["device_backend"] == dev.backend
    # an OpenGL device (llvmpipe without the Vulkan driver) runs, slower: the command says so on stderr
    assert ("through OpenGL" in r.stderr) == (dev.backend == "OpenGL") == (backend_note(dev) is not None)
    # The efficiencies are what their definitions make of the other fields.
    assert out["decode_efficiency"] == pytest.approx(
        out["bytes_per_decode_step"] * out["decode_tokens_per_s"] / (out["device_read_gbps"] * 1e9), rel=1e-3)
    assert out["prefill_efficiency"] == pytest.approx(
        out["prefill_flops"] * out["prefill_tokens_per_s"] / out["prompt_len"] / (out["device_gflops"] * 1e9),
        rel=1e-3)
    # The same counts as the hand-checked helpers, for this run's decode positions 12, 13 and 14.
    kv = sum(_kv_bytes(p + 1) for p in (12, 13, 14)) / 3
    assert out["bytes_per_decode_step"] == round((LAYERS * _layer_weights() + VOCAB * HIDDEN + HIDDEN) * BF16 + kv)
    assert out["prefill_flops"] == _linear_flops(12) + 4 * HEADS * HEAD_DIM * LAYERS * sum(range(1, 13))
    lines = summary(out)
    assert 3 <= len(lines) <= 8 and all("\n" not in line for line in lines)


@pytest.mark.parametrize("args", [["missing-dir"], ["{cfg}", "--prompt-len", "0"], ["{cfg}", "--new-tokens", "0"],
                                  ["{cfg}", "--prompt-len", "300"], ["{broken}"]])
def test_bad_bench_input_exits_2_with_one_line(tmp_path, args):
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    (tmp_path / "broken.json").write_text("{not json")
    paths = {"cfg": str(tmp_path / "tiny.json"), "broken": str(tmp_path / "broken.json")}
    r = meganeura("bench", *[a.format(**paths) for a in args])
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if not line.startswith("error: XDG")]
    assert len(lines) == 1 and lines[0].startswith("meganeura: error:"), r.stderr
