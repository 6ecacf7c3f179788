"""The model shipped in meganeura/default_model: present, small, loads, writes English."""

import json
import os
import re

import pytest

from meganeura.default_model import PATH

LIMIT = 10 * 1024 * 1024


def _files():
    return [os.path.join(PATH, f) for f in os.listdir(PATH) if os.path.isfile(os.path.join(PATH, f))]


def test_shipped_files_present_and_small():
    names = set(os.listdir(PATH))
    for f in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "words.json", "SOURCE.md"]:
        assert f in names, f
    assert sum(os.path.getsize(f) for f in _files()) <= LIMIT
    cfg = json.load(open(os.path.join(PATH, "config.json")))
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    with open(os.path.join(PATH, "model.safetensors"), "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    assert "lm_head.weight" not in header                  # tied to the embedding


def test_tokenizer_adds_one_bos():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(PATH, "tokenizer.json"))
    cfg = json.load(open(os.path.join(PATH, "config.json")))
    tcfg = json.load(open(os.path.join(PATH, "tokenizer_config.json")))
    ids = tok.encode("Once upon a time").ids
    assert ids[0] == cfg["bos_token_id"] == tok.token_to_id(tcfg["bos_token"])
    assert cfg["bos_token_id"] not in ids[1:]
    assert cfg["eos_token_id"] == tok.token_to_id(tcfg["eos_token"])
    assert tok.decode(ids) == "Once upon a time"


def test_greedy_continuation_is_english():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    tok = transformers.AutoTokenizer.from_pretrained(PATH)
    model = transformers.LlamaForCausalLM.from_pretrained(PATH, dtype=torch.float32)
    vocab = set(json.load(open(os.path.join(PATH, "words.json"))))
    enc = tok("Once upon a time", return_tensors="pt")
    assert enc.input_ids[0, 0].item() == model.config.bos_token_id
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=60, do_sample=False)
    text = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    words = re.findall(r"\w+(?:'\w+)*", text.lower())   # as train.words() builds words.json
    assert len(words) >= 20, text
    known = sum(w in vocab for w in words)
    assert known >= 0.7 * len(words), (known, len(words), text)
