"""A tiny random lora_lab checkpoint with a real tokenizer, for the fine-tuning script tests.

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", require_asset(SMOL_TOKENIZER))

The model is a Llama-style GPT (RMSNorm, SwiGLU, GQA, tied embeddings) small enough to train for a few
steps in seconds on a CPU, but with SmolLM2's real vocabulary (49152) and tokenizer files, so the data
pipeline, the ChatML prompt style, EOS handling and generation run exactly as with the real model."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from lora_lab.checkpoint import save_checkpoint
from lora_lab.config import Config
from lora_lab.model import GPT

SMOL_TOKENIZER = "models/smollm2-135m-instruct"  # under the assets dir: tokenizer.json, tokenizer_config.json, ...
TINY = dict(name="tiny-smollm2", n_layer=2, n_embd=32, n_head=4, n_query_groups=2, intermediate_size=64,
            vocab_size=49152, block_size=512, rope_base=100000.0, tie_embeddings=True, prompt_style="chatml")


def tiny_config(**overrides) -> Config:
    return Config(**{**TINY, **overrides})


def write_tiny_checkpoint(out_dir: Union[str, Path], tokenizer_dir: Union[str, Path], seed: int = 0,
                          **overrides) -> Path:
    """Write a random tiny model (Config TINY with `overrides`) and the tokenizer files of tokenizer_dir."""
    config = tiny_config(**overrides)
    gen = torch.Generator().manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                continue  # norm weights stay 1
            # small weights (as a trained model has): logits of a reasonable size over the 49k vocabulary
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    save_checkpoint(out_dir, config, model.state_dict(), tokenizer_dir=tokenizer_dir)
    return Path(out_dir)
