#!/usr/bin/env python3
"""Independent float64 NumPy forward pass for the fixture checkpoints
(Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, OPT), written from the architecture semantics rather
than from transformers' code paths.  It reads only config.json and the
safetensors files, so it documents exactly what the Rust engine has to do,
and cross-checks reference.safetensors (transformers' logits).

usage: python tools/np_reference.py tests/fixtures/NAME [...]
Prints max |logits_np - logits_hf| per fixture; exits 1 above --tol.
"""

import argparse
import json
import os
import sys

import numpy as np


# ----------------------------------------------------------------- loading

def load_weights(d):
    from safetensors import safe_open

    idx = os.path.join(d, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else ["model.safetensors"]
    w = {}
    for f in files:
        with safe_open(os.path.join(d, f), "pt") as st:  # torch only to read bf16
            for k in st.keys():
                w[k] = st.get_tensor(k).float().numpy().astype(np.float64)
    return w


def rope_theta(cfg):
    if "rope_parameters" in cfg and cfg["rope_parameters"]:
        rp = cfg["rope_parameters"]
        assert rp.get("rope_type", "default") == "default"
        return float(rp["rope_theta"])
    return float(cfg.get("rope_theta", 10000.0))


# ----------------------------------------------------------------- pieces

def rmsnorm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def layernorm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def silu(x):
    return x / (1 + np.exp(-x))


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def rope(x, theta):
    """x [T, H, D]; HF 'rotate_half' (non-interleaved) convention, positions 0..T-1."""
    T, _, D = x.shape
    inv = theta ** (-np.arange(0, D, 2, dtype=np.float64) / D)  # [D/2]
    ang = np.arange(T, dtype=np.float64)[:, None] * inv[None]  # [T, D/2]
    cos = np.cos(np.concatenate([ang, ang], -1))[:, None]
    sin = np.sin(np.concatenate([ang, ang], -1))[:, None]
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    rot = np.concatenate([-x2, x1], -1)
    return x * cos + rot * sin


def attention(q, k, v, scale):
    """q [T, Hq, D], k/v [T, Hkv, D]; causal; GQA: q head h uses kv head h // (Hq/Hkv)."""
    T, Hq, D = q.shape
    rep = Hq // k.shape[1]
    k = np.repeat(k, rep, axis=1)
    v = np.repeat(v, rep, axis=1)
    s = np.einsum("thd,shd->hts", q, k) * scale
    s = s + np.triu(np.full((T, T), -np.inf), 1)[None]
    p = softmax(s)
    return np.einsum("hts,shd->thd", p, v).reshape(T, Hq * v.shape[-1])


def lin(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


# ----------------------------------------------------------------- models

def llama_like(cfg, w, ids, arch):
    H = cfg["num_attention_heads"]
    Hkv = cfg.get("num_key_value_heads") or H
    D = cfg.get("head_dim") or cfg["hidden_size"] // H
    eps = cfg["rms_norm_eps"]
    theta = rope_theta(cfg)
    T = len(ids)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rmsnorm(x, w[p + "input_layernorm.weight"], eps)
        a = p + "self_attn."
        q = lin(h, w[a + "q_proj.weight"], w.get(a + "q_proj.bias"))
        k = lin(h, w[a + "k_proj.weight"], w.get(a + "k_proj.bias"))
        v = lin(h, w[a + "v_proj.weight"], w.get(a + "v_proj.bias"))
        if arch == "olmoe":  # RMSNorm over the whole projection, then the clamp
            q = rmsnorm(q, w[a + "q_norm.weight"], eps)
            k = rmsnorm(k, w[a + "k_norm.weight"], eps)
            c = cfg.get("clip_qkv")
            if c is not None:
                q, k, v = (np.clip(t, -c, c) for t in (q, k, v))
        q, k, v = q.reshape(T, H, D), k.reshape(T, Hkv, D), v.reshape(T, Hkv, D)
        if arch == "qwen3_moe":  # RMSNorm of each head
            q = rmsnorm(q, w[a + "q_norm.weight"], eps)
            k = rmsnorm(k, w[a + "k_norm.weight"], eps)
        o = attention(rope(q, theta), rope(k, theta), v, D ** -0.5)
        x = x + lin(o, w[a + "o_proj.weight"])
        h = rmsnorm(x, w[p + "post_attention_layernorm.weight"], eps)
        if arch == "mixtral":
            m = p + "block_sparse_moe."
            x = x + moe(h, w, m + "gate.weight", m + "experts.{}.", ("w1", "w3", "w2"),
                        cfg["num_local_experts"], cfg["num_experts_per_tok"], True)
        else:  # qwen2_moe, qwen3_moe (no shared expert), olmoe (experts in every layer)
            E = cfg.get("num_experts") or cfg["num_local_experts"]
            sparse = arch == "olmoe" or ((i not in (cfg.get("mlp_only_layers") or [])) and E > 0 and
                                         (i + 1) % cfg["decoder_sparse_step"] == 0)
            m = p + "mlp."
            if sparse:
                y = moe(h, w, m + "gate.weight", m + "experts.{}.", ("gate_proj", "up_proj", "down_proj"),
                        E, cfg["num_experts_per_tok"], cfg["norm_topk_prob"])
                if arch != "qwen2_moe":
                    x = x + y
                    continue
                sh = mlp(h, w, m + "shared_expert.", ("gate_proj", "up_proj", "down_proj"))
                g = 1 / (1 + np.exp(-lin(h, w[m + "shared_expert_gate.weight"])))  # [T, 1] sigmoid
                x = x + y + g * sh
            else:
                x = x + mlp(h, w, m, ("gate_proj", "up_proj", "down_proj"))
    x = rmsnorm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    return x @ head.T


def mlp(h, w, p, names):
    g, u, d = names
    return lin(silu(lin(h, w[p + g + ".weight"])) * lin(h, w[p + u + ".weight"]), w[p + d + ".weight"])


def moe(h, w, gate, expert_fmt, names, E, k, renorm):
    probs = softmax(lin(h, w[gate]))  # softmax over ALL experts first
    out = np.zeros_like(h)
    for t in range(h.shape[0]):
        top = np.argsort(-probs[t], kind="stable")[:k]
        wt = probs[t, top]
        if renorm:
            wt = wt / wt.sum()
        for e, c in zip(top, wt):
            out[t] += c * mlp(h[t : t + 1], w, expert_fmt.format(e), names)[0]
    return out


def opt(cfg, w, ids):
    pre = cfg["do_layer_norm_before"]
    H = cfg["num_attention_heads"]
    D = cfg["hidden_size"] // H
    T = len(ids)
    p0 = "model.decoder."
    x = w[p0 + "embed_tokens.weight"][ids]
    if p0 + "project_in.weight" in w:
        x = lin(x, w[p0 + "project_in.weight"])
    x = x + w[p0 + "embed_positions.weight"][np.arange(T) + 2]  # OPT's position offset of 2
    for i in range(cfg["num_hidden_layers"]):
        p = f"{p0}layers.{i}."
        a = p + "self_attn."
        res = x
        h = layernorm(x, w[p + "self_attn_layer_norm.weight"], w[p + "self_attn_layer_norm.bias"]) if pre else x
        q = lin(h, w[a + "q_proj.weight"], w[a + "q_proj.bias"]).reshape(T, H, D)
        k = lin(h, w[a + "k_proj.weight"], w[a + "k_proj.bias"]).reshape(T, H, D)
        v = lin(h, w[a + "v_proj.weight"], w[a + "v_proj.bias"]).reshape(T, H, D)
        x = res + lin(attention(q, k, v, D ** -0.5), w[a + "out_proj.weight"], w[a + "out_proj.bias"])
        if not pre:
            x = layernorm(x, w[p + "self_attn_layer_norm.weight"], w[p + "self_attn_layer_norm.bias"])
        res = x
        h = layernorm(x, w[p + "final_layer_norm.weight"], w[p + "final_layer_norm.bias"]) if pre else x
        h = lin(np.maximum(lin(h, w[p + "fc1.weight"], w[p + "fc1.bias"]), 0), w[p + "fc2.weight"], w[p + "fc2.bias"])
        x = res + h
        if not pre:
            x = layernorm(x, w[p + "final_layer_norm.weight"], w[p + "final_layer_norm.bias"])
    if pre and not cfg.get("_remove_final_layer_norm", False):
        x = layernorm(x, w[p0 + "final_layer_norm.weight"], w[p0 + "final_layer_norm.bias"])
    if p0 + "project_out.weight" in w:
        x = lin(x, w[p0 + "project_out.weight"])
    head = w[p0 + "embed_tokens.weight"] if cfg.get("tie_word_embeddings", True) else w["lm_head.weight"]
    return x @ head.T


def forward(d, ids):
    cfg = json.load(open(os.path.join(d, "config.json")))
    w = load_weights(d)
    mt = cfg["model_type"]
    if mt in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        return llama_like(cfg, w, ids, mt)
    if mt == "opt":
        return opt(cfg, w, ids)
    raise SystemExit(f"unsupported model_type {mt}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    from safetensors.numpy import load_file

    bad = 0
    for d in args.dirs:
        ref = load_file(os.path.join(d, "reference.safetensors"))
        got = forward(d, ref["input_ids"])
        diff = np.abs(got - ref["logits"].astype(np.float64)).max()
        agree = (got.argmax(-1) == ref["logits"].argmax(-1)).mean()
        ok = diff <= args.tol
        bad += not ok
        print(f"{os.path.basename(os.path.normpath(d))}: max|np-hf| = {diff:.3e}, argmax agreement {agree:.3f} "
              f"{'OK' if ok else 'FAIL'}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
