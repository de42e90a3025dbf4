"""Tiny random Hugging Face configs, one or more per supported family, each keeping the family's architecture
flags (GQA / MQA, partial rotary, parallel residual, biases, tied embeddings, rope scaling, ...).

Shared by the conversion tests: `tiny_hf_model(name)` builds the transformers model with non-trivial weights."""

from __future__ import annotations

import torch

VOCAB, HIDDEN, LAYERS, SEQ = 128, 64, 2, 16

_base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, max_position_embeddings=64)

# name -> (model_type, config kwargs)
TINY_HF: dict[str, tuple[str, dict]] = {
    # Llama 2: multi-head attention, untied, eps 1e-5
    "llama2": ("llama", dict(_base, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
                             rms_norm_eps=1e-5, tie_word_embeddings=False)),
    # Llama 3.1: GQA 4:1 (8 heads, 2 KV), llama3 rope scaling with a small original length so every band is used
    "llama3": ("llama", dict(_base, num_attention_heads=8, num_key_value_heads=2, intermediate_size=96,
                             rms_norm_eps=1e-5, tie_word_embeddings=False,
                             rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                  low_freq_factor=1.0, high_freq_factor=4.0,
                                                  original_max_position_embeddings=32))),
    # Llama 3.2 1B style: tied embeddings, GQA
    "llama32_tied": ("llama", dict(_base, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                   tie_word_embeddings=True,
                                   rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0,
                                                        low_freq_factor=1.0, high_freq_factor=4.0,
                                                        original_max_position_embeddings=16))),
    # Mistral v0.1: sliding window (6) shorter than the test sequence (16)
    "mistral": ("mistral", dict(_base, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                sliding_window=6, rms_norm_eps=1e-5)),
    # Qwen2.5: bias on q/k/v only, tied, GQA
    "qwen2": ("qwen2", dict(_base, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                            tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    # Gemma 2B: head_dim (32) != hidden / heads (16), multi-query, GeGLU, (1 + w) norms, scaled embeddings
    "gemma": ("gemma", dict(_base, num_attention_heads=4, num_key_value_heads=1, head_dim=32, intermediate_size=96,
                            hidden_act="gelu_pytorch_tanh")),
    # Pythia: a quarter of each head rotates, parallel residual with two norms, biases everywhere, untied
    "pythia": ("gpt_neox", dict(_base, num_attention_heads=4, intermediate_size=256, hidden_act="gelu",
                                rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                     partial_rotary_factor=0.25),
                                use_parallel_residual=True, tie_word_embeddings=False)),
    # GPT-NeoX with a sequential block (use_parallel_residual: false), gelu_new, half of each head rotating
    "neox_sequential": ("gpt_neox", dict(_base, num_attention_heads=4, intermediate_size=128, hidden_act="gelu_new",
                                         rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                              partial_rotary_factor=0.5),
                                         use_parallel_residual=False, tie_word_embeddings=False)),
    # Falcon-7B: multi-query, parallel attention + MLP sharing one LayerNorm, no bias, tied
    "falcon7b": ("falcon", dict(_base, num_attention_heads=4, multi_query=True, parallel_attn=True,
                                new_decoder_architecture=False, bias=False, tie_word_embeddings=True)),
    # Falcon with the old architecture's multi-head layout (per head [q, k, v]) and biases
    "falcon_mha": ("falcon", dict(_base, num_attention_heads=4, multi_query=False, parallel_attn=True,
                                  new_decoder_architecture=False, bias=True, tie_word_embeddings=False)),
    # Falcon-40B: new_decoder_architecture, 8 heads in 2 KV groups, ln_attn + ln_mlp, untied
    "falcon40b": ("falcon", dict(_base, num_attention_heads=8, num_kv_heads=2, new_decoder_architecture=True,
                                 bias=False, tie_word_embeddings=False)),
    # Phi-2: partial rotary 0.4 (6 of 16 dims), gelu_new, shared norm, biases and an lm_head bias
    "phi": ("phi", dict(_base, num_attention_heads=4, num_key_value_heads=4, intermediate_size=256,
                        hidden_act="gelu_new", rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                    partial_rotary_factor=0.4))),
    # StableLM 2: LayerNorm, SwiGLU, partial rotary 0.25, q/k/v bias, GQA
    "stablelm": ("stablelm", dict(_base, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                  use_qkv_bias=True, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                          partial_rotary_factor=0.25))),
    # StableLM with the parallel residual (one shared norm)
    "stablelm_parallel": ("stablelm", dict(_base, num_attention_heads=4, num_key_value_heads=4,
                                           intermediate_size=96, use_parallel_residual=True,
                                           tie_word_embeddings=True,
                                           rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                partial_rotary_factor=0.5))),
}

# The 2024-25 families: odd sizes (head_dim != hidden / heads where the family allows it), GQA, and enough layers
# that each per-layer pattern shows (sliding / global, NoPE, dense / MoE layers) within SEQ tokens.
_odd = dict(vocab_size=VOCAB, hidden_size=40, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
            intermediate_size=72, max_position_embeddings=64)
_ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # the families' defaults are outside the tiny vocab
_long = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # LongRoPE divisors per frequency (6 = 12 rotary dims / 2)
TINY_HF.update({
    # Qwen3: per-head q/k RMSNorm, untied, YaRN (its long-context setting) over an original 8 positions
    "qwen3": ("qwen3", dict(_odd, num_hidden_layers=3, tie_word_embeddings=False,
                            rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=4.0,
                                                 original_max_position_embeddings=8))),
    # Qwen3 with sliding windows on the layers from max_window_layers on (a window of 5 in 16 tokens)
    "qwen3_sliding": ("qwen3", dict(_odd, num_hidden_layers=4, use_sliding_window=True, sliding_window=5,
                                    max_window_layers=2, tie_word_embeddings=True)),
    # Gemma 2: sliding / global alternating, four norms per block, query scale, small soft-caps so that they bite
    "gemma2": ("gemma2", dict(_odd, num_hidden_layers=4, sliding_window=5, query_pre_attn_scalar=20,
                              attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    # Gemma 3 text: 5 sliding : 1 global with their own RoPE bases (global: linear scaling x4), q/k norms
    "gemma3": ("gemma3_text", dict(_odd, num_hidden_layers=7, sliding_window=5, query_pre_attn_scalar=12,
                                   rope_parameters={"full_attention": dict(rope_type="linear", factor=4.0,
                                                                           rope_theta=1e6),
                                                    "sliding_attention": dict(rope_type="default",
                                                                              rope_theta=1e4)})),
    # Phi-4-mini: fused qkv / gate_up, 3/4 of each head rotates, LongRoPE (16 tokens > original 8: long factors),
    # tied embeddings
    "phi4mini": ("phi3", dict(_ids, vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=72, num_hidden_layers=2, max_position_embeddings=64,
                              original_max_position_embeddings=8, tie_word_embeddings=True,
                              rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                   partial_rotary_factor=0.75, short_factor=_long[::-1],
                                                   long_factor=_long, original_max_position_embeddings=8))),
    # Phi-3-mini-4k: fused layers, full rotary, a sliding window on every layer
    "phi3": ("phi3", dict(_ids, vocab_size=VOCAB, hidden_size=48, num_attention_heads=4, num_key_value_heads=4,
                          intermediate_size=72, num_hidden_layers=2, max_position_embeddings=64, sliding_window=6)),
    # OLMo 2: norms after attention and MLP only, q/k norms over the whole projection
    "olmo2": ("olmo2", dict(_ids, vocab_size=VOCAB, hidden_size=40, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=72, num_hidden_layers=3, max_position_embeddings=64)),
    # OLMo 3: OLMo 2 with 3 sliding : 1 global layers, YaRN on the global ones
    "olmo3": ("olmo3", dict(_ids, vocab_size=VOCAB, hidden_size=40, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=72, num_hidden_layers=4, max_position_embeddings=64, sliding_window=5,
                            rope_parameters={"full_attention": dict(rope_type="yarn", rope_theta=5e5, factor=4.0,
                                                                    original_max_position_embeddings=8,
                                                                    beta_fast=16, beta_slow=2),
                                             "sliding_attention": dict(rope_type="default", rope_theta=5e5)})),
    # SmolLM3: no RoPE on every 4th layer (layer 3 of 5), GQA, tied
    "smollm3": ("smollm3", dict(_ids, vocab_size=VOCAB, hidden_size=40, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=72, num_hidden_layers=5, max_position_embeddings=64)),
    # Qwen3-MoE: 5 experts, top 2 renormalised, the middle layer a dense MLP (mlp_only_layers)
    "qwen3_moe": ("qwen3_moe", dict(_odd, num_hidden_layers=3, num_experts=5, num_experts_per_tok=2,
                                    moe_intermediate_size=24, norm_topk_prob=True, mlp_only_layers=[1])),
})
NEW_FAMILIES = ["qwen3", "qwen3_sliding", "gemma2", "gemma3", "phi4mini", "phi3", "olmo2", "olmo3", "smollm3", "qwen3_moe"]


def tiny_hf_config(name: str):
    from transformers import AutoConfig

    model_type, kwargs = TINY_HF[name]
    return AutoConfig.for_model(model_type, **kwargs)


@torch.no_grad()
def perturb_(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Make every weight matter: matrices ~ N(0, std) (so attention is far from uniform), and norms and biases
    moved away from their 1 / 0 init (so a swapped or dropped norm or bias changes the output)."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, std)
        else:
            p.add_(torch.randn_like(p) * 0.2)
    return model


def tiny_hf_model(name: str, attn_implementation: str = "eager"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_hf_config(name), attn_implementation=attn_implementation,
                                             dtype=torch.float32)
    return perturb_(model).eval()
