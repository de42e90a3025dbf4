"""Export to llama.cpp: a lora_lab checkpoint as a GGUF model file, a LoRA adapter as a GGUF adapter file.

    python -m lora_lab.convert --to gguf CHECKPOINT_DIR model.gguf [--outtype f32|f16|bf16|q8_0|q4_0]
    python -m lora_lab.merge_lora --adapter_dir out/finetune/lora --to gguf --out_dir merged.gguf   # merge + export
    python -m lora_lab.export_gguf --adapter_dir out/finetune/lora --out_file adapter.gguf          # + a Modelfile

    llama-cli -m model.gguf                          llama-cli -m base.gguf --lora adapter.gguf
    ollama create my-model -f Modelfile              (FROM base.gguf, ADAPTER adapter.gguf, TEMPLATE, stops)

A GGUF file is key/value metadata (`llama.block_count`, `tokenizer.ggml.tokens`, `tokenizer.chat_template`, ...)
and named tensors (`token_embd.weight`, `blk.0.attn_q.weight`, ...) in a ggml type. GGUF lists a tensor's dims
innermost first, so a PyTorch (out, in) weight is written as it is and llama.cpp reads it as ne = [in, out].
This file is the inverse of lora_lab/convert_gguf.py; what it changes on the way out:

  - Llama-architecture files (Llama 2/3, Mistral, SmolLM2): llama.cpp rotates *interleaved* pairs (2i, 2i+1),
    we rotate *halves* (i, i + n/2). Reordering the rows of Wq and Wk per head, halves -> interleaved, makes
    llama.cpp's RoPE on the permuted q equal ours on the original q (q·k is unchanged: both are permuted alike).
    `halves_to_interleaved` is the exact inverse of convert_gguf's `interleaved_to_halves`.
    Qwen2, Gemma, Phi-2, GPT-NeoX and Falcon use the rotate-half ("NeoX") RoPE in llama.cpp: no permutation.
  - Gemma's RMSNorm scales by (1 + w): llama.cpp stores 1 + w.
  - GPT-NeoX and Falcon: one attn_qkv matrix, [Q; K; V] rows (all query heads, then keys, then values).
  - Llama 3.1 RoPE scaling: the `rope_freqs` tensor, the factor each frequency's wavelength is multiplied by.
  - Falcon-40B: llama.cpp's attn_norm feeds the MLP and attn_norm_2 the attention (HF's ln_mlp / ln_attn).

Weight types (--outtype): norms, biases and rope_freqs stay F32 (as in llama.cpp's converter); matrices are
F32, F16, BF16 or, block-quantized in numpy by `gguf.quants`, Q8_0 (32 int8 + one f16 scale per block) or
Q4_0 (32 4-bit + one scale). With q4_0 the embedding and output matrices are Q8_0 (they suffer most from 4 bits,
which is why llama-quantize keeps them wider too). A matrix whose rows are not a multiple of 32 falls back to F16.

A LoRA adapter file (general.type = adapter, adapter.type = lora, adapter.lora.alpha) holds, per adapted
weight W of the base file, `W_name.lora_a` = A (r, in) and `W_name.lora_b` = B (out, r); llama.cpp computes
W x + (alpha / r) B (A x) with r read from A. Three facts make our adapter exact there:
  - a row permutation P of W (the Q/K reordering above) commutes with LoRA: P (W + s B A) = P W + s (P B) A,
    so only B's rows are permuted;
  - rsLoRA scales by alpha / sqrt(r): writing alpha' = alpha · sqrt(r) gives alpha' / r = alpha / sqrt(r);
  - a LoRA on some of q, k, v of a fused attn_qkv is a LoRA of rank k·r on the fused matrix (k adapted parts):
    A' = [A_q; A_v] (k r × in), B' = the blocks B_q, B_v on their rows and zeros elsewhere (lora_lab/export_peft.py
    explains it for PEFT); llama.cpp scales it by alpha' / (k r), so B' is multiplied by k.
DoRA rescales each row by m / ||W + s B A||, which llama.cpp's adapter cannot do: merge such adapters instead.

Checked against llama.cpp itself (llama-cpp-python) in tests/test_export_gguf.py: logits, greedy tokens and
token ids for a tiny model of each family and for SmolLM2-135M-Instruct; adapters for q/v, all targets and
rsLoRA; and our own importer reads every file back to the same weights (F32 exactly).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import numpy as np
import torch

from lora_lab.adapted import adapter_kind
from lora_lab.checkpoint import WEIGHTS_FILE, load_config
from lora_lab.config import Config
from lora_lab.lora import base_checkpoint_dir, check_adapter_fits, load_lora
from lora_lab.model import llama3_scale
from lora_lab.prompts import chat_template, prompt_style_from_chat_template, prompt_styles
from lora_lab.utils import LoraLabError, atomic_path, atomic_write_text

PathLike = Union[str, Path]
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
QUANT_BLOCK = 32  # Q8_0 and Q4_0 quantize blocks of 32 values along a row


# ------------------------------------------------------------------------------------------------------------
# Which llama.cpp architecture a Config is
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    name: str  # general.architecture
    permute_qk: bool = False  # llama.cpp's interleaved RoPE: Q/K rows reordered
    fused_qkv: bool = False  # one attn_qkv matrix [Q; K; V]
    layer_norm: bool = False  # LayerNorm (eps key layer_norm_epsilon) instead of RMSNorm
    output_required: bool = False  # llama.cpp needs output.weight even when it is the embedding
    output_bias_required: bool = False


ARCHS = {a.name: a for a in (
    Arch("llama", permute_qk=True),
    Arch("qwen2"),
    Arch("gemma"),
    Arch("phi2", layer_norm=True, output_required=True, output_bias_required=True),
    Arch("gptneox", fused_qkv=True, layer_norm=True, output_required=True),
    Arch("falcon", fused_qkv=True, layer_norm=True),
)}
FAMILIES = "Llama 2/3, SmolLM2, Mistral, Qwen2, Gemma, Phi-2, Pythia/GPT-NeoX, Falcon"


def gguf_architecture(config: Config) -> Arch:
    """The llama.cpp architecture that computes what our model with this config computes, or one line why none."""
    c = config
    full_rope = c.rope_n_elem == c.head_size

    def refuse(why: str) -> LoraLabError:
        return LoraLabError(f"{c.name or 'this model'} cannot be exported to GGUF: {why} (llama.cpp export "
                            f"supports {FAMILIES})")

    if c.norm_class == "RMSNorm":
        if c.parallel_residual or c.bias or c.lm_head_bias or not full_rope:
            raise refuse("an RMSNorm model with a parallel residual, biases or partial RoPE has no llama.cpp "
                         "architecture here")
        if c.norm_unit_offset:
            if not (c.mlp_class == "geglu" and c.scale_embeddings and c.tie_embeddings and not c.attn_qkv_bias):
                raise refuse("a (1 + w) RMSNorm model that is not Gemma (GeGLU, scaled and tied embeddings)")
            return ARCHS["gemma"]
        if c.mlp_class != "swiglu" or c.scale_embeddings:
            raise refuse(f"an RMSNorm model with a {c.mlp_class} MLP or scaled embeddings that is not Gemma")
        if c.rope_scaling is not None and c.attn_qkv_bias:
            raise refuse("Llama 3 RoPE scaling together with q/k/v biases")
        return ARCHS["qwen2" if c.attn_qkv_bias else "llama"]
    if c.mlp_class != "gelu":
        raise refuse(f"a LayerNorm model with a {c.mlp_class} MLP (StableLM) is not exported")
    if c.rope_scaling is not None or c.sliding_window is not None:
        raise refuse("RoPE scaling or a sliding window on a LayerNorm model")
    if c.bias and c.lm_head_bias:
        if not (c.parallel_residual and c.shared_attention_norm):
            raise refuse("a model with an lm_head bias that is not Phi (parallel block sharing one norm)")
        return ARCHS["phi2"]
    if c.lm_head_bias:
        raise refuse("an lm_head bias outside Phi")
    if c.bias:
        if c.shared_attention_norm and c.parallel_residual:
            raise refuse("GPT-NeoX with one shared norm")
        return ARCHS["gptneox"]
    if not c.parallel_residual:
        raise refuse("a LayerNorm GELU model without biases and without a parallel block (Falcon-RW)")
    if not full_rope:
        raise refuse("Falcon with partial RoPE")
    if c.attn_qkv_bias:
        raise refuse("Falcon with q/k/v biases")
    return ARCHS["falcon"]


# ------------------------------------------------------------------------------------------------------------
# Tensor names and layouts
# ------------------------------------------------------------------------------------------------------------
_LAYER = {"attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v", "attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
          "norm_1": "attn_norm", "norm_2": "ffn_norm"}
_GLOBAL = {"wte": "token_embd", "norm_f": "output_norm", "lm_head": "output"}
QKV = ("q_proj", "k_proj", "v_proj")


def halves_to_interleaved(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q or k projection rows (n_head * hs, ...) from rotate-half pairs (i, i + hs/2) to interleaved pairs
    (2i, 2i + 1), per head: what llama.cpp's converter does to Hugging Face Llama weights (its `permute`).
    The inverse of lora_lab.formats.llama2c.interleaved_to_halves."""
    hs = w.shape[0] // n_head
    return w.reshape(n_head, 2, hs // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_module_name(module: str, config: Config, arch: Arch) -> str:
    """Our module name -> llama.cpp's tensor name without suffix: `blocks.3.attn.q_proj` -> `blk.3.attn_q`
    (`blk.3.attn_qkv` where llama.cpp fuses q, k and v)."""
    if module in _GLOBAL:
        return _GLOBAL[module]
    _, i, rest = module.split(".", 2)
    if arch.fused_qkv and rest.split(".")[-1] in QKV:
        return f"blk.{i}.attn_qkv"
    if arch.name == "falcon" and not config.shared_attention_norm:
        # Falcon-40B: llama.cpp's attn_norm is the MLP's norm (ln_mlp), attn_norm_2 the attention's (ln_attn)
        rest = {"norm_1": "attn_norm_2", "norm_2": "attn_norm"}.get(rest, rest)
        if rest.startswith("attn_norm"):
            return f"blk.{i}.{rest}"
    return f"blk.{i}.{_LAYER[rest]}"


@dataclass
class TensorPlan:
    name: str  # the GGUF tensor name
    shape: tuple[int, ...]  # PyTorch order (out, in)
    load: Callable[[], torch.Tensor]  # float32, in llama.cpp's layout
    is_matrix: bool


def tensor_plan(config: Config, arch: Arch, weights: "Weights") -> list[TensorPlan]:
    """Every tensor of the GGUF file, in our module order, with a loader that applies llama.cpp's layout."""
    plans: list[TensorPlan] = []
    names = [n for n in weights.keys() if not (n == "lm_head.weight" and config.tie_embeddings)]
    fused_done: set[str] = set()
    for name in names:
        module, suffix = name.rsplit(".", 1)
        gname = f"{gguf_module_name(module, config, arch)}.{suffix}"
        last = module.rsplit(".", 1)[-1]
        if arch.fused_qkv and last in QKV:
            if gname in fused_done:
                continue
            fused_done.add(gname)
            parts = [f"{module.rsplit('.', 1)[0]}.{p}.{suffix}" for p in QKV]
            shape = (sum(weights.shape(p)[0] for p in parts), *weights.shape(parts[0])[1:])
            plans.append(TensorPlan(gname, shape, lambda parts=parts: torch.cat([weights.load(p) for p in parts]),
                                    len(shape) == 2))
            continue

        def load(name=name, last=last) -> torch.Tensor:
            w = weights.load(name)
            if arch.permute_qk and last in ("q_proj", "k_proj"):
                w = halves_to_interleaved(w, config.n_head if last == "q_proj" else config.n_query_groups)
            if arch.name == "gemma" and "norm" in last:
                w = w + 1  # llama.cpp stores Gemma's (1 + weight)
            return w

        shape = tuple(weights.shape(name))
        plans.append(TensorPlan(gname, shape, load, len(shape) == 2))
    if config.tie_embeddings and arch.output_required:  # a file of its own for the shared matrix
        plans.append(TensorPlan("output.weight", tuple(weights.shape("wte.weight")),
                                lambda: weights.load("wte.weight"), True))
    if arch.output_bias_required and "lm_head.bias" not in weights.keys():
        plans.append(TensorPlan("output.bias", (config.vocab_size,), lambda: torch.zeros(config.vocab_size), False))
    if config.rope_scaling is not None:  # Llama 3.1: per-frequency wavelength factors
        n = config.rope_n_elem
        inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, n, 2, dtype=torch.float64) / n))  # (n/2,)
        factors = (inv_freq / llama3_scale(inv_freq, **config.rope_scaling)).float()
        plans.append(TensorPlan("rope_freqs.weight", (n // 2,), lambda: factors, False))
    return plans


class Weights:
    """Tensors by our names, loaded one at a time: from a checkpoint's safetensors (memory-mapped, so a model
    larger than RAM exports) or from a state dict in memory (merge_lora)."""

    def __init__(self, source: Union[PathLike, Mapping[str, torch.Tensor]]) -> None:
        if isinstance(source, Mapping):
            self._sd, self._file = dict(source), None
        else:
            from safetensors import safe_open

            self._sd, self._file = None, safe_open(str(source), framework="pt", device="cpu")

    def keys(self) -> list[str]:
        return list(self._sd) if self._sd is not None else list(self._file.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        if self._sd is not None:
            return tuple(self._sd[name].shape)
        return tuple(self._file.get_slice(name).get_shape())

    def load(self, name: str) -> torch.Tensor:
        t = self._sd[name] if self._sd is not None else self._file.get_tensor(name)
        return t.detach().float()


def tensor_type(plan: TensorPlan, outtype: str):
    from gguf import GGMLQuantizationType as Q

    if not plan.is_matrix or outtype == "f32":
        return Q.F32
    if outtype in ("f16", "bf16"):
        return Q.F16 if outtype == "f16" else Q.BF16
    if plan.shape[-1] % QUANT_BLOCK:
        return Q.F16  # rows that do not split into blocks of 32
    if outtype == "q4_0" and plan.name in ("token_embd.weight", "output.weight"):
        return Q.Q8_0
    return Q.Q8_0 if outtype == "q8_0" else Q.Q4_0


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "q4_0": "MOSTLY_Q4_0"}


def encode(w: torch.Tensor, qtype) -> np.ndarray:
    """A float32 tensor as the bytes (or floats) of `qtype`."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    a = w.contiguous().numpy()
    if qtype == Q.F32:
        return a.astype(np.float32, copy=False)
    if qtype == Q.F16:
        return a.astype(np.float16)
    return quantize(a, qtype)  # uint8 blocks


def _nbytes(shape: tuple[int, ...], qtype) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape as add_tensor_info wants it, numpy dtype, bytes) of a tensor stored in `qtype`."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quant_shape_to_byte_shape

    if qtype in (Q.F32, Q.F16):
        dtype = np.dtype(np.float32 if qtype == Q.F32 else np.float16)
        return shape, dtype, int(np.prod(shape)) * dtype.itemsize
    byte_shape = quant_shape_to_byte_shape(shape, qtype)
    return tuple(byte_shape), np.dtype(np.uint8), int(np.prod(byte_shape))


class Progress:
    """One line per tensor on a terminal (rewritten in place), every tenth of the work otherwise."""

    def __init__(self, total: int, what: str, enabled: bool = True) -> None:
        self.total, self.what, self.enabled, self.done = total, what, enabled, 0
        self.tty = sys.stderr.isatty()
        self.step = max(1, total // 10)

    def update(self, name: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        line = f"{self.what}: [{self.done}/{self.total}] {name}"
        if self.tty:
            print(f"\r{line:<90}", end="" if self.done < self.total else "\n", file=sys.stderr, flush=True)
        elif self.done % self.step == 0 or self.done == self.total:
            print(line, file=sys.stderr, flush=True)


def _write(out_file: PathLike, arch_name: str, add_metadata: Callable, tensors: list[tuple[str, tuple, object,
           Callable[[], np.ndarray]]], what: str, progress: bool) -> int:
    """Write a GGUF file atomically, streaming: metadata and tensor infos first, then one tensor at a time
    (only one is in memory, so a file over 2 GB is written like any other). Returns the file size."""
    from gguf import GGUFWriter

    out_file = Path(out_file)
    with atomic_path(out_file) as tmp:
        writer = GGUFWriter(tmp, arch_name)
        add_metadata(writer)
        for name, shape, qtype, _ in tensors:
            info_shape, dtype, nbytes = _nbytes(shape, qtype)
            writer.add_tensor_info(name, info_shape, dtype, nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = Progress(len(tensors), what, progress)
        for name, _, _, make in tensors:
            writer.write_tensor_data(make())
            bar.update(name)
        writer.close()
    return out_file.stat().st_size


# ------------------------------------------------------------------------------------------------------------
# Tokenizer and chat template
# ------------------------------------------------------------------------------------------------------------
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp's token types


def _pre_tokenizer_name(pre: Optional[dict], path: Path) -> str:
    """The name llama.cpp gives (tokenizer.ggml.pre) to a tokenizer.json byte-level pre-tokenizer."""
    from lora_lab.formats.gguf_import import _LLAMA3_SPLIT, _QWEN2_SPLIT

    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre or {}]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # GPT-2, GPT-NeoX / Pythia, Phi-2 (CodeGen)
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == _LLAMA3_SPLIT:
            return "llama-bpe"
        if regex == _QWEN2_SPLIT:
            return "qwen2"
    if kinds and kinds[0] == "Punctuation" and "ByteLevel" in kinds:
        return "falcon"
    raise LoraLabError(f"{path}: its pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not one lora_lab "
                       f"can name for llama.cpp (known: gpt-2, smollm, llama-bpe, qwen2, falcon), so llama.cpp "
                       f"would split text differently; convert this model with llama.cpp's convert_hf_to_gguf.py")


def tokenizer_metadata(checkpoint_dir: PathLike, vocab_size: int) -> dict:
    """The tokenizer.ggml.* values for the checkpoint's tokenizer: byte-level BPE (tokenizer.json) as `gpt2`,
    a SentencePiece model (tokenizer.model) as `llama`; padded to the embedding's rows as llama.cpp's
    converter does ([PAD<i>] tokens)."""
    from lora_lab.tokenizer import Tokenizer

    checkpoint_dir = Path(checkpoint_dir)
    tok = Tokenizer(checkpoint_dir)  # bos / eos / add_bos exactly as our generate uses them
    meta: dict = {"bos": tok.bos_id, "eos": tok.eos_id, "add_bos": tok.add_bos, "add_eos": False}
    tok_config = checkpoint_dir / "tokenizer_config.json"
    pad = json.loads(tok_config.read_text()).get("pad_token") if tok_config.is_file() else None
    pad = pad.get("content") if isinstance(pad, dict) else pad
    meta["pad"] = tok.token_to_id(pad) if pad else None
    if (checkpoint_dir / "tokenizer.model").is_file():  # SentencePiece: pieces, scores and types as they are
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor(model_file=str(checkpoint_dir / "tokenizer.model"))
        tokens, scores, types = [], [], []
        for i in range(sp.vocab_size()):
            tokens.append(sp.id_to_piece(i))
            scores.append(float(sp.get_score(i)))
            types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else
                         UNUSED if sp.is_unused(i) else BYTE if sp.is_byte(i) else NORMAL)
        meta.update(model="llama", pre="default", tokens=tokens, scores=scores, types=types, merges=None,
                    unk=sp.unk_id() if sp.unk_id() >= 0 else None, add_space_prefix=True)
    else:
        path = checkpoint_dir / "tokenizer.json"
        data = json.loads(path.read_text())
        model = data.get("model") or {}
        if model.get("type") != "BPE":
            raise LoraLabError(f"{path}: a {model.get('type')} tokenizer is not exported to GGUF (only BPE, "
                               f"byte-level or SentencePiece-style): put the model's tokenizer.model in "
                               f"{checkpoint_dir}")
        by_id = {i: t for t, i in model["vocab"].items()}
        types_by_id = {i: NORMAL for i in by_id}
        for added in data.get("added_tokens") or []:
            by_id[added["id"]] = added["content"]
            types_by_id[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
        n = max(vocab_size, max(by_id) + 1)
        if n > vocab_size:
            raise LoraLabError(f"{path} has {n} tokens but the model's embedding has {vocab_size} rows")
        tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
        types = [types_by_id.get(i, USER_DEFINED) for i in range(n)]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        byte_level = "ByteLevel" in json.dumps(data.get("pre_tokenizer")) or \
            (data.get("decoder") or {}).get("type") == "ByteLevel"
        if byte_level:  # GPT-2 style: tokens, merges and the pre-tokenizer's name
            meta.update(model="gpt2", pre=_pre_tokenizer_name(data.get("pre_tokenizer"), path), tokens=tokens,
                        scores=None, types=types, merges=merges, unk=None, add_space_prefix=None)
        else:  # SentencePiece BPE as tokenizer.json ("▁" for spaces, <0xXX> byte pieces)
            meta.update(model="llama", pre="default", tokens=tokens, types=types, merges=None,
                        **_sentencepiece_scores(data, tokens, types, merges))
    if len(meta["tokens"]) < vocab_size:  # an embedding padded beyond the vocabulary (e.g. Pythia's 50304)
        extra = vocab_size - len(meta["tokens"])
        meta["tokens"] += [f"[PAD{i}]" for i in range(len(meta["tokens"]), vocab_size)]
        meta["types"] += [USER_DEFINED] * extra
        if meta["scores"] is not None:
            meta["scores"] += [-1000.0] * extra
    elif len(meta["tokens"]) > vocab_size:
        raise LoraLabError(f"{checkpoint_dir}: the tokenizer has {len(meta['tokens'])} tokens but the model's "
                           f"embedding has {vocab_size} rows")
    return meta


def _sentencepiece_scores(data: dict, tokens: list[str], types: list[int], merges: list[str]) -> dict:
    """Scores, unk and add_space_prefix for a SentencePiece-style BPE tokenizer.json. llama.cpp's SentencePiece
    tokenizer merges the adjacent pair whose merged piece scores highest; Hugging Face's BPE the pair of lowest
    merge rank: scoring each piece -(rank of the merge that makes it) gives the same merges."""
    from lora_lab.formats.sp_vocab import is_byte_piece

    rank = {}
    for k, m in enumerate(merges):
        rank.setdefault(m.replace(" ", "", 1), k)
    scores = [-float(rank[t]) if t in rank else 0.0 for t in tokens]
    for i, t in enumerate(tokens):
        if types[i] == NORMAL and is_byte_piece(t):
            types[i] = BYTE
    unk = (data.get("model") or {}).get("unk_token")
    unk_id = tokens.index(unk) if unk in tokens else None
    if unk_id is not None:
        types[unk_id] = UNKNOWN
    text = json.dumps([data.get("normalizer"), data.get("pre_tokenizer")])
    add_space_prefix = '"Prepend"' in text or ('"Metaspace"' in text and '"never"' not in text)
    return {"scores": scores, "unk": unk_id, "add_space_prefix": add_space_prefix}


# Jinja chat templates (what llama.cpp's --jinja, LM Studio and tokenizer.chat_template readers run) for our
# prompt styles, used when the checkpoint's own template is not the style the model was fine-tuned with.
JINJA = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
               "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
               "{% endif %}"),
    "llama3": ("{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
               "+ message['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "alpaca": ("{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% else %}"
               "{{ 'Below is an instruction that describes a task. Write a response that appropriately completes "
               "the request.\\n\\n' }}{% endif %}{% for message in messages %}{% if message['role'] == 'user' %}"
               "{{ '### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
               "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + '\\n\\n' }}{% endif %}"
               "{% endfor %}"),
    "llama2-chat": ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
                    "message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"),
    "mistral": ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] "
                "+ ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
                "{% endif %}{% endfor %}"),
    "gemma": ("{% for message in messages %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' "
              "else 'user') + '\\n' + message['content'] + '<end_of_turn>\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"),
    "zephyr": ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token "
               "+ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"),
}

# Ollama's Go templates (the Modelfile's TEMPLATE) for the same styles: .System and .Prompt of one turn
OLLAMA = {
    "plain": "{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}",
    "chatml": ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}<|im_start|>user\n"
               "{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n"),
    "llama3": ("{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
               "<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "alpaca": ("{{ if .System }}{{ .System }}{{ else }}Below is an instruction that describes a task. Write a "
               "response that appropriately completes the request.{{ end }}\n\n### Instruction:\n{{ .Prompt }}"
               "\n\n### Response:\n"),
    "llama2-chat": "[INST] {{ if .System }}<<SYS>>\n{{ .System }}\n<</SYS>>\n\n{{ end }}{{ .Prompt }} [/INST]",
    "mistral": "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }} [/INST]",
    "gemma": ("<start_of_turn>user\n{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}<end_of_turn>\n"
              "<start_of_turn>model\n"),
    "zephyr": ("{{ if .System }}<|system|>\n{{ .System }}</s>\n{{ end }}<|user|>\n{{ .Prompt }}</s>\n"
               "<|assistant|>\n"),
}


def gguf_chat_template(checkpoint_dir: PathLike, prompt_style: str) -> Optional[str]:
    """The checkpoint's own chat template when it is the model's prompt style, else ours for that style
    (a merged adapter fine-tuned in Alpaca style on a ChatML base chats in Alpaca style); None for plain."""
    template = chat_template(checkpoint_dir)
    if template and prompt_style_from_chat_template(template) == prompt_style:
        return template
    return JINJA.get(prompt_style)


# ------------------------------------------------------------------------------------------------------------
# Model files
# ------------------------------------------------------------------------------------------------------------
def write_gguf_model(config: Config, weights: Union[PathLike, Mapping[str, torch.Tensor]], out_file: PathLike,
                     tokenizer_dir: PathLike, outtype: str = "f16", progress: bool = True) -> dict:
    """Write a model (a checkpoint's model.safetensors, or a state dict) as a llama.cpp GGUF file, with the
    tokenizer and chat template of tokenizer_dir inside. Returns a summary dict (arch, outtype, bytes)."""
    import gguf

    if outtype not in OUTTYPES:
        raise LoraLabError(f"--outtype {outtype}: use one of {', '.join(OUTTYPES)}")
    arch = gguf_architecture(config)
    weights = Weights(weights)
    vocab = tokenizer_metadata(tokenizer_dir, config.vocab_size)  # checked before the slow part
    template = gguf_chat_template(tokenizer_dir, config.prompt_style)
    plans = tensor_plan(config, arch, weights)
    if config.sliding_window is not None:
        print(f"note: llama.cpp's {arch.name} architecture has no sliding window: the exported model attends to "
              f"the whole context, so it matches ours for the first {config.sliding_window} tokens",
              file=sys.stderr)

    def metadata(w) -> None:
        c = config
        w.add_type("model")
        w.add_name(c.name or "lora_lab model")
        w.add_context_length(c.block_size)
        w.add_embedding_length(c.n_embd)
        w.add_block_count(c.n_layer)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.n_head)
        w.add_head_count_kv(c.n_query_groups)
        if c.head_size != c.n_embd // c.n_head:
            w.add_key_length(c.head_size)
            w.add_value_length(c.head_size)
        w.add_rope_dimension_count(c.rope_n_elem)
        w.add_rope_freq_base(c.rope_base)
        if arch.layer_norm:
            w.add_layer_norm_eps(c.norm_eps)
        else:
            w.add_layer_norm_rms_eps(c.norm_eps)
        if arch.name == "gptneox":
            w.add_parallel_residual(c.parallel_residual)
        if c.rope_scaling is not None:
            w.add_uint32(f"{arch.name}.rope.scaling.original_context_length",
                         int(c.rope_scaling["original_max_seq_len"]))
        w.add_file_type(gguf.LlamaFileType[FILE_TYPES[outtype]])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model(vocab["model"])
        w.add_tokenizer_pre(vocab["pre"])
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        if vocab["scores"] is not None:
            w.add_token_scores(vocab["scores"])
        if vocab["merges"] is not None:
            w.add_token_merges(vocab["merges"])
        for key, setter in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                            ("pad", w.add_pad_token_id)):
            if vocab[key] is not None:
                setter(vocab[key])
        w.add_add_bos_token(bool(vocab["add_bos"]))
        w.add_add_eos_token(bool(vocab["add_eos"]))
        if vocab["add_space_prefix"] is not None:
            w.add_add_space_prefix(vocab["add_space_prefix"])
        if template:
            w.add_chat_template(template)

    tensors = []
    for p in plans:
        qtype = tensor_type(p, outtype)
        tensors.append((p.name, p.shape, qtype, lambda p=p, qtype=qtype: encode(p.load(), qtype)))
    size = _write(out_file, arch.name, metadata, tensors, f"writing {Path(out_file).name}", progress)
    return {"arch": arch.name, "outtype": outtype, "bytes": size, "tensors": len(tensors)}


def export_gguf(checkpoint_dir: PathLike, out_file: PathLike, outtype: str = "f16", progress: bool = True) -> str:
    """`python -m lora_lab.convert --to gguf`: a checkpoint folder -> one GGUF file; returns a summary line."""
    checkpoint_dir, out_file = Path(checkpoint_dir), Path(out_file)
    config = load_config(checkpoint_dir)
    if out_file.is_dir():
        raise LoraLabError(f"{out_file} is a folder: give the GGUF file to write, e.g. {out_file / 'model.gguf'}")
    s = write_gguf_model(config, checkpoint_dir / WEIGHTS_FILE, out_file, checkpoint_dir, outtype, progress)
    return (f"Exported {checkpoint_dir} to {out_file}: llama.cpp {s['arch']}, {s['outtype']}, "
            f"{s['bytes'] / 2**20:.1f} MiB")


# ------------------------------------------------------------------------------------------------------------
# LoRA adapter files
# ------------------------------------------------------------------------------------------------------------
def gguf_adapter_tensors(lora_config, adapter: dict[str, torch.Tensor], config: Config,
                         arch: Arch) -> tuple[float, list[tuple[str, torch.Tensor]]]:
    """(adapter.lora.alpha, [(GGUF name, tensor)]) of a LoRA adapter for llama.cpp (see the module docstring)."""
    if lora_config.use_dora:
        raise LoraLabError("DoRA adapters cannot be applied by llama.cpp (its LoRA adds s·B A; DoRA also rescales "
                           "every row): merge it instead, `python -m lora_lab.merge_lora --adapter_dir DIR --to gguf "
                           "--out_dir merged.gguf`")
    if "lm_head" in lora_config.targets and config.tie_embeddings:
        raise LoraLabError("a LoRA on a tied lm_head has no separate output.weight to apply to in llama.cpp: merge "
                           "it instead, `python -m lora_lab.merge_lora --adapter_dir DIR --to gguf --out_dir "
                           "merged.gguf`")
    r = lora_config.r
    alpha = lora_config.alpha * math.sqrt(r) if lora_config.use_rslora else lora_config.alpha  # alpha'/r = scaling
    modules = sorted({k.rsplit(".", 1)[0] for k in adapter}, key=_module_order)
    out: list[tuple[str, torch.Tensor]] = []
    fused: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for module in modules:
        A, B = adapter[f"{module}.lora_A"].float(), adapter[f"{module}.lora_B"].float()  # (r, in), (out, r)
        last = module.rsplit(".", 1)[-1]
        name = gguf_module_name(module, config, arch)
        if arch.fused_qkv and last in QKV:
            fused.setdefault(name, {})[last] = (A, B)
            continue
        if arch.permute_qk and last in ("q_proj", "k_proj"):
            B = halves_to_interleaved(B, config.n_head if last == "q_proj" else config.n_query_groups)
        out += [(f"{name}.weight.lora_a", A), (f"{name}.weight.lora_b", B)]
    hs = config.head_size
    rows = {"q_proj": config.n_head * hs, "k_proj": config.n_query_groups * hs, "v_proj": config.n_query_groups * hs}
    for name, parts in fused.items():
        k = len(parts)
        A = torch.cat([parts[p][0] for p in QKV if p in parts])  # (k r, in)
        B = torch.zeros(sum(rows.values()), k * r)  # (out_q + out_k + out_v, k r)
        row, col = 0, 0
        for p in QKV:
            if p in parts:
                B[row:row + rows[p], col:col + r] = parts[p][1] * k  # llama.cpp scales by alpha' / (k r)
                col += r
            row += rows[p]
        out += [(f"{name}.weight.lora_a", A), (f"{name}.weight.lora_b", B)]
    return alpha, out


def _module_order(module: str) -> tuple:
    parts = module.split(".")
    return (int(parts[1]), ".".join(parts[2:])) if parts[0] == "blocks" else (10**9, module)


def write_gguf_adapter(adapter_dir: PathLike, out_file: PathLike, checkpoint_dir: Optional[PathLike] = None,
                       progress: bool = True) -> dict:
    """A lora_lab LoRA adapter directory -> llama.cpp's LoRA GGUF; returns a summary dict."""
    adapter_dir = Path(adapter_dir)
    if adapter_kind(adapter_dir) == "adapter":
        raise LoraLabError(f"{adapter_dir} is a LLaMA-Adapter: llama.cpp cannot apply its gated prefix attention "
                           f"and it does not merge into plain weights; export a LoRA adapter or a full fine-tune")
    lora_config, adapter = load_lora(adapter_dir)
    if checkpoint_dir is not None:
        config = load_config(checkpoint_dir)
        check_adapter_fits(lora_config, config, adapter_dir, checkpoint_dir)
    elif lora_config.base_config:
        config = Config.from_dict(lora_config.base_config)
    else:
        config = load_config(base_checkpoint_dir(lora_config, None, adapter_dir))
    arch = gguf_architecture(config)
    try:
        alpha, tensors = gguf_adapter_tensors(lora_config, adapter, config, arch)
    except LoraLabError as e:
        raise LoraLabError(f"{adapter_dir}: {e}") from None
    from gguf import GGMLQuantizationType as Q

    def metadata(w) -> None:
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(alpha))
        w.add_name(f"{config.name or 'lora_lab'} LoRA r={lora_config.r}")

    size = _write(out_file, arch.name, metadata,
                  [(n, tuple(t.shape), Q.F32, lambda t=t: t.contiguous().numpy()) for n, t in tensors],
                  f"writing {Path(out_file).name}", progress)
    return {"arch": arch.name, "alpha": alpha, "r": lora_config.r, "bytes": size, "tensors": len(tensors),
            "prompt_style": lora_config.prompt_style, "base_model": lora_config.base_model,
            "qlora": bool(lora_config.base_quantization)}


def modelfile(base_gguf: str, adapter_gguf: Optional[str], prompt_style: str, system: Optional[str] = None) -> str:
    """An Ollama Modelfile: FROM the base GGUF, ADAPTER the LoRA GGUF, the prompt style's TEMPLATE and stops."""
    style = prompt_styles.get(prompt_style)
    lines = [f"FROM {base_gguf}"]
    if adapter_gguf:
        lines.append(f"ADAPTER {adapter_gguf}")
    lines.append(f'TEMPLATE """{OLLAMA.get(prompt_style, OLLAMA["plain"])}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for stop in getattr(style, "stop_token_names", ()) if style else ():
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"


def main(adapter_dir: Path, out_file: Path, checkpoint_dir: Optional[Path] = None,
         base_gguf: Optional[str] = None) -> None:
    """Write a LoRA adapter as llama.cpp's LoRA GGUF, and an Ollama Modelfile next to it.

    Args:
        adapter_dir: the output directory of a LoRA fine-tuning run (lora.safetensors + lora_config.json).
        out_file: the adapter GGUF to write (e.g. adapter.gguf).
        checkpoint_dir: the base checkpoint; default: the base model recorded in lora_config.json.
        base_gguf: the base model's GGUF for the Modelfile's FROM line (default: base.gguf next to out_file;
            make it with `python -m lora_lab.convert --to gguf BASE_CHECKPOINT base.gguf`).
    """
    s = write_gguf_adapter(adapter_dir, out_file, checkpoint_dir)
    base = base_gguf or "./base.gguf"
    text = modelfile(base, f"./{Path(out_file).name}", s["prompt_style"])
    if base_gguf is None:
        text = (f"# FROM: the base model as GGUF, e.g. `python -m lora_lab.convert --to gguf "
                f"{s['base_model'] or 'BASE_CHECKPOINT'} base.gguf` next to this file\n") + text
    atomic_write_text(Path(out_file).parent / "Modelfile", text)
    note = (" (QLoRA: trained on the NF4-quantized base; applied to a 16-bit base it gives close, not identical, "
            "outputs; merge_lora --to gguf merges into the dequantized base exactly)") if s["qlora"] else ""
    print(f"Wrote {out_file}: llama.cpp LoRA for {s['arch']}, r={s['r']}, alpha {s['alpha']:g}, {s['tensors']} "
          f"tensors, {s['bytes'] / 2**20:.1f} MiB, and {Path(out_file).parent / 'Modelfile'}{note}", file=sys.stderr)


if __name__ == "__main__":
    from lora_lab.utils import cli

    cli(main)
