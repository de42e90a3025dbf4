"""torch.compile for training: each transformer block compiled in place.

    compile_blocks(model)      # before the first forward; every method (full, LoRA, QLoRA, adapter) the same way

Why the blocks and not the whole model: the blocks are where the time goes (all the matrix multiplies but
lm_head), they are all alike (so compiled graphs are shared between layers), and what is around them does
not compile well: the fused loss (lora_lab/model.py LinearCrossEntropy) picks the target positions with a
data-dependent shape and loops over chunks in an autograd.Function, and it is already one matmul per chunk. The
blocks are compiled in place (their `forward`), so parameter names, state dicts, adapters saved and resume
states are exactly those of the eager model. One graph serves all the blocks whose input needs a gradient
(with LoRA, block 0 gets its own): inductor compiles twice, not n_layer times.

What it fuses: norms, RoPE, the SwiGLU/GELU products, LoRA's dropout and scaling, and on CUDA the NF4
dequantization into the matmul that reads it (lora_lab/nf4.py already compiles that pair on CUDA; inside a
compiled block inductor sees it whole). Numerics: the same losses and gradients within float rounding
(tests/test_compile.py). Cost: compiling takes tens of seconds (minutes on a small busy CPU), and each new
sequence length compiles again until torch marks the length dynamic (after the first change): --packing gives
every micro-batch the same shape. With activation checkpointing the compiled block is what is recomputed.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lora_lab.utils import LoraLabError


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """torch.compile every block of `model.blocks` for training (kwargs go to torch.compile); returns the model.

    Each block's forward becomes the compiled one while the block trains with gradients enabled; validation and
    generation (eval mode or no_grad: other shapes each time, a KV cache) run the eager forward, so they never
    wait for a compilation. Only an instance attribute changes: parameters and state-dict names stay as they were."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise LoraLabError(f"--compile: {type(model).__name__} has no .blocks to compile")
    for block in blocks:
        if getattr(block, "compiled_forward", None) is not None:
            continue  # compiled already
        eager = block.forward
        block.compiled_forward = torch.compile(eager, **compile_kwargs)

        def forward(*args, _block=block, _eager=eager, **kwargs):
            training = _block.training and torch.is_grad_enabled()
            return (_block.compiled_forward if training else _eager)(*args, **kwargs)

        block.forward = forward
    return model
