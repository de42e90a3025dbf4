"""Batch inference: run every row of a file through a base model (plus adapters) and write one answer per row.

    python generate/batch.py --adapter_dir out/finetune/lora --input reviews.csv --prompt_field text \
        --output out/batch/reviews.jsonl --max_new_tokens 64 --usd_per_hour 0.10

Input: JSON lines, a JSON list, CSV (header line) or plain text lines (lora_lab/serve/batch.py). Each row's prompt
is its `--prompt_field` (default `prompt`, else `text`) or `--template "Review: {text}"` filled from its fields,
wrapped in the prompt style of the model that answers it, exactly as generate/lora.py wraps `--prompt`. A
`model` field, where a row has one, picks that row's adapter: a folder name under `--adapters_root`, an adapter
directory, or `base`; rows without it use `--adapter_dir` (or the base). Rows for different adapters are decoded in
the same batch, as the server mixes them.

The work is the server's: the rows go into the continuous-batching engine of `python -m lora_lab.serve`
(lora_lab/serve/engine.py), in this process, with no HTTP. Up to `--max_batch_size` rows are decoded together; a
row leaves the batch when it ends and the next row takes its place at once, so short answers never wait for long
ones. Greedy answers (`--temperature 0`, the default) are those generate/lora.py gives for each prompt alone
(tests/test_batch.py checks it row by row).

Output: JSON lines, one per input row, in the input's order: the row's own fields (ids kept), then `output`,
`finish_reason`, `prompt_tokens`, `completion_tokens`, `error` (null, or why this row failed: a malformed row is
recorded and skipped, never stops the run), and with `--json_schema` a `json` score as `python -m lora_lab.evaluate
--tasks json` gives. Resumable: run the same command again after a crash or Ctrl-C and it goes on after the last
row written (a kill loses at most the rows in flight; the file stays valid JSON lines). The run ends with a summary:
rows, failures, throughput, peak memory, and the time (and, with `--usd_per_hour`, the cost) of 1 M such texts.
"""

import sys
import time
from pathlib import Path
from typing import Literal, Optional

# run as `python generate/batch.py` from a checkout without installing: make lora_lab importable
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_lab.checkpoint import load_config  # noqa: E402
from lora_lab.checks import check_args  # noqa: E402
from lora_lab.evaluate.json_task import load_schema  # noqa: E402
from lora_lab.formats.download import ensure_checkpoint  # noqa: E402
from lora_lab.generate import peak_memory_bytes, reset_peak_memory, select_device  # noqa: E402
from lora_lab.lora import base_checkpoint_dir, load_lora  # noqa: E402
from lora_lab.progress import progress  # noqa: E402
from lora_lab.serve.batch import (OUTPUT_COLUMNS, InputRows, OutputFile, choose_prompt_field,  # noqa: E402
                                  make_prompt, score_schema)
from lora_lab.serve.server import ModelServer  # noqa: E402
from lora_lab.utils import LoraLabError, cli  # noqa: E402


def main(
    input: Path,
    output: Path,
    checkpoint_dir: Optional[Path] = None,
    adapter_dir: Optional[Path] = None,
    adapters_root: Optional[Path] = None,
    prompt_field: Optional[str] = None,
    template: Optional[str] = None,
    system: Optional[str] = None,
    model_field: str = "model",
    output_field: str = "output",
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: Optional[float] = None,
    seed: int = 1234,
    max_batch_size: int = 16,
    max_seq_length: Optional[int] = None,
    max_loaded_adapters: int = 8,
    quantize: Optional[Literal["nf4", "none"]] = None,
    json_schema: Optional[Path] = None,
    usd_per_hour: Optional[float] = None,
    precision: Optional[str] = None,
    device: str = "auto",
) -> dict:
    """Answer every row of `input`, writing `output` (JSON lines); returns the run's summary.

    Args:
        input: the rows: .jsonl / .json (JSON objects), .csv (header line) or text (one row per line).
        output: the answers, JSON lines, one per input row in the input's order; an existing file is resumed.
        checkpoint_dir: the base model; default: the adapter's base (lora_config.json), else SmolLM2-135M-Instruct.
        adapter_dir: the adapter for rows that do not name one (a lora_lab or PEFT adapter directory).
        adapters_root: a folder of adapter directories; a row's `model` field may name one by its folder name.
        prompt_field: the field that holds each row's prompt (default: `prompt`, or else `text`).
        template: instead of a field, a prompt made from the row's fields: each {name} is replaced by the field.
        system: a system message, for the prompt styles that have one (default: the model's own default, if any).
        model_field: the field that names a row's adapter (`base` for the base model); rows without it use
            --adapter_dir.
        output_field: the output column that holds the generated text.
        max_new_tokens: stop each answer after this many tokens (or earlier, at the end-of-turn token).
        temperature: 0 is greedy decoding (the default: reproducible answers); above 0 samples.
        top_p: nucleus sampling: only among the most likely tokens whose probabilities add up to top_p.
        seed: each row's own random generator starts from this seed (an answer does not depend on its batch).
        max_batch_size: rows decoded together (the KV cache's rows).
        max_seq_length: tokens per row (prompt + answer); default the model's context, at most 2048.
        max_loaded_adapters: adapters kept loaded at once (rows wait for a slot when more are in use).
        quantize: nf4 puts the base's linear layers in 4-bit NF4 (adapters stay float); default: nf4 for a
            QLoRA adapter (the base it was trained on), none otherwise.
        json_schema: a JSON Schema file; each answer is scored: valid JSON, schema-valid.
        usd_per_hour: what the machine costs per hour, for the summary's cost of 1 M texts.
        precision: weights' dtype: bf16-true, 16-true or 32-true; default bf16 on a GPU, float32 on the CPU.
        device: auto, cpu, cuda, cuda:N or mps.
    """
    check_args(locals())  # every argument that can be judged without a model, before anything slow
    if max_batch_size < 1 or max_loaded_adapters < 1:
        raise LoraLabError("--max_batch_size and --max_loaded_adapters must be at least 1")
    if usd_per_hour is not None and not usd_per_hour >= 0:
        raise LoraLabError(f"--usd_per_hour {usd_per_hour}: use a number >= 0")
    schema = load_schema(json_schema)
    reserved = set(OUTPUT_COLUMNS) | {output_field}
    if output_field in OUTPUT_COLUMNS:
        raise LoraLabError(f"--output_field {output_field!r} is one of the columns batch.py writes: choose another")

    # 1. the rows: checked against the prompt settings, and the output resumed, before the model loads
    rows = InputRows(input)
    total = rows.count()
    first = rows.first_row()
    prompt_field = choose_prompt_field(first, prompt_field, template)
    clash = sorted(reserved & set(first or {}))
    if clash:
        raise LoraLabError(f"the input rows have a field {clash[0]!r}, a column batch.py writes: rename it"
                           + (" or pass --output_field NAME" if clash[0] == output_field else ""))
    out = OutputFile(output, rows, output_field)
    done_before = out.done
    if out.done:
        print(f"{output}: {out.done} of {total} rows already written, going on from row {out.done}", file=sys.stderr)

    # 2. the model: the server's (the base, float or NF4, the adapters in the slots of stacked layers, the engine)
    lora_config = load_lora(adapter_dir)[0] if adapter_dir is not None else None
    if lora_config is not None:
        checkpoint_dir = base_checkpoint_dir(lora_config, checkpoint_dir, adapter_dir)
    checkpoint_dir = ensure_checkpoint(checkpoint_dir or Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"))
    config = load_config(checkpoint_dir)
    quantize = quantize or ("nf4" if lora_config is not None and lora_config.base_quantization else "none")
    device = select_device(device)
    t0 = time.perf_counter()
    server = None
    if out.done < total:
        default = Path(adapter_dir).name if adapter_dir is not None else None
        server = ModelServer.load(checkpoint_dir, {default: adapter_dir} if default else None, adapters_root,
                                  quantize if quantize == "nf4" else None, precision, device, max_batch_size,
                                  max_loaded_adapters, max_seq_length or min(config.block_size, 2048), start=False)
        print(f"Loaded {server.name}{' + ' + str(adapter_dir) if adapter_dir else ''} ({quantize}, {device}) in "
              f"{time.perf_counter() - t0:.2f} s; {total - out.done} rows to answer, {max_batch_size} at a time",
              file=sys.stderr)
        default_model = default or server.name
    unusable: dict[str, str] = {}  # model names that failed to load: their rows fail with the same message

    def model_of(row: dict) -> str:
        """The model (server name) that answers `row`: its `model` field, or the default."""
        value = row.get(model_field)
        if value in (None, ""):
            return default_model
        value = str(value)
        if value == "base" or server.is_base(value):
            return server.name
        if value in unusable:
            raise LoraLabError(unusable[value])
        if server.store.path_of(value) is None:
            if not Path(value).is_dir():
                raise LoraLabError(f"{model_field} {value!r}: no adapter of that name"
                                   + (f" under --adapters_root {adapters_root}" if adapters_root else "")
                                   + ", and no adapter directory at that path")
            try:
                server.store.register(value, value)  # an adapter directory named by its path
            except LoraLabError as e:
                unusable[value] = str(e)
                raise
        return value

    # 3. the loop: keep the engine's batch full, write finished rows in input order
    todo = iter(rows)
    inflight: dict[int, tuple] = {}  # row index -> (row, request, text parts)
    finished: list[tuple[int, str, object]] = []  # (row index, "done" | "error", payload), from the engine
    window = 4 * max_batch_size  # rows submitted or finished but not yet written: bounds memory and a kill's loss
    stats = {"rows": 0, "failures": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def output_row(i: int, row: Optional[dict], text=None, req=None, error=None) -> dict:
        fields = {k: v for k, v in (row or {}).items() if k not in reserved}
        if row and len(fields) < len(row) and error is None:
            error = f"the row has a field named like a column batch.py writes ({sorted(reserved & set(row))[0]!r})"
        result = {"row": i, **fields, output_field: text if error is None else None}
        if req is not None:
            result.update(finish_reason=req.finish_reason, prompt_tokens=len(req.prompt_ids),
                          completion_tokens=len(req.generated))
            stats["prompt_tokens"] += len(req.prompt_ids)
            stats["completion_tokens"] += len(req.generated)
        if schema is not None and error is None:
            result["json"] = score_schema(text, schema)
        result["error"] = error
        stats["rows"] += 1
        stats["failures"] += error is not None
        return result

    def submit(i: int, row: dict) -> bool:
        """Start row i in the engine; False when its adapter has no free slot yet (all busy with running rows)."""
        prompt = make_prompt(row, prompt_field, template)
        model = model_of(row)
        store = server.store
        if model != server.name and model not in store.loaded and len(store.in_use) >= store.max_loaded:
            return False
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        parts: list[str] = []

        def on_event(kind, payload):  # called by engine.step() below, in this thread
            if kind == "text":
                parts.append(payload)
            else:
                finished.append((i, kind, payload))

        req = server.request(model, on_event, messages=messages, max_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, seed=seed)
        try:
            server.engine.submit(req)
        except (ValueError, RuntimeError) as e:
            store.release(req.adapter) if req.adapter else None
            raise LoraLabError(str(e)) from None
        inflight[i] = (row, req, parts)
        return True

    def run():
        """Yield once per row written to the output."""
        held = None  # a row waiting for an adapter slot
        while True:
            while len(inflight) + len(out.waiting) < window:
                item = held or next(todo, None)
                held = None
                if item is None:
                    break
                i, row, error = item
                if i < done_before:
                    continue  # written by an earlier run
                if error is None:
                    try:
                        if not submit(i, row):
                            held = item
                            break
                        continue
                    except LoraLabError as e:
                        error = str(e)
                for _ in range(out.write(i, output_row(i, row, error=error))):
                    yield
            if not inflight:
                return
            server.engine.step()  # admit waiting rows (prefill), then one decode step for every running row
            for i, kind, payload in finished:
                row, req, parts = inflight.pop(i)
                error = None if kind == "done" and payload != "abort" else f"generation failed: {payload}"
                for _ in range(out.write(i, output_row(i, row, "".join(parts), req, error))):
                    yield
            finished.clear()

    def rates() -> str:
        seconds = max(time.perf_counter() - t_start, 1e-9)
        tokens = stats["completion_tokens"] + sum(len(req.generated) for _, req, _ in inflight.values())
        return f"{stats['rows'] / seconds:.2f} texts/s, {tokens / seconds:.1f} tokens/s"

    reset_peak_memory(device)
    t_start, cpu_start = time.perf_counter(), time.thread_time()  # (the engine steps in this thread)
    try:
        if server is not None:
            for _ in progress(run(), total=total - out.done, desc="batch", unit="text", postfix=rates):
                pass
    finally:
        out.close()
    seconds, cpu_seconds = time.perf_counter() - t_start, time.thread_time() - cpu_start

    # 4. the summary
    answered = stats["rows"] - stats["failures"]
    summary = {"rows": total, "written_now": stats["rows"], "written_before": done_before,
               "failures": out.failures, "seconds": seconds, "cpu_seconds": cpu_seconds,
               "texts_per_s": answered / seconds if answered else 0.0,
               "completion_tokens_per_s": stats["completion_tokens"] / seconds if answered else 0.0,
               "prompt_tokens_per_s": stats["prompt_tokens"] / seconds if answered else 0.0,
               "mean_completion_tokens": stats["completion_tokens"] / answered if answered else 0.0,
               "peak_memory_bytes": peak_memory_bytes(device), "max_batch_size": max_batch_size,
               "quantize": quantize, "device": str(device)}
    if answered:
        summary["hours_per_1M_texts"] = 1e6 / summary["texts_per_s"] / 3600
        if usd_per_hour is not None:
            summary["usd_per_1M_texts"] = summary["hours_per_1M_texts"] * usd_per_hour
    if out.scored:
        summary["json_valid"] = out.json_valid / out.scored
        summary["schema_valid"] = out.schema_valid / out.scored
    print(format_summary(summary, output, usd_per_hour), file=sys.stderr)
    return summary


def format_summary(s: dict, output: Path, usd_per_hour: Optional[float]) -> str:
    what = "peak memory allocated" if s["device"].startswith("cuda") else "peak RSS"
    lines = [f"{output}: {s['written_now'] + s['written_before']} of {s['rows']} rows written "
             f"({s['written_now']} now, {s['written_before']} before), "
             f"{s['failures']} failed (their `error` says why)"]
    if s["written_now"]:
        lines.append(f"{s['written_now']} rows in {s['seconds']:.1f} s: {s['texts_per_s']:.2f} texts/s, "
                     f"{s['completion_tokens_per_s']:.1f} generated tokens/s ({s['mean_completion_tokens']:.1f} per "
                     f"text), {s['prompt_tokens_per_s']:.1f} prompt tokens/s; {what} "
                     f"{s['peak_memory_bytes'] / 2**30:.2f} GiB")
    if "hours_per_1M_texts" in s:
        cost = (f", ${s['usd_per_1M_texts']:.2f} at ${usd_per_hour:g}/hour" if "usd_per_1M_texts" in s else
                " (--usd_per_hour gives the cost)")
        lines.append(f"1M such texts: {s['hours_per_1M_texts']:.1f} hours on this machine{cost}")
    if "json_valid" in s:
        lines.append(f"JSON: {100 * s['json_valid']:.1f} % valid JSON, {100 * s['schema_valid']:.1f} % schema-valid")
    return "\n".join(lines)


if __name__ == "__main__":
    cli(main)
