#!/usr/bin/env python3
"""Reference token ids and perplexity for SmolLM2-135M-Instruct's Q4_1 GGUF (from
tools/fetch_smollm2.sh), computed by transformers' own GGUF loader, written to
tests/fixtures/smollm2-gguf.json for tests/gguf.rs (which skips when the GGUF is absent).

  * token ids of a few texts (AutoTokenizer.from_pretrained(dir, gguf_file=...),
    add_special_tokens=False);
  * perplexity of the first PPL_BYTES bytes of tests/fixtures/trained-moe/heldout.txt (cut at a
    line end) under tools/hf_ppl.py's protocol (non-overlapping windows of --ctx tokens, no BOS),
    with AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) -- transformers dequantizes
    the Q4_1/Q8_0 tensors to float32 -- eager attention.

transformers builds the byte-level BPE of a `tokenizer.ggml.pre = smollm` file with GPT-2's
split only, while llama.cpp (and SmolLM2's own tokenizer.json) split digits one by one, so the
texts here have no digits; tests/gguf.rs checks the digit rule separately.

usage: python tools/smollm2_reference.py [GGUF] [--ctx 256] [--threads 2]
"""

import argparse
import json
import os
import sys

import torch

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
from hf_ppl import perplexity  # noqa: E402

PPL_BYTES = 8192

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It wasn't the dog's fault, though: "
    "the fox had been practising for weeks!\nMeanwhile, in the kitchen, someone was "
    "baking bread -- warm, golden, and smelling of rosemary. \"Isn't it lovely?\" she asked.",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "  Indented   text\twith tabs,\n\nblank lines, and unicode: café, naïve, 東京, emoji 🎉.",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.join(here, "..")
    ap.add_argument("gguf", nargs="?", default=os.path.join(root, "target/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(root, "tests/fixtures/smollm2-gguf.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    texts = [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in TEXTS]

    with open(os.path.join(root, "tests/fixtures/trained-moe/heldout.txt"), "rb") as fh:
        raw = fh.read()
    cut = raw.rindex(b"\n", 0, PPL_BYTES) + 1
    text = raw[:cut].decode("utf-8")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    r = perplexity(model, ids, args.ctx)
    out = {
        "gguf": f,
        "texts": texts,
        "ppl": {
            "text_file": "trained-moe/heldout.txt",
            "bytes": cut,
            "ctx": args.ctx,
            "tokens": len(ids),
            "windows": r["windows"],
            "ppl": r["ppl"],
            "mean_nll": r["mean_nll"],
        },
        "provenance": {"transformers": transformers.__version__, "torch": torch.__version__,
                       "attn_implementation": "eager", "compute_dtype": "float32"},
    }
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1, ensure_ascii=False)
        fh.write("\n")
    print(json.dumps(out["ppl"]))


if __name__ == "__main__":
    main()
