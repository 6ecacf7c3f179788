"""Every family and feature against HF transformers (torch CPU, fp32), on the numpy reference backend."""
import numpy as np
import pytest

import meganeura as mn
import oracle


# The reference executor must match at 2e-4 (HF's own fp32 noise); the GPU path at 1e-3.
BOUND = {"numpy": 2e-4, "wgpu": 1e-3}


@pytest.mark.parametrize("backend", list(BOUND))
@pytest.mark.parametrize("case", list(oracle.CASES))
def test_logits_match_transformers(case, backend, hf_checkpoint, token_ids):
    path, hf = hf_checkpoint(case)
    model = mn.load_model(path, backend=backend)
    for start in (0, 1000):
        want = oracle.hf_logits(hf, token_ids, start)
        got = model.logits(token_ids, start_pos=start)
        assert got.shape == want.shape and got.dtype == np.float32
        err = np.abs(got - want).max()
        assert err <= oracle.tolerance(want, BOUND[backend]), f"{case} from position {start}: max |Δlogit| {err:.3g}"


@pytest.mark.parametrize("case", list(oracle.CASES))
def test_optimized_logits_equal_unoptimized(case, hf_checkpoint, token_ids):
    """The optimizer's fused graph, on the GPU, against the graph as the model file builds it."""
    path, _ = hf_checkpoint(case)
    plain = mn.load_model(path, backend="numpy", optimize=False)
    fused = mn.load_model(path, backend="wgpu", optimize=True)
    report = fused.program.optimized.report
    assert report["kernels_after"] < report["kernels_before"]
    want = plain.logits(token_ids, start_pos=7)
    got = fused.logits(token_ids, start_pos=7)
    assert np.abs(got - want).max() <= oracle.tolerance(want, 1e-3)


def test_bf16_checkpoint_matches_f32_model_on_same_weights(hf_checkpoint, token_ids):
    for case in ("llama32", "gemma4_text_all"):
        path, hf = hf_checkpoint(case, dtype="bf16")
        assert mn.open_weights(path).tensors["model.norm.weight"].dtype == "BF16"
        want = oracle.hf_logits(hf, token_ids)
        got = mn.load_model(path, backend="numpy").logits(token_ids)
        assert np.abs(got - want).max() <= oracle.tolerance(want)


@pytest.mark.parametrize("case", ["llama32", "qwen3_moe", "gemma4_e2b_like", "gemma4_text_all"])
def test_bf16_checkpoint_on_gpu_matches_reference(case, hf_checkpoint, token_ids):
    """bf16 weights stay bf16 on the GPU (unpacked in the shader) and give the reference's logits."""
    path, _ = hf_checkpoint(case, dtype="bf16")
    ref = mn.load_model(path, backend="numpy").logits(token_ids)
    model = mn.load_model(path, backend="wgpu")
    assert {w.dtype for w in model.program._runner.params.values()} == {"bf16"}
    got = model.logits(token_ids)
    assert np.abs(got - ref).max() <= oracle.tolerance(ref, 1e-3)


@pytest.mark.parametrize("case, limit", [("llama_basic", 4096), ("gemma4_e2b_like", 4096), ("qwen3_moe", 16384)])
def test_small_binding_limit_gives_same_logits(case, limit, hf_checkpoint, token_ids, monkeypatch):
    """Weights larger than one storage binding are split into row windows (whole experts for MoE
    weights), transparently."""
    path, _ = hf_checkpoint(case)
    want = mn.load_model(path, backend="wgpu").logits(token_ids)
    monkeypatch.setenv("MEGANEURA_MAX_BINDING", str(limit))   # the 128x64 f32 embedding is 32 KiB
    model = mn.load_model(path, backend="wgpu")
    windows = {name: len(w.windows) for name, w in model.program._runner.params.items()}
    assert windows["model.embed_tokens.weight"] >= 32768 // limit and windows["lm_head.weight"] >= 2
    if case == "qwen3_moe":
        assert windows["model.layers.0.mlp.experts.gate_up_proj"] == 8
    np.testing.assert_allclose(model.logits(token_ids), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantize", [None, "q8"])
def test_split_tied_embedding_matches_reference(quantize, hf_checkpoint, token_ids, monkeypatch):
    """A tied embedding split into row windows serves the gather and the LM head from one set of buffers,
    in the full forward and in the generating program (last-token head), as the reference computes."""
    path, _ = hf_checkpoint("llama32")                        # tied: no lm_head.weight in the file
    ref = mn.load_model(path, backend="numpy", context=64, chunk=8, quantize=quantize)
    monkeypatch.setenv("MEGANEURA_MAX_BINDING", "4096")      # the 128x64 table: 32 KiB f32, 8.3 KiB q8
    model = mn.load_model(path, backend="wgpu", context=64, chunk=8, quantize=quantize)
    want = ref.logits(token_ids)
    np.testing.assert_allclose(model.logits(token_ids), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    params = model.program._runner.params
    assert len(params["model.embed_tokens.weight"].windows) >= 3
    assert params["lm_head.weight"] is params["model.embed_tokens.weight"]
    sessions = [model.session(), ref.session()]
    got, want = (s.feed(token_ids, "logits") for s in sessions)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert model.decoder._runner.params["lm_head.weight"] is params["model.embed_tokens.weight"]


def test_sharded_checkpoint_loads_like_unsharded(hf_checkpoint, token_ids):
    one, _ = hf_checkpoint("qwen3_moe")
    many, _ = hf_checkpoint("qwen3_moe", shard="20KB")
    import os
    assert os.path.exists(os.path.join(many, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(many) if f.endswith(".safetensors")]) > 1
    a = mn.load_model(one, backend="numpy").logits(token_ids)
    b = mn.load_model(many, backend="numpy").logits(token_ids)
    np.testing.assert_array_equal(a, b)


def test_graph_api_as_documented(hf_checkpoint):
    """The DESIGN §3 flow: build, set outputs, compile, run with open_weights."""
    from meganeura.models import gemma4

    path, hf = hf_checkpoint("gemma4_31b_like")
    g = mn.Graph()
    cfg = gemma4.Gemma4Config.from_hf(f"{path}/config.json")
    logits = gemma4.build_graph(g, cfg, seq_len=16)
    g.set_outputs([logits])
    prog = mn.compile(g, backend="numpy")
    ids = np.arange(16, dtype=np.uint32)
    out = prog.run({"token_ids": ids}, weights=mn.open_weights(path))
    want = oracle.hf_logits(hf, ids)
    assert np.abs(out["logits"] - want).max() <= oracle.tolerance(want)
