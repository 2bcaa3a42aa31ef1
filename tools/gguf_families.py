"""GGUF fixtures of the issue-27 families, laid out as llama.cpp's converter writes them
(llama.cpp master's `conversion/` modules as of 2026: granite.py, glm.py, deepseek.py,
gpt_oss.py and base.py's TextModel.set_gguf_parameters), with our own code and the `gguf`
package's writer. Called by tools/make_moe_gguf_fixtures.py; all tensors F32.

  granitemoe-tiny, granitemoeshared-tiny  arch `granitemoe`: input_linear split into
      ffn_gate_exps / ffn_up_exps, shared_mlp into ffn_{gate,up,down}_shexp, q/k rows (and
      biases) permuted for ggml's interleaved RoPE as LlamaModel does; attention.scale,
      embedding_scale, residual_scale, logit_scale, expert_shared_feed_forward_length.
  glm4moe-tiny  arch `glm4moe`: post_attention_layernorm is post_attention_norm,
      e_score_correction_bias is exp_probs_b.bias, block_count counts the NextN layer(s)
      (nextn_predict_layers), rope.dimension_count = head_dim · partial_rotary_factor,
      expert_gating_func sigmoid, expert_group_count / expert_group_used_count.
  deepseekv2-tiny, deepseekv3-tiny  arch `deepseek2`: kv_b_proj split per head into
      attn_k_b [heads, kv_lora_rank, nope] (transposed) and attn_v_b [heads, v, kv_lora_rank];
      head_count_kv 1, key_length kv_lora_rank + rope, value_length kv_lora_rank,
      key_length_mla / value_length_mla, yarn_log_multiplier 0.1 · mscale_all_dim. The HF
      configs transformers saves drop `scoring_func`; the released checkpoints' (softmax for
      V2, sigmoid for V3) is supplied, as the converter would read it there.
      deepseekv2-tiny.kvb.gguf is the older converter's layout (one attn_kv_b, key_length
      nope + rope, value_length v, head_count_kv = heads, no *_mla keys).
  gptoss-tiny  arch `gpt-oss`: gate_up_proj transposed and de-interleaved (even columns
      gate, odd up) into ffn_gate_exps / ffn_up_exps (+ .bias), down_proj transposed,
      sinks as attn_sinks.weight, post_attention_norm, sliding_window.
  granitemoeshared-tiny.bf16.gguf  the bf16 checkpoint with --outtype bf16: matrices BF16
      (exactly the checkpoint's values), vectors and routers F32.
  {granitemoe,glm4moe,deepseekv3,gptoss}-tiny.q8_0.gguf  --outtype q8_0: matrices whose rows
      are whole Q8_0 blocks quantized by `gguf`, routers and the rest F32.

Where llama.cpp's layout cannot carry a fixture's setting, we write the nearest standard key
and say so (the reader documents the same): DeepSeek-V3-tiny's mscale (1.0) differs from its
mscale_all_dim (0.8), which llama.cpp assumes equal, so its resolved YaRN attention factor
goes in rope.scaling.yarn_attn_factor (as the converter writes an explicit attention_factor);
GPT-OSS's swiglu_limit (llama.cpp hard-codes 7) goes in swiglu_clamp_exp, one per layer;
llama.cpp hard-codes swiglu_alpha 1.702 and sliding layers at even indices, so other values
are refused here. deepseekv3-tiny's q_a/kv_a/o biases (attention_bias) are written under the
names the converter's tensor map gives them (attn_q_a.bias, attn_kv_a_mqa.bias,
attn_output.bias), which llama.cpp itself does not load.
"""
import glob
import json
import math

import numpy as np
import gguf
import torch
from safetensors.torch import load_file

from pathlib import Path

FIX = Path(__file__).resolve().parent.parent / "tests/fixtures"

ARCH = {"granitemoe": "granitemoe", "granitemoeshared": "granitemoe", "glm4_moe": "glm4moe",
        "deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2", "gpt_oss": "gpt-oss"}
COMMON = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm",
    "self_attn.q_b_proj": "attn_q_b", "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
    "self_attn.kv_a_layernorm": "attn_kv_a_norm", "self_attn.kv_b_proj": "attn_kv_b",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp", "mlp.router": "ffn_gate_inp",
    "block_sparse_moe.router.layer": "ffn_gate_inp",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
    "mlp.shared_experts.up_proj": "ffn_up_shexp",
    "mlp.shared_experts.down_proj": "ffn_down_shexp",
    "shared_mlp.output_linear": "ffn_down_shexp",
    "block_sparse_moe.output_linear": "ffn_down_exps",
}
# llama.cpp's GLM-4-MoE and GPT-OSS name the norm before the MLP ATTN_POST_NORM.
POST_NORM = {"glm4moe", "gpt-oss"}


def mscale(scale, m):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def load_state(d):
    state = {}
    for f in sorted(glob.glob(str(d / "*.safetensors"))):
        if not f.endswith("reference.safetensors"):
            state.update(load_file(f))
    return {k: v.float() for k, v in state.items()}


def rope_params(cfg):
    p = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    p.setdefault("rope_theta", cfg.get("rope_theta"))
    return p


def base_metadata(w, cfg, arch, block_count, kv_heads):
    """TextModel.set_gguf_parameters (the keys these configs have)."""
    w.add_block_count(block_count)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(kv_heads)
    rp = rope_params(cfg)
    if rp.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rp["factor"])
        w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
        if rp.get("attention_factor") is not None:
            w.add_rope_scaling_yarn_attn_factor(rp["attention_factor"])
        w.add_rope_scaling_yarn_beta_fast(rp.get("beta_fast", 32.0))
        w.add_rope_scaling_yarn_beta_slow(rp.get("beta_slow", 1.0))
    w.add_rope_freq_base(rp["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    n_exp = cfg.get("num_local_experts") or cfg.get("n_routed_experts")
    w.add_expert_count(n_exp)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    if cfg.get("n_group") is not None:
        w.add_expert_group_count(cfg["n_group"])
    if cfg.get("topk_group") is not None:
        w.add_expert_group_used_count(cfg["topk_group"])
    score = cfg.get("scoring_func")
    if score is not None:
        w.add_expert_gating_func({"softmax": gguf.ExpertGatingFuncType.SOFTMAX,
                                  "sigmoid": gguf.ExpertGatingFuncType.SIGMOID}[score])
    if cfg.get("head_dim") is not None and arch not in ("granitemoe", "deepseek2"):
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    w.add_vocab_size(cfg["vocab_size"])


def granite_metadata(w, cfg):
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_attention_scale(cfg["attention_multiplier"])
    w.add_embedding_scale(cfg["embedding_multiplier"])
    w.add_residual_scale(cfg["residual_multiplier"])
    w.add_logit_scale(cfg["logits_scaling"])
    if cfg.get("shared_intermediate_size"):
        w.add_expert_shared_feed_forward_length(cfg["shared_intermediate_size"])


def glm_metadata(w, cfg):
    rp = rope_params(cfg)
    factor = rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5))
    w.add_rope_dimension_count(int(cfg["head_dim"] * factor))
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_expert_shared_count(cfg["n_shared_experts"])
    w.add_leading_dense_block_count(cfg["first_k_dense_replace"])
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_weights_scale(cfg["routed_scaling_factor"])
    w.add_expert_weights_norm(cfg["norm_topk_prob"])
    w.add_nextn_predict_layers(cfg.get("num_nextn_predict_layers", 0))


def deepseek_metadata(w, cfg, legacy):
    kvr, rope = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    nope, v = cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    w.add_leading_dense_block_count(cfg["first_k_dense_replace"])
    if cfg.get("q_lora_rank") is not None:
        w.add_q_lora_rank(cfg["q_lora_rank"])
    w.add_kv_lora_rank(kvr)
    if legacy:
        w.add_key_length(nope + rope)
        w.add_value_length(v)
    else:
        w.add_key_length(kvr + rope)
        w.add_value_length(kvr)
        w.add_key_length_mla(nope + rope)
        w.add_value_length_mla(v)
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_expert_shared_count(cfg["n_shared_experts"])
    w.add_expert_weights_scale(cfg["routed_scaling_factor"])
    if cfg.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(rope)
    rp = rope_params(cfg)
    if rp.get("mscale_all_dim") is not None:
        w.add_rope_scaling_yarn_log_mul(0.1 * rp["mscale_all_dim"])


def gptoss_metadata(w, cfg):
    kinds = cfg["layer_types"]
    want = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(len(kinds))]
    assert kinds == want, "llama.cpp slides the even layers only"
    assert cfg.get("swiglu_alpha", 1.702) == 1.702, "llama.cpp hard-codes swiglu_alpha 1.702"
    w.add_sliding_window(cfg["sliding_window"])
    w.add_expert_feed_forward_length(cfg["intermediate_size"])
    w.add_swiglu_clamp_exp([float(cfg.get("swiglu_limit", 7.0))] * cfg["num_hidden_layers"])


def tensors(cfg, arch, state, legacy):
    """(gguf name, array) as the converter's modify_tensors gives them."""
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out, experts = [], {}
    for hf, t in state.items():
        if hf == "lm_head.weight":
            if not cfg.get("tie_word_embeddings"):
                out.append(("output.weight", t))
            continue
        if hf == "model.embed_tokens.weight":
            out.append(("token_embd.weight", t))
            continue
        if hf == "model.norm.weight":
            out.append(("output_norm.weight", t))
            continue
        _, _, bid, rest = hf.split(".", 3)
        blk = f"blk.{bid}"
        if rest == "self_attn.sinks":
            out.append((f"{blk}.attn_sinks.weight", t))
            continue
        if rest == "mlp.gate.e_score_correction_bias":
            out.append((f"{blk}.exp_probs_b.bias", t))
            continue
        if ".experts." in rest and rest.split(".")[2].isdigit():
            _, _, e, proj, _ = rest.split(".")
            experts.setdefault((bid, proj[: -len("_proj")]), {})[int(e)] = t
            continue
        module, suffix = rest.rsplit(".", 1)
        if arch == "gpt-oss" and module == "mlp.experts":
            if suffix == "gate_up_proj":
                t = t.transpose(-1, -2)
                out += [(f"{blk}.ffn_gate_exps.weight", t[:, ::2, :]),
                        (f"{blk}.ffn_up_exps.weight", t[:, 1::2, :])]
            elif suffix == "gate_up_proj_bias":
                out += [(f"{blk}.ffn_gate_exps.bias", t[..., ::2]),
                        (f"{blk}.ffn_up_exps.bias", t[..., 1::2])]
            elif suffix == "down_proj":
                out.append((f"{blk}.ffn_down_exps.weight", t.transpose(-1, -2)))
            else:
                assert suffix == "down_proj_bias", hf
                out.append((f"{blk}.ffn_down_exps.bias", t))
            continue
        if module in ("block_sparse_moe.input_linear", "shared_mlp.input_linear"):
            gate, up = t.split(t.shape[-2] // 2, dim=-2)
            kind = "exps" if module.startswith("block") else "shexp"
            out += [(f"{blk}.ffn_gate_{kind}.weight", gate), (f"{blk}.ffn_up_{kind}.weight", up)]
            continue
        if arch == "deepseek2" and module == "self_attn.kv_b_proj" and not legacy:
            nope, v = cfg["qk_nope_head_dim"], cfg["v_head_dim"]
            kv_b = t.view(heads, nope + v, t.shape[-1])
            k_b, v_b = torch.split(kv_b, [nope, v], dim=1)
            out += [(f"{blk}.attn_k_b.weight", k_b.transpose(1, 2)),
                    (f"{blk}.attn_v_b.weight", v_b)]
            continue
        g = COMMON[module]
        if g == "ffn_norm" and arch in POST_NORM:
            g = "post_attention_norm"
        if arch == "granitemoe" and module == "self_attn.q_proj":
            t = permute(t, heads)
        elif arch == "granitemoe" and module == "self_attn.k_proj":
            t = permute(t, kv)
        out.append((f"{blk}.{g}.{suffix}", t))
    n_exp = cfg.get("n_routed_experts")
    for (bid, proj), by_e in experts.items():
        out.append((f"blk.{bid}.ffn_{proj}_exps.weight",
                    torch.stack([by_e[e] for e in range(n_exp)])))
    return out


def permute(t, n_head):
    """LlamaModel.permute: per head, rotate-half rows become interleaved pairs."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def convert(name, out, add_tokenizer, legacy=False, bf16=False, q8_0=False):
    d = FIX / name
    cfg = json.loads((d / "config.json").read_text())
    arch = ARCH[cfg["model_type"]]
    if cfg["model_type"] == "deepseek_v2":
        cfg["scoring_func"] = "softmax"
    elif cfg["model_type"] == "deepseek_v3":
        cfg["scoring_func"] = "sigmoid"
    rp = rope_params(cfg)
    if arch == "deepseek2" and rp.get("rope_type") == "yarn":
        m, m_all = rp.get("mscale") or 0, rp.get("mscale_all_dim") or 0
        if m and m_all and m != m_all:
            # transformers' attention factor, which llama.cpp's mscale == mscale_all_dim drops.
            rp["attention_factor"] = mscale(rp["factor"], m) / mscale(rp["factor"], m_all)
            cfg["rope_parameters"] = rp
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(name)
    layers = cfg["num_hidden_layers"]
    nextn = cfg.get("num_nextn_predict_layers", 0) if arch == "glm4moe" else 0
    # MLA is converted as MQA (one KV head) by the newer converter.
    kv_heads = 1 if arch == "deepseek2" and not legacy else cfg["num_key_value_heads"]
    base_metadata(w, cfg, arch, layers + nextn, kv_heads)
    if arch == "granitemoe":
        granite_metadata(w, cfg)
    elif arch == "glm4moe":
        glm_metadata(w, cfg)
    elif arch == "deepseek2":
        deepseek_metadata(w, cfg, legacy)
    else:
        gptoss_metadata(w, cfg)
    add_tokenizer(w, d / "tokenizer.json", cfg, cfg["vocab_size"])
    for g, t in tensors(cfg, arch, load_state(d), legacy):
        t = np.ascontiguousarray(t.numpy(), dtype=np.float32)
        # --outtype bf16: matrices in bf16; vectors, norms and routers stay F32 as the
        # converter keeps them.
        if bf16 and t.ndim >= 2 and ".ffn_gate_inp." not in g:
            bits = (t.view(np.uint32) >> 16).astype(np.uint16)
            assert np.array_equal((bits.astype(np.uint32) << 16).view(np.float32), t), g
            w.add_tensor(g, bits, raw_dtype=gguf.GGMLQuantizationType.BF16)
        elif q8_0 and t.ndim >= 2 and t.shape[-1] % 32 == 0 and ".ffn_gate_inp." not in g:
            # --outtype q8_0: whole-block matrices Q8_0 (by `gguf`), the rest as above.
            qt = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(g, gguf.quants.quantize(t, qt), raw_dtype=qt)
        else:
            w.add_tensor(g, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {out} ({out.stat().st_size} bytes)")


def main(add_tokenizer):
    for name in ["granitemoe-tiny", "granitemoeshared-tiny", "glm4moe-tiny", "deepseekv2-tiny",
                 "deepseekv3-tiny", "gptoss-tiny"]:
        convert(name, FIX / name / f"{name}.gguf", add_tokenizer)
    convert("deepseekv2-tiny", FIX / "deepseekv2-tiny" / "deepseekv2-tiny.kvb.gguf",
            add_tokenizer, legacy=True)
    # The checkpoint is bf16, so its bf16 GGUF holds the same values.
    convert("granitemoeshared-tiny",
            FIX / "granitemoeshared-tiny" / "granitemoeshared-tiny.bf16.gguf",
            add_tokenizer, bf16=True)
    for name in ["granitemoe-tiny", "glm4moe-tiny", "deepseekv3-tiny", "gptoss-tiny"]:
        convert(name, FIX / name / f"{name}.q8_0.gguf", add_tokenizer, q8_0=True)
