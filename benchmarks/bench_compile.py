"""--compile against eager: a LoRA (or QLoRA) training step with each block compiled (lora_lab/compile.py).

    python benchmarks/bench_compile.py                            # SmolLM2-135M shape, random weights, CPU, float32
    python benchmarks/bench_compile.py --method qlora --n_layer 4 --seq_len 512

One model, LoRA r 8 on query and value (QLoRA: on its NF4 base), a packed-shape batch (--batch_size x --seq_len
random tokens, every one a target). First the eager steps' losses, then compile_blocks(model) and the compiled
steps: the first compiled step's time is the compilation (printed), then eager and compiled steps alternate
(the compiled forward runs in train mode with gradients; eager by calling the blocks' saved eager forward) and
the best of --repeats counts. The losses of the two must agree (float tolerance).
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from bench_challenge import random_model
from lora_lab.compile import compile_blocks
from lora_lab.config import Config
from lora_lab.flops import peak_flops_of, training_flops
from lora_lab.lora import inject_lora, mark_only_lora_trainable
from lora_lab.nf4 import quantize_nf4


def main(method: str = "lora", n_layer: Optional[int] = None, batch_size: int = 2, seq_len: int = 256,
         repeats: int = 3, threads: Optional[int] = None) -> dict:
    """Eager against compiled blocks.

    Args:
        method: lora or qlora.
        n_layer: fewer layers than SmolLM2-135M's 30, for a quick run.
        batch_size: rows per step.
        seq_len: tokens per row.
        repeats: timed steps each (alternating); the best counts.
        threads: torch threads.
    """
    if threads:
        torch.set_num_threads(threads)
    config = Config.from_name("SmolLM2-135M", **({"n_layer": n_layer} if n_layer else {}))
    model = random_model(config, torch.device("cpu"), torch.float32)  # seeded N(0, 0.02), as bench_challenge's
    if method == "qlora":
        quantize_nf4(model)
    inject_lora(model, r=8, alpha=16.0, targets=["query", "value"])
    mark_only_lora_trainable(model)
    model.train()
    x = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(1))

    def step() -> tuple[float, float]:
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss = model(x, labels=x)
        loss.backward()
        return time.perf_counter() - t0, loss.item()

    step()  # warm-up
    eager_loss = step()[1]
    eager_forwards = [block.forward for block in model.blocks]
    compile_blocks(model)
    compiled_forwards = [block.forward for block in model.blocks]
    compile_time, compiled_loss = step()
    times = {"eager": [], "compiled": []}
    for _ in range(repeats):
        for way, forwards in (("eager", eager_forwards), ("compiled", compiled_forwards)):
            for block, forward in zip(model.blocks, forwards):
                block.forward = forward
            times[way].append(step()[0])
    flops = training_flops(model)(batch_size * seq_len, batch_size * (seq_len - 1),
                                  batch_size * seq_len * (seq_len + 1) // 2)
    peak, source = peak_flops_of("cpu", torch.float32)
    best = {way: min(t) for way, t in times.items()}
    print(f"\nSmolLM2-135M shape ({config.n_layer} layers), {method}, float32, batch {batch_size} x {seq_len}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; losses eager {eager_loss:.6f}, compiled "
          f"{compiled_loss:.6f}; first compiled step (compiling) {compile_time:.1f} s")
    print("| blocks | s/step (best) | tokens/s | MFU |")
    print("| --- | --- | --- | --- |")
    for way, t in best.items():
        print(f"| {way} | {t:.3f} | {batch_size * seq_len / t:,.0f} | {100 * flops / t / peak:.1f}% |")
    print(f"compiled / eager step time: {best['compiled'] / best['eager']:.2f} (MFU against the {source})")
    assert abs(eager_loss - compiled_loss) <= 1e-4 * abs(eager_loss), (eager_loss, compiled_loss)
    return {"eager": best["eager"], "compiled": best["compiled"], "compile_s": compile_time}


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
