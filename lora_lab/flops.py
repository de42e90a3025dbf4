"""Model FLOPs utilisation (MFU): how much of the device's peak a training run turns into model arithmetic.

    meter = FlopsMeter(model, device, dtype)       # after the method is applied (LoRA, NF4, adapter, ...)
    for batch in batches:
        ... forward + backward ...
        meter.update(batch)                        # {"input_ids", "labels"[, "segment_ids"]}
    print(meter.format(elapsed_seconds))           # "MFU 41.3% (112.4 TFLOP/s of 272.0)"

The count (only matrix multiplies; norms, RoPE, softmax and the optimizer are a few % and left out, as PaLM's
MFU does). A matrix multiply of an (n, k) input by a (k, m) weight costs 2 n k m FLOPs forward. Backward it costs
the same again for each of the two gradients it may need: the input's (so the gradient flows on to the layers
below) and the weight's (only when the weight trains). Per token and weight W (k x m = N parameters):

    trainable W (full fine-tuning, LoRA's A and B, ...):            2N + 2N + 2N = 6N
    frozen W above a trainable parameter (the gradient passes it):  2N + 2N      = 4N
    frozen W below every trainable parameter (nothing to pass on):  2N

so full fine-tuning is the familiar 6N, LoRA / QLoRA 4N_frozen + 6N_lora, and LLaMA-Adapter 2N for the blocks
below its first adapted layer (the backward pass stops there) and 4N above. A QLoRA weight counts as the matrix
it stands for (dequantizing is overhead, not model FLOPs). tests/test_flops.py checks these against
torch.utils.flop_counter.FlopCounterMode on a tiny model. One approximation: autograd also skips the input
gradients inside the first block that has a trainable parameter where they are not needed (e.g. LoRA on q and v
of block 0: k_proj's); the formula counts them, an overcount of at most one block's 2N (tested as a bound).

Attention: per layer, a query reading one key costs 2 hs FLOPs for q.k and 2 hs for the weighted sum of values,
per head: 4 nh hs per (query, key) pair forward, x3 with the backward pass (dQ, dK, dV and dP are four more
matrix multiplies of the same size) wherever the gradient flows. Pairs are counted causally (query i reads keys
0..i of its own sample: L(L+1)/2 for a sample of L tokens), which is what a causal kernel computes and what
FlashAttention's figures count.

Only the tokens that carry the model's work are counted: padding is not (it is waste, which MFU is meant to
show; packing removes it), and lm_head runs only where the loss has a target (lora_lab/model.py's fused loss
skips the rest). So  FLOPs(batch) = per_token * real tokens + per_target * targets + per_pair * causal pairs.
A classifier (lora_lab/classifier.py) has a head of n_embd x num_labels that scores every real token before
one is pooled: its "targets" are its real tokens (classification_batch_counts; tests/test_flops.py).

The peak: known GPUs' dense (no sparsity) tensor-core peaks by dtype from the vendors' datasheets (PEAK_FLOPS;
float32 on a GPU counts as TF32 when torch's float32 matmul precision allows it, as the finetune scripts set);
on a CPU, or an unknown GPU, a short measured probe of matrix multiplies of the model's width (best of a few,
with torch's threads); `peak_flops` overrides both (e.g. --peak_flops 312e12).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn

from lora_lab.model import IGNORE_INDEX

# dense peak FLOP/s by dtype (no 2:4 sparsity); "tf32" is float32 matmuls on tensor cores. Matched against
# torch.cuda.get_device_name() by the first key it contains (so the more specific names come first).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},  # SXM
    "B200": {"bf16": 2250e12, "fp16": 2250e12, "tf32": 1100e12, "fp32": 80e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12, "fp32": 31.2e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "RTX 4090": {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12},
    "RTX 3090": {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12},
    "RTX A6000": {"bf16": 154.8e12, "fp16": 154.8e12, "tf32": 77.4e12, "fp32": 38.7e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
    "T4": {"fp16": 65e12, "fp32": 8.1e12},
}

_DTYPE_KEY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class TrainingFlops:
    """FLOPs of one training step (forward + backward) as per_token * tokens + per_target * targets +
    per_pair * (query, key) pairs."""

    per_token: float  # the blocks' matrix multiplies, for every real token
    per_target: float  # lm_head, only where the loss has a target
    per_pair: float  # attention, per causal (query, key) pair

    def __call__(self, tokens: int, targets: int, pairs: int) -> float:
        return self.per_token * tokens + self.per_target * targets + self.per_pair * pairs

    def per_token_at(self, seq_len: int, target_fraction: float = 1.0) -> float:
        """FLOPs per token of rows of `seq_len` real tokens (e.g. 6N + attention for full fine-tuning)."""
        return self.per_token + self.per_target * target_fraction + self.per_pair * (seq_len + 1) / 2


def _matmul_shape(module: nn.Module) -> Optional[int]:
    """in x out of a linear layer (nn.Linear, LoRALinear, NF4Linear, ...), or None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    n_in, n_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    return n_in * n_out if isinstance(n_in, int) and isinstance(n_out, int) else None


def _weight_trains(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.requires_grad


def training_flops(model: nn.Module) -> TrainingFlops:
    """The FLOPs per token, per target and per attention pair of a training step of `model` (a lora_lab GPT with
    its method applied), from its shapes (the config) and which parameters train (the method)."""
    config = model.config
    blocks = list(model.blocks)
    trains = [any(p.requires_grad for p in b.parameters()) for b in blocks]
    head_trains = _weight_trains(model.lm_head) or any(p.requires_grad for p in model.lm_head.parameters())
    first = next((i for i, t in enumerate(trains) if t), len(blocks))  # the gradient flows down to this block
    if model.wte.weight.requires_grad and not head_trains:  # only the embeddings train: gradient through all
        first = 0
    per_token = 0.0
    for i, block in enumerate(blocks):
        grad_flows = i >= first
        for module_name, module in block.named_modules():
            n = _matmul_shape(module)
            if n is None:
                continue
            # a mixture of experts runs n_expert_per_token of its n_expert experts on each token
            share = config.n_expert_per_token / config.n_expert if ".experts." in f".{module_name}" else 1.0
            per_token += share * 2 * n * (1 + grad_flows + _weight_trains(module))  # forward, input grad, weight grad
            for name in ("lora_A", "lora_B"):  # LoRA's own matrices: trainable, 6 per parameter
                p = getattr(module, name, None)
                if isinstance(p, torch.Tensor):
                    per_token += share * 2 * p.numel() * (1 + grad_flows + p.requires_grad)
    any_trains = first < len(blocks) or head_trains
    n_head = _matmul_shape(model.lm_head) or config.n_embd * config.vocab_size
    # the head's input gradient is needed only if something below it trains (a classifier's head-only method)
    grad_below = first < len(blocks) or model.wte.weight.requires_grad
    per_target = 2 * n_head * (1 + grad_below + head_trains)
    for name in ("lora_A", "lora_B"):
        p = getattr(model.lm_head, name, None)
        if isinstance(p, torch.Tensor):
            per_target += 2 * p.numel() * (1 + any_trains + p.requires_grad)
    attn_layers = sum(1 + 2 * (i >= first) for i in range(len(blocks)))  # forward, plus 2x where grads flow
    per_pair = 4 * config.n_head * config.head_size * attn_layers
    return TrainingFlops(per_token, per_target, per_pair)


def batch_counts(batch: dict) -> tuple[int, int, int]:
    """(real tokens, targets, causal attention pairs) of a training batch {"input_ids", "labels"[,
    "segment_ids"]}. A row's real tokens end at its last target: the SFT data ends every sample with its answer
    (and EOS), so what follows is padding; packed rows restart positions (and pairs) in each segment."""
    if batch["labels"].dim() == 1:  # a classifier's batch: one label per text
        return classification_batch_counts(batch)
    labels = batch["labels"]  # (B, T)
    B, T = labels.shape
    idx = torch.arange(T, device=labels.device)
    is_target = labels != IGNORE_INDEX  # (B, T)
    targets = int(is_target[:, 1:].sum())
    last = torch.where(is_target, idx, -1).amax(dim=1, keepdim=True)  # (B, 1) -1: no target at all
    real = idx <= last  # (B, T)
    segment_ids = batch.get("segment_ids")
    if segment_ids is not None:
        positions = _segment_positions(segment_ids)  # (B, T)
    else:
        positions = idx.expand(B, T)
    pairs = int(((positions + 1) * real).sum())
    return int(real.sum()), targets, pairs


def classification_batch_counts(batch: dict) -> tuple[int, int, int]:
    """(real tokens, head positions, causal attention pairs) of a classifier's batch {"input_ids",
    "attention_mask", "labels" (B,)[, "segment_ids"]} (lora_lab/data/classification.py). The model runs every
    position and its head (a small Linear(n_embd, num_labels), lora_lab/classifier.py) scores every position
    before one is pooled, so the head counts at every real token; padding is left out, as for SFT batches.
    Pairs are causal within each text (a packed row's texts, or an unpacked row's one text, left or right
    padded)."""
    segment_ids = batch.get("segment_ids")
    if segment_ids is None:
        segment_ids = batch["attention_mask"]  # (B, T) 1 real / 0 pad: one text per row
    real = segment_ids > 0  # (B, T)
    positions = _segment_positions(segment_ids)  # (B, T) restarting at each text's first token
    tokens = int(real.sum())
    return tokens, tokens, int(((positions + 1) * real).sum())


def _segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions (B, T) restarting at 0 wherever the id changes (as lora_lab.model.segment_positions_and_mask,
    without building its (B, T, T) mask)."""
    T = segment_ids.size(1)
    idx = torch.arange(T, device=segment_ids.device)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.cummax(torch.where(starts, idx, 0), dim=1).values
    return idx - first


# ------------------------------------------------------------------------------------------------------------
# The device's peak
# ------------------------------------------------------------------------------------------------------------
_probe_cache: dict = {}


def measure_peak_flops(device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                       size: int = 1024, seconds: float = 0.3, fresh: bool = False) -> float:
    """FLOP/s of square matrix multiplies of `size` in `dtype` on `device`, best of repeats over ~`seconds`
    (with torch's current threads): an attainable peak where no datasheet applies (a CPU). Cached; `fresh`
    measures again and keeps the best of all probes so far (a benchmark probes between its timed steps, so that
    a machine that other work slows down is not judged against a peak taken at a busier moment)."""
    device = torch.device(device)
    key = (str(device), dtype, size, torch.get_num_threads())
    if key in _probe_cache and not fresh:
        return _probe_cache[key]
    # its own generator: the probe runs at the first progress line, and drawing from the global RNG there would
    # shift every later dropout mask (a resumed run, which probes again, would no longer train as the uninterrupted one)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=gen).to(dtype)
    b = torch.randn(size, size, device=device, generator=gen).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up
    sync()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    _probe_cache[key] = max(2 * size**3 / best, _probe_cache.get(key, 0.0))
    return _probe_cache[key]


def peak_flops_of(device: Union[str, torch.device], dtype: torch.dtype,
                  peak_flops: Optional[float] = None) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) for training in `dtype` on `device`."""
    if peak_flops:
        return float(peak_flops), "--peak_flops"
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = _DTYPE_KEY.get(dtype, "fp32")
        if key == "fp32" and torch.get_float32_matmul_precision() != "highest":
            key = "tf32"
        for gpu, peaks in PEAK_FLOPS.items():
            if gpu in name and key in peaks:
                return peaks[key], f"{gpu} {key} datasheet"
    return measure_peak_flops(device, dtype), f"measured {dtype_name(dtype)} matmul probe"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def format_flops(flops: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if flops >= scale:
            return f"{flops / scale:.1f} {unit}"
    return f"{flops / 1e6:.1f} MFLOP"


# ------------------------------------------------------------------------------------------------------------
# What the training loops use
# ------------------------------------------------------------------------------------------------------------
class FlopsMeter:
    """Model FLOPs of the batches trained on so far in this process, and MFU against the device's peak.

    Build it after the method is applied (it reads which parameters train). The peak is resolved at the first
    `format` / `mfu` (a CPU probe takes ~0.3 s), not at construction."""

    def __init__(self, model: nn.Module, device: Union[str, torch.device], dtype: Optional[torch.dtype] = None,
                 peak_flops: Optional[float] = None) -> None:
        self.flops = training_flops(model)
        self.device = torch.device(device)
        self.dtype = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self.peak_override = peak_flops
        self._peak: Optional[tuple[float, str]] = None
        self.total = 0.0  # model FLOPs so far

    @classmethod
    def for_fabric(cls, model: nn.Module, fabric, peak_flops: Optional[float] = None) -> "FlopsMeter":
        """For a Fabric run: its device, and the compute dtype of its precision plugin."""
        plugin = getattr(fabric.strategy, "precision", None)
        precision = str(getattr(plugin, "precision", "32-true"))
        dtype = torch.bfloat16 if precision.startswith("bf16") else \
            torch.float16 if precision.startswith("16") else torch.float32
        return cls(model, fabric.device, dtype, peak_flops)

    @property
    def peak(self) -> float:
        if self._peak is None:
            self._peak = peak_flops_of(self.device, self.dtype, self.peak_override)
        return self._peak[0]

    @property
    def peak_source(self) -> str:
        self.peak  # noqa: B018 (resolve it)
        return self._peak[1]

    def update(self, batch: dict) -> float:
        """Count one micro-batch; returns its FLOPs."""
        flops = self.flops(*batch_counts(batch))
        self.total += flops
        return flops

    def achieved(self, elapsed: float) -> float:
        return self.total / max(elapsed, 1e-9)

    def mfu(self, elapsed: float) -> float:
        return self.achieved(elapsed) / self.peak

    def format(self, elapsed: float) -> str:
        """For the progress line: 'MFU 41.3%'."""
        return f"MFU {100 * self.mfu(elapsed):.1f}%"

    def summary(self, elapsed: float) -> str:
        """For the final line: 'MFU 41.3% (112.4 TFLOP/s of 272.0 TFLOP/s, A100 bf16 datasheet)'."""
        return (f"MFU {100 * self.mfu(elapsed):.1f}% ({format_flops(self.achieved(elapsed))}/s of "
                f"{format_flops(self.peak)}/s, {self.peak_source})")
