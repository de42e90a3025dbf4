"""Convert a model you already have into a lora_lab checkpoint, or a lora_lab checkpoint back to Hugging Face.

    python -m lora_lab.convert SRC OUT_DIR [--tokenizer PATH] [--dtype float32|bfloat16|float16]
    python -m lora_lab.convert --to hf CHECKPOINT_DIR OUT_DIR
    python -m lora_lab.convert --to hf CLASSIFIER_DIR OUT_DIR    # finetune/classify.py's: *ForSequenceClassification
    python -m lora_lab.convert --to gguf CHECKPOINT_DIR OUT.gguf [--outtype f32|f16|bf16|q8_0|q4_0]   (llama.cpp)

SRC is one of:
  - a Hugging Face model folder (config.json + safetensors or .bin weights + tokenizer files);
  - a llama.cpp GGUF file (recognised by its magic bytes, whatever its name); --tokenizer: a folder with the
    model's tokenizer.json / tokenizer_config.json, when you would rather use those than the GGUF's vocabulary;
  - a llama2.c model `.bin` (the 7-int32 header export); --tokenizer: its tokenizer.bin.

The converters live in lora_lab/formats/hf.py, convert_gguf.py and convert_llama2c.py (export_gguf.py for
--to gguf); this file only recognises the source and dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import struct
from pathlib import Path
from typing import Optional, Sequence

from lora_lab.checkpoint import WEIGHTS_FILE, is_checkpoint, load_config
from lora_lab.utils import LoraLabError, atomic_path, one_line_errors

DTYPES = ("float32", "bfloat16", "float16")
ACCEPTED = ("a Hugging Face model folder (with config.json), a GGUF file, or a llama2.c .bin model "
            "(or, with --to hf, a lora_lab checkpoint folder)")

GGUF_MAGIC = b"GGUF"
LLAMA2C_HEADER = struct.Struct("<7i")  # dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len


def llama2c_expected_size(header: tuple[int, ...]) -> Optional[int]:
    """The file size a llama2.c legacy export with this header has, or None if the header is not plausible."""
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = header
    shared_classifier = vocab_size > 0  # the exporter writes a negative vocab_size for an unshared classifier
    vocab = abs(vocab_size)
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len) <= 0:
        return None
    if dim % n_heads or n_heads % n_kv_heads or dim > 65536 or n_layers > 1024:
        return None
    head_size = dim // n_heads
    kv_dim = n_kv_heads * head_size
    n_floats = (vocab * dim  # token embedding
                + n_layers * (2 * dim  # rms_att, rms_ffn
                              + 2 * dim * dim + 2 * dim * kv_dim  # wq, wo, wk, wv
                              + 3 * dim * hidden)  # w1, w2, w3
                + dim  # rms_final
                + seq_len * head_size  # freq_cis_real and freq_cis_imag, head_size / 2 each per position
                + (0 if shared_classifier else vocab * dim))
    return LLAMA2C_HEADER.size + 4 * n_floats


def detect_source(src: Path) -> str:
    """What `src` is: "hf", "gguf", "llama2c" or "lora_lab"; raise one line when it is none of them."""
    src = Path(src)
    if not src.exists():
        raise LoraLabError(f"{src} does not exist: give {ACCEPTED}")
    if src.is_dir():
        if is_checkpoint(src):
            return "lora_lab"
        if (src / "config.json").is_file():
            return "hf"
        raise LoraLabError(f"{src} is a folder without config.json: give {ACCEPTED}")
    with open(src, "rb") as f:
        head = f.read(LLAMA2C_HEADER.size)
    if head[:4] == GGUF_MAGIC:
        return "gguf"
    if len(head) == LLAMA2C_HEADER.size:
        expected = llama2c_expected_size(LLAMA2C_HEADER.unpack(head))
        size = os.path.getsize(src)
        if expected is not None and expected == size:
            return "llama2c"
        if expected is not None and src.suffix == ".bin":
            raise LoraLabError(f"{src} has a llama2.c header but is {size} bytes where it should be {expected}: "
                               f"the file is truncated or not a llama2.c model")
    if src.suffix == ".gguf":
        raise LoraLabError(f"{src} is named .gguf but does not start with the GGUF magic bytes: it is truncated or "
                           f"not a GGUF file")
    raise LoraLabError(f"{src} is not a model file this tool reads: give {ACCEPTED}")


def _call(fn, *args, dtype: Optional[str] = None, **kwargs):
    """Call a converter, passing `dtype` if it takes one; otherwise cast the written weights afterwards."""
    if dtype is None or "dtype" in inspect.signature(fn).parameters:
        return fn(*args, **kwargs, **({"dtype": dtype} if dtype else {})), False
    return fn(*args, **kwargs), True


def cast_weights(checkpoint_dir: Path, dtype: str) -> None:
    """Rewrite model.safetensors with its floating point tensors in `dtype`."""
    import torch
    from safetensors.torch import load_file, save_file

    path = Path(checkpoint_dir) / WEIGHTS_FILE
    state_dict = load_file(str(path))
    state_dict = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(state_dict, str(tmp), metadata={"format": "pt", "lora_lab": "1"})


def weights_summary(path: Path) -> str:
    """"134.5M parameters, bfloat16" from a safetensors file's header (no tensor is loaded)."""
    from safetensors import safe_open

    n_params, dtypes = 0, set()
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            s = f.get_slice(key)
            n = 1
            for d in s.get_shape():
                n *= d
            n_params += n
            dtypes.add(str(s.get_dtype()).lower())
    size = (f"{n_params / 1e9:.2f}B" if n_params >= 1e9 else f"{n_params / 1e6:.1f}M" if n_params >= 1e6
            else f"{n_params / 1e3:.1f}K" if n_params >= 1e4 else str(n_params))
    names = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}
    return f"{size} parameters, {'/'.join(sorted(names.get(d, d) for d in dtypes))}"


def convert(src: Path, out_dir: Path, tokenizer: Optional[Path] = None, dtype: Optional[str] = None) -> str:
    """Convert `src` to a lora_lab checkpoint in `out_dir`; return a one-line summary."""
    src, out_dir = Path(src), Path(out_dir)
    if dtype is not None and dtype not in DTYPES:
        raise LoraLabError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    kind = detect_source(src)
    if kind == "lora_lab":
        raise LoraLabError(f"{src} is already a lora_lab checkpoint: use it as it is, or export it with "
                           f"`python -m lora_lab.convert --to hf {src} OUT_DIR`")
    if kind == "hf":
        if tokenizer is not None:
            raise LoraLabError("--tokenizer is for GGUF and llama2.c sources; a Hugging Face folder has its own")
        fn = importlib.import_module("lora_lab.formats.hf").convert_hf_checkpoint
        _, needs_cast = _call(fn, src, out_dir, dtype=dtype)
        what = "Hugging Face folder"
    elif kind == "gguf":
        tokenizer_dir = None
        if tokenizer is not None:
            tokenizer = Path(tokenizer)
            if not tokenizer.exists():
                raise LoraLabError(f"--tokenizer {tokenizer} does not exist: give the folder with the model's "
                                   f"tokenizer.json")
            tokenizer_dir = tokenizer if tokenizer.is_dir() else tokenizer.parent
        fn = importlib.import_module("lora_lab.formats.gguf_import").convert_gguf
        _, needs_cast = _call(fn, src, out_dir, tokenizer_dir=tokenizer_dir, dtype=dtype)
        what = "GGUF file"
    else:
        if tokenizer is not None and not Path(tokenizer).is_file():
            raise LoraLabError(f"--tokenizer {tokenizer} does not exist: give llama2.c's tokenizer.bin")
        fn = importlib.import_module("lora_lab.formats.llama2c").convert_llama2c
        _, needs_cast = _call(fn, src, out_dir, tokenizer_path=tokenizer, dtype=dtype)
        what = "llama2.c model"
    if needs_cast:
        cast_weights(out_dir, dtype)
    config = load_config(out_dir)
    name = f" ({config.name})" if config.name else ""
    return f"Converted {what} {src}{name} to {out_dir}: {weights_summary(out_dir / WEIGHTS_FILE)}"


def export(checkpoint_dir: Path, out_dir: Path, dtype: Optional[str] = None) -> str:
    """Write a lora_lab checkpoint as a Hugging Face transformers folder; return a one-line summary."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if dtype is not None and dtype not in DTYPES:
        raise LoraLabError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    if (checkpoint_dir / "classifier_config.json").is_file():  # finetune/classify.py's output: *ForSequenceClassification
        fn = importlib.import_module("lora_lab.classifier").export_hf_classifier
        _call(fn, checkpoint_dir, out_dir, dtype=dtype)
        return f"Exported the classifier {checkpoint_dir} to Hugging Face format in {out_dir}"
    load_config(checkpoint_dir)  # one clear line if it is not a checkpoint
    fn = importlib.import_module("lora_lab.formats.hf").export_hf
    _call(fn, checkpoint_dir, out_dir, dtype=dtype)
    return f"Exported {checkpoint_dir} to Hugging Face format in {out_dir}"


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lora_lab.convert", description=__doc__.split("\n\n")[0],
                                     epilog=f"SRC: {ACCEPTED}.")
    parser.add_argument("src", type=Path, metavar="SRC", help="what to convert")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the folder to write")
    parser.add_argument("--to", choices=("lora_lab", "hf", "gguf"), default="lora_lab",
                        help="hf: export the lora_lab checkpoint SRC as a Hugging Face folder; gguf: as one "
                             "llama.cpp GGUF file (OUT_DIR is then the .gguf file)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="GGUF: a folder with tokenizer.json; llama2.c: its tokenizer.bin")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="cast the weights (default: keep them)")
    parser.add_argument("--outtype", default=None, help="--to gguf: f32, f16 (default), bf16, q8_0 or q4_0")
    args = parser.parse_args(argv)
    with one_line_errors():
        if args.outtype is not None and args.to != "gguf":
            raise LoraLabError("--outtype is for --to gguf; use --dtype for the other formats")
        if args.to == "gguf":
            if args.tokenizer is not None or args.dtype is not None:
                raise LoraLabError("--to gguf takes --outtype, not --tokenizer or --dtype: the checkpoint has its "
                                   "tokenizer")
            load_config(args.src)  # one clear line if SRC is not a lora_lab checkpoint
            summary = importlib.import_module("lora_lab.formats.gguf_export").export_gguf(args.src, args.out_dir,
                                                                                  args.outtype or "f16")
        elif args.to == "hf":
            if args.tokenizer is not None:
                raise LoraLabError("--tokenizer is not used with --to hf: the checkpoint has its tokenizer")
            summary = export(args.src, args.out_dir, dtype=args.dtype)
        else:
            summary = convert(args.src, args.out_dir, tokenizer=args.tokenizer, dtype=args.dtype)
    print(summary)


if __name__ == "__main__":
    main()
