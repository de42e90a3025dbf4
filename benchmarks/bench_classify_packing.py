"""finetune/classify.py's --packing against its default length buckets: texts/s of a LoRA classifier's training
step (forward + backward), on real reviews, the two alternating step by step so that a busy machine weighs on both.

    python benchmarks/bench_classify_packing.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --data ../shared/assets/data/rotten_tomatoes_13905.csv --steps 16 --threads 1

Buckets: micro-batches of --micro_batch_size texts of similar length (right-padded). Packed: rows of
--max_seq_length tokens holding several texts each (segment_ids; each text attends only to itself), --rows per
micro-batch. Printed: texts/s, real (non-padding) tokens/s, MFU (lora_lab/flops.py's count, against a CPU probe or
the GPU's datasheet), and packed / buckets.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lora_lab import GPT, Tokenizer
from lora_lab.classifier import add_classification_head, classify
from lora_lab.data.classification import ClassificationDataset, PackedTexts, collate_packed_texts, collate_texts
from lora_lab.data.sft import LengthBucketSampler, ShuffledBatchSampler
from lora_lab.flops import FlopsMeter
from lora_lab.lora import inject_lora, mark_only_lora_trainable


def main(checkpoint_dir: Path, data: Path, steps: int = 16, micro_batch_size: int = 8, rows: int = 1,
         max_seq_length: int = 256, n_texts: int = 3000, threads: int = 1, device: str = "cpu") -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tokenizer = Tokenizer(checkpoint_dir)
    with open(data, newline="") as f:
        texts = [r for r in csv.DictReader(f) if r["label"] in ("fresh", "rotten") and r["text"].strip()][:n_texts]
    ds = ClassificationDataset(texts, tokenizer, ["fresh", "rotten"], max_seq_length)
    model = GPT.from_checkpoint(checkpoint_dir)
    add_classification_head(model, 2)
    inject_lora(model, r=8, alpha=16.0, dropout=0.0, targets=["query", "key", "value", "projection", "mlp"])
    mark_only_lora_trainable(model)
    model.lm_head.requires_grad_(True)
    model.to(device).train()
    packed = PackedTexts(ds, max_seq_length, seed=0)
    loaders = {
        "buckets": (collate_texts([ds[i] for i in b]) for b in LengthBucketSampler(ds.lengths, micro_batch_size, 0)),
        "packed": (collate_packed_texts([packed[i] for i in b]) for b in ShuffledBatchSampler(len(packed), rows, 0)),
    }
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step(batch) -> float:
        batch = {k: v.to(device) for k, v in batch.items()}
        sync()
        t0 = time.perf_counter()
        logits = classify(model, batch["input_ids"], batch["attention_mask"], "last",
                          segment_ids=batch.get("segment_ids"))  # (texts, 2)
        F.cross_entropy(logits, batch["labels"]).backward()
        model.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0

    for it in loaders.values():  # warm-up
        step(next(it))
    meters = {name: FlopsMeter(model, device, torch.float32) for name in loaders}
    totals = {name: {"seconds": 0.0, "texts": 0, "tokens": 0} for name in loaders}
    for _ in range(steps):  # alternating: the machine's load weighs on both alike
        for name, it in loaders.items():
            batch = next(it)
            totals[name]["seconds"] += step(batch)
            totals[name]["texts"] += len(batch["labels"])
            totals[name]["tokens"] += int(batch["attention_mask"].sum())
            meters[name].update(batch)
    fill = sum(packed.lengths) / (max_seq_length * len(packed))
    print(f"LoRA classifier step on {checkpoint_dir.name}, {len(ds)} texts ({sum(ds.lengths) / len(ds):.1f} tokens "
          f"on average); packed rows of {max_seq_length} are {fill:.1%} full; {steps} steps each, alternating, "
          f"{threads} thread(s) on {device}")
    print("| layout | per step | texts/s | real tokens/s | MFU |")
    print("|---|---|---|---|---|")
    for name, t in totals.items():
        per_step = f"{micro_batch_size} texts" if name == "buckets" else f"{rows} x {max_seq_length} tokens"
        print(f"| {name} | {per_step} | {t['texts'] / t['seconds']:.2f} | {t['tokens'] / t['seconds']:.1f} | "
              f"{meters[name].format(t['seconds'])[4:]} |")
    ratio = (totals["packed"]["texts"] / totals["packed"]["seconds"]) / \
        (totals["buckets"]["texts"] / totals["buckets"]["seconds"])
    print(f"packed / buckets: {ratio:.2f}x texts/s")
    return {"totals": totals, "ratio": ratio}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_dir", type=Path, default=Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"))
    parser.add_argument("--data", type=Path, default=Path("../shared/assets/data/rotten_tomatoes_13905.csv"))
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--micro_batch_size", type=int, default=8)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--max_seq_length", type=int, default=256)
    parser.add_argument("--n_texts", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    main(**vars(args))
