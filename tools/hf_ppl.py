#!/usr/bin/env python3
"""Reference perplexity with Hugging Face transformers (CPU, float32).

usage: python tools/hf_ppl.py MODEL_DIR TEXT_FILE --ctx N [--batch B] [--threads K]

Protocol (the Rust engine's ppl tool must follow the same one):
  * the whole file (read as UTF-8) is tokenized at once with MODEL_DIR/tokenizer.json,
    add_special_tokens=False (no BOS/EOS);
  * the ids are split into non-overlapping full windows of N tokens; the
    tail (< N tokens) is dropped;
  * each window is scored independently from an empty cache (positions 0..N-1);
  * NLL of the N-1 next-token predictions of every window, from float32
    logits converted to float64 before log_softmax;
  * ppl = exp(mean NLL over all windows' predictions).
The model runs in float32 (bf16 checkpoints are upcast exactly), eager attention.
Prints JSON: {"ppl", "tokens", "windows", "ctx", ...}.
"""

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hfcommon  # noqa: E402


def tokenize_file(model_dir: str, text_file: str):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    with open(text_file, encoding="utf-8") as f:
        text = f.read()
    return tok.encode(text, add_special_tokens=False).ids


@torch.no_grad()
def perplexity(model, ids, ctx: int, batch: int = 8):
    n_win = len(ids) // ctx
    if n_win == 0:
        raise SystemExit(f"text has {len(ids)} tokens < ctx {ctx}")
    data = torch.tensor(ids[: n_win * ctx], dtype=torch.int64).view(n_win, ctx)
    total_nll = 0.0  # python float == float64
    count = 0
    for s in range(0, n_win, batch):
        x = data[s : s + batch]
        logits = model(x, use_cache=False).logits  # [b, ctx, V] float32
        assert logits.dtype == torch.float32
        lp = torch.log_softmax(logits[:, :-1].to(torch.float64), dim=-1)
        tgt = x[:, 1:]
        nll = -lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # [b, ctx-1] float64
        total_nll += nll.sum().item()
        count += nll.numel()
    mean = total_nll / count
    return {"ppl": math.exp(mean), "mean_nll": mean, "windows": n_win, "predictions": count}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("text_file")
    ap.add_argument("--ctx", type=int, required=True)
    ap.add_argument("--batch", type=int, default=8, help="windows per forward pass (no effect on the result)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    ids = tokenize_file(args.model_dir, args.text_file)
    model = hfcommon.load_f32(args.model_dir)
    r = perplexity(model, ids, args.ctx, args.batch)
    out = {
        "ppl": r["ppl"],
        "tokens": len(ids),
        "windows": r["windows"],
        "ctx": args.ctx,
        "mean_nll": r["mean_nll"],
        "predictions": r["predictions"],
        "text_file": os.path.basename(args.text_file),
        "attn_implementation": "eager",
        "compute_dtype": "float32",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
