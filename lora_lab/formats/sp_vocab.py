"""A `tokenizer.json` from a SentencePiece-style BPE vocabulary given only as pieces and scores.

llama2.c's `tokenizer.bin` and llama.cpp GGUF files whose `tokenizer.ggml.model` is "llama" store the vocabulary
of a SentencePiece BPE model as a list of (piece, score), without the merge list that a Hugging Face `tokenizers`
BPE model needs. SentencePiece's BPE encodes a text by:
  1. replacing spaces with "▁" and prepending one "▁" (the "dummy prefix"),
  2. splitting it into characters, each one a piece of the vocab or, if not, its UTF-8 bytes as `<0xXX>` pieces,
  3. repeatedly merging the adjacent pair whose concatenation is the highest-scoring piece of the vocab
     (the leftmost pair on a tie), until no adjacent pair forms a piece.
A `tokenizers` BPE model does step 3 when its merges are every (left, right) pair that forms a piece, ranked by
the score of that piece, and steps 1-2 with a Prepend + Replace normalizer and `byte_fallback=True`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Sequence

from lora_lab.utils import LoraLabError, atomic_write_text

# SentencePiece piece types (the values llama.cpp stores in tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "▁"  # SentencePiece's visible space
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def is_byte_piece(piece: str) -> bool:
    return _BYTE_PIECE.match(piece) is not None


def sentencepiece_merges(pieces: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """Every (left, right) split of a normal piece into two normal pieces, best-scoring merged piece first.

    Ties (Llama 2 gives all its runs of spaces the score -1e9) keep the vocabulary order, then shorter left part
    first, so the ranks are deterministic."""
    normal = {p: i for i, (p, t) in enumerate(zip(pieces, types)) if t == NORMAL}
    ranked = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-scores[i], i, k, left, right))
    ranked.sort(key=lambda r: r[:3])
    return [(left, right) for *_, left, right in ranked]


def build_sentencepiece_bpe(pieces: Sequence[str], scores: Sequence[float], types: Optional[Sequence[int]] = None,
                            add_dummy_prefix: bool = True, bos_id: Optional[int] = None, add_bos: bool = True,
                            source: str = "vocabulary"):
    """A `tokenizers.Tokenizer` that encodes and decodes like SentencePiece BPE with this vocabulary.

    pieces use "▁" for spaces; types are SentencePiece piece types (default: `<0xXX>` pieces are BYTE, the rest
    NORMAL). `source` names the file in error messages."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    if types is None:
        types = [BYTE if is_byte_piece(p) else NORMAL for p in pieces]
    if not (len(pieces) == len(scores) == len(types)):
        raise LoraLabError(f"{source}: {len(pieces)} pieces but {len(scores)} scores and {len(types)} types; "
                           f"the vocabulary is corrupt")
    vocab: dict[str, int] = {}
    for i, piece in enumerate(pieces):
        if piece in vocab:
            raise LoraLabError(f"{source}: the piece {piece!r} appears twice (ids {vocab[piece]} and {i}); "
                               f"the vocabulary is corrupt")
        vocab[piece] = i
    unk = next((p for p, t in zip(pieces, types) if t == UNKNOWN), None)
    n_bytes = sum(t == BYTE for t in types)

    tok = Tokenizer(BPE(vocab=vocab, merges=sentencepiece_merges(pieces, scores, types), unk_token=unk,
                        fuse_unk=True, byte_fallback=n_bytes == 256, dropout=None))
    steps = [normalizers.Replace(" ", SPACE)]
    if add_dummy_prefix:  # Prepend leaves an empty text empty, as SentencePiece does
        steps.insert(0, normalizers.Prepend(SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    # no pre-tokenizer: the whole text is one "word"; merges cross spaces only where the vocab has such pieces
    tok.pre_tokenizer = None
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    # control and unknown pieces (<unk>, <s>, </s>) are special tokens; user-defined pieces always stay whole
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False)
                            for p, t in zip(pieces, types) if t in (CONTROL, UNKNOWN)])
    user = [AddedToken(p, special=False, normalized=False) for p, t in zip(pieces, types) if t == USER_DEFINED]
    if user:
        tok.add_tokens(user)
    if add_bos and bos_id is not None:
        bos = pieces[bos_id]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    return tok


def write_tokenizer_files(out_dir: Path, tokenizer, bos_token: Optional[str], eos_token: Optional[str],
                          add_bos: bool, bos_id: Optional[int], eos_ids: Sequence[int], unk_token: Optional[str] = None,
                          pad_token: Optional[str] = None, chat_template: Optional[str] = None,
                          model_max_length: Optional[int] = None) -> None:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json for a tokenizer we built."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "tokenizer.json", tokenizer.to_str(pretty=False))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos_token, "eos_token": eos_token,
                  "unk_token": unk_token, "pad_token": pad_token, "add_bos_token": add_bos, "add_eos_token": False,
                  "clean_up_tokenization_spaces": False}
    if model_max_length:
        tok_config["model_max_length"] = model_max_length
    if chat_template:
        tok_config["chat_template"] = chat_template
    atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    eos_ids = list(eos_ids)
    gen_config = {"bos_token_id": bos_id, "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids}
    atomic_write_text(out_dir / "generation_config.json", json.dumps(gen_config, indent=2) + "\n")
