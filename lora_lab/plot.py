"""Loss curves of fine-tuning runs, from their metrics.csv: one run, or several overlaid.

    python -m lora_lab.plot OUT_DIR [OUT_DIR ...] [--out FILE.png]

Every run writes OUT_DIR/loss.png itself (at each save and at the end). The figure shows the training loss
against the optimizer step, raw (thin) and smoothed (an exponential moving average, bias-corrected like Adam's
moments so that it starts at the first value instead of at zero), the validation loss (dots), and the learning
rate on a second axis. The title names the run (its folder) and its key hyperparameters, read from
OUT_DIR/hparams.yaml. A DPO run (finetune/dpo.py) logs its loss as `loss` and adds a panel below: the reward
accuracy (the share of pairs whose chosen answer gets the larger implicit reward), training and held-out. A GRPO run
(finetune/grpo.py) draws its mean reward there, training and held-out. With several runs (e.g. LoRA vs QLoRA, r 8 vs r 64) each gets a colour and the default
output is loss_comparison.png in the working directory. matplotlib draws with its Agg backend: no display needed.
tests/test_run_record.py checks the files (test_loss_png_*).
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import Optional, Sequence

from lora_lab.utils import LoraLabError, atomic_path, one_line_errors

METRICS_FILE, HPARAMS_FILE, PLOT_FILE = "metrics.csv", "hparams.yaml", "loss.png"
FIGSIZE, DPI = (10, 5.5), 100  # 1000 x 550 pixels
# the hyperparameters worth a place in a title, in this order, with short names
KEY_HPARAMS = {"lora_r": "r", "lora_alpha": "alpha", "adapter_version": "adapter v", "learning_rate": "lr",
               "batch_size": "batch", "max_steps": "steps", "max_seq_length": "seq", "data": "data", "beta": "beta",
               "reward": "reward"}


def read_metrics(out_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{column: [(step, value), ...]} of a run's metrics.csv, empty cells skipped."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        raise LoraLabError(f"{path} does not exist: give the out_dir of a fine-tuning run")
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if not (row.get("step") or "").isdigit():
                continue
            for key, value in row.items():
                if key != "step" and value not in (None, ""):
                    series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


def read_hparams(out_dir: Path) -> dict:
    path = Path(out_dir) / HPARAMS_FILE
    if not path.is_file():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def smooth(values: Sequence[float], beta: Optional[float] = None) -> list[float]:
    """Bias-corrected exponential moving average: m_t = beta m_{t-1} + (1 - beta) x_t, reported as
    m_t / (1 - beta^t), so that the first value is x_1 and not (1 - beta) x_1. By default beta averages over
    about a tenth of the run (1 / (1 - beta) steps), at most ~10 steps (beta 0.9): a short run is not flattened."""
    if beta is None:
        beta = max(0.0, min(0.9, 1 - 10 / max(len(values), 1)))
    m, out = 0.0, []
    for t, x in enumerate(values, start=1):
        m = beta * m + (1 - beta) * x
        out.append(m / (1 - beta**t))
    return out


def describe(out_dir: Path) -> str:
    """`name: r 8, lr 0.001, batch 16, ...` for titles and legends."""
    hp = read_hparams(out_dir)
    if hp.get("max_steps") is None and (Path(out_dir) / METRICS_FILE).is_file():  # (default: one epoch)
        series = read_metrics(out_dir)
        hp["max_steps"] = max((step for step, _ in series.get("train_loss") or series.get("loss", [])), default=None)
    parts = [f"{short} {hp[key]}" for key, short in KEY_HPARAMS.items() if hp.get(key) not in (None, "")]
    name = Path(out_dir).resolve().name
    return f"{name}: {', '.join(parts)}" if parts else name


def plot_runs(out_dirs: Sequence[Path], out: Path, title: Optional[str] = None) -> Path:
    """Draw the runs' loss curves (and learning rates) into one PNG at `out`; returns `out`."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display, on servers and in CI
    import matplotlib.pyplot as plt

    runs = [(Path(d), read_metrics(Path(d))) for d in out_dirs]
    # a panel below: DPO runs' reward accuracy, GRPO runs' reward (training, and held-out greedy answers)
    panel_key = next((k for k in ("rewards/accuracies", "reward") if any(k in s for _, s in runs)), None)
    accuracy = panel_key is not None
    if accuracy:
        fig, (ax, ax_acc) = plt.subplots(2, 1, figsize=(FIGSIZE[0], FIGSIZE[1] * 1.5), dpi=DPI, sharex=True,
                                         gridspec_kw={"height_ratios": [2, 1]})
    else:
        fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    ax_lr = ax.twinx()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (out_dir, series) in enumerate(runs):
        color = colors[i % len(colors)]
        label = describe(out_dir) if len(runs) > 1 else ""
        prefix = f"{label}: " if label else ""
        train = series.get("train_loss") or series.get("loss", [])  # (DPO's metrics.csv: TRL's name, `loss`)
        if train:
            steps, losses = zip(*train)
            ax.plot(steps, losses, color=color, alpha=0.3, linewidth=0.8)
            ax.plot(steps, smooth(losses), color=color, linewidth=2, label=f"{prefix}train loss (smoothed)")
        val = series.get("val_loss", [])
        if val:
            steps, losses = zip(*val)
            ax.plot(steps, losses, "o--", color=color, markersize=5, label=f"{prefix}val loss")
        lr = series.get("lr", [])
        if lr:
            steps, rates = zip(*lr)
            ax_lr.plot(steps, rates, ":", color=color, linewidth=1, label=f"{prefix}learning rate")
        if accuracy and series.get(panel_key):
            steps, values = zip(*series[panel_key])
            ax_acc.plot(steps, values, color=color, alpha=0.3, linewidth=0.8)
            ax_acc.plot(steps, smooth(values), color=color, linewidth=2, label=f"{prefix}train (smoothed)")
        if accuracy and series.get(f"val_{panel_key}"):
            steps, values = zip(*series[f"val_{panel_key}"])
            ax_acc.plot(steps, values, "o--", color=color, markersize=5, label=f"{prefix}held-out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    losses = [v for _, s in runs for key in ("train_loss", "loss", "val_loss") for _, v in s.get(key, [])
              if math.isfinite(v)]
    if losses and min(losses) > 0 and max(losses) > 20 * max(min(losses), 1e-6):  # (a GRPO loss can be <= 0)
        ax.set_yscale("log")  # a loss falling by orders of magnitude: linear would flatten everything after step 1
    lines = ax.get_legend_handles_labels()
    lines_lr = ax_lr.get_legend_handles_labels()
    ax.legend(lines[0] + lines_lr[0], lines[1] + lines_lr[1], loc="upper right", fontsize="small")
    ax.grid(alpha=0.3)
    if accuracy:
        ax.set_xlabel("")  # (the panel below carries it)
        ax_acc.set_xlabel("optimizer step")
        ax_acc.set_ylabel("reward accuracy" if panel_key == "rewards/accuracies" else "reward")
        if panel_key == "rewards/accuracies":
            ax_acc.set_ylim(-0.02, 1.02)
        ax_acc.legend(loc="lower right", fontsize="small")
        ax_acc.grid(alpha=0.3)
    ax.set_title(title or (describe(runs[0][0]) if len(runs) == 1 else f"{len(runs)} runs"), fontsize="medium")
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lora_lab.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dirs", nargs="+", type=Path, help="out_dir of one or more fine-tuning runs")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"the PNG to write (default: OUT_DIR/{PLOT_FILE} for one run, "
                             f"loss_comparison.png for several)")
    args = parser.parse_args(argv)
    with one_line_errors():
        for d in args.out_dirs:
            read_metrics(d)  # every run's file exists, before matplotlib is imported
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise LoraLabError("plots need matplotlib: pip install 'lora_lab[plot]' (or pip install matplotlib)") \
                from None
        out = args.out or (args.out_dirs[0] / PLOT_FILE if len(args.out_dirs) == 1 else Path("loss_comparison.png"))
        print(plot_runs(args.out_dirs, out))


if __name__ == "__main__":
    main()
