"""Packed parameters: checkpoint tensors concatenated along axis 0 into one weight (fused Q|K|V, gate|up,
their biases), packed once at load on every backend, from checkpoints of any float dtype and from dicts."""
import json
import struct

import numpy as np
import pytest

import meganeura as mn
from meganeura.weights import bf16_bits, to_f32, write_safetensors

H = 8                                      # hidden size (f32 rows: 32 bytes)
ROWS = {"q": 5, "k": 3, "v": 2}            # member rows: window edges fall inside members
N = sum(ROWS.values())
BACKENDS = ["numpy", "wgpu"]


def members(rng, width=H):
    w = {f"{m}.weight": rng.standard_normal((r, width)).astype(np.float32) for m, r in ROWS.items()}
    b = {f"{m}.bias": rng.standard_normal(r).astype(np.float32) for m, r in ROWS.items()}
    return w, b


def stored(arr, dtype):
    """What a tensor saved as `dtype` holds, widened to f32."""
    if dtype == "f16":
        return arr.astype(np.float16).astype(np.float32)
    if dtype == "bf16":
        return to_f32(bf16_bits(arr), "BF16")
    return arr.astype(np.float32)


def qkv_graph(width=H, fallback_k=None):
    """y = x @ [q; k; v].T + [qb; kb; vb], both packed."""
    g = mn.Graph()
    x = g.input("x", ("S", width))
    w = g.parameter("qkv", (N, width), packed=(("q.weight", None), ("k.weight", fallback_k), ("v.weight", None)))
    b = g.parameter("qkv_bias", (N,), packed=tuple((f"{m}.bias", None) for m in ROWS))
    g.set_outputs({"y": g.add(g.matmul(x, w, transpose_b=True), b)})
    return g


def expect(x, w, b):
    wq = np.concatenate([w[f"{m}.weight"] for m in ROWS])
    bq = np.concatenate([b[f"{m}.bias"] for m in ROWS])
    return x.astype(np.float64) @ wq.T.astype(np.float64) + bq


def save(path, tensors, dtypes):
    write_safetensors(path, {n: (a, dtypes[i % len(dtypes)]) for i, (n, a) in enumerate(tensors.items())})
    return mn.open_weights(path)


@pytest.fixture
def fresh_device(monkeypatch):
    """set_limit(n): the next Program opens a device whose storage bindings hold at most n bytes."""
    def set_limit(n):
        monkeypatch.setenv("MEGANEURA_MAX_BINDING", str(n))
    return set_limit


# ---------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", [("f32",), ("f16",), ("bf16",), ("f32", "bf16", "f16")], ids="-".join)
def test_packed_weight_and_bias_from_checkpoint(backend, dtypes, tmp_path):
    rng = np.random.default_rng(1)
    w, b = members(rng)
    ckpt = save(tmp_path / "m.safetensors", {**w, **b}, dtypes)
    w = {n: stored(a, dtypes[i % len(dtypes)]) for i, (n, a) in enumerate(w.items())}
    b = {n: stored(a, dtypes[(i + len(w)) % len(dtypes)]) for i, (n, a) in enumerate(b.items())}
    x = rng.standard_normal((6, H)).astype(np.float32)
    prog = mn.compile(qkv_graph(), backend=backend)
    got = prog.run({"x": x}, ckpt)["y"]
    np.testing.assert_allclose(got, expect(x, w, b), rtol=1e-5, atol=1e-5)
    if backend == "wgpu":
        bufs = prog._runner.params["qkv"]
        assert bufs.dtype == (dtypes[0] if len(dtypes) == 1 else "f32")     # mixed: widened on the host
    else:
        np.testing.assert_array_equal(prog.params(ckpt)["qkv"], np.concatenate(list(w.values())))


@pytest.mark.parametrize("backend", BACKENDS)
def test_member_found_through_its_fallback(backend, tmp_path):
    rng = np.random.default_rng(2)
    w, b = members(rng)
    w["k.alt"] = w.pop("k.weight")
    ckpt = save(tmp_path / "m.safetensors", {**w, **b}, ("f32",))
    x = rng.standard_normal((3, H)).astype(np.float32)
    got = mn.compile(qkv_graph(fallback_k="k.alt"), backend=backend).run({"x": x}, ckpt)["y"]
    w["k.weight"] = w.pop("k.alt")
    np.testing.assert_allclose(got, expect(x, w, b), rtol=1e-5, atol=1e-5)


def test_member_found_under_the_multimodal_prefix(tmp_path):
    rng = np.random.default_rng(3)
    w, b = members(rng)
    ckpt = save(tmp_path / "m.safetensors", {"model.language_model.q.weight": w["q.weight"],
                                             "k.weight": w["k.weight"], "v.weight": w["v.weight"]}, ("f32",))
    g = mn.Graph()
    x = g.input("x", ("S", H))
    p = g.parameter("qkv", (N, H), packed=(("model.q.weight", None), ("k.weight", None), ("v.weight", None)))
    g.set_outputs({"y": g.matmul(x, p, transpose_b=True)})
    xs = rng.standard_normal((2, H)).astype(np.float32)
    got = mn.compile(g, backend="numpy").run({"x": xs}, ckpt)["y"]
    np.testing.assert_allclose(got, xs @ np.concatenate(list(w.values())).T, rtol=1e-5, atol=1e-5)


def read_back(prog, name):
    """The bytes of each window buffer of an uploaded weight, trimmed to the window."""
    runner = prog._runner
    wb = runner.params[name]
    node = prog.graph[prog.graph.leaves("parameter")[name]]
    row = int(np.prod(node.shape[1:], dtype=np.int64)) * (4 if wb.dtype == "f32" else 2)
    return [runner.read_weight(name, i)[:(r1 - r0) * row] for i, (r0, r1) in enumerate(wb.windows)]


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("limit", [64, 96])
def test_windows_cut_through_members(dtype, limit, fresh_device, tmp_path):
    """A weight over the binding limit is split into row windows that begin and end inside members; the
    uploaded bytes are the concatenation, and the product is unchanged. Width 7: f16/bf16 members end
    mid-word, so the stream joins them."""
    width = 7
    rng = np.random.default_rng(4)
    w, b = members(rng, width)
    ckpt = save(tmp_path / "m.safetensors", {**w, **b}, (dtype,))
    fresh_device(limit)
    prog = mn.compile(qkv_graph(width), backend="wgpu")
    x = rng.standard_normal((5, width)).astype(np.float32)
    got = prog.run({"x": x}, ckpt)["y"]
    w = {n: stored(a, dtype) for n, a in w.items()}
    b = {n: stored(a, dtype) for n, a in b.items()}
    np.testing.assert_allclose(got, expect(x, w, b), rtol=1e-5, atol=1e-5)

    wb = prog._runner.params["qkv"]
    assert wb.dtype == dtype and len(wb.windows) > 1
    assert any(r0 not in (0, 5, 8, 10) for r0, _ in wb.windows)          # some window starts inside a member
    raw = np.concatenate([ckpt.raw(n).reshape(-1).view(np.uint8) for n in ("q.weight", "k.weight", "v.weight")])
    row = width * (4 if dtype == "f32" else 2)
    want = [raw[r0 * row:r1 * row].tobytes() for r0, r1 in wb.windows]
    assert read_back(prog, "qkv") == want
    bias = np.concatenate([ckpt.raw(f"{m}.bias").reshape(-1).view(np.uint8) for m in ROWS]).tobytes()
    assert b"".join(read_back(prog, "qkv_bias")) == bias


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_packed_embedding_table_in_windows(dtype, fresh_device, tmp_path):
    """An embedding table packed from three tensors, gathered across windows."""
    rng = np.random.default_rng(5)
    w, _ = members(rng)
    ckpt = save(tmp_path / "m.safetensors", w, (dtype,))
    g = mn.Graph()
    ids = g.input("ids", ("S",), dtype="i32")
    t = g.parameter("table", (N, H), packed=tuple((n, None) for n in w))
    g.set_outputs({"e": g.embedding(t, ids)})
    fresh_device(64)
    prog = mn.compile(g, backend="wgpu")
    tokens = np.array([0, 4, 5, 7, 8, 9, 3], np.int32)
    got = prog.run({"ids": tokens}, ckpt)["e"]
    assert len(prog._runner.params["table"].windows) >= 3
    table = np.concatenate([stored(a, dtype) for a in w.values()])
    np.testing.assert_array_equal(got, table[tokens])


def test_packed_members_of_mixed_dtypes_in_windows(fresh_device, tmp_path):
    rng = np.random.default_rng(6)
    w, b = members(rng)
    ckpt = save(tmp_path / "m.safetensors", {**w, **b}, ("bf16", "f32", "f16"))
    fresh_device(64)
    prog = mn.compile(qkv_graph(), backend="wgpu")
    x = rng.standard_normal((4, H)).astype(np.float32)
    want = mn.compile(qkv_graph(), backend="numpy").run({"x": x}, ckpt)["y"]
    np.testing.assert_allclose(prog.run({"x": x}, ckpt)["y"], want, rtol=1e-5, atol=1e-5)
    assert prog._runner.params["qkv"].dtype == "f32" and len(prog._runner.params["qkv"].windows) > 1


# ---------------------------------------------------------------- dicts

@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_parameter_from_dict_members(backend, fresh_device):
    rng = np.random.default_rng(7)
    w, b = members(rng)
    x = rng.standard_normal((3, H)).astype(np.float32)
    if backend == "wgpu":
        fresh_device(64)
    prog = mn.compile(qkv_graph(), backend=backend)
    weights = {**w, **b}
    np.testing.assert_allclose(prog.run({"x": x}, weights)["y"], expect(x, w, b), rtol=1e-5, atol=1e-5)
    packed = prog.params(weights)
    assert packed is prog.params(weights)                   # packed once, not per step
    np.testing.assert_array_equal(packed["qkv"], np.concatenate(list(w.values())))
    # a dict already holding the packed value (what a Program produced) is taken as is
    again = mn.compile(qkv_graph(), backend=backend).run({"x": x}, dict(packed))["y"]
    np.testing.assert_allclose(again, expect(x, w, b), rtol=1e-5, atol=1e-5)


def test_runner_binds_a_dict_of_members_directly():
    from meganeura.backend.runtime import WgpuRunner

    rng = np.random.default_rng(8)
    w, b = members(rng)
    runner = WgpuRunner(qkv_graph())
    runner.bind_weights({**w, **b})
    assert runner.params["qkv_bias"].dtype == "f32"
    got = np.frombuffer(runner.read_weight("qkv_bias"), np.float32)[:N]
    np.testing.assert_array_equal(got, np.concatenate(list(b.values())))
    with pytest.raises(ValueError, match=r"^missing weight v\.bias$"):
        WgpuRunner(qkv_graph()).bind_weights({n: a for n, a in {**w, **b}.items() if n != "v.bias"})


@pytest.mark.parametrize("backend", BACKENDS)
def test_dict_member_errors(backend):
    rng = np.random.default_rng(9)
    w, b = members(rng)
    prog = mn.compile(qkv_graph(), backend=backend)
    x = {"x": np.zeros((2, H), np.float32)}
    with pytest.raises(ValueError, match=r"^missing weight k\.weight$"):
        prog.run(x, {n: a for n, a in {**w, **b}.items() if n != "k.weight"})
    bad = {**w, **b, "k.weight": np.zeros((3, H + 1), np.float32)}
    with pytest.raises(ValueError, match=r"^weight k\.weight has shape \[3, 9\], expected \[3, 8\]$"):
        prog.run(x, bad)
    bad = {**w, **b, "k.weight": np.zeros((4, H), np.float32)}
    with pytest.raises(ValueError, match=r"^weights q\.weight, k\.weight, v\.weight have shapes "
                                         r"\[\[5, 8\], \[4, 8\], \[2, 8\]\], expected together \[10, 8\]$"):
        prog.run(x, bad)
    bad = {**w, **b, "qkv": np.zeros((N, H + 1), np.float32)}
    with pytest.raises(ValueError, match=r"^weight qkv has shape \[10, 9\], expected \[10, 8\]$"):
        prog.run(x, bad)


# ---------------------------------------------------------------- checkpoint errors

@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_member_errors_reported_together(backend, tmp_path):
    rng = np.random.default_rng(10)
    w, b = members(rng)
    del w["k.weight"]                                       # missing member of qkv
    b["v.bias"] = np.zeros(3, np.float32)                   # qkv_bias members sum to 11, not 10
    ckpt = save(tmp_path / "m.safetensors", {**w, **b}, ("f32",))
    prog = mn.compile(qkv_graph(), backend=backend)
    with pytest.raises(mn.CheckpointError) as e:
        prog.run({"x": np.zeros((2, H), np.float32)}, ckpt)
    msg = str(e.value)
    assert "missing k.weight (packed into qkv [10, 8])" in msg
    assert "q.bias, k.bias, v.bias have shapes [[5], [3], [3]], expected together [10]" in msg


def test_checkpoint_member_with_wrong_trailing_dims(tmp_path):
    rng = np.random.default_rng(11)
    w, b = members(rng)
    w["v.weight"] = np.zeros((2, H + 2), np.float32)
    ckpt = save(tmp_path / "m.safetensors", {**w, **b}, ("f32",))
    with pytest.raises(mn.CheckpointError, match=r"v\.weight has shape \[2, 10\], expected \[2, 8\]"):
        mn.compile(qkv_graph(), backend="numpy").bind(ckpt)


def test_checkpoint_member_that_is_not_a_float_tensor(tmp_path):
    rng = np.random.default_rng(12)
    w, b = members(rng)
    tensors = {**w, **b, "k.weight": w["k.weight"].astype(np.int32)}
    header, blobs, at = {}, [], 0
    for n, a in tensors.items():
        data = a.tobytes()
        header[n] = {"dtype": "I32" if a.dtype == np.int32 else "F32", "shape": list(a.shape),
                     "data_offsets": [at, at + len(data)]}
        blobs.append(data)
        at += len(data)
    head = json.dumps(header).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    with pytest.raises(mn.CheckpointError, match=r"k\.weight has dtype I32, expected a float type"):
        mn.compile(qkv_graph(), backend="numpy").bind(mn.open_weights(path))
