"""--packing against today's length bucketing: the same samples, one LoRA epoch each way, real tokens per second.

    python benchmarks/bench_packing.py                               # 64 Alpaca samples, SmolLM2-135M shape, CPU
    python benchmarks/bench_packing.py --n_samples 256 --max_seq_length 1024 --repeats 3

The data is the first --n_samples rows of the shared assets' alpaca_5000.json (ChatML, prompt masked), tokenized
with SmolLM2's tokenizer, exactly as finetune/lora.py's get_dataloaders makes its batches: once with
bucket_by_length=True (what the scripts do without --packing: micro-batches of --micro_batch_size samples of
similar length, right-padded) and once with packing=True (rows of max_seq_length, micro-batches of
--packed_micro_batch_size rows, segment_ids). The model is SmolLM2-135M's architecture with seeded random weights,
LoRA r 8 on query and value, float32; one step per micro-batch (forward with the loss, backward, AdamW). An epoch
is one pass over the same samples; the two ways alternate, --repeats epochs each, and the best counts.

Read: real tokens/s (padding not counted), the padding share of the batch tensors, MFU (lora_lab/flops.py, which
counts no padding either) and the ratio packed / bucketed. Both ways learn from exactly the same target tokens
(tests/test_packing.py checks that the loss is the same).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"

from bench_challenge import random_model  # noqa: E402
from lora_lab import Tokenizer  # noqa: E402
from lora_lab.config import Config  # noqa: E402
from lora_lab.data import get_dataloaders  # noqa: E402
from lora_lab.flops import FlopsMeter, batch_counts  # noqa: E402
from lora_lab.lora import inject_lora, mark_only_lora_trainable  # noqa: E402
from lora_lab.prompts import PromptStyle  # noqa: E402
from lora_lab.utils import LoraLabError  # noqa: E402


def main(n_samples: int = 64, max_seq_length: int = 512, micro_batch_size: int = 4,
         packed_micro_batch_size: int = 1, repeats: int = 2, threads: Optional[int] = None,
         data: Optional[str] = None, n_layer: Optional[int] = None) -> dict:
    """One LoRA epoch over the same samples, length-bucketed and packed.

    Args:
        n_samples: training samples (the first rows of the data file).
        max_seq_length: samples are cut to this; packed rows hold this many tokens.
        micro_batch_size: samples per micro-batch when bucketing.
        packed_micro_batch_size: packed rows per micro-batch.
        repeats: epochs per way (alternating); the best counts.
        threads: torch threads.
        data: an instruction file (default: the shared assets' alpaca_5000.json).
        n_layer: fewer layers than SmolLM2-135M's 30, for a quick run.
    """
    if threads:
        torch.set_num_threads(threads)
    data = Path(data) if data else ASSETS / "data" / "alpaca_5000.json"
    tokenizer_dir = ASSETS / "models" / "smollm2-135m-instruct"
    if not data.is_file() or not tokenizer_dir.is_dir():
        raise LoraLabError(f"needs {data} and {tokenizer_dir} (the shared assets)")
    tokenizer = Tokenizer(tokenizer_dir)
    style = PromptStyle.from_name("chatml")
    loaders = {}
    for way, packing, mbs in (("bucketed", False, micro_batch_size), ("packed", True, packed_micro_batch_size)):
        train_dl, _, stats = get_dataloaders(str(data), tokenizer, style, max_seq_length=max_seq_length,
                                             micro_batch_size=mbs, seed=42, n_train=n_samples, n_val=0,
                                             val_split_fraction=0.0, bucket_by_length=True, packing=packing,
                                             pad_id=tokenizer.eos_id, verbose=False)
        loaders[way] = (list(train_dl), stats)

    config = Config.from_name("SmolLM2-135M", **({"n_layer": n_layer} if n_layer else {}))
    model = random_model(config, torch.device("cpu"), torch.float32)  # seeded N(0, 0.02), as bench_challenge's
    inject_lora(model, r=8, alpha=16.0, targets=["query", "value"])
    mark_only_lora_trainable(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    meter = FlopsMeter(model, "cpu", torch.float32)

    def epoch(batches) -> float:
        t0 = time.perf_counter()
        for batch in batches:
            loss = model(batch["input_ids"], labels=batch["labels"], segment_ids=batch.get("segment_ids"))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    epoch(loaders["packed"][0][:1]), epoch(loaders["bucketed"][0][:1])  # warm-up
    times = {way: [] for way in loaders}
    for _ in range(repeats):
        for way, (batches, _) in loaders.items():
            times[way].append(epoch(batches))

    results = {}
    for way, (batches, stats) in loaders.items():
        tokens, targets, pairs = (sum(c) for c in zip(*(batch_counts(b) for b in batches)))
        flops = sum(meter.flops(*batch_counts(b)) for b in batches)
        shape = sum(b["input_ids"].numel() for b in batches)
        best = min(times[way])
        results[way] = dict(best=best, tokens=tokens, targets=targets, micro_batches=len(batches),
                            padding=1 - tokens / shape, tokens_per_s=tokens / best, mfu=flops / best / meter.peak)
    print(f"\nSmolLM2-135M shape{f' ({n_layer} layers)' if n_layer else ''}, random weights, LoRA r 8 on query and "
          f"value, float32, {torch.get_num_threads()} threads; {n_samples} samples of {data.name}, max_seq_length "
          f"{max_seq_length}; best of {repeats} epochs each, alternating; MFU against the {meter.peak_source} "
          f"({meter.peak / 1e9:.1f} GFLOP/s)\n")
    print("| batches | micro-batches | padding | real tokens | s/epoch | real tokens/s | MFU |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for way, r in results.items():
        size = f"{micro_batch_size} samples" if way == "bucketed" else f"{packed_micro_batch_size} x {max_seq_length}"
        print(f"| {way} ({size}) | {r['micro_batches']} | {100 * r['padding']:.1f}% | {r['tokens']:,} | "
              f"{r['best']:.2f} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% |")
    ratio = results["packed"]["tokens_per_s"] / results["bucketed"]["tokens_per_s"]
    print(f"\npacked / bucketed real tokens/s: {ratio:.2f}x")
    return results


if __name__ == "__main__":
    from jsonargparse import CLI

    sys.exit(CLI(main, as_positional=False) and None)
