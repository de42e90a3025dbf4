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
  - gemma2 / gemma3: Gemma's 1 + w on every norm (post_attention_norm, post_ffw_norm and Gemma 3's q/k norms
    too). llama.cpp fixes what the files do not say: Gemma 2 slides on even layers, Gemma 3 on 5 of every 6 with
    RoPE base 10000 there, and both scale queries by head_size**-0.5 (n_embd / n_head for the 27B sizes, told
    apart by their layer count): `gguf_architecture` refuses a config that differs.
  - phi3: attn_qkv [Q; K; V] and ffn_up [gate; up] fused; LongRoPE as rope_factors_short / rope_factors_long.
  - olmo2: no norm before the sub-blocks, post_attention_norm / post_ffw_norm after, q/k norms over the whole
    projection; OLMo 3 too (which layers slide: attention.sliding_window_pattern; llama.cpp rotates those with the
    global base, unscaled). YaRN (Qwen3, OLMo 3) is rope.scaling.* keys.
  - smollm3: Llama's layout (interleaved Q/K rows); llama.cpp skips RoPE on every 4th layer.
  - qwen3moe: the router is ffn_gate_inp (n_expert, C); each layer's experts are stacked into one 3-d tensor per
    projection, ffn_{gate,up,down}_exps (n_expert, out, in), expert e at index e.
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
    fused_gate_up: bool = False  # one ffn_up matrix [gate; up] (Phi-3)


ARCHS = {a.name: a for a in (
    Arch("llama", permute_qk=True),
    Arch("qwen2"),
    Arch("qwen3"),  # Qwen3: Llama's block with RMSNorm on each head of q and k (attn_q_norm, attn_k_norm)
    Arch("qwen3moe"),  # Qwen3-MoE: qwen3's attention, a router and stacked experts
    Arch("gemma", norm_plus_one=True),
    Arch("gemma2", norm_plus_one=True),
    Arch("gemma3", norm_plus_one=True),
    Arch("phi3", fused_qkv=True, fused_gate_up=True, output_required=True),
    Arch("olmo2"),
    Arch("smollm3", permute_qk=True),
    Arch("phi2", layer_norm=True, output_required=True, output_bias_required=True),
    Arch("gptneox", fused_qkv=True, layer_norm=True, output_required=True),
    Arch("falcon", fused_qkv=True, layer_norm=True),
)}
FAMILIES = ("Llama 2/3, SmolLM2, SmolLM3, Mistral, Qwen2, Qwen3, Qwen3-MoE, Gemma 1/2/3, Phi-2, Phi-3/4, OLMo 2, "
            "Pythia/GPT-NeoX, Falcon")

# our module name inside a block -> llama.cpp's; global modules; the suffix (.weight / .bias) carries over
LAYER_NAMES = {"attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v", "attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "norm_1": "attn_norm", "norm_2": "ffn_norm", "attn.q_norm": "attn_q_norm", "attn.k_norm": "attn_k_norm",
               "post_attn_norm": "post_attention_norm", "post_mlp_norm": "post_ffw_norm", "mlp.router": "ffn_gate_inp"}
EXPERT_NAMES = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}  # stacked
GLOBAL_NAMES = {"wte": "token_embd", "norm_f": "output_norm", "lm_head": "output"}
QKV = ("q_proj", "k_proj", "v_proj")
FUSED_QKV = "attn_qkv"  # read back as our attn.qkv, then split into QKV
GATE_UP = ("gate_proj", "up_proj")
FUSED_GATE_UP = "ffn_up"  # Phi-3: [gate; up] rows, read back as our mlp.up_proj and split (the importer knows)
FALCON40B_NORMS = {"norm_1": "attn_norm_2", "norm_2": "attn_norm"}  # Falcon-40B's two norms, llama.cpp's way

_FROM_GGUF_LAYER = {**{v: k for k, v in LAYER_NAMES.items()}, FUSED_QKV: "attn.qkv", "attn_norm_2": "norm_1",
                    **{v: f"mlp.experts.{k}" for k, v in EXPERT_NAMES.items()}}  # the importer unstacks experts
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
    (`blk.3.attn_qkv` where llama.cpp fuses q, k and v; `blocks.3.mlp.experts.5.up_proj` -> `blk.3.ffn_up_exps`,
    the stacked tensor that holds it)."""
    if module in GLOBAL_NAMES:
        return GLOBAL_NAMES[module]
    _, i, rest = module.split(".", 2)
    if arch.fused_qkv and rest.split(".")[-1] in QKV:
        return f"blk.{i}.{FUSED_QKV}"
    if arch.fused_gate_up and rest.split(".")[-1] in GATE_UP:
        return f"blk.{i}.{FUSED_GATE_UP}"
    if rest.startswith("mlp.experts."):
        return f"blk.{i}.{EXPERT_NAMES[rest.rsplit('.', 1)[-1]]}"
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

    rope_type = (c.rope_scaling or {}).get("rope_type")  # None: none, or Llama 3's (no rope_type key)
    if rope_type == "yarn" and (c.qk_norm is None or not c.rope_scaling.get("truncate", True)):
        raise refuse("YaRN RoPE scaling is written for Qwen3 and OLMo 3 only (with transformers' truncated "
                     "correction range)")
    newer = _newer_family(c, refuse)
    if newer is not None:
        return ARCHS[newer]
    # what is left of the 2024-25 families' switches has no llama.cpp architecture here: refuse rather than write a
    # file that llama.cpp runs as another model
    present = [what for what, on in _new_switches(c).items() if on]
    if present:
        raise refuse(f"{present[0]} outside the Gemma 2 / 3, Phi-3 / 4, OLMo 2, SmolLM3 and Qwen3(-MoE) layouts")
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
        if c.qk_norm == "head":  # Qwen3's per-head q/k norms
            if c.attn_qkv_bias or (c.rope_scaling is not None and rope_type != "yarn"):
                raise refuse("Qwen3 with q/k/v biases or RoPE scaling other than YaRN")
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


def _new_switches(c: Config) -> dict[str, bool]:
    qwen3 = c.qk_norm == "head" and not c.norm_unit_offset  # Qwen3's per-head q/k norms: llama.cpp's qwen3
    return {"q/k norms": c.qk_norm is not None and not qwen3, "norms after the sub-blocks": c.post_norms or not c.pre_norms,
            "attention or logit soft-capping": c.attn_softcap is not None or c.final_softcap is not None,
            "a query scale": c.attn_scale_base not in (None, c.head_size),
            "sliding and global layers": c.global_layers is not None, "a local RoPE base": c.rope_local_base is not None,
            "layers without RoPE": c.nope_layers is not None, "a mixture of experts": c.n_expert > 0,
            "linear or LongRoPE RoPE scaling": (c.rope_scaling or {}).get("rope_type") in ("linear", "longrope")}


def _newer_family(c: Config, refuse) -> Optional[str]:
    """gemma2, gemma3, phi3, olmo2, smollm3 or qwen3moe when the config is that layout; None when it is none of them
    (the older families' checks follow); one line why where it is one of them but llama.cpp computes otherwise."""
    n, rope_type = c.n_layer, (c.rope_scaling or {}).get("rope_type")
    full_rope = c.rope_n_elem == c.head_size
    plain = (c.norm_class == "RMSNorm" and not (c.parallel_residual or c.bias or c.lm_head_bias or c.attn_qkv_bias))
    windows = [c.window_at(i) for i in range(n)]
    ropes = [c.rope_at(i) for i in range(n)]

    def need(ok: bool, arch: str, why: str) -> None:
        if not ok:
            raise refuse(f"llama.cpp's {arch} {why}")

    if c.n_expert:
        need(plain and full_rope and c.mlp_class == "swiglu" and c.qk_norm == "head" and not c.norm_unit_offset
             and c.pre_norms and not c.post_norms and not c.scale_embeddings, "qwen3moe",
             "(the only MoE architecture exported) is Qwen3's block: per-head q/k norms, SwiGLU experts")
        need(all(c.moe_at(i) for i in range(n)), "qwen3moe", "has experts on every layer (no dense MLP layers)")
        need(c.norm_topk_prob, "qwen3moe", "renormalises the chosen experts' weights (norm_topk_prob)")
        need(set(windows) == {None} and set(ropes) == {"global"} and rope_type is None and c.attn_softcap is None
             and c.final_softcap is None and c.attn_scale_base in (None, c.head_size), "qwen3moe",
             "has no sliding window, soft-cap, query scale or RoPE scaling")
        return "qwen3moe"
    if c.pre_norms and c.post_norms:  # Gemma 2 / 3
        arch = "gemma3" if c.qk_norm is not None else "gemma2"
        need(plain and full_rope and c.norm_unit_offset and c.mlp_class == "geglu" and c.scale_embeddings
             and c.qk_norm in (None, "head"), arch, "is Gemma's block ((1 + w) norms, GeGLU, scaled embeddings)")
        big = {"gemma2": 46, "gemma3": 62}[arch]  # the 27B sizes, which llama.cpp knows by their layer count
        scale = c.n_embd / c.n_head if n == big else c.head_size
        need((c.attn_scale_base or c.head_size) == scale, arch,
             f"scales queries by {scale:g}**-0.5 for {n} layers, not by {c.attn_scale_base or c.head_size:g}**-0.5")
        step = {"gemma2": 2, "gemma3": 6}[arch]
        sliding = [(i + 1) % step != 0 for i in range(n)]
        need(c.sliding_window is not None and windows == [c.sliding_window if s else None for s in sliding], arch,
             f"slides on all layers but every {step}th")
        if arch == "gemma2":
            need(c.attn_softcap is not None and c.final_softcap is not None and rope_type is None
                 and c.rope_local_base is None, arch, "soft-caps attention and logits and has no RoPE scaling")
        else:
            need(c.attn_softcap is None and c.final_softcap is None and rope_type in (None, "linear")
                 and c.rope_local_base == 10000.0 and ropes == ["local" if s else "global" for s in sliding], arch,
                 "has no soft-caps, RoPE base 10000 on the sliding layers and at most linear scaling on the others")
        return arch
    if c.post_norms or not c.pre_norms:  # OLMo 2 / 3
        need(plain and full_rope and c.mlp_class == "swiglu" and not c.norm_unit_offset and not c.scale_embeddings
             and not c.pre_norms and c.qk_norm == "all", "olmo2",
             "is OLMo 2's block (norms after the sub-blocks only, q/k norms over the whole projection)")
        need(c.attn_softcap is None and c.final_softcap is None and c.attn_scale_base in (None, c.head_size)
             and rope_type in (None, "yarn"), "olmo2", "has no soft-caps, query scale, or RoPE scaling but YaRN")
        # OLMo 3: llama.cpp reads which layers slide from the file, and rotates them with the global base unscaled
        need(c.rope_local_base in (None, c.rope_base) and all(
            r == ("local" if c.rope_local_base is not None and w is not None else "global")
            for r, w in zip(ropes, windows)), "olmo2",
             "rotates the sliding layers with the global RoPE base, without scaling")
        return "olmo2"
    if c.nope_layers is not None:  # SmolLM3
        need(plain and full_rope and c.mlp_class == "swiglu" and not c.norm_unit_offset and not c.scale_embeddings
             and c.qk_norm is None and rope_type is None and c.attn_softcap is None and c.final_softcap is None
             and c.attn_scale_base in (None, c.head_size) and c.global_layers is None, "smollm3",
             "is Llama's block with RoPE skipped on some layers")
        need(ropes == [None if (i + 1) % 4 == 0 else "global" for i in range(n)], "smollm3",
             "skips RoPE on every 4th layer exactly")
        return "smollm3"
    if rope_type == "longrope" or (c.norm_class == "RMSNorm" and not full_rope and c.mlp_class == "swiglu"):
        need(plain and c.mlp_class == "swiglu" and not c.norm_unit_offset and not c.scale_embeddings
             and c.qk_norm is None and c.attn_softcap is None and c.final_softcap is None
             and c.global_layers is None and c.attn_scale_base in (None, c.head_size), "phi3",
             "(LongRoPE, partial RoPE) is Phi-3's block")
        return "phi3"
    return None
