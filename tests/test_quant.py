"""Quantized weights: the formats against GGUF's reference quantizer, the kernels against the reference
executor on the same dequantized values, and whole models against their unquantized selves."""
import os
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import meganeura as mn
from meganeura import quant
from meganeura.graph import S
from meganeura.weights import write_safetensors

import oracle


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("tag", ["Q8_0", "Q4_0"])
def test_formats_are_ggufs_blocks_bit_for_bit(tag):
    from gguf import GGMLQuantizationType, quants

    a = rand(6, 96) * np.logspace(-3, 2, 96, dtype=np.float32)
    a[0] = 0.0                                  # a zero block quantizes to zero scales
    blocks = quants.quantize(a, getattr(GGMLQuantizationType, tag))
    fmt = quant.GGUF_BLOCKS[tag][0]
    q, s = fmt.quantize(a)
    q_gguf, s_gguf = quant.from_blocks(blocks, tag, a.shape)
    assert np.array_equal(q, q_gguf) and np.array_equal(s.view(np.uint16), s_gguf.view(np.uint16))
    np.testing.assert_array_equal(fmt.dequantize(q, s, a.shape),
                                  quants.dequantize(blocks, getattr(GGMLQuantizationType, tag)))


@pytest.mark.parametrize("name", ["q8", "q4", "q8_0"])
def test_rounding_error_is_within_half_a_step(name):
    fmt = quant.FORMATS[name]
    a = rand(40, 64) * rand(40, 1, seed=1)            # rows of very different magnitudes
    q, s = fmt.quantize(a)
    step = np.abs(np.repeat(s.astype(np.float32), fmt.group_of(64), axis=1))
    levels = 127 if fmt.bits == 8 else 8
    # Half a step, plus the f16 rounding of the scale over the largest level; 4 bits have levels -8..7 and
    # the block's largest magnitude at -8, so a value beyond 7.5 steps the other way is clipped to 7.
    half = np.where(np.abs(a) > 7.5 * step, 1.0, 0.5) if fmt.bits == 4 else 0.5
    bound = step * (half + levels * 2.0 ** -11)
    assert np.all(np.abs(fmt.dequantize(q, s, a.shape) - a) <= bound + 1e-12)
    assert fmt.nbytes(a.shape) == q.nbytes + s.nbytes + (-q.nbytes % 4) + (-s.nbytes % 4)


def test_which_parameters_a_mode_quantizes(hf_checkpoint):
    path, _ = hf_checkpoint("qwen3_moe")
    graph = mn.load_model(path, backend="numpy").program.graph
    plan = quant.plan(graph, "q4")
    names = set(plan)
    assert "model.embed_tokens.weight" in names and plan["model.embed_tokens.weight"].name == "q8"
    assert plan["lm_head.weight"].name == "q8"
    assert any("experts.gate_up_proj" in n for n in names) and any("o_proj" in n for n in names)
    assert all(plan[n].name == ("q8" if "q_proj" in n else "q4") for n in names if "layers" in n)
    assert {f.name for f in quant.plan(graph, "q4_0").values()} == {"q4"}      # GGUF's Q4_0: every matrix
    assert not any("norm" in n for n in names)                      # vectors stay as stored
    assert not any(n.endswith("mlp.gate.weight") for n in names)    # routers too (see quant.routers)
    assert quant.plan(graph, None) == {}
    with pytest.raises(ValueError, match="quantize must be one of"):
        quant.plan(graph, "q3")


@settings(max_examples=10, deadline=None)
@given(s=st.sampled_from([1, 3, 9, 13, 17, 40]), k=st.sampled_from([32, 64, 96]), n=st.integers(1, 40),
       act=st.sampled_from([None, "silu"]), norm=st.sampled_from([None, "weighted"]),
       mode=st.sampled_from(["q8", "q4", "q8_0"]), layout=st.sampled_from(["cpu", "gpu"]),
       window_rows=st.sampled_from([None, 5]), plain_device=st.booleans())
def test_quantized_linear_equals_the_reference_on_the_same_values(s, k, n, act, norm, mode, layout, window_rows,
                                                                   plain_device):
    """Every kernel that reads a quantized weight (streamed packs, the tiled GEMM's elements; both layouts;
    weights split into windows; with and without f16 and subgroups) computes with exactly the dequantized values the reference uses."""
    check_quantized_linear(s, k, n, act, norm, mode, layout, window_rows, plain_device)


@pytest.mark.parametrize("mode, k", [("q4", 32), ("q4", 288), ("q8_0", 64), ("q8", 96), ("q8", 40)])
@pytest.mark.parametrize("act, norm, n", [(None, None, 37), (None, "weighted", 38), ("silu", "weighted", 37)])
def test_quantized_decode_products(mode, k, act, norm, n):
    """One token on a CPU device: a lane takes whole texels of quantized packs (4 q4 or 2 q8 under one
    scale; q8's scale is the row's) over shares partial at the row's end, or packs where a row's packs
    do not fill whole texels (q8 with K = 40); rows go in pairs (gate and up, or n and n + N / 2)."""
    check_quantized_linear(1, k, n, act, norm, mode, "cpu", None, False)


def check_quantized_linear(s, k, n, act, norm, mode, layout, window_rows, plain_device):
    g = mn.Graph()
    rows = 2 * n if act else n
    x = g.input("x", (S, k))
    params = {"w": (rand(rows, k, seed=1) / np.sqrt(k), "bf16")}
    kw = dict(norm=norm, eps=1e-5, act=act)
    if norm == "weighted":
        kw["norm_w"] = g.parameter("nw", (k,))
        params["nw"] = (1 + rand(k, seed=2) / 4, "f32")
    g.set_outputs({"y": g.fused_linear(x, g.parameter("w", (rows, k)), **kw)})
    with tempfile.TemporaryDirectory() as d, pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEGANEURA_LAYOUT", layout)
        if plain_device:
            mp.setenv("MEGANEURA_DISABLE", "shader-f16,subgroup")
        if window_rows is not None:
            mp.setenv("MEGANEURA_MAX_BINDING", str(max(4 * k, window_rows * k + 16)))
        write_safetensors(os.path.join(d, "w.safetensors"), params)
        weights = mn.open_weights(d)
        feed = {"x": rand(s, k, seed=3)}
        gpu = mn.compile(g, optimize=False, quantize=mode).run(feed, weights)["y"]
        ref = mn.compile(g, backend="numpy", optimize=False, quantize=mode).run(feed, weights)["y"]
        plain = mn.compile(g, backend="numpy", optimize=False).run(feed, weights)["y"]
    np.testing.assert_allclose(gpu, ref, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(ref).max()))
    assert not np.array_equal(ref, plain)          # the weights really were quantized


# Families and features the quantized kernels meet: untied llama, Qwen3 experts (and its router kept),
# Gemma-4 with per-layer embeddings, a tied table, KV sharing, and Gemma-4 experts.
MODEL_CASES = ["llama_basic", "qwen3_moe", "gemma4_e2b_like", "gemma4_26b_like"]


@pytest.mark.parametrize("mode", ["q8", "q4"])
@pytest.mark.parametrize("case", MODEL_CASES)
def test_quantized_models_equal_the_reference_on_gpu(case, mode, hf_checkpoint):
    path, _ = hf_checkpoint(case)
    ids = np.random.default_rng(3).integers(0, 128, 11)
    gpu = mn.load_model(path, quantize=mode)
    ref = mn.load_model(path, quantize=mode, backend="numpy")
    want = ref.logits(ids)
    np.testing.assert_allclose(gpu.logits(ids), want, rtol=1e-4, atol=oracle.tolerance(want, 1e-4))
    assert gpu.generate_ids(ids, max_new_tokens=6) == ref.generate_ids(ids, max_new_tokens=6)


def hf_initialised(model, std: float = 0.02):
    """The oracle model with its matrices at HF's initialisation scale (`initializer_range`), norms and
    biases still randomised: as well-conditioned as a trained model, unlike the parity tests' 1/sqrt(fan_in)
    matrices, whose tiny random models turn a 0.5% perturbation of the weights into a logit cosine of 0.98."""
    import torch

    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point() and t.ndim >= 2:
                t.mul_(std / t.std())
    return model


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.mark.parametrize("case", [c for c in oracle.CASES if not c.startswith("gemma4")])
def test_quantized_logits_stay_close_to_the_unquantized_model(case, tmp_path):
    """Cosine of every token's logits to the float model's: q8 >= 0.999, q4 >= 0.98 (the reference executor:
    the kernels are held to it by the test above)."""
    hf_initialised(oracle.build(case)).save_pretrained(tmp_path)
    ids = np.random.default_rng(3).integers(0, 128, 11)
    base = mn.load_model(tmp_path, backend="numpy").logits(ids)
    for mode, least in (("q8", 0.999), ("q4", 0.98)):
        got = cosines(mn.load_model(tmp_path, quantize=mode, backend="numpy").logits(ids), base)
        assert got.min() >= least, (mode, got.min())


def test_bad_quantize_modes_are_rejected(hf_checkpoint):
    path, _ = hf_checkpoint("llama_basic")
    with pytest.raises(ValueError, match="quantize must be one of q8, q4"):
        mn.load_model(path, quantize="int8")


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 300), k=st.sampled_from([32, 64, 96, 256]), experts=st.sampled_from([None, 3]),
       name=st.sampled_from(["q8", "q4", "q8_0"]), limit=st.integers(0, 5000))
def test_quantized_windows_fill_but_never_overflow_a_binding(rows, k, experts, name, limit):
    from meganeura.backend.plan import weight_windows

    fmt = quant.FORMATS[name]
    shape = (rows, k) if experts is None else (rows, experts, k)
    row = fmt.nbytes((1, *shape[1:]))                      # one row alone, padded
    binding = row + 8 + limit
    windows = weight_windows(shape, 0, binding, fmt)
    assert windows[0][0] == 0 and windows[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))
    for r0, r1 in windows:
        assert fmt.nbytes((r1 - r0, *shape[1:])) <= binding
    if len(windows) > 1:                                   # a full window could not take one more row
        r0, r1 = windows[0]
        assert fmt.nbytes((r1 - r0 + 1, *shape[1:])) > binding - 8
