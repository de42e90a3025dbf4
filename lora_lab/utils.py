"""Small shared plumbing: the error type our command-line tools report in one line, and atomic file writes."""

from __future__ import annotations

import inspect
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]  # a path given as text or as a Path


class LoraLabError(Exception):
    """A problem with the user's input (a file, a flag, a dataset row) that we can explain in one line.

    Command-line entry points print it as `error: <message>` and exit with status 1, with no traceback."""


@contextmanager
def atomic_path(path: os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block ends without an error, rename it onto `path`.

    The rename is atomic on POSIX, so a reader (or a run interrupted halfway) sees the old file or the new
    one, never half of one. The file gets the mode a plain open() would give it (0666 less the umask, typically
    0644): mkstemp makes its file private (0600), which would keep other users and containers out."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """For command-line entry points: a LoraLabError becomes `error: <message>` and exit status 1, Ctrl-C exit 130,
    never a traceback."""
    try:
        yield
    except LoraLabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def cli(main: Callable, args: Optional[list[str]] = None) -> None:
    """Run a jsonargparse CLI around `main` (its typed arguments become flags; --config FILE.yaml reads them)."""
    from jsonargparse import CLI

    args = sys.argv[1:] if args is None else list(args)
    with one_line_errors():
        CLI(main, as_positional=False, args=bare_flags_to_true(main, args))


def bare_flags_to_true(main: Callable, args: list[str]) -> list[str]:
    """`--resume` alone means `--resume true` for a bool argument of `main` (jsonargparse wants a value)."""
    flags = {f"--{name}" for name, p in inspect.signature(main).parameters.items() if p.annotation in (bool, "bool")}
    out = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg in flags and (i + 1 == len(args) or args[i + 1].startswith("--")):
            out.append("true")
    return out
