"""The small model that `meganeura run` uses when no MODEL is named.

A Llama-architecture causal language model of about 3.95M parameters (hidden 256,
4 layers, 8 query / 4 key-value heads of 32, tied embeddings, context 512, bfloat16
safetensors, under 10 MB with its 4096-entry byte-level BPE tokenizer), trained from
scratch on 2 CPU threads for 45 minutes by
`python -m meganeura.default_model.train --minutes 45` on Jane Austen's six completed
novels. The novels are in the public domain; the text comes from the R data package
janeaustenr (Copyright 2016-2017 Julia Silge, MIT license) as packaged by Debian in
`r-cran-janeaustenr`. It writes Austen-flavoured English and is meant for
demonstrations and tests, not for real use. SOURCE.md in this folder records the
training run.
"""

import os

PATH = os.path.dirname(os.path.abspath(__file__))
