"""A base model with an adapter on it, rebuilt as it was trained: the one loader of generate/, evaluate, merge, serve.

    model = load_lora_model(checkpoint_dir, "out/finetune/lora", quantize=None, merge=True, device=..., dtype=...)
    model = load_adapter_model(checkpoint_dir, "out/finetune/adapter", quantize=None, device=..., dtype=...)
    model = load_base(checkpoint_dir, nf4=None, device=..., dtype=...)

The steps, in this order, because each one decides the numbers of the next:

  1. the base. A QLoRA adapter (lora_config.json's `base_quantization`) learned to correct the NF4 weights of its
     base, so that base is rebuilt bit for bit: the weights as stored are quantized with the recorded block size
     and double quantization (quantization is deterministic), then the rest (embeddings, norms, lm_head) is cast
     to `dtype`. quantize="nf4" puts any adapter on such a 4-bit base. Otherwise the base is loaded in `dtype`.
  2. the adapter's layers, set up as in training: LoRA in float32 whatever the base's dtype (so B A is formed in
     float32 and rounded once, when it is added to W), the LLaMA-Adapter's attention (V2: its linear layers) swapped.
  3. its tensors, every name and shape checked (one line if one does not fit).
  4. merge=True folds LoRA into the weights that can absorb it: W <- W + (alpha/r) B A in 16-bit weights (decoding
     then costs what the base's does); for a QLoRA adapter on 16-bit weights, layer by layer: dequantize, add the
     update, round once to dtype. On a 4-bit base (quantize="nf4") the adapter stays beside the NF4 weights:
     they cannot absorb it. A LLaMA-Adapter never merges (its prefixes are attended to, not added).

`checkpoint_dir=None` is the base model the adapter records (lora.base_checkpoint_dir); an adapter trained on a
base of other shapes stops with one line (lora.check_adapter_fits) before any weights are read.
Tested through its users: tests/test_use_adapter.py and tests/test_qlora.py (generate/lora.py, merge_lora),
tests/test_finetune_full_adapter.py (generate/adapter.py), tests/test_evaluate.py (every kind), tests/test_serve.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from lora_lab.adapter import (ADAPTER_WEIGHTS_FILE as LLAMA_ADAPTER_WEIGHTS_FILE, AdapterConfig, base_checkpoint_dir
                              as adapter_base_checkpoint_dir, inject_adapter, load_adapter, load_adapter_state_dict)
from lora_lab.checkpoint import load_config
from lora_lab.lora import (ADAPTER_WEIGHTS_FILE, LoRAConfig, base_checkpoint_dir, check_adapter_fits, inject_lora,
                           load_lora, load_lora_state_dict, merge_lora, merge_lora_into_dequantized)
from lora_lab.lora_init import residual_base, trained_adapter
from lora_lab.model import GPT
from lora_lab.nf4 import nf4_settings, quantize_nf4
from lora_lab.utils import LoraLabError, PathLike

QUANTIZE = (None, "none", "nf4")


def check_quantize(quantize: Optional[str]) -> None:
    if quantize not in QUANTIZE:
        raise LoraLabError(f"--quantize {quantize!r}: use nf4 (or leave it out)")


def load_base(checkpoint_dir: PathLike, nf4: Optional[dict] = None, device=None,
              dtype: Optional[torch.dtype] = None, before_quantize: Optional[Callable[[GPT], None]] = None) -> GPT:
    """The base model in eval mode: THE NF4 recipe of every loader (generate/, evaluate, merge, the server).
    nf4: None for float weights in `dtype` (None: as stored); else the settings a quantized model records
    (nf4.nf4_settings(); {} for the defaults; a QLoRA adapter's base_quantization): every nn.Linear but lm_head
    quantized from the weights *as stored*, as finetune/qlora.py does (same bits whatever `dtype` is), then the
    rest cast. Quantizing after a cast to bf16 would give other codes (tests/test_nf4_recipe.py).
    before_quantize(model) changes the float weights first (lora_init.residual_base: PiSSA / OLoRA / LoftQ)."""
    if nf4 is None:
        return GPT.from_checkpoint(checkpoint_dir, device=device, dtype=dtype).eval()
    model = GPT.from_checkpoint(checkpoint_dir, device=device).eval()
    if before_quantize is not None:
        before_quantize(model)
    quantize_nf4(model, **{k: v for k, v in {**nf4_settings(), **nf4}.items() if k != "method"})  # -> NF4Linear
    if dtype is not None:
        model.to(dtype)  # embeddings, norms, lm_head; NF4 codes stay, and dequantize to the input's dtype
    return model


def add_lora(model: GPT, lora_config: LoRAConfig, tensors: dict[str, torch.Tensor], source: PathLike) -> GPT:
    """LoRA layers set up as `lora_config` trained them, in float32 (B A rounded once), then `tensors` loaded."""
    inject_lora(model, r=lora_config.r, alpha=lora_config.alpha, targets=lora_config.targets,
                use_rslora=lora_config.use_rslora, use_dora=lora_config.use_dora, lora_dtype=torch.float32)
    load_lora_state_dict(model, tensors, source=source)
    return model


def load_lora_model(checkpoint_dir: Optional[PathLike], adapter_dir: PathLike, quantize: Optional[str] = None,
                    merge: bool = True, device=None, dtype: Optional[torch.dtype] = None,
                    adapter: Optional[tuple[LoRAConfig, dict[str, torch.Tensor]]] = None) -> GPT:
    """Base + the LoRA / QLoRA adapter in adapter_dir, in eval mode (see the module docstring for the steps).

    quantize: None or "none": 16-bit weights (a QLoRA adapter: on its NF4 base, merged into the dequantized weights
    when merge=True); "nf4": a 4-bit base, the adapter unmerged beside it. merge=False leaves every LoRA layer
    unmerged (on the NF4 base for a QLoRA adapter), for callers that merge themselves. adapter: what
    load_lora(adapter_dir) returned, if the caller read it already."""
    check_quantize(quantize)
    lora_config, tensors = adapter if adapter is not None else load_lora(adapter_dir)
    checkpoint_dir = base_checkpoint_dir(lora_config, checkpoint_dir, adapter_dir)
    check_adapter_fits(lora_config, load_config(checkpoint_dir), adapter_dir, checkpoint_dir)
    q = lora_config.base_quantization  # set for a QLoRA adapter: the NF4 base it learned to correct
    nf4 = q if q else ({} if quantize == "nf4" else None)
    residual = None
    if q and (lora_config.init or {}).get("trained_r"):
        # PiSSA / OLoRA / LoftQ on NF4 (saved converted, lora_init.py): rebuild the NF4 residual base they trained
        # on and put the rank-r adapter as trained on it: the trained model bit for bit, not only to NF4 rounding
        residual = residual_base(adapter_dir, lora_config)
        lora_config, tensors = trained_adapter(lora_config, tensors)
    model = load_base(checkpoint_dir, nf4=nf4, device=device, dtype=dtype, before_quantize=residual)
    add_lora(model, lora_config, tensors, source=Path(adapter_dir) / ADAPTER_WEIGHTS_FILE).eval()
    if not merge or quantize == "nf4":
        return model  # 4-bit weights cannot absorb W + (alpha/r) B A: the adapter runs beside them
    if q:
        merge_lora_into_dequantized(model, dtype=dtype)  # layer by layer: dequantize, add, round once to dtype
    else:
        merge_lora(model)  # W <- W + (alpha/r) B A; a LoRA'd tied lm_head gets its own weight
    return model.eval()  # the layers merging made too


def load_adapter_model(checkpoint_dir: Optional[PathLike], adapter_dir: PathLike, quantize: Optional[str] = None,
                       device=None, dtype: Optional[torch.dtype] = None,
                       adapter: Optional[tuple[AdapterConfig, dict[str, torch.Tensor]]] = None) -> GPT:
    """Base + the LLaMA-Adapter (V1 or V2) in adapter_dir, in eval mode. quantize="nf4": the frozen base's linear
    layers in 4 bits (load_base's recipe), the prefixes and gates (V2: scales, biases, norms) in dtype.
    adapter: what load_adapter(adapter_dir) returned, if the caller read it already."""
    check_quantize(quantize)
    adapter_config, tensors = adapter if adapter is not None else load_adapter(adapter_dir)
    checkpoint_dir = adapter_base_checkpoint_dir(adapter_config, checkpoint_dir, adapter_dir)
    check_adapter_fits(adapter_config, load_config(checkpoint_dir), adapter_dir, checkpoint_dir)
    model = load_base(checkpoint_dir, nf4=nf4_settings() if quantize == "nf4" else None, device=device, dtype=dtype)
    # the attention (V2: and every linear layer) swapped as in training, then its tensors
    inject_adapter(model, adapter_prompt_length=adapter_config.adapter_prompt_length,
                   adapter_start_layer=adapter_config.adapter_start_layer, version=adapter_config.adapter_version)
    load_adapter_state_dict(model, tensors, source=Path(adapter_dir) / LLAMA_ADAPTER_WEIGHTS_FILE)
    return model.eval()


# ------------------------------------------------------------------------------------------------------------
# What a directory holds. Two formats share the file name adapter_config.json: LLaMA-Adapter's (finetune/adapter.py,
# beside adapter.safetensors) and PEFT's (beside adapter_model.safetensors, with a "peft_type"); this is the one
# place that tells them apart, for evaluate, the GGUF exporter and the server.
# ------------------------------------------------------------------------------------------------------------
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_KINDS = {"lora": "a LoRA / QLoRA adapter (lora_config.json)",
                 "adapter": "a LLaMA-Adapter (adapter_config.json + adapter.safetensors)",
                 "peft": "a PEFT adapter (adapter_config.json + adapter_model.safetensors)",
                 "full": "a full fine-tune (model_config.json)"}


def adapter_kind(path: PathLike) -> Optional[str]:
    """"lora", "adapter" (LLaMA-Adapter), "peft" or "full" (a checkpoint) from the files in `path`; None: none of
    them (or not a directory). Reads at most adapter_config.json, when neither weights file decides."""
    import json

    from lora_lab.adapter import ADAPTER_CONFIG_FILE as LLAMA_ADAPTER_CONFIG_FILE
    from lora_lab.checkpoint import is_checkpoint
    from lora_lab.lora import ADAPTER_CONFIG_FILE as LORA_CONFIG_FILE

    path = Path(path)
    if (path / LORA_CONFIG_FILE).is_file():
        return "lora"
    if (path / LLAMA_ADAPTER_CONFIG_FILE).is_file():  # == PEFT_CONFIG_FILE
        if (path / PEFT_WEIGHTS_FILE).is_file():
            return "peft"
        if (path / LLAMA_ADAPTER_WEIGHTS_FILE).is_file():
            return "adapter"
        try:  # no weights file yet: the config says (only PEFT's has a peft_type)
            return "peft" if "peft_type" in json.loads((path / PEFT_CONFIG_FILE).read_text()) else "adapter"
        except (OSError, ValueError):
            return "adapter"
    if is_checkpoint(path):
        return "full"
    return None
