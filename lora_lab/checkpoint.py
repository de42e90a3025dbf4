"""The lora_lab checkpoint format, and loading it with errors that say what is wrong.

A checkpoint is a directory:
    model_config.json     the `Config` of the model (see lora_lab/config.py)
    model.safetensors     the weights, under the parameter names of lora_lab.model.GPT
    tokenizer.json | tokenizer.model, tokenizer_config.json, generation_config.json   (copied from the source)

Weights are only ever read with safetensors, so loading a checkpoint never runs code from the file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, TypeVar, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lora_lab.config import Config
from lora_lab.utils import LoraLabError, atomic_path, atomic_write_text

CONFIG_FILE = "model_config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json")

HOW_TO_GET = ("download one with `python -m lora_lab.download REPO_ID` or convert one with "
              "`python -m lora_lab.convert SRC OUT_DIR`")


def is_checkpoint(path: Union[str, Path]) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def load_config(checkpoint_dir: Union[str, Path]) -> Config:
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise LoraLabError(f"Checkpoint directory {checkpoint_dir} does not exist: {HOW_TO_GET}")
    path = checkpoint_dir / CONFIG_FILE
    if not path.is_file():
        hint = (f"it looks like a Hugging Face folder: convert it with `python -m lora_lab.convert {checkpoint_dir} OUT_DIR`"
                if (checkpoint_dir / "config.json").is_file() else HOW_TO_GET)
        raise LoraLabError(f"{checkpoint_dir} is not a lora_lab checkpoint (no {CONFIG_FILE}): {hint}")
    try:
        return Config.from_file(path)
    except (ValueError, TypeError) as e:
        raise LoraLabError(f"{path} is not a valid model config ({e}): convert the checkpoint again") from None


def load_state_dict(path: Union[str, Path], device: str = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise LoraLabError(f"{path} does not exist: {HOW_TO_GET}")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraLabError(f"{path} is truncated or corrupt ({e}): download or convert it again") from None


def load_checkpoint(checkpoint_dir: Union[str, Path]) -> tuple[Config, dict[str, torch.Tensor]]:
    config = load_config(checkpoint_dir)
    return config, load_state_dict(Path(checkpoint_dir) / WEIGHTS_FILE)


def check_state_dict(model: torch.nn.Module, state_dict: dict, source, strict: bool = True) -> None:
    """Raise one clear line if `state_dict` does not fit `model` (missing or unexpected keys, wrong shapes)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if getattr(model, "config", None) is not None and model.config.tie_embeddings:
        expected.pop("lm_head.weight", None)  # the same tensor as wte.weight
    for key, tensor in state_dict.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key]):
            raise LoraLabError(f"{source}: {key} has shape {tuple(tensor.shape)} but the model config expects "
                               f"{tuple(expected[key])}: the config does not fit the weights; convert the checkpoint again")
    if strict:
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected and not (k == "lm_head.weight" and model.config.tie_embeddings)]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} weights (e.g. {', '.join(missing[:3])})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected weights (e.g. {', '.join(unexpected[:3])})")
            raise LoraLabError(f"{source}: the weights do not fit the model config: {'; '.join(parts)}; "
                               f"convert the checkpoint again")


def save_checkpoint(checkpoint_dir: Union[str, Path], config: Config, state_dict: dict[str, torch.Tensor],
                    tokenizer_dir: Union[str, Path, None] = None) -> None:
    """Write a lora_lab checkpoint; each file is written to a temporary name, then renamed into place."""
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if config.tie_embeddings:
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    state_dict = {k: v.contiguous() for k, v in state_dict.items()}
    with atomic_path(checkpoint_dir / WEIGHTS_FILE) as tmp:
        save_file(state_dict, str(tmp), metadata={"format": "pt", "lora_lab": "1"})
    atomic_write_text(checkpoint_dir / CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, checkpoint_dir)


AdapterConfigT = TypeVar("AdapterConfigT")


def save_adapter_files(out_dir: Union[str, Path], tensors: dict[str, torch.Tensor], config: dict,
                       weights_file: str, config_file: str) -> Path:
    """Write an adapter's trained tensors and the config that produced them into out_dir (LoRA's and
    LLaMA-Adapter's file pairs), each file to a temporary name first, then renamed into place."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_path(out_dir / weights_file) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "lora_lab": "1"})
    atomic_write_text(out_dir / config_file, json.dumps(config, indent=2) + "\n")
    return out_dir


def read_adapter_files(config_path: Path, weights_path: Path, from_dict: Callable[[dict], AdapterConfigT],
                       kind: str) -> tuple[AdapterConfigT, dict[str, torch.Tensor]]:
    """The config (built by `from_dict`) and tensors save_adapter_files wrote. A file that is not JSON, a config
    `from_dict` refuses, or truncated safetensors is one LoraLabError line; `kind` names the config in it."""
    try:
        config = from_dict(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoraLabError(f"{config_path} is not valid JSON ({e}): save the adapter again") from None
    except (LoraLabError, TypeError, AttributeError) as e:
        raise LoraLabError(f"{config_path} is not a valid {kind} config ({e}): save the adapter again") from None
    try:
        state_dict = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraLabError(f"{weights_path} is truncated or corrupt ({e}): save the adapter again") from None
    return config, state_dict


def copy_tokenizer_files(src_dir: Union[str, Path], dst_dir: Union[str, Path]) -> list[str]:
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    copied = []
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file() and src_dir.resolve() != dst_dir.resolve():
            with atomic_path(dst_dir / name) as tmp:
                shutil.copyfile(src_dir / name, tmp)
            copied.append(name)
    return copied
