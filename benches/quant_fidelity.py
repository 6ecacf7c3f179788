"""How far quantized weights move the logits: the smallest cosine, over every token, between a test model's
logits and the unquantized model's, at both weight scales the tests use (the parity tests' 1/sqrt(fan_in)
matrices, and HF's initialisation scale). Two kinds of column: meganeura's quantize modes (reference
executor), and the model's own weights rounded inside transformers (bf16, per-row int8), which says how
much any 8-bit format can hope for on that model.

    python benches/quant_fidelity.py [CASE ...]      (default: every case of the test oracle)

Prints a Markdown table; the README's fidelity numbers come from this script.
"""
import copy
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import oracle  # noqa: E402
from test_quant import cosines, hf_initialised  # noqa: E402

import meganeura as mn  # noqa: E402

MODES = ["q8", "q4", "q8_0", "q4_0"]


def rounded_in_torch(model, how: str):
    """A copy of the HF model with every matrix rounded to bf16, or to int8 with one scale per row."""
    import torch

    model = copy.deepcopy(model)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point() and t.ndim >= 2:
                if how == "bf16":
                    t.copy_(t.bfloat16().float())
                else:
                    scale = t.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
                    t.copy_((t / scale).round() * scale)
    return model


def main():
    cases = sys.argv[1:] or list(oracle.CASES)
    ids = np.random.default_rng(3).integers(0, 128, 11)
    print("| case | scale | " + " | ".join(MODES) + " | torch bf16 | torch int8/row |")
    print("|---|---|" + "---|" * (len(MODES) + 2))
    for case in cases:
        for scale in ("parity", "hf"):
            hf = oracle.build(case)
            if scale == "hf":
                hf_initialised(hf)
            want = oracle.hf_logits(hf, ids)
            with tempfile.TemporaryDirectory() as d:
                hf.save_pretrained(d)
                ours = [cosines(mn.load_model(d, quantize=m, backend="numpy").logits(ids), want).min()
                        for m in MODES]
            torch_side = [cosines(oracle.hf_logits(rounded_in_torch(hf, how), ids), want).min()
                          for how in ("bf16", "int8")]
            print(f"| {case} | {scale} | " + " | ".join(f"{c:.4f}" for c in ours + torch_side) + " |", flush=True)


if __name__ == "__main__":
    main()
