"""meganeura.tokenizer against transformers.AutoTokenizer, on tiny tokenizers trained in the test."""
import json
import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meganeura.tokenizer import Tokenizer, TokenizerError
from tokenizer_util import make_tokenizer_dir

KINDS = ["bytelevel", "sentencepiece"]
TEXTS = [
    "Hello world, the fox!",
    "naïve café 日本語 🙂",
    " leading and trailing spaces  ",
    "",
    "tabs\tand\nnew\n\nlines",
    "specials in text: <s></s><|eot_id|><|begin_of_text|> <start_of_turn>",
    "print({'key': [1, 2, 3]})  # code",
]
CHATS = [
    "a single prompt",
    [{"role": "user", "content": "  Why is the sky blue?  "}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! 🙂"},
     {"role": "user", "content": "naïve café 日本語", "name": None}],
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return {kind: make_tokenizer_dir(tmp_path_factory.mktemp(kind), kind) for kind in KINDS}


@pytest.fixture(scope="module")
def toks(dirs):
    return {kind: Tokenizer.from_dir(d) for kind, d in dirs.items()}


def auto(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path))


def test_util_is_fast_deterministic_and_sized(tmp_path):
    for kind in KINDS:
        t = time.perf_counter()
        a = make_tokenizer_dir(tmp_path / f"{kind}-a", kind, vocab_size=400)
        assert time.perf_counter() - t < 1.0
        b = make_tokenizer_dir(tmp_path / f"{kind}-b", kind, vocab_size=400)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            assert open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read()
        assert not os.path.exists(os.path.join(a, "config.json"))
        assert Tokenizer.from_dir(a).vocab_size == 400
    other = make_tokenizer_dir(tmp_path / "other", "bytelevel", text="one two three four five six " * 20)
    base = Tokenizer.from_dir(tmp_path / "bytelevel-a")
    assert Tokenizer.from_dir(other).encode("one two") != base.encode("one two")
    with pytest.raises(ValueError, match="too small"):
        make_tokenizer_dir(tmp_path / "tiny", "sentencepiece", vocab_size=100)


@pytest.mark.parametrize("kind", KINDS)
def test_encode_decode_match_transformers(kind, dirs, toks):
    hf, tok = auto(dirs[kind]), toks[kind]
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf(text)["input_ids"], text
        assert tok.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]
        assert ids[:1] == [tok.bos_id]  # both families put BOS in their post-processor
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert tok.vocab_size == len(hf)
    assert tok.bos_id == hf.bos_token_id and tok.eos_ids == [hf.eos_token_id]


@pytest.mark.parametrize("kind", KINDS)
def test_chat_template_matches_transformers(kind, dirs, toks):
    hf, tok = auto(dirs[kind]), toks[kind]
    for chat in CHATS:
        msgs = [{"role": "user", "content": chat}] if isinstance(chat, str) else chat
        for gen in (True, False):
            want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert tok.apply_chat_template(chat, add_generation_prompt=gen) == want
        want_ids = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"]
        assert tok.encode_chat(chat) == want_ids
        assert want_ids.count(tok.bos_id) == 1  # BOS comes from the template, not from encoding again


@pytest.mark.parametrize("kind", KINDS)
def test_add_bos_token_in_config_is_ignored_like_transformers(kind, tmp_path):
    # transformers 5 drops add_bos_token/add_eos_token when tokenizer.json exists: its post-processor decides.
    cases = [dict(bos=False, add_bos_token=True, add_eos_token=True), dict(bos=True, add_bos_token=False)]
    for i, case in enumerate(cases):
        d = make_tokenizer_dir(tmp_path / str(i), kind, **case)
        hf, tok = auto(d), Tokenizer.from_dir(d)
        for text in ("the end", ""):
            assert tok.encode(text) == hf(text)["input_ids"]
        assert (tok.encode("the end")[0] == tok.bos_id) == case["bos"]


def test_no_bos_token_qwen_style(tmp_path):
    d = make_tokenizer_dir(tmp_path, "bytelevel", bos=False, bos_token=None, eos_token="<|end_of_text|>")
    hf, tok = auto(d), Tokenizer.from_dir(d)
    assert tok.bos_id is None and hf.bos_token_id is None
    assert tok.encode("hello there") == hf("hello there")["input_ids"]
    assert tok.apply_chat_template("hi") == hf.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


def test_config_tokens_missing_from_tokenizer_json_are_added(tmp_path):
    d = make_tokenizer_dir(tmp_path, "bytelevel", pad_token="<pad>", image_token="<image>",
                           additional_special_tokens=["<extra>"],
                           added_tokens_decoder={"600": {"content": "<tool>", "special": False, "normalized": False}})
    hf, tok = auto(d), Tokenizer.from_dir(d)
    text = "a<pad>b<image>c<extra>d<tool>e"
    assert tok.encode(text) == hf(text)["input_ids"]
    assert tok.vocab_size == len(hf) == 516
    ids = tok.encode(text)
    for skip in (True, False):
        assert tok.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip)
    assert tok.specials["image_token"] == "<image>" and tok.specials["pad_token"] == "<pad>"


def test_special_tokens_map_and_dict_tokens(tmp_path):
    d = make_tokenizer_dir(tmp_path, "sentencepiece", bos_token={"content": "<s>", "special": True},
                           eos_token=None, chat_template="{{ bos_token }}|{{ eos_token }}|{{ messages[0].content }}")
    with open(os.path.join(d, "special_tokens_map.json"), "w") as f:
        json.dump({"eos_token": {"content": "<end_of_turn>", "lstrip": False}}, f)
    tok = Tokenizer.from_dir(d)
    assert tok.bos_id == 1 and tok.eos_ids == [4]
    assert tok.apply_chat_template("x") == "<s>|<end_of_turn>|x"


def test_chat_template_sources_and_features(tmp_path):
    d = make_tokenizer_dir(tmp_path, "bytelevel", chat_template=[
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "list-default"}])
    assert Tokenizer.from_dir(d).apply_chat_template("x") == "list-default"
    with open(os.path.join(d, "chat_template.jinja"), "w") as f:  # the separate file wins, as in transformers
        f.write("{% for m in messages %}{% generation %}{{ m | tojson }}{% endgeneration %}\n"
                "{% if loop.last %}{% break %}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}>{% endif %}")
    msgs = [{"role": "user", "content": "é <b>", "reasoning_content": None}]
    tok, hf = Tokenizer.from_dir(d), auto(d)
    got = tok.apply_chat_template(msgs)
    assert got == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert got == '{"role": "user", "content": "é <b>"}>'


def test_chat_template_errors(tmp_path, toks):
    with pytest.raises(TokenizerError, match="System role not supported"):
        toks["sentencepiece"].apply_chat_template([{"role": "system", "content": "be nice"}])
    with pytest.raises(TokenizerError, match="empty conversation"):
        toks["bytelevel"].apply_chat_template([])
    d = make_tokenizer_dir(tmp_path / "none", "bytelevel", chat_template=None)
    with pytest.raises(TokenizerError, match="has no chat template") as e:
        Tokenizer.from_dir(d).apply_chat_template("hi")
    assert str(d) in str(e.value)
    d = make_tokenizer_dir(tmp_path / "bad", "bytelevel", chat_template="{% for %}")
    with pytest.raises(TokenizerError, match="chat template") as e:
        Tokenizer.from_dir(d).apply_chat_template("hi")
    assert "\n" not in str(e.value)


def test_bos_and_eos_ids_from_configs(tmp_path):
    d = make_tokenizer_dir(tmp_path, "sentencepiece")
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": [4, 2]}, f)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"eos_token_id": 3, "text_config": {"eos_token_id": [2, 0]}}, f)
    tok = Tokenizer.from_dir(d)
    assert tok.bos_id == 1 and tok.eos_ids == [4, 2, 3, 0]
    os.remove(os.path.join(d, "generation_config.json"))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"bos_token_id": 2, "eos_token_id": 3}, f)
    assert Tokenizer.from_dir(d).eos_ids == [3, 2]
    assert Tokenizer.from_dir(d).bos_id == 1  # the tokenizer's own bos_token wins
    d2 = make_tokenizer_dir(tmp_path / "q", "bytelevel", bos=False, bos_token=None)
    with open(os.path.join(d2, "config.json"), "w") as f:
        json.dump({"bos_token_id": 508}, f)
    assert Tokenizer.from_dir(d2).bos_id == 508


def test_file_errors(tmp_path):
    with pytest.raises(TokenizerError, match="has no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read .*tokenizer.json") as e:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(e.value)
    d = make_tokenizer_dir(tmp_path / "ok", "bytelevel")
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        f.write("{")
    with pytest.raises(TokenizerError, match="cannot read .*tokenizer_config.json"):
        Tokenizer.from_dir(d)
    assert issubclass(TokenizerError, ValueError)


def stream_all(tok, ids, skip):
    """Push ids one at a time; check each piece is final (a prefix of every later decode)."""
    stream, out = tok.decoder_stream(skip_special_tokens=skip), ""
    final = tok.decode(ids, skip_special_tokens=skip)
    for n, i in enumerate(ids, 1):
        piece = stream.push(i)
        out += piece
        assert final.startswith(out)
        assert tok.decode(ids[:n], skip_special_tokens=skip).startswith(out)
        assert not piece.endswith("\ufffd") or piece == ""
    return out + stream.flush(), final


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("text", ["naïve café 日本語 🙂", "the end. 🙂🙂 ü", "Zürich → 東京 ✓\n"])
def test_stream_real_text_never_splits_characters(kind, text, toks):
    tok = toks[kind]
    ids = tok.encode(text)
    stream = tok.decoder_stream()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == tok.decode(ids) == (text if kind == "bytelevel" else text.lstrip())
    assert all("\ufffd" not in p for p in pieces)
    assert any(p == "" for p in pieces)  # some ids are only part of a character
    for skip in (True, False):
        got, want = stream_all(tok, ids, skip)
        assert got == want


@pytest.mark.parametrize("skip", [True, False])
def test_stream_byte_runs_that_turn_invalid(skip, toks):
    # Byte-fallback decoding is all-or-nothing per run of <0x..> pieces, and skipped specials vanish
    # from the run: "é" followed by a stray continuation byte must not be emitted early.
    tok = toks["sentencepiece"]
    b = {v: tok.backend.token_to_id(f"<0x{v:02X}>") for v in (0xC3, 0xA9)}
    the = tok.encode("the", add_special_tokens=False)
    for ids in ([b[0xC3], b[0xA9], 4, b[0xA9], *the], [b[0xC3], b[0xA9], b[0xA9], *the], [*the, b[0xC3], 2, b[0xA9]]):
        got, want = stream_all(tok, ids, skip)
        assert got == want


@settings(max_examples=150, deadline=None)
@given(kind=st.sampled_from(KINDS), skip=st.booleans(), data=st.data())
def test_stream_equals_decode_for_any_ids(kind, skip, data, toks):
    tok = toks[kind]
    pool = st.one_of(st.integers(0, tok.vocab_size - 1), st.sampled_from(sorted(tok.byte_ids | tok.special_ids)),
                     st.sampled_from(tok.encode("é日🙂 ü the", add_special_tokens=False)))
    ids = data.draw(st.lists(pool, max_size=40))
    got, want = stream_all(tok, ids, skip)
    assert got == want
