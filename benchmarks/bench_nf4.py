"""Our NF4 (lora_lab/nf4.py) against bitsandbytes on the same tensors, in one process, on CPU.

    python benchmarks/bench_nf4.py                 # 4096x4096 and 4096x11008, bfloat16 and float32
    python benchmarks/bench_nf4.py --repeats 5 --shapes "[[1024, 1024]]"

For each matrix and dtype (double quantization on, blocksize 64):
  quantize:    time to quantize the weight (both sides checked bit-identical first)
  dequantize:  time to dequantize it, and the throughput in elements per second
  fwd+bwd:     NF4Linear against bnb Linear4bit, forward and backward to the input, batch of --tokens rows
Times are best of --repeats, interleaved; the ratio ours / bnb (lower is better) is what to read on a busy machine.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from lora_lab.nf4 import NF4Linear, dequantize_nf4, quantize_nf4


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(shapes: list[list[int]] = [[4096, 4096], [4096, 11008]], dtypes: list[str] = ["bfloat16", "float32"],
         repeats: int = 3, tokens: int = 64, threads: int = 0) -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    if threads:
        torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, {torch.get_num_threads()} threads, "
          f"best of {repeats}\n")
    header = f"{'matrix':>11} {'dtype':>8} | {'what':<10} | {'ours':>9} | {'bnb':>9} | {'ours/bnb':>8} | {'ours Gel/s':>10}"
    print(header)
    print("-" * len(header))
    for rows, cols in shapes:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            torch.manual_seed(0)
            w = (torch.randn(rows, cols) * 0.02).to(dtype)
            n = w.numel()

            packed, state = quantize_nf4(w)
            q_ref, s_ref = BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            assert torch.equal(packed, q_ref) and torch.equal(state.absmax, s_ref.absmax), "not bit-identical"

            t_q_ours = best_of(lambda: quantize_nf4(w), repeats)
            t_q_bnb = best_of(lambda: BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"),
                              repeats)
            t_d_ours = best_of(lambda: dequantize_nf4(packed, state), repeats)
            t_d_bnb = best_of(lambda: BF.dequantize_4bit(q_ref, s_ref), repeats)

            # cols is the layer's input size: out_features = rows
            linear = nn.Linear(cols, rows, bias=False).to(dtype)
            linear.weight.data.copy_(w)
            ours = NF4Linear.from_linear(linear)
            ref = bnb.nn.Linear4bit(cols, rows, bias=False, compress_statistics=True, quant_type="nf4",
                                    compute_dtype=dtype)
            ref.load_state_dict(linear.state_dict())
            ref = ref.to("cpu")  # quantizes
            x = torch.randn(tokens, cols, dtype=dtype)

            def step(layer):
                xi = x.detach().requires_grad_(True)
                layer(xi).sum().backward()

            step(ours), step(ref)  # warm-up
            t_f_ours = best_of(lambda: step(ours), repeats)
            t_f_bnb = best_of(lambda: step(ref), repeats)

            for what, a, b, el in [("quantize", t_q_ours, t_q_bnb, n / t_q_ours), ("dequantize", t_d_ours, t_d_bnb,
                                   n / t_d_ours), ("fwd+bwd", t_f_ours, t_f_bnb, None)]:
                thr = f"{el / 1e9:10.2f}" if el else f"{'':>10}"
                print(f"{rows:>5}x{cols:<5} {dtype_name:>8} | {what:<10} | {a * 1e3:7.1f}ms | {b * 1e3:7.1f}ms | "
                      f"{a / b:8.2f} | {thr}")


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
