#!/usr/bin/env python3
"""Make "unseen" random checkpoints (NOT committed) for manual checks of the
engine against transformers, with shapes/configs unlike tests/fixtures/.

usage: python tools/make_unseen.py [--out /tmp/unseen] [--ctx 64] [--only NAME ...]

Each OUT/<name>/ is written by transformers' save_pretrained, randomly
re-initialised like the fixtures (hfcommon.reinit_), gets the trained-moe
tokenizer (tests/fixtures/trained-moe/tokenizer.json, vocab 2048) copied in,
and OUT/<name>/hf_ppl.json = tools/hf_ppl.py protocol on
tests/fixtures/trained-moe/heldout.txt at --ctx (default 64).
Random weights => the ppl values are large; they are only for comparing numbers.
"""

import argparse
import json
import os
import shutil
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import hf_ppl  # noqa: E402
import hfcommon  # noqa: E402


def specs():
    from transformers import (DeepseekV2Config, DeepseekV3Config, Glm4MoeConfig, GptOssConfig,
                              GraniteMoeConfig, GraniteMoeSharedConfig, MixtralConfig, OlmoeConfig, OPTConfig,
                              Qwen2MoeConfig, Qwen3MoeConfig)

    return [
        # bf16, sharded, 6 experts, head_dim 16, v5-style "rope_parameters"
        dict(name="mixtral-h96-6e-bf16-sharded", seed=11, dtype=torch.bfloat16, shard="1MB", legacy=False,
             gen=dict(bos_token_id=1, eos_token_id=2),
             config=MixtralConfig(vocab_size=2048, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                                  num_attention_heads=6, num_key_value_heads=2, num_local_experts=6,
                                  num_experts_per_tok=2, max_position_embeddings=512,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
        # legacy top-level "rope_theta", explicit head_dim (32) != hidden/heads (16), top-1 of 4 experts, MQA
        dict(name="mixtral-headdim32-top1-legacy", seed=12, dtype=torch.float32, shard=None, legacy=True,
             gen=dict(bos_token_id=1, eos_token_id=[1, 2]),
             config=MixtralConfig(vocab_size=2112, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  head_dim=32, num_attention_heads=4, num_key_value_heads=1, num_local_experts=4,
                                  num_experts_per_tok=1, max_position_embeddings=256,
                                  rope_parameters={"rope_type": "default", "rope_theta": 5e5},
                                  rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
        # Qwen2-MoE: norm_topk_prob, decoder_sparse_step 2 (layers 1, 3 MoE), top-3 of 6, head_dim 16
        dict(name="qwen2moe-normtopk-step2", seed=13, dtype=torch.float32, shard=None, legacy=False,
             gen=dict(bos_token_id=1, eos_token_id=[2, 1]),
             config=Qwen2MoeConfig(vocab_size=2048, hidden_size=96, intermediate_size=192, num_hidden_layers=4,
                                   num_attention_heads=6, num_key_value_heads=2, num_experts=6,
                                   num_experts_per_tok=3, moe_intermediate_size=64,
                                   shared_expert_intermediate_size=128, decoder_sparse_step=2,
                                   mlp_only_layers=[], norm_topk_prob=True, max_position_embeddings=512,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                                   use_sliding_window=False, tie_word_embeddings=False,
                                   bos_token_id=1, eos_token_id=2)),
        # Qwen2-MoE bf16 sharded, legacy config, dense layer 0 via mlp_only_layers
        dict(name="qwen2moe-bf16-sharded-legacy", seed=14, dtype=torch.bfloat16, shard="300KB", legacy=True,
             gen=dict(bos_token_id=1, eos_token_id=2),
             config=Qwen2MoeConfig(vocab_size=2048, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                   num_attention_heads=8, num_key_value_heads=4, num_experts=10,
                                   num_experts_per_tok=4, moe_intermediate_size=32,
                                   shared_expert_intermediate_size=64, decoder_sparse_step=1,
                                   mlp_only_layers=[0], norm_topk_prob=False, max_position_embeddings=512,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                   use_sliding_window=False, tie_word_embeddings=False,
                                   bos_token_id=1, eos_token_id=2)),
        # Qwen3-MoE bf16 sharded, legacy config: head_dim 24 (hidden/heads would be 16; not a power
        # of two), 6 heads / 3 kv, step 2 with layer 3 listed dense too (only layer 1 MoE), top-3 of 6
        dict(name="qwen3moe-hd24-step2-bf16-sharded", seed=17, dtype=torch.bfloat16, shard="400KB", legacy=True,
             gen=dict(bos_token_id=1, eos_token_id=2),
             config=Qwen3MoeConfig(vocab_size=2048, hidden_size=96, intermediate_size=160, num_hidden_layers=4,
                                   head_dim=24, num_attention_heads=6, num_key_value_heads=3, num_experts=6,
                                   num_experts_per_tok=3, moe_intermediate_size=40, decoder_sparse_step=2,
                                   mlp_only_layers=[3], norm_topk_prob=True, max_position_embeddings=512,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1e6}, rms_norm_eps=1e-6,
                                   use_sliding_window=False, tie_word_embeddings=False,
                                   bos_token_id=1, eos_token_id=2)),
        # OLMoE: MQA (k_norm of one head), clip_qkv 2.5, top-3 of 10, tied head
        dict(name="olmoe-mqa-clip-top3-tied", seed=18, dtype=torch.float32, shard=None, legacy=False,
             gen=dict(bos_token_id=1, eos_token_id=2),
             config=OlmoeConfig(vocab_size=2048, hidden_size=96, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=6, num_key_value_heads=1, num_experts=10,
                                num_experts_per_tok=3, clip_qkv=2.5, norm_topk_prob=False,
                                max_position_embeddings=512, rms_norm_eps=1e-5,
                                rope_parameters={"rope_type": "default", "rope_theta": 5e4},
                                tie_word_embeddings=True, pad_token_id=1, bos_token_id=1, eos_token_id=2)),
        # Granite-MoE bf16 sharded, untied: 6 heads / 3 kv, top-3 of 6, Granite 3's scalars with
        # the attention scale 1/head_dim, no biases
        dict(name="granitemoe-top3-untied-bf16-sharded", seed=19, dtype=torch.bfloat16, shard="400KB",
             legacy=False, gen=dict(bos_token_id=1, eos_token_id=2),
             config=GraniteMoeConfig(vocab_size=2048, hidden_size=96, intermediate_size=64, num_hidden_layers=3,
                                     num_attention_heads=6, num_key_value_heads=3, num_local_experts=6,
                                     num_experts_per_tok=3, max_position_embeddings=512, rms_norm_eps=1e-6,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                                     embedding_multiplier=12.0, attention_multiplier=1 / 16,
                                     residual_multiplier=0.22, logits_scaling=6.0, attention_bias=False,
                                     tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
        # GraniteMoeShared: MQA, tied head, q/k/v/o biases, shared MLP of 48, top-1 of 4, legacy config
        dict(name="granitemoeshared-mqa-tied-legacy", seed=20, dtype=torch.float32, shard=None, legacy=True,
             gen=dict(bos_token_id=1, eos_token_id=2),
             config=GraniteMoeSharedConfig(vocab_size=2048, hidden_size=64, intermediate_size=40,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                           num_local_experts=4, num_experts_per_tok=1, shared_intermediate_size=48,
                                           max_position_embeddings=512, rms_norm_eps=1e-5,
                                           rope_parameters={"rope_type": "default", "rope_theta": 5e4},
                                           embedding_multiplier=6.0, attention_multiplier=0.3,
                                           residual_multiplier=0.5, logits_scaling=2.5, attention_bias=True,
                                           tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)),
        # GLM-4-MoE bf16 sharded: 2 leading dense layers of 4, 12 experts in 3 groups of 4 (best 2),
        # top-3, scaling 1.8, q/k norms, biases, head_dim 24 with rotary 12, MQA
        dict(name="glm4moe-3groups-dense2-bf16-sharded", seed=21, dtype=torch.bfloat16, shard="400KB",
             legacy=False, gen=dict(bos_token_id=1, eos_token_id=2),
             config=Glm4MoeConfig(vocab_size=2048, hidden_size=96, intermediate_size=128,
                                  moe_intermediate_size=40, num_hidden_layers=4, num_attention_heads=6,
                                  num_key_value_heads=1, head_dim=24, n_routed_experts=12,
                                  num_experts_per_tok=3, n_group=3, topk_group=2, n_shared_experts=1,
                                  first_k_dense_replace=2, routed_scaling_factor=1.8, norm_topk_prob=True,
                                  use_qk_norm=True, attention_bias=True, max_position_embeddings=512,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                   "partial_rotary_factor": 0.5},
                                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
        # GLM-4-MoE f32, legacy config: all layers MoE, one group, not renormalized, rotary on
        # 3/4 of head_dim 32, tied head, 4 heads / 2 kv
        dict(name="glm4moe-allmoe-tied-legacy", seed=22, dtype=torch.float32, shard=None, legacy=True,
             gen=dict(bos_token_id=1, eos_token_id=2),
             config=Glm4MoeConfig(vocab_size=2048, hidden_size=64, intermediate_size=96,
                                  moe_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=32, n_routed_experts=6,
                                  num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=2,
                                  first_k_dense_replace=0, routed_scaling_factor=1.0, norm_topk_prob=False,
                                  use_qk_norm=False, attention_bias=False, max_position_embeddings=512,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                   "partial_rotary_factor": 0.75},
                                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)),
        # GPT-OSS bf16 sharded: gpt-oss-20b's YaRN (factor 32 over 4096, theta 150000, not
        # truncated), 4 layers alternating a 16-token window with full attention, 8 experts top-4,
        # 6 heads / 2 kv of 24
        dict(name="gptoss-yarn-window16-bf16-sharded", seed=23, dtype=torch.bfloat16, shard="400KB",
             legacy=False, gen=dict(bos_token_id=1, eos_token_id=2),
             config=GptOssConfig(vocab_size=2048, hidden_size=96, intermediate_size=48, num_hidden_layers=4,
                                 num_attention_heads=6, num_key_value_heads=2, head_dim=24,
                                 num_local_experts=8, num_experts_per_tok=4, sliding_window=16,
                                 max_position_embeddings=131072,
                                 rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                                  "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                                  "original_max_position_embeddings": 4096},
                                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
        # GPT-OSS f32, legacy config without rope_scaling (so GptOssConfig's default YaRN, factor 32
        # over 4096), MQA, layers full / sliding / sliding (window 20),
        # top-1 of 4, swiglu_limit 3, tied head
        dict(name="gptoss-defaultyarn-mqa-top1-tied-legacy", seed=24, dtype=torch.float32, shard=None,
             legacy=True, gen=dict(bos_token_id=1, eos_token_id=2),
             config=GptOssConfig(vocab_size=2048, hidden_size=64, intermediate_size=32, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                 num_local_experts=4, num_experts_per_tok=1, sliding_window=20,
                                 layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                                 swiglu_limit=3.0, max_position_embeddings=512,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                 tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)),
        # DeepSeek-V2-Lite-like bf16 sharded: greedy softmax top-6 of 16, no q LoRA, YaRN over an
        # original 16 positions (ctx 64 runs past it), mscale 0.707 both, 2 shared experts, 1 dense
        dict(name="deepseekv2-lite-like-bf16-sharded", seed=23, dtype=torch.bfloat16, shard="400KB",
             legacy=False, gen=dict(bos_token_id=1, eos_token_id=2),
             config=DeepseekV2Config(vocab_size=2048, hidden_size=96, intermediate_size=160,
                                     moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=6,
                                     n_routed_experts=16, num_experts_per_tok=6, n_shared_experts=2,
                                     first_k_dense_replace=1, topk_method="greedy", routed_scaling_factor=1.0,
                                     q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                     v_head_dim=16, max_position_embeddings=512,
                                     rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                      "original_max_position_embeddings": 16, "mscale": 0.707,
                                                      "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1},
                                     tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
        # DeepSeek-V3-like f32: q LoRA, 16 experts in 4 groups (best 2), top-4, scaling 2.5, 2 dense
        # layers of 4, YaRN factor 8 over 16 positions with mscale_all_dim 1, interleaved, biases
        dict(name="deepseekv3-like-yarn", seed=24, dtype=torch.float32, shard=None, legacy=False,
             gen=dict(bos_token_id=1, eos_token_id=2),
             config=DeepseekV3Config(vocab_size=2048, hidden_size=64, intermediate_size=128,
                                     moe_intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
                                     num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=4,
                                     n_shared_experts=1, first_k_dense_replace=2, n_group=4, topk_group=2,
                                     routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=32,
                                     kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=12, v_head_dim=20,
                                     attention_bias=True, rope_interleave=True, max_position_embeddings=512,
                                     rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                                      "original_max_position_embeddings": 16, "mscale": 1.0,
                                                      "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1},
                                     tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
        # OPT-350m-like: post-LN, project_in/out (48 <-> 96), tied head
        dict(name="opt-350m-like", seed=15, dtype=torch.float32, shard=None, legacy=False,
             gen=dict(bos_token_id=2, eos_token_id=2, pad_token_id=1),
             config=OPTConfig(vocab_size=2048, hidden_size=96, ffn_dim=384, num_hidden_layers=3,
                              num_attention_heads=6, max_position_embeddings=256, do_layer_norm_before=False,
                              word_embed_proj_dim=48, tie_word_embeddings=True, dropout=0.0,
                              pad_token_id=1, bos_token_id=2, eos_token_id=2)),
        # dense OPT f32, pre-LN, UNTIED lm_head (lm_head.weight stored), 8 heads
        dict(name="opt-dense-untied-f32", seed=16, dtype=torch.float32, shard=None, legacy=True,
             gen=dict(bos_token_id=2, eos_token_id=2, pad_token_id=1),
             config=OPTConfig(vocab_size=2064, hidden_size=128, ffn_dim=512, num_hidden_layers=2,
                              num_attention_heads=8, max_position_embeddings=128, do_layer_norm_before=True,
                              word_embed_proj_dim=128, tie_word_embeddings=False, dropout=0.0,
                              pad_token_id=1, bos_token_id=2, eos_token_id=2)),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/unseen")
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    trained = os.path.join(HERE, "..", "tests", "fixtures", "trained-moe")
    heldout = os.path.join(trained, "heldout.txt")

    for spec in specs():
        if args.only and spec["name"] not in args.only:
            continue
        d = os.path.join(args.out, spec["name"])
        if os.path.isdir(d):
            shutil.rmtree(d)
        os.makedirs(d)
        torch.manual_seed(spec["seed"])
        model = AutoModelForCausalLM.from_config(spec["config"], dtype=torch.float32, attn_implementation="eager")
        hfcommon.reinit_(model, spec["seed"])
        model.generation_config = GenerationConfig(**spec["gen"])
        model = model.to(spec["dtype"])
        kw = {"max_shard_size": spec["shard"]} if spec["shard"] else {}
        model.save_pretrained(d, **kw)
        if spec["legacy"]:
            hfcommon.legacy_config_json(os.path.join(d, "config.json"))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(os.path.join(trained, f), os.path.join(d, f))

        ids = hf_ppl.tokenize_file(d, heldout)
        m = hfcommon.load_f32(d)
        r = hf_ppl.perplexity(m, ids, args.ctx)
        out = {"ppl": r["ppl"], "tokens": len(ids), "windows": r["windows"], "ctx": args.ctx,
               "mean_nll": r["mean_nll"], "predictions": r["predictions"], "text_file": "heldout.txt",
               "attn_implementation": "eager", "compute_dtype": "float32",
               "transformers": transformers.__version__, "torch": torch.__version__}
        with open(os.path.join(d, "hf_ppl.json"), "w") as f:
            json.dump(out, f, indent=2, sort_keys=True)
            f.write("\n")
        files = sorted(os.listdir(d))
        print(f"{spec['name']}: ppl {r['ppl']:.3f} ({r['windows']} windows), {hfcommon.dir_size(d)} bytes, {files}",
              flush=True)


if __name__ == "__main__":
    main()
