"""The efficiency challenge's evaluation, offline: `python -m lora_lab.evaluate --tasks challenge`.

The NeurIPS 2023 LLM Efficiency Challenge scored entries with HELM: in the open evaluation MMLU, BIG-bench,
TruthfulQA, CNN/DailyMail, GSM8K and BBQ; in the hidden one SAMSum, MATH, ETHICS and others. `--tasks challenge`
runs, with the challenge's settings, the ones whose data we hold locally (../shared/assets/eval, or
$LORA_LAB_EVAL_DATA), plus the other HELM core scenarios whose data we hold, and names the rest as not run:

    MMLU        lm-eval's `mmlu` (57 subjects, the test split), 5-shot (HELM's 5 in-context examples), accuracy
    GSM8K       lora_lab's gsm8k (gsm8k.py): 8-shot chain of thought, exact match on the final number
    BoolQ, HellaSwag, OpenbookQA   HELM core scenarios we hold (validation splits): lm-eval's tasks, 5-shot, accuracy

and prints one combined score: the mean of the tasks' scores (each task weighs the same, as HELM's mean over
scenarios), with each task's contribution to it. `--limit` applies to every task (a rehearsal); the challenge scored
HELM's own subsets, so these numbers rank models on the same tasks but are not the leaderboard's numbers.
"""

from __future__ import annotations

from typing import Optional

# name: (HELM's scenario, the lm-eval task (None: lora_lab's own), shots, metric)
TASKS = {
    "mmlu": ("MMLU", "mmlu", 5, "acc"),
    "gsm8k": ("GSM8K", None, 8, "exact_match"),
    "boolq": ("BoolQ", "boolq", 5, "acc"),
    "hellaswag": ("HellaSwag", "hellaswag", 5, "acc"),
    "openbookqa": ("OpenbookQA", "openbookqa", 5, "acc"),
}
LM_EVAL_SHOTS = 5
NOT_OFFLINE = {  # the challenge's tasks we hold no data for: named in the report, never silently left out
    "BIG-bench": "open", "TruthfulQA": "open", "CNN/DailyMail": "open", "BBQ": "open",
    "SAMSum": "hidden", "MATH": "hidden", "ETHICS": "hidden",
}


def lm_eval_tasks() -> list[str]:
    return [t for _, t, _, _ in TASKS.values() if t is not None]


def _lm_eval_score(results: dict, task: str, metric: str) -> Optional[float]:
    for section in ("groups", "results"):
        value = results.get(section, {}).get(task, {}).get(f"{metric},none")
        if isinstance(value, (int, float)):
            return float(value)
    return None


def scores(lm_eval_results: dict, gsm8k_summary: dict) -> dict[str, float]:
    """{task: score} from lm-eval's results and the gsm8k task's summary."""
    out = {}
    for name, (_, task, _, metric) in TASKS.items():
        value = gsm8k_summary.get(metric) if task is None else _lm_eval_score(lm_eval_results, task, metric)
        if value is not None:
            out[name] = value
    return out


def combined(task_scores: dict[str, float]) -> dict:
    """{"score": the mean, "tasks": {task: {score, weight, contribution}}, "not_run": {...}}."""
    n = len(task_scores)
    tasks = {t: {"score": s, "weight": 1 / n, "contribution": s / n} for t, s in task_scores.items()}
    missing = [TASKS[t][0] for t in TASKS if t not in task_scores]
    return {"score": sum(s for s in task_scores.values()) / max(n, 1), "tasks": tasks,
            "not_run": {**{k: f"{v} evaluation: no local data" for k, v in NOT_OFFLINE.items()},
                        **{k: "failed or not scored" for k in missing}}}


def table(result: dict) -> str:
    lines = ["| task | HELM scenario | shots | metric | score | weight | contribution |",
             "|---|---|---:|---|---:|---:|---:|"]
    for name, t in result["tasks"].items():
        helm, _, shots, metric = TASKS[name]
        lines.append(f"| {name} | {helm} | {shots} | {metric} | {t['score']:.4f} | {t['weight']:.3f} | "
                     f"{t['contribution']:.4f} |")
    lines.append(f"| **challenge** | mean of {len(result['tasks'])} tasks | | | **{result['score']:.4f}** | 1.000 | "
                 f"{result['score']:.4f} |")
    lines.append("")
    lines.append("not run offline: " + "; ".join(f"{k} ({v})" for k, v in result["not_run"].items()))
    return "\n".join(lines)
