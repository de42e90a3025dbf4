"""Load the model an evaluation scores: a base checkpoint, optionally with what fine-tuning produced.

    loaded = load_model(checkpoint_dir, adapter_dir=None, quantize=None)
    loaded.model, loaded.tokenizer, loaded.about, loaded.prompt_style (the style it was tuned with)

`adapter_dir` may hold any of the fine-tuning scripts' outputs, recognised by the file that describes it:

  lora_config.json     finetune/lora.py or finetune/qlora.py: LoRA set up as in training, then merged into 16-bit
                       weights (a QLoRA adapter: into its dequantized NF4 base); with --quantize nf4 it runs
                       unmerged beside the NF4 base
  adapter_config.json  finetune/adapter.py: LLaMA-Adapter (V1 or V2) on the base
  model_config.json    finetune/full.py: a whole checkpoint, evaluated as it is (the base only checks the shapes)

The adapters are loaded by lora_lab/adapted.py, as generate/lora.py and generate/adapter.py load them.

The base is the adapter's recorded base model unless `checkpoint_dir` is given. An adapter trained on a base
of other shapes stops with one line (lora.check_adapter_fits), before any weights are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from lora_lab.adapted import adapter_kind as find_adapter_kind
from lora_lab.adapted import check_quantize, load_adapter_model, load_base, load_lora_model
from lora_lab.adapter import ADAPTER_CONFIG_FILE as LLAMA_ADAPTER_CONFIG
from lora_lab.adapter import base_checkpoint_dir as adapter_base_checkpoint_dir
from lora_lab.adapter import load_adapter
from lora_lab.checkpoint import CONFIG_FILE, load_config
from lora_lab.lora import ADAPTER_CONFIG_FILE as LORA_CONFIG
from lora_lab.lora import SHAPE_FIELDS, base_checkpoint_dir, check_adapter_fits, load_lora
from lora_lab.model import GPT
from lora_lab.nf4 import nf4_settings
from lora_lab.tokenizer import Tokenizer
from lora_lab.utils import LoraLabError, PathLike



@dataclass
class Loaded:
    model: GPT
    tokenizer: Tokenizer
    about: str  # what was loaded, for the report
    prompt_style: str  # the prompt style the model was (fine-)tuned with
    checkpoint_dir: Path  # the checkpoint whose tokenizer files and chat template apply


def adapter_kind(adapter_dir: PathLike) -> str:
    """"lora", "adapter" (LLaMA-Adapter) or "full" (a checkpoint), from the files in adapter_dir
    (lora_lab.adapted.adapter_kind); one line for anything else."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise LoraLabError(f"--adapter_dir {adapter_dir} does not exist: pass the out_dir of a finetune/*.py run")
    kind = find_adapter_kind(adapter_dir)
    if kind == "peft":
        raise LoraLabError(f"--adapter_dir {adapter_dir} is a PEFT adapter: evaluate reads lora_lab's outputs; "
                           f"evaluate it with the server (python -m lora_lab.serve) or transformers + PEFT")
    if kind is None:
        raise LoraLabError(f"--adapter_dir {adapter_dir} holds none of {LORA_CONFIG} (LoRA / QLoRA), "
                           f"{LLAMA_ADAPTER_CONFIG} (LLaMA-Adapter) or {CONFIG_FILE} (a full fine-tune): pass the "
                           f"out_dir of a finetune/*.py run")
    return kind


def read_adapter(adapter_dir: PathLike, kind: str):
    """(config, tensors) of a "lora" (LoRAConfig) or "adapter" (LLaMA-Adapter's AdapterConfig) adapter_dir."""
    return load_lora(adapter_dir) if kind == "lora" else load_adapter(adapter_dir)


def base_dir(kind: str, adapter_config, checkpoint_dir: Optional[PathLike], adapter_dir: PathLike) -> Path:
    """checkpoint_dir, or else the base model the adapter records (each kind names its own config file)."""
    rule = base_checkpoint_dir if kind == "lora" else adapter_base_checkpoint_dir
    return rule(adapter_config, checkpoint_dir, adapter_dir)


def recorded_base(adapter_dir: PathLike) -> Path:
    """The base model an adapter was trained on (its config's base_model), for evaluating the base beside it."""
    kind = adapter_kind(adapter_dir)
    if kind == "full":
        raise LoraLabError(f"{adapter_dir} is a full fine-tune, which does not record its base: pass --checkpoint_dir")
    return base_dir(kind, read_adapter(adapter_dir, kind)[0], None, adapter_dir)


def check_fits(checkpoint_dir: Optional[PathLike], adapter_dir: Optional[PathLike]) -> None:
    """Cheap checks (config files only) that base + adapter_dir can be loaded: one line if not. Run for every model
    of a comparison before the first is evaluated, so a mistake does not surface after minutes of work."""
    if adapter_dir is None:
        if checkpoint_dir is None:
            raise LoraLabError("pass --checkpoint_dir (the model to evaluate) or --adapter_dir")
        load_config(checkpoint_dir)
        return
    kind = adapter_kind(adapter_dir)
    if kind == "full":
        if checkpoint_dir is not None:  # the base is only a check here: the shapes must be the base's
            base, ours = load_config(checkpoint_dir).to_dict(), load_config(adapter_dir).to_dict()
            diffs = [f"{k} {ours[k]} vs {base[k]}" for k in SHAPE_FIELDS if ours.get(k) != base.get(k)]
            if diffs:
                raise LoraLabError(f"{adapter_dir} is a model of other shapes than {checkpoint_dir} "
                                   f"({', '.join(diffs)}): pass the --checkpoint_dir it was fine-tuned from")
        return
    adapter_config = read_adapter(adapter_dir, kind)[0]
    checkpoint_dir = base_dir(kind, adapter_config, checkpoint_dir, adapter_dir)
    check_adapter_fits(adapter_config, load_config(checkpoint_dir), adapter_dir, checkpoint_dir)


def nf4_settings_of(adapter_dirs) -> dict:
    """The NF4 settings for a --quantize nf4 base without an adapter of its own (--compare's base column): those the
    first QLoRA adapter among adapter_dirs was trained on, so both columns stand on the same 4-bit base; else
    QLoRA's defaults."""
    for adapter_dir in adapter_dirs:
        if adapter_dir is not None and adapter_kind(adapter_dir) == "lora":
            q = read_adapter(adapter_dir, "lora")[0].base_quantization
            if q:
                return {**nf4_settings(), **q}
    return nf4_settings()


def load_model(checkpoint_dir: Optional[PathLike], adapter_dir: Optional[PathLike] = None,
               quantize: Optional[str] = None, device: Union[str, torch.device] = "cpu",
               dtype: torch.dtype = torch.float32, nf4: Optional[dict] = None) -> Loaded:
    """The model (in eval mode) of base + adapter_dir, its tokenizer, a description and its prompt style.
    nf4: the settings of a --quantize nf4 base or full fine-tune (default nf4_settings(); a LoRA adapter brings
    its own: the base it was trained on)."""
    check_quantize(quantize)
    kind = adapter_kind(adapter_dir) if adapter_dir is not None else "base"

    check_fits(checkpoint_dir, adapter_dir)  # one line, before any weights are read
    if kind == "full":
        config = load_config(adapter_dir)
        model = load_base(adapter_dir, nf4=(nf4 or nf4_settings()) if quantize == "nf4" else None, device=device,
                          dtype=dtype)
        return Loaded(model, Tokenizer(adapter_dir), f"full fine-tune {adapter_dir}", config.prompt_style,
                      Path(adapter_dir))

    if kind == "base":
        config = load_config(checkpoint_dir)
        # as the adapter columns' base: quantized from the weights as stored, then cast (lora_lab/adapted.py)
        model = load_base(checkpoint_dir, nf4=(nf4 or nf4_settings()) if quantize == "nf4" else None, device=device,
                          dtype=dtype)
        about = str(checkpoint_dir) + (" (NF4)" if quantize == "nf4" else "")
        return Loaded(model, Tokenizer(checkpoint_dir), about, config.prompt_style, Path(checkpoint_dir))

    # an adapter: base + adapter as lora_lab/adapted.py loads it for generate/lora.py and generate/adapter.py
    adapter = read_adapter(adapter_dir, kind)
    adapter_config = adapter[0]
    checkpoint_dir = base_dir(kind, adapter_config, checkpoint_dir, adapter_dir)
    if kind == "lora":
        # merged into 16-bit weights (a QLoRA adapter: into its dequantized NF4 base); with nf4, beside the NF4 base
        model = load_lora_model(checkpoint_dir, adapter_dir, quantize=quantize, merge=True, device=device,
                                dtype=dtype, adapter=adapter)
        about = f"{checkpoint_dir} + {'QLoRA' if adapter_config.base_quantization else 'LoRA'} {adapter_dir}"
    else:
        model = load_adapter_model(checkpoint_dir, adapter_dir, quantize=quantize, device=device, dtype=dtype,
                                   adapter=adapter)
        about = f"{checkpoint_dir} + LLaMA-Adapter {adapter_dir}"
    return Loaded(model, Tokenizer(checkpoint_dir), about, adapter_config.prompt_style, Path(checkpoint_dir))
