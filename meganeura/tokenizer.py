"""Text <-> token ids for a checkpoint directory, matching transformers 5.x without importing it.

The work is done by the `tokenizers` library from tokenizer.json; this module adds what transformers
layers on top, so prompts become the same ids the model was trained and evaluated with:

- special tokens named in tokenizer_config.json that tokenizer.json lacks are added (as transformers does);
- BOS/EOS come from tokenizer.json's post-processor only. transformers 5 ignores tokenizer_config.json's
  add_bos_token/add_eos_token whenever tokenizer.json exists, so this module does too;
- chat templates render in the same sandboxed jinja2 environment, and the chat text is then encoded
  without special tokens (the template writes BOS itself);
- generated ids detokenize incrementally (`decoder_stream`) without ever emitting half a character.
"""
from __future__ import annotations

import json
import os
from datetime import datetime

from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend

NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class TokenizerError(ValueError):
    """The tokenizer files cannot be read, or cannot do what was asked (e.g. no chat template)."""


def _token_str(value) -> str | None:
    """Special tokens are written as strings or as {"content": ...} dicts (serialized AddedTokens)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _first_line(e: Exception) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {_first_line(e)}") from None


def _ids(value) -> list[int]:
    """eos_token_id / bos_token_id may be an int, a list of ints, or absent."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class Tokenizer:
    """A checkpoint's tokenizer: encode, decode, chat template, streaming detokenization.

    bos_id: the BOS token's id (tokenizer_config's bos_token, else generation_config/config bos_token_id).
    eos_ids: every id that ends generation, generation_config.json's first, then config.json's, then the
             tokenizer's eos_token.
    vocab_size: one more than the largest id the tokenizer can produce (added tokens included).
    specials: the named special tokens as strings ({"bos_token": "<s>", ...}), as chat templates see them.
    """

    def __init__(self, backend: _Backend, *, specials: dict[str, str] | None = None,
                 chat_template: str | None = None, bos_id: int | None = None, eos_ids: list[int] | None = None,
                 name: str = "tokenizer"):
        self.backend = backend
        self.specials = dict(specials or {})
        self.chat_template = chat_template
        self.name = name
        self.bos_id = bos_id
        self.eos_ids = list(eos_ids or [])
        added = backend.get_added_tokens_decoder()
        self.vocab_size = max([backend.get_vocab_size(with_added_tokens=True), *(i + 1 for i in added)])
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        # Byte-fallback pieces (<0xE2> ...) decode as a run: one bad byte turns the whole run into U+FFFD.
        self.byte_ids = frozenset(i for i in (backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
                                  if i is not None)
        self._template = None

    @classmethod
    def from_dir(cls, path: str) -> Tokenizer:
        """Load tokenizer.json plus tokenizer_config.json, special_tokens_map.json, chat_template.jinja,
        config.json and generation_config.json (each optional) from a checkpoint directory."""
        path = os.fspath(path)
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise TokenizerError(f"{path} has no tokenizer.json (the Hugging Face tokenizers format is required)")
        try:
            backend = _Backend.from_file(file)
        except Exception as e:  # the Rust loader raises plain Exception with a serde message
            raise TokenizerError(f"cannot read {file}: {_first_line(e)}") from None
        backend.no_truncation()
        backend.no_padding()

        cfg = _read_json(os.path.join(path, "tokenizer_config.json")) or {}
        if not isinstance(cfg, dict):
            raise TokenizerError(f"cannot read {path}/tokenizer_config.json: not a JSON object")
        specials, extras = _special_tokens(cfg)
        if "added_tokens_decoder" not in cfg:
            # transformers reads special_tokens_map.json only for configs that predate added_tokens_decoder
            stm = _read_json(os.path.join(path, "special_tokens_map.json"))
            if isinstance(stm, dict):
                more, more_extras = _special_tokens(stm)
                specials.update(more)
                extras = extras or more_extras
        _add_missing_tokens(backend, cfg.get("added_tokens_decoder"), list(specials.values()) + extras)

        configs = [_read_json(os.path.join(path, f)) for f in ("generation_config.json", "config.json")]
        configs = [c for c in configs if isinstance(c, dict)]
        configs += [c["text_config"] for c in configs if isinstance(c.get("text_config"), dict)]  # multimodal

        def token_id(key: str) -> list[int]:
            i = backend.token_to_id(specials[key]) if key in specials else None
            return [] if i is None else [i]

        bos = token_id("bos_token") or [i for c in configs for i in _ids(c.get("bos_token_id"))]
        eos = [i for c in configs for i in _ids(c.get("eos_token_id"))] + token_id("eos_token")
        return cls(backend, specials=specials, chat_template=_chat_template(path, cfg),
                   bos_id=bos[0] if bos else None, eos_ids=list(dict.fromkeys(eos)), name=path)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; add_special_tokens applies tokenizer.json's post-processor (BOS for Llama/Gemma)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        """Render a conversation ([{"role", "content"}, ...], or one user prompt as a str) with the
        checkpoint's chat template, exactly as transformers' apply_chat_template(tokenize=False) does."""
        if self.chat_template is None:
            raise TokenizerError(f"{self.name} has no chat template (use a raw prompt instead)")
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not messages:
            raise TokenizerError("cannot apply a chat template to an empty conversation")
        chat = []
        for m in messages:
            if not isinstance(m, dict):
                raise TokenizerError(f"chat messages must be dicts with role and content, got {m!r}")
            m = {k: v for k, v in m.items() if v is not None}  # as transformers: absent beats None
            reasoning = next((m[k] for k in _REASONING_FIELDS if k in m), None)
            if reasoning is not None:
                m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
            chat.append(m)
        try:
            import jinja2
        except ImportError:
            raise TokenizerError("chat templates need jinja2 (pip install jinja2)") from None
        try:
            if self._template is None:
                self._template = _jinja_env().from_string(self.chat_template)
            return self._template.render(**self.specials, messages=chat, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template of {self.name}: {' '.join(str(e).split())}") from None

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered chat; no special tokens are added because the template writes them."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def decoder_stream(self, skip_special_tokens: bool = True) -> DecodeStream:
        return DecodeStream(self, skip_special_tokens)


class DecodeStream:
    """Incremental detokenization: push ids as they are generated, get only text that is final.

    Text is decoded in a short window (the previous chunk for context, so leading-space rules and
    multi-byte characters see their neighbours) and returned only when it does not end in U+FFFD and
    the last id is not a byte-fallback piece, whose run may still change. All pushes plus flush() equal
    tok.decode(all ids).
    """

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = True):
        self.tok = tok
        self.skip = skip_special_tokens
        self._ids: list[int] = []   # the window: the last chunk returned (context), then pending ids
        self._read = 0              # ids before this index have had their text returned

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if self.skip and token_id in self.tok.special_ids:
            return ""  # decode drops skipped specials before the decoder runs, so they cannot matter
        self._ids.append(token_id)
        if token_id in self.tok.byte_ids:
            return ""
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is left (an incomplete character comes out as U+FFFD, as decode gives it)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        done = self.tok.decode(self._ids[:self._read], self.skip)
        text = self.tok.decode(self._ids, self.skip)
        if not final and (len(text) <= len(done) or text.endswith("\ufffd")):
            return ""
        del self._ids[:self._read]
        self._read = len(self._ids)
        return text[len(done):]


def _chat_template(path: str, cfg: dict) -> str | None:
    """chat_template.jinja wins over tokenizer_config's chat_template (a string, or named templates)."""
    file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(file):
        try:
            with open(file, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read {file}: {_first_line(e)}") from None
    template = cfg.get("chat_template")
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    return template if isinstance(template, str) else None


def _special_tokens(cfg: dict) -> tuple[dict[str, str], list[str]]:
    """Named special tokens (bos_token, ..., and model-specific ones like image_token) and extra ones."""
    named = {k: _token_str(v) for k, v in cfg.items() if k.endswith("_token") and _token_str(v) is not None}
    specials = {k: named.pop(k) for k in NAMED_SPECIALS if k in named}
    extra = cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens") or []
    if isinstance(extra, dict):
        named.update({k: _token_str(v) for k, v in extra.items() if _token_str(v) is not None})
        extra = []
    specials.update(named)
    return specials, [s for s in map(_token_str, extra) if s is not None]


def _add_missing_tokens(backend: _Backend, added_tokens_decoder, specials: list[str]) -> None:
    """Add tokens the config names but tokenizer.json lacks, in transformers' order (ids may grow)."""
    have = {t.content for t in backend.get_added_tokens_decoder().values()}
    new = []
    if isinstance(added_tokens_decoder, dict):
        entries = sorted(((int(i), t) for i, t in added_tokens_decoder.items() if str(i).isdigit()), key=lambda x: x[0])
        for _, t in entries:
            if isinstance(t, dict) and isinstance(t.get("content"), str) and t["content"] not in have:
                flags = {k: bool(t.get(k, k == "normalized"))
                         for k in ("single_word", "lstrip", "rstrip", "normalized", "special")}
                new.append(AddedToken(t["content"], **flags))
                have.add(t["content"])
    for s in specials:
        if s not in have:
            new.append(AddedToken(s, special=True, normalized=False))
            have.add(s)
    if new:
        backend.add_tokens(new)


def _jinja_env():
    """The sandboxed environment transformers renders chat templates in."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """{% generation %} marks assistant text for training masks; for inference it renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which chat templates must not do
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
