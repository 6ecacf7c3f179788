"""Every family and feature against HF transformers (torch CPU, fp32), on the numpy reference backend."""
import numpy as np
import pytest

import meganeura as mn
import oracle


@pytest.mark.parametrize("case", list(oracle.CASES))
def test_logits_match_transformers(case, hf_checkpoint, token_ids):
    path, hf = hf_checkpoint(case)
    model = mn.load_model(path, backend="numpy")
    for start in (0, 1000):
        want = oracle.hf_logits(hf, token_ids, start)
        got = model.logits(token_ids, start_pos=start)
        assert got.shape == want.shape and got.dtype == np.float32
        err = np.abs(got - want).max()
        assert err <= oracle.tolerance(want), f"{case} from position {start}: max |Δlogit| {err:.3g}"


def test_bf16_checkpoint_matches_f32_model_on_same_weights(hf_checkpoint, token_ids):
    for case in ("llama32", "gemma4_text_all"):
        path, hf = hf_checkpoint(case, dtype="bf16")
        assert mn.open_weights(path).tensors["model.norm.weight"].dtype == "BF16"
        want = oracle.hf_logits(hf, token_ids)
        got = mn.load_model(path, backend="numpy").logits(token_ids)
        assert np.abs(got - want).max() <= oracle.tolerance(want)


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
