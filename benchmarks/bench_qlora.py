"""One QLoRA training step against one LoRA training step of lora_lab: same model, adapters, batch, optimizer.

    python benchmarks/bench_qlora.py                   # SmolLM2-135M architecture, seeded random weights, CPU, float32
    python benchmarks/bench_qlora.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
    python benchmarks/bench_qlora.py --threads 1 --repeats 3

LoRA:   the float32 model with LoRA (default r 8 on query and value, no dropout).
QLoRA:  the same model after quantize_nf4(model) (every linear layer but lm_head in NF4, blocks of 64, double
        quantization), then the same LoRA: the base weights are dequantized on the fly in forward and backward.
A step: zero_grad, forward with the next-token loss, backward, AdamW step on the adapters, on one seeded random
(batch, seq) batch. Both sides start from the same adapter values (B small but non-zero); their losses must be
close (they differ only by the quantization error) before anything is timed.

Time: both sides in this one process, interleaved step by step (alternating which goes first) so that noise from
a busy machine hits both alike; best and median of --repeats steps after one warm-up step. Goal: QLoRA / LoRA
<= 1.3. Weights: bytes of each model's weights (model_size_report) and the bits per NF4-quantized parameter
(goal 4.127: 4 bits of code, 8/64 for the 8-bit block scale, 32/(64*256) for the scale of those scales).
"""

from __future__ import annotations

import statistics
import time
from typing import Optional

import torch

from bench_lora import lora_values  # same seeded adapter values as the LoRA benchmark
from lora_lab import GPT, Config
from lora_lab.lora import inject_lora, load_lora_state_dict, mark_only_lora_trainable
from lora_lab.nf4 import model_size_report, quantize_nf4


def base_model(checkpoint_dir: Optional[str]) -> GPT:
    if checkpoint_dir is not None:
        return GPT.from_checkpoint(checkpoint_dir, dtype=torch.float32)
    torch.manual_seed(0)
    model = GPT(Config.from_name("SmolLM2-135M-Instruct"))  # the architecture; the values do not change the timing
    with torch.no_grad():  # but keep them at a trained model's scale (as Llama's init does): a sane loss to compare
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    return model


def build(side: str, checkpoint_dir: Optional[str], r: int, alpha: float, targets: list[str], lr: float = 1e-4):
    model = base_model(checkpoint_dir)
    if side == "qlora":
        quantize_nf4(model)  # blocks of 64, double quantization; lm_head (tied to the embedding) stays float
    inject_lora(model, r=r, alpha=alpha, targets=targets)
    load_lora_state_dict(model, lora_values(model))
    mark_only_lora_trainable(model)
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def train_step(model, optimizer, x: torch.Tensor) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = model(x, labels=x)
    loss.backward()
    optimizer.step()
    return loss.item()


def main(checkpoint_dir: Optional[str] = None, batch_size: int = 4, seq_len: int = 256, r: int = 8,
         alpha: float = 16.0, targets: list[str] = ["query", "value"], repeats: int = 5, threads: int = 0) -> None:
    """Time a QLoRA and a LoRA training step of lora_lab and compare the bytes of their weights.

    Args:
        checkpoint_dir: a lora_lab checkpoint; default: the SmolLM2-135M architecture with seeded random weights.
        batch_size: rows per batch.
        seq_len: tokens per row.
        r: LoRA rank.
        alpha: LoRA alpha.
        targets: LoRA targets.
        repeats: timed steps per side (after one warm-up step each).
        threads: torch intra-op threads (0: torch's default).
    """
    if threads:
        torch.set_num_threads(threads)
    models = {side: build(side, checkpoint_dir, r, alpha, targets) for side in ("lora", "qlora")}
    vocab_size = models["lora"][0].config.vocab_size
    x = torch.randint(0, vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))  # (B, T)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {batch_size}x{seq_len}, LoRA r={r} "
          f"on {', '.join(targets)}, float32, best / median of {repeats} steps after a warm-up\n")

    with torch.no_grad():
        losses = {side: model(x, labels=x).item() for side, (model, _) in models.items()}
    # the same function up to the NF4 rounding of the weights: a loss far off means we would time different work
    assert abs(losses["qlora"] - losses["lora"]) < 0.05 * losses["lora"], losses

    times = {side: [] for side in models}
    for side, (model, opt) in models.items():
        train_step(model, opt, x)  # warm-up
    for i in range(repeats):
        order = list(models) if i % 2 == 0 else list(models)[::-1]
        for side in order:
            model, opt = models[side]
            t0 = time.perf_counter()
            train_step(model, opt, x)
            times[side].append(time.perf_counter() - t0)

    header = (f"{'':<6} | {'best step':>9} | {'median':>8} | {'tokens/s':>8} | {'weights':>9} | "
              f"{'bits/quantized param':>20}")
    print(header)
    print("-" * len(header))
    for side, (model, _) in models.items():
        report = model_size_report(model)
        bits = f"{report['bits_per_quantized_param']:.3f}" if report["quantized_params"] else "-"
        best, median = min(times[side]), statistics.median(times[side])
        print(f"{side:<6} | {best:8.2f}s | {median:7.2f}s | {x.numel() / best:8.0f} | "
              f"{report['total_bytes'] / 2**20:6.1f}MiB | {bits:>20}")
    q, lo = models["qlora"][0], models["lora"][0]
    rq, rl = model_size_report(q), model_size_report(lo)
    print(f"\nQLoRA / LoRA step time: best {min(times['qlora']) / min(times['lora']):.2f}x, median "
          f"{statistics.median(times['qlora']) / statistics.median(times['lora']):.2f}x (goal <= 1.3x)")
    print(f"weights: {rq['total_bytes'] / 2**20:.1f} MiB vs {rl['total_bytes'] / 2**20:.1f} MiB; the "
          f"{rq['quantized_params']:,} quantized parameters take {rq['quantized_bytes'] / 2**20:.1f} MiB instead of "
          f"{rq['quantized_params'] * 4 / 2**20:.1f} MiB: {rq['bits_per_quantized_param']:.3f} bits each (goal 4.127); "
          f"the rest ({rq['float_params']:,} float parameters: embedding = tied lm_head, norms, adapters) stays "
          f"float32")
    print(f"loss before training: LoRA {losses['lora']:.4f}, QLoRA {losses['qlora']:.4f}")


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
