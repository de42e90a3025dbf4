"""Instruction datasets: rows of {"instruction", "input", "output"} text, from a named dataset or a local file.

    train, val, info = load_instructions("alpaca")                      # downloaded once, then cached
    train, val, info = load_instructions("data/my_rows.jsonl", columns={"instruction": "question",
                                                                         "output": "answer"})

Where the rows come from (`data`):

  json_extraction   built in and offline (lora_lab/data/json_extraction.py): reviews -> a JSON object
  alpaca            Stanford Alpaca, 52,002 rows, from its GitHub URL (CC BY-NC 4.0)
  alpaca-cleaned    yahma/alpaca-cleaned on the Hugging Face Hub (Alpaca with errors fixed)
  alpaca-finance    gbharti/finance-alpaca (finance questions, Alpaca format)
  dolly             databricks/databricks-dolly-15k (instruction/context/response)
  lima              GAIR/lima (gated: accept its terms on the Hub and log in first)
  a file path       .json (a list of objects, or {"data": [...]}), .jsonl, or .csv

A named dataset is downloaded once into `data_dir` (default ~/.cache/lora_lab/data/<name>/<file>) and read
from there afterwards; a file already in that place (or directly in `data_dir`) is used without any network.
Offline, a named dataset that is not there stops with a one-line error that says to pass a local file.

Columns. A row needs an instruction and an output; the input (Alpaca's extra context) is optional. The
columns are "instruction", "input" and "output" unless `columns` renames them, e.g. {"instruction": "question",
"output": "answer"}. Without `columns` a few published layouts are recognised, so their files load as they are:
  - Dolly: "context" -> input, "response" -> output.
  - GSM8K (the Hub's and lm-eval's: exactly the columns question and answer): "question" -> instruction,
    "answer" -> output.
  - LIMA on the Hub: {"conversations": [user, assistant, user, ...]}.
  - LIMA exported by LLaMA-Factory (lima_1029.json): {"instruction", "input", "output", "history"}.
  LIMA's multi-turn rows keep their FIRST exchange only (the opening user message and its answer): a later
  turn only makes sense after the earlier ones, and a sample here is a single prompt and its answer. So
  every LIMA row gives exactly one sample.

Malformed rows (not an object, no instruction or output, a value that is not text, an empty output) are
named with their file and line (JSONL, CSV) or index (JSON list) and skipped (`on_bad_row="skip"`, with a
count at the end) or stop the run (`on_bad_row="error"`). Text is kept exactly as written (no stripping).

Validation rows come from `val_data` when given, otherwise from a split of the rows that depends only on
`val_split_fraction` and `seed` (the same rows on every machine).
"""

from __future__ import annotations

import csv
import json
import os
import random
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from lora_lab.utils import LoraLabError, atomic_path

FIELDS = ("instruction", "input", "output")
DEFAULT_DATA_DIR = Path("~/.cache/lora_lab/data")
DOWNLOAD_TIMEOUT_S = 30.0  # per network operation, so an offline machine fails fast
MAX_REPORTED_BAD_ROWS = 10  # bad rows printed one by one; the rest are only counted


@dataclass(frozen=True)
class NamedDataset:
    name: str
    filename: str  # the file we read, and its name in the cache
    repo_id: Optional[str] = None  # a Hugging Face dataset repository holding `filename` ...
    url: Optional[str] = None  # ... or the published URL of the file
    about: str = ""

    @property
    def source(self) -> str:
        return self.url or f"https://huggingface.co/datasets/{self.repo_id}"


NAMED_DATASETS = {d.name: d for d in (
    NamedDataset("alpaca", "alpaca_data.json",
                 url="https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json",
                 about="Stanford Alpaca, 52,002 rows, CC BY-NC 4.0"),
    NamedDataset("alpaca-cleaned", "alpaca_data_cleaned.json", repo_id="yahma/alpaca-cleaned",
                 about="Alpaca with its errors fixed, 51,760 rows, CC BY 4.0"),
    NamedDataset("alpaca-finance", "Cleaned_date.json", repo_id="gbharti/finance-alpaca",
                 about="finance questions in Alpaca's format, ~69k rows, MIT"),
    NamedDataset("dolly", "databricks-dolly-15k.jsonl", repo_id="databricks/databricks-dolly-15k",
                 about="15,011 human-written rows, CC BY-SA 3.0"),
    NamedDataset("lima", "train.jsonl", repo_id="GAIR/lima",
                 about="1,030 curated conversations, first turn kept; gated, CC BY-NC-SA"),
)}
BUILTIN_DATASETS = ("json_extraction",)
DATA_SUFFIXES = (".json", ".jsonl", ".csv")
LOCAL_FILE_HELP = ("a .json, .jsonl or .csv file with instruction, input (optional) and output columns; "
                   "`columns` renames them")


@dataclass
class InstructionData:
    """The rows of one dataset, split; `bad_rows` holds a message per skipped row."""

    train: list[dict]
    val: list[dict]
    source: str  # where the rows came from: a file path, a URL, or "json_extraction"
    n_rows: int = 0  # rows read, the skipped ones included
    bad_rows: list[str] = field(default_factory=list)
    mix: Optional[dict] = None  # a mix file's report (lora_lab/data/mix.py): per source, what was read, dropped, taken

    @property
    def n_skipped(self) -> int:
        return len(self.bad_rows)


# ------------------------------------------------------------------------------------------------------------
# Reading one file
# ------------------------------------------------------------------------------------------------------------
@dataclass
class _Unreadable:
    """A row that could not even be parsed (a JSONL line that is not JSON)."""

    problem: str


def _iter_records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) for each row of a .json / .jsonl / .csv file. A JSONL line that is not valid JSON
    comes back as a `_Unreadable` record, so that it is reported like any other bad row."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets often write a BOM
            reader = csv.DictReader(f)
            _ = reader.fieldnames  # reads the header line
            line = reader.line_num + 1
            for record in reader:
                # a quoted cell can span lines; report the line the record starts on
                yield f"line {line}", {k: v for k, v in record.items() if k is not None}
                line = reader.line_num + 1
        return
    text = path.read_text(encoding="utf-8-sig")
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data": one object per line, i.e. JSON lines in a .json file
                raise LoraLabError(f"{path} is not valid JSON ({e}): fix the file, or give JSON lines a "
                                   f".jsonl name") from None
        else:
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise LoraLabError(f"{path} holds a JSON {type(data).__name__}, not a list of rows: write a list "
                                   f"of objects, or {{\"data\": [...]}}")
            for i, record in enumerate(data):
                yield f"index {i}", record
            return
    for i, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 may sit inside a string
        if not line.strip():
            continue
        try:
            yield f"line {i}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"line {i}", _Unreadable(f"not valid JSON ({e.msg})")


def _column_map(records: list, columns: Optional[dict], where: str) -> dict:
    """Which column of the file holds each of our fields, plus the layout ("conversations", "history")."""
    keys: set = set()
    for r in records:
        if isinstance(r, dict):
            keys.update(r)
    if columns:
        unknown = set(columns) - set(FIELDS)
        if unknown:
            raise LoraLabError(f"columns has unknown key(s) {sorted(unknown)}: map some of {list(FIELDS)} to the "
                               f"file's column names, e.g. {{\"instruction\": \"question\", \"output\": \"answer\"}}")
        mapping = {f: columns.get(f, f) for f in FIELDS}
        mapping["layout"] = "columns"
    elif "instruction" not in keys and "conversations" in keys:
        return {"layout": "conversations"}
    elif keys == {"question", "answer"}:  # exactly GSM8K's layout on the Hub (and lm-eval's copy)
        mapping = {"instruction": "question", "input": "input", "output": "answer", "layout": "columns"}
    else:
        mapping = {"instruction": "instruction",
                   "input": "input" if "input" in keys or "context" not in keys else "context",  # Dolly
                   "output": "output" if "output" in keys or "response" not in keys else "response",
                   "layout": "history" if "history" in keys else "columns"}  # LLaMA-Factory's LIMA
    for f in ("instruction", "output"):
        if keys and mapping[f] not in keys:
            raise LoraLabError(f"{where} has no {mapping[f]!r} column (its columns: {', '.join(sorted(keys))}): pass "
                               f"columns={{\"{f}\": \"<column name>\"}} (--columns on the command line)")
    return mapping


def _text(record: dict, column: str, optional: bool = False) -> str:
    """The text in `column`, or a ValueError that says what is wrong with it."""
    if column not in record or (optional and record[column] is None):
        if optional:
            return ""
        raise ValueError(f"no {column!r}")
    value = record[column]
    if not isinstance(value, str):
        raise ValueError(f"{column!r} is {type(value).__name__}, not text")
    return value


def _normalize(record, mapping: dict) -> dict:
    """One row as {"instruction", "input", "output"}, or a ValueError naming the problem."""
    if isinstance(record, _Unreadable):
        raise ValueError(record.problem)
    if not isinstance(record, dict):
        raise ValueError(f"is a JSON {type(record).__name__}, not an object")
    layout = mapping["layout"]
    if layout == "conversations":
        turns = record.get("conversations")
        if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, str) for t in turns[:2]):
            raise ValueError("'conversations' is not a list of at least 2 texts (user, assistant)")
        row = {"instruction": turns[0], "input": "", "output": turns[1]}
    elif layout == "history" and record.get("history"):
        first = record["history"][0] if isinstance(record["history"], list) else None
        if not (isinstance(first, list) and len(first) == 2 and all(isinstance(t, str) for t in first)):
            raise ValueError("'history' is not a list of [user, assistant] text pairs")
        row = {"instruction": first[0], "input": "", "output": first[1]}
    else:
        row = {"instruction": _text(record, mapping["instruction"]),
               "input": _text(record, mapping["input"], optional=True),
               "output": _text(record, mapping["output"])}
    if not row["output"].strip():
        raise ValueError("empty output")
    if not row["instruction"].strip() and not row["input"].strip():
        raise ValueError("empty instruction")
    return row


def _check_on_bad_row(on_bad_row: str) -> None:
    if on_bad_row not in ("skip", "error"):
        raise LoraLabError(f"on_bad_row={on_bad_row!r}: choose 'skip' or 'error'")


def parse_rows(records: Sequence, where: str, columns: Optional[dict] = None, on_bad_row: str = "skip",
               locations: Optional[Sequence[str]] = None) -> tuple[list[dict], list[str]]:
    """Normalize raw records (dicts) to rows; returns (rows, one message per bad row)."""
    _check_on_bad_row(on_bad_row)
    records = list(records)
    locations = list(locations) if locations is not None else [f"index {i}" for i in range(len(records))]
    mapping = _column_map(records, columns, where)
    rows, bad = [], []
    for loc, record in zip(locations, records):
        try:
            rows.append(_normalize(record, mapping))
        except ValueError as e:
            message = f"{where} {loc}: {e}"
            if on_bad_row == "error":
                raise LoraLabError(f"{message}: fix or remove the row, or pass on_bad_row='skip' "
                                   f"(--on_bad_row skip) to skip malformed rows") from None
            bad.append(message)
    return rows, bad


def read_instruction_file(path: Union[str, Path], columns: Optional[dict] = None,
                          on_bad_row: str = "skip") -> tuple[list[dict], list[str]]:
    """The rows of a .json / .jsonl / .csv file, and a message for each malformed row (skipped)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LoraLabError(f"Data file {path} does not exist: pass {LOCAL_FILE_HELP}")
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise LoraLabError(f"Data file {path} is not .json, .jsonl or .csv: pass {LOCAL_FILE_HELP}")
    try:
        located = list(_iter_records(path))
    except UnicodeDecodeError as e:
        raise LoraLabError(f"{path} is not UTF-8 text ({e.reason}): save it as UTF-8") from None
    except csv.Error as e:
        raise LoraLabError(f"{path} is not valid CSV ({e}): fix the file") from None
    if not located:
        raise LoraLabError(f"{path} has no rows: pass {LOCAL_FILE_HELP}")
    rows, bad = parse_rows([r for _, r in located], str(path), columns, on_bad_row, [loc for loc, _ in located])
    if not rows:
        raise LoraLabError(f"{path}: none of its {len(located)} rows is usable ({bad[0].split(': ', 1)[1]}, ...): "
                           f"check the columns, or pass columns={{...}}")
    return rows, bad


# ------------------------------------------------------------------------------------------------------------
# Named datasets: cache and download
# ------------------------------------------------------------------------------------------------------------
def _fetch_url(url: str, dest: Path) -> None:
    """Download `url` to `dest` (atomically: an interrupted download leaves no half file behind)."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)


def _fetch_hub(repo_id: str, filename: str, dest_dir: Path) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename, repo_type="dataset", local_dir=dest_dir,
                                etag_timeout=DOWNLOAD_TIMEOUT_S))


def _offline_error(spec: NamedDataset, reason: str, data_dir: Path) -> LoraLabError:
    return LoraLabError(f"Cannot download the {spec.name} dataset from {spec.source} ({reason}): pass a local "
                        f"path instead (--data path/to/{spec.filename}, or {LOCAL_FILE_HELP}), or put "
                        f"{spec.filename} in {data_dir / spec.name}")


def named_dataset_file(name: str, data_dir: Union[str, Path, None] = None) -> Path:
    """The local file of a named dataset: the cached copy, else downloaded into the cache now."""
    spec = NAMED_DATASETS[name]
    data_dir = Path(data_dir or DEFAULT_DATA_DIR).expanduser()
    for candidate in (data_dir / name / spec.filename, data_dir / spec.filename):
        if candidate.is_file():
            return candidate
    dest = data_dir / name / spec.filename
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise _offline_error(spec, "HF_HUB_OFFLINE is set", data_dir)
    print(f"Downloading the {name} dataset ({spec.about}) from {spec.source} to {dest}", file=sys.stderr)
    try:
        if spec.url:
            _fetch_url(spec.url, dest)
        else:
            dest = _fetch_hub(spec.repo_id, spec.filename, dest.parent)
    except LoraLabError:
        raise
    except Exception as e:  # translate every way a download fails into one line
        raise _download_error(spec, e, data_dir) from None
    return dest


def _download_error(spec: NamedDataset, e: Exception, data_dir: Path) -> LoraLabError:
    reason = (str(e).splitlines() or [""])[0] or type(e).__name__
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    from lora_lab.formats.download import _is_connection_error

    if isinstance(e, GatedRepoError):
        return LoraLabError(f"The {spec.name} dataset ({spec.repo_id}) is gated: accept its terms at {spec.source} "
                            f"and log in (`hf auth login`, or set HF_TOKEN), or pass a local path to "
                            f"{LOCAL_FILE_HELP}")
    # an HTTP answer (404, 401, 5xx) means the server was reached: that is not "offline"
    refused = isinstance(e, urllib.error.HTTPError) or (isinstance(e, HfHubHTTPError) and not _is_connection_error(e))
    if not refused and (_is_connection_error(e) or isinstance(e, OSError)):  # URLError, timeouts, DNS
        return _offline_error(spec, reason, data_dir)
    return LoraLabError(f"Downloading the {spec.name} dataset from {spec.source} failed ({reason}): pass a local "
                        f"path to {LOCAL_FILE_HELP}")


# ------------------------------------------------------------------------------------------------------------
# Splitting and the one entry point
# ------------------------------------------------------------------------------------------------------------
def split_rows(rows: list, val_split_fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): round(fraction * N) rows (at least 1 when the fraction is > 0) drawn with `seed`.

    Both keep the file's order; the draw depends only on (N, fraction, seed)."""
    if not 0.0 <= val_split_fraction < 1.0:
        raise LoraLabError(f"val_split_fraction={val_split_fraction}: use a number in [0, 1)")
    n_val = round(val_split_fraction * len(rows))
    if val_split_fraction > 0 and n_val == 0 and len(rows) > 1:
        n_val = 1
    if n_val >= len(rows):
        raise LoraLabError(f"val_split_fraction={val_split_fraction} leaves no training rows out of {len(rows)}")
    order = list(range(len(rows)))
    random.Random(f"lora_lab-split-{seed}").shuffle(order)
    val_idx = set(order[:n_val])
    return ([r for i, r in enumerate(rows) if i not in val_idx], [r for i, r in enumerate(rows) if i in val_idx])


def _read_source(data, data_dir, columns, on_bad_row) -> tuple[list[dict], list[str], str, int]:
    """(rows, bad-row messages, source, rows read) of a name, a path or an in-memory list of dicts."""
    if isinstance(data, (list, tuple)):
        rows, bad = parse_rows(data, "data", columns, on_bad_row)
        if not rows:
            raise LoraLabError(f"none of the {len(data)} rows given is usable ({bad[0] if bad else 'no rows'})")
        return rows, bad, "rows in memory", len(data)
    name = str(data)
    path = Path(name).expanduser()
    if name in NAMED_DATASETS and not path.is_file():
        path = named_dataset_file(name, data_dir)
    elif not path.is_file():
        choices = ", ".join((*BUILTIN_DATASETS, *NAMED_DATASETS))
        raise LoraLabError(f"{name!r} is neither a dataset name ({choices}) nor an existing file: pass one of "
                           f"those names or a path to {LOCAL_FILE_HELP}")
    rows, bad = read_instruction_file(path, columns, on_bad_row)
    return rows, bad, str(path), len(rows) + len(bad)


def load_instructions(data: Union[str, Path, Sequence[dict]] = "json_extraction",
                      val_data: Union[str, Path, Sequence[dict], None] = None, *,
                      data_dir: Union[str, Path, None] = None, columns: Optional[dict] = None,
                      val_split_fraction: float = 0.05, seed: int = 42, on_bad_row: str = "skip",
                      n_train: Optional[int] = None, n_val: Optional[int] = None,
                      verbose: bool = True) -> InstructionData:
    """Train and validation rows of `data` (a dataset name, a file path, or a list of dicts).

    n_train / n_val: for json_extraction, how many samples to generate (default 400 / 40, `seed` picks
    them); for other data, keep at most that many rows of each split (the first ones after the split).
    """
    _check_on_bad_row(on_bad_row)
    if isinstance(data, (str, Path)) and str(data) == "json_extraction":
        from lora_lab.data.json_extraction import json_extraction_dataset

        # 400 / 40 by default: one epoch of the quick start (25 steps of batch 16) learns the format in minutes
        train, val = json_extraction_dataset(n_train=400 if n_train is None else n_train,
                                             n_val=40 if n_val is None else n_val, seed=seed)
        return InstructionData(train, val, "json_extraction", len(train) + len(val))

    rows, bad, source, n_rows = _read_source(data, data_dir, columns, on_bad_row)
    return finish_split(rows, bad, source, n_rows, val_data, data_dir, columns, val_split_fraction, seed, on_bad_row,
                        n_train, n_val, verbose)


def finish_split(rows, bad, source, n_rows, val_data, data_dir, columns, val_split_fraction, seed, on_bad_row,
                 n_train, n_val, verbose, mix: Optional[dict] = None) -> InstructionData:
    """The train / validation split of rows read (with the validation rows of `val_data` when given), cut to
    n_train / n_val, the bad rows reported: what load_instructions and a mix (mix.py) return."""
    if val_data is not None:
        val, val_bad, val_source, val_n = _read_source(val_data, data_dir, columns, on_bad_row)
        train, bad, n_rows = rows, bad + val_bad, n_rows + val_n
        source = f"{source} (validation: {val_source})"
    else:
        train, val = split_rows(rows, val_split_fraction, seed)
    if n_train is not None:
        train = train[:n_train]
    if n_val is not None:
        val = val[:n_val]
    if verbose and bad:
        for message in bad[:MAX_REPORTED_BAD_ROWS]:
            print(f"skipped {message}", file=sys.stderr)
        if len(bad) > MAX_REPORTED_BAD_ROWS:
            print(f"... and {len(bad) - MAX_REPORTED_BAD_ROWS} more", file=sys.stderr)
        print(f"Skipped {len(bad)} malformed row(s) of {n_rows} in {source}", file=sys.stderr)
    return InstructionData(train, val, source, n_rows, bad, mix)
