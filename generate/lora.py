"""Generate text with a base model plus a LoRA adapter, streaming it to the terminal.

    python generate/lora.py --adapter_dir out/finetune/lora --prompt "What is the capital of France?" --temperature 0

The adapter directory is the output of finetune/lora.py: lora.safetensors and lora_config.json, which records
r, alpha, the targeted layers, the prompt style used in training and the base model (--checkpoint_dir defaults
to it when that directory exists here). The prompt is wrapped in the adapter's prompt style, the format it was
fine-tuned on; `--prompt_style plain` passes it through untouched. The answer is printed as it is generated;
the speed and peak memory go to stderr at the end. Everything else works as in generate/base.py, of which this
script is a copy plus the adapter lines (`diff generate/base.py generate/lora.py` shows them).

The base the adapter runs on: a LoRA adapter is merged into the 16-bit base weights (decoding then costs what the
base model's does). A QLoRA adapter (finetune/qlora.py; lora_config.json says `base_quantization`) learned to
correct the 4-bit NF4 weights, so by default the base is quantized again exactly as in training (quantization is
deterministic) and the adapter runs beside it, unmerged: a 4-bit weight cannot absorb the update.
`--quantize none` runs it on 16-bit weights instead: the NF4 base dequantized layer by layer with the update
merged in, the model `python -m lora_lab.merge_lora` writes. `--quantize nf4` puts any LoRA adapter on a 4-bit base.
"""

import sys
import time
from pathlib import Path
from typing import Literal, Optional

import torch

# run as `python generate/base.py` from a checkout without installing: make lora_lab importable
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_lab.adapted import load_lora_model  # noqa: E402
from lora_lab.checkpoint import load_config  # noqa: E402
from lora_lab.checks import check_args  # noqa: E402
from lora_lab.formats.download import ensure_checkpoint  # noqa: E402
from lora_lab.generate import (StreamDecoder, generate, generation_stats, reset_peak_memory,  # noqa: E402
                               select_device, select_dtype, synchronize)
from lora_lab.lora import (base_checkpoint_dir, check_adapter_fits, load_lora, merge_lora,  # noqa: E402
                            merge_lora_into_dequantized)
from lora_lab.nf4 import model_size_report  # noqa: E402
from lora_lab.prompts import PromptStyle  # noqa: E402
from lora_lab.tokenizer import Tokenizer  # noqa: E402
from lora_lab.utils import LoraLabError, cli  # noqa: E402


def main(
    adapter_dir: Path = Path("out/finetune/lora"),
    checkpoint_dir: Optional[Path] = None,
    prompt: str = "What food do llamas eat?",
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: Optional[int] = 50,
    top_p: Optional[float] = None,
    seed: int = 1234,
    prompt_style: Optional[str] = None,
    system: Optional[str] = None,
    precision: Optional[str] = None,
    quantize: Optional[Literal["nf4", "none"]] = None,
    device: str = "auto",
) -> None:
    """Generate a reply to one prompt with a LoRA-adapted model.

    Args:
        adapter_dir: a LoRA adapter: the out_dir of finetune/lora.py (lora.safetensors and lora_config.json).
        checkpoint_dir: the base model, a lora_lab checkpoint; default: the adapter's base model (lora_config.json).
        prompt: the user's text.
        max_new_tokens: stop after this many new tokens (or earlier, at the end-of-turn token).
        temperature: divides the logits before sampling: lower is more predictable; 0 is greedy decoding.
        top_k: sample only among the k most likely tokens.
        top_p: sample only among the most likely tokens whose probabilities add up to top_p (nucleus sampling).
        seed: random seed, so that a sampled answer can be reproduced.
        prompt_style: how the prompt is wrapped (plain, alpaca, chatml, llama2-chat, llama3, mistral, gemma,
            zephyr); default: the one the adapter was fine-tuned with.
        system: a system message, for the styles that have one (default: the model's own default, if any).
        precision: weights' dtype: bf16-true, 16-true or 32-true; default bf16 on a GPU, float32 on the CPU.
        quantize: nf4 stores the base's linear layers (not the embeddings or lm_head) in 4-bit NF4, dequantized on
            the fly, with the adapter unmerged beside them; none keeps 16-bit weights with the adapter merged in.
            Default: nf4 for a QLoRA adapter (the base it was trained on), none for a LoRA adapter.
        device: auto, cpu, cuda, cuda:N or mps.
    """
    check_args(locals())  # every argument that can be judged without a model, before anything slow
    device = select_device(device)
    dtype = select_dtype(precision, device)
    lora_config, adapter = load_lora(adapter_dir)  # fails first, in one line, if adapter_dir is not an adapter
    checkpoint_dir = base_checkpoint_dir(lora_config, checkpoint_dir, adapter_dir)
    checkpoint_dir = ensure_checkpoint(checkpoint_dir)  # the default model is fetched once if missing
    config = load_config(checkpoint_dir)  # fails first, in one line, if checkpoint_dir is not a checkpoint
    check_adapter_fits(lora_config, config, adapter_dir, checkpoint_dir)  # one line if it was trained on another base

    # 1. the model and its tokenizer
    t0 = time.perf_counter()
    q = lora_config.base_quantization  # {'method': 'nf4', 'blocksize', 'double_quant'} for a QLoRA adapter
    quantize = quantize or ("nf4" if q else "none")
    # the base as the adapter was trained on (a QLoRA adapter's: the stored weights quantized to NF4 again, same
    # bits; with nf4 any adapter's), then the LoRA layers set up as in training (float32, so B A is rounded once)
    # and the adapter's weights loaded: lora_lab/adapted.py, the loader evaluation and merge_lora use too
    model = load_lora_model(checkpoint_dir, adapter_dir, quantize=quantize, merge=False, device=device, dtype=dtype,
                            adapter=(lora_config, adapter))
    if quantize == "nf4":
        pass  # 4-bit weights cannot absorb W + (alpha/r) B A: the adapter runs beside them, two small matmuls a layer
    elif q:
        # a QLoRA adapter on 16-bit weights: layer by layer, dequantize, add the update, round once to dtype
        merge_lora_into_dequantized(model, dtype=dtype)
    else:
        # fold W <- W + (alpha/r) B A into each adapted weight once: every decoding step then costs what the base
        # model's does, instead of two extra small matmuls per adapted layer and token. Same outputs up to rounding.
        merge_lora(model)
    tokenizer = Tokenizer(checkpoint_dir)
    print(f"Loaded {config.name or checkpoint_dir} + LoRA {adapter_dir} ({dtype}, {device}) in "
          f"{time.perf_counter() - t0:.2f} s", file=sys.stderr)
    if quantize == "nf4":
        size = model_size_report(model)
        print(f"NF4: {size['quantized_layers']} linear layers at {size['bits_per_quantized_param']:.3f} bits per "
              f"weight; model {size['total_bytes'] / 2**20:.1f} MiB instead of "
              f"{size['unquantized_bytes'] / 2**20:.1f} MiB", file=sys.stderr)

    # 2. the prompt, in the format the model was tuned on; the tokenizer adds BOS if the model wants one
    style = PromptStyle.from_checkpoint(checkpoint_dir, name=prompt_style or lora_config.prompt_style)
    text = style.apply(prompt, system=system)
    prompt_ids = tokenizer.encode(text)  # (T,)
    if prompt_ids.numel() == 0:
        raise LoraLabError("The prompt is empty and the tokenizer adds no BOS token: give a --prompt")
    if prompt_ids.numel() >= config.block_size:
        raise LoraLabError(f"The prompt has {prompt_ids.numel()} tokens but the model reads at most "
                           f"{config.block_size}: shorten --prompt")

    # 3. stop at the tokenizer's end-of-sequence token(s) and at the style's end-of-turn tokens
    stop_ids = list(dict.fromkeys(tokenizer.eos_ids + style.stop_tokens(tokenizer)))

    # 4. decode token by token with a KV cache, printing the text as it grows
    generator = torch.Generator(device=device).manual_seed(seed)
    stream = StreamDecoder(tokenizer, context_ids=prompt_ids[-1:].tolist())  # keeps the first word's space
    reset_peak_memory(device)
    t0 = time.perf_counter()
    n_tokens = 0
    for token_id in generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, eos_ids=stop_ids, generator=generator):
        n_tokens += 1
        if token_id in stop_ids:
            break  # the end-of-turn token is not part of the answer
        print(stream.add(token_id), end="", flush=True)
    print(stream.flush(), flush=True)
    synchronize(device)
    seconds = time.perf_counter() - t0

    print(generation_stats(n_tokens, seconds, device), file=sys.stderr)


if __name__ == "__main__":
    cli(main)
