"""The IR: build-time shape checking and the reference meaning of the ops with the most index arithmetic."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import meganeura as mn
from meganeura import reference as R
from meganeura.graph import OPS, S


def test_shape_error_names_op_shapes_and_builder_line():
    g = mn.Graph()
    x = g.input("x", (S, 64))
    w = g.parameter("w", (32, 48))
    with pytest.raises(mn.ShapeError) as e:
        g.matmul(x, w, transpose_b=True)
    msg = str(e.value)
    assert msg.startswith("matmul(('S', 64), (32, 48))") and "test_graph.py:" in msg


@pytest.mark.parametrize("build, match", [
    (lambda g, x: g.reshape(x, (S, 5)), "cannot reshape"),
    (lambda g, x: g.rms_norm(x, g.parameter("n", (7,)), 1e-6), "norm weight"),
    (lambda g, x: g.add(x, g.parameter("b", (3,))), "cannot broadcast"),
    (lambda g, x: g.slice(x, 1, 2, 9), "out of range"),
    (lambda g, x: g.rope(g.reshape(x, (S, 2, 2)), g.input("p", (), "i32"), [1.0, 0.5]), "head_dim"),
    (lambda g, x: g.embedding(g.parameter("t", (4,)), g.input("ids", (S,), "u32")), "embedding table"),
])
def test_bad_shapes_fail_at_build_time(build, match):
    g = mn.Graph()
    x = g.input("x", (S, 4))
    with pytest.raises(mn.ShapeError, match=match):
        build(g, x)


def test_every_op_has_a_meaning_and_an_archetype():
    for name, op in OPS.items():
        assert op.archetype
        assert op.meaning is not None or name in ("input", "parameter", "state")


def test_symbolic_token_count_runs_any_length():
    g = mn.Graph()
    x = g.input("x", (S, 3))
    y = g.rms_norm(g.reshape(x, (S, 3)), None, 1e-6)
    g.set_outputs({"y": y})
    prog = mn.compile(g, backend="numpy")
    for n in (1, 5, 17):
        v = np.random.default_rng(n).standard_normal((n, 3)).astype(np.float32)
        want = v / np.sqrt((v * v).mean(-1, keepdims=True) + 1e-6)
        np.testing.assert_allclose(prog.run({"x": v}, {})["y"], want, rtol=1e-6)
    with pytest.raises(ValueError, match="expected"):
        prog.run({"x": np.zeros((2, 4), np.float32)}, {})


def naive_attention(q, k, v, scale, window):
    s, nh, d = q.shape
    t, nkv, _ = k.shape
    out = np.zeros_like(q, dtype=np.float64)
    for h in range(nh):
        g = h // (nh // nkv)
        for i in range(s):
            ai = t - s + i
            keys = [j for j in range(t) if j <= ai and (window is None or j > ai - window)]
            sc = np.array([scale * q[i, h] @ k[j, g] for j in keys], dtype=np.float64)
            p = np.exp(sc - sc.max())
            p /= p.sum()
            out[i, h] = sum(pj * v[j, g] for pj, j in zip(p, keys))
    return out


@settings(max_examples=30, deadline=None)
@given(s=st.integers(1, 9), past=st.integers(0, 6), kv=st.sampled_from([1, 2]), group=st.sampled_from([1, 3]),
       d=st.sampled_from([2, 6, 8]), window=st.one_of(st.none(), st.integers(1, 7)))
def test_attention_reference_matches_definition(s, past, kv, group, d, window):
    rng = np.random.default_rng(s * 100 + past)
    t = s + past
    q = rng.standard_normal((s, kv * group, d)).astype(np.float32)
    k = rng.standard_normal((t, kv, d)).astype(np.float32)
    v = rng.standard_normal((t, kv, d)).astype(np.float32)
    got = R.attention(q, k, v, scale=0.5, window=window, softcap=None)
    np.testing.assert_allclose(got, naive_attention(q, k, v, 0.5, window), rtol=1e-4, atol=1e-5)


def test_rope_rotates_pairs_half_apart():
    x = np.zeros((1, 1, 4), np.float32)
    x[0, 0, 0] = 1.0                                  # pair (0, 2) rotates; pair (1, 3) has frequency 0
    y = R.rope(x, 3, inv_freq=[0.5, 0.0], attention_scaling=1.0)
    np.testing.assert_allclose(y[0, 0], [np.cos(1.5), 0, np.sin(1.5), 0], atol=1e-7)


def test_topk_route_keeps_k_largest():
    p = np.array([[0.1, 0.5, 0.15, 0.25], [0.4, 0.3, 0.2, 0.1]], np.float32)
    np.testing.assert_allclose(R.topk_route(p, k=2, normalize=False), [[0, 0.5, 0, 0.25], [0.4, 0.3, 0, 0]])
    np.testing.assert_allclose(R.topk_route(p, k=2, normalize=True).sum(-1), [1, 1], rtol=1e-6)


def test_moe_reference_equals_dense_sum():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    gate_up = rng.standard_normal((4, 8, 6)).astype(np.float32)
    down = rng.standard_normal((4, 6, 4)).astype(np.float32)
    route = R.topk_route(R.softmax(rng.standard_normal((5, 4)).astype(np.float32)), k=2, normalize=True)
    want = np.zeros_like(x)
    for e in range(4):
        y = x @ gate_up[e].T
        want += route[:, e:e + 1] * ((R.silu(y[:, :4]) * y[:, 4:]) @ down[e].T)
    np.testing.assert_allclose(R.moe(x, route, gate_up, down, act="silu", k=2), want, rtol=1e-5, atol=1e-5)
