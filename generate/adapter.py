"""Generate text with a base model plus a LLaMA-Adapter, streaming it to the terminal.

    python generate/adapter.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --adapter_dir out/finetune/adapter --prompt "What is the capital of France?" --temperature 0

The adapter directory is the output of finetune/adapter.py: adapter.safetensors (a learned prefix and a gate per
adapted layer; a V2 adapter also a scale and bias per linear layer and its trained norms) and adapter_config.json,
which records the version, the prompt length, the first adapted layer, the prompt style used in training and the
base model (--checkpoint_dir defaults to it when that directory exists here). The prompt is wrapped in the
adapter's prompt style, the format it was fine-tuned on; `--prompt_style plain` passes it through untouched.
Unlike LoRA, the adapter cannot be merged into the weights: every decoding step attends to the prefixes as well
(they are not in the KV cache), at the cost of P extra keys per adapted layer. `--quantize nf4` stores the frozen
base's linear layers in 4 bits; the prefixes and gates (and V2's scales, biases and norms) stay in the precision's
dtype. Everything else works as in generate/base.py (`diff generate/lora.py generate/adapter.py` shows the adapter
lines).
"""

import sys
import time
from pathlib import Path
from typing import Literal, Optional

import torch

# run as `python generate/base.py` from a checkout without installing: make lora_lab importable
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_lab.adapted import load_adapter_model  # noqa: E402
from lora_lab.adapter import base_checkpoint_dir, load_adapter  # noqa: E402
from lora_lab.checkpoint import load_config  # noqa: E402
from lora_lab.checks import check_args  # noqa: E402
from lora_lab.formats.download import ensure_checkpoint  # noqa: E402
from lora_lab.generate import (StreamDecoder, generate, generation_stats, reset_peak_memory,  # noqa: E402
                               select_device, select_dtype, synchronize)
from lora_lab.lora import check_adapter_fits  # noqa: E402
from lora_lab.nf4 import model_size_report  # noqa: E402
from lora_lab.prompts import PromptStyle  # noqa: E402
from lora_lab.tokenizer import Tokenizer  # noqa: E402
from lora_lab.utils import LoraLabError, cli  # noqa: E402


def main(
    adapter_dir: Path = Path("out/finetune/adapter"),
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
    quantize: Optional[Literal["nf4"]] = None,
    device: str = "auto",
) -> None:
    """Generate a reply to one prompt with a LLaMA-Adapter on its base model.

    Args:
        adapter_dir: the out_dir of finetune/adapter.py (adapter.safetensors and adapter_config.json).
        checkpoint_dir: the base model, a lora_lab checkpoint; default: the adapter's base model (adapter_config.json).
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
        quantize: nf4 stores the base's linear layers (not the embeddings, lm_head or the adapter) in 4-bit NF4,
            dequantized on the fly to the precision's dtype: about a quarter of the memory of 16-bit weights.
        device: auto, cpu, cuda, cuda:N or mps.
    """
    check_args(locals())  # every argument that can be judged without a model, before anything slow
    device = select_device(device)
    dtype = select_dtype(precision, device)
    adapter_config, adapter = load_adapter(adapter_dir)  # fails first, in one line, if adapter_dir is not an adapter
    checkpoint_dir = base_checkpoint_dir(adapter_config, checkpoint_dir, adapter_dir)
    checkpoint_dir = ensure_checkpoint(checkpoint_dir)  # the default model is fetched once if missing
    config = load_config(checkpoint_dir)  # fails first, in one line, if checkpoint_dir is not a checkpoint
    # one line if it was trained on another base (the check reads only base_config and base_model, as LoRA's does)
    check_adapter_fits(adapter_config, config, adapter_dir, checkpoint_dir)

    # 1. the model and its tokenizer
    t0 = time.perf_counter()
    # the base in dtype (with nf4: every nn.Linear but lm_head in NF4), the attention (V2: and every linear layer)
    # swapped as in training, then the adapter's tensors: lora_lab/adapted.py, the loader evaluation uses too
    model = load_adapter_model(checkpoint_dir, adapter_dir, quantize=quantize, device=device, dtype=dtype,
                               adapter=(adapter_config, adapter))
    tokenizer = Tokenizer(checkpoint_dir)
    version = " V2" if adapter_config.adapter_version == 2 else ""
    print(f"Loaded {config.name or checkpoint_dir} + LLaMA-Adapter{version} {adapter_dir} ({dtype}, {device}) in "
          f"{time.perf_counter() - t0:.2f} s", file=sys.stderr)
    if quantize == "nf4":
        size = model_size_report(model)
        print(f"NF4: {size['quantized_layers']} linear layers at {size['bits_per_quantized_param']:.3f} bits per "
              f"weight; model {size['total_bytes'] / 2**20:.1f} MiB instead of "
              f"{size['unquantized_bytes'] / 2**20:.1f} MiB", file=sys.stderr)

    # 2. the prompt, in the format the model was tuned on; the tokenizer adds BOS if the model wants one
    style = PromptStyle.from_checkpoint(checkpoint_dir, name=prompt_style or adapter_config.prompt_style)
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
