"""Shared helpers for the Hugging Face reference tools (make_fixtures.py,
make_unseen.py, train_tiny_moe.py, hf_ppl.py).

Only used to *produce* reference data with transformers/PyTorch on the CPU;
nothing in the Rust build depends on it.  Versions: tools/requirements-fixtures.txt.
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterable

import torch


# --------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2


def train_bytelevel_bpe(lines: Iterable[str], vocab_size: int):
    """Train a byte-level BPE tokenizer (GPT-2 style): ByteLevel pre-tokenizer
    (no prefix space, GPT-2 regex), ByteLevel decoder, no normalizer, all 256
    byte symbols in the initial alphabet so any UTF-8 text encodes.
    Special tokens <pad>=0, <s>=1, </s>=2.  Deterministic for a given input."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


# --------------------------------------------------------------------------
# random re-initialisation with O(1) activations
# --------------------------------------------------------------------------

def is_router(name: str) -> bool:
    # Mixtral / Qwen2-MoE router (transformers >= 5 module name; on disk it is
    # block_sparse_moe.gate.weight for Mixtral and mlp.gate.weight for Qwen2-MoE).
    # Granite-MoE's is block_sparse_moe.router.weight (router.layer.weight on disk).
    # GPT-OSS's is mlp.router.weight.
    return (name.endswith("mlp.gate.weight") or name.endswith("block_sparse_moe.gate.weight")
            or name.endswith("block_sparse_moe.router.weight") or name.endswith("mlp.router.weight"))


@torch.no_grad()
def reinit_(model: torch.nn.Module, seed: int, router_scale: float = 2.0, embed_std: float | None = None) -> None:
    """Re-initialise every parameter so that activations and logits are O(1):
      * biases:                    N(0, 0.1)
      * other 1-D (norm weights):  U(0.5, 1.5)
      * embeddings (tok/pos):      N(0, 1); N(0, 0.25) when the LM head is tied
                                   to the token embedding (keeps logits O(1))
      * router weights:            N(0, router_scale / sqrt(fan_in))
      * all other weights (2-D linear and fused 3-D expert tensors
        [E, out, in]):             N(0, 1 / sqrt(fan_in)), fan_in = last dim
    Iterates named_parameters() in module order with one seeded generator,
    so the result is reproducible.  Tied weights are visited once."""
    if embed_std is None:
        embed_std = 0.25 if getattr(model.config, "tie_word_embeddings", False) else 1.0
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            if name.endswith("bias"):
                p.normal_(0.0, 0.1, generator=g)
            else:
                p.uniform_(0.5, 1.5, generator=g)
        elif "embed_tokens" in name or "embed_positions" in name:
            p.normal_(0.0, embed_std, generator=g)
        else:
            std = 1.0 / math.sqrt(p.shape[-1])
            if is_router(name):
                std *= router_scale
            p.normal_(0.0, std, generator=g)
    # GLM-4-MoE / DeepSeek-V3's correction bias is a buffer (zeros at init): N(0, 0.1) so that
    # it steers the choice (models without one draw nothing more).
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.normal_(0.0, 0.1, generator=g)


# --------------------------------------------------------------------------
# router statistics (to make sure top-k choices are far from ties)
# --------------------------------------------------------------------------

class RouterProbe:
    """Hooks every *TopKRouter module and records, per layer, the minimum gap
    between the k-th and (k+1)-th softmax probability and the expert usage."""

    def __init__(self, model: torch.nn.Module):
        self.stats = {}
        self.handles = []
        for name, mod in model.named_modules():
            if type(mod).__name__.endswith("TopKRouter"):
                self.handles.append(mod.register_forward_hook(self._hook(name, mod)))
            elif type(mod).__name__ == "DeepseekV2TopkRouter":  # softmax, maybe group-limited
                self.handles.append(mod.register_forward_hook(self._softmax_groups_hook(name, mod)))
            elif type(mod).__name__.endswith("TopkRouter"):  # GLM-4-MoE / DeepSeek-V3's grouped sigmoid
                self.handles.append(mod.register_forward_hook(self._grouped_hook(name, mod)))

    def _hook(self, name, mod):
        def fn(_m, _inp, out):
            logits = out[0].detach().float()
            k = mod.top_k
            probs = torch.softmax(logits, dim=-1)
            srt = probs.sort(dim=-1, descending=True).values
            gap = (srt[:, k - 1] - srt[:, k]).min().item()
            idx = probs.topk(k, dim=-1).indices
            counts = torch.bincount(idx.flatten(), minlength=probs.shape[-1]).tolist()
            self.stats[name] = {"min_topk_gap": gap, "expert_counts": counts}
        return fn

    def _grouped_hook(self, name, mod):
        # Both choices must be clear: the topk_group-th best group over the next, and within
        # the chosen groups the k-th best biased score over the next.
        def fn(_m, inp, _out):
            h = inp[0].detach().float().reshape(-1, mod.hidden_dim)
            scores = torch.nn.functional.linear(h, mod.weight.float()).sigmoid()
            choice = scores + mod.e_score_correction_bias.float()
            e, groups, k, kg = mod.num_experts, mod.num_group, mod.top_k, mod.topk_group
            group_scores = choice.view(-1, groups, e // groups).topk(2, dim=-1)[0].sum(dim=-1)
            gap = float("inf")
            if kg < groups:
                srt = group_scores.sort(dim=-1, descending=True).values
                gap = (srt[:, kg - 1] - srt[:, kg]).min().item()
            keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(kg, dim=-1)[1], 1)
            masked = choice.masked_fill(~keep.bool().repeat_interleave(e // groups, dim=1), float("-inf"))
            srt = masked.sort(dim=-1, descending=True).values
            if k < e:
                gap = min(gap, (srt[:, k - 1] - srt[:, k]).min().item())
            idx = masked.topk(k, dim=-1).indices
            counts = torch.bincount(idx.flatten(), minlength=e).tolist()
            self.stats[name] = {"min_topk_gap": gap, "expert_counts": counts}
        return fn

    def _softmax_groups_hook(self, name, mod):
        # DeepSeek-V2: softmax scores; under group_limited_greedy the topk_group-th best group
        # (by its best score) must be clear of the next, then the k-th chosen score of the next.
        def fn(_m, inp, _out):
            h = inp[0].detach().float().reshape(-1, mod.hidden_dim)
            scores = torch.nn.functional.linear(h, mod.weight.float()).softmax(dim=-1)
            e, k = mod.num_experts, mod.top_k
            gap = float("inf")
            if mod.topk_method == "group_limited_greedy":
                groups, kg = mod.num_group, mod.topk_group
                group_scores = scores.view(-1, groups, e // groups).max(dim=-1).values
                if kg < groups:
                    srt = group_scores.sort(dim=-1, descending=True).values
                    gap = (srt[:, kg - 1] - srt[:, kg]).min().item()
                keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(kg, dim=-1)[1], 1)
                scores = scores.masked_fill(~keep.bool().repeat_interleave(e // groups, dim=1), 0.0)
            srt = scores.sort(dim=-1, descending=True).values
            if k < e:
                gap = min(gap, (srt[:, k - 1] - srt[:, k]).min().item())
            idx = scores.topk(k, dim=-1).indices
            counts = torch.bincount(idx.flatten(), minlength=e).tolist()
            self.stats[name] = {"min_topk_gap": gap, "expert_counts": counts}
        return fn

    def min_gap(self) -> float:
        return min((s["min_topk_gap"] for s in self.stats.values()), default=float("inf"))

    def remove(self):
        for h in self.handles:
            h.remove()


# --------------------------------------------------------------------------
# config helpers
# --------------------------------------------------------------------------

def legacy_config_json(path: str) -> None:
    """Rewrite a transformers-5 config.json in the pre-v5 layout that most
    Hub checkpoints (Mixtral-8x7B, Qwen1.5-MoE, OPT) still have:
    "rope_parameters": {"rope_type": "default", "rope_theta": X} -> "rope_theta": X,
    "dtype" -> "torch_dtype", null head_dim dropped, v5-only Qwen2-MoE keys
    (layer_types, qkv_bias) dropped.  transformers 5 still loads this."""
    with open(path) as f:
        cfg = json.load(f)
    rp = cfg.pop("rope_parameters", None)
    if rp is not None and rp.get("rope_type", "default") != "default":
        # Scaled RoPE (GPT-OSS's YaRN): the legacy rope_scaling dict beside rope_theta.
        rp = dict(rp)
        cfg["rope_theta"] = rp.pop("rope_theta")
        cfg["rope_scaling"] = rp
    elif rp is not None:
        cfg["rope_theta"] = rp["rope_theta"]
        if "partial_rotary_factor" in rp:  # GLM-4-MoE's, top-level in its Hub configs
            cfg["partial_rotary_factor"] = rp["partial_rotary_factor"]
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    if "head_dim" in cfg and cfg["head_dim"] is None:
        del cfg["head_dim"]
    if cfg.get("model_type") == "qwen2_moe":
        cfg.pop("layer_types", None)
        cfg.pop("qkv_bias", None)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def load_f32(model_dir: str):
    """Load a checkpoint with transformers in float32 (bf16 weights upcast
    exactly), eager attention, eval mode; fail on missing/unexpected keys."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model, info = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=torch.float32,
        attn_implementation="eager",
        output_loading_info=True,
    )
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise RuntimeError(f"{model_dir}: loading problems {bad}")
    for p in model.parameters():
        assert p.dtype == torch.float32, p.dtype
    model.eval()
    return model


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
