"""The files of batch inference (generate/batch.py): input rows in, one output row per input row out, resumable.

    rows = InputRows("reviews.csv")             # JSON lines, a JSON list, CSV or text lines
    out = OutputFile("out.jsonl", rows)         # resumes: out.done rows are already written
    out.write(index, {**row, "output": text})   # rows come back in any order, go to the file in input order

Input. `.jsonl` / `.ndjson`: one JSON object per line; `.json`: a JSON list of objects (or JSON lines); `.csv`: a
header line, then one row per record (every value a string); anything else: text, one row {"text": line} per line.
Blank lines are not rows. A row that cannot be read (a line that is not a JSON object, a CSV record with more fields
than the header) is still a row: it comes back as (index, None, error) and gets an output row with that error, so
row numbers never shift and a rerun finds it again in the same place.

Output. JSON lines, one per input row, in the input's order: {"row": index, ...the input row's fields...,
"output": text, "finish_reason", "prompt_tokens", "completion_tokens", "error"}. Each line is written with one
write() and flushed, so a killed run leaves whole lines plus at most one cut line at the end. On a rerun,
OutputFile reads what is there, drops the cut line, checks that the last row written is the input's row of that
number (not an output of another input), and the run goes on after it. Rows finish out of order (continuous
batching), so finished rows wait in memory until every row before them is written: generate/batch.py keeps at
most a few batches in flight, which bounds both that memory and what a kill can lose.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Iterator, Optional

from lora_lab.json_score import parse_json_object, validate_schema
from lora_lab.utils import LoraLabError

# the columns generate/batch.py adds to each row (the output text's column is --output_field, "output" by default)
OUTPUT_COLUMNS = ("row", "finish_reason", "prompt_tokens", "completion_tokens", "json", "error")
TEXT_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}


class InputRows:
    """The rows of an input file, read lazily (a million rows are never all in memory)."""

    def __init__(self, path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise LoraLabError(f"--input {self.path} does not exist")
        self.format = TEXT_SUFFIXES.get(self.path.suffix.lower(), "text")

    def __iter__(self) -> Iterator[tuple[int, Optional[dict], Optional[str]]]:
        """(index, row, None) for each row, (index, None, error) for a row that cannot be read."""
        if self.format == "json":
            with open(self.path, encoding="utf-8") as f:
                first = f.read(4096).lstrip()[:1]
            if first == "[":
                yield from self._json_list()
                return
        with open(self.path, encoding="utf-8", newline="" if self.format == "csv" else None) as f:
            if self.format == "csv":
                yield from self._csv(f)
                return
            index = 0
            for line_no, line in enumerate(f, start=1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                if self.format == "text":
                    yield index, {"text": line}, None
                else:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        row, error = None, f"line {line_no} is not JSON ({e.msg} at column {e.colno})"
                    else:
                        error = None if isinstance(row, dict) else f"line {line_no} is not a JSON object"
                    yield index, row if error is None else None, error
                index += 1

    def _json_list(self):
        try:
            rows = json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise LoraLabError(f"--input {self.path} is not JSON ({e.msg} at line {e.lineno}): give a JSON list "
                               f"of objects or JSON lines") from None
        for i, row in enumerate(rows):
            yield (i, row, None) if isinstance(row, dict) else (i, None, f"item {i} is not a JSON object")

    def _csv(self, f):
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            return
        for index, record in enumerate(r for r in reader if any(field.strip() for field in r)):
            if len(record) > len(header):
                yield index, None, (f"CSV record on line {reader.line_num} has {len(record)} fields, the header "
                                    f"{len(header)}")
            else:
                yield index, dict(zip(header, record + [""] * (len(header) - len(record)))), None

    def count(self) -> int:
        return sum(1 for _ in self)

    def first_row(self) -> Optional[dict]:
        return next((row for _, row, error in self if error is None), None)


# ---- prompts ---------------------------------------------------------------------------------------------------
FIELD = re.compile(r"\{(\w+)\}")  # {name}; JSON in a template ({"a": 1}) has quotes inside, so it is left alone


def template_fields(template: str) -> list[str]:
    return FIELD.findall(template)


def make_prompt(row: dict, prompt_field: Optional[str], template: Optional[str]) -> str:
    """The prompt of one row: its `prompt_field`, or `template` with each {field} replaced by the row's value."""
    if template is not None:
        missing = [f for f in template_fields(template) if f not in row]
        if missing:
            raise LoraLabError(f"the row has no field {missing[0]!r} (the template's {{{missing[0]}}})")
        return FIELD.sub(lambda m: _as_text(row[m.group(1)]), template)
    if prompt_field not in row:
        raise LoraLabError(f"the row has no field {prompt_field!r} (its fields: {', '.join(map(str, row))})")
    value = row[prompt_field]
    if not isinstance(value, str) or not value.strip():
        raise LoraLabError(f"the field {prompt_field!r} is {'empty' if value in ('', None) else 'not text'}")
    return value


def _as_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def choose_prompt_field(first: Optional[dict], prompt_field: Optional[str], template: Optional[str]) -> Optional[str]:
    """Check the prompt settings against the first row (before any model is loaded); the prompt field to use."""
    if prompt_field is not None and template is not None:
        raise LoraLabError("give --prompt_field or --template, not both")
    if first is None:
        return prompt_field
    if template is not None:
        missing = [f for f in template_fields(template) if f not in first]
        if missing:
            raise LoraLabError(f"--template uses {{{missing[0]}}} but the first row has no field {missing[0]!r} "
                               f"(its fields: {', '.join(map(str, first))})")
        return None
    if prompt_field is None:
        prompt_field = next((f for f in ("prompt", "text") if f in first), None)
        if prompt_field is None:
            raise LoraLabError(f"the rows have no 'prompt' or 'text' field (the first row's fields: "
                               f"{', '.join(map(str, first))}): pass --prompt_field NAME or --template '...{{NAME}}...'")
    elif prompt_field not in first:
        raise LoraLabError(f"--prompt_field {prompt_field!r}: the first row has no such field (its fields: "
                           f"{', '.join(map(str, first))})")
    return prompt_field


def score_schema(text: str, schema: dict) -> dict:
    """As `python -m lora_lab.evaluate --tasks json` scores an answer (lora_lab/json_score.py), without an
    expected object: is it a JSON object, and does it satisfy the schema."""
    obj = parse_json_object(text)
    if obj is None:
        return {"valid_json": False, "schema_valid": False, "errors": ["not a JSON object"]}
    errors = validate_schema(obj, schema)
    return {"valid_json": True, "schema_valid": not errors, "errors": [f"schema: {e}" for e in errors]}


# ---- the output file -------------------------------------------------------------------------------------------
class OutputFile:
    """The output JSON lines: resumed on open, appended in input order (see the module docstring)."""

    def __init__(self, path, rows: InputRows, output_field: str = "output") -> None:
        self.path = Path(path)
        self.output_field = output_field
        self.done = 0  # rows already in the file
        self.failures = 0  # of them, rows with an error
        self.json_valid = self.schema_valid = self.scored = 0
        if self.path.exists():
            self._resume(rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")
        self.waiting: dict[int, dict] = {}  # finished rows whose predecessors are not all written yet

    def _resume(self, rows: InputRows) -> None:
        if self.path.is_dir():
            raise LoraLabError(f"--output {self.path} is a directory: give a .jsonl file")
        with open(self.path, "rb") as f:
            data = f.read()
        keep = data.rfind(b"\n") + 1  # a killed run may have cut its last line: it goes, and is written again
        last = None
        for line_no, line in enumerate(data[:keep].splitlines(), start=1):
            try:
                last = json.loads(line)
                ok = isinstance(last, dict) and last.get("row") == line_no - 1
            except json.JSONDecodeError:
                ok = False
            if not ok:
                raise LoraLabError(f"--output {self.path}: line {line_no} is not row {line_no - 1} of a batch.py "
                                   f"output; choose another --output (or delete this file to start over)")
            self.done += 1
            self.failures += bool(last.get("error"))
            scores = last.get("json")
            if scores:
                self.scored += 1
                self.json_valid += bool(scores.get("valid_json"))
                self.schema_valid += bool(scores.get("schema_valid"))
        if keep < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(keep)
        if last is not None:  # the file belongs to this input: its last row is the input's row of that number
            row = next((row for i, row, _ in rows if i == self.done - 1), None)
            if self.done > rows.count() or (row is not None and any(last.get(k) != v for k, v in row.items())):
                raise LoraLabError(f"--output {self.path} holds {self.done} rows of another input (row "
                                   f"{self.done - 1} differs from --input {rows.path}'s); choose another --output")

    def write(self, index: int, row: dict) -> int:
        """Take finished row `index`; write it and every waiting row after it once all rows before it are written.
        Returns how many rows went to the file."""
        self.waiting[index] = row
        written = 0
        lines = []
        while self.done in self.waiting:
            out = self.waiting.pop(self.done)
            lines.append(json.dumps(out, ensure_ascii=False) + "\n")
            self.failures += bool(out.get("error"))
            scores = out.get("json")
            if scores:
                self.scored += 1
                self.json_valid += bool(scores["valid_json"])
                self.schema_valid += bool(scores["schema_valid"])
            self.done += 1
            written += 1
        if lines:
            self.file.write("".join(lines))  # whole lines in one write: a kill cuts at most the last one
            self.file.flush()
        return written

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
