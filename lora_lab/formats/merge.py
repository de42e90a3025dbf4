"""Merge a LoRA adapter into its base model: one ordinary checkpoint that needs no lora_lab LoRA code to run.

    python -m lora_lab.merge_lora --adapter_dir out/finetune/lora --out_dir out/merged
    python generate/base.py --checkpoint_dir out/merged --prompt "..."      # the merged model, like any other

    python -m lora_lab.merge_lora --adapter_dir out/finetune/lora --out_dir out/merged-hf --to hf
    # a Hugging Face folder: AutoModelForCausalLM.from_pretrained("out/merged-hf")

    python -m lora_lab.merge_lora --adapter_dir out/finetune/lora --to gguf --out_dir merged.gguf [--outtype q8_0]
    # one llama.cpp GGUF file (`python -m lora_lab.merge_lora ... --to gguf merged.gguf` works too); see
    # lora_lab/formats/gguf_export.py. A QLoRA adapter merges into the dequantized NF4 base, as for the other formats.

Every adapted weight becomes W + (alpha/r) B A (DoRA: m (W + s B A) / ||W + s B A||, see lora_lab/lora.py), so
the merged model computes what base + adapter computes, up to floating point rounding, at the base model's cost.

  --checkpoint_dir  the base model; default: the `base_model` the adapter was trained on (in lora_config.json)
  --dtype           the merged weights' dtype (float32, bfloat16, float16); default: the base checkpoint's
  --to              lora_lab (default: model_config.json + model.safetensors + tokenizer files, whose prompt
                    style is the adapter's), hf (config.json + model.safetensors in Hugging Face layout) or
                    gguf (one llama.cpp file, --outtype f32|f16|bf16|q8_0|q4_0, chat template of the adapter's style)

The weights are merged in place, so the model is in memory once (plus, for a LoRA on a tied lm_head, a copy of
the embedding matrix: lm_head stops sharing it, since the embedding itself must not change).

Loading base + adapter is lora_lab/adapted.py's, as for generate/lora.py and evaluation; the helpers
`base_checkpoint_dir` and `check_adapter_fits` are lora_lab/lora.py's (importable from here too).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Literal, Optional

import torch
from safetensors.torch import save_file

from lora_lab.adapted import add_lora, load_base, load_lora_model
from lora_lab.checkpoint import WEIGHTS_FILE, copy_tokenizer_files, load_config, save_checkpoint
from lora_lab.config import Config
from lora_lab.formats.hf import EXTRA_TOKENIZER_FILES, export_hf_state_dict
from lora_lab.formats.gguf_export import OUTTYPES, write_gguf_model
from lora_lab.generate import PRECISIONS
# base_checkpoint_dir, check_adapter_fits and SHAPE_FIELDS live in lora.py (export_gguf, export_peft, serve and
# the LLaMA-Adapter use them too); imported here also for `from lora_lab.merge_lora import ...`
from lora_lab.lora import (ADAPTER_WEIGHTS_FILE, SHAPE_FIELDS, LoRAConfig, base_checkpoint_dir,  # noqa: F401
                           check_adapter_fits, load_lora, merge_lora, merge_lora_into_dequantized)
from lora_lab.model import GPT
from lora_lab.utils import LoraLabError, PathLike, atomic_path, atomic_write_text, cli



def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in PRECISIONS:
        raise LoraLabError(f"unknown dtype {name!r}: use one of {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def load_merged(checkpoint_dir: PathLike, adapter_dir: PathLike,
                dtype: Optional[torch.dtype] = None) -> tuple[GPT, LoRAConfig]:
    """The base model with the adapter merged into its weights (in place), and the adapter's config."""
    lora_config, adapter = load_lora(adapter_dir)
    checkpoint_dir = base_checkpoint_dir(lora_config, checkpoint_dir, adapter_dir)
    check_adapter_fits(lora_config, load_config(checkpoint_dir), adapter_dir, checkpoint_dir)
    if lora_config.base_quantization:
        # a QLoRA adapter learned to correct the NF4 weights: rebuild that exact base (quantization is deterministic)
        model = load_lora_model(checkpoint_dir, adapter_dir, merge=False, adapter=(lora_config, adapter))
        # layer by layer: dequantize, add (alpha/r) B A, round once; never two full copies of the weights
        merge_lora_into_dequantized(model, dtype=dtype)
        return model, lora_config
    model = load_base(checkpoint_dir)  # in the dtype it is stored in
    stored = model.wte.weight.dtype
    # merge in the wider of the two dtypes, so the merged weight is rounded to the narrower one only once
    widen = dtype is not None and torch.finfo(dtype).eps < torch.finfo(stored).eps
    if widen:
        model.to(dtype)
    add_lora(model, lora_config, adapter, source=Path(adapter_dir) / ADAPTER_WEIGHTS_FILE)  # float32 adapters
    merge_lora(model)  # W <- W + (alpha/r) B A in every adapted layer; a LoRA'd tied lm_head gets its own weight
    if dtype is not None and not widen:
        model.to(dtype)  # parameter by parameter: the old copy of each is freed as the new one is made
    return model, lora_config


def merged_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The merged model's weights under the plain GPT names: without the (now folded-in) lora_* tensors."""
    return {k: v for k, v in model.state_dict().items() if not k.rsplit(".", 1)[-1].startswith("lora_")}


def merge_lora_checkpoint(checkpoint_dir: Optional[PathLike], adapter_dir: PathLike, out_dir: PathLike,
                          to: str = "lora_lab", dtype: Optional[torch.dtype] = None,
                          outtype: Optional[str] = None) -> Config:
    """Write base + adapter, merged, to out_dir (as a lora_lab checkpoint, with to="hf" a Hugging Face
    folder, with to="gguf" one llama.cpp GGUF file of `outtype`); returns the merged model's Config."""
    if to not in ("lora_lab", "hf", "gguf"):
        raise LoraLabError(f"--to {to!r}: use lora_lab, hf or gguf")
    if outtype is not None and to != "gguf":
        raise LoraLabError("--outtype is for --to gguf; use --dtype for the other formats")
    if to == "gguf" and (outtype or "f16") not in OUTTYPES:
        raise LoraLabError(f"--outtype {outtype}: use one of {', '.join(OUTTYPES)}")
    lora_config, _ = load_lora(adapter_dir)  # small; read first so a bad adapter fails before the base loads
    checkpoint_dir = base_checkpoint_dir(lora_config, checkpoint_dir, adapter_dir)
    out_dir = Path(out_dir)
    if out_dir.resolve() in (Path(checkpoint_dir).resolve(), Path(adapter_dir).resolve()):
        raise LoraLabError(f"--out_dir {out_dir} is the base checkpoint or the adapter directory: choose a new "
                           f"directory for the merged model")
    model, lora_config = load_merged(checkpoint_dir, adapter_dir, dtype)
    # the merged model is prompted the way it was fine-tuned
    config = replace(model.config, prompt_style=lora_config.prompt_style)
    state_dict = merged_state_dict(model)
    if to == "gguf":
        write_gguf_model(config, state_dict, out_dir, tokenizer_dir=checkpoint_dir, outtype=outtype or "f16")
        return config
    if to == "lora_lab":
        save_checkpoint(out_dir, config, state_dict, tokenizer_dir=checkpoint_dir)
    else:
        try:
            hf_config, hf_state_dict = export_hf_state_dict(config, state_dict)
        except LoraLabError as e:
            raise LoraLabError(f"{checkpoint_dir}: {e}") from None
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
            save_file({k: v.contiguous() for k, v in hf_state_dict.items()}, str(tmp), metadata={"format": "pt"})
        atomic_write_text(out_dir / "config.json", json.dumps(hf_config, indent=2) + "\n")
        copy_tokenizer_files(checkpoint_dir, out_dir)
        base_style = load_config(checkpoint_dir).prompt_style
        if lora_config.prompt_style != base_style:
            print(f"note: config.json has no prompt style: prompt the merged model in the adapter's style "
                  f"{lora_config.prompt_style!r} (the base model's chat template, copied along, is {base_style!r})",
                  file=sys.stderr)
    for name in EXTRA_TOKENIZER_FILES:  # the chat template, where transformers writes it to a file of its own
        src = Path(checkpoint_dir) / name
        if src.is_file():
            with atomic_path(out_dir / name) as tmp:
                shutil.copyfile(src, tmp)
    return config


def main(
    adapter_dir: Path,
    out_dir: Path,
    checkpoint_dir: Optional[Path] = None,
    to: Literal["lora_lab", "hf", "gguf"] = "lora_lab",
    dtype: Optional[str] = None,
    outtype: Optional[str] = None,
) -> None:
    """Merge a LoRA adapter into its base model and save the result.

    Args:
        adapter_dir: the output directory of a LoRA fine-tuning run (lora.safetensors + lora_config.json).
        out_dir: where the merged model goes (a new directory).
        checkpoint_dir: the base model; default: the base_model recorded in the adapter's lora_config.json.
        to: lora_lab (a checkpoint for generate/base.py and GPT.from_checkpoint), hf (a Hugging Face folder) or
            gguf (out_dir is then the .gguf file to write, for llama.cpp / Ollama / LM Studio).
        dtype: dtype of the merged weights (float32, bfloat16, float16); default: the base checkpoint's.
        outtype: with --to gguf, the GGUF weight type: f32, f16 (default), bf16, q8_0 or q4_0.
    """
    config = merge_lora_checkpoint(checkpoint_dir, adapter_dir, out_dir, to=to, dtype=_dtype(dtype), outtype=outtype)
    print(f"Merged {adapter_dir} into {config.name or 'the base model'}: saved to {out_dir}"
          + {"hf": " (Hugging Face layout)", "gguf": " (llama.cpp GGUF)"}.get(to, ""), file=sys.stderr)


def gguf_file_as_out_dir(args: list[str]) -> list[str]:
    """`... --to gguf merged.gguf`: a bare .gguf path is the --out_dir."""
    return [f"--out_dir={a}" if a.endswith(".gguf") and not a.startswith("-") and (i == 0 or
            not args[i - 1].startswith("--")) else a for i, a in enumerate(args)]


if __name__ == "__main__":
    cli(main, gguf_file_as_out_dir(sys.argv[1:]))
