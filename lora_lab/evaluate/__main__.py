"""Evaluate a model, or a base and its fine-tunes side by side, on real benchmarks, perplexity and JSON output.

    python -m lora_lab.evaluate --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --tasks arc_easy,hellaswag,mmlu --limit 100 --out_file results.json
    python -m lora_lab.evaluate --adapter_dir out/finetune/lora --compare --tasks arc_easy,json --data json_extraction
    python -m lora_lab.evaluate --checkpoint_dir DIR --tasks perplexity --data notes.txt --stride 512
    python -m lora_lab.evaluate --checkpoint_dir DIR --tasks challenge --limit 50

--tasks mixes lm-evaluation-harness tasks (run by lm-eval with our GPT as the model: lm_eval_model.py; offline on
the local copies of local_tasks.py) with lora_lab's own `perplexity` (perplexity.py: --data is a .txt file, a
folder of them, or instruction rows, whose answers are scored) and `json` (json_task.py: --data holds rows whose
output is a JSON object; --json_schema adds schema validation), `gsm8k` (gsm8k.py: 8-shot chain of thought, exact
match on the final number) and `challenge` (challenge.py: the efficiency challenge's tasks we hold, with its settings,
and one combined score).

The model: --checkpoint_dir alone, or with --adapter_dir (a LoRA / QLoRA adapter, a LLaMA-Adapter, or the checkpoint
of a full fine-tune: load.py), --quantize nf4 for a 4-bit base. --compare evaluates the base and then base +
adapter; --adapter_dir given more than once evaluates each (`--adapter_dir base` is the base alone); either prints
the scores side by side with the change (compare.py). --out_file gets lm-eval's results JSON per model, the
perplexities and the JSON task's per-row results.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Literal, Optional

import torch

from lora_lab.evaluate.compare import compare_table, flatten_lm_eval
from lora_lab.evaluate.load import check_fits, load_model, nf4_settings_of
from lora_lab.evaluate.local_tasks import OUR_TASKS
from lora_lab.generate import peak_memory_bytes, select_device, select_dtype
from lora_lab.utils import LoraLabError, atomic_write_text, cli

BASE = "base"  # --adapter_dir base: the base model alone, in a comparison


def main(
    checkpoint_dir: Optional[Path] = None,
    adapter_dir: Optional[list[str]] = None,
    compare: bool = False,
    tasks: str = "arc_easy",
    num_fewshot: Optional[int] = None,
    limit: Optional[float] = None,
    batch_size: int = 8,
    out_file: Optional[Path] = None,
    data: Optional[str] = None,
    stride: Optional[int] = None,
    max_length: Optional[int] = None,
    blank_line_docs: bool = False,
    json_schema: Optional[Path] = None,
    max_new_tokens: int = 256,
    prompt_style: Optional[str] = None,
    quantize: Optional[Literal["nf4"]] = None,
    precision: Optional[str] = None,
    device: str = "auto",
    seed: int = 1234,
) -> None:
    """Evaluate a model (or several, side by side) on lm-eval tasks, perplexity and JSON output.

    Args:
        checkpoint_dir: the base model (a lora_lab checkpoint); default: the base an adapter was trained on.
        adapter_dir: what fine-tuning wrote (LoRA / QLoRA / LLaMA-Adapter / full checkpoint); give it several times
            to compare models (the value `base` is the base model alone).
        compare: evaluate the base model too and print both side by side with the change.
        tasks: comma-separated lm-eval task or group names (arc_easy, hellaswag, mmlu, ...), perplexity, json,
            gsm8k (8-shot chain of thought), challenge (the efficiency challenge's tasks we hold, one combined score).
        num_fewshot: examples in each lm-eval prompt (default: the task's own, usually 0).
        limit: lm-eval: at most this many documents per task (a float < 1: that share); json: rows; perplexity:
            tokens of raw text, or rows of instruction data.
        batch_size: sequences per forward pass for loglikelihood requests and answer perplexity.
        out_file: write every result here (JSON).
        data: perplexity: a .txt file, a folder of .txt files or instruction rows (a file or dataset name); json:
            rows whose output is a JSON object (default json_extraction's validation rows).
        stride: perplexity's sliding window moves by this many tokens (default: half the window).
        max_length: perplexity's window (default and at most: the model's block_size).
        blank_line_docs: perplexity on raw text: documents are separated by blank lines.
        json_schema: a JSON Schema file the json task's answers must follow.
        max_new_tokens: json: the longest answer generated.
        prompt_style: how json / perplexity prompts are wrapped; default: the one the model was tuned with.
        quantize: nf4 stores the base's linear layers in 4 bits.
        precision: weights' dtype (bf16-true, 16-true, 32-true); default bf16 on a GPU, float32 on the CPU.
        device: auto, cpu, cuda, cuda:N or mps.
        seed: random seed (lm-eval's few-shot sampling and anything random).
    """
    from lora_lab.prompts import PromptStyle

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise LoraLabError("--tasks is empty: name lm-eval tasks (arc_easy, hellaswag, mmlu, ...), perplexity or json")
    ours = [t for t in names if t in OUR_TASKS]
    lm_eval_tasks = [t for t in names if t not in OUR_TASKS]
    challenge_tasks = []  # --tasks challenge: its lm-eval tasks, run with the challenge's shots; gsm8k runs as ours
    if "challenge" in ours:
        from lora_lab.evaluate import challenge

        challenge_tasks = [t for t in challenge.lm_eval_tasks() if t not in lm_eval_tasks]
        ours += [] if "gsm8k" in ours else ["gsm8k"]
    if "perplexity" in ours and data is None:
        raise LoraLabError("--tasks perplexity needs --data: a .txt file, a folder of .txt files or instruction rows")
    schema = None
    if "json" in ours:
        from lora_lab.evaluate.json_task import load_schema

        schema = load_schema(json_schema)
    checkpoint_dir, models = models_to_run(checkpoint_dir, adapter_dir, compare)
    for _, adapter in models:  # every model loadable (config files only), before minutes of work on the first
        check_fits(checkpoint_dir, adapter)
    if "perplexity" in ours or (data is not None and "json" in ours):
        check_data(data)
    task_manager = None
    if lm_eval_tasks:  # check every name (and where its data is) before loading any model
        try:
            from lora_lab.evaluate.local_tasks import task_manager_for
        except ImportError:
            raise LoraLabError("lm-eval tasks need the lm-eval package: pip install 'lora_lab[eval]'") from None
        task_manager, lm_eval_tasks = task_manager_for(lm_eval_tasks)
    if challenge_tasks:
        from lora_lab.evaluate.local_tasks import task_manager_for

        task_manager, _ = task_manager_for(lm_eval_tasks + challenge_tasks)
    if "gsm8k" in ours:
        from lora_lab.evaluate.gsm8k import load_rows

        load_rows(limit=1)  # the data is there (one line if not), before any model is loaded

    device = select_device(device)
    dtype = select_dtype(precision, device)
    torch.manual_seed(seed)
    report, named_scores = [], []
    nf4 = nf4_settings_of([adapter for _, adapter in models]) if quantize == "nf4" else None  # one 4-bit base
    for name, adapter in models:
        t0 = time.perf_counter()
        loaded = load_model(checkpoint_dir, adapter, quantize=quantize, device=device, dtype=dtype, nf4=nf4)
        print(f"Evaluating {loaded.about} ({dtype}, {device})", file=sys.stderr)
        style = PromptStyle.from_checkpoint(loaded.checkpoint_dir, prompt_style or loaded.prompt_style)
        entry: dict = {"name": name, "model": loaded.about}
        scores: dict = {}
        if lm_eval_tasks:
            results, speed = run_lm_eval(loaded, lm_eval_tasks, task_manager, num_fewshot, limit, batch_size, seed)
            from lm_eval.utils import make_table

            print(make_table(results))
            if "groups" in results:
                print(make_table(results, "groups"))
            print(speed["line"], file=sys.stderr)
            entry["lm_eval"], entry["lm_eval_speed"] = results, speed
            scores.update(flatten_lm_eval(results))
        if challenge_tasks:
            results, speed = run_lm_eval(loaded, challenge_tasks, task_manager, challenge.LM_EVAL_SHOTS, limit,
                                         batch_size, seed)
            from lm_eval.utils import make_table

            print(make_table(results, "groups") if "groups" in results else make_table(results))
            print(speed["line"], file=sys.stderr)
            entry["challenge_lm_eval"], entry["challenge_lm_eval_speed"] = results, speed
            scores.update(flatten_lm_eval(results))
        if "gsm8k" in ours:
            from lora_lab.evaluate.gsm8k import gsm8k_task

            result = gsm8k_task(loaded.model, loaded.tokenizer, limit)
            print("gsm8k (8-shot chain of thought) on {n} questions: exact match {exact_match:.1%}".format(
                **result["summary"]))
            entry["gsm8k"] = result
            scores[("gsm8k", "exact_match")] = (result["summary"]["exact_match"], True)
        if "challenge" in ours:
            runs = [entry.get("lm_eval", {}), entry.get("challenge_lm_eval", {})]
            lm_results = {k: {t: v for r in runs for t, v in r.get(k, {}).items()} for k in ("results", "groups")}
            entry["challenge"] = challenge.combined(challenge.scores(lm_results, entry["gsm8k"]["summary"]))
            print("\nThe efficiency challenge's tasks (offline):\n" + challenge.table(entry["challenge"]))
            scores[("challenge", "combined")] = (entry["challenge"]["score"], True)
        if "perplexity" in ours:
            from lora_lab.evaluate.perplexity import perplexity

            ppl = perplexity(loaded.model, loaded.tokenizer, data, style, max_length, stride, blank_line_docs, limit,
                             batch_size)
            print(f"perplexity of {data} ({ppl['kind']}, {ppl['tokens']:,} tokens scored): {ppl['perplexity']:.4f}")
            entry["perplexity"] = ppl
            scores[("perplexity", "ppl")] = (ppl["perplexity"], False)
        if "json" in ours:
            from lora_lab.evaluate.json_task import json_task

            result = json_task(loaded.model, loaded.tokenizer, style, data or "json_extraction", schema,
                               None if limit is None else int(limit), max_new_tokens)
            summary = result["summary"]
            print("json on {n} rows: ".format(**summary) + ", ".join(f"{k} {v:.1%}" for k, v in summary.items()
                                                                      if k != "n"))
            entry["json"] = result
            scores.update({("json", k): (v, True) for k, v in summary.items() if k != "n"})
        entry["seconds"] = time.perf_counter() - t0
        report.append(entry)
        named_scores.append((name, scores))
        del loaded

    output = {"models": report}
    if len(named_scores) > 1:
        table = compare_table(named_scores)
        print("\n" + table)
        output["comparison"] = table
    if out_file is not None:
        atomic_write_text(out_file, json.dumps(output, indent=2, default=_jsonable) + "\n")
        print(f"Wrote {out_file}", file=sys.stderr)


def check_data(data: str) -> None:
    """--data is raw text, a file or a dataset name: else one line, before any model is loaded."""
    from lora_lab.data.instructions import BUILTIN_DATASETS, NAMED_DATASETS
    from lora_lab.data.text import is_text_data

    if not (is_text_data(data) or Path(data).expanduser().is_file() or data in NAMED_DATASETS
            or data in BUILTIN_DATASETS):
        raise LoraLabError(f"--data {data}: no such file or folder, and not a dataset name "
                           f"({', '.join((*BUILTIN_DATASETS, *NAMED_DATASETS))})")


def _jsonable(value):
    """What json cannot write (numpy numbers, functions in lm-eval's task configs) as numbers or text."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def models_to_run(checkpoint_dir, adapter_dir, compare: bool) -> tuple[Optional[Path], list[tuple[str, Optional[str]]]]:
    """(the base checkpoint, [(column name, adapter dir or None)] in the order they are evaluated)."""
    adapters = list(adapter_dir or [])
    if compare:
        if len(adapters) != 1:
            raise LoraLabError("--compare evaluates the base and one --adapter_dir: give exactly one --adapter_dir "
                               "(or give --adapter_dir several times, without --compare)")
        adapters = [BASE] + adapters
    if not adapters:
        if checkpoint_dir is None:
            raise LoraLabError("pass --checkpoint_dir (the model to evaluate) or --adapter_dir")
        return checkpoint_dir, [(BASE, None)]
    runs = [(BASE if a == BASE else Path(a).name or str(a), None if a == BASE else a) for a in adapters]
    seen = {}
    for i, (name, a) in enumerate(runs):  # distinct column names
        if name in seen:
            runs[i] = (f"{name}#{i + 1}", a)
        seen[name] = i
    if checkpoint_dir is None and any(a is None for _, a in runs):  # the base alone: the one the adapter names
        from lora_lab.evaluate.load import recorded_base

        checkpoint_dir = recorded_base(next(a for _, a in runs if a is not None))
    return checkpoint_dir, runs


def run_lm_eval(loaded, tasks, task_manager, num_fewshot, limit, batch_size, seed) -> tuple[dict, dict]:
    """lm-eval's results for our model on `tasks`, and the request rate."""
    from lm_eval import simple_evaluate

    from lora_lab.evaluate.lm_eval_model import LoraLabLM

    lm = LoraLabLM(loaded.model, loaded.tokenizer, batch_size=batch_size)
    if limit is not None and limit >= 1:
        limit = int(limit)
    t0 = time.perf_counter()
    results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed, log_samples=False)
    seconds = time.perf_counter() - t0
    n = lm.n_requests
    peak = peak_memory_bytes(lm._device)
    speed = {"requests": n, "seconds": seconds, "requests_per_s": n / max(seconds, 1e-9), "peak_memory_bytes": peak,
             "line": f"lm-eval: {n} requests in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} requests/s, data "
                     f"loading included); peak memory {peak / 2**30:.2f} GiB"}
    return results, speed


def repeated_to_list(args: list[str], flag: str = "--adapter_dir") -> list[str]:
    """`--adapter_dir A --adapter_dir B` (or a single one) -> `--adapter_dir=["A", "B"]` for jsonargparse."""
    values, rest, i = [], [], 0
    while i < len(args):
        if args[i] == flag and i + 1 < len(args):
            values.append(args[i + 1])
            i += 2
        elif args[i].startswith(flag + "="):
            value = args[i].split("=", 1)[1]
            values += json.loads(value) if value.startswith("[") else [value]
            i += 1
        else:
            rest.append(args[i])
            i += 1
    return rest + ([f"{flag}={json.dumps(values)}"] if values else [])


if __name__ == "__main__":
    cli(main, repeated_to_list(sys.argv[1:]))
