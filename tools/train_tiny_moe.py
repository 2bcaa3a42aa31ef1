#!/usr/bin/env python3
"""Train a small MoE (Mixtral by default; --arch qwen3_moe or deepseek_v3) on the CPU on the
King James Bible (public domain; text from Debian's bible-kjv / bible-kjv-text packages) and
write it to tests/fixtures/trained-moe/ (trained-qwen3moe/, trained-deepseekv3/).

  apt-get install bible-kjv      # provides /usr/bin/bible + /usr/lib/bible.data
  python tools/train_tiny_moe.py [--steps N] [--out tests/fixtures/trained-moe]
  python tools/train_tiny_moe.py --arch qwen3_moe --threads 1
  python tools/train_tiny_moe.py --arch deepseek_v3 --threads 1

Corpus: `bible -f gen1:1-rev22:21` (one verse per line, "Ge1:1 " style
reference prefix stripped).  The final >= 125,000 bytes (cut at a verse
boundary) are held out, never trained on (not even by the tokenizer), and
written to OUT/heldout.txt.

Tokenizer: byte-level BPE (ByteLevel pre-tokenizer + decoder, no normalizer,
256 byte symbols in the alphabet), vocab 2048, trained on the training part.
Model: MixtralForCausalLM, hidden 128, intermediate 256, 4 layers, 4 heads,
2 kv heads, 8 experts top-2, max_position_embeddings 512, rope_theta 1e4,
untied embeddings.  AdamW, ctx 256, fixed number of steps, seeded; saved in
float32 (single model.safetensors).  Afterwards runs tools/hf_ppl.py on
heldout.txt at ctx 256 and writes OUT/hf_ppl.json and OUT/README.md.

The other architectures (ARCHS below) keep the corpus, split, tokenizer recipe and schedule but
are smaller, so that model.safetensors stays under 4 MB: vocab 1024, hidden 128, 4 layers,
8 experts top-2 of intermediate 32, untied embeddings.  qwen3_moe: 4 heads of 32 (2 kv heads),
per-head q/k norm, every layer sparse, norm_topk_prob, router aux loss 0.02.  deepseek_v3:
latent attention (q_lora_rank 64, kv_lora_rank 32, nope 32 + rope 16 dims, v 32, interleaved
rope), a dense first layer (intermediate 256), a shared expert, sigmoid routing limited to 2 of
4 groups with routed_scaling_factor 2.5; it has no aux loss, so e_score_correction_bias is
trained as DeepSeek-V3 does without one (after each step, +/-1e-3 towards equal expert load).
These also write OUT/calib.txt (Psalms 1-40, from the training part; tools/make_calib.py's text).
"""

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

# don't spin-wait in OpenMP barriers: this is meant to run beside other jobs (e.g. cargo build)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import hfcommon  # noqa: E402

HELDOUT_MIN_BYTES = 125_000
REF_RE = re.compile(r"^[1-3]?[A-Za-z]+[0-9]+:[0-9]+ ")


def kjv_lines():
    exe = shutil.which("bible")
    if exe is None:
        raise SystemExit("`bible` not found: apt-get install bible-kjv (ships the KJV text in bible-kjv-text)")
    raw = subprocess.run([exe, "-f", "gen1:1-rev22:21"], check=True, capture_output=True, text=True).stdout
    lines = []
    for l in raw.splitlines():
        m = REF_RE.match(l)
        if not m:
            raise SystemExit(f"unexpected line from bible: {l[:80]!r}")
        lines.append(l[m.end():])
    if len(lines) != 31102:
        raise SystemExit(f"expected 31102 verses, got {len(lines)}")
    return lines


def split_lines(lines):
    """train = all but the tail; heldout = final verses totalling >= HELDOUT_MIN_BYTES."""
    size = 0
    i = len(lines)
    while size < HELDOUT_MIN_BYTES:
        i -= 1
        size += len(lines[i].encode()) + 1
    return lines[:i], lines[i:]


# arch -> (default output folder, vocab, README's model line)
ARCHS = {
    "mixtral": ("trained-moe", 2048, "MixtralForCausalLM, hidden 128, intermediate 256, 4 layers, 4 heads,\n"
                "  2 kv heads, 8 experts top-2, rope_theta 10000, untied embeddings"),
    "qwen3_moe": ("trained-qwen3moe", 1024, "Qwen3MoeForCausalLM, hidden 128, 4 layers, 4 heads of 32, 2 kv heads,\n"
                  "  per-head q/k RMSNorm, 8 experts (intermediate 32) top-2 in every layer, norm_topk_prob,\n"
                  "  rope_theta 10000, untied embeddings"),
    "deepseek_v3": ("trained-deepseekv3", 1024, "DeepseekV3ForCausalLM, hidden 128, 4 layers, 4 heads; latent attention\n"
                    "  (q_lora_rank 64, kv_lora_rank 32, qk_nope 32 + qk_rope 16 dims, v 32, interleaved rope,\n"
                    "  rope_theta 10000); layer 0 dense (intermediate 256), layers 1-3 8 routed experts\n"
                    "  (intermediate 32) top-2 + 1 shared expert, sigmoid scores, n_group 4 / topk_group 2,\n"
                    "  norm_topk_prob, routed_scaling_factor 2.5, trained e_score_correction_bias;\n"
                    "  untied embeddings"),
}


def build_model(arch, vocab):
    """The untrained model of `arch` (float32, sdpa) and its config."""
    import transformers

    common = dict(vocab_size=vocab, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                  max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "mixtral":
        cfg = transformers.MixtralConfig(
            vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
            max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            sliding_window=None, router_aux_loss_coef=0.02, output_router_logits=True,
        )
        cls = transformers.MixtralForCausalLM
    elif arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            **common, num_key_value_heads=2, head_dim=32, intermediate_size=256, moe_intermediate_size=32,
            num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
            norm_topk_prob=True, use_sliding_window=False, sliding_window=None,
            router_aux_loss_coef=0.02, output_router_logits=True,
        )
        cls = transformers.Qwen3MoeForCausalLM
    elif arch == "deepseek_v3":
        cfg = transformers.DeepseekV3Config(
            **common, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
            qk_rope_head_dim=16, v_head_dim=32, rope_interleave=True, attention_bias=False,
            intermediate_size=256, moe_intermediate_size=32, first_k_dense_replace=1,
            n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=4, topk_group=2,
            norm_topk_prob=True, routed_scaling_factor=2.5, num_nextn_predict_layers=0,
        )
        cls = transformers.DeepseekV3ForCausalLM
    else:
        raise SystemExit(f"unknown --arch {arch}")
    return cls._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32), cfg


class BiasBalancer:
    """DeepSeek-V3's auxiliary-loss-free balancing: each router's e_score_correction_bias moves
    by +/-`step` towards equal expert load after every optimizer step (it picks experts but
    never weights them, so no gradient reaches it)."""

    def __init__(self, model, step=1e-3):
        self.step = step
        self.routers = [m for m in model.modules() if type(m).__name__ == "DeepseekV3TopkRouter"]
        self.loads = {}
        for r in self.routers:
            r.register_forward_hook(self._count)

    def _count(self, module, _inputs, output):
        idx = output[2].detach().reshape(-1)
        self.loads[module] = torch.bincount(idx, minlength=module.num_experts).float()

    @torch.no_grad()
    def update(self):
        for r in self.routers:
            load = self.loads.pop(r)
            r.e_score_correction_bias += self.step * torch.sign(load.mean() - load)

    def spread(self):
        """max/mean expert load of the last batch, per router."""
        return [f"{(l.max() / l.mean()).item():.2f}" for l in self.loads.values()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="mixtral")
    ap.add_argument("--out", default=None, help="default tests/fixtures/<the arch's folder>")
    ap.add_argument("--steps", type=int, default=450)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bench", type=int, default=0, help="only time this many steps, write nothing")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import tokenizers
    import transformers
    from transformers import GenerationConfig, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, vocab_target, model_line = ARCHS[args.arch]
    out = os.path.abspath(args.out or os.path.join(HERE, "..", "tests", "fixtures", folder))

    lines = kjv_lines()
    train_lines, held_lines = split_lines(lines)
    train_text = "\n".join(train_lines) + "\n"
    held_text = "\n".join(held_lines) + "\n"
    print(f"corpus: {len(lines)} verses; train {len(train_lines)} verses {len(train_text.encode())} bytes; "
          f"heldout {len(held_lines)} verses {len(held_text.encode())} bytes, starts {held_lines[0][:60]!r}")

    tok = hfcommon.train_bytelevel_bpe([l + "\n" for l in train_lines], vocab_target)
    vocab = tok.get_vocab_size()
    ids = torch.tensor(tok.encode(train_text, add_special_tokens=False).ids, dtype=torch.int64)
    print(f"tokenizer vocab {vocab}; train tokens {ids.numel()} ({len(train_text.encode()) / ids.numel():.2f} bytes/token)")

    model, cfg = build_model(args.arch, vocab)
    balancer = BiasBalancer(model) if args.arch == "deepseek_v3" else None
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params}")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    steps = args.bench or args.steps
    warm = min(50, steps // 10)

    def lr_at(s):
        if s < warm:
            return args.lr * (s + 1) / warm
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))

    g = torch.Generator().manual_seed(args.seed)
    model.train()
    t0 = time.time()
    for s in range(steps):
        starts = torch.randint(0, ids.numel() - args.ctx, (args.batch,), generator=g)
        x = torch.stack([ids[i : i + args.ctx] for i in starts.tolist()])
        for pg in opt.param_groups:
            pg["lr"] = lr_at(s)
        o = model(input_ids=x, labels=x, use_cache=False)
        opt.zero_grad(set_to_none=True)
        o.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if balancer:
            spread = balancer.spread()
            balancer.update()
        if s % 25 == 0 or s == steps - 1:
            aux = f"load max/mean {' '.join(spread)}" if balancer else f"aux {o.aux_loss.item():.3f}"
            print(f"step {s} loss {o.loss.item():.4f} {aux} lr {lr_at(s):.2e} "
                  f"{time.time() - t0:.0f}s", flush=True)
    train_s = time.time() - t0
    print(f"trained {steps} steps in {train_s:.0f}s ({train_s / steps:.3f}s/step)")
    if args.bench:
        return

    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    with open(os.path.join(out, "heldout.txt"), "w", encoding="utf-8") as f:
        f.write(held_text)

    if args.arch != "mixtral":
        calib = subprocess.run([shutil.which("bible"), "-f", "psa1:1-psa40:17"], check=True,
                               capture_output=True, text=True).stdout
        with open(os.path.join(out, "calib.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(REF_RE.sub("", l) for l in calib.splitlines() if l.strip()) + "\n")
    if hasattr(model.config, "output_router_logits"):
        model.config.output_router_logits = False
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.eval()
    model.save_pretrained(out)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf_tok.save_pretrained(out)

    r = subprocess.run([sys.executable, os.path.join(HERE, "hf_ppl.py"), out, os.path.join(out, "heldout.txt"),
                        "--ctx", "256", "--threads", str(args.threads)], check=True, capture_output=True, text=True)
    ppl = json.loads(r.stdout.strip().splitlines()[-1])
    with open(os.path.join(out, "hf_ppl.json"), "w") as f:
        json.dump(ppl, f, indent=2, sort_keys=True)
        f.write("\n")
    print("hf ppl:", ppl)

    held_bytes = len(held_text.encode())
    calib_line = "" if args.arch == "mixtral" else (
        "\n* `calib.txt`: Psalms 1-40 (`bible -f psa1:1-psa40:17`, references stripped), from the\n"
        "  training part: what the quantization tests calibrate on.")
    title = "a small Mixtral-architecture MoE" if args.arch == "mixtral" else \
        f"a small {type(model).__name__.removesuffix('ForCausalLM')} MoE (`--arch {args.arch}`)"
    readme = f"""# {folder}

{title[0].upper() + title[1:]} trained by `tools/train_tiny_moe.py` on the CPU,
used as a real (non-random) reference for the engine's perplexity.

* Corpus: King James Version of the Bible, from Debian's `bible-kjv-text`
  package (read with `bible -f gen1:1-rev22:21` from `bible-kjv`; verse
  references stripped, one verse per line). The KJV text is public domain
  (Debian's copyright file: "The copyright for the King James Version text of the
  Bible is expired since the translation was done in 1611").
* Split: the final {len(held_lines)} verses ({held_bytes} bytes, from
  "{held_lines[0][:40]}...") are held out as `heldout.txt`; neither the tokenizer nor
  the model saw them. Training part: {len(train_lines)} verses, {len(train_text.encode())} bytes.{calib_line}
* Tokenizer: byte-level BPE (tokenizers {tokenizers.__version__}), vocab {vocab}
  (<pad>=0, <s>=1, </s>=2), ByteLevel pre-tokenizer/decoder, no normalizer.
* Model: {model_line},
  {n_params} parameters ({n_params / 1e6:.2f} M), stored float32.
* Training: AdamW (lr {args.lr}, betas 0.9/0.95, wd 0.1, warmup {warm}, cosine to 10%),
  {steps} steps x batch {args.batch} x ctx {args.ctx} random windows, {"router aux loss 0.02" if args.arch != "deepseek_v3" else "bias balancing step 1e-3"},
  seed {args.seed}, torch.set_num_threads({args.threads}); {train_s:.0f} s wall time
  on a 2-core machine shared with {"a concurrent cargo build" if args.arch == "mixtral" else "other jobs"}.
* transformers perplexity on `heldout.txt` (tools/hf_ppl.py, ctx 256, non-overlapping
  windows, no BOS, float32, eager): **{ppl['ppl']:.4f}** ({ppl['windows']} windows,
  {ppl['tokens']} tokens; transformers {transformers.__version__}, torch {torch.__version__}).
  See `hf_ppl.json`.
"""
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(readme)


if __name__ == "__main__":
    main()
