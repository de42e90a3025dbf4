"""finetune/dpo.py --packing against its default batches: the same preference pairs, one DPO epoch each way.

    python benchmarks/bench_dpo_packing.py                       # 32 polite pairs, SmolLM2-135M shape, CPU
    python benchmarks/bench_dpo_packing.py --n_pairs 128 --micro_batch_size 8 --repeats 3 --n_layer 8

The pairs are the first --n_pairs training pairs of the shared assets' preference_polite_1100.json, tokenized with
SmolLM2's tokenizer exactly as finetune/dpo.py's get_preference_dataloaders makes its batches: micro-batches of
--micro_batch_size pairs of similar length, each (2b, T) [b chosen; b rejected] right-padded, and with
packing=True the same pairs per micro-batch with their 2b sequences packed into rows (segment_ids). The model is
SmolLM2-135M's architecture with seeded random weights, LoRA r 8 on query and value, float32; one DPO step per
micro-batch (answer_logps, the sigmoid loss against fixed reference log-probs, backward, AdamW). The two ways
alternate, --repeats epochs each, and the best counts.

Read: real tokens/s (padding not counted), the padding share of the batch tensors, the rows, MFU
(lora_lab/flops.py, which counts no padding either) and the ratio packed / unpadded. Both ways compute the same
log-probs and loss (tests/test_dpo_packing.py).
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
from lora_lab.data.preference import get_preference_dataloaders  # noqa: E402
from lora_lab.dpo import answer_logps, preference_loss  # noqa: E402
from lora_lab.flops import FlopsMeter, batch_counts  # noqa: E402
from lora_lab.lora import inject_lora, mark_only_lora_trainable  # noqa: E402
from lora_lab.prompts import PromptStyle  # noqa: E402
from lora_lab.utils import LoraLabError  # noqa: E402


def main(n_pairs: int = 32, max_seq_length: int = 512, micro_batch_size: int = 8, repeats: int = 2,
         threads: Optional[int] = None, data: Optional[str] = None, n_layer: Optional[int] = None) -> dict:
    """One DPO epoch over the same pairs, unpacked and packed.

    Args:
        n_pairs: training pairs (the first of the data file's training split).
        max_seq_length: pairs longer than this are left out; packed rows hold at most this many tokens.
        micro_batch_size: pairs per micro-batch, both ways.
        repeats: epochs per way (alternating); the best counts.
        threads: torch threads.
        data: a preference file (default: the shared assets' preference_polite_1100.json).
        n_layer: fewer layers than SmolLM2-135M's 30, for a quick run.
    """
    if threads:
        torch.set_num_threads(threads)
    data = Path(data) if data else ASSETS / "data" / "preference_polite_1100.json"
    tokenizer_dir = ASSETS / "models" / "smollm2-135m-instruct"
    if not data.is_file() or not tokenizer_dir.is_dir():
        raise LoraLabError(f"needs {data} and {tokenizer_dir} (the shared assets)")
    tokenizer = Tokenizer(tokenizer_dir)
    style = PromptStyle.from_name("chatml")
    loaders = {}
    for way, packing in (("unpacked", False), ("packed", True)):
        train_dl, _, _ = get_preference_dataloaders(str(data), tokenizer, style, max_seq_length=max_seq_length,
                                                    micro_batch_size=micro_batch_size, seed=42, n_train=n_pairs,
                                                    n_val=0, pad_id=tokenizer.eos_id, verbose=False, packing=packing)
        loaders[way] = list(train_dl)

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
            logps, _ = answer_logps(model, batch["input_ids"], batch["labels"], batch.get("segment_ids"))  # (2b,)
            chosen, rejected = logps.chunk(2)
            ref = torch.full_like(chosen, -50.0)  # fixed reference log-probs: their value does not change the cost
            preference_loss(chosen, rejected, ref, ref, beta=0.1)["losses"].mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    epoch(loaders["packed"][:1]), epoch(loaders["unpacked"][:1])  # warm-up
    times = {way: [] for way in loaders}
    for _ in range(repeats):
        for way, batches in loaders.items():
            times[way].append(epoch(batches))

    results = {}
    for way, batches in loaders.items():
        tokens = sum(batch_counts(b)[0] for b in batches)
        flops = sum(meter.flops(*batch_counts(b)) for b in batches)
        shape = sum(b["input_ids"].numel() for b in batches)
        best = min(times[way])
        results[way] = dict(best=best, tokens=tokens, rows=sum(b["input_ids"].shape[0] for b in batches),
                            padding=1 - tokens / shape, tokens_per_s=tokens / best, mfu=flops / best / meter.peak)
    print(f"\nSmolLM2-135M shape{f' ({n_layer} layers)' if n_layer else ''}, random weights, LoRA r 8 on query and "
          f"value, float32, {torch.get_num_threads()} threads; {n_pairs} pairs of {data.name} in micro-batches of "
          f"{micro_batch_size}, max_seq_length {max_seq_length}; best of {repeats} epochs each, alternating; MFU "
          f"against the {meter.peak_source} ({meter.peak / 1e9:.1f} GFLOP/s)\n")
    print("| batches | rows | padding | real tokens | s/epoch | real tokens/s | MFU |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for way, r in results.items():
        print(f"| {way} | {r['rows']} | {100 * r['padding']:.1f}% | {r['tokens']:,} | {r['best']:.2f} | "
              f"{r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% |")
    ratio = results["packed"]["tokens_per_s"] / results["unpacked"]["tokens_per_s"]
    print(f"\npacked / unpacked real tokens/s: {ratio:.2f}x")
    return results


if __name__ == "__main__":
    from jsonargparse import CLI

    sys.exit(CLI(main, as_positional=False) and None)
