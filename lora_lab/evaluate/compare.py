"""Side by side: the same tasks' scores for several models (a base and its fine-tunes), with the differences.

    print(compare_table([("base", scores_a), ("lora", scores_b)]))

Each model's scores are flattened to {(task, metric): (value, higher_is_better)}. The table has one row per
(task, metric) and one column per model; the last column is the change from the first model to the last, marked
`better` or `worse` by the metric's direction (accuracy up is better, perplexity up is worse): what fine-tuning
improved and what it made the model forget.
"""

from __future__ import annotations

from typing import Optional

Scores = dict[tuple[str, str], tuple[float, Optional[bool]]]


def flatten_lm_eval(results: dict) -> Scores:
    """lm-eval's results -> {(task, metric): (value, higher_is_better)}, without the standard errors."""
    out: Scores = {}
    for task, metrics in results.get("results", {}).items():
        direction = results.get("higher_is_better", {}).get(task, {})
        for key, value in metrics.items():
            metric = key.split(",")[0]
            if "," not in key or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue  # a metric is "name,filter"; alias, sample_len and the standard errors are not scores
            out[(task, key.replace(",none", ""))] = (float(value), direction.get(metric, True))
    return out


def compare_table(named: list[tuple[str, Scores]]) -> str:
    """A Markdown table of every (task, metric) of any model, the models side by side, then last - first."""
    keys = list(dict.fromkeys(k for _, scores in named for k in scores))
    names = [n for n, _ in named]
    lines = ["| task | metric | " + " | ".join(names) + " | change |",
             "|---|---|" + "---:|" * len(names) + "---|"]
    for task, metric in keys:
        values = [scores.get((task, metric)) for _, scores in named]
        cells = [f"{v[0]:.4f}" if v else "-" for v in values]
        change = ""
        if values[0] and values[-1]:
            delta = values[-1][0] - values[0][0]
            higher = values[-1][1]
            verdict = "" if abs(delta) < 1e-12 or higher is None else \
                (" better" if (delta > 0) == bool(higher) else " worse")
            change = f"{delta:+.4f}{verdict}"
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + f" | {change} |")
    return "\n".join(lines)
