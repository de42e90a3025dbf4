"""The three ways to make an LLM a classifier, on one real task: test accuracy, training time and peak memory.

    python -m lora_lab.convert ../shared/assets/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
        checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
    python benchmarks/bench_classify.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --n_train 2000 --n_test 1000

The task: Rotten Tomatoes review snippets, fresh vs rotten (the `plot` rows are dropped), from
../shared/assets/data/rotten_tomatoes_13905.csv. One seeded shuffle gives the train and test files (and a small
validation file) in --out_dir; every row of the table trains on the same train file for the same --epochs and is
scored on the same test file.

The rows whose transformer is frozen below the last 3 blocks (features + LR, head only, last 1 / 2 / 3 blocks) share
one pass of the frozen model: the input of block n_layer - 3 is computed once for every text (a forward pre-hook
catches it; the same model, the same numbers) and each row then runs and trains only the top 3 blocks, the final
norm and the head on it, with the script's pooling, defaults and optimizer (AdamW, betas 0.9 / 0.95, linear warm-up
and cosine decay, batch 16). That is what makes these rows cheap on a shared CPU; their time is the training on
the cache (the one-time pass is reported apart). LoRA, QLoRA and all layers need gradients through every block:
each is one run of finetune/classify.py in its own process (scores.json gives its accuracy, its training time and
its peak memory: on a CPU the peak resident set size of the process while training, model included).

    majority class                         the share of the test set's most common label
    bag of words (TF-IDF + logistic reg.)  scikit-learn (benchmark only), word 1-2 grams, C tuned on the validation file
    features + LR (last / mean pooling)    logistic_regression on the pooled final hidden states (--method features)
    head only                              --method head
    last 1 / 2 / 3 blocks                  --method blocks --trainable_blocks N
    all layers / LoRA / QLoRA              finetune/classify.py --method full / lora / qlora (r 8, all block linears)

Results go to --out_dir/results.json and are printed as a Markdown table (tutorials/classify.md has ours).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "assets" / "data" / "rotten_tomatoes_13905.csv"

RUNS = {  # script rows: name -> finetune/classify.py arguments
    "LoRA r 8 (all block linears)": ["--method", "lora"],
    "all layers": ["--method", "full"],
    "QLoRA r 8 (NF4 base)": ["--method", "qlora"],
}
TOP = 3  # the cached rows train at most the last TOP blocks


def make_split(data: Path, out_dir: Path, n_train: int, n_val: int, n_test: int, seed: int) -> dict:
    """train.csv / val.csv / test.csv of fresh and rotten rows, drawn with one seeded shuffle."""
    with open(data, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["label"] in ("fresh", "rotten") and r["text"].strip()]
    random.Random(seed).shuffle(rows)
    if n_train + n_val + n_test > len(rows):
        raise SystemExit(f"only {len(rows)} fresh/rotten rows: ask for fewer")
    splits = {"test": rows[:n_test], "val": rows[n_test:n_test + n_val],
              "train": rows[n_test + n_val:n_test + n_val + n_train]}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        with open(out_dir / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows({"text": r["text"], "label": r["label"]} for r in split)
    return splits


def bag_of_words(splits: dict) -> dict:
    """TF-IDF (word 1-2 grams) + logistic regression, C chosen on the validation split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    texts = {k: [r["text"] for r in v] for k, v in splits.items()}
    labels = {k: [r["label"] for r in v] for k, v in splits.items()}
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
    x_train = vectorizer.fit_transform(texts["train"])
    best = None
    for c in (0.3, 1.0, 3.0, 10.0, 30.0):
        clf = LogisticRegression(C=c, max_iter=2000).fit(x_train, labels["train"])
        acc = clf.score(vectorizer.transform(texts["val"]), labels["val"])
        if best is None or acc > best[0]:
            best = (acc, clf)
    accuracy = best[1].score(vectorizer.transform(texts["test"]), labels["test"])
    return {"accuracy": accuracy, "train_seconds": time.perf_counter() - t0, "peak_memory_bytes": None}


class _Caught(Exception):
    pass


def prefix_cache(checkpoint_dir: Path, splits: dict, labels: list[str], max_seq_length: int, batch_size: int = 16):
    """The frozen model run once over every text up to block n_layer - TOP: per split, a list of batches
    (x (B, T, C) the input of that block, cos, sin, mask, attention_mask, labels (B,))."""
    import torch

    from lora_lab import GPT, Tokenizer
    from lora_lab.data.classification import collate_texts

    tokenizer, model = Tokenizer(checkpoint_dir), GPT.from_checkpoint(checkpoint_dir).eval()
    cut = model.config.n_layer - TOP
    caught = {}

    def hook(module, args):
        caught["args"] = args  # (x, cos, sin, input_pos, mask)
        raise _Caught

    handle = model.blocks[cut].register_forward_pre_hook(hook)
    cache, t0 = {}, time.perf_counter()
    for name, rows in splits.items():
        samples = [{"input_ids": tokenizer.encode(r["text"])[:max_seq_length], "label": labels.index(r["label"])}
                   for r in rows]
        order = sorted(range(len(samples)), key=lambda i: len(samples[i]["input_ids"]))  # little padding
        batches = []
        for start in range(0, len(order), batch_size):
            batch = collate_texts([samples[i] for i in order[start:start + batch_size]], pad_id=0)
            try:
                with torch.no_grad():
                    model(batch["input_ids"], segment_ids=batch["attention_mask"])
            except _Caught:
                pass
            x, cos, sin, _, mask = caught["args"]
            batches.append((x, cos, sin, mask, batch["attention_mask"], batch["labels"]))
        cache[name] = batches
        print(f"cached {name}: {len(rows)} texts ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    handle.remove()
    return model, cache, time.perf_counter() - t0


def cached_rows(model, cache: dict, num_labels: int, epochs: float, seed: int, l2: float) -> dict:
    """features + LR (last, mean), head only, last 1 / 2 / 3 blocks, each on the cached prefix."""
    import copy
    import math

    import torch
    import torch.nn.functional as F

    import finetune.classify as ft
    from lora_lab.classifier import classification_scores, logistic_regression, pool
    from lora_lab.training import lr_at, set_lr

    from lora_lab.args import flat_defaults

    defaults = flat_defaults(ft.setup)  # under their flat names (lora_lab/args.py): learning_rate, batch_size, ...
    top = [model.blocks[i] for i in range(model.config.n_layer - TOP, model.config.n_layer)]

    def run_top(blocks, norm, head, batch, pooling="last"):
        x, cos, sin, mask, attention_mask, _ = batch
        for block in blocks:
            x = block(x, cos, sin, None, mask)
        return pool(head(norm(x)), attention_mask, pooling)  # (B, num_labels or C)

    results = {}
    for pooling in ("last", "mean"):
        t0 = time.perf_counter()
        with torch.no_grad():
            feats = {s: (torch.cat([run_top(top, model.norm_f, torch.nn.Identity(), b, pooling) for b in batches]),
                         torch.cat([b[-1] for b in batches])) for s, batches in cache.items()}
        W, bias = logistic_regression(*feats["train"], num_classes=num_labels, l2=l2)
        predictions = (feats["test"][0] @ W.T + bias).argmax(-1)
        scores = classification_scores(predictions, feats["test"][1], num_labels)
        name = f"features + LR ({'last token' if pooling == 'last' else 'mean pooling'})"
        results[name] = {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"],
                         "train_seconds": time.perf_counter() - t0, "trainable_parameters": W.numel() + bias.numel()}
        print(f"{name}: {scores['accuracy']:.2%}", file=sys.stderr, flush=True)

    for n_blocks in (0, 1, 2, 3):  # 0: head only
        torch.manual_seed(seed)
        blocks, norm = copy.deepcopy(top), copy.deepcopy(model.norm_f)
        head = torch.nn.Linear(model.config.n_embd, num_labels, bias=False)
        torch.nn.init.normal_(head.weight, 0.0, 0.02)
        trainable = [head] + ([*blocks[TOP - n_blocks:], norm] if n_blocks else [])
        for m in (*blocks, norm):
            m.requires_grad_(False)
        params = [p for m in trainable for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
        lr0 = defaults["learning_rate"] or ft.DEFAULT_LEARNING_RATES["blocks" if n_blocks else "head"]
        head_lr = ft.DEFAULT_LEARNING_RATES["head"]  # the script's --head_learning_rate default
        body = [p for p in params if all(p is not q for q in head.parameters())]
        groups = ([{"params": body, "lr_ratio": 1.0}] if body else []) + [
            {"params": list(head.parameters()), "lr_ratio": head_lr / lr0}]
        optimizer = torch.optim.AdamW(groups, lr=lr0, weight_decay=0.0, betas=(0.9, 0.95))
        # the script's batch (16) of texts of similar length: the cache's batches, in a seeded order per epoch
        train = cache["train"]
        max_steps = max(1, math.ceil(epochs * len(train)))
        rng, order, t0 = __import__("random").Random(seed), [], time.perf_counter()
        for step in range(max_steps):
            if not order:
                order = list(range(len(train)))
                rng.shuffle(order)
            set_lr(optimizer, lr_at(step, max_steps, lr0, defaults["warmup_steps"], 0.0))
            batch = train[order.pop()]
            loss = F.cross_entropy(run_top(blocks, norm, head, batch), batch[-1])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, defaults["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            predictions = torch.cat([run_top(blocks, norm, head, b).argmax(-1) for b in cache["test"]])
        scores = classification_scores(predictions, torch.cat([b[-1] for b in cache["test"]]), num_labels)
        name = "head only" if n_blocks == 0 else f"last {n_blocks} block{'s' if n_blocks > 1 else ''}"
        results[name] = {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"], "train_seconds": seconds,
                         "trainable_parameters": sum(p.numel() for p in params), "steps": max_steps}
        print(f"{name}: {scores['accuracy']:.2%} after {max_steps} steps ({seconds:.0f} s)", file=sys.stderr,
              flush=True)
    return results


def run_classify(name: str, args: list[str], checkpoint_dir: Path, out_dir: Path, extra: list[str]) -> dict:
    run_dir = out_dir / "runs" / name.split(" (")[0].replace(" ", "_").replace("+", "").replace("__", "_")
    run_dir = run_dir.with_name(run_dir.name + ("_mean" if "--pool" in args else ""))
    if (run_dir / "scores.json").is_file():  # done in an earlier call: keep it (delete the folder to redo it)
        return json.loads((run_dir / "scores.json").read_text())
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    cmd = [sys.executable, str(ROOT / "finetune" / "classify.py"), "--checkpoint_dir", str(checkpoint_dir),
           "--data", str(out_dir / "train.csv"), "--val_data", str(out_dir / "val.csv"),
           "--test_data", str(out_dir / "test.csv"), "--labels", "fresh,rotten", "--out_dir", str(run_dir),
           *args, *extra]
    print(f"== {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    subprocess.run(cmd, check=True, env=env)
    return json.loads((run_dir / "scores.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint_dir", type=Path, default=ROOT / "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out_dir", type=Path, default=ROOT / "out" / "bench_classify")
    parser.add_argument("--n_train", type=int, default=2000)
    parser.add_argument("--n_val", type=int, default=200)
    parser.add_argument("--n_test", type=int, default=1000)
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--features_l2", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated script rows (default: all; '' none)")
    parser.add_argument("--max_time", default=None, help="a time budget for each script row (finetune/classify.py)")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    splits = make_split(args.data, args.out_dir, args.n_train, args.n_val, args.n_test, args.seed)
    labels = ["fresh", "rotten"]
    test_labels = [r["label"] for r in splits["test"]]
    majority = max(set(test_labels), key=test_labels.count)
    results = {"majority class": {"accuracy": test_labels.count(majority) / len(test_labels)},
               "bag of words (TF-IDF + LR)": bag_of_words(splits)}
    info = {"n_train": args.n_train, "n_val": args.n_val, "n_test": args.n_test, "epochs": args.epochs,
            "max_seq_length": args.max_seq_length}

    def write():
        (args.out_dir / "results.json").write_text(json.dumps({**info, "rows": results}, indent=2) + "\n")

    cached_file = args.out_dir / "cached_rows.json"
    if cached_file.is_file():  # done in an earlier call (delete the file to redo it)
        saved = json.loads(cached_file.read_text())
        info["prefix_seconds"] = saved["prefix_seconds"]
        results.update(saved["rows"])
    else:
        cache_file = args.out_dir / "prefix_cache.pt"  # the frozen pass, kept: the rows can be redone cheaply
        if cache_file.is_file():
            import torch

            from lora_lab import GPT

            model, saved = GPT.from_checkpoint(args.checkpoint_dir).eval(), torch.load(cache_file, weights_only=True)
            cache, prefix_seconds = saved["cache"], saved["seconds"]
        else:
            model, cache, prefix_seconds = prefix_cache(args.checkpoint_dir, splits, labels, args.max_seq_length)
            __import__("torch").save({"cache": cache, "seconds": prefix_seconds}, cache_file)
        rows = cached_rows(model, cache, len(labels), args.epochs, args.seed, args.features_l2)
        del model, cache
        info["prefix_seconds"] = prefix_seconds
        cached_file.write_text(json.dumps({"prefix_seconds": prefix_seconds, "rows": rows}, indent=2) + "\n")
        results.update(rows)
    write()
    extra = ["--max_seq_length", str(args.max_seq_length), "--epochs", str(args.epochs), "--seed", str(args.seed),
             "--eval_interval", "1000000", "--log_interval", "4", "--batch_size", "16", "--micro_batch_size", "16",
             *(["--max_time", args.max_time] if args.max_time else [])]
    for name in [n.strip() for n in args.runs.split(",") if n.strip()]:
        scores = run_classify(name, RUNS[name], args.checkpoint_dir, args.out_dir, extra)
        results[name] = {"accuracy": scores["test"]["accuracy"], "macro_f1": scores["test"]["macro_f1"],
                         "train_seconds": scores["train_seconds"], "peak_memory_bytes": scores["peak_memory_bytes"],
                         "trainable_parameters": scores["trainable_parameters"], "steps": scores["steps"]}
        write()

    print(f"\nSmolLM2-135M-Instruct, fresh vs rotten: {args.n_train} training / {args.n_test} test texts "
          f"(max_seq_length {args.max_seq_length}, {args.epochs:g} epoch(s); the frozen prefix pass of the cached "
          f"rows took {info['prefix_seconds']:.0f} s)\n")
    print("| method | test accuracy | macro-F1 | trainable parameters | steps | training time | peak memory |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        mem = f"{r['peak_memory_bytes'] / 2**30:.2f} GiB" if r.get("peak_memory_bytes") else "-"
        secs = f"{r['train_seconds']:.1f} s" if r.get("train_seconds") is not None else "-"
        params = f"{r['trainable_parameters']:,}" if "trainable_parameters" in r else "-"
        f1 = f"{r['macro_f1']:.3f}" if "macro_f1" in r else "-"
        print(f"| {name} | {r['accuracy']:.1%} | {f1} | {params} | {r.get('steps', '-')} | {secs} | {mem} |")


if __name__ == "__main__":
    main()
