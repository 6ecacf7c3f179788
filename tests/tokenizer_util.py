"""Tiny trained tokenizers written as checkpoint files, for tests that need real tokenization offline.

`make_tokenizer_dir` trains a small BPE with the `tokenizers` library and writes tokenizer.json and
tokenizer_config.json into a directory (it never writes config.json, so it can drop a tokenizer into a
model checkpoint). Two families are covered, because they detokenize differently:

- "bytelevel": GPT-2 / Llama-3 / Qwen style byte-level BPE; every byte is a token, specials sit at the end.
- "sentencepiece": Llama-2 / Gemma style BPE over "▁"-joined words with byte fallback (<0x00>..<0xFF>)
  for characters it never saw, so non-English text decodes from byte tokens.

Training is deterministic and takes milliseconds; the vocabulary is padded with unused tokens to exactly
`vocab_size` ids, so a model config can use the same number.
"""
from __future__ import annotations

import json
import os

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

DEFAULT_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model reads the text one token at a time and
predicts what comes next. Every word is split into pieces that the model has seen before, and the pieces
are joined again when the answer is printed. When the weather is fine we walk along the river to the old
mill, where the water turns the wheel and the wheel turns the stones that grind the grain into flour.
The baker buys the flour in the morning and sells bread in the afternoon to the people of the town.
Children play in the square while their parents talk about the harvest, the price of wool, and the news
from the city. In the evening the lamps are lit and the streets grow quiet; only the cats and the night
watchman are still awake. Numbers matter too: one, two, three, four, five, six, seven, eight, nine, ten,
and the year 2024 has 366 days. Questions end with a question mark? Exclamations end with a bang! Lists
use commas, semicolons; and colons: like this. Quotes are "double" or 'single', and code looks like
print(x + y) or {"key": [1, 2, 3]}. A good tokenizer handles all of these without trouble, and a good
compiler turns the model into a few fast kernels that run on any graphics card. The story continues with
a traveller who arrives at the inn late at night, asks for a room and a warm meal, and tells the
innkeeper about the mountains he crossed, the rivers he forded, and the strange lights he saw in the sky
above the northern forest. The innkeeper listens, pours another cup of tea, and says that such lights
appear every winter, that nobody knows where they come from, and that the wisest thing is to sleep well
and leave early in the morning before the snow begins to fall again on the narrow road to the valley.
"""

BYTELEVEL_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eot_id|>"]
SENTENCEPIECE_SPECIALS = ["<unk>", "<s>", "</s>", "<start_of_turn>", "<end_of_turn>"]

# Llama-3 style: the template writes BOS itself, so the chat text is encoded without special tokens.
BYTELEVEL_CHAT = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Gemma style: no system role, "model" for the assistant, raise_exception for bad input.
SENTENCEPIECE_CHAT = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def _bytelevel(text: str, vocab_size: int, bos: bool) -> tuple[Tokenizer, dict]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    n_base = vocab_size - len(BYTELEVEL_SPECIALS)
    trainer = trainers.BpeTrainer(vocab_size=n_base, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([text], trainer)
    vocab, merges = _vocab_and_merges(tok)
    _pad(vocab, n_base, "<|reserved_{}|>")
    tok.model = models.BPE(vocab=vocab, merges=merges)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in BYTELEVEL_SPECIALS])
    if bos:
        bos_id = tok.token_to_id(BYTELEVEL_SPECIALS[0])
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
            special_tokens=[("<|begin_of_text|>", bos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": BYTELEVEL_CHAT}
    return tok, config


def _sentencepiece(text: str, vocab_size: int, bos: bool) -> tuple[Tokenizer, dict]:
    # Train over words that start with "▁" (as SentencePiece does), then rebuild the model with the
    # specials and the 256 byte tokens first, the way Llama-2 lays out its vocabulary.
    meta = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = meta
    head = SENTENCEPIECE_SPECIALS + [f"<0x{b:02X}>" for b in range(256)]
    n_pieces = vocab_size - len(head)
    if n_pieces < 1:
        raise ValueError(f"vocab_size {vocab_size} is too small for a sentencepiece tokenizer (min {len(head) + 1})")
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=n_pieces, show_progress=False))
    pieces, merges = _vocab_and_merges(tok)
    vocab = {t: i for i, t in enumerate(head)}
    for t in sorted(pieces, key=pieces.get):
        vocab.setdefault(t, len(vocab))
    _pad(vocab, vocab_size, "<unused{}>")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SENTENCEPIECE_SPECIALS])
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", 1)])
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": SENTENCEPIECE_CHAT}
    return tok, config


def _vocab_and_merges(tok: Tokenizer) -> tuple[dict[str, int], list]:
    model = json.loads(tok.to_str())["model"]
    return dict(model["vocab"]), [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def _pad(vocab: dict[str, int], size: int, name: str) -> None:
    """Fill the vocabulary up to `size` ids with unreachable tokens, so the size is exactly what was asked."""
    if len(vocab) > size:
        raise ValueError(f"vocab_size {size} is smaller than the tokenizer's base vocabulary ({len(vocab)})")
    i = 0
    while len(vocab) < size:
        vocab.setdefault(name.format(i), len(vocab))
        i += 1


def make_tokenizer_dir(path, kind: str = "bytelevel", vocab_size: int = 512, text: str = DEFAULT_TEXT, *,
                       bos: bool = True, chat_template: str | None | bool = True, **config) -> str:
    """Write tokenizer.json + tokenizer_config.json for a tiny tokenizer into `path`; return `path` as str.

    kind: "bytelevel" (specials at the end; BOS <|begin_of_text|>, EOS <|eot_id|>) or "sentencepiece"
    (ids 0..4 are <unk> <s> </s> <start_of_turn> <end_of_turn>, then <0x00>..<0xFF>).
    vocab_size: exact number of ids (bytelevel needs >= 261, sentencepiece >= 262).
    bos: the tokenizer.json post-processor adds BOS; False leaves it out (Qwen style).
    chat_template: True for the family's default template, a string for another, None/False for none.
    config: extra tokenizer_config.json keys (a value of None deletes the key).
    """
    if kind == "bytelevel":
        tok, cfg = _bytelevel(text, vocab_size, bos)
    elif kind == "sentencepiece":
        tok, cfg = _sentencepiece(text, vocab_size, bos)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r} (bytelevel or sentencepiece)")
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **cfg}
    if chat_template is not True:
        cfg["chat_template"] = chat_template or None
    cfg.update(config)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path = str(path)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    return path
