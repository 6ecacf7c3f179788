"""Every op on the GPU path (lavapipe in CI) against reference.py, on hypothesis-drawn shapes including odd
sizes, with f32/f16/bf16 weights, with and without the optional device features."""
import math
import os
import re
import tempfile

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

import meganeura as mn
from meganeura.backend import kernels
from meganeura.graph import OPS, S
from meganeura.weights import write_safetensors
from wgpu_util import run_both

EXAMPLES = settings(max_examples=10, deadline=None)
dims = st.integers(1, 37)
wdtypes = st.sampled_from(["f32", "f16", "bf16"])
layouts = st.sampled_from(["cpu", "gpu"])         # attention's lane and workgroup kernels
TESTED = set()


@pytest.fixture(params=["all-features", "no-f16-no-subgroup"], autouse=True)
def features(request, monkeypatch):
    if request.param != "all-features":
        monkeypatch.setenv("MEGANEURA_DISABLE", "shader-f16,subgroup")


def check(g, out, inputs, params=None, rtol=2e-5, atol=2e-5, layout=None):
    """Run graph `g` on both backends; params: name -> (array, stored dtype), written as a checkpoint;
    `layout` forces the kernels of a CPU ("cpu": lanes, textures) or GPU device."""
    g.set_outputs({"y": out})
    TESTED.update(n.op for n in g.nodes)
    with tempfile.TemporaryDirectory() as d, pytest.MonkeyPatch.context() as mp:
        if layout is not None:
            mp.setenv("MEGANEURA_LAYOUT", layout)
        path = os.path.join(d, "w.safetensors")
        write_safetensors(path, params or {"unused": (np.zeros(1, np.float32), "f32")})
        gpu, ref = run_both(g, inputs, mn.open_weights(path))
    scale = max(1.0, float(np.abs(ref["y"]).max()))
    np.testing.assert_allclose(gpu["y"], ref["y"], rtol=rtol, atol=atol * scale)


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@EXAMPLES
@given(s=dims, k=dims, n=dims, dtype=wdtypes, transpose=st.booleans())
def test_matmul(s, k, n, dtype, transpose):
    g = mn.Graph()
    x = g.input("x", (S, k))
    w = g.parameter("w", (n, k) if transpose else (k, n))
    check(g, g.matmul(x, w, transpose_b=transpose), {"x": rand(s, k)},
          {"w": (rand(*((n, k) if transpose else (k, n)), seed=1), dtype)}, rtol=1e-4)


@EXAMPLES
@given(s=dims, v=dims, h=dims, dtype=wdtypes, scale=st.sampled_from([1.0, 512 ** 0.5]))
def test_embedding(s, v, h, dtype, scale):
    g = mn.Graph()
    ids = g.input("ids", (S,), "u32")
    out = g.embedding(g.parameter("e", (v, h)), ids, scale=scale)
    check(g, out, {"ids": np.random.default_rng(s).integers(0, v, s)}, {"e": (rand(v, h), dtype)})


@EXAMPLES
@given(s=dims, n=dims, op=st.sampled_from(["add", "mul"]), bshape=st.sampled_from(["full", "row", "one"]),
       dtype=wdtypes)
def test_broadcast_binary(s, n, op, bshape, dtype):
    g = mn.Graph()
    x = g.input("x", (S, 3, n))
    if bshape == "full":
        b, feed, params = g.input("b", (S, 3, n)), {"b": rand(s, 3, n, seed=2)}, {}
    else:
        shape = (n,) if bshape == "row" else (1,)
        b, feed, params = g.parameter("b", shape), {}, {"b": (rand(*shape, seed=2), dtype)}
    check(g, getattr(g, op)(x, b), {"x": rand(s, 3, n), **feed}, params)


@pytest.mark.parametrize("op", ["scale", "silu", "gelu_tanh", "softcap", "softmax", "sigmoid"])
@settings(max_examples=4, deadline=None)
@given(s=dims, n=dims)
def test_unary(op, s, n):
    g = mn.Graph()
    x = g.input("x", (S, n))
    out = {"scale": lambda: g.scale(x, 0.37), "silu": lambda: g.silu(x), "gelu_tanh": lambda: g.gelu_tanh(x),
           "softcap": lambda: g.softcap(x, 2.5), "softmax": lambda: g.softmax(x),
           "sigmoid": lambda: g.sigmoid(x)}[op]()
    check(g, out, {"x": 4 * rand(s, n)})


# A row width: whole vec4s (the row ops' quad loads) or not.
def widths(quads: bool):
    return st.integers(1, 9).map(lambda q: 4 * q) if quads else dims.filter(lambda n: n % 4)


@pytest.mark.parametrize("quads", [True, False])
@EXAMPLES
@given(data=st.data(), s=dims, h=st.integers(1, 4), weighted=st.booleans(), dtype=wdtypes, layout=layouts)
def test_rms_norm(quads, data, s, h, weighted, dtype, layout):
    d = data.draw(widths(quads))
    g = mn.Graph()
    x = g.input("x", (S, h, d))
    w = g.parameter("w", (d,)) if weighted else None
    with pytest.MonkeyPatch.context() as mp:        # the norm weight in a texture (cpu) or a storage buffer
        mp.setenv("MEGANEURA_LAYOUT", layout)
        check(g, g.rms_norm(x, w, 1e-6), {"x": rand(s, h, d)}, {"w": (rand(d, seed=3), dtype)} if weighted else None)


@EXAMPLES
@given(s=dims, h=st.integers(1, 4), half=st.integers(1, 20), start=st.integers(0, 5000))
def test_rope(s, h, half, start):
    g = mn.Graph()
    x = g.input("x", (S, h, 2 * half))
    pos = g.input("start_pos", (), "i32", default=0)
    inv = np.abs(rand(half, seed=4))
    check(g, g.rope(x, pos, inv, 1.1), {"x": rand(s, h, 2 * half), "start_pos": start})


@EXAMPLES
@given(s=dims, kv=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 3]), d=st.integers(1, 70),
       window=st.one_of(st.none(), st.integers(1, 9)), softcap=st.sampled_from([None, 3.0]), layout=layouts)
def test_attention(s, kv, group, d, window, softcap, layout):
    g = mn.Graph()
    q = g.input("q", (S, kv * group, d))
    k = g.input("k", (S, kv, d))
    v = g.input("v", (S, kv, d))
    out = g.attention(q, k, v, scale=d ** -0.5, window=window, softcap=softcap)
    check(g, out, {"q": rand(s, kv * group, d), "k": rand(s, kv, d, seed=1), "v": rand(s, kv, d, seed=2)},
          rtol=1e-4, layout=layout)


def test_attention_longer_than_a_key_block():
    g = mn.Graph()
    q, k, v = g.input("q", (S, 2, 8)), g.input("k", (S, 1, 8)), g.input("v", (S, 1, 8))
    check(g, g.attention(q, k, v, scale=0.3, window=100), {"q": rand(150, 2, 8), "k": rand(150, 1, 8, seed=1),
                                                          "v": rand(150, 1, 8, seed=2)}, rtol=1e-4)


@EXAMPLES
@given(s=dims, n=st.integers(2, 9), a=st.integers(0, 8), width=st.integers(1, 4))
def test_slice_and_reshape(s, n, a, width):
    a = a % n
    b = min(n, a + width)
    g = mn.Graph()
    x = g.input("x", (S, n * 3))
    y = g.slice(g.reshape(x, (S, n, 3)), 1, a, b)
    check(g, g.reshape(y, (S, (b - a) * 3)), {"x": rand(s, n * 3)})


@EXAMPLES
@given(s=dims, e=st.integers(2, 9), k=st.integers(1, 4), normalize=st.booleans(), h=dims, im=dims, dtype=wdtypes,
       act=st.sampled_from(["silu", "gelu_tanh"]))
def test_topk_route_and_moe(s, e, k, normalize, h, im, dtype, act):
    k = min(k, e)
    g = mn.Graph()
    x = g.input("x", (S, h))
    logits = g.input("logits", (S, e))
    route = g.topk_route(g.softmax(logits), k, normalize)
    out = g.moe(x, route, g.parameter("gu", (e, 2 * im, h)), g.parameter("dn", (e, h, im)), act=act, k=k)
    check(g, out, {"x": rand(s, h), "logits": 3 * rand(s, e, seed=5)},
          {"gu": (rand(e, 2 * im, h, seed=6), dtype), "dn": (rand(e, h, im, seed=7), dtype)}, rtol=1e-4)
    g2 = mn.Graph()
    check(g2, g2.topk_route(g2.input("p", (S, e)), k, normalize), {"p": rand(s, e, seed=8)})


# ---------------------------------------------------------------- fused ops

@EXAMPLES
@given(s=dims, n=dims, act=st.sampled_from(["silu", "gelu_tanh"]))
def test_glu(s, n, act):
    g = mn.Graph()
    gate, up = g.input("g", (S, n)), g.input("u", (S, n))
    check(g, g.glu(gate, up, act), {"g": 4 * rand(s, n), "u": rand(s, n, seed=1)})


@pytest.mark.parametrize("quads", [True, False])
@EXAMPLES
@given(data=st.data(), s=dims, h=st.integers(1, 3), weighted=st.booleans(), scaled=st.booleans(), dtype=wdtypes,
       layout=layouts)
def test_add_norm(quads, data, s, h, weighted, scaled, dtype, layout):
    n = data.draw(widths(quads))
    g = mn.Graph()
    res, y = g.input("h", (S, h, n)), g.input("y", (S, h, n))
    w = g.parameter("w", (n,)) if weighted else None
    c = g.parameter("c", (1,)) if scaled else None
    params = {**({"w": (rand(n, seed=3), dtype)} if weighted else {}),
              **({"c": (np.array([0.7], np.float32), dtype)} if scaled else {})}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEGANEURA_LAYOUT", layout)
        check(g, g.add_norm(res, y, w, 1e-6, c), {"h": rand(s, h, n), "y": 3 * rand(s, h, n, seed=1)}, params or None)


def linear_case(g, s, k, n, lead, norm, bias, act, softcap, residual, dtype):
    """A fused linear over x[S, *lead, k] and its feeds and checkpoint."""
    rows = 2 * n if act else n
    x = g.input("x", (S, *lead, k))
    feed, params = {"x": rand(s, *lead, k)}, {"w": (rand(rows, k, seed=1) / np.sqrt(k), dtype)}
    kw = dict(norm=norm, eps=1e-5, act=act, softcap=softcap)
    if norm == "weighted":
        kw["norm_w"] = g.parameter("nw", (k,))
        params["nw"] = (1 + rand(k, seed=2) / 4, dtype)
    if bias:
        kw["bias"] = g.parameter("b", (rows,))
        params["b"] = (rand(rows, seed=3), dtype)
    if residual:
        kw["residual"] = g.input("r", (S, *lead, n))
        feed["r"] = rand(s, *lead, n, seed=4)
    return g.fused_linear(x, g.parameter("w", (rows, k)), **kw), feed, params


@pytest.mark.parametrize("norm", [None, "weighted", "unit"])
@pytest.mark.parametrize("act", [None, "silu", "gelu_tanh"])
@settings(max_examples=6, deadline=None)
@given(s=dims, k=dims, n=dims, lead=st.sampled_from([(), (2,)]), bias=st.booleans(),
       softcap=st.sampled_from([None, 1.5]), residual=st.booleans(), dtype=wdtypes)
def test_linear(norm, act, s, k, n, lead, bias, softcap, residual, dtype):
    g = mn.Graph()
    out, feed, params = linear_case(g, s, k, n, lead, norm, bias, act, softcap, residual, dtype)
    check(g, out, feed, params, rtol=1e-4)


@pytest.mark.parametrize("layout", ["cpu", "gpu"])
@settings(max_examples=12, deadline=None)
@given(s=st.sampled_from([1, 2, 3, 5, 8, 9, 13, 15, 16, 17, 40]), k=st.integers(1, 6).map(lambda p: 8 * p), n=dims,
       lead=st.sampled_from([(), (2,)]), norm=st.sampled_from([None, "weighted", "unit"]),
       act=st.sampled_from([None, "silu"]), bias=st.booleans(), softcap=st.sampled_from([None, 1.5]),
       residual=st.booleans(), dtype=wdtypes)
def test_linear_streamed(layout, s, k, n, lead, norm, act, bias, softcap, residual, dtype):
    """K a multiple of 8: the streamed kernels (both layouts, every step-size variant, token blocks partial
    at the step's end) with every epilogue."""
    g = mn.Graph()
    out, feed, params = linear_case(g, s, k, n, lead, norm, bias, act, softcap, residual, dtype)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEGANEURA_LAYOUT", layout)
        check(g, out, feed, params, rtol=1e-4)


@pytest.mark.parametrize("s", [15, 16, 40])
@pytest.mark.parametrize("act", [None, "silu"])
def test_prefill_product_token_blocks(s, act):
    """On a CPU device a step of 16 tokens or more streams each weight texel through blocks of 32 tokens:
    one whole block, one and a partial one (40), and a shorter step's blocks of 8 (15)."""
    g = mn.Graph()
    out, feed, params = linear_case(g, s, 64, 37, (), "weighted", True, act, 1.5, True, "bf16")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEGANEURA_LAYOUT", "cpu")
        check(g, out, feed, params, rtol=1e-4)


@pytest.mark.parametrize("n, k", [(38, 64), (38, 1024), (37, 64)])
@pytest.mark.parametrize("lead", [(), (2,)])
def test_decode_product_rows_in_pairs(n, k, lead):
    """A one-token product on a CPU device with short rows walks rows n and n + N / 2 together, each with its
    own bias, softcap and residual (an odd N, or long rows, one at a time)."""
    g = mn.Graph()
    out, feed, params = linear_case(g, 1, k, n, lead, "weighted", True, None, 1.5, True, "bf16")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEGANEURA_LAYOUT", "cpu")
        check(g, out, feed, params, rtol=1e-4)


@pytest.mark.parametrize("s, k, n", [(1, 8, 140001), (2080, 8192, 3)])
def test_products_whose_invocations_would_loop_past_lavapipes_limit(monkeypatch, s, k, n):
    """lavapipe ends an invocation's loops after 65535 iterations in all: a one-token product whose rows
    would all fall to one subgroup (a large vocabulary's LM head; one core), and a long step streaming
    65 blocks of 32 tokens over rows of 1024 packs, both spread their work so that each invocation stays
    below it (LOOP_TRIPS)."""
    monkeypatch.setattr(kernels, "CORES", 1)
    monkeypatch.setenv("MEGANEURA_LAYOUT", "cpu")
    g = mn.Graph()
    out, feed, params = linear_case(g, s, k, n, (), None, False, None, None, False, "bf16")
    check(g, out, feed, params, rtol=1e-4)


def run_unoptimized(g, feed, params, dtype, layout, s) -> list[str]:
    """Run graph `g` (output "y") unoptimized on both backends with `params` stored as `dtype` (q8, q4:
    quantized from f32) on `layout`, check the outputs agree, and return the labels of an s-token step's
    dispatches."""
    quantize = dtype if dtype in ("q8", "q4") else None
    with tempfile.TemporaryDirectory() as d, pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEGANEURA_LAYOUT", layout)
        path = os.path.join(d, "w.safetensors")
        write_safetensors(path, params)
        weights = mn.open_weights(path)
        program = mn.compile(g, backend="wgpu", optimize=False, quantize=quantize)
        gpu = program.run(feed, weights)
        ref = mn.compile(g, backend="numpy", optimize=False, quantize=quantize).run(feed, weights)
        labels = [k.label for k, _ in program._runner.dispatches if k.runs_for(s)]
    np.testing.assert_allclose(gpu["y"], ref["y"], rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref["y"]).max())))
    return labels


@pytest.mark.parametrize("s", [1, 3])
@settings(max_examples=6, deadline=None)
@given(k=st.sampled_from([8, 64, 200, 1024]), weighted=st.booleans(), scaled=st.booleans(),
       act=st.sampled_from([None, "gelu_tanh"]), dtype=st.sampled_from(["f32", "bf16", "q8", "q4"]))
def test_add_norm_computed_in_the_next_products_prologue(s, k, weighted, scaled, act, dtype):
    """Gemma's residual stream: h2 = h + rms_norm(y) read by a normed product and then by the next add_norm.
    On a CPU device a one-token step computes h2 in the product's prologue (no add_norm dispatch) and the
    product stores it for the later reader; a longer step dispatches the add_norm."""
    g = mn.Graph()
    h, y = g.input("h", (S, k)), g.input("y", (S, k))
    w = g.parameter("w", (k,)) if weighted else None
    c = g.parameter("c", (1,)) if scaled else None
    h2 = g.add_norm(h, y, w, 1e-6, c)
    rows = 2 * k if act else k
    product = g.fused_linear(h2, g.parameter("p", (rows, k)), norm="weighted", norm_w=g.parameter("nw", (k,)),
                             eps=1e-5, act=act)
    out = g.add_norm(h2, product, None, 1e-6)
    g.set_outputs({"y": out})
    quantized = dtype in ("q8", "q4")
    params = {"p": (rand(rows, k, seed=1) / np.sqrt(k), "f32" if quantized else dtype),
              "nw": (1 + rand(k, seed=2) / 4, "bf16"),
              **({"w": (rand(k, seed=3), "bf16")} if weighted else {}),
              **({"c": (np.array([0.7], np.float32), "bf16")} if scaled else {})}
    feed = {"h": rand(s, k), "y": 3 * rand(s, k, seed=4)}
    labels = run_unoptimized(g, feed, params, dtype, "cpu", s)
    folded = s == 1 and os.environ.get("MEGANEURA_DISABLE") is None
    assert labels.count("add_norm") == (1 if folded else 2)


@pytest.mark.parametrize("layout", ["cpu", "gpu"])
@pytest.mark.parametrize("s", [1, 4])
@settings(max_examples=5, deadline=None)
@given(k=st.sampled_from([8, 64, 200]), n=st.integers(1, 40), source=st.sampled_from(["add_norm", "mul"]),
       softcap=st.sampled_from([None, 30.0]), dtype=st.sampled_from(["f32", "bf16", "q8", "q4"]))
@example(k=2112, n=5, source="add_norm", softcap=None, dtype="bf16")     # rows too long for the one-token kernel
def test_the_lm_head_reads_the_last_row_in_place(layout, s, k, n, source, softcap, dtype):
    """A final norm's LM head over last_row: the product reads row S - 1 of the source itself (no last_row
    dispatch), and on a CPU device with subgroups computes the add_norm it comes from in its prologue, that
    row only, in every step (no add_norm dispatch), where a row fits the one-token kernel."""
    g = mn.Graph()
    h, y = g.input("h", (S, k)), g.input("y", (S, k))
    x = g.add_norm(h, y, g.parameter("w", (k,)), 1e-6, g.parameter("c", (1,))) if source == "add_norm" \
        else g.mul(h, y)
    out = g.fused_linear(g.last_row(x), g.parameter("p", (n, k)), norm="weighted", norm_w=g.parameter("nw", (k,)),
                         eps=1e-5, softcap=softcap)
    quantized = dtype in ("q8", "q4")
    params = {"p": (rand(n, k, seed=1) / np.sqrt(k), "f32" if quantized else dtype),
              "nw": (1 + rand(k, seed=2) / 4, "bf16"), "w": (rand(k, seed=3), "bf16"),
              "c": (np.array([0.7], np.float32), "bf16")}
    feed = {"h": rand(s, k), "y": 3 * rand(s, k, seed=4)}
    g.set_outputs({"y": out})
    labels = run_unoptimized(g, feed, params, dtype, layout, s)
    assert "last_row" not in labels
    from meganeura.backend import kernels
    from meganeura.backend.device import open_device
    lanes = open_device().subgroup_size         # a lane holds at most GEMV_MAX_PACKS_PER_LANE packs of 8
    one_token_kernel = layout == "cpu" and 0 < k <= 8 * lanes * kernels.GEMV_MAX_PACKS_PER_LANE
    assert labels.count("add_norm") == (source == "add_norm" and not one_token_kernel)


@settings(max_examples=12, deadline=None)
@given(s=st.integers(1, 150), k=st.integers(1, 80), n=st.integers(1, 150), lead=st.sampled_from([(), (2,)]),
       norm=st.sampled_from([None, "weighted", "unit"]), act=st.sampled_from([None, "silu", "gelu_tanh"]),
       bias=st.booleans(), softcap=st.sampled_from([None, 1.5]), residual=st.booleans(),
       window_rows=st.sampled_from([None, 7, 50]), dtype=wdtypes)
def test_linear_tiles(s, k, n, lead, norm, act, bias, softcap, residual, window_rows, dtype):
    """The tiled GEMM (the GPU layout takes it for steps of more than 8 tokens and for any K not a multiple
    of 8) over several output tiles, partial at both edges, with every prologue and epilogue, and with the
    weight in row windows of `window_rows` rows (a gated one then goes through scratch and a gate pass)."""
    g = mn.Graph()
    out, feed, params = linear_case(g, s, k, n, lead, norm, bias, act, softcap, residual, dtype)
    rows = 2 * n if act else n
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEGANEURA_LAYOUT", "gpu")
        if window_rows is not None:     # vectors (bias, norm weight) must still fit one binding
            row_bytes = k * (4 if dtype == "f32" else 2)
            mp.setenv("MEGANEURA_MAX_BINDING", str(max(4 * max(rows, k), window_rows * row_bytes)))
        check(g, out, feed, params, rtol=1e-4)


@settings(max_examples=10, deadline=None)
@given(s=st.integers(1, 150), k=st.integers(1, 80), n=st.integers(1, 150), transpose=st.booleans(),
       b_is_weight=st.booleans(), dtype=wdtypes)
def test_matmul_tiles(s, k, n, transpose, b_is_weight, dtype):
    """The tiled GEMM as a plain matmul over several output tiles: B [N, K] or [K, N], a weight or an
    activation."""
    g = mn.Graph()
    shape = (n, k) if transpose else (k, n)
    b_value = rand(*shape, seed=1)
    x = g.input("x", (S, k))
    if b_is_weight:
        b, feed, params = g.parameter("w", shape), {"x": rand(s, k)}, {"w": (b_value, dtype)}
    else:
        b, feed, params = g.input("b", shape), {"x": rand(s, k), "b": b_value}, None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEGANEURA_LAYOUT", "gpu")
        check(g, g.matmul(x, b, transpose_b=transpose), feed, params, rtol=1e-4)


@settings(max_examples=16, deadline=None)
@given(s=st.sampled_from([9, 30, 64, 65, 100]), k=st.integers(17, 200), n=st.integers(1, 150),
       lead=st.sampled_from([(), (2,)]), norm=st.sampled_from([None, "weighted", "unit"]),
       act=st.sampled_from([None, "silu"]), bias=st.booleans(), softcap=st.sampled_from([None, 1.5]),
       residual=st.booleans(), window_rows=st.sampled_from([None, 50]), dtype=wdtypes,
       min_k=st.sampled_from([16, 40]))
def test_short_steps_share_k_among_workgroups(s, k, n, lead, norm, act, bias, softcap, residual, window_rows,
                                              dtype, min_k):
    """On a GPU a step of one row of tiles (up to 64 tokens) multiplies each tile in several workgroups,
    each over its own share of K (the last shorter, some empty), and a second pass adds their sums, the up
    rows' and the rows' sums of squares, and applies the norm's 1/rms, bias, gate, softcap and residual;
    longer steps run whole. Weight windows (of an ungated weight) write their own columns; a leading
    dimension gives the step more rows than tokens."""
    from meganeura.backend import kernels
    g = mn.Graph()
    out, feed, params = linear_case(g, s, k, n, lead, norm, bias, act, softcap, residual, dtype)
    g.set_outputs({"y": out})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "GEMM_SPLIT_MIN_K", min_k)
        if window_rows is not None and act is None:
            mp.setenv("MEGANEURA_MAX_BINDING", str(max(4 * max(n, k), window_rows * k * 4)))
        labels = run_unoptimized(g, feed, params, dtype, "gpu", s)
    assert labels.count("linear_splits") == (s <= 64 and k >= 2 * min_k)


BINDING = 128      # bytes: every weight row and vector below fits, every weight matrix needs windows


@EXAMPLES
@given(s=dims, k=st.integers(9, 32), n=st.integers(8, 32), gated=st.booleans(),
       norm=st.sampled_from([None, "weighted", "unit"]), bias=st.booleans(), softcap=st.sampled_from([None, 1.5]),
       residual=st.booleans(), dtype=wdtypes)
def test_linear_weight_windows(s, k, n, gated, norm, bias, softcap, residual, dtype):
    """Row windows of the weight each fill their own output columns; a gated weight's gate and up rows
    land in different windows."""
    act = "silu" if gated else None
    n = n // 2 if gated else n
    rows = 2 * n if gated else n
    assert rows * k * 2 > BINDING >= max(rows, k) * 4
    g = mn.Graph()
    out, feed, params = linear_case(g, s, k, n, (), norm, bias, act, softcap, residual, dtype)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEGANEURA_MAX_BINDING", str(BINDING))
        check(g, out, feed, params, rtol=1e-4)


def attention_case(g, s, kv, group, d, norms, rope, packed, order, pad, dtype):
    """fused_attention over either one packed [S, pad | q | k | v (in `order`) | pad] tensor or three."""
    nh = kv * group
    sizes = {"q": nh * d, "k": kv * d, "v": kv * d}
    feed, params, kw = {}, {}, {}
    if packed:
        at, width = {}, pad
        for name in order:
            at[name], width = width, width + sizes[name]
        x = g.input("qkv", (S, width + pad))
        feed["qkv"] = rand(s, width + pad)
        q = k = v = x
        kw.update(q_at=at["q"], k_at=at["k"], v_at=at["v"])
    else:
        q, k, v = g.input("q", (S, nh, d)), g.input("k", (S, kv, d)), g.input("v", (S, kv, d))
        feed.update(q=rand(s, nh, d), k=rand(s, kv, d, seed=1), v=rand(s, kv, d, seed=2))
    if norms & 1:
        kw["q_norm_w"] = g.parameter("qn", (d,))
        params["qn"] = (1 + rand(d, seed=5) / 4, dtype)
    if norms & 2:
        kw["k_norm_w"] = g.parameter("kn", (d,))
        params["kn"] = (1 + rand(d, seed=6) / 4, dtype)
    if rope:
        kw.update(pos=g.input("start_pos", (), "i32", default=0), rope=(np.abs(rand(d // 2, seed=7)), 1.1))
    return q, k, v, dict(kw, heads=nh, kv_heads=kv, head_dim=d, norms=norms, eps=1e-6), feed, params


@EXAMPLES
@given(s=dims, kv=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 3]), half=st.integers(1, 20),
       odd=st.booleans(), norms=st.integers(0, 7), rope=st.booleans(), start=st.integers(0, 5000),
       packed=st.booleans(), order=st.permutations("qkv"), pad=st.integers(0, 3),
       window=st.one_of(st.none(), st.integers(1, 9)), softcap=st.sampled_from([None, 3.0]), dtype=wdtypes,
       layout=layouts)
def test_fused_attention(s, kv, group, half, odd, norms, rope, start, packed, order, pad, window, softcap, dtype,
                         layout):
    d = 2 * half + (odd and not rope)
    g = mn.Graph()
    q, k, v, kw, feed, params = attention_case(g, s, kv, group, d, norms, rope, packed, order, pad, dtype)
    out = g.fused_attention(q, k, v, scale=d ** -0.5, window=window, softcap=softcap, **kw)
    check(g, out, {**feed, **({"start_pos": start} if rope else {})}, params or None, rtol=1e-4, layout=layout)


def test_fused_attention_longer_than_a_key_block():
    g = mn.Graph()
    q, k, v, kw, feed, params = attention_case(g, 150, 1, 2, 8, 7, True, True, "vqk", 1, "bf16")
    out = g.fused_attention(q, k, v, scale=0.3, window=100, **kw)
    check(g, out, {**feed, "start_pos": 1000}, params, rtol=1e-4)


@EXAMPLES
@given(s=dims, n=st.integers(1, 300) | st.integers(4000, 9000), lead=st.sampled_from([(), (2,)]), layout=layouts)
def test_last_row_and_argmax(s, n, lead, layout):
    """Rows past a GPU argmax workgroup's first round of loads too (it takes 4 x 1024 elements a round)."""
    g = mn.Graph()
    x = g.input("x", (S,) + lead + (n,))
    # rounded and capped: many ties at the maximum, where the first index must win
    feed = {"x": np.minimum(np.round(rand(s, *lead, n) * 2), 1.0)}
    check(g, g.last_row(x), feed)
    g = mn.Graph()
    out = g.argmax(g.input("x", (S,) + lead + (n,)))
    g.set_outputs({"y": out})
    TESTED.add("argmax")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEGANEURA_LAYOUT", layout)
        gpu, ref = run_both(g, feed, {})
    assert gpu["y"].dtype == np.uint32 and np.array_equal(gpu["y"], ref["y"])


def test_argmax_where_the_workgroup_limit_is_not_a_power_of_two(monkeypatch):
    """A GPU argmax's workgroup follows the device's limit down to a power of two (its tree reduction halves
    it): a device allowing 768 invocations gets 512, not 768."""
    from meganeura.backend.device import open_device

    monkeypatch.setenv("MEGANEURA_LAYOUT", "gpu")
    monkeypatch.setitem(open_device().limits, "max-compute-invocations-per-workgroup", 768)
    g = mn.Graph()
    g.set_outputs({"y": g.argmax(g.input("x", (S, 5000)))})
    at = [*range(16), 2500, 4999]                   # row r's maximum: in each of the first lanes, and later
    x = rand(len(at), 5000)
    x[np.arange(len(at)), at] = 10.0
    gpu, ref = run_both(g, {"x": x}, {})
    assert list(ref["y"]) == at and np.array_equal(gpu["y"], ref["y"])


def cached_attention_graph(kv, group, d, slots, window, at, norm, rope, fused):
    """q [S, nh, d]; k and v read at column `at` of one [S, pad | k | v] tensor into two caches of `slots`
    slots (k normed and rotated on the way in when asked), then attention over the caches."""
    nh = kv * group
    g = mn.Graph()
    pos = g.input("start_pos", (), "i32", default=0)
    q = g.input("q", (S, nh, d))
    x = g.input("x", (S, at + 2 * kv * d))
    table = (tuple(np.abs(rand(d // 2, seed=7)).tolist()), 1.1) if rope else None
    nw = g.parameter("kn", (d,)) if norm == "weighted" else None
    kc = g.cache_write(g.state("k_cache", (slots, kv, d)), x, pos, at=at, norm=norm, norm_w=nw, eps=1e-6,
                       rope=table)
    vc = g.cache_write(g.state("v_cache", (slots, kv, d)), x, pos, at=at + kv * d)
    if fused:
        out = g.fused_attention(q, kc, vc, heads=nh, kv_heads=kv, head_dim=d, norms=0, pos=pos, rope=table,
                                scale=d ** -0.5, window=window, cached=True)
    else:
        out = g.attention(q, kc, vc, scale=d ** -0.5, window=window, pos=pos)
    g.set_outputs({"y": out})
    return g


@settings(max_examples=6, deadline=None)
@given(kv=st.sampled_from([1, 2]), group=st.sampled_from([1, 3]), half=st.integers(1, 12),
       window=st.one_of(st.none(), st.integers(1, 7)), at=st.integers(0, 3),
       norm=st.sampled_from([None, "weighted", "unit"]), rope=st.booleans(), fused=st.booleans(),
       chunks=st.lists(st.integers(1, 6), min_size=1, max_size=5), dtype=wdtypes, layout=layouts)
# Heads of whole vec4s at an aligned column: the cache writes go a vec4 a lane (bf16 and f32 norm weights).
@example(kv=2, group=1, half=4, window=None, at=0, norm="weighted", rope=True, fused=False, chunks=[3, 1, 1],
         dtype="bf16", layout="cpu")
@example(kv=1, group=3, half=8, window=5, at=0, norm="weighted", rope=True, fused=True, chunks=[4, 1],
         dtype="f32", layout="gpu")
def test_cache_write_and_attention_over_a_cache(kv, group, half, window, at, norm, rope, fused, chunks, dtype, layout):
    """Steps of a few tokens through ring-buffer caches as small as the window allows, on both backends."""
    d, chunk = 2 * half, max(chunks)
    slots = sum(chunks) if window is None else window + chunk - 1
    g = cached_attention_graph(kv, group, d, slots, window, at, norm, rope, fused)
    TESTED.update(n.op for n in g.nodes)
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEGANEURA_LAYOUT", layout)
        path = os.path.join(tmp, "w.safetensors")
        write_safetensors(path, {"kn": (1 + rand(d, seed=5) / 4, dtype)})
        weights = mn.open_weights(path)
        gpu, ref = mn.compile(g, backend="wgpu", optimize=False), mn.compile(g, backend="numpy", optimize=False)
        pos = 0
        for step, n in enumerate(chunks):
            feed = {"q": rand(n, kv * group, d, seed=step), "x": rand(n, at + 2 * kv * d, seed=50 + step),
                    "start_pos": pos}
            want = ref.run(feed, weights)["y"]
            np.testing.assert_allclose(gpu.run(feed, weights)["y"], want, rtol=1e-4, atol=1e-4)
            pos += n


@settings(max_examples=5, deadline=None)
@given(kv=st.sampled_from([1, 2]), group=st.sampled_from([1, 2]), d=st.sampled_from([32, 64]),
       window=st.one_of(st.none(), st.integers(1, 9)), norm=st.sampled_from([None, "unit"]), rope=st.booleans(),
       fused=st.booleans(), chunks=st.lists(st.integers(1, 19), min_size=1, max_size=3))
def test_longer_steps_share_key_fetches_across_a_subgroup(kv, group, d, window, norm, rope, fused, chunks):
    """CPU layout, heads a multiple of 4 x subgroup wide: steps of more than SPLIT_TOKENS tokens give a
    subgroup's lanes consecutive queries of one head, which fetch a share of each key and broadcast it (query
    counts not a multiple of the subgroup, windows that differ lane by lane, keys from the cache's texture)."""
    from meganeura.backend import kernels

    chunk = max(chunks)
    slots = sum(chunks) if window is None else window + chunk - 1
    g = cached_attention_graph(kv, group, d, slots, window, 0, norm, rope, fused)
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEGANEURA_LAYOUT", "cpu")
        path = os.path.join(tmp, "w.safetensors")
        write_safetensors(path, {"kn": (1 + rand(d, seed=5) / 4, "f32")})
        weights = mn.open_weights(path)
        gpu, ref = mn.compile(g, backend="wgpu", optimize=False), mn.compile(g, backend="numpy", optimize=False)
        pos = 0
        for step, n in enumerate(chunks):
            feed = {"q": rand(n, kv * group, d, seed=step), "x": rand(n, 2 * kv * d, seed=50 + step),
                    "start_pos": pos}
            np.testing.assert_allclose(gpu.run(feed, weights)["y"], ref.run(feed, weights)["y"], rtol=1e-4,
                                       atol=1e-4, err_msg=f"step of {n} at position {pos}")
            pos += n
    out = g.outputs[0]
    shared = [k for k in gpu._runner.kernels[out] if "subgroupBroadcast(kt0" in k.source]
    sub = gpu._runner.dev.subgroup_size
    assert len(shared) == (sub > 1 and (d // 4) % sub == 0)
    if shared:
        assert shared[0].tokens == (kernels.SPLIT_TOKENS + 1, math.inf)


@settings(max_examples=10, deadline=None)
@given(kv=st.sampled_from([1, 2]), group=st.sampled_from([1, 3]), half=st.integers(1, 12),
       window=st.one_of(st.none(), st.integers(1, 12)), pad=st.integers(0, 3), q_norm=st.booleans(),
       k_norm=st.sampled_from([None, "weighted", "unit"]), rope=st.booleans(), softcap=st.sampled_from([None, 3.0]),
       keys_per_split=st.integers(1, 5), prefill=st.integers(1, 9),
       steps=st.lists(st.integers(1, 4), min_size=8, max_size=24), extra_slots=st.sampled_from([0, 0, 20]),
       dtype=wdtypes, layout=layouts)
# Heads of whole vec4 pairs at aligned columns: the cache writes go a vec4 a lane (rotated, normed by weights).
@example(kv=2, group=3, half=8, window=None, pad=0, q_norm=True, k_norm="weighted", rope=True, softcap=None,
         keys_per_split=2, prefill=3, steps=[1, 2, 1, 1, 3, 1, 1, 1], extra_slots=0, dtype="bf16", layout="cpu")
@example(kv=1, group=2, half=4, window=6, pad=0, q_norm=True, k_norm=None, rope=True, softcap=3.0,
         keys_per_split=5, prefill=9, steps=[1, 1, 4, 1, 1, 1, 1, 1], extra_slots=20, dtype="f32", layout="cpu")
def test_split_attention_over_a_cache(kv, group, half, window, pad, q_norm, k_norm, rope, softcap, keys_per_split,
                                      prefill, steps, extra_slots, dtype, layout):
    """Decode steps (up to kernels.SPLIT_TOKENS tokens) run the split-KV kernels: keys shared among several
    workgroups, early positions leaving some splits empty, ring caches wrapping (or windows far shorter
    than the cache: extra_slots). q is read out of one packed [S, pad | q | k | v | pad] tensor whose k and
    v go through cache writes."""
    from meganeura.backend import kernels
    d, nh = 2 * half, kv * group
    chunk = max([prefill, *steps])
    slots = (prefill + sum(steps) if window is None else window + chunk - 1) + extra_slots
    g = mn.Graph()
    pos = g.input("start_pos", (), "i32", default=0)
    width = pad + (nh + 2 * kv) * d
    x = g.input("x", (S, width + pad))
    table = (tuple(np.abs(rand(d // 2, seed=7)).tolist()), 1.1) if rope else None
    k_at, v_at = pad + nh * d, pad + (nh + kv) * d
    kc = g.cache_write(g.state("k_cache", (slots, kv, d)), x, pos, at=k_at, norm=k_norm, eps=1e-6, rope=table,
                       norm_w=g.parameter("kn", (d,)) if k_norm == "weighted" else None)
    vc = g.cache_write(g.state("v_cache", (slots, kv, d)), x, pos, at=v_at)
    out = g.fused_attention(x, kc, vc, heads=nh, kv_heads=kv, head_dim=d, q_at=pad, norms=int(q_norm), eps=1e-6,
                            q_norm_w=g.parameter("qn", (d,)) if q_norm else None, pos=pos, rope=table,
                            scale=d ** -0.5, window=window, softcap=softcap, cached=True)
    g.set_outputs({"y": out})
    TESTED.update(n.op for n in g.nodes)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "w.safetensors")
        write_safetensors(path, {"kn": (1 + rand(d, seed=5) / 4, dtype), "qn": (1 + rand(d, seed=6) / 4, dtype)})
        weights = mn.open_weights(path)
        at = 0
        with pytest.MonkeyPatch.context() as mp:           # read when the device opens and the graph lowers
            mp.setattr(kernels, "KEYS_PER_SPLIT", keys_per_split)
            mp.setenv("MEGANEURA_LAYOUT", layout)
            gpu, ref = mn.compile(g, backend="wgpu", optimize=False), mn.compile(g, backend="numpy", optimize=False)
            for step, n in enumerate([prefill, *steps]):
                feed = {"x": rand(n, width + pad, seed=step), "start_pos": at}
                want = ref.run(feed, weights)["y"]
                np.testing.assert_allclose(gpu.run(feed, weights)["y"], want, rtol=1e-4, atol=1e-4,
                                           err_msg=f"step of {n} at position {at}")
                at += n
    splits = min(kernels.MAX_SPLITS, -(-slots // keys_per_split))
    subgroup = gpu._runner.dev.subgroup_size
    wg = kernels.LANES_WG if layout == "cpu" else kernels.GPU_LANES_WG
    # A subgroup's lanes split a query's keys and merge in the same pass: on a CPU in the lane kernel when
    # the cache is long enough to split, on a GPU in every decode step (its workgroup kernel is latency).
    shared = d % 4 == 0 and subgroup > 1 and wg % subgroup == 0
    if layout == "cpu" and d % 4 == 0:      # the lane kernel: fewer splits, as a CPU has few lanes
        splits = min(splits, -(-kernels.CPU_LANES // nh))
    # A one-token step's kernel that also writes the caches (kernels._folded_cache_writes) is one of these.
    folded = [k for k in gpu._runner.kernels[out] if k.tokens == (1, 1)]
    assert all(k.runs_for(1) != bool(folded) for k in gpu._runner.kernels[kc] + gpu._runner.kernels[vc])
    split = [k for k in gpu._runner.kernels[out] if k.label.endswith("_split") and k not in folded]
    assert len(split) == (splits > 1 or (shared and layout == "gpu"))
    if split:   # across grid z (workgroup kernel), or across a subgroup's lanes
        if shared:
            splits = subgroup
            assert not any(k.label.endswith("_combine") for k in gpu._runner.kernels[out])
        assert split[0].grid(1)[2] == splits or f"const SPLITS: u32 = {splits}u;" in split[0].source


@pytest.mark.parametrize("d, fused, cpu_lanes", [(8, True, 8), (32, True, 8), (32, False, 8), (32, True, 64)])
def test_attention_lanes_walking_more_keys_than_lavapipes_loop_limit(monkeypatch, d, fused, cpu_lanes):
    """A cache of 70000 slots near its end: a lane of the one-token kernel (8 heads given all the lanes, so
    no splits), of a longer step's (a query a lane, or a subgroup's consecutive queries), or of a split's
    share walks more keys than lavapipe's 65535 loop trips an invocation; it visits several a trip."""
    monkeypatch.setenv("MEGANEURA_LAYOUT", "cpu")
    monkeypatch.setattr(kernels, "CPU_LANES", cpu_lanes)
    slots, kv, group = 70000, 1, 8
    g = cached_attention_graph(kv, group, d, slots, None, 0, None, False, fused)
    gpu, ref = mn.compile(g, backend="wgpu", optimize=False), mn.compile(g, backend="numpy", optimize=False)
    step = lambda n, at, seed: {"q": rand(n, kv * group, d, seed=seed), "x": rand(n, 2 * kv * d, seed=50 + seed),
                                "start_pos": at}
    gpu.run(step(1, 0, 0), {})                                     # the caches exist once a step has run
    caches = {"k_cache": rand(slots, kv, d, seed=11), "v_cache": rand(slots, kv, d, seed=12)}
    for name, data in caches.items():
        gpu._runner.write_state(name, data)
        ref.state[name] = data.copy()
    at = slots - 30
    for n in (8, 1, 1):
        feed = step(n, at, n + at)
        # outputs of about 4e-3 and errors of 4e-7 (against float64); a walk cut 4000 keys short is 1e-4 off
        np.testing.assert_allclose(gpu.run(feed, {})["y"], ref.run(feed, {})["y"], rtol=1e-4, atol=2e-6,
                                   err_msg=f"step of {n} at position {at}")
        at += n


def test_attention_lanes_over_a_steps_own_keys_past_the_loop_limit(monkeypatch):
    """Attention among a step's own tokens (no cache, no window: a full forward) has kernels for steps of up
    to LOOP_TRIPS tokens and kernels visiting OWN_KEY_TRIPS keys a trip for longer ones; a lower LOOP_TRIPS
    makes a 100-token step the long kind. Keys normed in the kernel add no loop of their own per key."""
    monkeypatch.setenv("MEGANEURA_LAYOUT", "cpu")
    monkeypatch.setattr(kernels, "LOOP_TRIPS", 16)
    g = mn.Graph()
    q, k, v, kw, feed, params = attention_case(g, 100, 1, 2, 16, 3, True, True, "qkv", 0, "f32")
    out = g.fused_attention(q, k, v, scale=0.25, **kw)
    g.set_outputs({"y": out})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "w.safetensors")
        write_safetensors(path, params)
        weights = mn.open_weights(path)
        gpu, ref = mn.compile(g, backend="wgpu", optimize=False), mn.compile(g, backend="numpy", optimize=False)
        feed["start_pos"] = 3
        np.testing.assert_allclose(gpu.run(feed, weights)["y"], ref.run(feed, weights)["y"], rtol=1e-4, atol=1e-5)
    per_trip = {k.tokens: int(re.search(r"KEYS_PER_TRIP: u32 = (\d+)u", k.source)[1])
                for k in gpu._runner.kernels[out]}
    assert per_trip == {(1, 16): 1, (17, math.inf): kernels.OWN_KEY_TRIPS}


def test_key_norms_of_a_long_step_within_lavapipes_loop_limit():
    """Keys normed in the attention kernel (Gemma's full forward): 300 tokens of 256-wide heads. A loop over
    each key's elements would make 257 loop trips a key and reach lavapipe's limit by the 256th key."""
    g = mn.Graph()
    q, k, v, kw, feed, params = attention_case(g, 300, 1, 2, 256, 2, True, True, "qkv", 0, "f32")
    out = g.fused_attention(q, k, v, scale=256 ** -0.5, **kw)
    check(g, out, {**feed, "start_pos": 0}, params, rtol=1e-4, layout="cpu")


@settings(max_examples=8, deadline=None)
@given(kv=st.sampled_from([1, 2, 4]), group=st.sampled_from([1, 2, 3]), half=st.sampled_from([2, 4, 8, 16]),
       window=st.one_of(st.none(), st.integers(1, 6)), q_norm=st.booleans(), k_norm=st.sampled_from([None, "unit"]),
       rope=st.booleans(), softcap=st.sampled_from([None, 3.0]), reader=st.sampled_from(["linear", "matmul"]),
       n=st.integers(1, 40), also_output=st.booleans(), dtype=st.sampled_from(["f32", "bf16", "q8", "q4"]),
       steps=st.lists(st.sampled_from([1, 1, 1, 2]), min_size=3, max_size=8))
@example(kv=4, group=2, half=16, window=None, q_norm=False, k_norm=None, rope=True, softcap=None, reader="linear",
         n=40, also_output=False, dtype="bf16", steps=[1, 1, 1])        # llama's decode step
def test_the_output_projection_runs_a_decode_steps_attention(kv, group, half, window, q_norm, k_norm, rope, softcap,
                                                            reader, n, also_output, dtype, steps):
    """On a CPU device with subgroups, a one-token step's attention (of up to a subgroup of heads, keys in one
    split) runs in the workgroups of the product that reads it (no attention dispatch): each computes it,
    one stores the step's key and value (normed and rotated), over rings that wrap. Every step's output
    equals the reference's. Not where the attention's output is read elsewhere too (a graph output)."""
    d, nh = 2 * half, kv * group
    slots = 5 + sum(steps) if window is None else window + 4
    g = mn.Graph()
    pos = g.input("start_pos", (), "i32", default=0)
    x, h = g.input("x", (S, (nh + 2 * kv) * d)), g.input("h", (S, n))
    table = (tuple(np.abs(rand(d // 2, seed=7)).tolist()), 1.1) if rope else None
    kc = g.cache_write(g.state("k_cache", (slots, kv, d)), x, pos, at=nh * d, norm=k_norm, eps=1e-6, rope=table)
    vc = g.cache_write(g.state("v_cache", (slots, kv, d)), x, pos, at=(nh + kv) * d)
    att = g.fused_attention(x, kc, vc, heads=nh, kv_heads=kv, head_dim=d, norms=int(q_norm), eps=1e-6,
                            q_norm_w=g.parameter("qn", (d,)) if q_norm else None, pos=pos, rope=table,
                            scale=d ** -0.5, window=window, softcap=softcap, cached=True)
    flat, p = g.reshape(att, (S, nh * d)), g.parameter("p", (n, nh * d))
    y = g.fused_linear(flat, p, residual=h) if reader == "linear" else g.matmul(flat, p, transpose_b=True)
    g.set_outputs({"y": y, **({"att": att} if also_output else {})})
    quantize = dtype if dtype in ("q8", "q4") else None
    params = {"p": (rand(n, nh * d, seed=1) / np.sqrt(nh * d), "f32" if quantize else dtype),
              "qn": (1 + rand(d, seed=6) / 4, "bf16")}
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEGANEURA_LAYOUT", "cpu")
        path = os.path.join(tmp, "w.safetensors")
        write_safetensors(path, params)
        weights = mn.open_weights(path)
        gpu, ref = (mn.compile(g, backend=b, optimize=False, quantize=quantize) for b in ("wgpu", "numpy"))
        at = 0
        for step, s in enumerate([5, *steps]):
            feed = {"x": rand(s, (nh + 2 * kv) * d, seed=step), "h": rand(s, n, seed=50 + step),
                    "start_pos": at}
            want = ref.run(feed, weights)["y"]
            np.testing.assert_allclose(gpu.run(feed, weights)["y"], want, rtol=1e-4, atol=1e-4 * np.abs(want).max(),
                                       err_msg=f"step of {s} at position {at}")
            at += s
    sub = gpu._runner.dev.subgroup_size
    fused = sub > 0 and nh <= sub and d % 4 == 0 and nh * d % 8 == 0 and not also_output
    labels = [k.label for k, _ in gpu._runner.dispatches if k.runs_for(1)]
    assert labels.count("fused_attention") == (not fused)
    assert labels.count(f"attention_{reader}_gemv") == fused
    assert labels.count(f"{reader}_gemv") == (sub > 0 and nh * d % 8 == 0 and not fused)


@pytest.mark.skipif(bool(os.environ.get("PYTEST_XDIST_WORKER")),
                    reason="counts the ops that every test of this module ran, in one process")
def test_every_op_is_covered():
    """Runs last in this module: every op of the table has been compared on the GPU above."""
    computed = {name for name, op in OPS.items() if op.meaning is not None} - {"reshape"}
    assert computed <= TESTED, f"ops never run on the GPU: {computed - TESTED}"
