"""Plumbing the fine-tuning scripts share: the loss, the learning-rate schedule, progress and resume state.

What teaches a method (which parameters train, how the model is transformed) stays in finetune/*.py; what is
the same for every method lives here, so the four scripts cannot drift apart.
"""

from __future__ import annotations

import csv
import math
import random
import re
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Union

import torch

from lora_lab.checkpoint import load_config
from lora_lab.model import IGNORE_INDEX, next_token_loss  # noqa: F401  (re-exported for the scripts)
from lora_lab.utils import LoraLabError, atomic_path, atomic_write_text

TRAIN_STATE_FILE = "train_state.pt"


# ------------------------------------------------------------------------------------------------------------
# Learning rate: linear warm-up, then cosine decay to min_lr
# ------------------------------------------------------------------------------------------------------------
def lr_at(step: int, max_steps: int, learning_rate: float, warmup_steps: int, min_lr: float) -> float:
    """The learning rate of optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (learning_rate - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


class LRSchedule:
    """The learning rate of each optimizer step, and whether the time budget is spent.

        schedule = LRSchedule(learning_rate, warmup_steps, min_lr, max_steps, max_time, state)
        while state["step"] < max_steps:
            lr = schedule.lr(state["step"])     # also: the step starts now
            ...                                 # forward, backward, optimizer step
            schedule.step_done()
            out_of_time = schedule.out_of_time()

    Without a budget (max_time None) it is `lr_at`: warm-up, then cosine decay to min_lr over max_steps.

    With a budget the same warm-up and cosine are laid over the time the run has: the cosine's end is the last
    step that still fits, re-estimated at every step from the measured step time,

        steps_left = floor((max_time - elapsed - reserve) / step_time)       (this step included)
        last       = min(step + steps_left, max_steps) - 1
        lr         = min_lr + (learning_rate - min_lr) (1 + cos(pi (step - warmup_steps) / (last - warmup_steps))) / 2

    so the run's last step (steps_left 1) is at the floor, and the run stops when the next step would not fit:
    it ends within one step of the budget, at min_lr. step_time is the mean of the last 20 steps' durations;
    reserve is the longest time spent between two steps (a validation and a save), kept back for the final ones.
    `elapsed` counts the training time of every process of the run: the schedule keeps it, the step times and
    the reserve in `state["lr_schedule"]`, which the scripts save with their counters, so a run resumed after a
    crash or Ctrl-C carries on along the same schedule with the time it has left (the time it was down is not
    counted). A budget that runs out during the warm-up ends at the warm-up's rate (the warm-up is in steps).
    tests/test_budget_schedule.py checks each claim.
    """

    WINDOW = 20

    def __init__(self, learning_rate: float, warmup_steps: int, min_lr: float, max_steps: int,
                 max_time: Optional[float] = None, state: Optional[dict] = None, sync=None,
                 clock=time.perf_counter) -> None:
        self.learning_rate, self.warmup_steps, self.min_lr = learning_rate, warmup_steps, min_lr
        self.max_steps, self.max_time, self.clock = max_steps, max_time, clock
        self.sync = sync  # several devices: every one takes rank 0's rate (their clocks differ a little)
        state = state if state is not None else {}
        self.saved = state.setdefault("lr_schedule", {"elapsed": 0.0, "step_times": [], "reserve": 0.0})
        self.last_tick = clock()
        self.step_start: Optional[float] = None
        self.step_end: Optional[float] = None

    def _tick(self) -> float:
        now = self.clock()
        self.saved["elapsed"] += now - self.last_tick
        self.last_tick = now
        return now

    def elapsed(self) -> float:
        """Training seconds of the whole run so far (earlier processes of a resumed run included)."""
        return self.saved["elapsed"] + self.clock() - self.last_tick

    def step_time(self) -> Optional[float]:
        times = self.saved["step_times"]
        return sum(times) / len(times) if times else None

    def steps_left(self) -> Optional[int]:
        """Steps that still fit in the budget, the next one included (None: no budget, or no step timed yet)."""
        tau = self.step_time()
        if self.max_time is None or tau is None:
            return None
        return math.floor((self.max_time - self.elapsed() - self.saved["reserve"]) / max(tau, 1e-9) + 1e-6)

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based), which starts now."""
        start = self._tick()
        if self.step_end is not None:  # the time between the last step's end and now: validation, saving
            self.saved["reserve"] = max(self.saved["reserve"], start - self.step_end)
        self.step_start = start
        if self.max_time is None:
            return lr_at(step, self.max_steps, self.learning_rate, self.warmup_steps, self.min_lr)
        lr = self._budget_lr(step)
        return self.sync(lr) if self.sync is not None else lr

    def _budget_lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        left = self.steps_left()
        if left is None:  # the first step of the run after warm-up: nothing measured yet
            return self.learning_rate
        last = min(step + max(left, 1), self.max_steps) - 1
        if last <= step:
            return self.min_lr
        progress = (step - self.warmup_steps) / (last - self.warmup_steps)
        return self.min_lr + 0.5 * (self.learning_rate - self.min_lr) * (1 + math.cos(math.pi * progress))

    def step_done(self) -> None:
        self.step_end = self._tick()
        times = self.saved["step_times"]
        times.append(self.step_end - self.step_start)
        del times[:-self.WINDOW]

    def out_of_time(self) -> bool:
        """With a budget: the next step would not fit in it."""
        if self.max_time is None:
            return False
        left = self.steps_left()
        return self.elapsed() > self.max_time if left is None else left < 1


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every param group's lr; groups with an `lr_ratio` (LoRA+'s B matrices) get lr times that."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)


# ------------------------------------------------------------------------------------------------------------
# Time budget and interruption
# ------------------------------------------------------------------------------------------------------------
def parse_duration(value: Union[str, float, int, None]) -> Optional[float]:
    """Seconds from 3600, "3600", "90m", "1.5h", "2d", "23:30:00" or "45:00"; None stays None."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else float(value)
    text = str(value).strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            return sum(p * 60**i for i, p in enumerate(reversed(parts)))
        m = re.fullmatch(r"([0-9.]+)\s*([smhd]?)", text)
        if m:
            return float(m.group(1)) * units[m.group(2) or "s"]
    except ValueError:
        pass
    raise LoraLabError(f"--max_time {value!r}: give seconds (3600), a unit (90m, 1.5h, 2d) or H:MM:SS")


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM sets `requested`; the training loop saves at the next step boundary and exits,
    so an interrupted run loses at most the step in progress and `--resume` continues it exactly."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = {}  # the handlers to put back when training is over
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread (e.g. some launchers): no graceful stop then
                pass

    def restore(self) -> None:
        """Put the previous handlers back (after the training loop), so that in a notebook or a longer program
        Ctrl-C interrupts as usual again."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        print("\nStopping after this step (saving state to resume; Ctrl-C again to stop at once)", flush=True)


# ------------------------------------------------------------------------------------------------------------
# Resume state: everything besides the trainable weights that decides what the next step does
# ------------------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(i) for i in x) if isinstance(x, (list, tuple)) else x


def save_train_state(path: Union[str, Path], state: dict) -> None:
    """torch.save to a temporary file, then rename: a crash mid-write leaves the previous state intact."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_train_state(path: Union[str, Path]) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LoraLabError(f"--resume: {path} does not exist: there is no interrupted run in {path.parent} to resume "
                           f"(start without --resume)")
    try:
        # weights_only: only tensors and plain containers are read back, never arbitrary pickled objects
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is the same problem for the user
        raise LoraLabError(f"--resume: {path} is truncated or corrupt ({type(e).__name__}): start the run again "
                           f"without --resume") from None


# ------------------------------------------------------------------------------------------------------------
# Progress
# ------------------------------------------------------------------------------------------------------------
def check_run(fabric, checkpoint_dir: Path, out_dir: Path, resume: bool, batch_size: Optional[int] = None,
              micro_batch_size: int = 1):
    """A fine-tuning script's checks that need the devices and out_dir at hand, one line each, before anything
    slow: checkpoint_dir is a lora_lab checkpoint (its Config is returned), batch_size (if given) splits evenly into
    micro-batches over the devices, --resume has a run to continue and a new run does not overwrite one."""
    config = load_config(checkpoint_dir)  # one line if checkpoint_dir is not a lora_lab checkpoint
    if batch_size is not None and fabric.world_size > 1 and batch_size % (micro_batch_size * fabric.world_size):
        raise LoraLabError(f"batch_size={batch_size} is not a multiple of micro_batch_size x devices = "
                           f"{micro_batch_size * fabric.world_size}")
    if resume and not (out_dir / TRAIN_STATE_FILE).is_file():
        raise LoraLabError(f"--resume: {out_dir / TRAIN_STATE_FILE} does not exist: there is no interrupted run in "
                           f"{out_dir} to resume (start without --resume)")
    if not resume and (out_dir / TRAIN_STATE_FILE).is_file():
        raise LoraLabError(f"{out_dir} already holds a run: add --resume to continue it, or choose another "
                           "--out_dir")
    return config


def format_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Throughput:
    """Tokens per second and ETA over the steps done in this process (a resumed run starts counting anew)."""

    def __init__(self, start_step: int, max_steps: int) -> None:
        self.t0, self.start_step, self.max_steps = time.perf_counter(), start_step, max_steps
        self.tokens = 0

    def update(self, tokens: int) -> None:
        self.tokens += tokens

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def tokens_per_sec(self) -> float:
        return self.tokens / max(self.elapsed(), 1e-9)

    def eta(self, step: int) -> float:
        done = step - self.start_step
        return self.elapsed() / max(done, 1) * (self.max_steps - step)


# ------------------------------------------------------------------------------------------------------------
# Data stream, metrics file, evaluation by generation
# ------------------------------------------------------------------------------------------------------------
def iter_keeping_rng(loader):
    """iter(loader), leaving the global torch RNG as it was.

    Creating a DataLoader iterator draws a seed (for its workers) from the global torch RNG, the one dropout and
    NEFTune use. A run resumed mid-epoch creates one training iterator more than the uninterrupted run did, and
    a validation creates one each time: either would shift every later dropout mask, so that a resumed run (or
    one validating at other steps) would no longer train exactly like the uninterrupted one."""
    rng = torch.get_rng_state()
    batches = iter(loader)
    torch.set_rng_state(rng)
    return batches


def micro_batches(train_dl, rank: int, world_size: int, state: dict):
    """The endless stream of this device's micro-batches: epochs follow one another (the sampler reshuffles),
    and with several devices each takes every world_size-th micro-batch of the one global stream, so N devices
    see exactly the data one device would with N times the gradient accumulation.

    The global stream is read world_size micro-batches at a time, each device keeping the one of its rank:
    at the end of every optimizer step all devices have then read exactly as far, so the sampler position
    that rank 0 saves is the right place for every rank to resume from."""

    def global_stream():
        while True:
            for batch in iter_keeping_rng(train_dl):
                state["micro_batches"] += 1
                yield batch

    stream = global_stream()
    while True:
        group = [next(stream) for _ in range(world_size)]
        yield group[rank]


class MetricsLog:
    """The run record: one row per step appended to metrics.csv (a resumed run appends to the same file), the
    hyperparameters in hparams.yaml, the same rows and hyperparameters sent to an experiment tracker
    (`logger_name`: csv, tensorboard, mlflow, wandb; see lora_lab/loggers.py), and loss.png drawn by `plot()`
    (at every save) and `finish()` (at the end; see lora_lab/plot.py).

    start_step: the step the run starts from (0, or the resumed step). Rows after it are dropped first: they
    come from a run that crashed or was killed after its last saved state (or from an earlier run that never
    saved one), and the steps they describe are about to be done again."""

    def __init__(self, path: Path, fabric, start_step: Optional[int] = None, logger_name: str = "csv",
                 hparams: Optional[dict] = None, fields: Optional[list[str]] = None) -> None:
        self.path, self.enabled = Path(path), fabric.is_global_zero
        # fields: the columns, for a method that logs others (finetune/dpo.py: TRL's rewards/... names)
        self.fields = list(fields or ["step", "train_loss", "val_loss", "val_ppl", "lr", "tokens", "tokens_per_sec"])
        self.logger, self.plot_warned, self.rows, self.plotted = None, False, 0, -1
        if not self.enabled:
            return
        if start_step is not None and self.path.is_file():
            self._drop_rows_after(start_step)
        from lora_lab.loggers import make_logger

        self.logger = make_logger(logger_name, self.path.parent)
        if hparams is not None:
            import yaml

            hparams = {k: _plain(v) for k, v in hparams.items()}
            atomic_write_text(self.path.parent / "hparams.yaml", yaml.safe_dump(hparams, sort_keys=False))
            if self.logger is not None:
                self.logger.log_hyperparams(hparams)

    def _drop_rows_after(self, step: int) -> None:
        with open(self.path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= step]
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        new = not self.path.is_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields)
            if new:
                writer.writeheader()
            writer.writerow(row)
        self.rows += 1
        if self.logger is not None:
            self.logger.log_metrics({k: float(v) for k, v in row.items() if k != "step" and v is not None},
                                    step=int(row["step"]))

    def plot(self) -> None:
        """Draw OUT_DIR/loss.png from metrics.csv; without matplotlib, one warning line (once) and no plot."""
        if not self.enabled or not self.path.is_file() or self.plotted == self.rows:
            return  # (nothing new since the last plot: the save at the last step, then finish())
        self.plotted = self.rows
        try:
            from lora_lab.plot import PLOT_FILE, plot_runs

            plot_runs([self.path.parent], self.path.parent / PLOT_FILE)
        except Exception as e:  # noqa: BLE001 - a plot is never worth a training run
            if not self.plot_warned:
                reason = ("matplotlib is not installed: pip install 'lora_lab[plot]'" if isinstance(e, ImportError)
                          else f"{type(e).__name__}: {e}")
                print(f"warning: no loss.png ({reason})", file=sys.stderr)
                self.plot_warned = True

    def finish(self) -> None:
        """At the end of the run: the final plot, and the tracker's files closed."""
        self.plot()
        if self.logger is not None:
            from lora_lab.loggers import close_logger

            close_logger(self.logger)


def _plain(value):
    """A hyperparameter as YAML and the trackers take it: paths as strings, tuples as lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


@torch.no_grad()
def generate_answers(model, tokenizer, prompt_style, rows, max_new_tokens: int = 128) -> list[str]:
    """Greedy answers of `model` to rows' prompts (instruction + input, wrapped in prompt_style)."""
    from lora_lab.generate import generate
    from lora_lab.progress import progress

    stop_ids = list(tokenizer.eos_ids) + prompt_style.stop_tokens(tokenizer)
    answers = []
    for row in progress(rows, desc="Generating answers", unit="prompt"):
        prompt = tokenizer.encode(prompt_style.apply(row["instruction"], row.get("input", "")))
        ids = [i for i in generate(model, prompt, max_new_tokens, temperature=0.0, eos_ids=stop_ids)
               if i not in stop_ids]
        answers.append(tokenizer.decode(ids))
    return answers
