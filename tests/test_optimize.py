"""The optimizer: every rule fires where it should and is stopped by a shape or dtype mismatch; random
graphs give the same outputs optimized and unoptimized, on the reference executor and on wgpu; real
model graphs lose at least 3x of their kernels."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import meganeura as mn
from meganeura.graph import S
from meganeura.models import gemma4, llama, qwen
from meganeura.optimize import optimize
from meganeura.optimize.rules import RULES

RNG = np.random.default_rng(0)
INV = (1.0, 0.1, 0.01, 0.001)          # a RoPE table for head_dim 8
INV2 = (0.5, 0.05, 0.005, 0.0005)


def weights_for(g: mn.Graph, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for name, i in g.leaves("parameter").items():
        shape = g[i].shape
        out[name] = (rng.standard_normal(shape) * (0.3 if len(shape) > 1 else 0.2)
                     + (1.0 if len(shape) == 1 else 0.0)).astype(np.float32)
    return out


def inputs_for(g: mn.Graph, tokens=5, seed=1) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for name, i in g.leaves("input").items():
        n = g[i]
        if n.shape == ():
            out[name] = np.int32(3)
        elif n.dtype in ("u32", "i32"):      # token ids, below every test table's 6 rows
            out[name] = rng.integers(0, 6, tuple(tokens if d == S else d for d in n.shape)).astype(np.uint32)
        else:
            out[name] = rng.standard_normal(tuple(tokens if d == S else d for d in n.shape)).astype(np.float32)
    return out


def same_outputs(g: mn.Graph, backend="numpy", tol=2e-5):
    """Optimized and unoptimized programs give the same outputs; returns the optimized program."""
    w, x = weights_for(g), inputs_for(g)
    plain = mn.compile(g, backend=backend, optimize=False).run(x, w)
    prog = mn.compile(g, backend=backend, optimize=True)
    fused = prog.run(x, w)
    for k in plain:
        scale = max(1.0, float(np.abs(plain[k]).max()))
        np.testing.assert_allclose(fused[k], plain[k], rtol=tol, atol=tol * scale, err_msg=k)
    return prog


def fired(g: mn.Graph) -> dict:
    return optimize(g).report["rules_fired"]


# ---------------------------------------------------------------- each rule: fires, and is stopped

def _glu(act, up_shape=None):
    def build(g):
        x = g.input("x", (S, 8))
        gate = g.linear(x, g.parameter("wg", (6, 8)))
        up = g.input("u", up_shape) if up_shape else g.linear(x, g.parameter("wu", (6, 8)))
        return g.mul(getattr(g, act)(gate), up)
    return build


def _gate_up(dtype_up="f32", bias=False, bias_dtype="f32"):
    def build(g):
        x = g.input("x", (S, 8))
        bg = g.parameter("bg", (6,)) if bias else None
        bu = g.parameter("bu", (6,), dtype=bias_dtype) if bias else None
        gate = g.linear(x, g.parameter("wg", (6, 8)), bg)
        up = g.linear(x, g.parameter("wu", (6, 8), dtype=dtype_up), bu)
        return g.mul(g.silu(gate), up)
    return build


def _linear_then(what, other_shape=None, transpose=True):
    def build(g):
        x = g.input("x", (S, 8))
        y = g.matmul(x, g.parameter("w", (6, 8) if transpose else (8, 6)), transpose_b=transpose)
        if what == "bias":
            return g.add(y, g.parameter("b", other_shape or (6,)))
        if what == "residual":
            return g.add(g.input("r", other_shape or (S, 6)), y)
        if what == "residual-left":
            return g.add(y, g.input("r", other_shape or (S, 6)))
        if what == "softcap":
            return g.softcap(y, 5.0)
        return y
    return build


def _norm_then_linear(unit=False, between=False):
    def build(g):
        x = g.input("x", (S, 8))
        n = g.rms_norm(x, None if unit else g.parameter("nw", (8,)), 1e-5)
        if between:
            n = g.scale(n, 2.0)
        return g.linear(n, g.parameter("w", (6, 8)))
    return build


def _post_norm(y_shape=(S, 8), unit=False, scalar_shape=None):
    def build(g):
        h = g.input("h", (S, 8))
        y = g.input("y", y_shape)
        out = g.add(h, g.rms_norm(y, None if unit else g.parameter("nw", (y_shape[-1],)), 1e-6))
        return g.mul(out, g.parameter("s", scalar_shape)) if scalar_shape else out
    return build


def _attention(rope_k=INV, k_eps=1e-6, v_eps=1e-6, qk_norm=False, v_norm=False, packable=True, v_dtype="f32",
               k_is_v=False, bias=False, bias_dtype="f32"):
    """Llama/Qwen/Gemma-style attention from one input: projections, optional norms, RoPE."""
    def build(g):
        x = g.input("x", (S, 16))
        pos = g.input("start_pos", (), "i32", default=0)

        def proj(name, heads, dtype="f32"):
            b = g.parameter(name + ".b", (heads * 8,), dtype=bias_dtype if name == "v" else "f32") if bias else None
            src = x if packable or name != "v" else g.scale(x, 1.0 + 1e-3)
            return g.reshape(g.linear(src, g.parameter(name, (heads * 8, 16), dtype=dtype), b), (S, heads, 8))

        q, k = proj("q", 4), proj("k", 2)
        v = k if k_is_v else proj("v", 2, v_dtype)
        if qk_norm:
            q = g.rms_norm(q, g.parameter("qn", (8,)), 1e-6)
            k = g.rms_norm(k, g.parameter("kn", (8,)), k_eps)
        if v_norm:
            v = g.rms_norm(v, None, v_eps)
        q = g.rope(q, pos, INV)
        k = g.rope(k, pos, rope_k) if rope_k else k
        return g.reshape(g.attention(q, k, v, scale=0.35), (S, 32))
    return build


def _cached(qk_norm=False, v_norm=False, k_is_v=False, bias=False, bias_dtype="f32", v_dtype="f32", apart=None,
            k_rope_pos="same", q_rope_pos="same", between=None):
    """The same attention writing k and v into caches (12 slots) and attending over them.
    apart: the projection that reads another input (not packable); between: where a scale sits between
    a norm and what would absorb it ("k", "v" or "q"); *_rope_pos "other": rotated at another position."""
    def build(g):
        x = g.input("x", (S, 16))
        pos = g.input("start_pos", (), "i32", default=0)
        other = g.input("other_pos", (), "i32", default=1)

        def proj(name, heads, dtype="f32"):
            b = g.parameter(name + ".b", (heads * 8,), dtype=bias_dtype if name == "v" else "f32") if bias else None
            src = g.scale(x, 1.0 + 1e-3) if name == apart else x
            return g.reshape(g.linear(src, g.parameter(name, (heads * 8, 16), dtype=dtype), b), (S, heads, 8))

        def maybe_scale(t, who):
            return g.scale(t, 1.5) if between == who else t

        q, k = proj("q", 4), proj("k", 2)
        v = k if k_is_v else proj("v", 2, v_dtype)
        if qk_norm:
            q = maybe_scale(g.rms_norm(q, g.parameter("qn", (8,)), 1e-6), "q")
            k = maybe_scale(g.rms_norm(k, g.parameter("kn", (8,)), 1e-6), "k")
        if v_norm:
            v = maybe_scale(g.rms_norm(v, None, 1e-6), "v")
        q = g.rope(q, pos if q_rope_pos == "same" else other, INV)
        k = g.rope(k, pos if k_rope_pos == "same" else other, INV)
        kc = g.cache_write(g.state("kc", (12, 2, 8)), k, pos)
        vc = g.cache_write(g.state("vc", (12, 2, 8)), v, pos)
        return g.reshape(g.attention(q, kc, vc, scale=0.35, pos=pos), (S, 32))
    return build


CASES = {
    # rule: (a graph where it fires, a graph where a mismatch stops it)
    "reshape-reshape": (lambda g: g.reshape(g.reshape(g.input("x", (S, 8)), (S, 2, 4)), (S, 4, 2)),
                        lambda g: g.reshape(g.scale(g.reshape(g.input("x", (S, 8)), (S, 2, 4)), 2.0), (S, 4, 2))),
    "scale-scale": (lambda g: g.scale(g.scale(g.input("x", (S, 8)), 3.0), 0.5),
                    lambda g: g.scale(g.silu(g.scale(g.input("x", (S, 8)), 3.0)), 0.5)),
    "scale-into-gather": (lambda g: g.scale(g.embedding(g.parameter("t", (6, 8)), g.input("ids", (S,), "u32")), 2.5),
                          lambda g: g.scale(g.silu(g.embedding(g.parameter("t", (6, 8)),
                                                               g.input("ids", (S,), "u32"))), 2.5)),
    "sigmoid-silu": (lambda g: (lambda x: g.mul(x, g.sigmoid(x)))(g.input("x", (S, 8))),
                     lambda g: g.mul(g.input("x", (S, 8)), g.sigmoid(g.input("y", (S, 8))))),
    "sigmoid-silu-left": (lambda g: (lambda x: g.mul(g.sigmoid(x), x))(g.input("x", (S, 8))),
                          lambda g: g.mul(g.sigmoid(g.input("y", (S, 8))), g.input("x", (S, 8)))),
    "swiglu": (_glu("silu"), _glu("silu", up_shape=(1, 6))),
    "geglu": (_glu("gelu_tanh"), _glu("gelu_tanh", up_shape=(6,))),
    "linear": (_linear_then(None), _linear_then(None, transpose=False)),
    "norm-prologue": (_norm_then_linear(), _norm_then_linear(between=True)),
    "unit-norm-prologue": (_norm_then_linear(unit=True), _norm_then_linear(unit=True, between=True)),
    "bias-epilogue": (_linear_then("bias"), _linear_then("bias", other_shape=(1,))),
    "residual-epilogue": (_linear_then("residual"), _linear_then("residual", other_shape=(1, 6))),
    "residual-epilogue-left": (_linear_then("residual-left"), _linear_then("residual-left", other_shape=(1, 6))),
    "softcap-epilogue": (_linear_then("softcap"), _linear_then("softcap", transpose=False)),
    "post-norm-residual": (_post_norm(), _post_norm(y_shape=(1, 8))),
    "post-unit-norm-residual": (_post_norm(unit=True), _post_norm(y_shape=(1, 8), unit=True)),
    "layer-scalar": (_post_norm(scalar_shape=(1,)), _post_norm(scalar_shape=(8,))),
    "attention": (_attention(), None),
    "rope-into-attention": (_attention(), _attention(rope_k=INV2)),
    "qk-norm-into-attention": (_attention(qk_norm=True), _attention(qk_norm=True, k_eps=1e-5)),
    "v-norm-into-attention": (_attention(qk_norm=True, v_norm=True),
                              _attention(qk_norm=True, v_norm=True, v_eps=1e-5)),
    "gate-up-pack": (_gate_up(), _gate_up(dtype_up="bf16")),
    "gate-up-pack-bias": (_gate_up(bias=True), _gate_up(bias=True, bias_dtype="f16")),
    "qkv-pack": (_attention(), _attention(v_dtype="bf16")),
    "qkv-pack-bias": (_attention(bias=True), _attention(bias=True, bias_dtype="bf16")),
    "qk-pack-shared-kv": (_attention(k_is_v=True, qk_norm=True), _attention(k_is_v=True, qk_norm=True,
                                                                            rope_k=INV2)),
    "cached-attention": (_cached(), None),
    "rope-into-cache-write": (_cached(), _cached(k_rope_pos="other")),
    "norm-into-cache-write": (_cached(qk_norm=True), _cached(qk_norm=True, between="k")),
    "unit-norm-into-cache-write": (_cached(v_norm=True), _cached(v_norm=True, between="v")),
    "rope-q-into-cached-attention": (_cached(), _cached(q_rope_pos="other")),
    "q-norm-into-attention": (_cached(qk_norm=True), _cached(qk_norm=True, between="q")),
    "qkv-pack-cached": (_cached(), _cached(v_dtype="bf16")),
    "qkv-pack-bias-cached": (_cached(bias=True), _cached(bias=True, bias_dtype="bf16")),
    "qk-pack-shared-kv-cached": (_cached(k_is_v=True, qk_norm=True, v_norm=True),
                                 _cached(k_is_v=True, qk_norm=True, v_norm=True, apart="q")),
}


def test_every_rule_has_a_case():
    assert {r.name for r in RULES} == set(CASES)


@pytest.mark.parametrize("rule", sorted(CASES))
def test_rule_fires_and_keeps_meaning(rule):
    g = mn.Graph()
    g.set_outputs({"y": CASES[rule][0](g)})
    assert fired(g).get(rule, 0) >= 1, f"{rule} did not fire"
    same_outputs(g)


@pytest.mark.parametrize("rule", sorted(r for r in CASES if CASES[r][1] is not None))
def test_rule_is_stopped_by_a_mismatch(rule):
    g = mn.Graph()
    g.set_outputs({"y": CASES[rule][1](g)})
    assert fired(g).get(rule, 0) == 0, f"{rule} fired on a graph it must not change"
    same_outputs(g)


def test_packed_weights_are_chosen_and_named():
    g = mn.Graph()
    g.set_outputs({"y": _attention(qk_norm=True)(g)})
    opt = optimize(g).graph
    packed = [n for n in opt.nodes if n.op == "parameter" and n.attrs["packed"]]
    assert [n.attrs["name"] for n in packed] == ["q|k|v"] and packed[0].shape == (64, 16)
    ops = [n.op for n in opt.nodes if n.op not in ("input", "parameter", "reshape")]
    assert ops == ["linear", "fused_attention"]


@pytest.mark.parametrize("build", [_cached(qk_norm=True), _cached(bias=True),
                                   _cached(k_is_v=True, qk_norm=True, v_norm=True)])
def test_cached_attention_becomes_one_gemm_two_cache_writes_and_attention(build):
    g = mn.Graph()
    g.set_outputs({"y": build(g)})
    opt = optimize(g).graph
    ops = [n.op for n in opt.nodes if n.op not in ("input", "parameter", "state", "reshape")]
    assert ops == ["linear", "cache_write", "cache_write", "fused_attention"]
    same_outputs(g)


@pytest.mark.parametrize("build", [_cached(), _cached(k_is_v=True, qk_norm=True, v_norm=True)])
def test_a_cache_read_after_its_attention_is_written_once(build):
    """A value that reads a cache beside its attention (Gemma's KV-sharing layers read the last producing
    layer's caches) takes the writes the packed attention makes: one GEMM, two cache writes."""
    g = mn.Graph()
    y = build(g)
    caches = [i for i, n in enumerate(g.nodes) if n.op == "cache_write"]
    g.set_outputs({"y": y, "k": caches[0], "v": caches[1]})
    opt = optimize(g).graph
    ops = [n.op for n in opt.nodes if n.op not in ("input", "parameter", "state", "reshape")]
    assert ops == ["linear", "cache_write", "cache_write", "fused_attention"]
    same_outputs(g)


# ---------------------------------------------------------------- random graphs

@st.composite
def random_graphs(draw):
    """Chains and DAGs over the IR's ops with shared subterms, plus the motifs the rules look for."""
    g = mn.Graph()
    pos = g.input("start_pos", (), "i32", default=0)
    pool = [g.input("x", (S, 16))]
    count = 0

    def pick(width=None):
        options = [n for n in pool if width is None or g[n].shape == (S, width)]
        return options[draw(st.integers(0, len(options) - 1))] if options else None

    def param(shape, dtype="f32"):
        nonlocal count
        count += 1
        return g.parameter(f"p{count}", shape, dtype=dtype)

    for _ in range(draw(st.integers(1, 7))):
        kind = draw(st.sampled_from(["linear", "binary", "unary", "norm", "glu", "mlp", "attention", "postnorm"]))
        a = pick()
        width = g[a].shape[-1]
        if kind == "linear":
            out = draw(st.sampled_from([8, 16]))
            y = g.linear(a, param((out, width)), param((out,)) if draw(st.booleans()) else None)
            b = pick(out)
            pool.append(g.add(b, y) if b is not None and draw(st.booleans()) else y)
        elif kind == "binary":
            b = pick(width)
            pool.append(getattr(g, draw(st.sampled_from(["add", "mul"])))(a, b))
        elif kind == "unary":
            op = draw(st.sampled_from(["silu", "sigmoid", "gelu_tanh", "scale", "softcap"]))
            pool.append(g.scale(a, 0.7) if op == "scale" else g.softcap(a, 3.0) if op == "softcap"
                        else getattr(g, op)(a))
        elif kind == "norm":
            pool.append(g.rms_norm(a, param((width,)) if draw(st.booleans()) else None, 1e-5))
        elif kind == "glu":
            b = pick(width)
            act = draw(st.sampled_from(["silu", "gelu_tanh"]))
            pool.append(g.mul(getattr(g, act)(a), b))
        elif kind == "mlp":
            x = g.rms_norm(a, param((width,)), 1e-5) if draw(st.booleans()) else a
            dt = draw(st.sampled_from(["f32", "f32", "bf16"]))
            h = g.mul(g.silu(g.linear(x, param((12, width)))), g.linear(x, param((12, width), dt)))
            pool.append(g.add(a, g.linear(h, param((width, 12)))))
        elif kind == "attention" and width == 16:
            x = g.rms_norm(a, param((16,)), 1e-5)
            q = g.reshape(g.linear(x, param((32, 16))), (S, 4, 8))
            k = g.reshape(g.linear(x, param((16, 16))), (S, 2, 8))
            v = k if draw(st.booleans()) else g.reshape(g.linear(x, param((16, 16))), (S, 2, 8))
            if draw(st.booleans()):
                q, k = g.rms_norm(q, param((8,)), 1e-6), g.rms_norm(k, param((8,)), 1e-6)
            q, k = g.rope(q, pos, INV), g.rope(k, pos, INV)
            window = draw(st.sampled_from([None, 3]))
            att = g.reshape(g.attention(q, k, v, scale=0.35, window=window), (S, 32))
            pool.append(g.add(a, g.linear(att, param((16, 32)))))
        elif kind == "postnorm":
            b = pick(width)
            pool.append(g.add(a, g.rms_norm(b, param((width,)), 1e-6)))
    shared = [n for n in pool[1:] if g[n].op != "input"]
    outs = {"last": pool[-1]}
    if len(shared) > 1 and draw(st.booleans()):
        outs["middle"] = shared[len(shared) // 2]
    g.set_outputs(outs)
    return g


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=random_graphs())
def test_random_graphs_keep_their_meaning_on_the_reference(g):
    same_outputs(g, "numpy")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=random_graphs())
def test_random_graphs_keep_their_meaning_on_wgpu(g):
    same_outputs(g, "wgpu", tol=1e-4)


# ---------------------------------------------------------------- real model graphs

@pytest.mark.parametrize("preset", [llama.llama32_1b, qwen.qwen25_05b, qwen.qwen3_06b, gemma4.gemma4_12b,
                                    gemma4.gemma4_31b])
def test_real_configs_need_3x_fewer_kernels_and_fewer_bytes(preset):
    cfg = preset()
    family = {"llama": llama, "qwen2": qwen, "qwen3": qwen}.get(cfg.model_type, gemma4)
    g = mn.Graph()
    g.set_outputs([family.build_graph(g, cfg)])
    r = optimize(g).report
    assert r["kernels_before"] >= 3 * r["kernels_after"], r
    assert r["bytes_after"] < r["bytes_before"]
    assert r["layer_kinds"] <= 5                 # each layer kind optimized once


def test_optimized_graph_keeps_output_names():
    g = mn.Graph()
    logits = llama.build_graph(g, llama.small_test())
    g.set_outputs({"logits": logits})
    assert optimize(g).graph.output_names() == ["logits"]
