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

The paper's gate is a plain scalar per head multiplying the prefix attention (its later v2 passes it through
tanh and adds trainable biases, scales and norms: not implemented here). The prefix starts as standard normal
vectors, like the rows of an nn.Embedding: the size of the RMS-normalised hidden states k_proj usually sees.

In lora_lab, `inject_adapter(model)` swaps, in place, the attention modules of the chosen blocks for
`AdapterAttention`: a subclass of lora_lab.model.CausalSelfAttention that takes over the very same q/k/v/o
projection modules (so base weights load and stay tied as before) and adds `adapter_prefix` (P, n_embd) and
`adapter_gate` (n_head,). `mark_only_adapter_trainable`, `adapter_state_dict`, `save_adapter` / `load_adapter`
(adapter.safetensors + adapter_config.json) and `load_adapter_state_dict` complete it, mirroring lora_lab/lora.py.

Each claim above is checked by a test in tests/test_adapter.py.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lora_lab.config import Config
from lora_lab.model import CausalSelfAttention, apply_rope, attention_mask
from lora_lab.utils import LoraLabError, atomic_path, atomic_write_text

ADAPTER_WEIGHTS_FILE = "adapter.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_PARAMS = ("adapter_prefix", "adapter_gate")


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: Optional[int]) -> torch.Tensor:
        # CausalSelfAttention.forward, line for line, plus the gated prefix term before o_proj
        B, T, _ = x.shape
        nh, ng, hs = self.n_head, self.n_query_groups, self.head_size
        q = self.q_proj(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, ng, hs).transpose(1, 2)  # (B, ng, T, hs)
        v = self.v_proj(x).view(B, T, ng, hs).transpose(1, 2)  # (B, ng, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start = input_pos or 0
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(start, k, v)  # (B, ng, start + T, hs): tokens only, never the prefix
        mask = attention_mask(T, k.size(2), start, self.sliding_window, q.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=ng != nh)  # (B, nh, T, hs)
        gate = self.adapter_gate.to(y.dtype).view(1, nh, 1, 1)  # (1, nh, 1, 1)
        y = y + gate * self.prefix_attention(q, x.dtype)  # (B, nh, T, hs); exactly y while the gate is 0
        y = y.transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, nh * hs)
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


# ------------------------------------------------------------------------------------------------------------
# Model-level helpers
# ------------------------------------------------------------------------------------------------------------
def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterAttention]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterAttention):
            yield name, module


def check_adapter_settings(adapter_prompt_length, adapter_start_layer, n_layer: Optional[int] = None) -> None:
    """One line if the prompt length or start layer cannot work (for a model of n_layer blocks, if given)."""
    def int_at_least(x, low: int) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= low

    if not int_at_least(adapter_prompt_length, 1):
        raise LoraLabError(f"adapter_prompt_length must be a positive integer, got {adapter_prompt_length!r}")
    if not int_at_least(adapter_start_layer, 0):
        raise LoraLabError(f"adapter_start_layer must be a non-negative integer, got {adapter_start_layer!r}")
    if n_layer is not None and adapter_start_layer >= n_layer:
        raise LoraLabError(f"adapter_start_layer={adapter_start_layer} but the model has only {n_layer} layers "
                           f"(0 ... {n_layer - 1}): choose a start layer below {n_layer}")


def inject_adapter(model: nn.Module, adapter_prompt_length: int = 10, adapter_start_layer: int = 2,
                   dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace, in place, the attention of blocks adapter_start_layer ... n_layer - 1 by AdapterAttention.

    The new modules use the old ones' projections (the same Parameters), so nothing of the base changes; their
    prefix and gate are created on the model's device, in `dtype` (default: the embedding's dtype). Every other
    parameter keeps its requires_grad: call mark_only_adapter_trainable(model) before training. Returns `model`.
    """
    blocks = model.blocks
    check_adapter_settings(adapter_prompt_length, adapter_start_layer, len(blocks))
    if any(True for _ in adapter_modules(model)):
        raise LoraLabError("the model already has adapters: inject_adapter once per model")
    embedding = model.wte.weight  # (linear layers may be quantized: their weights' dtype is not the model's)
    for block in list(blocks)[adapter_start_layer:]:
        block.attn = AdapterAttention.from_attention(block.attn, model.config, adapter_prompt_length,
                                                     device=embedding.device, dtype=dtype or embedding.dtype)
    return model


def mark_only_adapter_trainable(model: nn.Module) -> None:
    """requires_grad on the adapters' prefixes and gates only: the whole base model is frozen."""
    for name, p in model.named_parameters():
        p.requires_grad = name.rsplit(".", 1)[-1] in ADAPTER_PARAMS


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (adapter_prefix and adapter_gate of each adapted layer), under their model names."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ADAPTER_PARAMS}


def load_adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source="adapter") -> None:
    """Copy adapter tensors into the model's AdapterAttention modules, or raise one line saying what does not fit."""
    expected = {k: tuple(v.shape) for k, v in adapter_state_dict(model).items()}
    if not expected:
        raise LoraLabError(f"{source}: the model has no adapters to load into: call inject_adapter(model, ...) first")
    for key in state_dict:
        if key.rsplit(".", 1)[-1] not in ADAPTER_PARAMS:
            raise LoraLabError(f"{source}: {key} is not an adapter weight (adapter keys end in "
                               f"{', '.join(ADAPTER_PARAMS)}); pass an adapter's {ADAPTER_WEIGHTS_FILE}, not a "
                               f"model checkpoint or a LoRA adapter")
    if set(state_dict) != set(expected):
        ours, theirs = layers_of(expected), layers_of(state_dict)
        raise LoraLabError(f"{source}: the adapter has weights for layers {span(theirs)} but the model has adapters "
                           f"on layers {span(ours)}: inject_adapter with the adapter's adapter_start_layer "
                           f"(or use the base model it was trained on)")
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != expected[key]:
            what = ("adapter_prompt_length x n_embd" if key.endswith("adapter_prefix") else "n_head")
            raise LoraLabError(f"{source}: {key} has shape {tuple(tensor.shape)} but the model expects "
                               f"{expected[key]} ({what}): inject_adapter with the adapter's "
                               f"adapter_prompt_length, on the base model it was trained on")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in state_dict.items():
            params[key].copy_(tensor)


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

    def __post_init__(self) -> None:
        n_layer = (self.base_config or {}).get("n_layer")
        check_adapter_settings(self.adapter_prompt_length, self.adapter_start_layer, n_layer)

    def inject(self, model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
        """inject_adapter(model) with these hyperparameters."""
        return inject_adapter(model, self.adapter_prompt_length, self.adapter_start_layer, dtype=dtype)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise LoraLabError(f"unknown adapter config keys {sorted(unknown)}: not written by this lora_lab version")
        return cls(**d)


def save_adapter(path_dir: Union[str, Path], model: nn.Module, adapter_config: AdapterConfig) -> Path:
    """Write `adapter.safetensors` (prefixes and gates) and `adapter_config.json` into path_dir, each atomically."""
    path_dir = Path(path_dir)
    layers = [int(name.split(".")[1]) for name, _ in adapter_modules(model)]
    if not layers:
        raise LoraLabError("the model has no adapters to save: call inject_adapter(model, ...) first")
    lengths = {m.adapter_prompt_length for _, m in adapter_modules(model)}
    if (min(layers), lengths) != (adapter_config.adapter_start_layer, {adapter_config.adapter_prompt_length}):
        raise LoraLabError(f"the adapter config (adapter_start_layer={adapter_config.adapter_start_layer}, "
                           f"adapter_prompt_length={adapter_config.adapter_prompt_length}) does not describe the "
                           f"model (adapters on layers {span(layers)}, prompt length {sorted(lengths)})")
    path_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in adapter_state_dict(model).items()}
    with atomic_path(path_dir / ADAPTER_WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "lora_lab": "1"})
    atomic_write_text(path_dir / ADAPTER_CONFIG_FILE, json.dumps(adapter_config.to_dict(), indent=2) + "\n")
    return path_dir


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
    try:
        config = AdapterConfig.from_dict(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoraLabError(f"{config_path} is not valid JSON ({e}): save the adapter again") from None
    except (LoraLabError, TypeError, AttributeError) as e:
        raise LoraLabError(f"{config_path} is not a valid adapter config ({e}): save the adapter again") from None
    try:
        state_dict = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraLabError(f"{weights_path} is truncated or corrupt ({e}): save the adapter again") from None
    return config, state_dict


def base_checkpoint_dir(adapter_config: AdapterConfig, checkpoint_dir: Optional[Union[str, Path]],
                        adapter_dir: Union[str, Path]) -> Path:
    """`checkpoint_dir` if given, else the base model the adapter was trained on, if that directory exists here."""
    if checkpoint_dir is not None:
        return Path(checkpoint_dir)
    config_path = Path(adapter_dir) / ADAPTER_CONFIG_FILE
    if not adapter_config.base_model:
        raise LoraLabError(f"{config_path} does not name its base model: pass --checkpoint_dir")
    if not Path(adapter_config.base_model).is_dir():
        raise LoraLabError(f"{config_path} names the base model {adapter_config.base_model}, which does not exist "
                           f"here (it is relative to where fine-tuning ran): pass --checkpoint_dir")
    return Path(adapter_config.base_model)
