"""lm-eval's own task definitions, pointed at local copies of their data sets, so real benchmarks run offline.

    task_manager, names = task_manager_for(["arc_easy", "mmlu"])       # then lm_eval.simple_evaluate(tasks=names, ...)

tasks/local_data.yaml lists, per task, lm-eval's YAML for it and the local JSON-lines file of each split (the Hub
data sets' own columns, as ../shared/assets/eval holds them). For every such task whose files are present, a config
is written to a cache folder that `include:`s lm-eval's YAML (the prompt, choices, target and metrics stay exactly
lm-eval's) and changes only where the documents come from:

    include: <site-packages>/lm_eval/tasks/arc/arc_easy.yaml
    dataset_path: json
    dataset_name: null
    dataset_kwargs: {data_files: {validation: <eval data>/arc_easy_validation.jsonl}}
    training_split: null        # splits we have no file for
    test_split: null

lm-eval's TaskManager reads that folder after its own tasks (`include_path`), so the local definition takes the
task's usual name. Where the data is looked for: $LORA_LAB_EVAL_DATA, else ../shared/assets/eval next to this
checkout, else $LORA_LAB_ASSETS/eval. A task without local files is lm-eval's, reading the Hugging Face Hub; with
the Hub off (HF_HUB_OFFLINE=1) that is a one-line error saying where its data was looked for.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional

import yaml

from lora_lab.utils import LoraLabError, atomic_write_text

EVAL_DATA_ENV = "LORA_LAB_EVAL_DATA"
LOCAL_DATA_TABLE = Path(__file__).parent / "tasks" / "local_data.yaml"
OUR_TASKS = ("perplexity", "json", "gsm8k", "challenge")  # lora_lab's own, without lm-eval's task definitions
# (perplexity.py, json_task.py, gsm8k.py; challenge.py: a suite of lm-eval tasks and gsm8k, one combined score)
SPLIT_KEYS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}


def eval_data_dir() -> Path:
    """Where the local benchmark files are looked for (see the module docstring)."""
    if os.environ.get(EVAL_DATA_ENV):
        return Path(os.environ[EVAL_DATA_ENV]).expanduser()
    beside_checkout = Path(__file__).resolve().parents[2].parent / "shared" / "assets" / "eval"
    if beside_checkout.is_dir() or not os.environ.get("LORA_LAB_ASSETS"):
        return beside_checkout
    return Path(os.environ["LORA_LAB_ASSETS"]) / "eval"


def local_table() -> dict:
    return yaml.safe_load(LOCAL_DATA_TABLE.read_text())


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _task_yaml(include: Path, files: dict, overrides: Optional[dict] = None) -> str:
    cfg = {"include": str(include), "dataset_path": "json", "dataset_name": None,
           "dataset_kwargs": {"data_files": {split: str(path) for split, path in files.items()}}}
    for split, key in SPLIT_KEYS.items():
        if split not in files:
            cfg[key] = None  # no local file for this split: lm-eval must not look for it
    cfg.update(overrides or {})
    return yaml.safe_dump(cfg, sort_keys=False)


def _split_by(path: Path, column: str, out_dir: Path) -> dict[str, Path]:
    """One JSON-lines file per value of `column` (MMLU's subject), written once into out_dir."""
    groups: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                groups.setdefault(json.loads(line)[column], []).append(line.rstrip("\n"))
    out = {}
    for value, lines in groups.items():
        out[value] = out_dir / f"{value}_{path.stem}.jsonl"
        if not out[value].is_file():
            atomic_write_text(out[value], "\n".join(lines) + "\n")
    return out


def write_local_tasks(data_dir: Path, out_dir: Path) -> list[str]:
    """Write the configs of every task whose local files are all in data_dir; returns their names."""
    import lm_eval.tasks

    lm_eval_tasks = Path(lm_eval.tasks.__file__).parent
    written = []
    for name, spec in local_table().items():
        files = {split: data_dir / f for split, f in spec["files"].items()}
        if not all(p.is_file() for p in files.values()):
            continue
        if spec.get("by"):  # one lm-eval subtask per value of the column
            per_split = {split: _split_by(p, spec["by"], out_dir / name) for split, p in files.items()}
            values = sorted(set.intersection(*(set(v) for v in per_split.values())))
            for value in values:
                include = lm_eval_tasks / spec["lm_eval"].format(**{spec["by"]: value})
                if include.is_file():
                    text = _task_yaml(include, {s: per_split[s][value] for s in files}, spec.get("overrides"))
                    atomic_write_text(out_dir / f"{include.stem}.yaml", text)
        else:
            include = lm_eval_tasks / spec["lm_eval"]
            atomic_write_text(out_dir / f"{name}.yaml", _task_yaml(include, files, spec.get("overrides")))
        written.append(name)
    return written


def task_manager_for(tasks: list[str], data_dir: Optional[Path] = None):
    """(lm-eval TaskManager that knows the local tasks, the task names) after checking every name."""
    from lm_eval.tasks import TaskManager

    data_dir = Path(data_dir) if data_dir is not None else eval_data_dir()
    key = hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:12]
    out_dir = Path(os.environ.get("LORA_LAB_CACHE", "~/.cache/lora_lab")).expanduser() / "eval_tasks" / key
    out_dir.mkdir(parents=True, exist_ok=True)
    local = write_local_tasks(data_dir, out_dir) if data_dir.is_dir() else []
    index_log = logging.getLogger("lm_eval.tasks._index")
    level = index_log.level
    index_log.setLevel(logging.ERROR)  # each local task "overrides existing task": that is the point, not news
    try:
        manager = TaskManager(include_path=str(out_dir))
    finally:
        index_log.setLevel(level)
    table = local_table()
    for name in tasks:
        if name not in manager.all_tasks:
            near = difflib.get_close_matches(name, list(OUR_TASKS) + manager.all_tasks, n=5, cutoff=0.6)
            hint = f"did you mean {', '.join(near)}?" if near else "see `lm-eval ls tasks` for lm-eval's tasks"
            raise LoraLabError(f"unknown task {name!r}: {hint}")
        is_local = any(name == t or (table[t].get("by") and name.startswith(f"{t}_")) for t in local)
        if not is_local and hub_offline():
            where = (f"its local files ({', '.join(table[name]['files'].values())}) are not in {data_dir}"
                     if name in table else f"lora_lab has no local copy of it (local tasks: {', '.join(table)})")
            raise LoraLabError(f"task {name!r}: {where} and the Hugging Face Hub is off (HF_HUB_OFFLINE=1): set "
                               f"{EVAL_DATA_ENV} to the folder holding the files, or go online")
    return manager, tasks
