"""Progress of long loops: a live tqdm bar on a terminal, plain periodic lines in a log file or CI.

    for row in progress(rows, desc="JSON scoring", unit="prompt"):
        ...

On a terminal (stderr is a TTY) the bar redraws in place. Anywhere else (output piped to a file, a CI log, a
notebook's captured stream) a bar would write hundreds of carriage-return fragments, so instead one plain line
is printed at most every LORA_LAB_PROGRESS_INTERVAL seconds (default 10) and one when the loop ends, if it took
long enough to print anything at all: no phase longer than ~10 s is silent, and short ones add no noise.
LORA_LAB_PROGRESS=bar|lines|off forces a mode. Progress goes to stderr, so stdout keeps only the results.
tests/test_run_record.py checks both modes (test_progress_*).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")
DEFAULT_INTERVAL_S = 10.0


def _mode(file) -> str:
    mode = os.environ.get("LORA_LAB_PROGRESS", "").strip().lower()
    if mode in ("bar", "lines", "off"):
        return mode
    return "bar" if hasattr(file, "isatty") and file.isatty() else "lines"


def _interval() -> float:
    try:
        return float(os.environ.get("LORA_LAB_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S))
    except ValueError:
        return DEFAULT_INTERVAL_S


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def progress(iterable: Iterable[T], total: Optional[int] = None, desc: str = "", unit: str = "it",
             file=None, postfix: Optional[Callable[[], str]] = None) -> Iterator[T]:
    """Yield the items of `iterable`, showing how far the loop has got (see the module docstring). `postfix`, if
    given, is called for a short text shown after the count (e.g. generate/batch.py's tokens/s)."""
    file = sys.stderr if file is None else file
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    mode = _mode(file)
    if mode == "off":
        yield from iterable
        return
    if mode == "bar":
        from tqdm import tqdm

        # leave=False: the bar disappears when done; the caller prints the result line
        bar = tqdm(iterable, total=total, desc=desc, unit=unit, file=file, leave=False, dynamic_ncols=True)
        for item in bar:
            yield item
            if postfix is not None:
                bar.set_postfix_str(postfix(), refresh=False)
        return

    interval = _interval()
    t0 = last = time.perf_counter()
    printed, done = False, 0
    for item in iterable:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= interval and (total is None or done < total):
            extra = f"; {postfix()}" if postfix is not None else ""
            print(_line(desc, done, total, unit, now - t0) + extra, file=file, flush=True)
            last, printed = now, True
    if printed:
        print(_line(desc, done, total, unit, time.perf_counter() - t0, finished=True), file=file, flush=True)


def _line(desc: str, done: int, total: Optional[int], unit: str, elapsed: float, finished: bool = False) -> str:
    head = f"{desc}: " if desc else ""
    units = unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")  # batches, steps, samples
    if finished:
        return f"{head}done, {done} {units} in {_clock(elapsed)}"
    if total:
        eta = elapsed / done * (total - done)
        return f"{head}{done}/{total} {units} ({100 * done / total:.0f}%), {_clock(elapsed)} elapsed, ETA {_clock(eta)}"
    return f"{head}{done} {units}, {_clock(elapsed)} elapsed"
