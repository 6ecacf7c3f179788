"""Train the small Llama model shipped in `meganeura/default_model/`.

    python -m meganeura.default_model.train [--out DIR] [--minutes N] [--steps N] [--text FILE]

Text
----
Jane Austen's six completed novels: *Sense and Sensibility* (1811), *Pride and
Prejudice* (1813), *Mansfield Park* (1814), *Emma* (1815), *Northanger Abbey* (1817)
and *Persuasion* (1817), about 4.3 MB of English narrative prose. The novels are in
the public domain (published more than 200 years ago; the transcriptions are Project
Gutenberg's). They are taken from the R data package **janeaustenr** (Copyright
2016-2017 Julia Silge, MIT license), which Debian ships as `r-cran-janeaustenr`.

How the text is found again
---------------------------
1. `--text FILE` (plain UTF-8) if given;
2. else the installed package, `/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb`
   (`apt-get install r-cran-janeaustenr`);
3. else the Debian package is downloaded and unpacked into a cache folder, which needs
   neither root nor R:

       cd ~/.cache/meganeura/janeaustenr && apt-get download r-cran-janeaustenr \
           && dpkg-deb -x r-cran-janeaustenr_*.deb root

The novels sit in R's lazy-load database (`Rdata.rdx` index + `Rdata.rdb` zlib
blocks, R's XDR serialization); a small reader below turns each into its lines.

Model
-----
A byte-level BPE tokenizer (`tokenizers`, 4096 entries, `<|begin_of_text|>` added in
front of every encoding by a TemplateProcessing post-processor, `<|end_of_text|>`
between novels), then a `transformers.LlamaForCausalLM` (hidden 256, 4 layers, 8 query
/ 4 key-value heads of 32, MLP 688, context 512, RoPE theta 10000, tied embeddings,
about 3.95M parameters) trained from seed 0 with AdamW and a cosine schedule for a
fixed wall-clock budget (default 20 minutes on 2 CPU threads; the shipped
checkpoint had `--minutes 45`, see SOURCE.md). Each training row is
BOS followed by text starting at a paragraph start, the same shape as a prompt.
Weights are saved with `save_pretrained` in bfloat16 safetensors, with config.json,
generation_config.json, tokenizer.json, tokenizer_config.json, words.json (the
corpus' word list, for the test) and SOURCE.md.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import math
import os
import re
import struct
import subprocess
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = "r-cran-janeaustenr"
RDB_INSTALLED = "/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "meganeura", "janeaustenr")
BOOKS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"]
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"

VOCAB = 4096
CONFIG = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, head_dim=32, max_position_embeddings=512, rope_theta=10000.0,
              rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu")
SEQ, BATCH = 512, 8


# ---------------------------------------------------------------- R lazy-load database reader

class _RReader:
    """Just enough of R's XDR serialization (format 2/3) for character vectors and lists."""

    def __init__(self, data: bytes):
        self.d, self.i, self.refs = data, 0, []
        if self.d[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.i = 2
        version = self.int()
        self.int(), self.int()                                      # writer / min reader version
        if version == 3:
            n = self.int()
            self.i += n                                             # native encoding name

    def int(self) -> int:
        v = struct.unpack_from(">i", self.d, self.i)[0]
        self.i += 4
        return v

    def item(self):
        flags = self.int()
        typ, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if typ in (254, 242):                                       # NILVALUE, EMPTYENV
            return None
        if typ == 255:                                              # REFSXP
            return self.refs[(flags >> 8) - 1]
        if typ == 1:                                                # SYMSXP
            name = self.item()
            self.refs.append(name)
            return name
        if typ == 9:                                                # CHARSXP
            n = self.int()
            if n == -1:
                return None
            s = self.d[self.i:self.i + n].decode("utf-8", "replace")
            self.i += n
            return s
        if typ in (2, 1026):                                        # LISTSXP (pairlist)
            out = {}
            while typ in (2, 1026):
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else len(out)
                out[tag] = self.item()
                flags = self.int()
                typ, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
            if typ != 254:
                raise ValueError(f"unexpected pairlist tail type {typ}")
            return out
        if typ in (10, 13):                                         # LGLSXP, INTSXP
            n = self.int()
            val = list(struct.unpack_from(f">{n}i", self.d, self.i))
            self.i += 4 * n
        elif typ == 14:                                             # REALSXP
            n = self.int()
            val = list(struct.unpack_from(f">{n}d", self.d, self.i))
            self.i += 8 * n
        elif typ in (16, 19):                                       # STRSXP, VECSXP
            n = self.int()
            val = [self.item() for _ in range(n)]
        else:
            raise ValueError(f"unsupported R type {typ}")
        if has_attr:
            attrs = self.item()
            if typ == 19 and isinstance(attrs, dict) and "names" in attrs:
                return dict(zip(attrs["names"], val))
        return val


def read_lazyload(rdb: str) -> dict:
    """name -> value for every object of an R lazy-load database (`X.rdb` + `X.rdx`)."""
    with open(rdb[:-4] + ".rdx", "rb") as f:
        index = _RReader(gzip.decompress(f.read())).item()         # the index is gzip-compressed
    with open(rdb, "rb") as f:
        blob = f.read()
    out = {}
    for name, (off, length) in index["variables"].items():
        block = blob[off:off + length]
        out[name] = _RReader(zlib.decompress(block[4:])).item()     # 4-byte length, then zlib
    return out


def locate_rdb() -> str:
    if os.path.exists(RDB_INSTALLED):
        return RDB_INSTALLED
    found = glob.glob(os.path.join(CACHE, "root", "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"))
    if found:
        return found[0]
    os.makedirs(CACHE, exist_ok=True)
    print(f"fetching Debian package {PKG} into {CACHE}", flush=True)
    subprocess.run(["apt-get", "download", PKG], cwd=CACHE, check=True)
    deb = sorted(glob.glob(os.path.join(CACHE, f"{PKG}_*.deb")))[-1]
    subprocess.run(["dpkg-deb", "-x", deb, os.path.join(CACHE, "root")], check=True)
    return locate_rdb()


def paragraphs(lines: list) -> list:
    """Gutenberg lines -> paragraphs: blank lines split, inner line breaks become spaces,
    `_italics_` marks dropped, runs of spaces squeezed."""
    out, cur = [], []
    for line in lines + [""]:
        line = (line or "").strip()
        if line:
            cur.append(line)
        elif cur:
            p = re.sub(r"\s+", " ", " ".join(cur).replace("_", "")).strip()
            if p:
                out.append(p)
            cur = []
    return out


def load_books(text_file: str | None = None) -> list:
    """A list of books, each a list of paragraphs."""
    if text_file:
        with open(text_file, encoding="utf-8") as f:
            return [paragraphs(f.read().split("\n"))]
    data = read_lazyload(locate_rdb())
    return [paragraphs(data[b]) for b in BOOKS]


def words(text: str) -> list:
    """Lower-cased words of `text` (letters/digits, inner apostrophes kept: "don't")."""
    return re.findall(r"\w+(?:'\w+)*", text.lower())


def write_words(books: list, path: str):
    """The corpus' word list as a JSON array, one word a line."""
    vocab = sorted({w for b in books for p in b for w in words(p)})
    with open(path, "w") as f:
        f.write("[\n" + ",\n".join(json.dumps(w) for w in vocab) + "\n]\n")


# ---------------------------------------------------------------- tokenizer

def train_tokenizer(books: list):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((p for book in books for p in book), trainer=trainer)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos), (EOS, eos)])
    return tok


def encode_corpus(tok, books: list):
    """Token ids of the whole corpus (paragraphs joined by a newline, EOS after each book)
    and the positions where paragraphs start."""
    import numpy as np

    nl = tok.encode("\n", add_special_tokens=False).ids
    eos = tok.token_to_id(EOS)
    ids, starts = [], []
    for book in books:
        for enc in tok.encode_batch(book, add_special_tokens=False):
            starts.append(len(ids))
            ids.extend(enc.ids)
            ids.extend(nl)
        del ids[len(ids) - len(nl):]
        ids.append(eos)
    return np.asarray(ids, dtype=np.int64), np.asarray(starts, dtype=np.int64)


# ---------------------------------------------------------------- training

def _flags(argv) -> list:
    """The command-line flags of this run, less --out (for SOURCE.md)."""
    import sys

    args, out = list(sys.argv[1:] if argv is None else argv), []
    while args:
        a = args.pop(0)
        if a == "--out":
            args.pop(0) if args else None
        elif not a.startswith("--out="):
            out.append(a)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=HERE, help="output folder (default: the package folder)")
    ap.add_argument("--minutes", type=float, default=20.0, help="wall-clock training budget")
    ap.add_argument("--steps", type=int, default=0, help="train exactly this many steps instead (cosine over them)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text", default=None, help="train on this UTF-8 text file instead of the novels")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t_start = time.time()

    books = load_books(args.text)
    chars = sum(len(p) + 1 for b in books for p in b)
    print(f"text: {len(books)} books, {sum(map(len, books))} paragraphs, {chars / 1e6:.2f}M chars", flush=True)
    tok = train_tokenizer(books)
    ids, starts = encode_corpus(tok, books)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    print(f"tokenizer: {tok.get_vocab_size()} entries, corpus {len(ids) / 1e6:.2f}M tokens "
          f"({chars / len(ids):.2f} chars/token), {time.time() - t_start:.0f}s", flush=True)

    # hold out the last 1.5% of the corpus for validation
    split = int(len(ids) * 0.985)
    train_starts = starts[starts < split - SEQ]
    val_starts = starts[starts >= split]
    val_starts = val_starts[val_starts < len(ids) - SEQ]

    def rows(ps):
        x = np.empty((len(ps), SEQ), dtype=np.int64)
        x[:, 0] = bos
        for r, p in enumerate(ps):
            x[r, 1:] = ids[p:p + SEQ - 1]
        return torch.from_numpy(x).to(args.device)

    val_x = rows(val_starts[np.linspace(0, len(val_starts) - 1, 16).astype(int)])

    config = LlamaConfig(vocab_size=tok.get_vocab_size(), bos_token_id=bos, eos_token_id=eos, **CONFIG)
    model = LlamaForCausalLM(config).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.3f}M parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    warmup, floor = 100, 0.05
    budget = args.minutes * 60.0

    def lr_at(step, frac):
        w = min(1.0, (step + 1) / warmup)
        return args.lr * w * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    @torch.no_grad()
    def val_loss():
        model.eval()
        loss = sum(model(input_ids=val_x[i:i + 4], labels=val_x[i:i + 4]).loss.item() for i in range(0, 16, 4)) / 4
        model.train()
        return loss

    model.train()
    t0, step, ema, last_log = time.time(), 0, None, 0.0
    while True:
        elapsed = time.time() - t0
        frac = step / args.steps if args.steps else elapsed / budget
        if frac >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, frac)
        x = rows(rng.choice(train_starts, BATCH))
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if elapsed - last_log >= 60 or step == 1:
            last_log = elapsed
            print(f"step {step:5d}  {elapsed / 60:5.1f} min  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"loss {loss.item():.3f} (ema {ema:.3f})", flush=True)
    train_min = (time.time() - t0) / 60
    vl = val_loss()
    print(f"done: {step} steps in {train_min:.1f} min, {step * BATCH * SEQ / 1e6:.1f}M tokens seen, "
          f"train loss (ema) {ema:.3f}, val loss {vl:.3f}", flush=True)

    # ---------------------------------------------------------------- save
    os.makedirs(args.out, exist_ok=True)
    model = model.to("cpu", torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
                                               do_sample=False, max_new_tokens=60)
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
                   "pad_token": EOS, "add_bos_token": True, "add_eos_token": False,
                   "model_max_length": CONFIG["max_position_embeddings"], "clean_up_tokenization_spaces": False},
                  f, indent=2)
        f.write("\n")
    write_words(books, os.path.join(args.out, "words.json"))
    with open(os.path.join(args.out, "SOURCE.md"), "w") as f:
        command = " ".join(["python -m meganeura.default_model.train"] + _flags(argv))
        f.write(SOURCE_MD.format(command=command, params=n_params, steps=step, minutes=train_min, threads=args.threads,
                                 device=args.device, tokens=step * BATCH * SEQ / 1e6, loss=ema, val=vl,
                                 corpus=len(ids) / 1e6, chars=chars / 1e6, lr=args.lr))
    print(f"saved to {args.out}", flush=True)
    return 0


SOURCE_MD = """\
# Default model

A small Llama-architecture language model, shipped so that `meganeura run` works
without a download. It writes English sentences in the manner of Jane Austen; it is a
demonstration model, not a useful assistant.

## Text and license

Jane Austen's six completed novels (*Sense and Sensibility*, *Pride and Prejudice*,
*Mansfield Park*, *Emma*, *Northanger Abbey*, *Persuasion*), {chars:.2f}M characters. The
novels (1811-1817) are in the public domain; the transcriptions are Project
Gutenberg's. They come from the R data package janeaustenr, Copyright 2016-2017 Julia
Silge, MIT license, as packaged by Debian in `r-cran-janeaustenr`. Get the text again
with `apt-get install r-cran-janeaustenr`, or without root:
`apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb root`
(the training script does the latter on its own when the package is not installed).

## Training

    python -m meganeura.default_model.train            # --minutes 20 --threads 2 by default

This checkpoint was made by `{command}`.

- tokenizer: byte-level BPE, 4096 entries, `<|begin_of_text|>` (id 0) put in front by a
  TemplateProcessing post-processor, `<|end_of_text|>` (id 1) between novels;
  {corpus:.2f}M tokens
- model: LlamaForCausalLM, hidden 256, 4 layers, 8 query / 4 key-value heads of 32,
  MLP 688, context 512, RoPE theta 10000, tied embeddings, {params:,} parameters,
  stored in bfloat16
- AdamW (betas 0.9/0.95, weight decay 0.1), peak lr {lr:g}, 100 warmup steps, cosine
  to 5%, batch 8 x 512 tokens, seed 0
- this checkpoint: {steps} steps in {minutes:.1f} minutes on {threads} {device} threads,
  {tokens:.1f}M tokens seen; final train loss {loss:.3f}, validation loss {val:.3f}
  (last 1.5% of the corpus)

`words.json` is the corpus' lower-cased word list, used by `tests/test_default_model.py`.
"""


if __name__ == "__main__":
    raise SystemExit(main())
