"""The JSON task: greedy answers to each row's prompt, scored as structured output (lora_lab/json_score.py).

    python -m lora_lab.evaluate --checkpoint_dir DIR --adapter_dir out/finetune/lora --tasks json \
        --data rows.jsonl [--json_schema schema.json] --out_file results.json

`--data` is instruction rows whose `output` is the expected JSON object (any file fine-tuning reads, or the built-in
json_extraction task, whose held-out validation rows are used). Each prompt is wrapped in the prompt style the model
was tuned with, answered greedily, and scored: valid JSON, exactly the expected keys, every value right and, with a
schema, schema-valid. The output file keeps every row (prompt, answer, expected, scores and what was wrong) so a user
can see what failed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from lora_lab.json_score import score_json, summarize
from lora_lab.progress import progress
from lora_lab.utils import LoraLabError


def load_schema(path: Optional[Path]) -> Optional[dict]:
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise LoraLabError(f"--json_schema {path} does not exist")
    try:
        schema = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LoraLabError(f"--json_schema {path} is not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(schema, dict):
        raise LoraLabError(f"--json_schema {path}: a JSON Schema is an object")
    return schema


def json_rows(data: str, limit: Optional[int] = None, seed: int = 42) -> list[dict]:
    """The rows to answer: the validation rows of json_extraction, or every row of a file / dataset."""
    from lora_lab.data.instructions import load_instructions

    if str(data) == "json_extraction":
        rows = load_instructions("json_extraction", seed=seed).val
    else:
        rows = load_instructions(data, val_split_fraction=0.0).train
    rows = rows[:int(limit)] if limit is not None else rows
    for i, row in enumerate(rows):
        try:
            expected = json.loads(row["output"])
        except json.JSONDecodeError:
            expected = None
        if not isinstance(expected, dict):
            raise LoraLabError(f"{data}: row {i}'s output is not a JSON object, so there is nothing to score against")
    return rows


def json_task(model, tokenizer, prompt_style, data: str, schema: Optional[dict] = None, limit: Optional[int] = None,
              max_new_tokens: int = 256) -> dict:
    """{"summary": shares, "rows": per-row results}."""
    from lora_lab.training import generate_answers

    rows = json_rows(data, limit)
    results = []
    for row in progress(rows, desc="json", unit="prompt"):
        answer = generate_answers(model, tokenizer, prompt_style, [row], max_new_tokens=max_new_tokens)[0]
        scores = score_json(answer, row["output"], schema)
        results.append({"instruction": row["instruction"], "input": row.get("input", ""), "answer": answer,
                        "expected": row["output"], **scores})
    return {"summary": summarize(results), "rows": results}
