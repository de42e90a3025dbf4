"""Small shared plumbing: the error type our command-line tools report in one line, and atomic file writes."""

from __future__ import annotations

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
    """Run a jsonargparse CLI around `main` (its typed arguments become flags; --config FILE.yaml reads them).

    A grouped argument (a dataclass of lora_lab/args.py, e.g. `train: TrainArgs`) is read as nested flags
    (`--train.learning_rate 1e-3`); the flat flags of its fields (`--learning_rate 1e-3`, `--lora_r 16`) and flat keys
    in a --config file are translated to them first, so both spellings give the same run. A bool flag alone
    (`--resume`) means true."""
    from jsonargparse import ArgumentParser, CLI

    from lora_lab.args import flag_help, nested_flags

    args = nested_flags(main, sys.argv[1:] if args is None else list(args))
    args = nested_config_files(main, args)
    helps = flag_help(main)

    class Parser(ArgumentParser):  # each nested flag's --help from the script's docstring (`train.learning_rate: ...`)
        def parse_args(self, *a, **kw):
            for action in self._actions:
                if action.dest in helps:
                    action.help = helps[action.dest]
            return super().parse_args(*a, **kw)

    with one_line_errors():
        CLI(main, as_positional=False, args=args, parser_class=Parser)


def nested_config_files(main: Callable, args: list[str]) -> list[str]:
    """`--config FILE` whose YAML has flat keys (`learning_rate: 1e-3`): given to jsonargparse as that YAML with
    them nested (`train: {learning_rate: 1e-3}`). Files already nested are passed on as they are."""
    import yaml

    from lora_lab.args import nested_config

    out = list(args)
    for i, arg in enumerate(out):
        key, eq, value = arg.partition("=")
        if key != "--config" or (not eq and i + 1 == len(out)):
            continue
        path = Path(value if eq else out[i + 1])
        if not path.is_file():
            continue  # jsonargparse reports it (or reads the text as YAML)
        config = yaml.safe_load(path.read_text())
        if not isinstance(config, dict):
            continue
        nested = nested_config(main, config)
        if nested != config:
            text = yaml.safe_dump(nested, sort_keys=False)
            if eq:
                out[i] = f"--config={text}"
            else:
                out[i + 1] = text
    return out
