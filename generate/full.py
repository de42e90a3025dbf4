"""Generate text with a fully fine-tuned model (the out_dir of finetune/full.py), streaming it to the terminal.

    python generate/full.py --checkpoint_dir out/finetune/full --prompt "What is the capital of France?" --temperature 0

A fully fine-tuned model is an ordinary lora_lab checkpoint: model_config.json (whose prompt_style is the one it was
fine-tuned with), model.safetensors and the base model's tokenizer files. So this script is generate/base.py with
another default --checkpoint_dir (tests/test_scripts_consistency.py keeps the two the same); the prompt is wrapped
in the fine-tuning's prompt style unless --prompt_style says otherwise. The answer is printed as it is generated;
the speed and peak memory go to stderr at the end.
"""

import sys
import time
from pathlib import Path
from typing import Literal, Optional

import torch

# run as `python generate/base.py` from a checkout without installing: make lora_lab importable
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_lab.adapted import load_base  # noqa: E402
from lora_lab.checkpoint import load_config  # noqa: E402
from lora_lab.checks import check_args  # noqa: E402
from lora_lab.formats.download import ensure_checkpoint  # noqa: E402
from lora_lab.generate import (StreamDecoder, generate, generation_stats, reset_peak_memory,  # noqa: E402
                               select_device, select_dtype, synchronize)
from lora_lab.nf4 import model_size_report, nf4_settings  # noqa: E402
from lora_lab.prompts import PromptStyle  # noqa: E402
from lora_lab.tokenizer import Tokenizer  # noqa: E402
from lora_lab.utils import LoraLabError, cli  # noqa: E402


def main(
    checkpoint_dir: Path = Path("out/finetune/full"),
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
    """Generate a reply to one prompt with a fully fine-tuned model.

    Args:
        checkpoint_dir: the out_dir of finetune/full.py, or any lora_lab checkpoint.
        prompt: the user's text.
        max_new_tokens: stop after this many new tokens (or earlier, at the end-of-turn token).
        temperature: divides the logits before sampling: lower is more predictable; 0 is greedy decoding.
        top_k: sample only among the k most likely tokens.
        top_p: sample only among the most likely tokens whose probabilities add up to top_p (nucleus sampling).
        seed: random seed, so that a sampled answer can be reproduced.
        prompt_style: how the prompt is wrapped (plain, alpaca, chatml, llama2-chat, llama3, mistral, gemma,
            zephyr); default: the one in the checkpoint's config (the one it was fine-tuned with).
        system: a system message, for the styles that have one (default: the model's own default, if any).
        precision: weights' dtype: bf16-true, 16-true or 32-true; default bf16 on a GPU, float32 on the CPU.
        quantize: nf4 stores the linear layers (not the embeddings or lm_head) in 4-bit NF4, dequantized on the
            fly to the precision's dtype: about a quarter of the memory of 16-bit weights.
        device: auto, cpu, cuda, cuda:N or mps.
    """
    check_args(locals())  # every argument that can be judged without a model, before anything slow
    device = select_device(device)
    dtype = select_dtype(precision, device)
    checkpoint_dir = ensure_checkpoint(checkpoint_dir)  # the default model is fetched once if missing
    config = load_config(checkpoint_dir)  # fails first, in one line, if checkpoint_dir is not a checkpoint

    # 1. the model and its tokenizer
    t0 = time.perf_counter()
    # with nf4: every nn.Linear but lm_head quantized from the weights as stored, then the rest cast to dtype (the
    # recipe of finetune/qlora.py and of every loader: lora_lab/adapted.py)
    model = load_base(checkpoint_dir, nf4=nf4_settings() if quantize == "nf4" else None, device=device, dtype=dtype)
    tokenizer = Tokenizer(checkpoint_dir)
    print(f"Loaded {config.name or checkpoint_dir} ({dtype}, {device}) in {time.perf_counter() - t0:.2f} s",
          file=sys.stderr)
    if quantize == "nf4":
        size = model_size_report(model)
        print(f"NF4: {size['quantized_layers']} linear layers at {size['bits_per_quantized_param']:.3f} bits per "
              f"weight; model {size['total_bytes'] / 2**20:.1f} MiB instead of "
              f"{size['unquantized_bytes'] / 2**20:.1f} MiB", file=sys.stderr)

    # 2. the prompt, in the format the model was tuned on; the tokenizer adds BOS if the model wants one
    style = PromptStyle.from_checkpoint(checkpoint_dir, name=prompt_style)
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
