#!/usr/bin/env python3
"""Create tiny RANDOM Hugging Face checkpoints + transformers reference logits
under tests/fixtures/<name>/ (independent reference for the Rust engine).

Each fixture dir holds what save_pretrained writes (config.json,
model.safetensors or shards + model.safetensors.index.json,
generation_config.json), a byte-level BPE tokenizer.json (vocab <= 512,
trained below on Genesis 1-2 of the public-domain King James Version), and
reference.safetensors with
    input_ids  int64   [24]          fixed id sequence
    logits     float32 [24, vocab]   transformers logits of model(input_ids[None]),
                                     float32, attn_implementation="eager",
                                     computed after re-loading the saved files.
All parameters are re-initialised with O(1) scale (see hfcommon.reinit_).

Deterministic: re-running reproduces byte-identical files for the same
library versions (tools/requirements-fixtures.txt).

usage: python tools/make_fixtures.py [--out tests/fixtures] [--only NAME ...]
"""

import argparse
import copy
import hashlib
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hfcommon  # noqa: E402

T = 24
VOCAB = 512
TOK_VOCAB = 512
MIN_ROUTER_GAP = 2e-3  # smallest allowed p[k-1]-p[k] over all tokens/layers

CORPUS_LINES = [
    'In the beginning God created the heaven and the earth.',
    'And the earth was without form, and void; and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.',
    'And God said, Let there be light: and there was light.',
    'And God saw the light, that it was good: and God divided the light from the darkness.',
    'And God called the light Day, and the darkness he called Night. And the evening and the morning were the first day.',
    'And God said, Let there be a firmament in the midst of the waters, and let it divide the waters from the waters.',
    'And God made the firmament, and divided the waters which were under the firmament from the waters which were above the firmament: and it was so.',
    'And God called the firmament Heaven. And the evening and the morning were the second day.',
    'And God said, Let the waters under the heaven be gathered together unto one place, and let the dry land appear: and it was so.',
    'And God called the dry land Earth; and the gathering together of the waters called he Seas: and God saw that it was good.',
    'And God said, Let the earth bring forth grass, the herb yielding seed, and the fruit tree yielding fruit after his kind, whose seed is in itself, upon the earth: and it was so.',
    'And the earth brought forth grass, and herb yielding seed after his kind, and the tree yielding fruit, whose seed was in itself, after his kind: and God saw that it was good.',
    'And the evening and the morning were the third day.',
    'And God said, Let there be lights in the firmament of the heaven to divide the day from the night; and let them be for signs, and for seasons, and for days, and years:',
    'And let them be for lights in the firmament of the heaven to give light upon the earth: and it was so.',
    'And God made two great lights; the greater light to rule the day, and the lesser light to rule the night: he made the stars also.',
    'And God set them in the firmament of the heaven to give light upon the earth,',
    'And to rule over the day and over the night, and to divide the light from the darkness: and God saw that it was good.',
    'And the evening and the morning were the fourth day.',
    'And God said, Let the waters bring forth abundantly the moving creature that hath life, and fowl that may fly above the earth in the open firmament of heaven.',
    'And God created great whales, and every living creature that moveth, which the waters brought forth abundantly, after their kind, and every winged fowl after his kind: and God saw that it was good.',
    'And God blessed them, saying, Be fruitful, and multiply, and fill the waters in the seas, and let fowl multiply in the earth.',
    'And the evening and the morning were the fifth day.',
    'And God said, Let the earth bring forth the living creature after his kind, cattle, and creeping thing, and beast of the earth after his kind: and it was so.',
    'And God made the beast of the earth after his kind, and cattle after their kind, and every thing that creepeth upon the earth after his kind: and God saw that it was good.',
    'And God said, Let us make man in our image, after our likeness: and let them have dominion over the fish of the sea, and over the fowl of the air, and over the cattle, and over all the earth, and over every creeping thing that creepeth upon the earth.',
    'So God created man in his own image, in the image of God created he him; male and female created he them.',
    'And God blessed them, and God said unto them, Be fruitful, and multiply, and replenish the earth, and subdue it: and have dominion over the fish of the sea, and over the fowl of the air, and over every living thing that moveth upon the earth.',
    'And God said, Behold, I have given you every herb bearing seed, which is upon the face of all the earth, and every tree, in the which is the fruit of a tree yielding seed; to you it shall be for meat.',
    'And to every beast of the earth, and to every fowl of the air, and to every thing that creepeth upon the earth, wherein there is life, I have given every green herb for meat: and it was so.',
    'And God saw every thing that he had made, and, behold, it was very good. And the evening and the morning were the sixth day.',
    'Thus the heavens and the earth were finished, and all the host of them.',
    'And on the seventh day God ended his work which he had made; and he rested on the seventh day from all his work which he had made.',
    'And God blessed the seventh day, and sanctified it: because that in it he had rested from all his work which God created and made.',
    'These are the generations of the heavens and of the earth when they were created, in the day that the LORD God made the earth and the heavens,',
    'And every plant of the field before it was in the earth, and every herb of the field before it grew: for the LORD God had not caused it to rain upon the earth, and there was not a man to till the ground.',
    'But there went up a mist from the earth, and watered the whole face of the ground.',
    'And the LORD God formed man of the dust of the ground, and breathed into his nostrils the breath of life; and man became a living soul.',
    'And the LORD God planted a garden eastward in Eden; and there he put the man whom he had formed.',
    'And out of the ground made the LORD God to grow every tree that is pleasant to the sight, and good for food; the tree of life also in the midst of the garden, and the tree of knowledge of good and evil.',
    'And a river went out of Eden to water the garden; and from thence it was parted, and became into four heads.',
    'The name of the first is Pison: that is it which compasseth the whole land of Havilah, where there is gold;',
    'And the gold of that land is good: there is bdellium and the onyx stone.',
    'And the name of the second river is Gihon: the same is it that compasseth the whole land of Ethiopia.',
    'And the name of the third river is Hiddekel: that is it which goeth toward the east of Assyria. And the fourth river is Euphrates.',
    'And the LORD God took the man, and put him into the garden of Eden to dress it and to keep it.',
    'And the LORD God commanded the man, saying, Of every tree of the garden thou mayest freely eat:',
    'But of the tree of the knowledge of good and evil, thou shalt not eat of it: for in the day that thou eatest thereof thou shalt surely die.',
    'And the LORD God said, It is not good that the man should be alone; I will make him an help meet for him.',
    'And out of the ground the LORD God formed every beast of the field, and every fowl of the air; and brought them unto Adam to see what he would call them: and whatsoever Adam called every living creature, that was the name thereof.',
    'And Adam gave names to all cattle, and to the fowl of the air, and to every beast of the field; but for Adam there was not found an help meet for him.',
    'And the LORD God caused a deep sleep to fall upon Adam, and he slept: and he took one of his ribs, and closed up the flesh instead thereof;',
    'And the rib, which the LORD God had taken from man, made he a woman, and brought her unto the man.',
    'And Adam said, This is now bone of my bones, and flesh of my flesh: she shall be called Woman, because she was taken out of Man.',
    'Therefore shall a man leave his father and his mother, and shall cleave unto his wife: and they shall be one flesh.',
    'And they were both naked, the man and his wife, and were not ashamed.',
]


def fixture_specs():
    from transformers import (DeepseekV2Config, DeepseekV3Config, Glm4MoeConfig, GptOssConfig,
                              GraniteMoeConfig, GraniteMoeSharedConfig, LlamaConfig, MixtralConfig,
                              OlmoeConfig, OPTConfig, Qwen2MoeConfig, Qwen3MoeConfig)

    common_mixtral = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, sliding_window=None,
    )
    common_qwen = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=48, shared_expert_intermediate_size=96,
        max_position_embeddings=1024, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=False, use_sliding_window=False, bos_token_id=1, eos_token_id=2,
    )
    # Qwen3-MoE / OLMoE: no shared expert; q/k RMSNorms (per head / over the projection).
    common_qwen3 = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=48, max_position_embeddings=1024, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=False, use_sliding_window=False, bos_token_id=1, eos_token_id=2,
    )
    common_olmoe = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=1024, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, pad_token_id=1, bos_token_id=1, eos_token_id=2,
    )
    # Granite-MoE: Mixtral's block with four scalars, each set away from its neutral value
    # (must_matter checks that each moves the logits).
    common_granite = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=1024, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        embedding_multiplier=12.0, attention_multiplier=0.6, residual_multiplier=0.22,
        logits_scaling=6.0,
    )
    granite_neutral = dict(embedding_multiplier=1.0, attention_multiplier=0.25,
                           residual_multiplier=1.0, logits_scaling=1.0)
    # GLM-4-MoE: leading dense layer(s), grouped sigmoid routing with a correction bias
    # (hfcommon.reinit_ draws it), a shared expert, partial rotary.
    common_glm = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        n_routed_experts=8, num_experts_per_tok=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    # GPT-OSS: biases everywhere, a sink logit per head, sliding-window layers, YaRN RoPE,
    # clamped SwiGLU experts with interleaved gate/up columns.
    common_gptoss = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_attention_heads=4,
        head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    # DeepSeek-V2/V3: multi-head latent attention (values narrower than keys), leading dense
    # layer(s), shared experts; num_key_value_heads set (V3's default 128 would not divide).
    common_ds = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        num_experts_per_tok=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    common_opt = dict(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, tie_word_embeddings=True,
        pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0, activation_function="relu",
    )
    return [
        dict(name="mixtral-tiny", seed=1001, legacy_config=True, dtype=torch.float32, shard=None,
             gen=dict(bos_token_id=1, eos_token_id=2),
             config=MixtralConfig(**common_mixtral)),
        dict(name="mixtral-tiny-bf16-sharded", seed=2002, legacy_config=False, dtype=torch.bfloat16,
             shard="400KB", gen=dict(bos_token_id=1, eos_token_id=[1, 2]),
             config=MixtralConfig(**common_mixtral)),
        dict(name="qwen2moe-tiny", seed=3003, legacy_config=True, dtype=torch.float32, shard=None,
             gen=dict(bos_token_id=1, eos_token_id=[1, 2]),
             config=Qwen2MoeConfig(**common_qwen, decoder_sparse_step=1, mlp_only_layers=[1],
                                   norm_topk_prob=False)),
        dict(name="qwen2moe-tiny-normtopk", seed=4004, legacy_config=False, dtype=torch.float32, shard=None,
             gen=dict(bos_token_id=1, eos_token_id=2),
             config=Qwen2MoeConfig(**common_qwen, decoder_sparse_step=2, mlp_only_layers=[],
                                   norm_topk_prob=True)),
        dict(name="opt-tiny", seed=5005, legacy_config=True, dtype=torch.float32, shard=None,
             gen=dict(bos_token_id=2, eos_token_id=2, pad_token_id=1),
             config=OPTConfig(**common_opt, do_layer_norm_before=True, word_embed_proj_dim=64)),
        dict(name="opt-tiny-proj", seed=6006, legacy_config=False, dtype=torch.float32, shard=None,
             gen=dict(bos_token_id=2, eos_token_id=2, pad_token_id=1),
             config=OPTConfig(**common_opt, do_layer_norm_before=False, word_embed_proj_dim=32)),
        # head_dim 32 set apart from hidden / heads = 16, as real Qwen3-MoE checkpoints do.
        dict(name="qwen3moe-tiny", seed=8008, legacy_config=False, dtype=torch.float32, shard=None,
             gen=dict(bos_token_id=1, eos_token_id=[1, 2]),
             config=Qwen3MoeConfig(**common_qwen3, head_dim=32, decoder_sparse_step=1,
                                   mlp_only_layers=[1], norm_topk_prob=True)),
        dict(name="qwen3moe-tiny-step2", seed=9009, legacy_config=True, dtype=torch.float32, shard=None,
             gen=dict(bos_token_id=1, eos_token_id=2),
             config=Qwen3MoeConfig(**common_qwen3, decoder_sparse_step=2, mlp_only_layers=[],
                                   norm_topk_prob=False)),
        # clip_qkv 1.5 clamps a good share of q, k and v (must_matter checks that the logits
        # move without it).
        dict(name="olmoe-tiny", seed=10010, legacy_config=False, dtype=torch.float32, shard=None,
             gen=dict(bos_token_id=1, eos_token_id=2), must_matter=dict(clip_qkv=None),
             config=OlmoeConfig(**common_olmoe, clip_qkv=1.5, norm_topk_prob=False)),
        dict(name="olmoe-tiny-normtopk", seed=11011, legacy_config=True, dtype=torch.float32, shard=None,
             gen=dict(bos_token_id=1, eos_token_id=2),
             config=OlmoeConfig(**common_olmoe, clip_qkv=None, norm_topk_prob=True)),
        # Tied head (as the Granite 3 MoE checkpoints), biases on q/k/v/o, legacy rope_theta.
        dict(name="granitemoe-tiny", seed=12012, legacy_config=True, dtype=torch.float32, shard=None,
             gen=dict(bos_token_id=1, eos_token_id=2), must_matter=granite_neutral,
             config=GraniteMoeConfig(**common_granite, tie_word_embeddings=True,
                                     attention_bias=True)),
        # The shared MLP, untied head, bf16 shards.
        dict(name="granitemoeshared-tiny", seed=13013, legacy_config=False, dtype=torch.bfloat16,
             shard="300KB", gen=dict(bos_token_id=1, eos_token_id=2),
             config=GraniteMoeSharedConfig(**common_granite, tie_word_embeddings=False,
                                           shared_intermediate_size=32)),
        # 4 groups of 2, the best 2 groups; q/k norms, q/k/v biases, rotary on half of each head,
        # routed_scaling_factor 2.5 (must_matter), renormalized top-k.
        dict(name="glm4moe-tiny", seed=14014, legacy_config=False, dtype=torch.float32, shard=None,
             gen=dict(bos_token_id=1, eos_token_id=2), must_matter=dict(routed_scaling_factor=1.0),
             config=Glm4MoeConfig(**common_glm, first_k_dense_replace=1, n_shared_experts=1, n_group=4,
                                  topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                                  use_qk_norm=True, attention_bias=True,
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "partial_rotary_factor": 0.5})),
        # One group, no q/k norms or biases, top-k not renormalized, every layer MoE, two shared
        # experts' width, rotary on a quarter of each head; legacy config (top-level
        # partial_rotary_factor and rope_theta).
        dict(name="glm4moe-tiny-plain", seed=15015, legacy_config=True, dtype=torch.float32, shard=None,
             gen=dict(bos_token_id=1, eos_token_id=2),
             config=Glm4MoeConfig(**common_glm, first_k_dense_replace=0, n_shared_experts=2, n_group=1,
                                  topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
                                  use_qk_norm=False, attention_bias=False,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                   "partial_rotary_factor": 0.25})),
        # Three layers (sliding, full, sliding) with a 6-token window; YaRN (factor 4 over 256
        # positions, theta 10^4: the ramp spans frequencies 0..3, not truncated) and its
        # attention factor; swiglu_limit 1 so that the clamps bite. Each must_matter entry
        # moves transformers' logits.
        dict(name="gptoss-tiny", seed=16016, legacy_config=False, dtype=torch.float32, shard=None,
             gen=dict(bos_token_id=1, eos_token_id=2),
             must_matter=dict(sliding_window=1000, swiglu_limit=7.0,
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
             config=GptOssConfig(**common_gptoss, num_hidden_layers=3, num_key_value_heads=2,
                                 num_local_experts=8, num_experts_per_tok=2, sliding_window=6,
                                 swiglu_limit=1.0,
                                 rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                  "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                                  "original_max_position_embeddings": 256,
                                                  "truncate": False})),
        # bf16; layer types full then sliding (window 9), one KV head, top-3 of 6; legacy config
        # (rope_scaling beside rope_theta) with YaRN truncated by default (no `truncate` key),
        # factor 8 over 128 positions, beta_fast 16, a non-default swiglu_alpha.
        dict(name="gptoss-tiny-legacy", seed=17017, legacy_config=True, dtype=torch.bfloat16,
             shard=None, gen=dict(bos_token_id=1, eos_token_id=2),
             must_matter=dict(swiglu_alpha=1.702),
             config=GptOssConfig(**common_gptoss, num_hidden_layers=2, num_key_value_heads=1,
                                 num_local_experts=6, num_experts_per_tok=3, sliding_window=9,
                                 layer_types=["full_attention", "sliding_attention"],
                                 swiglu_limit=2.0, swiglu_alpha=1.2,
                                 rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0,
                                                  "factor": 8.0, "beta_fast": 16.0, "beta_slow": 1.0,
                                                  "original_max_position_embeddings": 128})),
        # DeepSeek-V2: q_proj (no q LoRA), complex (interleaved) RoPE with YaRN (factor 8 over an
        # original 32 positions, mscale = mscale_all_dim 0.707 as V2's own config: the cos/sin
        # factor is 1, the softmax scale moves), group_limited_greedy (4 groups of 2, best 2),
        # routed_scaling_factor 2.0 (must_matter), two shared experts' width, v_head_dim 12 under
        # a qk head of 8 + 8.
        dict(name="deepseekv2-tiny", seed=16016, legacy_config=False, dtype=torch.float32, shard=None,
             gen=dict(bos_token_id=1, eos_token_id=2),
             must_matter=dict(routed_scaling_factor=1.0,
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
             config=DeepseekV2Config(**common_ds, first_k_dense_replace=1, n_shared_experts=2,
                                     topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                     routed_scaling_factor=2.0, norm_topk_prob=False, q_lora_rank=None,
                                     kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                                     rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                      "factor": 8.0, "original_max_position_embeddings": 32,
                                                      "mscale": 0.707, "mscale_all_dim": 0.707,
                                                      "beta_fast": 32, "beta_slow": 1})),
        # DeepSeek-V3: q LoRA (q_a_proj/q_a_layernorm/q_b_proj), biases on q_a/kv_a/o, rope_interleave,
        # YaRN with mscale 1 and mscale_all_dim 0.8 (both the cos/sin factor and the softmax
        # scale differ from 1) over a ramp inside the 16 rotated dims, grouped sigmoid routing
        # (4 groups of 2, best 2; correction bias), routed_scaling_factor 2.5, renormalized.
        dict(name="deepseekv3-tiny", seed=17017, legacy_config=False, dtype=torch.float32, shard=None,
             gen=dict(bos_token_id=1, eos_token_id=2),
             must_matter=dict(routed_scaling_factor=1.0,
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
             config=DeepseekV3Config(**common_ds, first_k_dense_replace=1, n_shared_experts=1, n_group=4,
                                     topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                                     q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                                     v_head_dim=24, attention_bias=True, rope_interleave=True,
                                     rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                      "factor": 4.0, "original_max_position_embeddings": 64,
                                                      "mscale": 1.0, "mscale_all_dim": 0.8,
                                                      "beta_fast": 32, "beta_slow": 1})),
        # DeepSeek-V3 plain: q_proj, rotate-half RoPE (rope_interleave false, which must matter),
        # no YaRN, one group, top-k not renormalized, every layer MoE, values as wide as keys;
        # legacy config (top-level rope_theta).
        dict(name="deepseekv3-tiny-plain", seed=18018, legacy_config=True, dtype=torch.float32, shard=None,
             gen=dict(bos_token_id=1, eos_token_id=2), must_matter=dict(rope_interleave=True),
             config=DeepseekV3Config(**common_ds, first_k_dense_replace=0, n_shared_experts=1, n_group=1,
                                     topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
                                     q_lora_rank=None, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                     v_head_dim=16, attention_bias=False, rope_interleave=False,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
        # Dense Llama, tied head; also written as llama-tiny.gguf (F32, q/k rows permuted as
        # llama.cpp's converter does, tokenizer in tokenizer.ggml.* metadata).
        dict(name="llama-tiny", seed=7007, legacy_config=True, dtype=torch.float32, shard=None,
             gen=dict(bos_token_id=1, eos_token_id=2), gguf=True,
             config=LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=1024, rms_norm_eps=1e-5,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)),
    ]


def make_input_ids(seed: int, bos: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (T,), generator=g, dtype=torch.int64)
    ids[0] = bos
    ids[T // 2] = VOCAB - 1  # exercise the last embedding row
    return ids


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf.py does to a Llama's q/k rows (for ggml's
    interleaved RoPE): per head, [2, head_dim/2] halves become [head_dim/2, 2] pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, cfg, tokenizer_json: str, path: str) -> None:
    """The model as a llama.cpp-style GGUF (all F32), with llama.cpp's tensor names and keys."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("llama-tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    with open(tokenizer_json) as f:
        tj = json.load(f)
    vocab = tj["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    tokens += ["<pad%d>" % i for i in range(cfg.vocab_size - len(tokens))]
    special = {a["id"] for a in tj.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_add_bos_token(False)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        if name in names:
            g = names[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            g = f"blk.{layer}.{per_layer[module]}.{suffix}"
        t = t.float()
        if g.endswith("attn_q.weight"):
            t = llama_cpp_permute(t, cfg.num_attention_heads)
        elif g.endswith("attn_k.weight"):
            t = llama_cpp_permute(t, cfg.num_key_value_heads)
        w.add_tensor(g, np.ascontiguousarray(t.numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def build_one(spec, out_root, tokenizer_json):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GenerationConfig

    import transformers

    name = spec["name"]
    d = os.path.join(out_root, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)

    cfg = spec["config"]
    torch.manual_seed(spec["seed"])  # HF's own init (overwritten below)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    input_ids = make_input_ids(spec["seed"] + 1, spec["gen"]["bos_token_id"])

    # Re-initialise; bump the seed (deterministically) until every router's
    # top-k choice is far from a tie on the reference input.
    seed = spec["seed"]
    for attempt in range(20):
        hfcommon.reinit_(model, seed)
        if spec["dtype"] != torch.float32:  # round to the stored dtype first
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.to(spec["dtype"]).float())
        model.eval()
        probe = hfcommon.RouterProbe(model)
        with torch.no_grad():
            model(input_ids[None])
        probe.remove()
        if probe.min_gap() >= MIN_ROUTER_GAP:
            break
        seed += 100
    else:
        raise RuntimeError(f"{name}: no seed with router gap >= {MIN_ROUTER_GAP}")

    model.generation_config = GenerationConfig(**spec["gen"])
    model = model.to(spec["dtype"])
    kw = {"max_shard_size": spec["shard"]} if spec["shard"] else {}
    model.save_pretrained(d, **kw)
    if spec["legacy_config"]:
        hfcommon.legacy_config_json(os.path.join(d, "config.json"))
    shutil.copyfile(tokenizer_json, os.path.join(d, "tokenizer.json"))

    # reference: reload from disk in float32 / eager
    ref_model = hfcommon.load_f32(d)
    probe = hfcommon.RouterProbe(ref_model)
    with torch.no_grad():
        logits = ref_model(input_ids[None]).logits[0].float().contiguous()
    probe.remove()
    assert logits.shape == (T, cfg.vocab_size)
    if spec["dtype"] == torch.float32:  # reload must be bit-identical
        with torch.no_grad():
            mem = model(input_ids[None]).logits[0].float()
        assert torch.equal(mem, logits), f"{name}: reload changed logits"
    for field, value in spec.get("must_matter", {}).items():
        # The option must change this fixture's logits, or the test could not see it ignored.
        # Built anew from the changed config: some modules copy a field when constructed.
        alt_cfg = copy.deepcopy(ref_model.config)
        setattr(alt_cfg, field, value)
        alt = type(ref_model)(alt_cfg)
        alt.load_state_dict(ref_model.state_dict())
        alt.eval()
        with torch.no_grad():
            alt_logits = alt(input_ids[None]).logits[0].float()
        moved = (alt_logits - logits).abs().max().item()
        assert moved > 1e-2 * logits.abs().max().item(), f"{name}: {field} changes logits by {moved}"
        print(f"{name}: {field}={value} instead moves the logits by up to {moved:.3f}")
    meta = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "attn_implementation": "eager",
        "compute_dtype": "float32",
        "stored_dtype": str(spec["dtype"]).replace("torch.", ""),
        "reinit_seed": str(seed),
    }
    if spec.get("gguf"):
        write_llama_gguf(ref_model, cfg, tokenizer_json, os.path.join(d, f"{name}.gguf"))
    # single metadata key: safetensors' (Rust) writer reorders multiple keys randomly
    save_file({"input_ids": input_ids.contiguous(), "logits": logits}, os.path.join(d, "reference.safetensors"),
              metadata={"provenance": json.dumps(meta, sort_keys=True)})
    return {
        "name": name,
        "seed": seed,
        "bytes": hfcommon.dir_size(d),
        "logits_std": logits.std().item(),
        "logits_absmax": logits.abs().max().item(),
        "router_min_gap": probe.min_gap(),
        "router": probe.stats,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures"))
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.use_deterministic_algorithms(True)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)

    tok = hfcommon.train_bytelevel_bpe([l + "\n" for l in CORPUS_LINES], TOK_VOCAB)
    assert tok.get_vocab_size() <= VOCAB
    tok_path = os.path.join(out, ".tokenizer-512.json.tmp")
    tok.save(tok_path)
    try:
        for spec in fixture_specs():
            if args.only and spec["name"] not in args.only:
                continue
            r = build_one(spec, out, tok_path)
            print(f"{r['name']}: {r['bytes']} bytes, seed {r['seed']}, logits std {r['logits_std']:.3f} "
                  f"absmax {r['logits_absmax']:.2f}, router min top-k gap {r['router_min_gap']:.4f}")
            for lname, s in r["router"].items():
                print(f"    {lname}: expert counts {s['expert_counts']} gap {s['min_topk_gap']:.4f}")
    finally:
        os.remove(tok_path)
    # checksums, handy for checking reproducibility
    for root, _, files in sorted(os.walk(out)):
        for f in sorted(files):
            p = os.path.join(root, f)
            if os.path.relpath(p, out).split(os.sep)[0] in ("trained-moe",):
                continue
            h = hashlib.sha256(open(p, "rb").read()).hexdigest()[:16]
            print(f"  {h}  {os.path.relpath(p, out)}")


if __name__ == "__main__":
    main()
