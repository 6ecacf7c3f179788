"""Every op on the GPU path (lavapipe in CI) against reference.py, on hypothesis-drawn shapes including odd
sizes, with f32/f16/bf16 weights, with and without the optional device features."""
import os
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import meganeura as mn
from meganeura.graph import OPS, S
from meganeura.weights import write_safetensors
from wgpu_util import run_both

EXAMPLES = settings(max_examples=10, deadline=None)
dims = st.integers(1, 37)
wdtypes = st.sampled_from(["f32", "f16", "bf16"])
TESTED = set()


@pytest.fixture(params=["all-features", "no-f16-no-subgroup"], autouse=True)
def features(request, monkeypatch):
    if request.param != "all-features":
        monkeypatch.setenv("MEGANEURA_DISABLE", "shader-f16,subgroup")


def check(g, out, inputs, params=None, rtol=2e-5, atol=2e-5):
    """Run graph `g` on both backends; params: name -> (array, stored dtype), written as a checkpoint."""
    g.set_outputs({"y": out})
    TESTED.update(n.op for n in g.nodes)
    with tempfile.TemporaryDirectory() as d:
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
@given(s=dims, v=dims, h=dims, dtype=wdtypes)
def test_embedding(s, v, h, dtype):
    g = mn.Graph()
    ids = g.input("ids", (S,), "u32")
    out = g.embedding(g.parameter("e", (v, h)), ids)
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


@EXAMPLES
@given(s=dims, n=dims, op=st.sampled_from(["scale", "silu", "gelu_tanh", "softcap", "softmax"]))
def test_unary(s, n, op):
    g = mn.Graph()
    x = g.input("x", (S, n))
    out = {"scale": lambda: g.scale(x, 0.37), "silu": lambda: g.silu(x), "gelu_tanh": lambda: g.gelu_tanh(x),
           "softcap": lambda: g.softcap(x, 2.5), "softmax": lambda: g.softmax(x)}[op]()
    check(g, out, {"x": 4 * rand(s, n)})


@EXAMPLES
@given(s=dims, h=st.integers(1, 4), d=dims, weighted=st.booleans(), dtype=wdtypes)
def test_rms_norm(s, h, d, weighted, dtype):
    g = mn.Graph()
    x = g.input("x", (S, h, d))
    w = g.parameter("w", (d,)) if weighted else None
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
       window=st.one_of(st.none(), st.integers(1, 9)), softcap=st.sampled_from([None, 3.0]))
def test_attention(s, kv, group, d, window, softcap):
    g = mn.Graph()
    q = g.input("q", (S, kv * group, d))
    k = g.input("k", (S, kv, d))
    v = g.input("v", (S, kv, d))
    out = g.attention(q, k, v, scale=d ** -0.5, window=window, softcap=softcap)
    check(g, out, {"q": rand(s, kv * group, d), "k": rand(s, kv, d, seed=1), "v": rand(s, kv, d, seed=2)},
          rtol=1e-4)


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


def test_every_op_is_covered():
    """Runs last in this module: every op of the table has been compared on the GPU above."""
    computed = {name for name, op in OPS.items() if op.meaning is not None} - {"reshape"}
    assert computed <= TESTED, f"ops never run on the GPU: {computed - TESTED}"
