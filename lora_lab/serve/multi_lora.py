"""Many LoRA adapters in one forward pass: each row of the batch gathers its own adapter's A and B.

One linear layer W serves every request; adapter k adds its low-rank update only to the rows that asked for it:

    y_b = x_b W^T + b + s_k · (x_b A_k^T) B_k^T          k = slot[b], the adapter of row b (0: none)

The adapters of a layer are stacked, A (S, r, in) and B (S, out, r) with S = loaded adapters + 1, and a batch
gathers A[slot] (B, r, in) and B[slot] (B, out, r), then runs two batched matmuls (bmm): the cost of the adapters
grows with the batch, not with how many distinct adapters it mixes (Punica's SGMV / S-LoRA's idea, here in plain
PyTorch). Slot 0 stays all zeros, so rows without an adapter get exactly the base output (adding 0.0 changes
nothing). Mixed ranks are zero-padded to the largest rank loaded: the extra rows of A and columns of B are zero,
so they add nothing. An adapter without LoRA on this layer leaves zeros in its slot here.

DoRA (lora_lab/lora.py): W' = m · (W + s B A) / ||W + s B A||. Per adapter the row scale g = m / ||W + s B A|| is
fixed at load time (the adapter and W are frozen), and

    x W'^T + b = x W^T + b + (g - 1) ⊙ x W^T + g ⊙ s (x A^T) B^T

so a DoRA slot also stores g (out,), gathered per row like A and B; other slots store g = 1 (no change).

The base layer is whatever it was (nn.Linear, or NF4Linear with --quantize nf4): it is called as is, and the
adapters stay float32 (as generate/lora.py and QLoRA training keep them). `inject_multi_lora` is the one helper
that swaps these layers in place of the targeted linear layers; the engine sets `bank.slots` before each forward.
Tested in tests/test_serve.py: each row equals LoRALinear with its own adapter, for mixed ranks and a DoRA slot, and
slot 0 (and an evicted slot) gives the base output exactly (test_multi_lora_layer_matches_lora_linear_per_row);
whole models with mixed adapters match generate/lora.py token for token
(test_concurrent_mixed_adapters_match_generate_scripts).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from lora_lab.lora import ROLE_LAYERS, role_of
from lora_lab.utils import LoraLabError


class AdapterBank:
    """What every MultiLoRALinear of a model shares: the number of slots, each slot's scaling s = alpha/r, and
    the slot of each row of the batch being computed (`slots`, (B,) LongTensor, set by the engine)."""

    def __init__(self, n_slots: int, device) -> None:
        self.n_slots = n_slots
        self.scaling = torch.zeros(n_slots, dtype=torch.float32, device=device)  # (S,)
        self.slots: Optional[torch.Tensor] = None  # (B,) or None: no row has an adapter
        self.layers: dict[str, "MultiLoRALinear"] = {}


class MultiLoRALinear(nn.Module):
    """A frozen base linear layer plus stacked adapters, one per slot; row b uses slot bank.slots[b]."""

    def __init__(self, base: nn.Module, bank: AdapterBank) -> None:
        super().__init__()
        self.base = base
        self.bank = bank
        self.in_features, self.out_features = base.in_features, base.out_features
        device = bank.scaling.device
        # rank 0 until an adapter arrives; grown (zero-padded) to the largest rank loaded
        self.lora_A = torch.zeros(bank.n_slots, 0, self.in_features, device=device)  # (S, r, in)
        self.lora_B = torch.zeros(bank.n_slots, self.out_features, 0, device=device)  # (S, out, r)
        self.dora_scale: Optional[torch.Tensor] = None  # (S, out), made when a DoRA adapter arrives

    @property
    def r(self) -> int:
        return self.lora_A.size(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # (B, T, out)
        slots = self.bank.slots
        if slots is None or self.r == 0:
            return out
        xa = x.to(torch.float32)  # (B, T, in): float32 adapters, as in training and generate/lora.py
        A = self.lora_A[slots]  # (B, r, in)
        B = self.lora_B[slots]  # (B, out, r)
        s = self.bank.scaling[slots][:, None, None]  # (B, 1, 1)
        lora = s * torch.bmm(torch.bmm(xa, A.transpose(1, 2)), B.transpose(1, 2))  # (B, T, r) -> (B, T, out)
        if self.dora_scale is None:
            return out + lora.to(out.dtype)
        g = self.dora_scale[slots][:, None, :]  # (B, 1, out)
        bias = getattr(self.base, "bias", None)
        base_no_bias = out if bias is None else out - bias  # x W^T (B, T, out)
        return out + ((g - 1) * base_no_bias.to(lora.dtype) + g * lora).to(out.dtype)

    @torch.no_grad()
    def set_slot(self, slot: int, A: Optional[torch.Tensor], B: Optional[torch.Tensor],
                 dora_scale: Optional[torch.Tensor] = None) -> None:
        """Write one adapter's A (r, in) and B (out, r) (None: no LoRA on this layer) into `slot`."""
        if A is not None and A.size(0) > self.r:  # a larger rank than any so far: zero-pad every slot
            grow = A.size(0) - self.r
            self.lora_A = torch.cat([self.lora_A, self.lora_A.new_zeros(self.bank.n_slots, grow, self.in_features)], 1)
            self.lora_B = torch.cat([self.lora_B, self.lora_B.new_zeros(self.bank.n_slots, self.out_features, grow)], 2)
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        if A is not None:
            self.lora_A[slot, :A.size(0)] = A.to(self.lora_A)
            self.lora_B[slot, :, :B.size(1)] = B.to(self.lora_B)
        if dora_scale is not None and self.dora_scale is None:
            self.dora_scale = torch.ones(self.bank.n_slots, self.out_features, device=self.lora_A.device)
        if self.dora_scale is not None:
            self.dora_scale[slot] = 1.0 if dora_scale is None else dora_scale.to(self.dora_scale)

    def base_weight(self) -> torch.Tensor:
        """W (out, in) in float32 (dequantized for an NF4 base): DoRA's norms need it."""
        if hasattr(self.base, "dequantize"):
            return self.base.dequantize(torch.float32)
        return self.base.weight.float()

    def extra_repr(self) -> str:
        return f"slots={self.bank.n_slots}, r={self.r}, dora={self.dora_scale is not None}"


def inject_multi_lora(model: nn.Module, roles, bank: AdapterBank) -> list[str]:
    """Swap, in place, every linear layer of `model` that plays one of `roles` (and is not swapped yet) for a
    MultiLoRALinear around it; returns the names of the new layers. Called again when an adapter targets more."""
    added = []
    for name, m in list(model.named_modules()):
        if not name or role_of(name) not in roles or name in bank.layers or isinstance(m, MultiLoRALinear):
            continue
        if not hasattr(m, "in_features") or isinstance(getattr(m, "base", None), nn.Module):
            continue
        if type(m).__name__ not in ("Linear", "NF4Linear"):
            raise LoraLabError(f"{name} is a {type(m).__name__}: the server puts adapters on plain or NF4 linear "
                               f"layers only")
        layer = MultiLoRALinear(m, bank)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        bank.layers[name] = layer
        added.append(name)
    return added


ALL_ROLES = tuple(ROLE_LAYERS)
