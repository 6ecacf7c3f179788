"""Generation: the KV cache gives the full forward's logits, greedy decoding equals transformers'
generate for every family, and sampling is reproducible and stays inside top-k / top-p."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import meganeura as mn
import oracle
from meganeura import reference as R
from meganeura.generate import Sampling, probabilities, sample
from meganeura.graph import S


# ---------------------------------------------------------------- the cache's meaning

@settings(max_examples=40, deadline=None)
@given(window=st.one_of(st.none(), st.integers(1, 6)), chunks=st.lists(st.integers(1, 5), min_size=1, max_size=6),
       group=st.sampled_from([1, 2]), extra_slots=st.integers(0, 3), softcap=st.sampled_from([None, 2.0]))
def test_attention_over_a_ring_cache_equals_attention_over_the_whole_sequence(window, chunks, group, extra_slots,
                                                                             softcap):
    rng = np.random.default_rng(len(chunks))
    total, chunk = sum(chunks), max(chunks)
    slots = (total if window is None else window + chunk - 1) + extra_slots
    q = rng.standard_normal((total, 2 * group, 4)).astype(np.float32)
    k, v = (rng.standard_normal((total, 2, 4)).astype(np.float32) for _ in range(2))
    want = R.attention(q, k, v, scale=0.5, window=window, softcap=softcap)
    kc, vc = np.zeros((slots, 2, 4), np.float32), np.zeros((slots, 2, 4), np.float32)
    pos = 0
    for n in chunks:
        rows = slice(pos, pos + n)
        R.cache_write(kc, k[rows], pos, at=0, norm=None, eps=0.0, rope=None)
        R.cache_write(vc, v[rows], pos, at=0, norm=None, eps=0.0, rope=None)
        got = R.attention(q[rows], kc, vc, pos, scale=0.5, window=window, softcap=softcap)
        np.testing.assert_allclose(got, want[rows], rtol=1e-5, atol=1e-6)
        pos += n


def test_a_cache_too_small_for_what_the_queries_see_is_an_error():
    kc = np.zeros((3, 1, 2), np.float32)
    R.cache_write(kc, np.ones((3, 1, 2), np.float32), 0, at=0, norm=None, eps=0.0, rope=None)
    with pytest.raises(ValueError, match="cannot hold"):
        R.attention(np.ones((1, 1, 2), np.float32), kc, kc, 3, scale=1.0, window=None, softcap=None)


def test_cache_write_needs_a_state():
    g = mn.Graph()
    with pytest.raises(mn.ShapeError, match="writes into a state"):
        g.cache_write(g.input("c", (4, 1, 2)), g.input("x", (S, 1, 2)), g.input("p", (), "i32"))


# ---------------------------------------------------------------- sampling

LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)


def test_greedy_is_the_argmax():
    assert sample(LOGITS, Sampling(), np.random.default_rng(0)) == 0


@pytest.mark.parametrize("top_k, top_p", [(3, None), (None, 0.7), (4, 0.8), (None, None)])
def test_sampling_draws_from_the_restricted_distribution(top_k, top_p):
    s = Sampling(temperature=0.8, top_k=top_k, top_p=top_p, seed=0)
    p = probabilities(LOGITS, s)
    z = LOGITS.astype(np.float64) / 0.8
    full = np.exp(z) / np.exp(z).sum()
    support = np.argsort(-full)[:top_k or len(full)]
    if top_p is not None:       # the smallest prefix of the (top-k renormalised) order reaching top_p
        kept = full[support] / full[support].sum()
        support = support[:int(np.searchsorted(np.cumsum(kept), top_p)) + 1]
    assert set(np.flatnonzero(p)) == set(support.tolist())
    np.testing.assert_allclose(p[support], full[support] / full[support].sum(), rtol=1e-9)
    rng = np.random.default_rng(1)
    draws = np.array([sample(LOGITS, s, rng) for _ in range(4000)])
    assert set(draws.tolist()) <= set(support.tolist())
    freq = np.bincount(draws, minlength=len(LOGITS)) / len(draws)
    assert np.abs(freq - p).max() < 0.03            # ~4 standard errors at 4000 draws


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0)])
def test_bad_sampling_settings_are_rejected(bad):
    with pytest.raises(ValueError):
        Sampling(**bad)


# ---------------------------------------------------------------- every family against transformers

def no_eos(case, hf_checkpoint):
    """The oracle checkpoint re-saved without EOS ids, so both sides generate every token asked for."""
    import tempfile
    path, hf = hf_checkpoint(case)
    key = ("no-eos", case)
    if key not in _SAVED:
        hf.generation_config.eos_token_id = None
        hf.config.eos_token_id = None
        if hasattr(hf.config, "text_config"):
            hf.config.text_config.eos_token_id = None
        d = tempfile.mkdtemp(prefix=f"{case}-no-eos-")
        hf.save_pretrained(d)
        _SAVED[key] = d
    return _SAVED[key], hf


_SAVED = {}


def hf_greedy(hf, ids, n):
    import torch
    with torch.no_grad():
        out = hf.generate(torch.as_tensor(np.asarray(ids, np.int64))[None], max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("case", list(oracle.CASES))
def test_decode_with_cache_equals_full_forward_and_greedy_equals_transformers(case, hf_checkpoint):
    """On the GPU path with the optimizer: a 9-token prompt prefilled in chunks of 4 (so sliding layers
    wrap their ring buffers), 24 new tokens; every decoded step's logits against one full forward."""
    path, hf = no_eos(case, hf_checkpoint)
    model = mn.load_model(path, context=48, chunk=4)
    prompt = np.random.default_rng(3).integers(0, 128, 9).tolist()
    new = model.generate_ids(prompt, max_new_tokens=24)
    assert new == hf_greedy(hf, prompt, 24), case

    seq = prompt + new
    full = model.logits(seq)
    dec, fwd = model.decoder._runner.params, model.program._runner.params
    assert dec.keys() & fwd.keys() and all(dec[n] is fwd[n] for n in dec.keys() & fwd.keys()), "uploaded twice"
    session = model.session()
    session.reset()
    steps = [session.feed(prompt, "logits")] + [session.feed([t], "logits") for t in new[:-1]]
    want = full[len(prompt) - 1:-1]
    err = np.abs(np.stack(steps) - want).max() / np.abs(want).max()
    assert err <= 1e-3, f"{case}: decode vs full forward, relative error {err:.2e}"


def test_generation_stops_after_an_eos_id(hf_checkpoint):
    path, hf = no_eos("qwen3", hf_checkpoint)
    prompt = [5, 17, 99, 3]
    free = hf_greedy(hf, prompt, 12)
    model = mn.load_model(path, context=32)
    model.eos_ids = [free[5]]
    got = model.generate_ids(prompt, max_new_tokens=12)
    assert got == free[:free.index(free[5]) + 1]


def test_generation_stops_at_the_end_of_the_context(hf_checkpoint):
    path, _ = no_eos("llama_basic", hf_checkpoint)
    model = mn.load_model(path, context=10, chunk=4)
    assert len(model.generate_ids([1, 2, 3, 4, 5, 6], max_new_tokens=50)) == 5    # positions 6..9, then 10 is full
    with pytest.raises(ValueError, match="context"):
        model.generate_ids(list(range(11)), max_new_tokens=1)


def test_seeded_sampling_is_reproducible_and_seeds_differ(hf_checkpoint):
    path, _ = no_eos("gemma4_text_all", hf_checkpoint)
    model = mn.load_model(path, context=40)
    kw = dict(max_new_tokens=16, temperature=1.5, top_p=0.95)
    a = model.generate_ids([3, 1, 4, 1, 5], seed=7, **kw)
    assert a == model.generate_ids([3, 1, 4, 1, 5], seed=7, **kw)
    assert any(model.generate_ids([3, 1, 4, 1, 5], seed=s, **kw) != a for s in (8, 9, 10))


def test_reference_backend_generates_the_same_ids(hf_checkpoint):
    path, _ = no_eos("gemma4_e2b_like", hf_checkpoint)
    prompt = [9, 8, 7, 6, 5, 4, 3]
    gpu = mn.load_model(path, context=32, chunk=3).generate_ids(prompt, max_new_tokens=10)
    ref = mn.load_model(path, backend="numpy", context=32, chunk=3).generate_ids(prompt, max_new_tokens=10)
    assert gpu == ref


@pytest.mark.parametrize("case", ["gemma4_text_all", "qwen3", "mistral_sliding"])
def test_split_kv_decode_equals_the_reference(case, hf_checkpoint, monkeypatch):
    """Steps of up to kernels.SPLIT_TOKENS tokens split each query's keys among workgroups; with 3 keys a
    split even these short caches split (full layers: 14 splits of 40 slots; sliding rings of 8: 3), rings
    wrap and early steps leave splits empty. Every step's logits and the greedy ids equal the reference's."""
    from meganeura.backend import kernels
    monkeypatch.setattr(kernels, "KEYS_PER_SPLIT", 3)
    path, _ = no_eos(case, hf_checkpoint)
    prompt = [9, 8, 7, 6, 5, 4, 3, 2, 1]
    gpu = mn.load_model(path, context=40, chunk=4)
    ref = mn.load_model(path, backend="numpy", context=40, chunk=4)
    new = gpu.generate_ids(prompt, max_new_tokens=20)
    assert new == ref.generate_ids(prompt, max_new_tokens=20)
    runner = gpu.decoder._runner
    assert any(k.label.endswith("_split") for ks in runner.kernels.values() for k in ks)
    assert_steps_equal_the_reference(gpu, ref, prompt, new, f"{case}: split-KV decode")


def assert_steps_equal_the_reference(gpu, ref, prompt, new, what):
    """Every step's logits, the prompt's and then one of `new` a step, equal the reference's within 1e-4."""
    sessions = [gpu.session(), ref.session()]
    for tokens in [prompt] + [[t] for t in new[:-1]]:
        got, want = (s.feed(tokens, "logits") for s in sessions)
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= 1e-4, f"{what} at position {sessions[1].pos}, relative error {err:.2e}"


@pytest.mark.parametrize("case", ["gemma4_text_all", "qwen3"])
@pytest.mark.parametrize("layout, keys_per_split, disable", [
    ("cpu", 256, ""), ("cpu", 3, ""), ("gpu", 256, ""), ("cpu", 256, "texture-adapter-specific-format-features")])
def test_one_token_attention_writes_the_cache_itself(case, layout, keys_per_split, disable, hf_checkpoint,
                                                    monkeypatch):
    """A one-token step's attention makes the step's key and value itself and stores them in the caches
    (`kernels._folded_cache_writes`): on both layouts, over whole and split keys (3 keys a split), with
    normed and rotated keys, unit-normed values and sliding rings that wrap. Every step's logits equal the
    reference's. Without read-write textures a CPU device keeps every cache_write dispatch."""
    from meganeura.backend import kernels
    monkeypatch.setenv("MEGANEURA_LAYOUT", layout)
    monkeypatch.setenv("MEGANEURA_DISABLE", disable)
    monkeypatch.setattr(kernels, "KEYS_PER_SPLIT", keys_per_split)
    path, _ = no_eos(case, hf_checkpoint)
    gpu = mn.load_model(path, context=40, chunk=4)
    ref = mn.load_model(path, backend="numpy", context=40, chunk=4)
    prompt = [9, 8, 7, 6, 5, 4, 3, 2, 1]
    assert_steps_equal_the_reference(gpu, ref, prompt, ref.generate_ids(prompt, max_new_tokens=16), f"{case}: decode")
    writes = lambda n: [k.label for k, _ in gpu.decoder._runner.dispatches if k.runs_for(n)].count("cache_write")
    # A CPU layout's split keys need its lane workgroups to hold whole subgroups (8 lanes on lavapipe; a GPU's
    # 32-wide subgroups do not fit, and its one-token step keeps the writes).
    lanes = gpu.decoder._runner.dev.subgroup_size
    folds = not disable and (layout == "gpu" or keys_per_split == 256 or kernels.LANES_WG % lanes == 0)
    assert (writes(1) < writes(4)) == folds and writes(4) > 0


def test_default_context_is_the_model_limit_capped_by_memory(hf_checkpoint):
    path, _ = hf_checkpoint("llama32")           # max_position_embeddings 131072
    model = mn.load_model(path)
    assert model.cache.context == 131072          # 2 layers x 2 kv heads x 24 x 2 x 4 bytes = 768 B a position
    big = mn.load_model(path, backend="numpy")
    big.config.max_position_embeddings = 1 << 40
    assert big._cache(None, None).context * 768 <= 4 << 30


# ---------------------------------------------------------------- greedy steps queued ahead of their read-back

def one_step_at_a_time(session, prompt, n):
    """The greedy tokens after `prompt` with a read-back between every two steps."""
    session.reset()
    token = int(session.feed(prompt))
    new = [token]
    for _ in range(n - 1):
        token = int(session.feed([token]))
        new.append(token)
    return new


def assert_feeds_on_like_a_full_forward(model, session, seq, more):
    """Feeding `more` at session.pos (where `seq` ends) gives the logits a full forward of seq + more does."""
    assert session.pos == len(seq)
    got = session.feed(more, "logits")
    want = model.logits(seq + more)[-1]
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= 1e-3, f"feeding on at position {len(seq)}: relative error {err:.2e}"


@pytest.mark.parametrize("case, chunk", [("mistral_sliding", 4), ("mistral_sliding", 8), ("gemma4_text_all", 7)])
def test_queued_greedy_steps_give_the_tokens_and_caches_of_single_steps(case, chunk, hf_checkpoint):
    """Windows of 5 positions in rings of 5 + chunk - 1 slots wrap many times over 9 + 20 positions; steps
    go in groups of 2 (chunk 4) or 4 per submit. The session stops at max_new_tokens and at an EOS
    mid-group (steps stay queued past its last token, writing slots ahead) and is fed on from there."""
    from meganeura.generate import generate_ids
    path, _ = no_eos(case, hf_checkpoint)
    model = mn.load_model(path, context=40, chunk=chunk)
    assert model.decoder.chains
    prompt = [9, 8, 7, 6, 5, 4, 3, 2, 1]
    session = model.session()
    want = one_step_at_a_time(session, prompt, 21)

    session.reset()
    first = int(session.feed(prompt))
    assert [first, *session.greedy(first, 20)] == want
    assert_feeds_on_like_a_full_forward(model, session, prompt + want[:-1], [want[-1], 3, 1])

    session.reset()
    got = list(generate_ids(session, prompt, 12, Sampling(), eos_ids=[]))     # stops at max_new_tokens
    assert got == want[:12]
    assert_feeds_on_like_a_full_forward(model, session, prompt + got[:-1], [got[-1], 5])

    eos = want[7]
    session.reset()
    got = list(generate_ids(session, prompt, 20, Sampling(), eos_ids=[eos]))  # stops at an EOS, a step queued past it
    assert got == want[:want.index(eos) + 1]
    assert_feeds_on_like_a_full_forward(model, session, prompt + got[:-1], [got[-1], 2, 7])


def test_queued_greedy_steps_stop_at_the_end_of_the_context(hf_checkpoint):
    path, _ = no_eos("llama_basic", hf_checkpoint)
    model = mn.load_model(path, context=12, chunk=4)
    session = model.session()
    want = one_step_at_a_time(session, [1, 2, 3, 4, 5], 8)        # positions 5..11 give tokens 2..8
    session.reset()
    first = int(session.feed([1, 2, 3, 4, 5]))
    assert [first, *session.greedy(first, 50)] == want and session.pos == 12
