"""Classify texts with a classifier trained by finetune/classify.py: the label and the probability of each class.

    python generate/classify.py --model_dir out/classify/blocks --text "A gripping, beautifully shot film."
    python generate/classify.py --model_dir out/classify/blocks --file reviews.csv --out_file predictions.csv

The model directory holds classifier_config.json (the labels in their order, the pooling, the method, the base
model) and classifier.safetensors; the base model is read from the config's base_model (--checkpoint_dir to
point elsewhere). A --file (.csv / .json / .jsonl, texts in the classifier's text column or --text_column) is
classified in batches of texts of similar length, with progress; --out_file (.csv) gets one row per text: the
text, the predicted label and one probability column per class (p_<label>). When the file also has the label
column, accuracy, macro-F1 and the confusion matrix are printed too.
"""

import csv
import sys
import time
from pathlib import Path
from typing import Optional

import torch

# run as `python generate/classify.py` from a checkout without installing: make lora_lab importable
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_lab.classifier import (classification_scores, classify, format_scores, load_classifier,  # noqa: E402
                                 read_classifier)
from lora_lab.data.classification import collate_texts  # noqa: E402
from lora_lab.data.instructions import _iter_records, _Unreadable  # noqa: E402
from lora_lab.generate import peak_memory_bytes, reset_peak_memory, select_device, select_dtype  # noqa: E402
from lora_lab.tokenizer import Tokenizer  # noqa: E402
from lora_lab.utils import LoraLabError, atomic_path, cli  # noqa: E402


def main(
    model_dir: Path = Path("out/classify"),
    text: Optional[str] = None,
    file: Optional[Path] = None,
    out_file: Optional[Path] = None,
    checkpoint_dir: Optional[Path] = None,
    text_column: Optional[str] = None,
    batch_size: int = 16,
    precision: Optional[str] = None,
    device: str = "auto",
) -> None:
    """Classify one text, or every text of a file.

    Args:
        model_dir: the out_dir of finetune/classify.py.
        text: one text to classify.
        file: a .csv / .json / .jsonl file of texts to classify.
        out_file: with --file: write the predictions to this .csv file (default: print them).
        checkpoint_dir: the base model; default: the classifier's base_model.
        text_column: the column of --file that holds the texts (default: the one the classifier trained on).
        batch_size: texts per forward pass.
        precision: weights' dtype: bf16-true, 16-true or 32-true; default bf16 on a GPU, float32 on the CPU.
        device: auto, cpu, cuda, cuda:N or mps.
    """
    if (text is None) == (file is None):
        raise LoraLabError("give --text TEXT or --file FILE (one of them)")
    if out_file is not None and file is None:
        raise LoraLabError("--out_file goes with --file")
    if text is not None and not text.strip():
        raise LoraLabError("--text is empty")
    config, _ = read_classifier(model_dir)  # one line if model_dir is not a classifier
    column = text_column or config.text_column
    rows = [{"text": text}] if text is not None else read_texts(Path(file), column, config.label_column)
    device = select_device(device)
    dtype = select_dtype(precision, device)

    t0 = time.perf_counter()
    model, config = load_classifier(model_dir, checkpoint_dir, device=device)
    if config.base_quantization is None:
        model.to(dtype)  # (an NF4 base stays 4-bit; its float parts stay as trained)
    tokenizer = Tokenizer(model_dir)
    print(f"Loaded the {config.method} classifier {model_dir} ({', '.join(config.labels)}; {device}) in "
          f"{time.perf_counter() - t0:.2f} s", file=sys.stderr)

    ids = [tokenizer.encode(r["text"])[:config.max_seq_length] for r in rows]
    probabilities = torch.empty(len(rows), len(config.labels))  # (N, L)
    order = sorted(range(len(rows)), key=lambda i: len(ids[i]))  # similar lengths together: little padding
    reset_peak_memory(device)
    t0, shown = time.perf_counter(), time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = collate_texts([{"input_ids": ids[i]} for i in chunk], pad_id=config.pad_id)
            logits = classify(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                              config.pooling)  # (B, L)
            probabilities[chunk] = torch.softmax(logits.float(), dim=-1).cpu()
            done = min(start + batch_size, len(order))
            if file is not None and (done == len(order) or time.perf_counter() - shown > 2):
                shown = time.perf_counter()
                print(f"classified {done}/{len(order)} texts", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0
    predicted = probabilities.argmax(-1)  # (N,)

    if text is not None:
        p = probabilities[0]
        print(f"{config.labels[int(predicted[0])]}\t" + "  ".join(f"{name} {float(v):.4f}"
                                                               for name, v in zip(config.labels, p)))
    else:
        header = ["text", "label", *(f"p_{name}" for name in config.labels)]
        out_rows = [[r["text"], config.labels[int(k)], *(f"{float(v):.6f}" for v in p)]
                    for r, k, p in zip(rows, predicted, probabilities)]
        if out_file is not None:
            with atomic_path(out_file) as tmp:
                with open(tmp, "w", newline="") as f:
                    csv.writer(f).writerows([header, *out_rows])
            print(f"Predictions for {len(rows)} texts written to {out_file}", file=sys.stderr)
        else:
            writer = csv.writer(sys.stdout)
            writer.writerows([header, *out_rows])
        known = [(i, r["label"]) for i, r in enumerate(rows) if r.get("label") in config.labels]
        if known:
            targets = torch.tensor([config.labels.index(label) for _, label in known])
            scores = classification_scores(predicted[[i for i, _ in known]], targets, len(config.labels))
            print(format_scores(scores, config.labels, f"{file} (rows with a known label)"), file=sys.stderr)
    print(f"{len(rows)} texts in {seconds:.2f} s ({len(rows) / max(seconds, 1e-9):.1f} texts/s); peak memory "
          f"{peak_memory_bytes(device) / 2**30:.2f} GiB", file=sys.stderr)


def read_texts(path: Path, text_column: str, label_column: str) -> list[dict]:
    """{"text", and "label" if the row has one} for each row of a .csv / .json / .jsonl file."""
    if not path.is_file():
        raise LoraLabError(f"--file {path} does not exist")
    if path.suffix.lower() not in (".csv", ".json", ".jsonl"):
        raise LoraLabError(f"--file {path}: use a .csv, .json or .jsonl file")
    rows = []
    for where, record in _iter_records(path):
        if isinstance(record, _Unreadable) or not isinstance(record, dict):
            raise LoraLabError(f"{path} {where}: not a row with a {text_column!r} column")
        if text_column not in record:
            raise LoraLabError(f"{path} has no {text_column!r} column (its columns: {', '.join(map(str, record))}): "
                               f"pass --text_column <name>")
        value = record[text_column]
        if not isinstance(value, str) or not value.strip():
            raise LoraLabError(f"{path} {where}: the text ({text_column!r}) is empty: fill it or remove the row")
        row = {"text": value}
        if record.get(label_column) is not None:
            row["label"] = str(record[label_column]).strip()
        rows.append(row)
    if not rows:
        raise LoraLabError(f"--file {path} has no rows")
    return rows


if __name__ == "__main__":
    cli(main)
