#!/usr/bin/env python3
"""Writes the MoE fixtures as GGUF files the way llama.cpp's convert_hf_to_gguf.py lays them out,
with our own mapping and the `gguf` package's writer (no llama.cpp needed):

  tests/fixtures/{mixtral,qwen2moe,qwen3moe,olmoe}-tiny/NAME.gguf   all F32
  tests/fixtures/qwen2moe-tiny/qwen2moe-tiny.q8_0.gguf              matrices Q8_0 (by `gguf`)

Names and keys: `general.architecture` llama (Mixtral, with llama.expert_count), qwen2moe,
qwen3moe, olmoe; experts stacked as blk.N.ffn_{gate,up,down}_exps.weight [n_expert, ...];
routers blk.N.ffn_gate_inp; Qwen2-MoE's shared expert ffn_*_shexp and ffn_gate_inp_shexp;
q/k norms attn_q_norm / attn_k_norm; {arch}.expert_count, .expert_used_count,
.expert_feed_forward_length, .expert_shared_feed_forward_length, .expert_weights_norm and
.attention.clamp_kqv. Only the llama arch (Mixtral) has its q/k rows permuted for ggml's
interleaved RoPE; the others use NeoX RoPE in llama.cpp and keep transformers' row order.
tests/hf_logits.rs checks each against the fixture's reference.safetensors logits.

The families of issue 27 (tools/gguf_families.py: granitemoe, granitemoeshared, glm4moe,
deepseekv2, deepseekv3, gptoss) follow llama.cpp master's conversion modules as of 2026
(DeepSeek's kv_b_proj split into attn_k_b / attn_v_b with key_length_mla; see that file).

usage: python3 tools/make_moe_gguf_fixtures.py
"""
import json
from pathlib import Path

import numpy as np
import gguf
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests/fixtures"
ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}
PER_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp", "block_sparse_moe.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
EXPERT_PROJ = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down",
               "w1": "gate", "w3": "up", "w2": "down"}


def permute(w, n_head):
    """llama.cpp's q/k row order for interleaved RoPE: per head, halves become pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_tokenizer(w, tok_path, cfg, vocab_size):
    tj = json.loads(tok_path.read_text())
    vocab = tj["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    tokens += ["<pad%d>" % i for i in range(vocab_size - len(tokens))]
    special = {a["id"] for a in tj.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(False)


def convert(name, out, qtype=None):
    d = FIX / name
    cfg = json.loads((d / "config.json").read_text())
    arch = ARCH[cfg["model_type"]]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    if cfg.get("head_dim"):
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    n_exp = cfg.get("num_local_experts") or cfg.get("num_experts")
    w.add_expert_count(n_exp)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    if cfg.get("moe_intermediate_size"):
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if cfg.get("shared_expert_intermediate_size"):
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    if cfg.get("norm_topk_prob") is not None:
        w.add_expert_weights_norm(cfg["norm_topk_prob"])
    if cfg.get("clip_qkv") is not None:
        w.add_clamp_kqv(cfg["clip_qkv"])
    add_tokenizer(w, d / "tokenizer.json", cfg, cfg["vocab_size"])

    state = load_file(str(d / "model.safetensors"))
    experts = {}  # (layer, proj) -> {expert: array}
    out_tensors = []
    for hf, t in state.items():
        t = t.astype(np.float32)
        if hf == "lm_head.weight":
            if cfg.get("tie_word_embeddings"):
                continue
            out_tensors.append(("output.weight", t))
            continue
        if hf == "model.embed_tokens.weight":
            out_tensors.append(("token_embd.weight", t))
            continue
        if hf == "model.norm.weight":
            out_tensors.append(("output_norm.weight", t))
            continue
        _, _, layer, rest = hf.split(".", 3)
        module, suffix = rest.rsplit(".", 1)
        if ".experts." in module:
            _, e_proj = module.split(".experts.")
            e, proj = e_proj.split(".")
            experts.setdefault((layer, EXPERT_PROJ[proj]), {})[int(e)] = t
            continue
        g = f"blk.{layer}.{PER_LAYER[module]}.{suffix}"
        if arch == "llama" and module == "self_attn.q_proj":
            t = permute(t, heads)
        elif arch == "llama" and module == "self_attn.k_proj":
            t = permute(t, kv)
        out_tensors.append((g, t))
    for (layer, proj), by_e in experts.items():
        out_tensors.append((f"blk.{layer}.ffn_{proj}_exps.weight",
                            np.stack([by_e[e] for e in range(n_exp)])))
    for g, t in out_tensors:
        t = np.ascontiguousarray(t)
        if qtype is not None and t.ndim >= 2 and t.shape[-1] % 32 == 0:
            w.add_tensor(g, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(g, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {out} ({out.stat().st_size} bytes)")


def main():
    for name in ["mixtral-tiny", "qwen2moe-tiny", "qwen3moe-tiny", "olmoe-tiny"]:
        convert(name, FIX / name / f"{name}.gguf")
    convert("qwen2moe-tiny", FIX / "qwen2moe-tiny" / "qwen2moe-tiny.q8_0.gguf",
            gguf.GGMLQuantizationType.Q8_0)
    import gguf_families
    gguf_families.main(add_tokenizer)


if __name__ == "__main__":
    main()
