"""Hugging Face <-> lora_lab: convert a `transformers` checkpoint folder into a lora_lab checkpoint, and back.

    convert_hf_checkpoint(hf_dir, out_dir)   config.json + model.safetensors / pytorch_model.bin (sharded or not)
                                             -> model_config.json + model.safetensors under our parameter names
    export_hf(checkpoint_dir, out_dir)       the reverse: a folder `AutoModelForCausalLM.from_pretrained` loads

Each supported architecture is a `Family`: one table that maps our module names to its module names (used in both
directions), the `transformers` defaults of the config.json fields we read (a config.json may leave them out), and
two small functions that translate config.json <-> `Config`. The fields and layouts were checked against the
transformers 5 modeling code of each class.

Some families fuse q, k and v into one matrix. GPT-NeoX and Falcon (`query_key_value`) interleave them by
key/value group, each group holding its queries, then its key, then its value head:
    (ng, nh / ng + 2, hs) rows
GPT-NeoX is the case ng = nh ([q, k, v] per head), Falcon-7B's multi-query the case ng = 1 ([all q, k, v]).
Phi-3 / 4 (`qkv_proj`) simply stack them, [all q; all k; all v], and fuse the MLP's gate and up projections the
same way (`gate_up_proj` = [gate; up]): the family's `fused_layout` says which ("grouped" or "stacked").

Mixture-of-experts checkpoints (Qwen3-MoE) store each expert's projections as tensors of their own
(`mlp.experts.{e}.gate_proj.weight`), as our model holds them; transformers 5 stacks them in memory only.

Weights are only read with safetensors or `torch.load(weights_only=True)`, one tensor at a time, so converting
holds the model in memory once.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lora_lab.checkpoint import copy_tokenizer_files, load_checkpoint, save_checkpoint
from lora_lab.config import Config
from lora_lab.progress import progress
from lora_lab.prompts import chat_template, prompt_style_from_chat_template  # noqa: F401 (re-exported)
from lora_lab.utils import LoraLabError, PathLike, atomic_path, atomic_write_text

# transformers writes the chat template to its own file since 4.43; keep it with the tokenizer files
EXTRA_TOKENIZER_FILES = ("chat_template.jinja",)
# buffers some checkpoints carry that are not weights (we compute them)
IGNORED_HF_TENSORS = re.compile(r"(rotary_emb\.inv_freq|\.attention\.bias|\.attention\.masked_bias)$")
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# image-text models whose text decoder is one of our families: config.json nests it in text_config and the weights
# sit under language_model.* (vision_tower.* and multi_modal_projector.* are dropped: lora_lab is text-only)
MULTIMODAL = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}
_LANGUAGE_MODEL_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                            ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))


# ------------------------------------------------------------------------------------------------------------
# Name tables: our module -> Hugging Face module ({i} is the layer index). A parameter keeps its suffix
# (.weight / .bias). "blocks.{i}.attn.qkv" stands for q_proj, k_proj and v_proj fused into one matrix.
# ------------------------------------------------------------------------------------------------------------
LLAMA_NAMES = {  # also Mistral, Qwen2, Gemma, StableLM and SmolLM3
    "wte": "model.embed_tokens",
    "blocks.{i}.norm_1": "model.layers.{i}.input_layernorm",
    "blocks.{i}.attn.q_proj": "model.layers.{i}.self_attn.q_proj",
    "blocks.{i}.attn.k_proj": "model.layers.{i}.self_attn.k_proj",
    "blocks.{i}.attn.v_proj": "model.layers.{i}.self_attn.v_proj",
    "blocks.{i}.attn.o_proj": "model.layers.{i}.self_attn.o_proj",
    "blocks.{i}.norm_2": "model.layers.{i}.post_attention_layernorm",
    "blocks.{i}.mlp.gate_proj": "model.layers.{i}.mlp.gate_proj",
    "blocks.{i}.mlp.up_proj": "model.layers.{i}.mlp.up_proj",
    "blocks.{i}.mlp.down_proj": "model.layers.{i}.mlp.down_proj",
    "norm_f": "model.norm",
    "lm_head": "lm_head",
}

QK_NORM_NAMES = {
    "blocks.{i}.attn.q_norm": "model.layers.{i}.self_attn.q_norm",
    "blocks.{i}.attn.k_norm": "model.layers.{i}.self_attn.k_norm",
}
QWEN3_NAMES = {**LLAMA_NAMES, **QK_NORM_NAMES}
QWEN3_MOE_NAMES = {
    **QWEN3_NAMES,  # (gate_proj, up_proj, down_proj of the dense layers a MoE model may have: mlp_only_layers)
    "blocks.{i}.mlp.router": "model.layers.{i}.mlp.gate",
    "blocks.{i}.mlp.experts.{e}.gate_proj": "model.layers.{i}.mlp.experts.{e}.gate_proj",
    "blocks.{i}.mlp.experts.{e}.up_proj": "model.layers.{i}.mlp.experts.{e}.up_proj",
    "blocks.{i}.mlp.experts.{e}.down_proj": "model.layers.{i}.mlp.experts.{e}.down_proj",
}
# Gemma 2 / 3: four norms per block; their "post_attention_layernorm" is a post-norm, not Llama's pre-MLP norm
GEMMA2_NAMES = {
    **LLAMA_NAMES,
    "blocks.{i}.norm_2": "model.layers.{i}.pre_feedforward_layernorm",
    "blocks.{i}.post_attn_norm": "model.layers.{i}.post_attention_layernorm",
    "blocks.{i}.post_mlp_norm": "model.layers.{i}.post_feedforward_layernorm",
}
GEMMA3_NAMES = {**GEMMA2_NAMES, **QK_NORM_NAMES}
# OLMo 2: only post-norms
OLMO2_NAMES = {k: v for k, v in QWEN3_NAMES.items() if k not in ("blocks.{i}.norm_1", "blocks.{i}.norm_2")}
OLMO2_NAMES.update({"blocks.{i}.post_attn_norm": "model.layers.{i}.post_attention_layernorm",
                    "blocks.{i}.post_mlp_norm": "model.layers.{i}.post_feedforward_layernorm"})
# Phi-3 / 4: q, k, v stacked in qkv_proj, gate and up stacked in gate_up_proj
PHI3_NAMES = {
    "wte": "model.embed_tokens",
    "blocks.{i}.norm_1": "model.layers.{i}.input_layernorm",
    "blocks.{i}.attn.qkv": "model.layers.{i}.self_attn.qkv_proj",
    "blocks.{i}.attn.o_proj": "model.layers.{i}.self_attn.o_proj",
    "blocks.{i}.norm_2": "model.layers.{i}.post_attention_layernorm",
    "blocks.{i}.mlp.gate_up": "model.layers.{i}.mlp.gate_up_proj",
    "blocks.{i}.mlp.down_proj": "model.layers.{i}.mlp.down_proj",
    "norm_f": "model.norm",
    "lm_head": "lm_head",
}

PHI_NAMES = {
    "wte": "model.embed_tokens",
    "blocks.{i}.norm_1": "model.layers.{i}.input_layernorm",  # Phi has one norm per block
    "blocks.{i}.attn.q_proj": "model.layers.{i}.self_attn.q_proj",
    "blocks.{i}.attn.k_proj": "model.layers.{i}.self_attn.k_proj",
    "blocks.{i}.attn.v_proj": "model.layers.{i}.self_attn.v_proj",
    "blocks.{i}.attn.o_proj": "model.layers.{i}.self_attn.dense",
    "blocks.{i}.mlp.up_proj": "model.layers.{i}.mlp.fc1",
    "blocks.{i}.mlp.down_proj": "model.layers.{i}.mlp.fc2",
    "norm_f": "model.final_layernorm",
    "lm_head": "lm_head",
}

GPT_NEOX_NAMES = {
    "wte": "gpt_neox.embed_in",
    "blocks.{i}.norm_1": "gpt_neox.layers.{i}.input_layernorm",
    "blocks.{i}.attn.qkv": "gpt_neox.layers.{i}.attention.query_key_value",
    "blocks.{i}.attn.o_proj": "gpt_neox.layers.{i}.attention.dense",
    "blocks.{i}.norm_2": "gpt_neox.layers.{i}.post_attention_layernorm",
    "blocks.{i}.mlp.up_proj": "gpt_neox.layers.{i}.mlp.dense_h_to_4h",
    "blocks.{i}.mlp.down_proj": "gpt_neox.layers.{i}.mlp.dense_4h_to_h",
    "norm_f": "gpt_neox.final_layer_norm",
    "lm_head": "embed_out",  # transformers 5 calls it lm_head in memory and embed_out in files
}

FALCON_NAMES = {
    "wte": "transformer.word_embeddings",
    "blocks.{i}.norm_1": "transformer.h.{i}.input_layernorm",
    "blocks.{i}.attn.qkv": "transformer.h.{i}.self_attention.query_key_value",
    "blocks.{i}.attn.o_proj": "transformer.h.{i}.self_attention.dense",
    "blocks.{i}.norm_2": "transformer.h.{i}.post_attention_layernorm",  # only in the sequential (non-parallel) block
    "blocks.{i}.mlp.up_proj": "transformer.h.{i}.mlp.dense_h_to_4h",
    "blocks.{i}.mlp.down_proj": "transformer.h.{i}.mlp.dense_4h_to_h",
    "norm_f": "transformer.ln_f",
    "lm_head": "lm_head",
}
# Falcon-40B style (new_decoder_architecture, two norms): each branch has its own norm
FALCON_TWO_NORM_NAMES = {**FALCON_NAMES, "blocks.{i}.norm_1": "transformer.h.{i}.ln_attn",
                         "blocks.{i}.norm_2": "transformer.h.{i}.ln_mlp"}


# ------------------------------------------------------------------------------------------------------------
# Families
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    architecture: str  # "LlamaForCausalLM"
    model_type: str  # "llama"
    names: dict[str, str]
    defaults: dict  # transformers' defaults for the config.json fields we read
    read: Callable[[dict], dict]  # config.json (defaults filled in) -> Config keyword arguments
    write: Callable[[Config], dict]  # Config -> config.json fields; LoraLabError when the family cannot express it
    aliases: dict = field(default_factory=dict)  # other names a file may use for a tensor -> our table's name
    fused_layout: str = "grouped"  # how a fused qkv matrix orders its rows: "grouped" (NeoX, Falcon) or "stacked"

    def names_for(self, config: Config) -> dict[str, str]:
        if self.architecture == "FalconForCausalLM" and config.parallel_residual and not config.shared_attention_norm:
            return FALCON_TWO_NORM_NAMES
        return self.names


class _CannotExpress(LoraLabError):
    """Raised by a family's `write` when a Config has a feature that family's architecture lacks."""


def _need(condition: bool, what: str) -> None:
    if not condition:
        raise _CannotExpress(what)


# ---- config.json -> Config ---------------------------------------------------------------------------------
def _mlp_from_act(act: str, gated: bool) -> dict:
    """transformers activation name -> our mlp_class / gelu_approximate."""
    tanh = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
    if act in ("silu", "swish") and gated:
        return dict(mlp_class="swiglu")
    if act == "gelu" or act in tanh:
        return dict(mlp_class="geglu" if gated else "gelu", gelu_approximate="tanh" if act in tanh else "none")
    raise LoraLabError(f"activation {act!r} is not supported (supported: silu for gated MLPs, gelu, gelu_new, "
                       f"gelu_pytorch_tanh)")


def _act_name(config: Config, tanh_name: str = "gelu_pytorch_tanh") -> str:
    if config.mlp_class == "swiglu":
        return "silu"
    return tanh_name if config.gelu_approximate == "tanh" else "gelu"


def _rope_from_hf(hf: dict, default_partial: float = 1.0, params: Optional[dict] = None,
                  default_theta: float = 10000.0) -> dict:
    """rope_base, rope_scaling and rotary_percentage from either transformers 5 `rope_parameters` (rope_theta
    inside) or the older top-level `rope_theta` + `rope_scaling` (+ GPT-NeoX's `rotary_emb_base`, `rotary_pct`).
    `params`: one layer type's entry of a per-layer-type rope_parameters (Gemma 3)."""
    if params is None:
        params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", default_theta)))
    partial = params.get("partial_rotary_factor",
                         hf.get("partial_rotary_factor", hf.get("rotary_pct", default_partial)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    original = params.get("original_max_position_embeddings",
                          hf.get("original_max_position_embeddings", hf["max_position_embeddings"]))
    scaling = None
    if rope_type == "llama3":
        scaling = dict(factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
                       high_freq_factor=float(params["high_freq_factor"]), original_max_seq_len=int(original))
    elif rope_type == "linear":
        scaling = dict(rope_type="linear", factor=float(params["factor"]))
    elif rope_type in ("longrope", "su"):  # Phi-3 / 4 ("su" is its first name)
        # transformers: factor = max_position_embeddings / original when not given, and the attention factor
        # sqrt(1 + ln(factor) / ln(original)) when not given (1 without scaling)
        factor = params.get("factor") or hf["max_position_embeddings"] / original
        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        scaling = dict(rope_type="longrope", short_factor=[float(f) for f in params["short_factor"]],
                       long_factor=[float(f) for f in params["long_factor"]], original_max_seq_len=int(original),
                       attention_factor=float(attention_factor))
    elif rope_type == "yarn":
        factor = float(params.get("factor") or hf["max_position_embeddings"] / original)
        attention_factor = params.get("attention_factor")
        if attention_factor is None:  # transformers' default: yarn_get_mscale
            def mscale(scale, m=1.0):
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
            m, m_all = params.get("mscale"), params.get("mscale_all_dim")
            attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        scaling = dict(rope_type="yarn", factor=factor, original_max_seq_len=int(original),
                       beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                       truncate=bool(params.get("truncate", True)), attention_factor=float(attention_factor))
    elif rope_type != "default":
        raise LoraLabError(f"rope type {rope_type!r} is not supported (supported: default, llama3, linear, "
                           f"longrope, yarn)")
    return dict(rope_base=float(theta), rope_scaling=scaling, rotary_percentage=float(partial))


def _layer_windows(hf: dict, window: Optional[int], types: Optional[list] = None) -> dict:
    """sliding_window and global_layers from transformers' per-layer `layer_types` ("sliding_attention" /
    "full_attention"); `window` None: no layer slides."""
    n = hf["num_hidden_layers"]
    types = types if types is not None else hf.get("layer_types")
    if window is None:
        return dict(sliding_window=None, global_layers=None)
    if not types:  # every layer slides
        return dict(sliding_window=int(window), global_layers=None)
    if len(types) != n:
        raise LoraLabError(f"layer_types has {len(types)} entries for {n} layers")
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise LoraLabError(f"layer types {sorted(unknown)} are not supported (sliding_attention, full_attention)")
    global_layers = [i for i, t in enumerate(types) if t == "full_attention"]
    if len(global_layers) == n:
        return dict(sliding_window=None, global_layers=None)
    return dict(sliding_window=int(window), global_layers=global_layers or None)


def _biases(qkv: bool, o: bool, mlp: bool) -> dict:
    """Our model has a bias on q/k/v (attn_qkv_bias) and one switch for o_proj and the MLP together (bias)."""
    if o != mlp:
        raise LoraLabError(f"bias on the attention output ({o}) but not the MLP ({mlp}) or the reverse is not "
                           f"supported")
    return dict(bias=o, attn_qkv_bias=qkv)


def _common(hf: dict, eps_key: str) -> dict:
    return dict(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_embd=hf["hidden_size"],
                n_head=hf["num_attention_heads"], block_size=hf["max_position_embeddings"],
                norm_eps=float(hf[eps_key]), tie_embeddings=bool(hf["tie_word_embeddings"]))


def _read_llama_like(hf: dict) -> dict:
    """Llama, Mistral, Qwen2, Gemma: RMSNorm, gated MLP, head_dim may differ from hidden_size / heads."""
    kw = _common(hf, "rms_norm_eps")
    kw.update(_rope_from_hf(hf), norm_class="RMSNorm", n_query_groups=hf["num_key_value_heads"],
              intermediate_size=hf["intermediate_size"], head_size=hf.get("head_dim"))
    return kw


def _read_llama(hf: dict) -> dict:
    kw = _read_llama_like(hf)
    kw.update(_mlp_from_act(hf["hidden_act"], gated=True))
    kw.update(_biases(qkv=hf["attention_bias"], o=hf["attention_bias"], mlp=hf["mlp_bias"]))
    return kw


def _read_mistral(hf: dict) -> dict:
    kw = _read_llama_like(hf)
    kw.update(_mlp_from_act(hf["hidden_act"], gated=True), sliding_window=hf["sliding_window"])
    return kw


def _qwen_windows(hf: dict) -> dict:
    # transformers: layer i slides when use_sliding_window and i >= max_window_layers (or as layer_types says)
    window = hf["sliding_window"] if hf["use_sliding_window"] else None
    types = hf.get("layer_types") or ["sliding_attention" if window is not None and i >= hf["max_window_layers"]
                                      else "full_attention" for i in range(hf["num_hidden_layers"])]
    return _layer_windows(hf, window, types)


def _read_qwen2(hf: dict) -> dict:
    kw = _read_llama_like(hf)
    kw.update(_mlp_from_act(hf["hidden_act"], gated=True), attn_qkv_bias=True, bias=False)  # Qwen2 hard-codes these
    kw.update(_qwen_windows(hf))
    return kw


def _attention_bias(hf: dict) -> dict:
    """Qwen3, Gemma 2 / 3, OLMo 2, SmolLM3: attention_bias on q, k, v and o; no bias in the MLP (SmolLM3: mlp_bias)."""
    return _biases(qkv=hf["attention_bias"], o=hf["attention_bias"], mlp=hf.get("mlp_bias", False))


def _read_qwen3(hf: dict) -> dict:
    kw = _read_llama_like(hf)
    kw.update(_mlp_from_act(hf["hidden_act"], gated=True), **_attention_bias(hf), **_qwen_windows(hf),
              qk_norm="head")
    return kw


def _read_qwen3_moe(hf: dict) -> dict:
    kw = _read_qwen3(hf)
    n = hf["num_hidden_layers"]
    # the Hub's files say num_experts; transformers 5 writes its alias num_local_experts
    n_expert = hf["num_experts"] if "num_experts" in hf else hf.get("num_local_experts", 128)
    # transformers: layer i is sparse unless in mlp_only_layers, when (i + 1) % decoder_sparse_step == 0
    moe = [i for i in range(n) if i not in (hf["mlp_only_layers"] or []) and n_expert > 0
           and (i + 1) % hf["decoder_sparse_step"] == 0]
    kw.update(n_expert=n_expert, n_expert_per_token=hf["num_experts_per_tok"],
              moe_intermediate_size=hf["moe_intermediate_size"], norm_topk_prob=bool(hf["norm_topk_prob"]),
              moe_layers=None if len(moe) == n else moe)
    if not moe:
        kw.update(n_expert=0, n_expert_per_token=0, moe_intermediate_size=None, moe_layers=None)
    return kw


def _gemma_mlp(hf: dict) -> dict:
    # transformers 5 reads Gemma's legacy hidden_act "gelu" as the tanh approximation, as Gemma was trained
    act = hf.get("hidden_activation") or hf["hidden_act"]
    return _mlp_from_act("gelu_pytorch_tanh" if act == "gelu" else act, gated=True)


def _read_gemma2(hf: dict) -> dict:
    if hf.get("use_bidirectional_attention"):
        raise LoraLabError("Gemma with use_bidirectional_attention (an embedding model) is not supported")
    kw = _read_llama_like(hf)
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % hf["sliding_window_pattern"] else
                                      "full_attention" for i in range(hf["num_hidden_layers"])]
    kw.update(_gemma_mlp(hf), **_attention_bias(hf), **_layer_windows(hf, hf["sliding_window"], types))
    kw.update(norm_unit_offset=True, scale_embeddings=True, post_norms=True,
              attn_scale_base=float(hf["query_pre_attn_scalar"]), attn_softcap=hf["attn_logit_softcapping"],
              final_softcap=hf["final_logit_softcapping"])
    return kw


def _rope_per_layer_type(hf: dict, global_theta: float, local_theta: float) -> dict:
    """Gemma 3, OLMo 3: rope_parameters per layer type (transformers 5), or rope_theta + rope_scaling for the
    global layers and rope_local_base_freq for the sliding ones -> our rope_* fields."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = _rope_from_hf(hf, params=params.get("full_attention") or {}, default_theta=global_theta)
        local = _rope_from_hf(hf, params=params.get("sliding_attention") or {}, default_theta=local_theta)
    else:
        full = _rope_from_hf({**hf, "rope_theta": hf.get("rope_theta", global_theta)})
        local = _rope_from_hf(hf, params={"rope_theta": hf.get("rope_local_base_freq", hf.get("rope_theta",
                                                                                               local_theta))})
    if local["rope_scaling"] is not None:
        raise LoraLabError("rope scaling on the sliding-window layers is not supported")
    return dict(full, rope_local_base=local["rope_base"])


def _read_gemma3(hf: dict) -> dict:
    kw = _read_gemma2(hf)
    kw.update(_rope_per_layer_type(hf, 1e6, 1e4), qk_norm="head")
    return kw


def _read_olmo3(hf: dict) -> dict:
    kw = _read_olmo2(hf)
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(n)]
    kw.update(_layer_windows(hf, hf["sliding_window"], types), **_rope_per_layer_type(hf, 10000.0, 10000.0))
    return kw


def _read_olmo2(hf: dict) -> dict:
    kw = _read_llama_like(hf)
    kw.update(_mlp_from_act(hf["hidden_act"], gated=True), **_attention_bias(hf), pre_norms=False, post_norms=True,
              qk_norm="all")
    return kw


def _read_smollm3(hf: dict) -> dict:
    kw = _read_llama_like(hf)
    n = hf["num_hidden_layers"]
    # no_rope_layers[i] == 1: layer i uses RoPE (sic); default: all but every no_rope_layer_interval-th
    uses_rope = hf.get("no_rope_layers") or [int((i + 1) % hf["no_rope_layer_interval"] != 0) for i in range(n)]
    nope = [i for i in range(n) if not uses_rope[i]]
    window = hf["sliding_window"] if hf["use_sliding_window"] else None
    types = hf.get("layer_types") or ["sliding_attention" if window is not None and not uses_rope[i]
                                      else "full_attention" for i in range(n)]
    kw.update(_mlp_from_act(hf["hidden_act"], gated=True), **_attention_bias(hf), **_layer_windows(hf, window, types),
              nope_layers=nope or None)
    return kw


def _read_gemma(hf: dict) -> dict:
    kw = _read_llama_like(hf)
    kw.update(_gemma_mlp(hf))
    kw.update(_biases(qkv=hf["attention_bias"], o=hf["attention_bias"], mlp=False))
    kw.update(norm_unit_offset=True, scale_embeddings=True)
    return kw


def _read_gpt_neox(hf: dict) -> dict:
    kw = _common(hf, "layer_norm_eps")
    kw.update(**_rope_from_hf(hf, default_partial=0.25), **_mlp_from_act(hf["hidden_act"], gated=False))
    kw.update(_biases(qkv=hf["attention_bias"], o=hf["attention_bias"], mlp=True))
    kw.update(norm_class="LayerNorm", intermediate_size=hf["intermediate_size"],
              parallel_residual=bool(hf["use_parallel_residual"]), shared_attention_norm=False)
    return kw


def _read_falcon(hf: dict) -> dict:
    if hf["alibi"]:
        raise LoraLabError("Falcon with ALiBi positions (alibi: true) is not supported, only rotary")
    kw = _common(hf, "layer_norm_epsilon")
    kw.update(**_rope_from_hf(hf), **_mlp_from_act(hf["activation"], gated=False))
    kw.update(norm_class="LayerNorm", intermediate_size=hf["ffn_hidden_size"] or 4 * hf["hidden_size"],
              bias=bool(hf["bias"]))
    n_head = hf["num_attention_heads"]
    if hf["new_decoder_architecture"]:  # Falcon-40B: grouped KV heads, always parallel, 2 norms unless told 1
        if not hf["parallel_attn"]:
            raise LoraLabError("Falcon with new_decoder_architecture and parallel_attn: false is not supported")
        n_ln = hf["num_ln_in_parallel_attn"] or 2
        kw.update(n_query_groups=hf["num_kv_heads"] or n_head, parallel_residual=True, shared_attention_norm=n_ln == 1)
    else:  # Falcon-7B: multi-query or multi-head; parallel branches share the one norm
        if hf["parallel_attn"] and hf["num_ln_in_parallel_attn"] == 2:
            raise LoraLabError("Falcon with two norms needs new_decoder_architecture: true")
        kw.update(n_query_groups=1 if hf["multi_query"] else n_head, parallel_residual=bool(hf["parallel_attn"]),
                  shared_attention_norm=bool(hf["parallel_attn"]))
    return kw


def _read_phi(hf: dict) -> dict:
    if hf["qk_layernorm"]:
        raise LoraLabError("Phi with qk_layernorm is not supported")
    kw = _common(hf, "layer_norm_eps")
    kw.update(**_rope_from_hf(hf, default_partial=0.5), **_mlp_from_act(hf["hidden_act"], gated=False))
    kw.update(norm_class="LayerNorm", n_query_groups=hf["num_key_value_heads"], head_size=hf.get("head_dim"),
              intermediate_size=hf["intermediate_size"], parallel_residual=True, shared_attention_norm=True,
              bias=True, lm_head_bias=True)
    return kw


def _read_stablelm(hf: dict) -> dict:
    if hf["qk_layernorm"]:
        raise LoraLabError("StableLM with qk_layernorm is not supported")
    kw = _common(hf, "layer_norm_eps")
    kw.update(**_rope_from_hf(hf, default_partial=0.25), **_mlp_from_act(hf["hidden_act"], gated=True))
    kw.update(norm_class="LayerNorm", n_query_groups=hf["num_key_value_heads"],
              intermediate_size=hf["intermediate_size"], bias=False, attn_qkv_bias=bool(hf["use_qkv_bias"]),
              parallel_residual=bool(hf["use_parallel_residual"]),
              shared_attention_norm=bool(hf["use_parallel_residual"]))
    return kw


# ---- Config -> config.json ---------------------------------------------------------------------------------
def _rope_params(config: Config) -> dict:
    """transformers 5 rope_parameters for our rope_base and rope_scaling."""
    params = {"rope_type": "default", "rope_theta": config.rope_base}
    s = config.rope_scaling
    kind = None if s is None else s.get("rope_type", "llama3")
    if kind == "llama3":
        params.update(rope_type="llama3", factor=s["factor"], low_freq_factor=s["low_freq_factor"],
                      high_freq_factor=s["high_freq_factor"], original_max_position_embeddings=s["original_max_seq_len"])
    elif kind == "linear":
        params.update(rope_type="linear", factor=s["factor"])
    elif kind == "yarn":
        params.update(rope_type="yarn", factor=s["factor"], original_max_position_embeddings=s["original_max_seq_len"],
                      beta_fast=s["beta_fast"], beta_slow=s["beta_slow"], truncate=s["truncate"],
                      attention_factor=s["attention_factor"])
    elif kind == "longrope":
        params.update(rope_type="longrope", short_factor=s["short_factor"], long_factor=s["long_factor"],
                      original_max_position_embeddings=s["original_max_seq_len"],
                      attention_factor=s["attention_factor"])
    return params


def _rope_to_hf(config: Config, partial: bool = False) -> dict:
    """transformers 5 `rope_parameters`, plus the older top-level keys so other tools (transformers 4,
    llama.cpp, vLLM) read the same values."""
    params = _rope_params(config)
    out = {"rope_theta": config.rope_base}
    if partial:
        params["partial_rotary_factor"] = out["partial_rotary_factor"] = config.rotary_percentage
    else:
        _need(config.rotary_percentage == 1.0, "partial rotary embeddings")
    if config.rope_scaling is not None:
        out["rope_scaling"] = dict(params)
        if params["rope_type"] == "longrope":  # Phi-3 reads it at the top level
            out["original_max_position_embeddings"] = params["original_max_position_embeddings"]
    return dict(rope_parameters=params, **out)


# The switches of the 2024-25 families; a family's writer names the ones its architecture has
NEW_FEATURES = {
    "q/k norms": lambda c: c.qk_norm is not None,
    "norms after the sub-blocks": lambda c: c.post_norms,
    "blocks without pre-norms": lambda c: not c.pre_norms,
    "a query scale": lambda c: c.attn_scale_base is not None,
    "attention soft-capping": lambda c: c.attn_softcap is not None,
    "logit soft-capping": lambda c: c.final_softcap is not None,
    "sliding and global layers": lambda c: c.global_layers is not None,
    "a local RoPE base": lambda c: c.rope_local_base is not None,
    "layers without RoPE": lambda c: c.nope_layers is not None,
    "mixture of experts": lambda c: c.n_expert > 0,
    "linear rope scaling": lambda c: (c.rope_scaling or {}).get("rope_type") == "linear",
    "LongRoPE": lambda c: (c.rope_scaling or {}).get("rope_type") == "longrope",
    "YaRN": lambda c: (c.rope_scaling or {}).get("rope_type") == "yarn",
}


def _only(config: Config, *allowed: str) -> None:
    for what, present in NEW_FEATURES.items():
        if what not in allowed:
            _need(not present(config), what)


def _layer_types(config: Config) -> list[str]:
    return ["sliding_attention" if config.window_at(i) is not None else "full_attention"
            for i in range(config.n_layer)]


def _write_common(config: Config, eps_key: str, head_dim: bool = False, lm_head_bias: bool = False) -> dict:
    _need(config.lm_head_bias == lm_head_bias, "a bias on lm_head" if config.lm_head_bias else "lm_head without bias")
    if not head_dim:
        _need(config.head_size * config.n_head == config.n_embd, "head_size != n_embd / n_head")
    out = dict(vocab_size=config.vocab_size, hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
               num_attention_heads=config.n_head, max_position_embeddings=config.block_size,
               tie_word_embeddings=config.tie_embeddings, **{eps_key: config.norm_eps})
    if head_dim:
        out["head_dim"] = config.head_size
    return out


def _write_llama_like(config: Config, *allowed: str) -> dict:
    _only(config, *allowed)
    _need(config.norm_class == "RMSNorm", "LayerNorm")
    _need(config.mlp_class != "gelu", "a non-gated GELU MLP")
    _need(not config.parallel_residual, "parallel residual blocks")
    out = _write_common(config, "rms_norm_eps", head_dim=True)
    out.update(_rope_to_hf(config), num_key_value_heads=config.n_query_groups,
               intermediate_size=config.intermediate_size, hidden_act=_act_name(config))
    return out


def _write_llama(config: Config) -> dict:
    _need(not config.norm_unit_offset and not config.scale_embeddings, "Gemma's norms and embedding scale")
    _need(config.sliding_window is None, "a sliding window")
    _need(config.attn_qkv_bias == config.bias, "a q/k/v bias without one on o_proj and the MLP")
    return dict(_write_llama_like(config), attention_bias=config.bias, mlp_bias=config.bias)


def _write_mistral(config: Config) -> dict:
    _need(not config.norm_unit_offset and not config.scale_embeddings, "Gemma's norms and embedding scale")
    _need(not config.bias and not config.attn_qkv_bias, "biases")
    return dict(_write_llama_like(config), sliding_window=config.sliding_window)


def _write_qwen2(config: Config) -> dict:
    _need(not config.norm_unit_offset and not config.scale_embeddings, "Gemma's norms and embedding scale")
    _need(config.attn_qkv_bias and not config.bias, "anything but a bias on q/k/v only")
    window = config.sliding_window
    return dict(_write_llama_like(config), use_sliding_window=window is not None, sliding_window=window,
                max_window_layers=0 if window is not None else config.n_layer,
                layer_types=[("sliding_attention" if window is not None else "full_attention")] * config.n_layer)


def _write_gemma(config: Config) -> dict:
    _need(config.norm_unit_offset and config.scale_embeddings, "plain RMSNorm or unscaled embeddings")
    _need(config.mlp_class == "geglu" and config.gelu_approximate == "tanh", "an MLP other than tanh-GeGLU")
    _need(config.sliding_window is None, "a sliding window")
    _need(not config.bias and not config.attn_qkv_bias, "biases")
    return dict(_write_llama_like(config), attention_bias=False)


def _write_qwen_windows(config: Config) -> dict:
    window = config.sliding_window
    return dict(use_sliding_window=window is not None, sliding_window=window,
                max_window_layers=0 if window is not None else config.n_layer, layer_types=_layer_types(config))


def _write_qwen3(config: Config, *more: str) -> dict:
    _need(config.qk_norm == "head", "no per-head q/k norms")
    _need(not config.norm_unit_offset and not config.scale_embeddings, "Gemma's norms and embedding scale")
    _need(not config.attn_qkv_bias and not config.bias, "biases")
    return dict(_write_llama_like(config, "q/k norms", "sliding and global layers", "YaRN", *more),
                attention_bias=False, **_write_qwen_windows(config))


def _write_qwen3_moe(config: Config) -> dict:
    _need(config.n_expert > 0, "no experts")
    out = _write_qwen3(config, "mixture of experts")
    moe = [i for i in range(config.n_layer) if config.moe_at(i)]
    out.update(num_experts=config.n_expert, num_experts_per_tok=config.n_expert_per_token,
               moe_intermediate_size=config.moe_intermediate_size, norm_topk_prob=config.norm_topk_prob,
               decoder_sparse_step=1, mlp_only_layers=[i for i in range(config.n_layer) if i not in moe])
    return out


def _write_gemma2(config: Config, *more: str) -> dict:
    _need(config.norm_unit_offset and config.scale_embeddings, "plain RMSNorm or unscaled embeddings")
    _need(config.mlp_class == "geglu" and config.gelu_approximate == "tanh", "an MLP other than tanh-GeGLU")
    _need(config.post_norms and config.pre_norms, "a block without both pre- and post-norms")
    _need(not config.bias and not config.attn_qkv_bias, "biases")
    out = _write_llama_like(config, "norms after the sub-blocks", "a query scale", "attention soft-capping",
                            "logit soft-capping", "sliding and global layers", *more)
    out.pop("hidden_act")
    # a sliding window of None: transformers' Gemma 2 has one on the sliding layers; make it cover the model
    window = config.sliding_window if config.sliding_window is not None else config.block_size
    out.update(hidden_activation="gelu_pytorch_tanh", attention_bias=False, sliding_window=window,
               layer_types=_layer_types(config),
               query_pre_attn_scalar=(config.attn_scale_base if config.attn_scale_base is not None
                                      else config.head_size),
               attn_logit_softcapping=config.attn_softcap, final_logit_softcapping=config.final_softcap)
    if isinstance(out["query_pre_attn_scalar"], float) and out["query_pre_attn_scalar"].is_integer():
        out["query_pre_attn_scalar"] = int(out["query_pre_attn_scalar"])
    return out


def _write_gemma3(config: Config) -> dict:
    _need(config.qk_norm == "head", "no per-head q/k norms")
    out = _write_gemma2(config, "q/k norms", "a local RoPE base", "linear rope scaling")
    local = config.rope_local_base if config.rope_local_base is not None else config.rope_base
    out["rope_parameters"] = {"full_attention": _rope_params(config),
                              "sliding_attention": {"rope_type": "default", "rope_theta": local}}
    out["rope_local_base_freq"] = local
    return out


def _write_phi3(config: Config) -> dict:
    _need(not config.norm_unit_offset and not config.scale_embeddings, "Gemma's norms and embedding scale")
    _need(not config.bias and not config.attn_qkv_bias, "biases")
    _need(config.mlp_class == "swiglu", f"a {config.mlp_class} MLP")
    _need(config.rotary_percentage == 1.0 or int(config.head_size * config.rotary_percentage) == config.rope_n_elem,
          "an odd number of rotary dims")
    # Phi-4-mini rotates 3/4 of each head: Phi-3's config takes partial_rotary_factor
    rotary = config.rotary_percentage
    config = replace(config, rotary_percentage=1.0)
    out = _write_llama_like(config, "LongRoPE")
    if rotary != 1.0:
        out["rope_parameters"]["partial_rotary_factor"] = out["partial_rotary_factor"] = rotary
    # transformers' default pad_token_id (32000) is an embedding row: None unless the source said (extra)
    out.update(sliding_window=config.sliding_window, pad_token_id=None)
    if config.rope_scaling is None:
        out["original_max_position_embeddings"] = config.block_size
    return out


def _write_olmo2(config: Config) -> dict:
    _need(config.qk_norm == "all", "no q/k norms over the whole projection")
    _need(not config.pre_norms and config.post_norms, "norms before the sub-blocks")
    _need(not config.norm_unit_offset and not config.scale_embeddings, "Gemma's norms and embedding scale")
    _need(not config.bias and not config.attn_qkv_bias, "biases")
    _need(config.sliding_window is None, "a sliding window")
    return dict(_write_llama_like(config, "q/k norms", "norms after the sub-blocks", "blocks without pre-norms"),
                attention_bias=False)


def _write_olmo3(config: Config) -> dict:
    _need(config.qk_norm == "all", "no q/k norms over the whole projection")
    _need(not config.pre_norms and config.post_norms, "norms before the sub-blocks")
    _need(not config.norm_unit_offset and not config.scale_embeddings, "Gemma's norms and embedding scale")
    _need(not config.bias and not config.attn_qkv_bias, "biases")
    out = _write_llama_like(config, "q/k norms", "norms after the sub-blocks", "blocks without pre-norms",
                            "sliding and global layers", "a local RoPE base", "YaRN", "linear rope scaling")
    local = config.rope_local_base if config.rope_local_base is not None else config.rope_base
    out.update(attention_bias=False, layer_types=_layer_types(config),
               sliding_window=config.sliding_window if config.sliding_window is not None else config.block_size,
               rope_parameters={"full_attention": _rope_params(config),
                                "sliding_attention": {"rope_type": "default", "rope_theta": local}})
    return out


def _write_smollm3(config: Config) -> dict:
    _need(not config.norm_unit_offset and not config.scale_embeddings, "Gemma's norms and embedding scale")
    _need(config.attn_qkv_bias == config.bias, "a q/k/v bias without one on o_proj and the MLP")
    nope = set(config.nope_layers or [])
    out = dict(_write_llama_like(config, "layers without RoPE", "sliding and global layers"),
               attention_bias=config.bias, mlp_bias=config.bias,
               no_rope_layers=[int(i not in nope) for i in range(config.n_layer)],
               use_sliding_window=config.sliding_window is not None, sliding_window=config.sliding_window,
               layer_types=_layer_types(config), pad_token_id=None)  # (the default, 128004, is an embedding row)
    return out


def _write_layernorm_family(config: Config, mlp_class: str) -> None:
    _only(config)
    _need(config.norm_class == "LayerNorm", "RMSNorm")
    _need(config.mlp_class == mlp_class, f"a {config.mlp_class} MLP")
    _need(config.sliding_window is None, "a sliding window")
    _need(not config.norm_unit_offset and not config.scale_embeddings, "Gemma's norms and embedding scale")


def _rotary_fits(config: Config) -> None:
    # transformers rotates int(head_dim * partial_rotary_factor) dims of each head, we an even number of them
    _need(int(config.head_size * config.rotary_percentage) == config.rope_n_elem, "an odd number of rotary dims")


def _write_gpt_neox(config: Config) -> dict:
    _write_layernorm_family(config, "gelu")
    _need(config.bias and config.attn_qkv_bias, "linear layers without bias")
    _need(config.n_query_groups == config.n_head, "grouped-query attention")
    _need(not (config.parallel_residual and config.shared_attention_norm), "one norm shared by both branches")
    _rotary_fits(config)
    return dict(_write_common(config, "layer_norm_eps"), **_rope_to_hf(config, partial=True),
                rotary_pct=config.rotary_percentage, intermediate_size=config.intermediate_size,
                hidden_act=_act_name(config, "gelu_new"), use_parallel_residual=config.parallel_residual,
                attention_bias=True)


def _write_falcon(config: Config) -> dict:
    _write_layernorm_family(config, "gelu")
    _need(config.attn_qkv_bias == config.bias, "a q/k/v bias without one on the other linear layers")
    nh, ng = config.n_head, config.n_query_groups
    # Falcon-7B's architecture has multi-query (ng = 1) or multi-head (ng = nh) attention with one shared norm or
    # a sequential block; anything else needs Falcon-40B's new_decoder_architecture (always parallel). Keep the
    # source's choice when it still fits.
    fits_old = ng in (1, nh) and (config.shared_attention_norm or not config.parallel_residual)
    new_arch = config.extra.get("hf_new_decoder_architecture") or not fits_old
    if new_arch:
        _need(config.parallel_residual, "a sequential block with grouped-query attention")
    out = dict(_write_common(config, "layer_norm_epsilon"), **_rope_to_hf(config), alibi=False, bias=config.bias,
               ffn_hidden_size=config.intermediate_size, activation=_act_name(config, "gelu_new"),
               new_decoder_architecture=new_arch, parallel_attn=config.parallel_residual)
    if new_arch:
        out.update(num_kv_heads=ng, num_ln_in_parallel_attn=1 if config.shared_attention_norm else 2,
                   multi_query=ng == 1)
    else:
        out.update(num_kv_heads=ng, multi_query=ng == 1, num_ln_in_parallel_attn=None)
    return out


def _write_phi(config: Config) -> dict:
    _write_layernorm_family(config, "gelu")
    _need(config.parallel_residual and config.shared_attention_norm, "anything but a parallel block with one norm")
    _need(config.bias and config.attn_qkv_bias, "linear layers without bias")
    _rotary_fits(config)
    return dict(_write_common(config, "layer_norm_eps", lm_head_bias=True), **_rope_to_hf(config, partial=True),
                num_key_value_heads=config.n_query_groups, intermediate_size=config.intermediate_size,
                hidden_act=_act_name(config, "gelu_new"), qk_layernorm=False)


def _write_stablelm(config: Config) -> dict:
    _write_layernorm_family(config, "swiglu")
    _need(not config.bias, "a bias on o_proj and the MLP")
    _need(config.shared_attention_norm or not config.parallel_residual, "a parallel block with two norms")
    _rotary_fits(config)
    return dict(_write_common(config, "layer_norm_eps"), **_rope_to_hf(config, partial=True),
                num_key_value_heads=config.n_query_groups, intermediate_size=config.intermediate_size,
                hidden_act="silu", use_qkv_bias=config.attn_qkv_bias, qk_layernorm=False,
                use_parallel_residual=config.parallel_residual)


# transformers' class defaults of the fields each `read` uses (a config.json may omit a field at its default)
_LLAMA_DEFAULTS = dict(max_position_embeddings=2048, rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False,
                       attention_bias=False, mlp_bias=False, intermediate_size=11008, num_key_value_heads=None)
_QWEN3_DEFAULTS = dict(_LLAMA_DEFAULTS, max_position_embeddings=32768, intermediate_size=22016,
                       num_key_value_heads=32, head_dim=128, use_sliding_window=False, sliding_window=4096,
                       max_window_layers=28, layer_types=None)
_GEMMA2_DEFAULTS = dict(_LLAMA_DEFAULTS, vocab_size=256000, max_position_embeddings=8192, intermediate_size=9216,
                        num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                        tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096)
FAMILIES: dict[str, Family] = {f.architecture: f for f in [
    Family("LlamaForCausalLM", "llama", LLAMA_NAMES, _LLAMA_DEFAULTS, _read_llama, _write_llama),
    Family("MistralForCausalLM", "mistral", LLAMA_NAMES,
           dict(_LLAMA_DEFAULTS, max_position_embeddings=4096 * 32, intermediate_size=14336, num_key_value_heads=8,
                sliding_window=4096), _read_mistral, _write_mistral),
    Family("Qwen2ForCausalLM", "qwen2", LLAMA_NAMES,
           dict(_LLAMA_DEFAULTS, max_position_embeddings=32768, intermediate_size=22016, num_key_value_heads=32,
                use_sliding_window=False, sliding_window=4096, max_window_layers=28), _read_qwen2, _write_qwen2),
    Family("GemmaForCausalLM", "gemma", LLAMA_NAMES,
           dict(_LLAMA_DEFAULTS, max_position_embeddings=8192, intermediate_size=24576, num_key_value_heads=16,
                head_dim=256, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True), _read_gemma, _write_gemma),
    Family("GPTNeoXForCausalLM", "gpt_neox", GPT_NEOX_NAMES,
           dict(max_position_embeddings=2048, layer_norm_eps=1e-5, hidden_act="gelu", tie_word_embeddings=False,
                use_parallel_residual=True, attention_bias=True, intermediate_size=24576),
           _read_gpt_neox, _write_gpt_neox, aliases={"lm_head": "embed_out"}),
    Family("FalconForCausalLM", "falcon", FALCON_NAMES,
           dict(max_position_embeddings=2048, layer_norm_epsilon=1e-5, activation="gelu", tie_word_embeddings=True,
                bias=False, alibi=False, multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                num_ln_in_parallel_attn=None, num_kv_heads=None, ffn_hidden_size=None), _read_falcon, _write_falcon),
    Family("PhiForCausalLM", "phi", PHI_NAMES,
           dict(max_position_embeddings=2048, layer_norm_eps=1e-5, hidden_act="gelu_new", tie_word_embeddings=False,
                intermediate_size=8192, num_key_value_heads=None, qk_layernorm=False), _read_phi, _write_phi),
    Family("StableLmForCausalLM", "stablelm", LLAMA_NAMES,
           dict(max_position_embeddings=4096, layer_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
                intermediate_size=6912, num_key_value_heads=32, use_qkv_bias=False, qk_layernorm=False,
                use_parallel_residual=False), _read_stablelm, _write_stablelm),
    Family("Qwen3ForCausalLM", "qwen3", QWEN3_NAMES, _QWEN3_DEFAULTS, _read_qwen3, _write_qwen3),
    Family("Qwen3MoeForCausalLM", "qwen3_moe", QWEN3_MOE_NAMES,
           dict(_QWEN3_DEFAULTS, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
                num_attention_heads=32, num_key_value_heads=4, head_dim=None, decoder_sparse_step=1,
                moe_intermediate_size=768, num_experts_per_tok=8, norm_topk_prob=False,
                mlp_only_layers=None), _read_qwen3_moe, _write_qwen3_moe),
    Family("Gemma2ForCausalLM", "gemma2", GEMMA2_NAMES,
           dict(_GEMMA2_DEFAULTS, sliding_window_pattern=2, attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0), _read_gemma2, _write_gemma2),
    Family("Gemma3ForCausalLM", "gemma3_text", GEMMA3_NAMES,
           dict(_GEMMA2_DEFAULTS, vocab_size=262208, max_position_embeddings=131072, sliding_window_pattern=6,
                attn_logit_softcapping=None, final_logit_softcapping=None), _read_gemma3, _write_gemma3),
    Family("Phi3ForCausalLM", "phi3", PHI3_NAMES,
           dict(_LLAMA_DEFAULTS, max_position_embeddings=4096, rms_norm_eps=1e-5, intermediate_size=8192,
                sliding_window=None), _read_mistral, _write_phi3,  # (its config reads as Mistral's)
           fused_layout="stacked"),
    Family("Olmo2ForCausalLM", "olmo2", OLMO2_NAMES, dict(_LLAMA_DEFAULTS, rms_norm_eps=1e-5),
           _read_olmo2, _write_olmo2),
    Family("Olmo3ForCausalLM", "olmo3", OLMO2_NAMES,
           dict(_LLAMA_DEFAULTS, rms_norm_eps=1e-5, sliding_window=4096, layer_types=None), _read_olmo3, _write_olmo3),
    Family("SmolLM3ForCausalLM", "smollm3", LLAMA_NAMES,
           dict(_LLAMA_DEFAULTS, max_position_embeddings=32768, intermediate_size=11008, tie_word_embeddings=True,
                use_sliding_window=False, sliding_window=None, no_rope_layers=None, no_rope_layer_interval=4),
           _read_smollm3, _write_smollm3),
]}
# the order in which export tries the families for a config that does not say where it came from
EXPORT_ORDER = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GemmaForCausalLM",
                "StableLmForCausalLM", "PhiForCausalLM", "GPTNeoXForCausalLM", "FalconForCausalLM",
                "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
                "Phi3ForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM", "SmolLM3ForCausalLM"]
_MODEL_TYPES = {f.model_type: f.architecture for f in FAMILIES.values()}


# ------------------------------------------------------------------------------------------------------------
# config.json -> Config
# ------------------------------------------------------------------------------------------------------------
def _architecture(hf_config: dict) -> str:
    archs = hf_config.get("architectures") or []
    arch = archs[0] if archs else _MODEL_TYPES.get(hf_config.get("model_type"), hf_config.get("model_type"))
    if arch not in FAMILIES:
        raise LoraLabError(f"architecture {arch!r} is not supported; supported: {', '.join(FAMILIES)}")
    return arch


def text_config_of(hf_config: dict) -> dict:
    """An image-text model's config.json (Gemma3ForConditionalGeneration) -> its text decoder's, as the text-only
    architecture's config.json would have it (token ids and tying from the top level where the text part lacks
    them)."""
    arch = hf_config["architectures"][0]
    text = dict(hf_config.get("text_config") or {})
    if not text:
        raise LoraLabError(f"a {arch} config.json without text_config: download the model's config.json again")
    family = FAMILIES[MULTIMODAL[arch]]
    text.update(architectures=[family.architecture], model_type=family.model_type)
    for key in (*TOKEN_ID_KEYS, "tie_word_embeddings"):
        if text.get(key) is None and hf_config.get(key) is not None:
            text[key] = hf_config[key]
    return text


def language_model_name(hf_name: str) -> Optional[str]:
    """An image-text model's tensor name -> the text-only model's (`language_model.model.layers.0...` ->
    `model.layers.0...`), None for the vision tower and projector."""
    for prefix, to in _LANGUAGE_MODEL_PREFIXES:
        if hf_name.startswith(prefix):
            return to + hf_name[len(prefix):]
    return None


def config_from_hf(hf_config: dict, name: str = "", chat_template: Optional[str] = None) -> Config:
    """Our `Config` for a Hugging Face config.json dict (`chat_template` sets prompt_style when given).

    Raises LoraLabError for an architecture or a feature we do not support (without naming the file: callers
    that read one add its name)."""
    multimodal = (hf_config.get("architectures") or [None])[0]
    if multimodal in MULTIMODAL:
        hf_config = text_config_of(hf_config)
    family = FAMILIES[_architecture(hf_config)]
    hf = {**family.defaults, **hf_config}
    if "hidden_size" not in hf and "n_embed" in hf:  # Falcon's old name for it
        hf["hidden_size"] = hf["n_embed"]
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(hf.get(key), int):
            raise LoraLabError(f"{key} is missing from the config")
    if hf.get("num_key_value_heads") is None:
        hf["num_key_value_heads"] = hf["num_attention_heads"]
    try:
        kw = family.read(hf)
    except KeyError as e:
        raise LoraLabError(f"{e.args[0]} is missing from the config") from None
    extra = {"hf_architecture": family.architecture}
    if multimodal in MULTIMODAL:
        extra["hf_multimodal_architecture"] = multimodal  # converted text-only
    extra.update({k: hf_config[k] for k in TOKEN_ID_KEYS if hf_config.get(k) is not None})
    if family.architecture == "FalconForCausalLM":
        extra["hf_new_decoder_architecture"] = bool(hf["new_decoder_architecture"])
    try:
        config = Config(name=name, prompt_style=prompt_style_from_chat_template(chat_template), extra=extra, **kw)
        config.hf_repo = config.hf_repo or config.known_hf_repo()  # a folder named like one of ours: its Hub id
        return config
    except (ValueError, TypeError) as e:
        raise LoraLabError(f"the config does not describe a valid model ({e})") from None


# ------------------------------------------------------------------------------------------------------------
# The name map: every parameter of our model <-> (Hugging Face tensor, which part of it)
# ------------------------------------------------------------------------------------------------------------
def expected_shapes(config: Config) -> dict[str, torch.Size]:
    """Parameter name -> shape of our model for `config` (built on the meta device: no memory, no time)."""
    from lora_lab.model import GPT

    with torch.device("meta"):
        model = GPT(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        shapes.pop("lm_head.weight")  # the same tensor as wte.weight
    return shapes


# our fused-layer names in the tables -> the layers they stand for and the part each is, in row order
FUSED_PARTS = {
    "blocks.{i}.attn.qkv": {"blocks.{i}.attn.q_proj": "q", "blocks.{i}.attn.k_proj": "k",
                            "blocks.{i}.attn.v_proj": "v"},
    "blocks.{i}.mlp.gate_up": {"blocks.{i}.mlp.gate_proj": "gate", "blocks.{i}.mlp.up_proj": "up"},
}


def module_template(module: str) -> tuple[str, Optional[str], Optional[str]]:
    """"blocks.3.mlp.experts.5.up_proj" -> ("blocks.{i}.mlp.experts.{e}.up_proj", "3", "5"); "lm_head" ->
    ("lm_head", None, None)."""
    m = re.match(r"blocks\.(\d+)\.(.+)$", module)
    if not m:
        return module, None, None
    rest, e = m.group(2), None
    x = re.match(r"(.*\bexperts)\.(\d+)\.(.+)$", rest)
    if x:
        rest, e = f"{x.group(1)}.{{e}}.{x.group(3)}", x.group(2)
    return f"blocks.{{i}}.{rest}", m.group(1), e


def fused_part(template: str, names: dict) -> tuple[str, Optional[str]]:
    """(the table's template, part): ("blocks.{i}.attn.qkv", "q") for our q_proj when the family fuses q/k/v."""
    if template not in names:
        for fused, parts in FUSED_PARTS.items():
            if template in parts and fused in names:
                return fused, parts[template]
    return template, None


def name_map(config: Config, family: Family) -> dict[str, tuple[str, Optional[str]]]:
    """Our parameter name -> (HF tensor name, part) where part is "q"/"k"/"v" of a fused q/k/v layer or
    "gate"/"up" of a fused gate_up layer, else None."""
    names = family.names_for(config)
    out = {}
    for key in expected_shapes(config):
        module, suffix = key.rsplit(".", 1)  # "blocks.3.attn.q_proj", "weight"
        template, i, e = module_template(module)
        template, part = fused_part(template, names)
        if template not in names:
            raise LoraLabError(f"{family.architecture} has no tensor for our {key}: this config cannot be "
                               f"converted to or from it")
        out[key] = (f"{names[template].format(i=i, e=e)}.{suffix}", part)
    return out


def split_fused(fused: torch.Tensor, config: Config, family: Family, part: str) -> dict[str, torch.Tensor]:
    """A fused layer's weight or bias -> its parts ({"q", "k", "v"} or {"gate", "up"}); `part` is any one of them."""
    if part in ("gate", "up"):
        gate, up = fused.chunk(2, dim=0)
        return {"gate": gate, "up": up}
    if family.fused_layout == "grouped":
        return split_qkv(fused, config)
    q, k, v = fused.split([config.n_head * config.head_size] + [config.n_query_groups * config.head_size] * 2)
    return {"q": q, "k": k, "v": v}


def fuse(parts: dict[str, torch.Tensor], config: Config, family: Family) -> torch.Tensor:
    """The inverse of `split_fused`."""
    if "gate" in parts:
        return torch.cat((parts["gate"], parts["up"]))
    if family.fused_layout == "grouped":
        return fuse_qkv(parts["q"], parts["k"], parts["v"], config)
    return torch.cat((parts["q"], parts["k"], parts["v"]))


def split_qkv(fused: torch.Tensor, config: Config) -> dict[str, torch.Tensor]:
    """query_key_value rows laid out (ng, nh/ng + 2, hs) -> q (nh*hs), k (ng*hs), v (ng*hs) rows."""
    nh, ng, hs = config.n_head, config.n_query_groups, config.head_size
    rest = fused.shape[1:]  # (C,) for a weight, () for a bias
    grouped = fused.reshape(ng, nh // ng + 2, hs, *rest)
    return {"q": grouped[:, :-2].reshape(nh * hs, *rest),
            "k": grouped[:, -2].reshape(ng * hs, *rest),
            "v": grouped[:, -1].reshape(ng * hs, *rest)}


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: Config) -> torch.Tensor:
    """The inverse of `split_qkv`."""
    nh, ng, hs = config.n_head, config.n_query_groups, config.head_size
    rest = q.shape[1:]
    grouped = torch.cat((q.reshape(ng, nh // ng, hs, *rest), k.reshape(ng, 1, hs, *rest),
                         v.reshape(ng, 1, hs, *rest)), dim=1)  # (ng, nh/ng + 2, hs, *rest)
    return grouped.reshape((nh + 2 * ng) * hs, *rest)


# ------------------------------------------------------------------------------------------------------------
# Hugging Face folder -> lora_lab checkpoint
# ------------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoraLabError(f"{path} is not valid JSON ({e}): download it again") from None


def hf_weight_files(hf_dir: Path) -> list[Path]:
    """The weight files of a Hugging Face folder, safetensors preferred over pytorch_model.bin."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (hf_dir / single).is_file():
            return [hf_dir / single]
        if (hf_dir / index).is_file():
            weight_map = _read_json(hf_dir / index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise LoraLabError(f"{hf_dir / index} has no weight_map: download the model again")
            files = [hf_dir / f for f in dict.fromkeys(weight_map.values())]  # in order, without repeats
            for f in files:
                if not f.is_file():
                    raise LoraLabError(f"{f} (a shard listed in {index}) is missing: download the model again")
            return files
    raise LoraLabError(f"{hf_dir} has no weights: expected model.safetensors, model.safetensors.index.json, "
                       f"pytorch_model.bin or pytorch_model.bin.index.json; download the model's weights into it")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def iter_hf_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of one weight file, one tensor at a time (safetensors) or memory-mapped (.bin)."""
    corrupt = f"{path} is truncated or corrupt"
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise LoraLabError(f"{corrupt} ({_first_line(e)}): download it again") from None
        return
    try:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state_dict = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (pre-zip) format
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise LoraLabError(f"{corrupt} or not a weights-only PyTorch file ({_first_line(e)}): "
                           f"download it again") from None
    if not isinstance(state_dict, dict):
        raise LoraLabError(f"{path} does not hold a state dict: download it again")
    for name in list(state_dict):
        tensor = state_dict.pop(name)
        if not isinstance(tensor, torch.Tensor):
            raise LoraLabError(f"{path}: {name} is not a tensor: download it again")
        yield name, tensor


def _as_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise LoraLabError(f"dtype {dtype!r} is not a floating point torch dtype (e.g. float32, bfloat16, float16)")
    return value


def _cast(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def load_hf_config(hf_dir: PathLike) -> Config:
    """Our Config for a Hugging Face folder (config.json, and the chat template for prompt_style)."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise LoraLabError(f"{hf_dir} does not exist: download the model first (e.g. `python -m lora_lab.download "
                           f"REPO_ID`)")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise LoraLabError(f"{hf_dir} has no config.json: it is not a Hugging Face model folder; download the "
                           f"model's config.json into it")
    try:
        return config_from_hf(_read_json(path), name=hf_dir.resolve().name, chat_template=chat_template(hf_dir))
    except LoraLabError as e:
        if str(e).startswith(str(path)):
            raise
        raise LoraLabError(f"{path}: {e}") from None


def _tensor_count(path: Path) -> Optional[int]:
    """How many tensors a safetensors file holds (for the progress bar); None for other formats."""
    if path.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return len(list(f.keys()))
    except Exception:  # noqa: BLE001 - iter_hf_tensors reports an unreadable file in one line
        return None


def convert_hf_checkpoint(hf_dir: PathLike, out_dir: PathLike, dtype: Union[str, torch.dtype, None] = None,
                          hf_repo: str = "") -> Config:
    """Convert a Hugging Face model folder into a lora_lab checkpoint in `out_dir`; returns its Config.

    Weights keep their dtype unless `dtype` is given. Every tensor of the source must find its place (rotary
    inv_freq and attention-mask buffers excepted), and every weight of our model must be found.
    `out_dir` may be `hf_dir` itself (lora_lab.download does that): all weights are read before our
    model.safetensors replaces a source file of that name."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config = load_hf_config(hf_dir)
    family = FAMILIES[config.extra["hf_architecture"]]
    dtype = _as_dtype(dtype)
    shapes = expected_shapes(config)
    plan = name_map(config, family)  # ours -> (hf, part)
    targets: dict[str, list[tuple[str, Optional[str]]]] = {}  # hf -> [(ours, part)]
    for ours, (hf_name, part) in plan.items():
        targets.setdefault(hf_name, []).append((ours, part))
    aliases = {f"{a}.{s}": f"{b}.{s}" for a, b in family.aliases.items() for s in ("weight", "bias")}
    tied_head = {f"{family.names['lm_head']}.weight", "lm_head.weight"} if config.tie_embeddings else set()
    config_path = hf_dir / "config.json"
    multimodal = config.extra.get("hf_multimodal_architecture")
    dropped = 0

    state_dict: dict[str, torch.Tensor] = {}
    for path in hf_weight_files(hf_dir):
        for hf_name, tensor in progress(iter_hf_tensors(path), total=_tensor_count(path), desc=f"Converting {path.name}",
                                        unit="tensor"):
            if multimodal:
                text_name = language_model_name(hf_name)
                if text_name is None:  # the vision tower and projector
                    dropped += 1
                    continue
                hf_name = text_name
            name = aliases.get(hf_name, hf_name)
            if name not in targets:
                if name in tied_head or IGNORED_HF_TENSORS.search(name):
                    continue  # a copy of the tied embedding, or a buffer we compute
                raise LoraLabError(f"{path.name} holds {hf_name}, which has no place in the model {config_path} "
                                   f"describes: fix config.json (e.g. tie_word_embeddings, layer count, biases) "
                                   f"or download the model again")
            parts = targets[name]
            expected = ((sum(shapes[ours][0] for ours, _ in parts), *shapes[parts[0][0]][1:]) if parts[0][1]
                        else tuple(shapes[parts[0][0]]))
            if tuple(tensor.shape) != expected:
                raise LoraLabError(f"{config_path} does not fit the weights: {hf_name} in {path.name} has shape "
                                   f"{tuple(tensor.shape)} but config.json implies {expected}; fix config.json "
                                   f"or download the model again")
            # q, k, v as tensors of their own, so the fused one is freed (and never saved as shared memory)
            pieces = ({k: v.clone() for k, v in split_fused(tensor, config, family, parts[0][1]).items()}
                      if parts[0][1] else None)
            for ours, part in parts:
                state_dict[ours] = _cast(pieces[part] if part else tensor, dtype)
    missing = [plan[k][0] for k in shapes if k not in state_dict]
    if missing:
        raise LoraLabError(f"{hf_dir}: the weight files lack {len(missing)} tensors that {config_path.name} "
                           f"implies (e.g. {', '.join(dict.fromkeys(missing[:3]))}): download the model again")
    config.hf_repo = hf_repo or config.hf_repo  # (the Hub id it was downloaded from: PEFT exports record it)
    if multimodal:
        print(f"note: {hf_dir.name} is a {multimodal}: its text model is converted ({family.architecture}), the "
              f"vision tower and projector ({dropped} tensors) are dropped", file=sys.stderr)
    save_checkpoint(out_dir, config, state_dict, tokenizer_dir=hf_dir)
    _copy_extra_tokenizer_files(hf_dir, out_dir)
    return config


def _copy_extra_tokenizer_files(src: Path, dst: Path) -> None:
    for name in EXTRA_TOKENIZER_FILES:
        if (src / name).is_file() and src.resolve() != dst.resolve():
            with atomic_path(dst / name) as tmp:
                shutil.copyfile(src / name, tmp)


# ------------------------------------------------------------------------------------------------------------
# lora_lab checkpoint -> Hugging Face folder
# ------------------------------------------------------------------------------------------------------------
def hf_family_for(config: Config) -> tuple[Family, dict]:
    """The family to export `config` as (the one it came from, else the first that can express it) and the
    config.json fields it gives."""
    arch = config.extra.get("hf_architecture")
    if arch is not None:
        if arch not in FAMILIES:
            raise LoraLabError(f"the config's extra.hf_architecture {arch!r} is not supported; supported: "
                               f"{', '.join(FAMILIES)}")
        try:
            return FAMILIES[arch], FAMILIES[arch].write(config)
        except _CannotExpress as e:
            raise LoraLabError(f"the config no longer fits {arch} ({e} is not part of it): set "
                               f"extra.hf_architecture to another architecture or remove it") from None
    reasons = []
    for arch in EXPORT_ORDER:
        try:
            return FAMILIES[arch], FAMILIES[arch].write(config)
        except _CannotExpress as e:
            reasons.append(f"{arch}: {e}")
    raise LoraLabError(f"no Hugging Face architecture can express this config ({'; '.join(reasons)})")


def export_hf_state_dict(config: Config, state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our config and weights -> (config.json dict, state dict under the Hugging Face names)."""
    family, fields_ = hf_family_for(config)
    shapes = expected_shapes(config)
    state_dict = {k: v for k, v in state_dict.items() if not (config.tie_embeddings and k == "lm_head.weight")}
    missing = [k for k in shapes if k not in state_dict]
    unexpected = [k for k in state_dict if k not in shapes]
    if missing or unexpected:
        raise LoraLabError(f"the weights do not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]} "
                           f"(merge LoRA weights before exporting)")
    for k, shape in shapes.items():
        if state_dict[k].shape != shape:
            raise LoraLabError(f"the weights do not fit the config: {k} has shape {tuple(state_dict[k].shape)}, "
                               f"the config implies {tuple(shape)}")
    hf_state_dict: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for ours, (hf_name, part) in name_map(config, family).items():
        if part is None:
            hf_state_dict[hf_name] = state_dict[ours]
        else:
            fused.setdefault(hf_name, {})[part] = state_dict[ours]
    for hf_name, parts in fused.items():
        hf_state_dict[hf_name] = fuse(parts, config, family)
    dtype = state_dict["wte.weight"].dtype
    hf_config = {"architectures": [family.architecture], "model_type": family.model_type, **fields_,
                 **{k: config.extra[k] for k in TOKEN_ID_KEYS if k in config.extra},
                 "dtype": str(dtype).removeprefix("torch.")}
    return hf_config, hf_state_dict


def export_hf(checkpoint_dir: PathLike, out_dir: PathLike, dtype: Union[str, torch.dtype, None] = None) -> dict:
    """Write a lora_lab checkpoint as a Hugging Face folder (config.json, model.safetensors, tokenizer files,
    generation_config.json when the checkpoint has one); returns the config.json dict."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if out_dir.resolve() == checkpoint_dir.resolve():
        raise LoraLabError(f"{out_dir}: export to another folder than the checkpoint (both name their weights "
                           f"model.safetensors)")
    dtype = _as_dtype(dtype)
    config, state_dict = load_checkpoint(checkpoint_dir)
    state_dict = {k: _cast(v, dtype) for k, v in state_dict.items()}
    try:
        hf_config, hf_state_dict = export_hf_state_dict(config, state_dict)
    except LoraLabError as e:
        raise LoraLabError(f"{checkpoint_dir}: {e}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in hf_state_dict.items()}, str(tmp), metadata={"format": "pt"})
    atomic_write_text(out_dir / "config.json", json.dumps(hf_config, indent=2) + "\n")
    copy_tokenizer_files(checkpoint_dir, out_dir)
    _copy_extra_tokenizer_files(checkpoint_dir, out_dir)
    return hf_config
