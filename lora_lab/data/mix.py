"""A data mix: several instruction sets in chosen proportions, deduplicated and decontaminated (`--data mix.yaml`).

    # mix.yaml
    seed: 0                      # the draw (default 0): the same file gives the same rows on every machine
    total_rows: 3000             # the size of the weighted part (default: as large as it gets without repeating)
    sources:
      - data: ../shared/assets/data/alpaca_5000.json     # anything --data takes for instruction rows: a
        weight: 3                                        #   built-in name or a .json / .jsonl / .csv file
      - data: ../shared/assets/data/lima_1029.json
        weight: 1
      - data: ../shared/assets/data/dolly_151.jsonl
        rows: 100                                        # a fixed count instead of a weight
        columns: {instruction: instruction, output: response}   # optional, as --columns
    decontaminate:               # default: every .json / .jsonl file in $LORA_LAB_EVAL_DATA
      eval_data: [../shared/assets/eval]                 # files or folders of evaluation sets
      ngram: 13

What happens, in this order (tests/test_mix.py checks each step):

1. Every source is read as `--data` reads it (a relative path is looked for next to the mix file, then in the
   working directory).
2. Deduplication over the whole mix, first occurrence kept (sources in the file's order): an *exact* duplicate
   has the same instruction, input and output; a *near* duplicate the same text once normalised (lower case,
   punctuation dropped, whitespace collapsed: "Hello, World!" == "hello world").
3. Decontamination: a row is dropped when its normalised text (instruction, input and output) shares a word
   13-gram with any row of an evaluation set (every string field of it, questions and answers alike), the test GPT-3
   and most contamination studies use. A row (training or evaluation) shorter than 13 words counts as one n-gram
   of its whole text, so a short evaluation row copied word for word as a training row is caught too.
4. Sampling: a source with `rows: N` gives N rows; the sources with a `weight` share `total_rows` in proportion
   to their weights. Rows are drawn without replacement (seeded per source); a source asked for more rows than it
   has after steps 2-3 gives each row once more per full pass (counted as repeated).
5. The mix is shuffled (seeded) and split into train / validation as --data is.

The counts per source (read, exact and near duplicates, contaminated, kept, taken, repeated) are printed as one
table and returned as a dict that the fine-tuning scripts write to OUT_DIR/data_mix.json, beside the run's other
records (hparams.yaml, metrics.csv).
"""

from __future__ import annotations

import json
import random
import re
import sys
import unicodedata
from pathlib import Path
from typing import Optional, Union

import yaml

from lora_lab.utils import LoraLabError, atomic_write_text

MIX_SUFFIXES = (".yaml", ".yml")
EVAL_DATA_ENV = "LORA_LAB_EVAL_DATA"
MIX_RECORD_FILE = "data_mix.json"
NGRAM = 13
_WORD = re.compile(r"\w+")


def is_mix_file(data) -> bool:
    return isinstance(data, (str, Path)) and Path(str(data)).suffix.lower() in MIX_SUFFIXES


def normalize(text: str) -> str:
    """Lower case, accents folded, punctuation dropped, whitespace collapsed: the text near-duplicates share."""
    text = unicodedata.normalize("NFKD", text.lower())
    return " ".join(_WORD.findall(text))


def row_text(row: dict) -> str:
    return "\n".join(row.get(k, "") for k in ("instruction", "input", "output"))


def ngrams(words: list[str], n: int) -> set:
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


# ------------------------------------------------------------------------------------------------------------
# The file
# ------------------------------------------------------------------------------------------------------------
def read_mix_file(path: Union[str, Path]) -> dict:
    """The mix file, checked: every mistake is one line naming the field, before any data is read."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LoraLabError(f"--data {path}: the mix file does not exist")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise LoraLabError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("sources"), list) or not spec["sources"]:
        raise LoraLabError(f"{path}: a mix file holds `sources:`, a list of {{data, weight or rows}} entries")
    unknown = set(spec) - {"seed", "total_rows", "sources", "decontaminate"}
    if unknown:
        raise LoraLabError(f"{path}: unknown key(s) {sorted(unknown)} (keys: seed, total_rows, sources, decontaminate)")
    if not isinstance(spec.get("seed", 0), int):
        raise LoraLabError(f"{path}: seed must be an integer")
    total = spec.get("total_rows")
    if total is not None and (not isinstance(total, int) or total < 1):
        raise LoraLabError(f"{path}: total_rows must be a positive integer")
    for i, s in enumerate(spec["sources"]):
        where = f"{path}: sources[{i}]"
        if not isinstance(s, dict) or "data" not in s:
            raise LoraLabError(f"{where} needs `data:` (a dataset name or a file)")
        unknown = set(s) - {"data", "weight", "rows", "columns", "name"}
        if unknown:
            raise LoraLabError(f"{where}: unknown key(s) {sorted(unknown)} (keys: data, weight, rows, columns, name)")
        if ("weight" in s) == ("rows" in s):
            raise LoraLabError(f"{where} ({s['data']}): give either `weight` or `rows`")
        if "weight" in s and (not isinstance(s["weight"], (int, float)) or s["weight"] <= 0):
            raise LoraLabError(f"{where}: weight must be a positive number")
        if "rows" in s and (not isinstance(s["rows"], int) or s["rows"] < 0):
            raise LoraLabError(f"{where}: rows must be a non-negative integer")
        data = s["data"] = _beside(path, str(s["data"]))
        if Path(str(s["data"])).suffix.lower() in (".txt",) or Path(str(s["data"])).is_dir():
            raise LoraLabError(f"{where}: {data} is raw text; a mix holds instruction rows (a name, .json, .jsonl, "
                               f".csv)")
    if total is not None and not any("weight" in s for s in spec["sources"]):
        raise LoraLabError(f"{path}: total_rows is the size of the weighted sources, but no source has a weight")
    deco = spec.get("decontaminate") or {}
    if not isinstance(deco, dict) or set(deco) - {"eval_data", "ngram"}:
        raise LoraLabError(f"{path}: decontaminate takes eval_data (files or folders) and ngram")
    files = deco.get("eval_data")
    files = [files] if isinstance(files, str) else files
    deco["eval_data"] = [_beside(path, p) for p in files] if files else None
    spec["decontaminate"] = deco
    return spec


def _beside(mix_file: Path, p: str) -> str:
    """A relative path is looked for next to the mix file first, then in the working directory."""
    local = mix_file.parent / Path(p).expanduser()
    return str(local) if not Path(p).expanduser().is_absolute() and local.exists() else p


def eval_files(paths: Optional[list[str]]) -> list[Path]:
    """The evaluation files to decontaminate against: `paths` (files or folders), else $LORA_LAB_EVAL_DATA."""
    import os

    if paths is None:
        paths = [os.environ[EVAL_DATA_ENV]] if os.environ.get(EVAL_DATA_ENV) else []
    files = []
    for p in map(lambda p: Path(p).expanduser(), paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in (".json", ".jsonl"))
        elif p.is_file():
            files.append(p)
        else:
            raise LoraLabError(f"decontaminate: evaluation data {p} does not exist")
    return files


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def eval_ngrams(files: list[Path], n: int = NGRAM) -> dict[str, str]:
    """{n-gram: the evaluation file it comes from} over every row's string fields."""
    grams: dict[str, str] = {}
    for f in files:
        text = f.read_text(encoding="utf-8-sig")
        try:
            records = json.loads(text) if f.suffix.lower() == ".json" else None
        except json.JSONDecodeError:
            records = None
        if records is None:  # JSON lines (split at "\n" only: str.splitlines also splits at U+2028 inside a text)
            records = []
            for i, line in enumerate(text.split("\n"), start=1):
                try:
                    records += [json.loads(line)] if line.strip() else []
                except json.JSONDecodeError as e:
                    raise LoraLabError(f"decontaminate: {f} line {i} is not JSON ({e.msg})") from None
        for record in records:
            for gram in ngrams(normalize(" ".join(_strings(record))).split(), n):
                grams.setdefault(gram, f.name)
    return grams


# ------------------------------------------------------------------------------------------------------------
# The mix
# ------------------------------------------------------------------------------------------------------------
def load_mix(path: Union[str, Path], data_dir=None, on_bad_row: str = "skip",
             verbose: bool = True) -> tuple[list[dict], list[str], dict]:
    """(rows, bad-row messages, report) of a mix file; see the module docstring."""
    from lora_lab.data.instructions import load_instructions

    spec = read_mix_file(path)
    seed = spec.get("seed", 0)
    n = int(spec["decontaminate"].get("ngram") or NGRAM)
    files = eval_files(spec["decontaminate"]["eval_data"])  # checked before any source is read
    sources, bad = [], []
    for i, s in enumerate(spec["sources"]):
        loaded = load_instructions(s["data"], data_dir=data_dir, columns=s.get("columns"), val_split_fraction=0.0,
                                   on_bad_row=on_bad_row, verbose=False,  # bad rows: returned, printed once
                                   **({"n_train": s["rows"], "n_val": 0} if s["data"] == "json_extraction" else {}))
        bad += loaded.bad_rows
        name = s.get("name") or Path(str(s["data"])).name
        sources.append({"name": name, "data": str(s["data"]), "rows": loaded.train, "spec": s,
                        "counts": {"read": len(loaded.train), "exact_duplicates": 0, "near_duplicates": 0,
                                   "contaminated": 0}, "contaminated_by": {}})

    # 2. deduplication over the whole mix, the first occurrence kept
    exact_seen, near_seen = set(), set()
    for src in sources:
        kept = []
        for row in src["rows"]:
            exact = (row["instruction"], row.get("input", ""), row["output"])
            near = normalize(row_text(row))
            if exact in exact_seen:
                src["counts"]["exact_duplicates"] += 1
            elif near in near_seen:
                src["counts"]["near_duplicates"] += 1
            else:
                kept.append(row)
            exact_seen.add(exact)
            near_seen.add(near)
        src["rows"] = kept

    # 3. decontamination: any shared n-gram with an evaluation row drops the training row
    grams = eval_ngrams(files, n) if files else {}
    for src in sources:
        kept = []
        for row in src["rows"]:
            words = normalize(row_text(row)).split()
            hit = next((grams[g] for g in _row_grams(words, n) if g in grams), None) if grams else None
            if hit is None:
                kept.append(row)
            else:
                src["counts"]["contaminated"] += 1
                src["contaminated_by"][hit] = src["contaminated_by"].get(hit, 0) + 1
        src["rows"] = kept
        src["counts"]["kept"] = len(kept)

    # 4. sampling: fixed counts, then the weighted sources' shares of total_rows
    weighted = [s for s in sources if "weight" in s["spec"]]
    total_weight = sum(s["spec"]["weight"] for s in weighted)
    total = spec.get("total_rows")
    if weighted and total is None:  # as large as it gets without repeating any weighted source
        total = int(min(len(s["rows"]) * total_weight / s["spec"]["weight"] for s in weighted))
    wanted = _shares([s["spec"]["weight"] for s in weighted], total or 0)
    for src in sources:
        src["wanted"] = src["spec"]["rows"] if "rows" in src["spec"] else wanted[weighted.index(src)]
    rows = []
    for i, src in enumerate(sources):
        taken, repeated = _draw(src["rows"], src["wanted"], random.Random(f"lora_lab-mix-{seed}-{i}"))
        if src["wanted"] and not src["rows"]:
            raise LoraLabError(f"{path}: source {src['name']} has no rows left after deduplication and "
                               f"decontamination, but {src['wanted']} are asked for")
        src["counts"].update(taken=len(taken), repeated=repeated)
        rows += taken
    random.Random(f"lora_lab-mix-{seed}").shuffle(rows)
    if not rows:
        raise LoraLabError(f"{path}: the mix has no rows (every source gives 0)")

    report = {"mix_file": str(path), "seed": seed, "ngram": n, "eval_files": [str(f) for f in files],
              "eval_ngrams": len(grams), "total_rows": len(rows),
              "sources": [{"name": s["name"], "data": s["data"],
                           **{k: s["spec"][k] for k in ("weight", "rows") if k in s["spec"]},
                           **s["counts"], "contaminated_by": s["contaminated_by"]} for s in sources]}
    if verbose:
        print(mix_table(report), file=sys.stderr)
    return rows, bad, report


def load_mix_instructions(path, val_data=None, *, data_dir=None, columns=None, val_split_fraction: float = 0.05,
                          seed: int = 42, on_bad_row: str = "skip", n_train=None, n_val=None, verbose: bool = True):
    """load_instructions for a mix file: an InstructionData whose `mix` is the report (get_dataloaders calls it)."""
    from lora_lab.data.instructions import finish_split

    if columns:
        raise LoraLabError(f"--columns with a mix file {path}: give each source its own `columns:` in the mix file")
    rows, bad, report = load_mix(path, data_dir, on_bad_row, verbose)
    n_rows = sum(s["read"] for s in report["sources"]) + len(bad)
    return finish_split(rows, bad, str(path), n_rows, val_data, data_dir, None, val_split_fraction, seed, on_bad_row,
                        n_train, n_val, verbose, mix=report)


def _row_grams(words: list[str], n: int):
    """A training row's n-grams: its n-word windows (a row shorter than n words: its whole text)."""
    if len(words) < n:
        yield " ".join(words)
    for i in range(max(0, len(words) - n + 1)):
        yield " ".join(words[i:i + n])


def _shares(weights: list[float], total: int) -> list[int]:
    """total split in proportion to weights, rounded so that the parts add up to total (largest remainders)."""
    if not weights:
        return []
    exact = [total * w / sum(weights) for w in weights]
    parts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: exact[i] - parts[i], reverse=True)[:total - sum(parts)]:
        parts[i] += 1
    return parts


def _draw(rows: list[dict], k: int, rng: random.Random) -> tuple[list[dict], int]:
    """k rows drawn without replacement; past len(rows), whole passes over the rows (returns the repeats)."""
    if not rows or k == 0:
        return [], 0
    passes, rest = divmod(k, len(rows))
    return rows * passes + rng.sample(rows, rest), max(0, k - len(rows))


def mix_table(report: dict) -> str:
    lines = [f"Data mix {report['mix_file']} (seed {report['seed']}): {report['total_rows']:,} rows; "
             + (f"decontaminated against {len(report['eval_files'])} evaluation file(s) "
                f"({report['eval_ngrams']:,} {report['ngram']}-grams)" if report["eval_files"] else
                f"NOT decontaminated (no evaluation data: set {EVAL_DATA_ENV} or `decontaminate: eval_data`)"),
             "| source | asked | read | exact dup | near dup | contaminated | kept | taken | repeated |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in report["sources"]:
        asked = f"weight {s['weight']}" if "weight" in s else f"rows {s['rows']}"
        lines.append(f"| {s['name']} | {asked} | {s['read']:,} | {s['exact_duplicates']:,} | {s['near_duplicates']:,} "
                     f"| {s['contaminated']:,} | {s['kept']:,} | {s['taken']:,} | {s['repeated']:,} |")
    keys = ("read", "exact_duplicates", "near_duplicates", "contaminated", "kept", "taken", "repeated")
    sums = [sum(s[k] for s in report["sources"]) for k in keys]
    lines.append("| total | | " + " | ".join(f"{v:,}" for v in sums) + " |")
    return "\n".join(lines)


def write_mix_record(out_dir: Union[str, Path], data_stats: dict) -> None:
    """OUT_DIR/data_mix.json: the mix's report (nothing when --data was not a mix file)."""
    if data_stats.get("mix"):
        atomic_write_text(Path(out_dir) / MIX_RECORD_FILE, json.dumps(data_stats["mix"], indent=2) + "\n")
