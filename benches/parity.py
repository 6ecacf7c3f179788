"""Max |Δlogit| against HF transformers (fp32, torch CPU) for every feature set of the test oracle.

    python benches/parity.py [--json]

Prints a Markdown table (or JSON lines); the README's parity table comes from this script.
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import oracle  # noqa: E402

import meganeura as mn  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--backend", default="numpy")
    args = ap.parse_args()
    ids = np.random.default_rng(0).integers(0, 128, 21)
    if not args.json:
        print("| case | HF class | max abs Δlogit, pos 0 | pos 1000 | bound |")
        print("|---|---|---|---|---|")
    for case, (hf_class, _, _) in oracle.CASES.items():
        hf = oracle.build(case)
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            model = mn.load_model(d, backend=args.backend)
            errs, bound = [], 0.0
            for start in (0, 1000):
                want = oracle.hf_logits(hf, ids, start)
                errs.append(float(np.abs(model.logits(ids, start_pos=start) - want).max()))
                bound = max(bound, oracle.tolerance(want))
        if args.json:
            print(json.dumps({"case": case, "hf_class": hf_class, "err_pos0": errs[0], "err_pos1000": errs[1],
                              "bound": bound}))
        else:
            print(f"| {case} | {hf_class} | {errs[0]:.1e} | {errs[1]:.1e} | {bound:.0e} |")


if __name__ == "__main__":
    main()
