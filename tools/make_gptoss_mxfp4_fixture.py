#!/usr/bin/env python3
"""Writes tests/fixtures/gptoss-tiny-mxfp4/: a tiny random GPT-OSS whose experts are stored as
the released checkpoints store them, in MXFP4 (`mlp.experts.gate_up_proj_blocks` /
`_scales`, `down_proj_blocks` / `_scales`; biases as they are), with
`quantization_config: {"quant_method": "mxfp4"}` in config.json.

The blocks are random bytes (every FP4 code occurs) and the e8m0 scales random in 2^-6..2^-3,
so the experts' values are O(0.1). The reference is transformers' own: the experts are
dequantized with `transformers.integrations.mxfp4.convert_moe_packed_tensors` (in float32,
exact: FP4 values times powers of two) into a float32 GptOssForCausalLM built from the same
config and other weights, and reference.safetensors holds its logits on a fixed token
sequence (input_ids int64 [24], logits float32 [24, vocab]), as tools/make_fixtures.py writes.

usage: python3 tools/make_gptoss_mxfp4_fixture.py [--out tests/fixtures]
"""
import argparse
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hfcommon  # noqa: E402

NAME = "gptoss-tiny-mxfp4"
T = 24
VOCAB = 512
SEED = 19019


def main():
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, GenerationConfig, GptOssConfig
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures"))
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    d = os.path.join(os.path.abspath(args.out), NAME)
    tokenizer = os.path.join(os.path.abspath(args.out), "gptoss-tiny", "tokenizer.json")
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)

    # Two layers (sliding then full, window 6), 4 experts top-2, inter 64 (two 32-value blocks
    # per down row), hidden 64; YaRN as gpt-oss-20b's but over 256 positions.
    cfg = GptOssConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                       num_experts_per_tok=2, sliding_window=6, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, swiglu_limit=7.0,
                       rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                        "beta_fast": 32.0, "beta_slow": 1.0,
                                        "original_max_position_embeddings": 256, "truncate": False})
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    hfcommon.reinit_(model, SEED)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2)
    model.eval()
    model.save_pretrained(d)
    shutil.copyfile(tokenizer, os.path.join(d, "tokenizer.json"))

    # The experts in MXFP4: random blocks and scales replace the dense tensors.
    g = torch.Generator().manual_seed(SEED + 1)
    st_path = os.path.join(d, "model.safetensors")
    tensors = load_file(st_path)
    state = model.state_dict()
    E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}.mlp.experts"
        for proj, (rows, cols) in (("gate_up_proj", (2 * I, H)), ("down_proj", (H, I))):
            del tensors[f"{p}.{proj}"]
            blocks = torch.randint(0, 256, (E, rows, cols // 32, 16), generator=g, dtype=torch.uint8)
            scales = torch.randint(127 - 6, 127 - 2, (E, rows, cols // 32), generator=g, dtype=torch.uint8)
            tensors[f"{p}.{proj}_blocks"] = blocks
            tensors[f"{p}.{proj}_scales"] = scales
            # transformers' dequantization: [E, rows, cols] transposed to the x·W layout.
            dense = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
            assert dense.shape == state[f"{p}.{proj}"].shape, (dense.shape, state[f"{p}.{proj}"].shape)
            state[f"{p}.{proj}"] = dense
    save_file(tensors, st_path, metadata={"format": "pt"})
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"],
    }
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")

    ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    ref.load_state_dict(state)
    ref.eval()
    ids = torch.randint(3, VOCAB, (T,), generator=torch.Generator().manual_seed(SEED + 2), dtype=torch.int64)
    ids[0] = 1
    with torch.no_grad():
        logits = ref(ids[None]).logits[0].float().contiguous()
    import transformers
    meta = {"transformers": transformers.__version__, "torch": torch.__version__,
            "attn_implementation": "eager", "compute_dtype": "float32", "stored_dtype": "mxfp4 experts",
            "dequantized_by": "transformers.integrations.mxfp4.convert_moe_packed_tensors"}
    save_file({"input_ids": ids.contiguous(), "logits": logits}, os.path.join(d, "reference.safetensors"),
              metadata={"provenance": json.dumps(meta, sort_keys=True)})
    print(f"{NAME}: {hfcommon.dir_size(d)} bytes, logits std {logits.std().item():.3f} "
          f"absmax {logits.abs().max().item():.2f}")


if __name__ == "__main__":
    main()
