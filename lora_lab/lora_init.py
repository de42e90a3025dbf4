"""Where LoRA starts: Kaiming (the default), Gaussian, PiSSA, OLoRA and LoftQ initialisation.

A LoRA layer computes  W_base + s · B A  (s = alpha/r, or alpha/sqrt(r) with rsLoRA; A (r × in), B (out × r)).
Plain LoRA starts with B = 0, so the layer starts at its base. The inits below choose A, B and W_base differently;
W is the checkpoint's weight (out × in), everything is computed in float32:

    kaiming      A ~ Kaiming-uniform (|A_ij| <= 1/sqrt(in)), B = 0,  W_base = W      (lora.py; PEFT's True)
    gaussian     A ~ N(0, 1/r²),                             B = 0,  W_base = W      (PEFT's "gaussian")
    pissa        W = U S Vᵀ (SVD); the r largest singular triplets go to the adapter (Meng et al. 2024):
                 A = sqrt(S_r/s) V_rᵀ,  B = U_r sqrt(S_r/s),  W_base = W - s B A   (the "residual": the other
                 singular directions). s B A = U_r S_r V_rᵀ: the adapter trains the principal part of W.
    pissa_niter_N  the same with torch.svd_lowrank(W, q=r, niter=N) (randomized: a few power iterations instead of
                 a full SVD; minutes saved on 7B models, nearly the same U_r, S_r, V_r).
    olora        W = Q R (QR); A = R[:r], B = Q[:, :r] (orthonormal columns),  W_base = W - s B A
                 (Büyükakyüz 2024).
    loftq        only on a quantized base (Li et al. 2023): alternate T times (--loftq_iter)
                     Q_t = NF4(W - L_{t-1} R_{t-1})     (L_0 R_0 = 0)
                     L_t R_t = best rank-r approximation of W - Q_t (SVD, split as sqrt(S) to each side)
                 then W_base = Q_T (stored in NF4: the 4-bit base of QLoRA) and s B A = L_T R_T.
    eva          data-driven (Paischer et al. 2024): A = the r leading principal components of the layer's inputs
                 on the first training batches, B = 0, W_base = W. It needs the data, so init_lora leaves A as
                 kaiming does and the script then calls lora_lab.eva.eva_init(model, batches) (lora_lab/eva.py).

Step 0. For pissa and olora, W_base + s B A = (W - s B A) + s B A = W: the model starts exactly at the checkpoint
(in float32, to rounding; tests/test_lora_init.py checks it). Plain QLoRA starts at NF4(W) and its first job is to
learn the quantization error W - NF4(W). LoftQ starts at Q_T + L_T R_T, and L_T R_T is the best rank-r
approximation of W - Q_T, so |W - (Q_T + s B A)| < |W - Q_T|: it starts closer to W than the quantized base does
(checked too; each iteration can only improve it further). QLoRA + PiSSA quantizes the residual instead of W:
NF4(W - s B A) + s B A is closer to W than NF4(W), because the residual has its largest directions removed
and so smaller block maxima (finer NF4 steps).

Merging and saving. The trained layer is W_base + s B A. For kaiming and gaussian, W_base is the checkpoint and the
adapter is saved as it is. For pissa, olora and loftq, W_base is not the checkpoint, so an adapter applied to the
checkpoint would be wrong (pissa: the principal part counted twice). They are saved converted, as PEFT's
`path_initial_model_for_weight_conversion` does: with B0, A0 the adapter at step 0,

    W_base + s B A = W + s (B A - B0 A0) = W + s [B, -B0] [A; A0]

an ordinary LoRA of rank 2r against the untouched checkpoint (alpha doubled, or times sqrt(2) with rsLoRA, so the
scale s stays). lora.safetensors holds that adapter and lora_config.json's `init` records the method and the
trained rank: generate, merge, evaluate, the server, PEFT export and GGUF export read it like any other LoRA.
On a float base (pissa, olora) it is the trained model exactly (to float rounding). On a quantized base the
trained model is NF4(W_base) + s B A, which the converted adapter on W reproduces up to the quantization error of
W_base only (for LoftQ that is |W - Q_T - s B0 A0|, what LoftQ minimised). To rebuild it bit for bit,
lora_base.safetensors keeps the low-rank product that was taken from W before quantizing (pissa, olora: s B0 A0;
LoftQ with T > 1: L_{T-1} R_{T-1}; LoftQ with T = 1 quantizes W itself and needs nothing):
lora_lab.adapted.load_lora_model rebuilds NF4(W - that) + s B A from the checkpoint (`residual_base`), so
generate, evaluate and merge give the trained QLoRA model exactly, as they do for plain QLoRA.

LoftQ on a float base is refused: with nothing quantized, its Q_T would be thrown away. PEFT's LoftQ sets B A =
L_T R_T whatever the scale s (right only for alpha = r); here s B A = L_T R_T for every alpha (equal to PEFT's at
alpha = r). DoRA with a base-changing init is refused (its magnitude is defined against W). As quantize_nf4 does,
lm_head stays float in QLoRA: LoftQ leaves its adapter at the default init, PiSSA / OLoRA give it a float residual;
a tied lm_head then gets its own weight (vocab × d more memory) and the embedding keeps W.

Each claim is checked in tests/test_lora_init.py:
    A, B and W_base equal PEFT's (gaussian, pissa, pissa_niter_N, olora)  test_init_equals_peft
    LoftQ equals PEFT's loftq_init (bitsandbytes NF4), starts closer to W  test_loftq_equals_peft_and_starts_closer_...
    s B A = L_T R_T for any alpha                                        test_loftq_scales_with_alpha
    step 0 is the checkpoint (pissa, olora)                              test_float_step_0_is_the_base_model
    QLoRA + PiSSA: NF4(residual) + s B A closer to W than NF4(W)         test_qpissa_quantizes_the_residual_closer_to_w
    after training, the converted adapter (ours, PEFT's) and the rebuilt
    QLoRA base give the trained model                                    test_trained_adapter_is_reproduced_from_the_...
    the scripts: finetune/lora.py, qlora.py; refusals in one line         test_finetune_*, test_script_refusals_*
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from lora_lab.checkpoint import save_adapter_files
from lora_lab.lora import (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, LoRAConfig, LoRALinear, lora_modules,
                           lora_state_dict, save_lora)
from lora_lab.nf4 import NF4Linear, dequantize_nf4, move_nf4_weight, quantize_nf4
from lora_lab.utils import LoraLabError, atomic_path

LORA_INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_N", "olora", "loftq", "eva")
BASE_CHANGING = ("pissa", "olora", "loftq")  # inits whose W_base is not the checkpoint: saved converted
BASE_OFFSET_FILE = "lora_base.safetensors"


def parse_lora_init(name: str) -> dict:
    """'pissa_niter_4' -> {'method': 'pissa', 'niter': 4}; one line listing the choices for anything else."""
    m = re.fullmatch(r"pissa_niter_(\d+)", str(name))
    if m:
        if int(m.group(1)) < 1:
            raise LoraLabError(f"--lora_init {name}: the number of power iterations must be at least 1")
        return {"method": "pissa", "niter": int(m.group(1))}
    if name not in LORA_INITS or name == "pissa_niter_N":
        raise LoraLabError(f"--lora_init {name!r}: use one of {', '.join(LORA_INITS)} (N: power iterations, e.g. "
                           f"pissa_niter_4)")
    return {"method": name}


def check_lora_init(name: str, quantized: bool, use_dora: bool = False, loftq_iter: int = 1) -> dict:
    """The parsed init, or one line saying why it cannot run here (checked before any model is loaded)."""
    init = parse_lora_init(name)
    method = init["method"]
    if method == "loftq" and not quantized:
        raise LoraLabError("--lora_init loftq only helps a quantized base (it fits the adapter to the quantization "
                           "error): use finetune/qlora.py, or pissa / olora on a float base")
    if isinstance(loftq_iter, bool) or not isinstance(loftq_iter, int) or loftq_iter < 1:
        raise LoraLabError(f"--loftq_iter {loftq_iter!r}: use a positive number of alternating steps (1 as in PEFT)")
    if method == "loftq":
        init["loftq_iter"] = loftq_iter
    if use_dora and method in BASE_CHANGING:
        raise LoraLabError(f"--lora_init {name} changes the base weight, which DoRA's magnitude is defined "
                           f"against: use it without --use_dora")
    return init


# ------------------------------------------------------------------------------------------------------------
# One layer: each returns the base offset (c, B_off, A_off) with W_base = W - (c B_off) A_off, or None
# ------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def gaussian_init_(layer: LoRALinear) -> None:
    """A ~ N(0, 1/r²), B = 0 (PEFT's "gaussian")."""
    nn.init.normal_(layer.lora_A, std=1 / layer.r)
    nn.init.zeros_(layer.lora_B)


@torch.no_grad()
def pissa_factors(weight: torch.Tensor, r: int, scaling: float, niter: Optional[int] = None):
    """A (r, in), B (out, r) in float32 with s B A = U_r S_r V_rᵀ of `weight` (out, in)."""
    w = weight.float()
    if niter is None:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)  # (out, k), (k,), (k, in)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(w, r, niter=niter)  # randomized: draws from the global RNG
        Vh = V.t()
    S = S / scaling
    return torch.diag(torch.sqrt(S)) @ Vh, U @ torch.diag(torch.sqrt(S))  # A (r, in), B (out, r)


@torch.no_grad()
def olora_factors(weight: torch.Tensor, r: int):
    """A = R[:r] (r, in), B = Q[:, :r] (out, r) of the QR decomposition of `weight` (out, in), float32."""
    Q, R = torch.linalg.qr(weight.float())
    return R[:r].contiguous(), Q[:, :r].contiguous()


@torch.no_grad()
def loftq_factors(weight: torch.Tensor, r: int, scaling: float, nf4: dict, iters: int = 1):
    """LoftQ's alternation in our NF4. Returns (A, B, L_prev, R_prev): s B A = L_T R_T, and the base is
    NF4(W - L_prev R_prev) (L_prev R_prev = L_{T-1} R_{T-1}; None when T = 1: the base is NF4(W))."""
    w = weight.float()
    res, prev = w, None
    for t in range(iters):
        packed, state = quantize_nf4(res, **nf4)
        q = dequantize_nf4(packed, state, torch.float32)  # (out, in)
        U, S, Vh = torch.linalg.svd(w - q, full_matrices=False)
        L = U @ torch.sqrt(torch.diag(S)[:, :r])  # (out, r)
        R = torch.sqrt(torch.diag(S)[:r, :]) @ Vh  # (r, in)
        if t + 1 == iters:
            break
        prev = (L, R)
        res = w - torch.mm(L, R)
    return R / math.sqrt(scaling), L / math.sqrt(scaling), *(prev if prev else (None, None))


def _set_base(layer: LoRALinear, residual: torch.Tensor, nf4: Optional[dict]) -> None:
    """The layer's frozen weight becomes `residual` (float32): cast to the weight's dtype, or quantized to NF4 from
    float32 (one rounding) with the layer keeping the dtype it dequantizes to."""
    dtype = layer.weight.dtype
    if nf4 is None:
        layer.weight = nn.Parameter(residual.to(dtype), requires_grad=False)
        return
    shell = NF4Linear(layer.in_features, layer.out_features, bias=False, device="meta", **nf4)
    shell.quantize(residual)
    shell.dtype = dtype
    move_nf4_weight(shell, layer)


def subtract_offset(weight: torch.Tensor, scale: float, B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """W - (scale · B) @ A in float32: the one formula for the residual, at init and when it is rebuilt."""
    return weight.float() - (scale * B.float()) @ A.float()


# ------------------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------------------
def init_lora(model: nn.Module, init: Union[str, dict] = "kaiming", nf4: Optional[dict] = None,
              loftq_iter: int = 1, device=None) -> dict[str, torch.Tensor]:
    """Initialise every LoRA layer of `model` (on float base weights) by `init`; with nf4 settings
    ({"blocksize", "double_quant"}), also store each LoRA layer's base in NF4 (the residual for pissa / olora,
    LoftQ's Q_T; W itself otherwise), so that quantize_nf4(model) afterwards handles only the other layers.

    Returns what saving and rebuilding need (empty for kaiming / gaussian), all float32 on the CPU:
    `{layer}.lora_A` / `.lora_B`, the adapter at step 0, and `{layer}.offset_A` / `.offset_B` with the scale in
    `offset_scale`, the product taken from W before quantizing (see the module docstring). It is also kept on the
    model as `model.lora_init_record`, where save_trained_lora finds it. device: where the SVD / QR / quantization
    run, one layer at a time (e.g. the GPU while the model is still on the CPU; default: where each weight is)."""
    init = check_lora_init(init, nf4 is not None, loftq_iter=loftq_iter) if isinstance(init, str) else init
    nf4 = None if nf4 is None else {k: v for k, v in nf4.items() if k != "method"}  # nf4.nf4_settings() has one
    method = init["method"]
    layers = list(lora_modules(model))
    for name, layer in layers:  # every refusal before any work
        if layer.quant_type is not None:
            raise LoraLabError(f"{name} is already quantized: inject LoRA on the float model, run init_lora "
                               f"(with the NF4 settings), then quantize_nf4(model)")
        if method in BASE_CHANGING and layer.use_dora:
            raise LoraLabError(f"--lora_init {method} changes the base weight, which DoRA's magnitude is defined "
                               f"against: use it without --use_dora")
    record: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        # as quantize_nf4(model) would: lm_head and a weight shared with the embedding stay float
        layer_nf4 = nf4 if name != "lm_head" and not layer.shares_weight else None
        if method == "gaussian":
            gaussian_init_(layer)
        offset = None
        home = layer.weight.device
        if method == "loftq" and layer_nf4 is None:  # a float lm_head: nothing to fit, the default init (B = 0)
            record[f"{name}.lora_A"] = torch.zeros(layer.r, layer.in_features)
            record[f"{name}.lora_B"] = torch.zeros(layer.out_features, layer.r)
        elif method in ("pissa", "olora", "loftq"):
            w = layer.weight.detach().to(device or home)
            if method == "pissa":
                A, B = pissa_factors(w, layer.r, layer.scaling, init.get("niter"))
                offset = (layer.scaling, B, A)
            elif method == "olora":
                A, B = olora_factors(w, layer.r)
                offset = (layer.scaling, B, A)
            else:
                A, B, L_prev, R_prev = loftq_factors(w, layer.r, layer.scaling, layer_nf4, init.get("loftq_iter", 1))
                offset = (1.0, L_prev, R_prev) if L_prev is not None else None
            with torch.no_grad():
                layer.lora_A.copy_(A)
                layer.lora_B.copy_(B)
            record[f"{name}.lora_A"], record[f"{name}.lora_B"] = A.cpu(), B.cpu()
            if offset is not None:
                record[f"{name}.offset_A"], record[f"{name}.offset_B"] = offset[2].cpu(), offset[1].cpu()
                record[f"{name}.offset_scale"] = torch.tensor(float(offset[0]))
        if layer_nf4 is not None or offset is not None:
            w = layer.weight.detach().to(device or home)
            residual = subtract_offset(w, *offset) if offset is not None else w.float()
            _set_base(layer, residual, layer_nf4)
            layer.shares_weight = False  # a tied lm_head gets its own (residual) weight: the embedding keeps W
            if layer.weight.device != home:  # the NF4 buffers (or the float residual) back where the model is
                layer.to(home)
            if layer.use_dora:  # (kaiming / gaussian: B = 0) the magnitude starts at the row norms of the new base
                with torch.no_grad():
                    layer.lora_magnitude.copy_(layer._dora_row_norm())
    model.lora_init_record = record  # a plain attribute: not in the state dict, not moved by .to()
    return record


def init_config(init: Union[str, dict], loftq_iter: int = 1) -> Optional[dict]:
    """What lora_config.json's `init` records for an init: None for the default (kaiming)."""
    init = parse_lora_init(init) if isinstance(init, str) else dict(init)
    if init["method"] == "loftq":
        init.setdefault("loftq_iter", loftq_iter)
    return None if init["method"] == "kaiming" else init


# ------------------------------------------------------------------------------------------------------------
# Saving: an ordinary LoRA against the untouched checkpoint
# ------------------------------------------------------------------------------------------------------------
def converted_lora(model: nn.Module, lora_config: LoRAConfig, record: dict[str, torch.Tensor]
                   ) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """The trained adapter as W + s [B, -B0] [A; A0]: rank 2r, same scale s, float32 (PEFT's conversion)."""
    tensors = {}
    for key, t in lora_state_dict(model).items():
        t0 = record[key].to(t.device)
        tensors[key] = (torch.cat([t.float(), t0], dim=0) if key.endswith("lora_A")
                        else torch.cat([t.float(), -t0], dim=1)).cpu()
    alpha = lora_config.alpha * (math.sqrt(2) if lora_config.use_rslora else 2)
    init = dict(lora_config.init or {}, trained_r=lora_config.r, trained_alpha=lora_config.alpha)
    if any(k.endswith(".offset_A") for k in record):
        init["base_offset"] = BASE_OFFSET_FILE
    return replace(lora_config, r=2 * lora_config.r, alpha=alpha, init=init), tensors


def save_trained_lora(out_dir: Union[str, Path], model: nn.Module, lora_config: LoRAConfig,
                      record: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """save_lora, except after pissa / olora / loftq: then the converted adapter (rank 2r, against the checkpoint)
    and, when the base was W minus a low-rank product, that product's factors in lora_base.safetensors.
    record: what init_lora returned (default: the one it kept on the model)."""
    record = getattr(model, "lora_init_record", None) if record is None else record
    if not record:
        return save_lora(out_dir, model, lora_config)
    config, tensors = converted_lora(model, lora_config, record)
    offsets = {k: v.contiguous() for k, v in record.items() if ".offset_" in k}
    if offsets:  # written first: the adapter files name it
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with atomic_path(Path(out_dir) / BASE_OFFSET_FILE) as tmp:
            save_file(offsets, str(tmp), metadata={"format": "pt", "lora_lab": "1"})
    return save_adapter_files(out_dir, tensors, config.to_dict(), ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE)


# ------------------------------------------------------------------------------------------------------------
# Rebuilding the trained QLoRA model from the checkpoint (lora_lab.adapted.load_lora_model)
# ------------------------------------------------------------------------------------------------------------
def trained_adapter(lora_config: LoRAConfig, tensors: dict[str, torch.Tensor]
                    ) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """From a converted adapter, the rank-r adapter as trained (the first r rows of A, columns of B)."""
    init = lora_config.init or {}
    r = init.get("trained_r")
    if r is None:
        return lora_config, tensors
    out = {k: (t[:r] if k.endswith("lora_A") else t[:, :r]) for k, t in tensors.items()}
    return replace(lora_config, r=r, alpha=init["trained_alpha"]), out


def residual_base(adapter_dir: Union[str, Path], lora_config: LoRAConfig):
    """A function for lora_lab.adapted.load_base: sets each LoRA'd linear layer's weight to W - (c B_off) A_off
    (float32, to be quantized as in training); None when the adapter needs no such base."""
    if not (lora_config.init or {}).get("base_offset"):
        return None
    path = Path(adapter_dir) / lora_config.init["base_offset"]
    if not path.is_file():
        raise LoraLabError(f"{path} is missing: {adapter_dir} was trained with --lora_init "
                           f"{lora_config.init['method']} on a quantized base, whose rebuilding needs it; copy it "
                           f"with the adapter (or load with --quantize none to use the converted adapter)")
    offsets = load_file(str(path))

    def apply(model: nn.Module) -> None:
        for key in offsets:
            if not key.endswith(".offset_A"):
                continue
            name = key[: -len(".offset_A")]
            linear = model.get_submodule(name)
            residual = subtract_offset(linear.weight.detach(), offsets[f"{name}.offset_scale"].item(),
                                       offsets[f"{name}.offset_B"].to(linear.weight.device),
                                       offsets[f"{name}.offset_A"].to(linear.weight.device))
            linear.weight = nn.Parameter(residual, requires_grad=False)  # float32: NF4 quantizes it from float32
    return apply
