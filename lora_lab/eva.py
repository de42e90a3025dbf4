"""EVA, Explained Variance Adaptation (Paischer et al. 2024): A from the principal directions of the layer's inputs.

A LoRA layer adds s B A x to W x, and A (r × in) decides which r directions of its input x the update can react
to at all: x only reaches the update through A x. Kaiming starts A at random directions. EVA (data-driven) starts
it where the layer's inputs vary most on the training data: with X (n × in) the inputs this layer receives on the
first training batches, one row per token,

    X - mean(X) = U S Vᵀ        A = V_rᵀ (the r leading right-singular vectors: the principal components)
                                B = 0,  W_base = W (untouched)

so the step-0 model is the base model, as with Kaiming (and QLoRA's base is NF4(W)), and the adapter is saved as
any plain LoRA: every tool reads it; lora_config.json's `init` says {"method": "eva"}.

Which tokens: only those whose labels are trained (labels != IGNORE_INDEX: the answers, not the prompts or the
padding), as PEFT's default `use_label_mask=True` does. The base runs in eval mode, without gradients.

Incremental: X is not kept. Each micro-batch X_b (n_b tokens, mean m_b) updates the running decomposition
(S, Vᵀ; mean m over n tokens so far; Ross et al. 2008, scikit-learn's IncrementalPCA) by the SVD of

    [ S Vᵀ ;  X_b - m_b ;  sqrt(n n_b / (n + n_b)) (m - m_b) ]         (k + n_b + 1) × in

whose right-singular vectors are those of all centered inputs seen so far (exactly, if S Vᵀ kept every direction;
it keeps k = r). A layer stops updating when each of its r components has cosine similarity >= tau with the
previous batch's (PEFT's convergence test); batches are read until every layer has stopped (the loader starts
over if it runs out; at most max_batches). Layers that read the same input (query, key, value; gate, up) share
one decomposition. The SVD is torch.svd_lowrank (q = 2r, 4 power iterations, a fixed seed: deterministic, and
what PEFT uses): the first batch in float32 (the inputs' own precision), the updates in float64 (they subtract
close numbers); each component's largest entry is made positive (the SVD's sign is arbitrary). With the same
batches, A equals PEFT's to float rounding.

PEFT's defaults that we keep: tau 0.99, the label mask, no whitening (`whiten=True` divides each row of A by the
square root of its singular value). Left out: PEFT's default rho = 2 moves ranks between layers (each layer gets up
to rho·r components, the r·layers largest explained-variance ratios of the whole model win, alpha scaled with the
new rank): that needs a rank per layer, which our adapters do not have; here every layer keeps rank r, which is
PEFT's EvaConfig(rho=1). Also not here: `use_label_mask=False` (our batches mark padding only in the labels) and
gathering the inputs of several processes (refused with more than one device).

Checked in tests/test_lora_init.py:
    A equals PEFT's initialize_lora_eva_weights (EvaConfig(rho=1)) on the same model and batches; B = 0, step 0
    is the base; shared inputs share A; the trained adapter saves, reloads, and PEFT gives our logits from our
    export                                                  test_eva_equals_peft_and_saves_as_a_plain_lora
    the loader's position is restored; too few trained tokens: one line
                                                            test_eva_leaves_the_loader_where_it_was_and_refuses_...
    finetune/qlora.py --lora_init eva                       test_finetune_qlora_eva
    refused for dpo, several devices, classifiers           test_script_refusals_..., test_classifier_lora_init_checks
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Iterable, Optional

import torch
import torch.nn as nn

from lora_lab.lora import lora_modules
from lora_lab.model import IGNORE_INDEX
from lora_lab.progress import progress
from lora_lab.utils import LoraLabError

SVD_SEED = 42  # torch.svd_lowrank draws a random start: a fixed seed makes EVA deterministic (PEFT's seed)


class IncrementalSVD:
    """The r leading principal components of the rows fed to `update`, one batch of rows at a time."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.n = 0
        self.mean: Optional[torch.Tensor] = None  # (in,) float64
        self.S: Optional[torch.Tensor] = None  # (k,)
        self.Vh: Optional[torch.Tensor] = None  # (k, in): the components, one per row
        self.converged = False

    @torch.no_grad()
    def update(self, X: torch.Tensor, tau: float) -> None:
        """X (n_b, in): one batch of inputs. Fewer rows than k components: skipped (nothing to decompose)."""
        n_b = X.shape[0]
        if n_b < self.k:
            return
        X = X.float()
        m_b = X.mean(0)  # (in,)
        if self.n == 0:
            M = X - X.sum(0, dtype=torch.float64).div(n_b).float()  # (n_b, in) float32
            mean = X.sum(0, dtype=torch.float64) / n_b
        else:
            correction = math.sqrt(self.n * n_b / (self.n + n_b)) * (self.mean - m_b.double())  # (in,) float64
            M = torch.cat([self.S[:, None] * self.Vh, (X - m_b).double(), correction[None]])  # (k + n_b + 1, in)
            mean = (self.n * self.mean + X.sum(0, dtype=torch.float64)) / (self.n + n_b)
        with torch.random.fork_rng(devices=[M.device] if M.device.type == "cuda" else []):
            torch.manual_seed(SVD_SEED)
            _, S, V = torch.svd_lowrank(M, q=min(2 * self.k, *M.shape), niter=4)  # V (in, q)
        Vh = V.t()[: self.k]  # (k, in)
        Vh = Vh * torch.sign(Vh.gather(1, Vh.abs().argmax(1, keepdim=True)))  # largest entry of each row positive
        if self.Vh is not None:  # converged when every component barely moved
            self.converged = bool((torch.cosine_similarity(Vh, self.Vh, dim=1) >= tau).all())
        self.n, self.mean, self.S, self.Vh = self.n + n_b, mean, S[: self.k], Vh


@torch.no_grad()
def eva_init(model: nn.Module, batches: Iterable[dict], tau: float = 0.99, whiten: bool = False,
             max_batches: int = 1000) -> dict:
    """Set every LoRA layer's A to the r leading principal components of its inputs on `batches` and B to 0
    (see the module docstring). batches: micro-batches as the training loop reads them, dicts with `input_ids`
    (B, T), `labels` (B, T) (IGNORE_INDEX where not trained) and optionally `segment_ids`; a DataLoader whose batch
    sampler has state_dict / load_state_dict is left where it was, and so is the global RNG, so training then
    reads the same batches and dropout masks it would have without EVA. The layers' weights must be on one device
    (the model's). Returns {"batches": how many were read, "layers": n, "not_converged": [names]}: layers that had
    not converged after max_batches keep their last estimate; "seconds": the time it took."""
    if not 0.0 <= tau <= 1.0:
        raise LoraLabError(f"EVA's tau {tau!r}: use a cosine similarity in [0, 1] (0.99 as in PEFT)")
    layers = dict(lora_modules(model))
    if not layers:
        raise LoraLabError("eva_init: the model has no LoRA layers (run inject_lora first)")
    for name, layer in layers.items():
        if layer.r > layer.in_features:
            raise LoraLabError(f"EVA: {name} has {layer.in_features} inputs, fewer than r={layer.r} components")
    device = next(iter(layers.values())).lora_A.device
    sampler = getattr(batches, "batch_sampler", None)
    sampler_state = sampler.state_dict() if hasattr(sampler, "state_dict") else None

    svds: dict[str, IncrementalSVD] = {}  # one per distinct input
    shares: dict[str, str] = {}  # layer -> the layer whose decomposition it shares (itself for the first)
    state = {"keep": None, "seen": {}}

    def collect(name: str, x: torch.Tensor) -> None:
        if name not in shares:  # first batch: layers reading the very same tensor share a decomposition
            fingerprint = (x.data_ptr(), tuple(x.shape), float(x.double().sum()), float(x.double().square().sum()))
            shares[name] = state["seen"].setdefault(fingerprint, name)
            if shares[name] == name:
                svds[name] = IncrementalSVD(layers[name].r)
        svd = svds.get(name) if shares[name] == name else None
        if svd is not None and not svd.converged:
            svd.update(x[state["keep"]].float(), tau)  # (n, in): the trained tokens' inputs

    handles = [layer.register_forward_pre_hook(lambda m, args, name=name: collect(name, args[0]))
               for name, layer in layers.items() if name != "lm_head"]  # a forward pre-hook, only during eva_init
    was_training = model.training
    model.eval()
    read, started = 0, time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            stream = itertools.chain.from_iterable(itertools.repeat(batches))  # starts over when it runs out
            def settled() -> str:
                return f"{sum(s.converged for s in svds.values())} of {len(svds)} decompositions settled"

            for batch in progress(stream, desc="EVA", unit="forward", postfix=settled):
                if read == max_batches or (svds and all(s.converged for s in svds.values())):
                    break
                read += 1
                input_ids = batch["input_ids"].to(device)
                state["keep"] = batch["labels"].to(device) != IGNORE_INDEX  # (B, T): the trained tokens
                segment_ids = batch.get("segment_ids")
                hidden = model(input_ids, segment_ids=None if segment_ids is None else segment_ids.to(device),
                               return_hidden=True)  # (B, T, C): what lm_head reads
                if "lm_head" in layers:
                    collect("lm_head", hidden)
                if read == 1 and not svds:
                    raise LoraLabError("EVA: no LoRA layer saw its input")
                if read == 20 and any(s.Vh is None for s in svds.values()):
                    break  # 20 batches without r trained tokens in one of them: reported below
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        if sampler_state is not None:
            sampler.load_state_dict(sampler_state)
    if any(s.Vh is None for s in svds.values()):
        raise LoraLabError(f"EVA: the batches hold fewer trained tokens than r (labels other than {IGNORE_INDEX}) "
                           f"in every batch: use longer answers or larger micro-batches")
    for name, layer in layers.items():
        svd = svds[shares[name]]
        A = svd.Vh / svd.S.sqrt()[:, None] if whiten else svd.Vh  # (r, in)
        layer.lora_A.copy_(A.to(layer.lora_A.dtype))
        layer.lora_B.zero_()
    model.lora_init_record = {}  # a plain LoRA: saved as it is (lora_init.save_trained_lora)
    return {"batches": read, "layers": len(layers), "seconds": time.perf_counter() - started,
            "not_converged": sorted(n for n in layers if not svds[shares[n]].converged)}
