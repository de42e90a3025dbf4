"""Mining texts in bulk: generate/batch.py (the server's continuous-batching engine, in-process) against a loop over
generate/lora.py's generation and against transformers + PEFT's batched `generate` with padding, on the same model,
adapter and texts, with a float and an NF4 base; texts/s and the time and cost of 1 M texts on this machine.

    python benchmarks/bench_batch.py                      # 1,000 reviews, float and NF4, all three sides
    python benchmarks/bench_batch.py --n_texts 48 --loop_texts 16 --max_new_tokens 48     # a quick look

The job: `--n_texts` short real review sentences (the first rows of ../shared/assets/data/rotten_tomatoes_13905.csv)
-> the quick-start adapter's JSON object (finetune/lora.py with its defaults: SmolLM2-135M-Instruct, r 8 on query
and value, trained on the built-in json_extraction task), each prompt the training instruction plus the review in
the adapter's prompt style, greedy, at most `--max_new_tokens` tokens, stopping at the end-of-turn token.

  batch.py           generate/batch.py's main: --max_batch_size rows decoded together, a finished row replaced by the
                     next at once; adapter unmerged (stacked layers), as the server runs it
  generate/lora.py   the script's model (adapter merged into float weights; beside the NF4 weights with nf4) and its
                     loop: lora_lab.generate.generate, one text after the other (on `--loop_texts` of the texts: it
                     is the slow side; its rate is per text, so the projection holds)
  transformers+PEFT  the same weights in transformers (bitsandbytes Linear4bit NF4 for nf4), PeftModel with the
                     adapter exported by lora_lab.export_peft; `generate` on batches of --max_batch_size prompts,
                     left-padded, in input order (a batch ends when its longest answer ends)

Every side's answers are compared with the loop's (greedy: they should be the same texts), and scored against the
quick-start task's JSON schema. Times are wall-clock, and CPU time of the main thread (with `--threads 1` every side
computes in it: batch.py steps the engine in its own thread, no engine thread), which a shared machine's load does
not inflate: on a busy machine read the CPU-time ratios.
Cost: hours for 1 M texts at this rate x `--usd_per_hour` (default 0.05: roughly a 2-vCPU cloud VM).
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_challenge's peer model
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_lab.utils import LoraLabError, cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REVIEWS = ROOT.parent / "shared" / "assets" / "data" / "rotten_tomatoes_13905.csv"
# the quick-start task's answer (lora_lab/data/json_extraction.py)
SCHEMA = {"type": "object", "required": ["product", "sentiment", "issue", "rating"], "additionalProperties": False,
          "properties": {"product": {"type": "string"}, "sentiment": {"enum": ["positive", "neutral", "negative"]},
                         "issue": {"type": "string"}, "rating": {"type": "integer", "minimum": 1, "maximum": 5}}}


def review_texts(n: int, path: Path = REVIEWS) -> list[str]:
    if not path.is_file():
        raise LoraLabError(f"{path} is missing: the benchmark reads ../shared/assets (or pass --reviews FILE.csv)")
    with open(path, newline="", encoding="utf-8") as f:
        texts = [row["text"] for row in csv.DictReader(f) if row.get("label") in ("fresh", "rotten")]
    return texts[:n]


def run_batch_script(checkpoint_dir, adapter_dir, prompts: list[str], quantize: str, max_batch_size: int,
                     max_new_tokens: int, tmp: Path) -> tuple[list[str], float, float, int]:
    """(answers, seconds, CPU seconds of this thread, generated tokens) of generate/batch.py on `prompts`."""
    from generate.batch import main

    src, out = tmp / f"in-{quantize}.jsonl", tmp / f"out-{quantize}.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    out.unlink(missing_ok=True)
    summary = main(input=src, output=out, checkpoint_dir=checkpoint_dir, adapter_dir=adapter_dir,
                   quantize=quantize, max_batch_size=max_batch_size, max_new_tokens=max_new_tokens, device="cpu")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(len(prompts))) and summary["failures"] == 0
    tokens = sum(r["completion_tokens"] for r in rows)
    return [r["output"] for r in rows], summary["seconds"], summary["cpu_seconds"], tokens


def script_model(checkpoint_dir, adapter_dir, quantize: str):
    """generate/lora.py's model: the adapter merged into float weights, or beside NF4 weights."""
    from lora_lab.adapted import load_lora_model
    from lora_lab.lora import merge_lora

    model = load_lora_model(checkpoint_dir, adapter_dir, quantize=quantize, merge=False, device="cpu",
                            dtype=torch.float32)
    if quantize != "nf4":
        merge_lora(model)
    return model


def run_loop(model, tokenizer, prompt_ids: list[torch.Tensor], stop_ids, max_new_tokens: int):
    """generate/lora.py's loop, one text after the other: (answers, seconds, CPU seconds, generated tokens)."""
    from lora_lab.generate import generate

    answers, tokens = [], 0
    t0, cpu0 = time.perf_counter(), time.thread_time()
    for ids in prompt_ids:
        out = list(generate(model, ids, max_new_tokens, temperature=0.0, eos_ids=stop_ids))
        tokens += len(out)
        answers.append(tokenizer.decode(torch.tensor([t for t in out if t not in stop_ids])))
    return answers, time.perf_counter() - t0, time.thread_time() - cpu0, tokens


def peft_model(checkpoint_dir, adapter_dir, quantize: str, tmp: Path):
    """transformers' model with the same weights (bitsandbytes NF4 linears for nf4) + PEFT with the adapter."""
    from bench_challenge import peer_model
    from peft import PeftModel

    from lora_lab.formats.peft import export_peft
    from lora_lab.model import GPT

    ours = GPT.from_checkpoint(checkpoint_dir).float()
    hf = peer_model(ours, torch.device("cpu"), torch.float32, quantize == "nf4").eval()
    del ours
    peft_dir = tmp / "peft"
    if not peft_dir.exists():
        export_peft(adapter_dir, peft_dir, checkpoint_dir=checkpoint_dir)
    return PeftModel.from_pretrained(hf, str(peft_dir)).eval()


def run_peft(model, tokenizer, prompt_ids: list[torch.Tensor], stop_ids, max_new_tokens: int, batch_size: int):
    """Batches of `batch_size` prompts, left-padded, through generate: (answers, seconds, CPU seconds, tokens)."""
    answers, tokens = [], 0
    pad = stop_ids[0]
    t0, cpu0 = time.perf_counter(), time.thread_time()
    with torch.inference_mode():
        for start in range(0, len(prompt_ids), batch_size):
            batch = prompt_ids[start:start + batch_size]
            T = max(len(ids) for ids in batch)
            x = torch.full((len(batch), T), pad, dtype=torch.long)  # (B, T) left-padded
            mask = torch.zeros_like(x)
            for i, ids in enumerate(batch):
                x[i, T - len(ids):] = ids
                mask[i, T - len(ids):] = 1
            out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=list(stop_ids), pad_token_id=pad)[:, T:]
            for row in out.tolist():
                n = next((k + 1 for k, t in enumerate(row) if t in stop_ids), len(row))  # up to and with the stop
                tokens += n
                answers.append(tokenizer.decode(torch.tensor([t for t in row[:n] if t not in stop_ids])))
    return answers, time.perf_counter() - t0, time.thread_time() - cpu0, tokens


def main(checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
         adapter_dir: Path = Path("out/finetune/lora"), n_texts: int = 1000, loop_texts: Optional[int] = 100,
         max_new_tokens: int = 64, max_batch_size: int = 16, quantize: list[str] = ["none", "nf4"],
         sides: list[str] = ["batch", "loop", "peft"], usd_per_hour: float = 0.05, threads: Optional[int] = None,
         reviews: Path = REVIEWS) -> list[dict]:
    """Print one table row per (base, side); return the rows.

    Args:
        checkpoint_dir: the base model (the quick start's SmolLM2-135M-Instruct).
        adapter_dir: the quick-start adapter (finetune/lora.py's out_dir).
        n_texts: reviews answered by batch.py and transformers + PEFT.
        loop_texts: of them, the first this many answered by the one-at-a-time loop (None: all).
        max_new_tokens: the longest answer.
        max_batch_size: rows decoded together (batch.py) and prompts per generate call (PEFT).
        quantize: bases to measure: none (float32), nf4.
        sides: batch, loop, peft.
        usd_per_hour: the machine's price, for the cost of 1 M texts.
        threads: torch threads (default: torch's).
        reviews: the CSV of reviews (text, label columns).
    """
    from lora_lab.data.json_extraction import INSTRUCTION
    from lora_lab.formats.download import ensure_checkpoint
    from lora_lab.json_score import parse_json_object, validate_schema
    from lora_lab.lora import base_checkpoint_dir, load_lora
    from lora_lab.prompts import PromptStyle
    from lora_lab.tokenizer import Tokenizer

    if threads:
        torch.set_num_threads(threads)
    if not set(sides) <= {"batch", "loop", "peft"} or not set(quantize) <= {"none", "nf4"}:
        raise LoraLabError("--sides: batch, loop, peft; --quantize: none, nf4")
    lora_config, _ = load_lora(adapter_dir)
    checkpoint_dir = ensure_checkpoint(base_checkpoint_dir(lora_config, checkpoint_dir, adapter_dir))
    texts = review_texts(n_texts, reviews)
    prompts = [f"{INSTRUCTION}\n\n{t}" for t in texts]  # what the adapter was trained on (prompts._join)
    tokenizer = Tokenizer(checkpoint_dir)
    style = PromptStyle.from_checkpoint(checkpoint_dir, name=lora_config.prompt_style)
    prompt_ids = [tokenizer.encode(style.apply(p)) for p in prompts]
    stop_ids = list(dict.fromkeys(tokenizer.eos_ids + style.stop_tokens(tokenizer)))
    n_loop = min(loop_texts or len(texts), len(texts))
    print(f"{len(texts)} reviews ({sum(map(len, prompt_ids)) / len(texts):.0f} prompt tokens on average), "
          f"greedy, at most {max_new_tokens} new tokens; adapter {adapter_dir}; torch threads "
          f"{torch.get_num_threads()}; the loop on the first {n_loop}")

    def valid(answer: str) -> bool:
        obj = parse_json_object(answer)
        return obj is not None and not validate_schema(obj, SCHEMA)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for q in quantize:
            results = {}
            if "loop" in sides:
                model = script_model(checkpoint_dir, adapter_dir, q)
                results["generate/lora.py loop"] = run_loop(model, tokenizer, prompt_ids[:n_loop], stop_ids,
                                                            max_new_tokens)
                del model
            if "batch" in sides:
                results["batch.py"] = run_batch_script(checkpoint_dir, adapter_dir, prompts, q, max_batch_size,
                                                       max_new_tokens, tmp)
            if "peft" in sides:
                model = peft_model(checkpoint_dir, adapter_dir, q, tmp)
                results["transformers+PEFT"] = run_peft(model, tokenizer, prompt_ids, stop_ids, max_new_tokens,
                                                        max_batch_size)
                del model
            reference = results.get("generate/lora.py loop", (None,))[0]
            for side, (answers, seconds, cpu_seconds, tokens) in results.items():
                rate = len(answers) / seconds
                row = {"base": "NF4" if q == "nf4" else "float32", "side": side, "texts": len(answers),
                       "texts_per_s": rate, "tokens_per_s": tokens / seconds, "hours_per_1M": 1e6 / rate / 3600,
                       "texts_per_cpu_s": len(answers) / cpu_seconds,
                       "schema_valid": sum(map(valid, answers)) / len(answers)}
                row["usd_per_1M"] = row["hours_per_1M"] * usd_per_hour
                if reference is not None:
                    row["same_as_loop"] = sum(a == b for a, b in zip(answers, reference)) / len(reference)
                rows.append(row)
                print(f"{row['base']} {side}: {len(answers)} texts in {seconds:.1f} s ({cpu_seconds:.1f} s CPU of "
                      f"this thread), {rate:.3f} texts/s", flush=True)
    loop_rate = {r["base"]: r["texts_per_s"] for r in rows if r["side"] == "generate/lora.py loop"}
    loop_cpu = {r["base"]: r["texts_per_cpu_s"] for r in rows if r["side"] == "generate/lora.py loop"}
    print(f"\n| base | side | texts | texts/s | x loop | texts per CPU s | x loop (CPU) | tokens/s | 1M texts: hours "
          f"| $ at ${usd_per_hour:g}/h | = loop's text | schema-valid |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        x = f"{r['texts_per_s'] / loop_rate[r['base']]:.1f}" if r["base"] in loop_rate else "-"
        x_cpu = f"{r['texts_per_cpu_s'] / loop_cpu[r['base']]:.1f}" if r["base"] in loop_cpu else "-"
        same = f"{100 * r['same_as_loop']:.0f} %" if "same_as_loop" in r else "-"
        print(f"| {r['base']} | {r['side']} | {r['texts']} | {r['texts_per_s']:.2f} | {x} | {r['texts_per_cpu_s']:.3f} | "
              f"{x_cpu} | {r['tokens_per_s']:.1f} | {r['hours_per_1M']:.0f} | {r['usd_per_1M']:.2f} | {same} | "
              f"{100 * r['schema_valid']:.0f} % |")
    return rows


if __name__ == "__main__":
    cli(main)
