"""LoRA: fine-tune a frozen linear layer through a trainable low-rank update.

A linear layer computes h = x W^T + b with W (out × in). LoRA (Hu et al. 2021) freezes W and b and learns an
update of rank r instead:

    W  ->  W + (alpha/r) · B A          A (r × in), B (out × r), r << min(in, out)

    - A starts Kaiming-uniform, as nn.Linear initialises its own weight: |A_ij| <= 1/sqrt(in).
    - B starts at zeros, so B A = 0 and training starts at the base model exactly.
    - The forward never forms B A (an out × in matrix); the input goes through A, then B:
          h = x W^T + b + (alpha/r) · (dropout(x) A^T) B^T          (x A^T is only (..., r))
    - Dropout acts on the LoRA branch only: the base model's part of the output is never dropped.
    - An adapter has r·(in + out) trainable parameters per layer instead of in·out: with r = 8 on a 576 × 576
      projection (SmolLM2-135M) that is 9,216 instead of 331,776 (2.8%).
    - rsLoRA (Kalajdzievski 2023, `use_rslora`) scales by alpha/sqrt(r) instead of alpha/r, so the update does not
      shrink as r grows.
    - merge() folds the update into the weight, W <- W + (alpha/r) · (B @ A), so inference costs nothing extra;
      unmerge() subtracts it again (exact in exact arithmetic, equal to rounding in floating point).

DoRA (Liu et al. 2024, `use_dora`, off by default) splits the adapted weight into a direction and a magnitude:

    W' = m · (W + s B A) / ||W + s B A||        s = alpha/r, norm of each output row (out,), m a trainable (out,)

The paper writes W as (in × out) and calls these column norms; for our (out × in) layout they are row norms, as
PEFT computes them. m starts at ||W||, so W' = W at init. As in the paper (section 4.3) the norm is treated as a
constant in the backward pass, which saves the memory of its graph.

LoRA+ (Hayou et al. 2024, `lora_plus_param_groups`, off by default): B learns with a learning rate `ratio` times
the one of A.

Other starting points (PiSSA, OLoRA, LoftQ, Gaussian A; `--lora_init`) live in lora_lab/lora_init.py.

QLoRA (Dettmers et al. 2023): quantize the base first (lora_lab.nf4.quantize_nf4(model): every nn.Linear but
lm_head becomes an NF4Linear), then inject_lora as usual. A LoRA layer made from an NF4Linear keeps the 4-bit
weight (same buffers, same names) and dequantizes it on the fly in base_forward; the adapters, their keys and
their files are unchanged. merge_lora_into_dequantized folds them into a 16-bit copy of the dequantized base.

Each claim above is checked by a test in tests/test_lora.py:
    Kaiming bound, B = 0, parameter count        test_init_and_parameter_count
    starts at the base model exactly             test_b_zero_gives_base_logits_exactly
    the forward formula, never forming B A       test_forward_formula_without_materialising_BA
    dropout on the LoRA branch only              test_dropout_only_on_lora_branch
    rsLoRA scaling                               test_rslora_scaling
    merge / unmerge                              test_merge_is_exact_and_idempotent, test_merge_lora_model_logits_close
    DoRA                                         test_dora_*
    LoRA+                                        test_lora_plus_param_groups
    QLoRA (NF4 base), its merge                  tests/test_qlora.py

The model-level helpers below work on lora_lab.model.GPT, whose linear layers have these roles:
    query, key, value  blocks.{i}.attn.{q_proj,k_proj,v_proj}
    projection         blocks.{i}.attn.o_proj                        (attention output)
    mlp                blocks.{i}.mlp.{gate_proj,up_proj,down_proj}  (GELU MLPs have up_proj and down_proj only)
    lm_head            lm_head
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_lab.checkpoint import read_adapter_files, save_adapter_files
from lora_lab.config import Config
from lora_lab.nf4 import (NF4Linear, dequantize_nf4, drop_nf4_weight, holds_nf4, move_nf4_weight, nf4_linear,
                          nf4_state_of, nf4_statistics_kept)
from lora_lab.progress import progress
from lora_lab.utils import LoraLabError

ADAPTER_WEIGHTS_FILE = "lora.safetensors"
ADAPTER_CONFIG_FILE = "lora_config.json"

# role -> the names (last part of the module name) of the GPT linear layers that play it
ROLE_LAYERS: dict[str, tuple[str, ...]] = {
    "query": ("q_proj",),
    "key": ("k_proj",),
    "value": ("v_proj",),
    "projection": ("o_proj",),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "lm_head": ("lm_head",),
    "experts": ("gate_proj", "up_proj", "down_proj"),  # of each expert of a mixture of experts (blocks.*.mlp.experts.*)
}
ROLES = tuple(ROLE_LAYERS)
ROLE_WORDS = {"query": "query projections", "key": "key projections", "value": "value projections",
              "projection": "attention output projections", "mlp": "MLP projections", "lm_head": "lm_head",
              "experts": "experts' MLP projections"}
LORA_PARAMS = ("lora_A", "lora_B", "lora_magnitude")
# the Config fields that decide the shapes of the layers an adapter can hold weights for
SHAPE_FIELDS = ("vocab_size", "n_layer", "n_embd", "n_head", "head_size", "n_query_groups", "intermediate_size",
                "mlp_class", "n_expert", "moe_intermediate_size")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (and, with use_dora, a trainable magnitude).

    The base parameters keep nn.Linear's names (`weight`, `bias`), so a base checkpoint loads into a model with
    LoRA layers with only the `lora_*` keys missing. Adapters may have their own dtype (`lora_dtype`), e.g.
    float32 adapters on a bfloat16 base: the LoRA branch runs in the adapters' dtype and its result is cast back.

    QLoRA: made `from_linear` of an NF4Linear (lora_lab/nf4.py), the layer keeps the 4-bit weight: `weight` is then
    the packed uint8 codes, next to NF4Linear's statistics buffers under NF4Linear's names (quant_type "nf4"), and
    base_forward dequantizes it on the fly, to the input's dtype, through an autograd function that gives the
    input a gradient and never keeps the dequantized weight. Only that base part changes: the adapters and their
    state dict keys are the same as on a float base, so an adapter trained on NF4 loads onto the float model.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 bias: bool = True, use_rslora: bool = False, use_dora: bool = False, device=None, dtype=None,
                 lora_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if not isinstance(r, int) or r < 1:
            raise LoraLabError(f"LoRA rank r must be a positive integer, got {r!r}")
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.use_rslora, self.use_dora = r, alpha, use_rslora, use_dora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        # frozen base, under nn.Linear's names
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                                   requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        # trainable adapters
        lora_dtype = lora_dtype or self.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=lora_dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=lora_dtype))  # (out, r)
        if use_dora:
            self.lora_magnitude = nn.Parameter(torch.empty(out_features, device=device, dtype=lora_dtype))  # (out,)
        else:
            self.register_parameter("lora_magnitude", None)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False  # lora_lab.grpo.lora_disabled: the base alone (GRPO's reference pass)
        # True while `weight` is also the embedding matrix (tied lm_head): merging in place would change the
        # embedding, so only merge_lora(model), which gives lm_head its own copy first, may merge this layer
        self.shares_weight = False
        self.untied_by_merge = False  # merge_lora gave this (tied) lm_head its own weight; unmerge_lora ties it again
        # DoRA's row norms at merge time, needed to undo the merge
        self.register_buffer("dora_merged_norm", None, persistent=False)
        self.quant_type: Optional[str] = None  # "nf4" when the frozen weight is stored in NF4 (QLoRA)
        self.reset_parameters()

    @classmethod
    def from_linear(cls, linear: Union[nn.Linear, NF4Linear], r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False,
                    lora_dtype: Optional[torch.dtype] = None) -> "LoRALinear":
        """Wrap `linear`, reusing and freezing its weight and bias Parameters (no copy: a tied weight stays tied).
        An NF4Linear hands over its quantized weight buffers instead: the base stays in 4 bits (QLoRA); adapters
        default to the dtype it was quantized from."""
        dtype = linear.dtype if holds_nf4(linear) else linear.weight.dtype
        # built on meta: no memory for a base weight we are about to replace
        lora = cls(linear.in_features, linear.out_features, r, alpha, dropout, bias=linear.bias is not None,
                   use_rslora=use_rslora, use_dora=use_dora, device="meta", dtype=dtype,
                   lora_dtype=lora_dtype or dtype)
        if holds_nf4(linear):
            move_nf4_weight(linear, lora)  # weight (packed codes), weight_absmax, ...: the same tensors
        else:
            lora.weight = linear.weight.requires_grad_(False)
        if linear.bias is not None:
            lora.bias = linear.bias.requires_grad_(False)
        lora.reset_lora_parameters()  # creates the adapters on the weight's device
        return lora

    # ---- initialisation -------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Initialise the base as nn.Linear does (only matters for a standalone layer), then the adapters."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features)
                nn.init.uniform_(self.bias, -bound, bound)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform, B zeros, DoRA magnitude = row norms of W: the layer computes its base exactly.

        When the adapters are still on the meta device but the base weight has been loaded since (a model built
        on meta, then load_state_dict(assign=True)), the adapters are first created on the weight's device."""
        if self.lora_A.is_meta and not self.weight.is_meta:
            device, dtype = self.weight.device, self.lora_A.dtype
            self.lora_A = nn.Parameter(torch.empty_like(self.lora_A, device=device),
                                       requires_grad=self.lora_A.requires_grad)
            self.lora_B = nn.Parameter(torch.empty_like(self.lora_B, device=device),
                                       requires_grad=self.lora_B.requires_grad)
            if self.use_dora:
                self.lora_magnitude = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype),
                                                   requires_grad=self.lora_magnitude.requires_grad)
        with torch.no_grad():
            # a = sqrt(5) is nn.Linear's choice: bound = sqrt(6 / ((1 + a^2) · in)) = 1/sqrt(in)
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
            if self.use_dora:
                self.lora_magnitude.copy_(self._dora_row_norm())

    # ---- forward --------------------------------------------------------------------------------------------
    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer: x W^T + b, with an NF4 W dequantized on the fly to x's dtype (QLoRA)."""
        if self.quant_type == "nf4":
            return nf4_linear(x, self.weight, nf4_state_of(self), self.bias)  # (..., out)
        return F.linear(x, self.weight, self.bias)

    def base_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """W (out, in) as a float tensor in `dtype` (default: its own): dequantized (a new tensor) if NF4."""
        if self.quant_type == "nf4":
            return dequantize_nf4(self.weight, nf4_state_of(self), dtype)
        return self.weight if dtype is None else self.weight.to(dtype)

    @torch.no_grad()
    def dequantize_base(self, dtype: Optional[torch.dtype] = None) -> None:
        """Replace an NF4 base weight by its dequantized values, a frozen float Parameter in `dtype` (default:
        the dtype it was quantized from): the layer becomes an ordinary LoRA layer (and can merge). No-op on a
        float base."""
        if self.quant_type is None:
            return
        weight = self.base_weight(dtype)  # (out, in)
        drop_nf4_weight(self)  # the 4-bit buffers go as the float weight arrives: one copy of this layer at a time
        self.weight = nn.Parameter(weight, requires_grad=False)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha/r) · (dropout(x) A^T) B^T, in the adapters' dtype, without ever forming B A."""
        x = self.lora_dropout(x.to(self.lora_A.dtype))  # (..., in)
        return self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)  # (..., r) -> (..., out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)  # (..., out)
        if self.merged or self.disabled:  # the update is already inside the weight, or switched off
            return out
        if self.lora_A.is_meta and not x.is_meta:
            raise LoraLabError("LoRA parameters are still on the meta device: load an adapter with "
                               "load_lora_state_dict(model, ...) or call reset_lora_parameters() to start a new one")
        if self.use_dora:
            return self._dora_forward(x, out)
        return out + self.lora_forward(x).to(out.dtype)

    # ---- merging --------------------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """(alpha/r) · (B @ A), the (out, in) update, in the adapters' dtype. Only merge and DoRA form it."""
        return self.scaling * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + (alpha/r) · (B @ A) (DoRA: W <- m · (W + sBA) / ||W + sBA||); a no-op when already merged."""
        if self.merged:
            return
        if self.quant_type is not None:
            raise LoraLabError("this LoRA layer's base weight is stored in NF4, which cannot absorb the update: merge "
                               "with merge_lora_into_dequantized(model), or call dequantize_base() first")
        if self.shares_weight:
            raise LoraLabError("this LoRA layer's weight is also the embedding matrix (tied lm_head): merge with "
                               "merge_lora(model), which gives lm_head its own copy first")
        if self.use_dora:
            adapted = self.weight.to(self.lora_A.dtype) + self.delta_weight()  # (out, in)
            norm = self._dora_row_norm()  # (out,)
            self.weight.copy_((self.lora_magnitude / norm)[:, None] * adapted)
            self.dora_merged_norm = norm
        else:
            self.weight += self.delta_weight().to(self.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): W <- W - (alpha/r) · (B @ A); a no-op when not merged."""
        if not self.merged:
            return
        if self.use_dora:
            adapted = self.weight.to(self.lora_A.dtype) * (self.dora_merged_norm / self.lora_magnitude)[:, None]
            self.weight.copy_(adapted - self.delta_weight())
            self.dora_merged_norm = None
        else:
            self.weight -= self.delta_weight().to(self.weight.dtype)
        self.merged = False

    # ---- DoRA -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _dora_row_norm(self) -> torch.Tensor:
        """||W + s B A|| of each output row (out,), a constant for autograd (DoRA paper, section 4.3)."""
        adapted = self.base_weight(self.lora_A.dtype) + self.delta_weight()  # (out, in)
        # a row of zeros would divide 0 by 0; its magnitude is 0 as well, so any positive norm gives the same W'
        return torch.linalg.vector_norm(adapted, dim=1).clamp_min(torch.finfo(adapted.dtype).tiny)

    def _dora_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """x W'^T + b with W' = m/n · (W + sBA), written as a correction to the base output so that at init
        (m = n, B = 0) it adds exactly zero. Dropout touches the low-rank term only (PEFT also drops the input of
        the (m/n - 1) x W^T term; we keep it out of dropout so the layer is W' in eval and train alike)."""
        lora = self.lora_forward(x)  # (..., out)
        mag_scale = self.lora_magnitude / self._dora_row_norm()  # (out,)
        base_no_bias = base_out if self.bias is None else base_out - self.bias  # x W^T  (..., out)
        dora = (mag_scale - 1) * base_no_bias.to(lora.dtype) + mag_scale * lora  # (..., out)
        return base_out + dora.to(base_out.dtype)

    def _apply(self, fn, recurse=True):
        # an NF4 base keeps its statistics' dtypes through model.to(dtype), as in NF4Linear; the adapters follow
        with nf4_statistics_kept(self):
            super()._apply(fn, recurse)
        return self

    def extra_repr(self) -> str:
        extra = ", rslora" if self.use_rslora else ""
        extra += ", dora" if self.use_dora else ""
        extra += f", {self.quant_type} base" if self.quant_type else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}{extra}, merged={self.merged}")


# ------------------------------------------------------------------------------------------------------------
# Model-level helpers
# ------------------------------------------------------------------------------------------------------------
def normalize_targets(targets: Union[str, Sequence[str]]) -> list[str]:
    """Roles in canonical order ("all" = every role); an unknown role raises one line listing the valid ones."""
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    for t in targets:
        if t != "all" and t not in ROLE_LAYERS:
            raise LoraLabError(f"unknown LoRA target {t!r}; valid targets: {', '.join(ROLES)}, all")
    if not targets:
        raise LoraLabError(f"no LoRA targets given; valid targets: {', '.join(ROLES)}, all")
    return list(ROLES) if "all" in targets else [role for role in ROLES if role in targets]


def role_of(module_name: str) -> Optional[str]:
    """The role of a GPT linear layer from its name ("blocks.0.attn.q_proj" -> "query"), None for other modules."""
    last = module_name.rsplit(".", 1)[-1]
    if last == "lm_head" and module_name != "lm_head":
        return None
    if ".experts." in module_name:  # an expert's projection is "experts", not "mlp" (the router is no target)
        return "experts" if last in ROLE_LAYERS["experts"] else None
    return next((role for role, layers in ROLE_LAYERS.items() if last in layers), None)


def adapted_roles(model: nn.Module) -> list[str]:
    """The roles that have LoRA layers in `model`, in canonical order: what `--lora_targets all` came to on it
    (no experts on a dense model), for the scripts' start-up line."""
    found = {role_of(name) for name, _ in lora_modules(model)}
    return [role for role in ROLES if role in found]


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def inject_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                targets: Union[str, Sequence[str]] = ("query", "value"), use_rslora: bool = False,
                use_dora: bool = False, lora_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace, in place, the nn.Linear layers of `model` that play one of `targets` by LoRALinear layers.

    Roles: query, key, value, projection (attention output), mlp (every MLP projection), lm_head, or all.
    Layers quantized with lora_lab.nf4.quantize_nf4(model) (NF4Linear) get LoRA on their 4-bit weight: QLoRA.
    The base weights are frozen (they are the same Parameters as before); every other parameter keeps its
    requires_grad: call mark_only_lora_trainable(model) before training. With tied embeddings, a LoRA on
    lm_head shares (and freezes) the embedding matrix and trains only its own A and B.
    Returns `model`.
    """
    roles = normalize_targets(targets)
    embedding = getattr(getattr(model, "wte", None), "weight", None)
    chosen = [(name, m) for name, m in model.named_modules() if role_of(name) in roles and name]
    already = [name for name, m in chosen if isinstance(m, LoRALinear)]
    if already:
        raise LoraLabError(f"the model already has LoRA on {already[0]} (and {len(already) - 1} more): "
                           f"inject_lora once per model")
    chosen = [(name, m) for name, m in chosen if isinstance(m, (nn.Linear, NF4Linear))]
    if not chosen:
        raise LoraLabError(f"found no linear layers for LoRA targets {roles} in {type(model).__name__}")
    for name, linear in chosen:
        lora = LoRALinear.from_linear(linear, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                                      use_dora=use_dora, lora_dtype=lora_dtype)
        lora.shares_weight = embedding is not None and lora.weight is embedding
        lora.train(linear.training)  # a model in eval mode must not start dropping out in its new layers
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, lora)
    return model


def mark_only_lora_trainable(model: nn.Module, bias: str = "none") -> None:
    """requires_grad only on lora_* parameters, plus biases: "none", "lora_only" (of LoRA layers) or "all"."""
    if bias not in ("none", "lora_only", "all"):
        raise LoraLabError(f"bias={bias!r} is not one of 'none', 'lora_only', 'all'")
    for name, p in model.named_parameters():
        p.requires_grad = name.rsplit(".", 1)[-1].startswith("lora_")
    if bias == "all":
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                p.requires_grad = True
    elif bias == "lora_only":
        for _, m in lora_modules(model):
            if m.bias is not None:
                m.bias.requires_grad = True


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (lora_A, lora_B and DoRA's lora_magnitude), under their model names."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1].startswith("lora_")}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied tensor (lm_head = embedding) is counted once, and an NF4 weight
    (a buffer of packed codes) as the out x in parameters it stands for."""
    params = list(model.parameters())  # nn.Module.parameters() yields each Parameter object once
    quantized = sum(m.in_features * m.out_features for m in model.modules() if holds_nf4(m))
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + quantized


def merge_lora(model: nn.Module) -> None:
    """Merge every LoRA layer into its weight. A tied lm_head with LoRA gets its own weight first (the embedding
    must not change), and model.config then says tie_embeddings=False so the merged lm_head is saved."""
    head = getattr(model, "lm_head", None)
    if isinstance(head, LoRALinear) and head.shares_weight and not head.merged:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        head.shares_weight = False
        head.untied_by_merge = True
        if getattr(model, "config", None) is not None:
            model.config = replace(model.config, tie_embeddings=False)
    for _, m in progress(list(lora_modules(model)), desc="Merging", unit="layer"):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora(model), tying lm_head to the embedding again if merge_lora untied it."""
    for _, m in lora_modules(model):
        m.unmerge()
    head = getattr(model, "lm_head", None)
    if isinstance(head, LoRALinear) and head.untied_by_merge:
        head.weight = model.wte.weight
        head.shares_weight = True
        head.untied_by_merge = False
        model.config = replace(model.config, tie_embeddings=True)


@torch.no_grad()
def merge_lora_into_dequantized(model: nn.Module, dtype: Optional[torch.dtype] = None,
                                requantize: bool = False) -> nn.Module:
    """Merge the adapters of a QLoRA model (NF4 base + LoRA) into float weights, in place; returns the model.

    Layer by layer: an NF4 weight is dequantized in float32, W + (alpha/r) B A (or DoRA's W') is formed, and the
    result rounded once to `dtype` (default: the dtype the layer was quantized from); that layer's 4-bit buffers
    are dropped as its float weight arrives, so the model is never held twice. With `dtype`, the model's other
    float tensors (embeddings, norms, biases) are cast to it as well at the end. NF4Linear layers without LoRA
    become nn.Linear layers with their dequantized weight, and float LoRA layers (e.g. on lm_head) merge as in
    merge_lora. The result computes what the NF4 base + adapter computed, up to that one rounding per weight:
    the adapter learned to correct the quantized weights, so that is the base it is merged into.

    requantize=True quantizes each merged weight again (NF4, the same block size and double quantization) and
    leaves the NF4Linear layers as they are: a 4-bit model without adapters, at the price of a second rounding
    to NF4 of the adapted layers."""
    for name, m in progress(list(model.named_modules()), desc="Merging", unit="module"):
        if not holds_nf4(m):
            continue
        settings = dict(blocksize=m.blocksize, double_quant=m.double_quant)
        target = dtype or m.dtype
        if isinstance(m, LoRALinear):
            m.dequantize_base(torch.float32)  # (out, in) float32: this layer only
            m.merge()
            if requantize:
                layer = NF4Linear.from_linear(m, **settings)  # reads m.weight and m.bias; drops the adapters
                layer.dtype = target  # what it dequantizes to by default
            else:
                m.weight = nn.Parameter(m.weight.to(target), requires_grad=False)
                continue
        elif requantize:
            continue
        else:
            layer = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            layer.weight = nn.Parameter(m.dequantize(target), requires_grad=False)
            layer.bias = m.bias  # the same (float, frozen) Parameter or None
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child_name, layer)
    merge_lora(model)  # the LoRA layers on float weights (a quantized one is merged already: a no-op)
    if dtype is not None:
        model.to(dtype)  # tensor by tensor; the merged weights are in dtype already
    return model


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source="adapter") -> None:
    """Copy adapter tensors into the LoRA layers of `model`, or raise one line saying what does not fit."""
    model_loras = dict(lora_modules(model))
    all_modules = dict(model.named_modules())
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        module_name, _, param = key.rpartition(".")
        if param not in LORA_PARAMS:
            raise LoraLabError(f"{source}: {key} is not a LoRA weight (adapter keys end in {', '.join(LORA_PARAMS)}); "
                               f"pass an adapter's {ADAPTER_WEIGHTS_FILE}, not a model checkpoint")
        by_module.setdefault(module_name, {})[param] = tensor

    adapter_roles = sorted({role_of(n) or n for n in by_module}, key=lambda r: ROLES.index(r) if r in ROLES else 99)
    for name in by_module:  # weights for layers the model lacks, or has no LoRA on
        if name not in all_modules:
            raise LoraLabError(f"{source}: adapter has weights for {name}, which the model does not have: "
                               f"it was trained on a different base model")
        if name not in model_loras:
            role = role_of(name)
            what = ROLE_WORDS.get(role, name)
            raise LoraLabError(f"{source}: adapter has weights for {what} that the model has no LoRA on "
                               f"(e.g. {name}): inject LoRA with the adapter's targets ({', '.join(adapter_roles)})")
    for name, m in model_loras.items():  # LoRA layers of the model that the adapter does not cover
        if name not in by_module:
            what = ROLE_WORDS.get(role_of(name), name)
            raise LoraLabError(f"{source}: the model has LoRA on {what} (e.g. {name}) but the adapter has no weights "
                               f"for them: inject LoRA with the adapter's targets ({', '.join(adapter_roles)})")

    for name, tensors in by_module.items():
        m = model_loras[name]
        adapter_r = tensors["lora_A"].shape[0] if "lora_A" in tensors else None
        if adapter_r is not None and adapter_r != m.r:
            raise LoraLabError(f"{source}: adapter has r={adapter_r} for {name} but the model was set up with r={m.r}: "
                               f"inject LoRA with the adapter's r")
        if "lora_magnitude" in tensors and not m.use_dora:
            raise LoraLabError(f"{source}: adapter has DoRA magnitudes (e.g. {name}.lora_magnitude) but the model was "
                               f"set up without use_dora: inject LoRA with use_dora=True")
        for param in ("lora_A", "lora_B") + (("lora_magnitude",) if m.use_dora else ()):
            if param not in tensors:
                hint = (" (the model was set up with use_dora but the adapter is plain LoRA)"
                        if param == "lora_magnitude" else "")
                raise LoraLabError(f"{source}: adapter has no {name}.{param}{hint}: the adapter is incomplete "
                                   f"or was made for a different setup")
            expected = tuple(getattr(m, param).shape)
            if tuple(tensors[param].shape) != expected:
                raise LoraLabError(f"{source}: adapter's {name}.{param} has shape {tuple(tensors[param].shape)} but "
                                   f"the model expects {expected}: it was trained on a different base model")

    with torch.no_grad():
        for name, tensors in by_module.items():
            m = model_loras[name]
            for param, tensor in tensors.items():
                p = getattr(m, param)
                if p.is_meta:  # a model built on meta: the adapter gives these parameters their memory
                    setattr(m, param, nn.Parameter(tensor.to(device=m.weight.device, dtype=p.dtype),
                                                   requires_grad=p.requires_grad))
                else:
                    p.copy_(tensor)


def lora_plus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0,
                           weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups for LoRA+: every lora_B at lr · ratio, every other trainable parameter at lr."""
    fast, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (fast if name.endswith("lora_B") else rest).append(p)
    # lr_ratio lets a learning-rate schedule (lora_lab.training.set_lr) keep B's lr at ratio times A's
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay, "lr_ratio": 1.0},
              {"params": fast, "lr": lr * ratio, "weight_decay": weight_decay, "lr_ratio": ratio}]
    return [g for g in groups if g["params"]]


# ------------------------------------------------------------------------------------------------------------
# Adapter files: lora.safetensors + lora_config.json
# ------------------------------------------------------------------------------------------------------------
@dataclass
class LoRAConfig:
    """The hyperparameters of an adapter, saved next to its weights so later tools can read them back."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["query", "value"])
    use_rslora: bool = False
    use_dora: bool = False
    lora_plus_ratio: Optional[float] = None  # None: plain AdamW; else lora_B learns ratio times faster
    base_model: str = ""  # name or checkpoint directory of the base model the adapter was trained on
    base_config: Optional[dict] = None  # the base model's Config.to_dict()
    prompt_style: str = "plain"
    # the quantization of the base during training (QLoRA), e.g. {"method": "nf4", "blocksize": 64,
    # "double_quant": True}; None: a float base. quantize_nf4(model, blocksize=..., double_quant=...) rebuilds
    # that base bit for bit from the float checkpoint
    base_quantization: Optional[dict] = None
    # how the adapter was trained, when not by plain fine-tuning on answers: finetune/dpo.py writes {"method": "dpo",
    # "loss", "beta", "reference", ...}; tools that use the adapter need nothing from it
    trained_with: Optional[dict] = None
    # how A, B (and the base) started when not by the default Kaiming A, zero B (lora_lab/lora_init.py), e.g.
    # {"method": "pissa", "niter": 4}; after pissa / olora / loftq the saved adapter is converted to rank 2r against
    # the untouched base and this also holds "trained_r", "trained_alpha" (and "base_offset", a file name)
    init: Optional[dict] = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise LoraLabError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise LoraLabError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0 <= self.dropout <= 1:
            raise LoraLabError(f"LoRA dropout must be between 0 and 1, got {self.dropout!r}")
        if self.lora_plus_ratio is not None and not self.lora_plus_ratio > 0:
            raise LoraLabError(f"lora_plus_ratio must be positive, got {self.lora_plus_ratio!r}")
        self.targets = normalize_targets(self.targets)
        q = self.base_quantization
        if q is not None and (not isinstance(q, dict) or q.get("method") != "nf4"):
            raise LoraLabError(f"base_quantization must be None or {{'method': 'nf4', ...}}, got {q!r}")
        if self.init is not None and not (isinstance(self.init, dict) and isinstance(self.init.get("method"), str)):
            raise LoraLabError(f"init must be None or {{'method': ..., ...}}, got {self.init!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def inject(self, model: nn.Module, lora_dtype: Optional[torch.dtype] = None) -> nn.Module:
        """inject_lora(model) with these hyperparameters."""
        return inject_lora(model, r=self.r, alpha=self.alpha, dropout=self.dropout, targets=self.targets,
                           use_rslora=self.use_rslora, use_dora=self.use_dora, lora_dtype=lora_dtype)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise LoraLabError(f"unknown LoRA config keys {sorted(unknown)}: not written by this lora_lab version")
        return cls(**d)


def save_lora(path_dir: Union[str, Path], model: nn.Module, lora_config: LoRAConfig) -> Path:
    """Write `lora.safetensors` (the adapter tensors) and `lora_config.json` into path_dir, each atomically."""
    path_dir = Path(path_dir)
    layers = dict(lora_modules(model))
    if not layers:
        raise LoraLabError("the model has no LoRA layers to save: call inject_lora(model, ...) first")
    name, m = next(iter(layers.items()))
    if (m.r, m.use_dora) != (lora_config.r, lora_config.use_dora):
        raise LoraLabError(f"the LoRA config (r={lora_config.r}, use_dora={lora_config.use_dora}) does not describe "
                           f"the model (r={m.r}, use_dora={m.use_dora} on {name})")
    roles = [role for role in ROLES if any(role_of(n) == role for n in layers)]
    present = {role_of(n) for n, _ in model.named_modules()}  # ("all" on a dense model has no experts, on a MoE no mlp)
    if roles != [r for r in lora_config.targets if r in present]:
        raise LoraLabError(f"the LoRA config has targets {lora_config.targets} but the model has LoRA on {roles}")
    return save_adapter_files(path_dir, lora_state_dict(model), lora_config.to_dict(), ADAPTER_WEIGHTS_FILE,
                              ADAPTER_CONFIG_FILE)


def load_lora(adapter_dir: Union[str, Path]) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """Read an adapter directory written by save_lora; every problem is one LoraLabError line."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise LoraLabError(f"adapter directory {adapter_dir} does not exist: pass the output directory of a "
                           f"fine-tuning run (it holds {ADAPTER_WEIGHTS_FILE} and {ADAPTER_CONFIG_FILE})")
    config_path, weights_path = adapter_dir / ADAPTER_CONFIG_FILE, adapter_dir / ADAPTER_WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            hint = (" (it looks like a model checkpoint, not an adapter)"
                    if (adapter_dir / "model_config.json").is_file() else "")
            raise LoraLabError(f"{adapter_dir} is not a LoRA adapter directory: {path.name} is missing{hint}; "
                               f"pass the output directory of a fine-tuning run")
    return read_adapter_files(config_path, weights_path, LoRAConfig.from_dict, "LoRA")


# ------------------------------------------------------------------------------------------------------------
# Which base an adapter goes on (LoRA's rule; LLaMA-Adapter's config has the same base_model / base_config)
# ------------------------------------------------------------------------------------------------------------
def base_checkpoint_dir(lora_config: LoRAConfig, checkpoint_dir: Optional[Union[str, Path]],
                        adapter_dir: Union[str, Path], config_file: str = ADAPTER_CONFIG_FILE) -> Path:
    """`checkpoint_dir` if given, else the base model the adapter was trained on, if that directory exists here.
    Any adapter config with a `base_model` (LLaMA-Adapter's too, saved as `config_file` in adapter_dir)."""
    if checkpoint_dir is not None:
        return Path(checkpoint_dir)
    config_path = Path(adapter_dir) / config_file
    if not lora_config.base_model:
        raise LoraLabError(f"{config_path} does not name its base model: pass --checkpoint_dir")
    if not Path(lora_config.base_model).is_dir():
        raise LoraLabError(f"{config_path} names the base model {lora_config.base_model}, which does not exist here "
                           f"(it is relative to where fine-tuning ran): pass --checkpoint_dir")
    return Path(lora_config.base_model)


def base_shape_diffs(lora_config: LoRAConfig, config: Config) -> list[str]:
    """["n_embd 48 vs 32", ...]: where the base the adapter records differs in shape from `config` ([] for an adapter
    saved without its base config: load_lora_state_dict still checks every shape)."""
    base, ours = lora_config.base_config or {}, config.to_dict()
    return [f"{k} {base[k]} vs {ours[k]}" for k in SHAPE_FIELDS if k in base and base[k] != ours[k]]


def check_adapter_fits(lora_config: LoRAConfig, config: Config, adapter_dir: Union[str, Path],
                       checkpoint_dir: Union[str, Path]) -> None:
    """One line naming the differences when the adapter was trained on a base model of other shapes."""
    diffs = base_shape_diffs(lora_config, config)
    if diffs:
        base = lora_config.base_config
        trained_on = base.get("name") or lora_config.base_model or "another model"
        raise LoraLabError(f"{adapter_dir} was trained on {trained_on}, whose shapes differ from {checkpoint_dir} "
                           f"({', '.join(diffs)}): pass the --checkpoint_dir of the base model it was trained on")
