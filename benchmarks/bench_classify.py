"""The three ways to make an LLM a classifier, on one real task: test accuracy, training time and peak memory.

    python -m lora_lab.convert ../shared/assets/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
        checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
    python benchmarks/bench_classify.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --n_train 2000 --n_test 1000

The task: Rotten Tomatoes review snippets, fresh vs rotten (the `plot` rows are dropped), from
../shared/assets/data/rotten_tomatoes_13905.csv. One seeded shuffle gives the train and test files (and a small
validation file) in --out_dir; every row of the table trains on the same train file and is scored on the same test
file. Each LLM row is one run of finetune/classify.py in its own process (its scores.json gives the accuracy, the
training time, feature extraction included for `features`, and the peak memory: on a CPU the peak resident set
size of the process during training, model included; on a GPU the peak of allocated tensors). Rows:

    majority class                         the share of the test set's most common label
    bag of words (TF-IDF + logistic reg.)  scikit-learn (benchmark only), word 1-2 grams, C tuned on the validation file
    features + LR (last / mean pooling)    --method features [--pool mean]
    head only                              --method head
    last 1 / 2 / 3 blocks                  --method blocks --trainable_blocks N
    all layers                             --method full
    LoRA / QLoRA (r 8, all block linears)  --method lora / qlora

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

RUNS = {  # name -> finetune/classify.py arguments, the most telling rows first (a short budget runs a prefix)
    "features + LR (last token)": ["--method", "features"],
    "head only": ["--method", "head"],
    "last 2 blocks": ["--method", "blocks", "--trainable_blocks", "2"],
    "LoRA r 8 (all block linears)": ["--method", "lora"],
    "all layers": ["--method", "full"],
    "last 1 block": ["--method", "blocks", "--trainable_blocks", "1"],
    "last 3 blocks": ["--method", "blocks", "--trainable_blocks", "3"],
    "features + LR (mean pooling)": ["--method", "features", "--pool", "mean"],
    "QLoRA r 8 (NF4 base)": ["--method", "qlora"],
}


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
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated row names (default: all)")
    args = parser.parse_args()

    splits = make_split(args.data, args.out_dir, args.n_train, args.n_val, args.n_test, args.seed)
    test_labels = [r["label"] for r in splits["test"]]
    majority = max(set(test_labels), key=test_labels.count)
    results = {"majority class": {"accuracy": test_labels.count(majority) / len(test_labels)},
               "bag of words (TF-IDF + LR)": bag_of_words(splits)}
    extra = ["--max_seq_length", str(args.max_seq_length), "--epochs", str(args.epochs), "--seed", str(args.seed),
             "--eval_interval", "1000000", "--log_interval", "10"]
    for name in [n.strip() for n in args.runs.split(",") if n.strip()]:
        scores = run_classify(name, RUNS[name], args.checkpoint_dir, args.out_dir, extra)
        results[name] = {"accuracy": scores["test"]["accuracy"], "macro_f1": scores["test"]["macro_f1"],
                         "train_seconds": scores["train_seconds"], "peak_memory_bytes": scores["peak_memory_bytes"],
                         "trainable_parameters": scores["trainable_parameters"], "steps": scores["steps"]}
        (args.out_dir / "results.json").write_text(json.dumps(
            {"n_train": args.n_train, "n_val": args.n_val, "n_test": args.n_test, "rows": results}, indent=2) + "\n")

    print(f"\nSmolLM2-135M-Instruct, fresh vs rotten: {args.n_train} training / {args.n_test} test texts "
          f"(max_seq_length {args.max_seq_length}, {args.epochs:g} epoch)\n")
    print("| method | test accuracy | macro-F1 | trainable parameters | training time | peak memory |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        mem = f"{r['peak_memory_bytes'] / 2**30:.2f} GiB" if r.get("peak_memory_bytes") else "-"
        secs = f"{r['train_seconds']:.0f} s" if r.get("train_seconds") is not None else "-"
        params = f"{r['trainable_parameters']:,}" if "trainable_parameters" in r else "-"
        f1 = f"{r['macro_f1']:.3f}" if "macro_f1" in r else "-"
        print(f"| {name} | {r['accuracy']:.1%} | {f1} | {params} | {secs} | {mem} |")


if __name__ == "__main__":
    main()
