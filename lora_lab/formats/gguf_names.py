"""llama.cpp's names for what our model holds: one table that GGUF import and export both read.

    blocks.3.attn.q_proj.weight  <->  blk.3.attn_q.weight          wte.weight  <->  token_embd.weight

Which llama.cpp *architecture* computes what a Config computes (`gguf_architecture`), and what each one changes in
the tensors' layout:
  - llama (Llama 2/3, Mistral, SmolLM2): llama.cpp rotates *interleaved* RoPE pairs (2i, 2i+1), we rotate *halves*
    (i, i + n/2): the rows of Wq and Wk are reordered per head (`halves_to_interleaved` on the way out,
    `interleaved_to_halves` on the way in; llama2.c uses the interleaved layout too). q·k is unchanged because q
    and k are permuted alike. Qwen2, Gemma, Phi-2, GPT-NeoX and Falcon use rotate-half RoPE there: no permutation.
  - gemma: its RMSNorm scales by (1 + w); llama.cpp stores 1 + w.
  - qwen3: Llama's block with per-head q/k RMSNorm (attn_q_norm, attn_k_norm), rotate-half RoPE.
  - gptneox, falcon: one attn_qkv matrix, [Q; K; V] rows.
  - Falcon-40B: llama.cpp's attn_norm feeds the MLP and attn_norm_2 the attention.
Tested both ways in tests/test_convert_gguf.py and tests/test_export_gguf.py (against llama.cpp itself).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from lora_lab.config import Config
from lora_lab.utils import LoraLabError


@dataclass(frozen=True)
class Arch:
    name: str  # general.architecture
    permute_qk: bool = False  # llama.cpp's interleaved RoPE: Q/K rows reordered
    fused_qkv: bool = False  # one attn_qkv matrix [Q; K; V]
    layer_norm: bool = False  # LayerNorm + GELU MLP (eps key layer_norm_epsilon) instead of RMSNorm
    output_required: bool = False  # llama.cpp needs output.weight even when it is the embedding
    output_bias_required: bool = False
    norm_plus_one: bool = False  # norms stored as 1 + w


ARCHS = {a.name: a for a in (
    Arch("llama", permute_qk=True),
    Arch("qwen2"),
    Arch("qwen3"),  # Qwen3: Llama's block with RMSNorm on each head of q and k (attn_q_norm, attn_k_norm)
    Arch("gemma", norm_plus_one=True),
    Arch("phi2", layer_norm=True, output_required=True, output_bias_required=True),
    Arch("gptneox", fused_qkv=True, layer_norm=True, output_required=True),
    Arch("falcon", fused_qkv=True, layer_norm=True),
)}
FAMILIES = "Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3, Gemma, Phi-2, Pythia/GPT-NeoX, Falcon"

# our module name inside a block -> llama.cpp's; global modules; the suffix (.weight / .bias) carries over
LAYER_NAMES = {"attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v", "attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "norm_1": "attn_norm", "norm_2": "ffn_norm", "attn.q_norm": "attn_q_norm", "attn.k_norm": "attn_k_norm"}
GLOBAL_NAMES = {"wte": "token_embd", "norm_f": "output_norm", "lm_head": "output"}
QKV = ("q_proj", "k_proj", "v_proj")
FUSED_QKV = "attn_qkv"  # read back as our attn.qkv, then split into QKV
FALCON40B_NORMS = {"norm_1": "attn_norm_2", "norm_2": "attn_norm"}  # Falcon-40B's two norms, llama.cpp's way

_FROM_GGUF_LAYER = {**{v: k for k, v in LAYER_NAMES.items()}, FUSED_QKV: "attn.qkv", "attn_norm_2": "norm_1"}
_FROM_GGUF_GLOBAL = {v: k for k, v in GLOBAL_NAMES.items()}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^(\w+)\.(weight|bias)$")

# the regexes of the pre-tokenizers llama.cpp names in tokenizer.ggml.pre, for byte-level BPE vocabularies
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def gguf_module_name(module: str, config: Config, arch: Arch) -> str:
    """Our module name -> llama.cpp's tensor name without suffix: `blocks.3.attn.q_proj` -> `blk.3.attn_q`
    (`blk.3.attn_qkv` where llama.cpp fuses q, k and v)."""
    if module in GLOBAL_NAMES:
        return GLOBAL_NAMES[module]
    _, i, rest = module.split(".", 2)
    if arch.fused_qkv and rest.split(".")[-1] in QKV:
        return f"blk.{i}.{FUSED_QKV}"
    if arch.name == "falcon" and not config.shared_attention_norm and rest in FALCON40B_NORMS:
        return f"blk.{i}.{FALCON40B_NORMS[rest]}"
    return f"blk.{i}.{LAYER_NAMES[rest]}"


def gguf_name_to_ours(name: str) -> Optional[str]:
    """`blk.3.attn_q.weight` -> `blocks.3.attn.q_proj.weight`; None for names we do not know. (Falcon-40B's
    attn_norm, which feeds the MLP, comes back as norm_1: the importer swaps it.)"""
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _FROM_GGUF_LAYER:
        return f"blocks.{m.group(1)}.{_FROM_GGUF_LAYER[m.group(2)]}.{m.group(3)}"
    m = _GLOBAL_RE.match(name)
    if m and m.group(1) in _FROM_GGUF_GLOBAL:
        return f"{_FROM_GGUF_GLOBAL[m.group(1)]}.{m.group(2)}"
    return None


def halves_to_interleaved(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q or k projection rows (n_head * hs, ...) from rotate-half pairs (i, i + hs/2) to interleaved pairs
    (2i, 2i + 1), per head: what llama.cpp's converter does to Hugging Face Llama weights (its `permute`)."""
    hs = w.shape[0] // n_head
    return w.reshape(n_head, 2, hs // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def interleaved_to_halves(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The exact inverse of `halves_to_interleaved`: per head, row 2i goes to i and row 2i+1 to i + hs/2
    (llama.cpp's llama files and llama2.c's checkpoints in, our layout out)."""
    hs = w.shape[0] // n_head
    return w.reshape(n_head, hs // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_architecture(config: Config) -> Arch:
    """The llama.cpp architecture that computes what our model with this config computes, or one line why none."""
    c = config
    full_rope = c.rope_n_elem == c.head_size

    def refuse(why: str) -> LoraLabError:
        return LoraLabError(f"{c.name or 'this model'} cannot be exported to GGUF: {why} (llama.cpp export "
                            f"supports {FAMILIES})")

    # the 2024-25 families' switches (Qwen3's q/k norms, Gemma 2's soft-caps, MoE, ...) are not in these
    # architectures: refuse rather than write a file that llama.cpp runs as another model
    qwen3 = c.qk_norm == "head" and not c.norm_unit_offset  # Qwen3's per-head q/k norms: llama.cpp's qwen3
    newer = {"q/k norms": c.qk_norm is not None and not qwen3, "norms after the sub-blocks": c.post_norms or not c.pre_norms,
             "attention or logit soft-capping": c.attn_softcap is not None or c.final_softcap is not None,
             "a query scale": c.attn_scale_base is not None, "sliding and global layers": c.global_layers is not None,
             "a local RoPE base": c.rope_local_base is not None, "layers without RoPE": c.nope_layers is not None,
             "a mixture of experts": c.n_expert > 0,
             "linear, LongRoPE or YaRN RoPE scaling": "rope_type" in (c.rope_scaling or {})}
    present = [what for what, on in newer.items() if on]
    if present:
        raise refuse(f"{present[0]} (Gemma 2 / 3, Phi-4, OLMo 2 / 3, SmolLM3 and MoE GGUF export is not written "
                     f"yet)")
    if c.norm_class == "RMSNorm":
        if c.parallel_residual or c.bias or c.lm_head_bias or not full_rope:
            raise refuse("an RMSNorm model with a parallel residual, biases or partial RoPE has no llama.cpp "
                         "architecture here")
        if c.norm_unit_offset:
            if not (c.mlp_class == "geglu" and c.scale_embeddings and c.tie_embeddings and not c.attn_qkv_bias):
                raise refuse("a (1 + w) RMSNorm model that is not Gemma (GeGLU, scaled and tied embeddings)")
            return ARCHS["gemma"]
        if c.mlp_class != "swiglu" or c.scale_embeddings:
            raise refuse(f"an RMSNorm model with a {c.mlp_class} MLP or scaled embeddings that is not Gemma")
        if c.rope_scaling is not None and c.attn_qkv_bias:
            raise refuse("Llama 3 RoPE scaling together with q/k/v biases")
        if qwen3:
            if c.attn_qkv_bias or c.rope_scaling is not None:
                raise refuse("Qwen3 with q/k/v biases or RoPE scaling")
            return ARCHS["qwen3"]
        return ARCHS["qwen2" if c.attn_qkv_bias else "llama"]
    if c.mlp_class != "gelu":
        raise refuse(f"a LayerNorm model with a {c.mlp_class} MLP (StableLM) is not exported")
    if c.rope_scaling is not None or c.sliding_window is not None:
        raise refuse("RoPE scaling or a sliding window on a LayerNorm model")
    if c.bias and c.lm_head_bias:
        if not (c.parallel_residual and c.shared_attention_norm):
            raise refuse("a model with an lm_head bias that is not Phi (parallel block sharing one norm)")
        return ARCHS["phi2"]
    if c.lm_head_bias:
        raise refuse("an lm_head bias outside Phi")
    if c.bias:
        if c.shared_attention_norm and c.parallel_residual:
            raise refuse("GPT-NeoX with one shared norm")
        return ARCHS["gptneox"]
    if not c.parallel_residual:
        raise refuse("a LayerNorm GELU model without biases and without a parallel block (Falcon-RW)")
    if not full_rope:
        raise refuse("Falcon with partial RoPE")
    if c.attn_qkv_bias:
        raise refuse("Falcon with q/k/v biases")
    return ARCHS["falcon"]
