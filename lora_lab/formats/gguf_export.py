"""Export to llama.cpp: a lora_lab checkpoint as one GGUF model file.

    python -m lora_lab.convert --to gguf CHECKPOINT_DIR model.gguf [--outtype f32|f16|bf16|q8_0|q4_0]
    python -m lora_lab.merge_lora --adapter_dir out/finetune/lora --to gguf --out_dir merged.gguf   # merge + export
    llama-cli -m model.gguf

(A LoRA adapter as a GGUF adapter file + an Ollama Modelfile: lora_lab/formats/gguf_adapter.py.)

A GGUF file is key/value metadata (`llama.block_count`, `tokenizer.ggml.tokens`, `tokenizer.chat_template`, ...)
and named tensors (`token_embd.weight`, `blk.0.attn_q.weight`, ...) in a ggml type. GGUF lists a tensor's dims
innermost first, so a PyTorch (out, in) weight is written as it is and llama.cpp reads it as ne = [in, out].
This file is the inverse of lora_lab/formats/gguf_import.py. The names, the architecture a Config maps to and the
layouts llama.cpp wants (Q/K rows interleaved for llama and smollm3, Gemma's 1 + w norms, fused attn_qkv for
GPT-NeoX, Falcon and Phi-3, Phi-3's fused [gate; up], Qwen3-MoE's experts stacked per layer, Falcon-40B's norms)
are lora_lab/formats/gguf_names.py's; Llama 3.1 RoPE scaling adds the `rope_freqs` tensor, the factor each
frequency's wavelength is multiplied by, and Phi-3's LongRoPE the `rope_factors_short` / `rope_factors_long`
divisors. Per-architecture keys: soft-caps and window (gemma2), window and linear RoPE scaling (gemma3), LongRoPE's
attention factor and original context (phi3), expert counts and width (qwen3moe).

Weight types (--outtype): norms, biases, RoPE factors and the MoE router stay F32 (as in llama.cpp's converter);
matrices (and stacked experts) are
F32, F16, BF16 or, block-quantized in numpy by `gguf.quants`, Q8_0 (32 int8 + one f16 scale per block) or
Q4_0 (32 4-bit + one scale). With q4_0 the embedding and output matrices are Q8_0 (they suffer most from 4 bits,
which is why llama-quantize keeps them wider too). A matrix whose rows are not a multiple of 32 falls back to F16.

Checked against llama.cpp itself (llama-cpp-python) in tests/test_export_gguf.py: logits, greedy tokens and
token ids for a tiny model of each family and for SmolLM2-135M-Instruct; our own importer reads every file back
to the same weights (F32 exactly).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import numpy as np
import torch

from lora_lab.checkpoint import WEIGHTS_FILE, load_config
from lora_lab.config import Config
from lora_lab.formats.gguf_names import (GATE_UP, LLAMA3_SPLIT, QKV, QWEN2_SPLIT, Arch, gguf_architecture,
                                         gguf_module_name, halves_to_interleaved)
from lora_lab.formats.sp_vocab import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, is_byte_piece
from lora_lab.model import llama3_scale
from lora_lab.progress import progress as show_progress
from lora_lab.prompts import chat_template, prompt_style_from_chat_template, prompt_styles
from lora_lab.utils import LoraLabError, PathLike, atomic_path

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
QUANT_BLOCK = 32  # Q8_0 and Q4_0 quantize blocks of 32 values along a row


# ------------------------------------------------------------------------------------------------------------
# Tensors: names (gguf_names.py) and llama.cpp's layouts
# ------------------------------------------------------------------------------------------------------------
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
        parent = module.rsplit(".", 1)[0]
        # several of our tensors in one of llama.cpp's: [Q; K; V] rows, Phi-3's [gate; up] rows, or a layer's experts
        # stacked along a new first dim (expert e at index e)
        parts = None
        if arch.fused_qkv and last in QKV:
            parts, stack = [f"{parent}.{p}.{suffix}" for p in QKV], False
        elif arch.fused_gate_up and last in GATE_UP and ".experts." not in module:
            parts, stack = [f"{parent}.{p}.{suffix}" for p in GATE_UP], False
        elif ".mlp.experts." in module:
            block = module.split(".mlp.experts.")[0]
            parts, stack = [f"{block}.mlp.experts.{e}.{last}.{suffix}" for e in range(config.n_expert)], True
        if parts is not None:
            if gname in fused_done:
                continue
            fused_done.add(gname)
            first = weights.shape(parts[0])
            shape = (len(parts), *first) if stack else (sum(weights.shape(p)[0] for p in parts), *first[1:])
            join = torch.stack if stack else torch.cat
            plans.append(TensorPlan(gname, shape, lambda parts=parts, join=join: join([weights.load(p) for p in parts]),
                                    len(shape) >= 2))
            continue

        def load(name=name, last=last) -> torch.Tensor:
            w = weights.load(name)
            if arch.permute_qk and last in ("q_proj", "k_proj"):
                w = halves_to_interleaved(w, config.n_head if last == "q_proj" else config.n_query_groups)
            if arch.norm_plus_one and "norm" in last:
                w = w + 1  # llama.cpp stores Gemma's (1 + weight)
            return w

        shape = tuple(weights.shape(name))
        # the router stays F32 (as in llama.cpp's converter): a rounding there changes which experts are chosen
        plans.append(TensorPlan(gname, shape, load, len(shape) == 2 and last != "router"))
    if config.tie_embeddings and arch.output_required:  # a file of its own for the shared matrix
        plans.append(TensorPlan("output.weight", tuple(weights.shape("wte.weight")),
                                lambda: weights.load("wte.weight"), True))
    if arch.output_bias_required and "lm_head.bias" not in weights.keys():
        plans.append(TensorPlan("output.bias", (config.vocab_size,), lambda: torch.zeros(config.vocab_size), False))
    rope_type = (config.rope_scaling or {}).get("rope_type")
    if rope_type == "longrope":  # Phi-3 / 4: the divisors of each frequency, below and beyond the original context
        for which in ("long", "short"):
            factors = torch.tensor(config.rope_scaling[f"{which}_factor"], dtype=torch.float32)
            plans.append(TensorPlan(f"rope_factors_{which}.weight", tuple(factors.shape), lambda f=factors: f, False))
    if config.rope_scaling is not None and rope_type is None:  # Llama 3.1: per-frequency wavelength factors
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


def write_gguf_file(out_file: PathLike, arch_name: str, add_metadata: Callable, tensors: list[tuple[str, tuple, object,
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
        for _, _, _, make in (show_progress(tensors, desc=what, unit="tensor") if progress else tensors):
            writer.write_tensor_data(make())
        writer.close()
    return out_file.stat().st_size


# ------------------------------------------------------------------------------------------------------------
# Tokenizer and chat template
# ------------------------------------------------------------------------------------------------------------
def _pre_tokenizer_name(pre: Optional[dict], path: Path) -> str:
    """The name llama.cpp gives (tokenizer.ggml.pre) to a tokenizer.json byte-level pre-tokenizer."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre or {}]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # GPT-2, GPT-NeoX / Pythia, Phi-2 (CodeGen)
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == LLAMA3_SPLIT:
            return "llama-bpe"
        if regex == QWEN2_SPLIT:
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


def gguf_chat_template(checkpoint_dir: PathLike, prompt_style: str) -> Optional[str]:
    """The checkpoint's own chat template when it is the model's prompt style, else ours for that style
    (a merged adapter fine-tuned in Alpaca style on a ChatML base chats in Alpaca style); None for plain."""
    template = chat_template(checkpoint_dir)
    if template and prompt_style_from_chat_template(template) == prompt_style:
        return template
    return prompt_styles[prompt_style].jinja if prompt_style in prompt_styles else None


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
    if (config.rope_scaling or {}).get("rope_type") == "longrope":
        print(f"note: llama.cpp takes LongRoPE's long factors when its context (n_ctx) exceeds "
              f"{config.rope_scaling['original_max_seq_len']} tokens, we (as transformers) when the sequence does: "
              f"run it with n_ctx <= {config.rope_scaling['original_max_seq_len']} for short prompts' exact outputs",
              file=sys.stderr)
    if config.sliding_window is not None and arch.name not in ("gemma2", "gemma3", "olmo2"):
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
        scaling, rope_type = c.rope_scaling or {}, (c.rope_scaling or {}).get("rope_type")
        if c.rope_scaling is not None and rope_type in (None, "longrope"):
            w.add_rope_scaling_orig_ctx_len(int(scaling["original_max_seq_len"]))
        if rope_type == "longrope":  # the long / short factors are tensors; cos and sin are scaled by this
            w.add_rope_scaling_attn_factors(float(scaling["attention_factor"]))
        if rope_type == "linear":  # Gemma 3's global layers
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(scaling["factor"]))
        if rope_type == "yarn":  # Qwen3's long context, OLMo 3's global layers
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(scaling["factor"]))
            w.add_rope_scaling_orig_ctx_len(int(scaling["original_max_seq_len"]))
            w.add_rope_scaling_yarn_attn_factor(float(scaling["attention_factor"]))
            w.add_rope_scaling_yarn_beta_fast(float(scaling.get("beta_fast", 32.0)))
            w.add_rope_scaling_yarn_beta_slow(float(scaling.get("beta_slow", 1.0)))
        if arch.name in ("gemma2", "gemma3", "phi3"):  # phi3: 0 is "none" (llama.cpp ignores Phi's window anyway)
            w.add_sliding_window(c.sliding_window or 0)
        if arch.name == "olmo2" and c.sliding_window is not None:  # OLMo 3: which layers slide
            w.add_sliding_window(c.sliding_window)
            w.add_sliding_window_pattern([c.window_at(i) is not None for i in range(c.n_layer)])
        if arch.name == "gemma2":
            w.add_attn_logit_softcapping(float(c.attn_softcap))
            w.add_final_logit_softcapping(float(c.final_softcap))
        if c.n_expert:
            w.add_expert_count(c.n_expert)
            w.add_expert_used_count(c.n_expert_per_token)
            w.add_expert_feed_forward_length(c.moe_intermediate_size)
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
    size = write_gguf_file(out_file, arch.name, metadata, tensors, f"writing {Path(out_file).name}", progress)
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
