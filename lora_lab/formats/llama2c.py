"""Import a karpathy/llama2.c checkpoint (`.bin`, the legacy "version 0" export) and its `tokenizer.bin`.

The model file is 7 little-endian int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a
negative vocab_size means the classifier is not shared with the embedding), then float32 tensors in this order:
token_embedding, rms_att (all layers), wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, freq_cis_real,
freq_cis_imag (unused), and wcls if unshared. Every matrix is stored (out_features, in_features), as nn.Linear.

llama2.c's RoPE rotates interleaved pairs (x[2i], x[2i+1]) of each head; our model (like Hugging Face's Llama)
rotates the halves (x[i], x[i + hs/2]). Reordering the rows of wq and wk of each head so that row 2i moves to i
and row 2i+1 to i + hs/2 makes the two compute the same attention scores.

The tokenizer file is int32 max_token_length, then for every token: float32 score, int32 length, UTF-8 bytes.
llama2.c's exporter wrote spaces instead of "▁" and "\\n<s>\\n" / "\\n</s>\\n" for BOS / EOS; we undo both and
build an equivalent SentencePiece-style tokenizer.json (lora_lab/formats/sp_vocab.py).

    python -m lora_lab.formats.llama2c --bin_path stories260K.bin --out_dir out/stories260K --tokenizer_path tok512.bin
"""

from __future__ import annotations

import math
import shutil
import struct
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from lora_lab.checkpoint import save_checkpoint
from lora_lab.config import Config
from lora_lab.formats.gguf_names import interleaved_to_halves
from lora_lab.formats.sp_vocab import BYTE, CONTROL, NORMAL, SPACE, UNKNOWN, build_sentencepiece_bpe, is_byte_piece, \
    write_tokenizer_files
from lora_lab.progress import progress
from lora_lab.utils import LoraLabError

HEADER = struct.Struct("<7i")
NEW_FORMAT_MAGIC = 0x616B3432  # "ak42": llama2.c's version 1/2 exports, which start with a magic number


def as_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """"float32" / "bfloat16" / "float16" (or a torch.dtype) -> torch.dtype, for the converters' dtype argument."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise LoraLabError(f"dtype {dtype!r} is not one of float32, bfloat16, float16")
    return getattr(torch, dtype)


def read_llama2c_tokenizer(path: Union[str, Path]) -> tuple[list[str], list[float]]:
    """Pieces (with "▁" for spaces, "<s>" / "</s>" for BOS / EOS) and scores of a llama2.c tokenizer.bin."""
    path = Path(path)
    if not path.is_file():
        raise LoraLabError(f"Tokenizer file {path} does not exist: pass the tokenizer.bin the model was trained with")
    data = path.read_bytes()
    pieces, scores, off = [], [], 4
    if len(data) < 4:
        raise LoraLabError(f"{path} is too short for a llama2.c tokenizer.bin: download it again")
    while off < len(data):
        if off + 8 > len(data):
            raise LoraLabError(f"{path} is truncated (token {len(pieces)} is cut off): download it again")
        score, length = struct.unpack_from("<fi", data, off)
        off += 8
        if length < 0 or off + length > len(data):
            raise LoraLabError(f"{path} is truncated or not a llama2.c tokenizer.bin (token {len(pieces)} has length "
                               f"{length}): download it again")
        try:
            piece = data[off:off + length].decode("utf-8")
        except UnicodeDecodeError:
            raise LoraLabError(f"{path}: token {len(pieces)} is not valid UTF-8; is this a llama2.c "
                               f"tokenizer.bin?") from None
        off += length
        if piece.strip() in ("<s>", "</s>"):  # the exporter wrote BOS / EOS as "\n<s>\n" / "\n</s>\n"
            piece = piece.strip()
        pieces.append(piece.replace(" ", SPACE))
        scores.append(score)
    return pieces, scores


def llama2c_tokenizer(path: Union[str, Path]):
    """(tokenizers.Tokenizer, pieces) for a llama2.c tokenizer.bin; BOS is id 1 `<s>`, EOS id 2 `</s>`."""
    pieces, scores = read_llama2c_tokenizer(path)
    if len(pieces) < 3 or pieces[1] != "<s>" or pieces[2] != "</s>":
        raise LoraLabError(f"{path}: tokens 1 and 2 are not <s> and </s>; is this a llama2.c tokenizer.bin?")
    types = [UNKNOWN if i == 0 else CONTROL if i in (1, 2) else BYTE if is_byte_piece(p) else NORMAL
             for i, p in enumerate(pieces)]
    return build_sentencepiece_bpe(pieces, scores, types, add_dummy_prefix=True, bos_id=1, source=str(path)), pieces


def convert_llama2c(bin_path: Union[str, Path], out_dir: Union[str, Path],
                    tokenizer_path: Union[str, Path, None] = None,
                    dtype: Union[str, torch.dtype] = torch.float32) -> Config:
    """Convert a llama2.c model file into a lora_lab checkpoint in `out_dir`; returns its Config.

    tokenizer_path: the model's llama2.c tokenizer.bin (default: tokenizer.bin next to the model, if any), or a
    SentencePiece tokenizer.model, or a folder with tokenizer.json / tokenizer.model to copy."""
    bin_path, out_dir = Path(bin_path), Path(out_dir)
    dtype = as_dtype(dtype)
    if not bin_path.is_file():
        raise LoraLabError(f"llama2.c model file {bin_path} does not exist")
    size = bin_path.stat().st_size
    if size < HEADER.size:
        raise LoraLabError(f"{bin_path} has {size} bytes, too few for a llama2.c header: download it again")
    with open(bin_path, "rb") as f:
        head = f.read(HEADER.size)
    if struct.unpack_from("<I", head)[0] == NEW_FORMAT_MAGIC:
        raise LoraLabError(f"{bin_path} is a llama2.c version 1/2 export; only the legacy format is supported: "
                           f"export it with `python export.py --version 0`")
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = HEADER.unpack(head)
    shared = vocab_size > 0
    vocab_size = abs(vocab_size)
    header = (f"dim={dim}, hidden_dim={hidden_dim}, n_layers={n_layers}, n_heads={n_heads}, n_kv_heads={n_kv_heads}, "
              f"vocab_size={vocab_size}, seq_len={seq_len}")
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len) <= 0 or dim % n_heads \
            or n_heads % n_kv_heads or (dim // n_heads) % 2:
        raise LoraLabError(f"{bin_path} does not start with a valid llama2.c header ({header}): is it a llama2.c "
                           f"model file?")
    hs = dim // n_heads
    kv_dim = n_kv_heads * hs
    # (name, shape) in file order; llama2.c stores each kind of weight for all layers together
    layout = [
        ("token_embedding", (vocab_size, dim)),
        ("rms_att", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)),
        ("wo", (n_layers, dim, dim)),
        ("rms_ffn", (n_layers, dim)),
        ("w1", (n_layers, hidden_dim, dim)),
        ("w2", (n_layers, dim, hidden_dim)),
        ("w3", (n_layers, hidden_dim, dim)),
        ("rms_final", (dim,)),
        ("freq_cis_real", (seq_len, hs // 2)),
        ("freq_cis_imag", (seq_len, hs // 2)),
    ]
    if not shared:
        layout.append(("wcls", (vocab_size, dim)))
    n_floats = sum(math.prod(shape) for _, shape in layout)
    expected = HEADER.size + 4 * n_floats
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise LoraLabError(f"{bin_path} has {size} bytes but its header ({header}) needs {expected}: the file is "
                           f"{what}; download or export it again")

    flat = torch.from_numpy(np.fromfile(bin_path, dtype="<f4", offset=HEADER.size).astype(np.float32))
    w, off = {}, 0
    for name, shape in layout:
        n = math.prod(shape)
        w[name] = flat[off:off + n].view(shape)
        off += n

    sd = {"wte.weight": w["token_embedding"], "norm_f.weight": w["rms_final"]}
    for i in progress(range(n_layers), desc=f"Converting {bin_path.name}", unit="layer"):
        p = f"blocks.{i}."
        sd[p + "norm_1.weight"] = w["rms_att"][i]
        sd[p + "attn.q_proj.weight"] = interleaved_to_halves(w["wq"][i], n_heads)  # (dim, dim)
        sd[p + "attn.k_proj.weight"] = interleaved_to_halves(w["wk"][i], n_kv_heads)  # (kv_dim, dim)
        sd[p + "attn.v_proj.weight"] = w["wv"][i]
        sd[p + "attn.o_proj.weight"] = w["wo"][i]
        sd[p + "norm_2.weight"] = w["rms_ffn"][i]
        sd[p + "mlp.gate_proj.weight"] = w["w1"][i]  # silu(w1 x) * (w3 x) -> w2
        sd[p + "mlp.up_proj.weight"] = w["w3"][i]
        sd[p + "mlp.down_proj.weight"] = w["w2"][i]
    if not shared:
        sd["lm_head.weight"] = w["wcls"]
    sd = {k: v.to(dtype).clone() for k, v in sd.items()}  # clone: own storage, not views of one flat buffer

    config = Config(name=bin_path.stem, block_size=seq_len, vocab_size=vocab_size, n_layer=n_layers, n_embd=dim,
                    n_head=n_heads, n_query_groups=n_kv_heads, intermediate_size=hidden_dim, rope_base=10000.0,
                    norm_class="RMSNorm", norm_eps=1e-5, mlp_class="swiglu", bias=False, tie_embeddings=shared,
                    prompt_style="plain", extra={"source": "llama2.c"})
    _write_tokenizer(bin_path, out_dir, tokenizer_path, config)  # first: a bad tokenizer leaves no checkpoint behind
    save_checkpoint(out_dir, config, sd)
    return config


def _write_tokenizer(bin_path: Path, out_dir: Path, tokenizer_path, config: Config) -> None:
    if tokenizer_path is None:
        default = bin_path.parent / "tokenizer.bin"
        if not default.is_file():
            import warnings

            warnings.warn(f"No tokenizer given for {bin_path} and no tokenizer.bin next to it: {out_dir} has no "
                          f"tokenizer; convert again with --tokenizer_path TOKENIZER.bin")
            return
        tokenizer_path = default
    tokenizer_path = Path(tokenizer_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_path.is_dir():
        from lora_lab.checkpoint import copy_tokenizer_files

        if not copy_tokenizer_files(tokenizer_path, out_dir):
            raise LoraLabError(f"{tokenizer_path} has no tokenizer files: pass the llama2.c tokenizer.bin instead")
        return
    # a SentencePiece model (Llama 2's, for the tinyllamas with 32000 tokens)
    if tokenizer_path.suffix == ".model" and tokenizer_path.is_file():
        shutil.copyfile(tokenizer_path, out_dir / "tokenizer.model")
        return
    tokenizer, pieces = llama2c_tokenizer(tokenizer_path)
    if len(pieces) != config.vocab_size:
        raise LoraLabError(f"{tokenizer_path} has {len(pieces)} tokens but {bin_path} has a vocabulary of "
                           f"{config.vocab_size}: pass the tokenizer the model was trained with")
    # llama2.c models were trained with BOS (not EOS) between stories, and llama2.c's sampler stops at BOS:
    # stop generation at either
    write_tokenizer_files(out_dir, tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos=True,
                          bos_id=1, eos_ids=[2, 1], model_max_length=config.block_size)


def main(bin_path: Path, out_dir: Path, tokenizer_path: Optional[Path] = None, dtype: str = "float32") -> None:
    """Convert a llama2.c model file (and its tokenizer.bin) into a lora_lab checkpoint.

    Args:
        bin_path: the llama2.c model file (legacy export)
        out_dir: where to write the checkpoint
        tokenizer_path: llama2.c tokenizer.bin (default: tokenizer.bin next to the model) or a tokenizer.model
        dtype: float32, bfloat16 or float16
    """
    config = convert_llama2c(bin_path, out_dir, tokenizer_path, dtype=dtype)
    print(f"Wrote {out_dir} ({config.n_layer} layers, n_embd {config.n_embd}, vocab {config.vocab_size})")


if __name__ == "__main__":
    from lora_lab.utils import cli

    cli(main)
