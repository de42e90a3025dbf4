"""QLoRA from different starting points (--lora_init): the same data, steps, rank and seed; only the init differs.

    python benchmarks/bench_lora_init.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
    python benchmarks/bench_lora_init.py --checkpoint_dir DIR --inits kaiming,eva,pissa,loftq --max_steps 24
    python benchmarks/bench_lora_init.py --checkpoint_dir DIR --step0 true --inits kaiming,loftq,pissa,pissa_niter_4

Each init trains with finetune/qlora.py (in this process, one after the other) on the built-in JSON task, and the
table gives the validation loss at each --eval_interval, the share of held-out prompts whose greedy answer has all
JSON values right after training (on the trained model merged into float32 weights: json_after_training), and the
init's one-off cost: its time (as the script prints it; eva: its pass over the training batches) and how far
it raises the process's peak memory (VmHWM, Linux; measured apart, in a fresh process per init, so that the
training runs do not hide it). Before training, the step-0 distance of each LoRA layer from the checkpoint's W,
||W - (W_base + s B A)|| / ||W|| summed over layers, shows what the init starts from (0 for pissa on a float base;
plain QLoRA: the NF4 error).
"""

from __future__ import annotations

import contextlib
import csv
import io
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_lab import GPT  # noqa: E402
from lora_lab.lora import inject_lora, lora_modules, normalize_targets  # noqa: E402
from lora_lab.lora_init import init_lora  # noqa: E402
from lora_lab.utils import cli  # noqa: E402


def peak_rss_of_init(checkpoint_dir: str, init: str, r: int, targets: str, loftq_iter: int) -> dict:
    """In this (fresh) process: load, inject, then time init_lora and read how far VmHWM rose."""
    def hwm() -> int:
        text = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) * 1024

    model = GPT.from_checkpoint(checkpoint_dir)
    inject_lora(model, r=r, alpha=2.0 * r, targets=normalize_targets(targets.split(",")))
    weights = {n: m.weight.detach().float().clone() for n, m in lora_modules(model)}
    before = hwm()
    started = time.perf_counter()
    init_lora(model, init, nf4=dict(blocksize=64, double_quant=True), loftq_iter=loftq_iter)
    seconds = time.perf_counter() - started
    rise = hwm() - before
    err = sum(float((w - (m.base_weight(torch.float32) + m.delta_weight().float())).norm() / w.norm())
              for (n, m), w in zip(lora_modules(model), weights.values())) / len(weights)
    return {"seconds": seconds, "peak_rise": rise, "step0_error": err}


def step0_table(checkpoint_dir: Path, inits: list[str], r: int, targets: str, loftq_iter: int) -> None:
    """Per init, in this process: the mean over LoRA layers of ||W - (W_base + s B A)|| / ||W|| at step 0 (NF4 base,
    blocks of 64, double quantization) and the init's CPU time (time.thread_time: holds on a busy machine)."""
    print(f"step 0 on {checkpoint_dir}, r={r} on {targets}: mean relative distance from the checkpoint's W")
    print("| --lora_init | distance of base + s B A from W (relative) | init CPU time |")
    print("| --- | --- | --- |")
    for init in inits:
        model = GPT.from_checkpoint(checkpoint_dir)
        inject_lora(model, r=r, alpha=2.0 * r, targets=normalize_targets(targets.split(",")))
        weights = {n: m.weight.detach().float().clone() for n, m in lora_modules(model)}
        started = time.thread_time()
        init_lora(model, init, nf4=dict(blocksize=64, double_quant=True), loftq_iter=loftq_iter)
        seconds = time.thread_time() - started
        with torch.no_grad():
            d = [float((weights[n] - (m.base_weight(torch.float32) + m.delta_weight().float())).norm()
                       / weights[n].norm()) for n, m in lora_modules(model)]
        name = f"{init} --loftq_iter {loftq_iter}" if init == "loftq" else init
        print(f"| {name} | {sum(d) / len(d):.4f} | {seconds:.1f} s |", flush=True)


def main(checkpoint_dir: Path, inits: str = "kaiming,loftq,pissa", max_steps: int = 24, eval_interval: int = 8,
         lora_r: int = 8, lora_targets: str = "all", loftq_iter: int = 1, batch_size: int = 8, n_train: int = 400,
         n_val: int = 32, eval_samples: int = 16, learning_rate: float = 1e-3, seed: int = 42,
         memory: bool = True, step0: bool = False, one: str = "") -> None:
    """Args:
        checkpoint_dir: the base model.
        inits: comma-separated --lora_init values to compare.
        max_steps: optimizer steps of each run.
        eval_interval: validate every this many steps.
        lora_r: the rank of every run.
        lora_targets: the layers of every run (QLoRA's paper: all).
        loftq_iter: LoftQ's alternating steps.
        batch_size: samples per step.
        n_train: training samples of the JSON task.
        n_val: validation samples.
        eval_samples: held-out prompts generated and scored before and after.
        learning_rate: peak learning rate.
        seed: the same for every run.
        step0: only print each init's step-0 distance from W and its CPU time (no training).
        memory: also measure each init's time and peak-memory rise in a fresh process (one more model load each;
            eva: only its init_lora part, as kaiming: its pass over the data needs the script's batches).
        one: internal: measure only this init's time and memory, print it, exit.
    """
    if one:
        print(peak_rss_of_init(str(checkpoint_dir), one, lora_r, lora_targets, loftq_iter))
        return
    if step0:
        return step0_table(checkpoint_dir, inits.split(","), lora_r, lora_targets, loftq_iter)
    import finetune.qlora as qlora
    from lora_lab.args import call_flat

    names = inits.split(",")
    costs = {}
    for init in names if memory else ():  # a fresh process each: the peak-memory rise of the init alone
        out = subprocess.run([sys.executable, __file__, "--checkpoint_dir", str(checkpoint_dir), "--one", init,
                              "--lora_r", str(lora_r), "--lora_targets", lora_targets, "--loftq_iter", str(loftq_iter)],
                             capture_output=True, text=True, check=True, env={"PYTHONPATH": str(ROOT), **_env()})
        costs[init] = eval(out.stdout.strip().splitlines()[-1], {})  # our own dict literal
        print(f"{init}: init {costs[init]}", file=sys.stderr, flush=True)
    json_rows = held_out_json_rows(checkpoint_dir, batch_size, n_train, n_val, seed)[:eval_samples]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for init in names:
            printed = io.StringIO()
            started = time.perf_counter()
            with contextlib.redirect_stdout(Tee(printed, sys.stderr)):  # the run's lines on stderr as they come
                call_flat(qlora.setup, checkpoint_dir=checkpoint_dir, out_dir=Path(tmp) / init,
                          data="json_extraction", lora_init=init, loftq_iter=loftq_iter, lora_r=lora_r,
                          lora_alpha=2.0 * lora_r, lora_targets=lora_targets, max_steps=max_steps,
                          eval_interval=eval_interval, batch_size=batch_size, micro_batch_size=batch_size,
                          n_train=n_train, n_val=n_val, eval_samples=0, learning_rate=learning_rate,
                          warmup_steps=2, max_seq_length=256, seed=seed, eval_iters=100)
            with open(Path(tmp) / init / "metrics.csv") as f:
                losses = {int(r["step"]): float(r["val_loss"]) for r in csv.DictReader(f) if r.get("val_loss")}
            json_score = json_after_training(Path(tmp) / init, json_rows)
            init_line = ([None] + re.findall(r"--lora_init \S+: ([\d.]+) s", printed.getvalue()))[-1]  # eva: the last
            rows[init] = dict(losses=losses, json=json_score,
                              minutes=(time.perf_counter() - started) / 60,
                              init_seconds=float(init_line) if init_line else None)
            print(f"{init}: done in {rows[init]['minutes']:.1f} min: {rows[init]}", file=sys.stderr, flush=True)
    steps = sorted(next(iter(rows.values()))["losses"])
    print(f"QLoRA on {checkpoint_dir}, r={lora_r} on {lora_targets}, {max_steps} steps of batch {batch_size}, "
          f"lr {learning_rate}, seed {seed}, NF4 blocks of 64 + double quantization")
    extra = " step-0 distance from W | init peak memory rise |" if memory else ""
    print("| --lora_init | " + " | ".join(f"val loss @{s}" for s in steps) +
          f" | JSON all values right ({len(json_rows)} held-out prompts) | "
          "init time |" + extra)
    print("| --- " * (len(steps) + 3 + 2 * memory) + "|")
    for init in names:
        r = rows[init]
        seconds = f"{r['init_seconds']:.1f} s" if r["init_seconds"] is not None else "-"
        line = (f"| {init} | " + " | ".join(f"{r['losses'][s]:.4f}" for s in steps) +
                f" | {r['json']['all_correct']:.0%} | {seconds} |")
        if memory:
            c = costs[init]
            line += f" {c['step0_error']:.4f} | {c['peak_rise'] / 2**20:.0f} MiB |"
        print(line)


def held_out_json_rows(checkpoint_dir: Path, batch_size: int, n_train: int, n_val: int, seed: int) -> list[dict]:
    """The validation rows finetune/qlora.py holds out of json_extraction with these settings."""
    from lora_lab import Tokenizer
    from lora_lab.data import get_dataloaders
    from lora_lab.prompts import PromptStyle

    tokenizer = Tokenizer(checkpoint_dir)
    _, val_dl, _ = get_dataloaders("json_extraction", tokenizer, PromptStyle.from_checkpoint(checkpoint_dir, None),
                                   max_seq_length=256, micro_batch_size=batch_size, seed=seed, n_train=n_train,
                                   n_val=n_val, verbose=False)
    return list(val_dl.dataset.rows)


def json_after_training(adapter_dir: Path, json_rows: list[dict]) -> dict:
    """Greedy answers of the trained QLoRA model to the held-out prompts, scored as finetune/qlora.py does. The
    model is the NF4 base + adapter merged into float32 weights (lora_lab.adapted.load_lora_model: the same model
    to 1e-4 in the logits), because generating on NF4 dequantizes every weight at every token: minutes per answer
    on a CPU."""
    from lora_lab import Tokenizer
    from lora_lab.adapted import load_lora_model
    from lora_lab.data.json_extraction import evaluate_extractions
    from lora_lab.lora import load_lora
    from lora_lab.prompts import PromptStyle
    from lora_lab.training import generate_answers

    config, _ = load_lora(adapter_dir)
    model = load_lora_model(None, adapter_dir, merge=True, dtype=torch.float32)
    style = PromptStyle.from_checkpoint(config.base_model, config.prompt_style)
    answers = generate_answers(model, Tokenizer(config.base_model), style, json_rows, max_new_tokens=64)
    return evaluate_extractions(answers, [r["output"] for r in json_rows])


class Tee(io.TextIOBase):
    """Writes to several streams."""

    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


if __name__ == "__main__":
    cli(main)
