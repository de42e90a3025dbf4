"""LLaMA-Adapter: fine-tune a frozen model through learned prompts that only a gate lets in.

LLaMA-Adapter (Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init
Attention") freezes the whole model and adds, to each of the top layers (from `adapter_start_layer` on):

    - a prefix: P = adapter_prompt_length learned vectors of width n_embd, shared by every sequence;
    - a gate: one learned number per attention head, initialised to zero.

In an adapted layer, the prefix goes through the layer's own (frozen) key and value projections, and every
query of the sequence attends to it in a softmax of its own, next to (not together with) the usual causal
attention over the tokens:

    y = softmax(q K^T / sqrt(hs)) V + gate * softmax(q Kp^T / sqrt(hs)) Vp          Kp = k_proj(prefix)  (P, hs)
                                                                                     Vp = v_proj(prefix)  (P, hs)
    - The prefix has no position: it gets no rotary embedding, and every query sees all of it (no causal mask).
    - With the gate at zero the second term adds exactly zero, so at step 0 the model is the base model, bit for
      bit, and training cannot be derailed at the start by random prompts (the paper's "zero-init attention").
      Its two softmaxes are apart so that the prefix never takes attention away from the tokens before the gate
      has learned how much it should.
    - Grouped-query attention: the prefix keys and values come out of k_proj / v_proj with n_query_groups heads,
      and each group serves its n_head / n_query_groups query heads, as the token keys and values do.
    - Generation: the prefix is not a token, so it is not written to the KV cache; it is attended afresh at every
      step (P rows through k_proj and v_proj: next to nothing).
    - Trainable parameters: per adapted layer P * n_embd + n_head. SmolLM2-135M (30 layers, n_embd 576, 9 heads)
      with P = 10 from layer 2: 28 * (5,760 + 9) = 161,532, 0.12% of the model.

The paper's gate is a plain scalar per head multiplying the prefix attention. The prefix starts as standard normal
vectors, like the rows of an nn.Embedding: the size of the RMS-normalised hidden states k_proj usually sees.

LLaMA-Adapter V2 (Gao et al. 2023, "LLaMA-Adapter V2: Parameter-Efficient Visual Instruction Model"), `version=2`,
keeps all of the above and, as LitGPT's adapter_v2 does, adds two things everywhere, not only in the top layers:

    - "bias tuning": on every linear layer a learned scale and bias per output feature,

          y = adapter_scale * (x W^T + b + adapter_bias)          adapter_scale (out,) = 1, adapter_bias (out,) = 0

      on q/k/v/o and the MLP's projections of every block, and on lm_head. At the start y + 0 and 1 * y are exact
      in floating point, so the model is still the base model bit for bit. The prefix's keys and values come out
      of the same (now scaled and biased) k_proj and v_proj, as in LitGPT.
    - trainable norms: the weights (and LayerNorm's biases) of every block's norm_1 and norm_2, and of norm_f.

Notes on v2:
    - lm_head is adapted too, as in LitGPT (the paper's "each linear layer", read literally): with tied embeddings
      (SmolLM2) its scale and bias are the only way the output side can move apart from the frozen embedding. It
      costs 2 x vocab_size parameters.
    - The gate stays v1's plain per-head scalar, as in LitGPT.
    - Trainable parameters: v1's, plus 2 x (the output widths of all linear layers) plus the norms' parameters.
      SmolLM2-135M with P = 10 from layer 2: 161,532 + 30 x 2 x (576 + 192 + 192 + 576 + 1,536 + 1,536 + 576)
      (q, k, v, o, gate, up, down) + 2 x 49,152 (lm_head) + 61 x 576 (norm_1, norm_2 of 30 blocks and norm_f)
      = 161,532 + 311,040 + 98,304 + 35,136 = 606,012, 0.45% of the model.
    - Cost: the backward pass now runs down to layer 0 (v1 stops at adapter_start_layer), and each adapted layer
      keeps one more activation (its output, for the scale's gradient). lm_head keeps the fused cross-entropy of
      lora_lab.model.next_token_loss through AdapterV2Linear.as_linear: s * (x W^T + b + ab) = x (s W)^T + s (b + ab),
      so the (tokens, vocab) logits are never all in memory. The adapter file carries the trained norms, which
      are also base-model tensors: loading it replaces them.
    - An NF4-quantized base (lora_lab/nf4.py) works: made from an NF4Linear, the layer keeps the 4-bit weight and
      dequantizes it on the fly, as QLoRA's LoRALinear does. Quantize before inject_adapter: quantize_nf4 swaps
      only plain nn.Linear layers.

In lora_lab, `inject_adapter(model)` swaps, in place, the attention modules of the chosen blocks for
`AdapterAttention`: a subclass of lora_lab.model.CausalSelfAttention that takes over the very same q/k/v/o
projection modules (so base weights load and stay tied as before) and adds `adapter_prefix` (P, n_embd) and
`adapter_gate` (n_head,). With `version=2` it also swaps every linear layer for `AdapterV2Linear`, a subclass of
nn.Linear that takes over the same `weight` and `bias` (so the base keys do not change) and adds `adapter_scale`
and `adapter_bias`. `mark_only_adapter_trainable`, `adapter_state_dict`, `save_adapter` / `load_adapter`
(adapter.safetensors + adapter_config.json, whose adapter_version says which variant) and
`load_adapter_state_dict` complete it, mirroring lora_lab/lora.py.

Each claim above is checked by a test in tests/test_adapter.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_lab import lora  # LoRA's rule for finding the base model, shared
from lora_lab.checkpoint import read_adapter_files, save_adapter_files
from lora_lab.config import Config
from lora_lab.model import CausalSelfAttention, RMSNorm
from lora_lab.nf4 import NF4Linear, holds_nf4, move_nf4_weight, nf4_linear, nf4_state_of, nf4_statistics_kept
from lora_lab.utils import LoraLabError

ADAPTER_WEIGHTS_FILE = "adapter.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_PARAMS = ("adapter_prefix", "adapter_gate")
ADAPTER_V2_PARAMS = ("adapter_scale", "adapter_bias")
NORMS = (nn.LayerNorm, RMSNorm)  # v2 trains their parameters


class AdapterAttention(CausalSelfAttention):
    """Causal self-attention plus a gated, separately normalised attention over a learned prefix."""

    def __init__(self, config: Config, adapter_prompt_length: int = 10, device=None, dtype=None) -> None:
        super().__init__(config)
        self.adapter_prompt_length = adapter_prompt_length
        self.adapter_prefix = nn.Parameter(torch.empty(adapter_prompt_length, config.n_embd, device=device,
                                                       dtype=dtype))  # (P, C)
        self.adapter_gate = nn.Parameter(torch.empty(config.n_head, device=device, dtype=dtype))  # (nh,)
        self.reset_adapter_parameters()

    @classmethod
    def from_attention(cls, attn: CausalSelfAttention, config: Config, adapter_prompt_length: int = 10,
                       device=None, dtype=None) -> "AdapterAttention":
        """An AdapterAttention that uses `attn`'s own projection modules (the same objects: nothing is copied)."""
        with torch.device("meta"):  # its own projections are placeholders, replaced right below
            new = cls(config, adapter_prompt_length)
        for name, child in attn.named_children():  # q_proj, k_proj, v_proj, o_proj (and a KV cache, if set)
            setattr(new, name, child)
        for name, tensor in [*attn.named_parameters(recurse=False), *attn.named_buffers(recurse=False)]:
            setattr(new, name, tensor)
        new.kv_cache = attn.kv_cache
        # the adapter's own parameters: on the model's device and in its dtype unless told otherwise
        weight = attn.o_proj.weight  # (may be quantized: then only its device is a guide)
        device = device or weight.device
        dtype = dtype or (weight.dtype if weight.is_floating_point() else torch.get_default_dtype())
        new.adapter_prefix = nn.Parameter(torch.empty_like(new.adapter_prefix, device=device, dtype=dtype))
        new.adapter_gate = nn.Parameter(torch.empty_like(new.adapter_gate, device=device, dtype=dtype))
        new.reset_adapter_parameters()
        new.train(attn.training)
        return new

    def reset_adapter_parameters(self) -> None:
        """Prefix ~ N(0, 1) (as nn.Embedding rows), gate = 0: the layer computes its base attention exactly."""
        if self.adapter_prefix.is_meta:
            return
        with torch.no_grad():
            nn.init.normal_(self.adapter_prefix)
            nn.init.zeros_(self.adapter_gate)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: Union[int, torch.Tensor, None],
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # CausalSelfAttention.forward plus the gated prefix term before o_proj. The KV cache holds the tokens'
        # keys and values only, never the prefix's (it is attended afresh at every step)
        B, T, _ = x.shape
        nh = self.n_head
        q, y = self.attend(x, cos, sin, input_pos, mask)  # (B, nh, T, hs) each
        gate = self.adapter_gate.to(y.dtype).view(1, nh, 1, 1)  # (1, nh, 1, 1)
        y = y + gate * self.prefix_attention(q, x.dtype)  # (B, nh, T, hs); exactly y while the gate is 0
        y = y.transpose(1, 2).reshape(B, T, nh * self.head_size)  # (B, T, nh * hs)
        return self.o_proj(y)

    def prefix_attention(self, q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """softmax(q Kp^T / sqrt(hs)) Vp: every query (B, nh, T, hs) over the whole prefix, no mask, no RoPE."""
        B, nh, T, hs = q.shape
        P, ng = self.adapter_prompt_length, self.n_query_groups
        prefix = self.adapter_prefix.to(dtype)  # (P, C)
        pk = self.k_proj(prefix).view(1, P, ng, hs).transpose(1, 2).expand(B, ng, P, hs)  # (B, ng, P, hs)
        pv = self.v_proj(prefix).view(1, P, ng, hs).transpose(1, 2).expand(B, ng, P, hs)  # (B, ng, P, hs)
        return F.scaled_dot_product_attention(q, pk, pv, enable_gqa=ng != nh)  # (B, nh, T, hs)

    def extra_repr(self) -> str:
        return f"adapter_prompt_length={self.adapter_prompt_length}"


class AdapterV2Linear(nn.Linear):
    """A frozen linear layer with a learned scale and bias per output (LLaMA-Adapter V2's "bias tuning"):

        y = adapter_scale * (x W^T + b + adapter_bias)          adapter_scale = 1, adapter_bias = 0 at the start

    The base keeps nn.Linear's names (`weight`, `bias`), so base checkpoints load unchanged. Made `from_linear` of an
    NF4Linear, the layer keeps the 4-bit weight (NF4Linear's buffers, under its names, quant_type "nf4") and
    dequantizes it on the fly to the input's dtype, as LoRALinear.base_forward does for QLoRA.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.adapter_scale = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))  # (out,)
        self.adapter_bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))  # (out,)
        self.quant_type: Optional[str] = None  # "nf4" when the frozen weight is stored in NF4

    @classmethod
    def from_linear(cls, linear: Union[nn.Linear, NF4Linear], dtype: Optional[torch.dtype] = None) -> "AdapterV2Linear":
        """An AdapterV2Linear on `linear`'s own weight and bias (the same tensors: a tied lm_head stays tied); its
        scale and bias on the weight's device, in `dtype` (default: the weight's, or the one NF4 was quantized from)."""
        with torch.device("meta"):  # no memory for a weight we are about to replace by linear's own
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        if holds_nf4(linear):
            move_nf4_weight(linear, new)  # weight (packed codes), weight_absmax, ...: the same tensors
        else:
            new.weight = linear.weight
        new.bias = linear.bias
        device = linear.weight.device
        dtype = dtype or (linear.dtype if holds_nf4(linear) else linear.weight.dtype)
        new.adapter_scale = nn.Parameter(torch.ones(linear.out_features, device=device, dtype=dtype))
        new.adapter_bias = nn.Parameter(torch.zeros(linear.out_features, device=device, dtype=dtype))
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_type == "nf4":
            y = nf4_linear(x, self.weight, nf4_state_of(self), self.bias)  # (..., out)
        else:
            y = F.linear(x, self.weight, self.bias)  # (..., out): what nn.Linear computes, bit for bit
        # in the activations' dtype: a float32 adapter on a bfloat16 model must not turn them into float32
        return (y + self.adapter_bias.to(y.dtype)) * self.adapter_scale.to(y.dtype)

    def as_linear(self) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """(W', b') with this layer = x W'^T + b': s * (x W^T + b + ab) = x (s W)^T + s (b + ab), so that as lm_head
        it gets the fused cross-entropy (lora_lab.model.next_token_loss) instead of full-size logits. At the start
        (s = 1, ab = 0) W' and b' are W and b bit for bit. None on an NF4 weight."""
        if self.quant_type == "nf4":
            return None
        scale = self.adapter_scale.to(self.weight.dtype)  # (out,)
        bias = self.adapter_bias.to(self.weight.dtype)  # (out,)
        bias = bias if self.bias is None else self.bias + bias
        return self.weight * scale[:, None], bias * scale  # (out, in), (out,)

    def _apply(self, fn, recurse=True):
        with nf4_statistics_kept(self):  # model.to(bfloat16) must not round NF4 statistics (no-op on a float base)
            super()._apply(fn, recurse)
        return self

    def extra_repr(self) -> str:
        return super().extra_repr() + (", nf4" if self.quant_type == "nf4" else "")


# ------------------------------------------------------------------------------------------------------------
# Model-level helpers
# ------------------------------------------------------------------------------------------------------------
def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterAttention]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterAttention):
            yield name, module


def adapter_version_of(model: nn.Module) -> Optional[int]:
    """2 if the model has LLaMA-Adapter V2 linear layers, 1 if it has only adapted attention, None if neither."""
    modules = list(model.modules())
    if any(isinstance(m, AdapterV2Linear) for m in modules):
        return 2
    return 1 if any(isinstance(m, AdapterAttention) for m in modules) else None


def version_of_tensors(keys) -> int:
    """The adapter version of a state dict's keys: 2 if it has a scale or bias of a v2 linear layer."""
    return 2 if any(k.rsplit(".", 1)[-1] in ADAPTER_V2_PARAMS for k in keys) else 1


def check_adapter_settings(adapter_prompt_length, adapter_start_layer, n_layer: Optional[int] = None,
                           version=1) -> None:
    """One line if the prompt length, start layer or version cannot work (for a model of n_layer blocks, if given)."""
    def int_at_least(x, low: int) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= low

    if not int_at_least(adapter_prompt_length, 1):
        raise LoraLabError(f"adapter_prompt_length must be a positive integer, got {adapter_prompt_length!r}")
    if not int_at_least(adapter_start_layer, 0):
        raise LoraLabError(f"adapter_start_layer must be a non-negative integer, got {adapter_start_layer!r}")
    if n_layer is not None and adapter_start_layer >= n_layer:
        raise LoraLabError(f"adapter_start_layer={adapter_start_layer} but the model has only {n_layer} layers "
                           f"(0 ... {n_layer - 1}): choose a start layer below {n_layer}")
    if not (int_at_least(version, 1) and version <= 2):
        raise LoraLabError(f"adapter_version must be 1 (LLaMA-Adapter) or 2 (LLaMA-Adapter V2), got {version!r}")


def inject_adapter(model: nn.Module, adapter_prompt_length: int = 10, adapter_start_layer: int = 2,
                   dtype: Optional[torch.dtype] = None, version: int = 1) -> nn.Module:
    """Replace, in place, the attention of blocks adapter_start_layer ... n_layer - 1 by AdapterAttention; with
    version=2 also every linear layer (those of every block, and lm_head) by AdapterV2Linear.

    The new modules use the old ones' projections and weights (the same Parameters), so nothing of the base
    changes; their prefix, gate, scales and biases are created on the model's device, in `dtype` (default: the
    embedding's dtype). Every other parameter keeps its requires_grad: call mark_only_adapter_trainable(model)
    before training. An NF4 base must be quantized before (quantize_nf4 swaps only plain nn.Linear layers).
    Returns `model`.
    """
    blocks = model.blocks
    check_adapter_settings(adapter_prompt_length, adapter_start_layer, len(blocks), version)
    if adapter_version_of(model) is not None:
        raise LoraLabError("the model already has adapters: inject_adapter once per model")
    embedding = model.wte.weight  # (linear layers may be quantized: their weights' dtype is not the model's)
    dtype = dtype or embedding.dtype
    for block in list(blocks)[adapter_start_layer:]:
        block.attn = AdapterAttention.from_attention(block.attn, model.config, adapter_prompt_length,
                                                     device=embedding.device, dtype=dtype)
    if version == 2:
        # every linear layer, float or NF4 (the projections are the same modules inside AdapterAttention)
        linears = [name for name, m in model.named_modules() if type(m) is nn.Linear or isinstance(m, NF4Linear)]
        for name in linears:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, AdapterV2Linear.from_linear(getattr(parent, child), dtype=dtype))
    return model


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """What the adapter trains and saves: every prefix and gate; with v2 also every scale and bias of its linear
    layers and the parameters of every norm."""
    v2 = adapter_version_of(model) == 2
    names = []
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            if name in ADAPTER_PARAMS + ADAPTER_V2_PARAMS or (v2 and isinstance(module, NORMS)):
                names.append(f"{module_name}.{name}" if module_name else name)
    return names


def mark_only_adapter_trainable(model: nn.Module) -> None:
    """requires_grad on the adapters' prefixes and gates (v2: and scales, biases and norms) only: the rest of the
    model is frozen."""
    trainable = set(adapter_parameter_names(model))
    for name, p in model.named_parameters():
        p.requires_grad = name in trainable


def adapter_param_groups(model: nn.Module) -> list[dict]:
    """AdamW parameter groups of the trainable parameters: the prefixes and gates with the optimizer's weight decay,
    v2's scales, biases and norms without. Weight decay pulls towards 0: fine for a gate or a prefix (0 is "no
    adapter"), but a scale or a norm weight starts at 1, and 0 would silence its layer (biases and norms are not
    decayed in GPT training generally). For v1 this is one group of all trainable parameters."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for name, p in trainable if name.rsplit(".", 1)[-1] in ADAPTER_PARAMS]}]
    no_decay = [p for name, p in trainable if name.rsplit(".", 1)[-1] not in ADAPTER_PARAMS]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (adapter_prefix and adapter_gate of each adapted layer; v2: also adapter_scale and
    adapter_bias of each linear layer, and the norms' parameters), under their model names."""
    names = set(adapter_parameter_names(model))
    return {k: v for k, v in model.state_dict().items() if k in names}


def load_adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source="adapter") -> None:
    """Copy adapter tensors into the model's adapters (v2: and norms), or raise one line saying what does not fit."""
    expected = {k: tuple(v.shape) for k, v in adapter_state_dict(model).items()}
    if not expected:
        raise LoraLabError(f"{source}: the model has no adapters to load into: call inject_adapter(model, ...) first")
    norms = {f"{module_name}.{name}" for module_name, module in model.named_modules() if isinstance(module, NORMS)
             for name, _ in module.named_parameters(recurse=False)}
    for key in state_dict:
        if key.rsplit(".", 1)[-1] not in ADAPTER_PARAMS + ADAPTER_V2_PARAMS and key not in norms:
            raise LoraLabError(f"{source}: {key} is not an adapter weight (adapter keys end in "
                               f"{', '.join(ADAPTER_PARAMS + ADAPTER_V2_PARAMS)}, or name a norm); pass an "
                               f"adapter's {ADAPTER_WEIGHTS_FILE}, not a model checkpoint or a LoRA adapter")
    theirs, ours = version_of_tensors(state_dict), adapter_version_of(model)
    if theirs != ours:
        raise LoraLabError(f"{source}: the adapter is a LLaMA-Adapter v{theirs} but the model has v{ours} adapters: "
                           f"inject_adapter with version={theirs} (the adapter_version of its {ADAPTER_CONFIG_FILE})")
    if set(state_dict) != set(expected):
        ours_layers, their_layers = layers_of(prefix_keys(expected)), layers_of(prefix_keys(state_dict))
        if ours_layers != their_layers:
            raise LoraLabError(f"{source}: the adapter has weights for layers {span(their_layers)} but the model has "
                               f"adapters on layers {span(ours_layers)}: inject_adapter with the adapter's "
                               f"adapter_start_layer (or use the base model it was trained on)")
        missing = [k for k in expected if k not in state_dict]
        extra = [k for k in state_dict if k not in expected]
        what = (f"lacks {len(missing)} of the model's adapter tensors ({missing[0]}, ...)" if missing else
                f"has {len(extra)} tensors that the model has no place for ({extra[0]}, ...)")
        raise LoraLabError(f"{source}: the adapter {what}: use the base model it was trained on, or save it again")
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != expected[key]:
            what = {"adapter_prefix": "adapter_prompt_length x n_embd", "adapter_gate": "n_head"}.get(
                key.rsplit(".", 1)[-1], "the layer's width")
            raise LoraLabError(f"{source}: {key} has shape {tuple(tensor.shape)} but the model expects "
                               f"{expected[key]} ({what}): inject_adapter with the adapter's "
                               f"adapter_prompt_length, on the base model it was trained on")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in state_dict.items():
            params[key].copy_(tensor)


def prefix_keys(keys) -> list[str]:
    """The keys of prefixes and gates (the layers with adapted attention)."""
    return [k for k in keys if k.rsplit(".", 1)[-1] in ADAPTER_PARAMS]


def layers_of(keys) -> list[int]:
    """The block indices named in state-dict keys ("blocks.3.attn.adapter_gate" -> 3)."""
    return sorted({int(k.split(".")[1]) for k in keys if k.startswith("blocks.")})


def span(layers: list[int]) -> str:
    """[2, 3, 4] -> "2-4"; other lists -> "1, 5"."""
    if not layers:
        return "(none)"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ", ".join(map(str, layers))


# ------------------------------------------------------------------------------------------------------------
# Adapter files: adapter.safetensors + adapter_config.json
# ------------------------------------------------------------------------------------------------------------
@dataclass
class AdapterConfig:
    """The hyperparameters of a LLaMA-Adapter, saved next to its weights so later tools can read them back."""

    adapter_prompt_length: int = 10
    adapter_start_layer: int = 2
    base_model: str = ""  # name or checkpoint directory of the base model the adapter was trained on
    base_config: Optional[dict] = None  # the base model's Config.to_dict()
    prompt_style: str = "plain"
    adapter_version: int = 1  # 1: LLaMA-Adapter; 2: LLaMA-Adapter V2 (files written before it existed are v1)

    def __post_init__(self) -> None:
        n_layer = (self.base_config or {}).get("n_layer")
        check_adapter_settings(self.adapter_prompt_length, self.adapter_start_layer, n_layer, self.adapter_version)

    def inject(self, model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
        """inject_adapter(model) with these hyperparameters."""
        return inject_adapter(model, self.adapter_prompt_length, self.adapter_start_layer, dtype=dtype,
                              version=self.adapter_version)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise LoraLabError(f"unknown adapter config keys {sorted(unknown)}: not written by this lora_lab version")
        return cls(**d)


def save_adapter(path_dir: Union[str, Path], model: nn.Module, adapter_config: AdapterConfig) -> Path:
    """Write `adapter.safetensors` (prefixes and gates; v2: also scales, biases and norms) and `adapter_config.json`
    into path_dir, each atomically."""
    path_dir = Path(path_dir)
    layers = [int(name.split(".")[1]) for name, _ in adapter_modules(model)]
    if not layers:
        raise LoraLabError("the model has no adapters to save: call inject_adapter(model, ...) first")
    lengths = {m.adapter_prompt_length for _, m in adapter_modules(model)}
    if (min(layers), lengths) != (adapter_config.adapter_start_layer, {adapter_config.adapter_prompt_length}):
        raise LoraLabError(f"the adapter config (adapter_start_layer={adapter_config.adapter_start_layer}, "
                           f"adapter_prompt_length={adapter_config.adapter_prompt_length}) does not describe the "
                           f"model (adapters on layers {span(layers)}, prompt length {sorted(lengths)})")
    version = adapter_version_of(model)
    if version != adapter_config.adapter_version:
        raise LoraLabError(f"the adapter config (adapter_version={adapter_config.adapter_version}) does not describe "
                           f"the model (a LLaMA-Adapter v{version})")
    return save_adapter_files(path_dir, adapter_state_dict(model), adapter_config.to_dict(), ADAPTER_WEIGHTS_FILE,
                              ADAPTER_CONFIG_FILE)


def load_adapter(adapter_dir: Union[str, Path]) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Read an adapter directory written by save_adapter; every problem is one LoraLabError line."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise LoraLabError(f"adapter directory {adapter_dir} does not exist: pass the output directory of "
                           f"finetune/adapter.py (it holds {ADAPTER_WEIGHTS_FILE} and {ADAPTER_CONFIG_FILE})")
    config_path, weights_path = adapter_dir / ADAPTER_CONFIG_FILE, adapter_dir / ADAPTER_WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            hint = ""
            if (adapter_dir / "lora_config.json").is_file():
                hint = " (it looks like a LoRA adapter: use generate/lora.py)"
            elif (adapter_dir / "model_config.json").is_file():
                hint = " (it looks like a model checkpoint, not an adapter)"
            raise LoraLabError(f"{adapter_dir} is not a LLaMA-Adapter directory: {path.name} is missing{hint}; "
                               f"pass the output directory of finetune/adapter.py")
    config, state_dict = read_adapter_files(config_path, weights_path, AdapterConfig.from_dict, "adapter")
    if version_of_tensors(state_dict) != config.adapter_version:
        raise LoraLabError(f"{weights_path} holds a LLaMA-Adapter v{version_of_tensors(state_dict)} but {config_path} "
                           f"says adapter_version={config.adapter_version}: save the adapter again")
    return config, state_dict


def base_checkpoint_dir(adapter_config: AdapterConfig, checkpoint_dir: Optional[Union[str, Path]],
                        adapter_dir: Union[str, Path]) -> Path:
    """`checkpoint_dir` if given, else the base model the adapter was trained on, if that directory exists here."""
    return lora.base_checkpoint_dir(adapter_config, checkpoint_dir, adapter_dir, config_file=ADAPTER_CONFIG_FILE)
