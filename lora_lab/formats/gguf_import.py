"""Import a llama.cpp GGUF file: metadata -> Config, quantized tensors -> float weights, vocab -> tokenizer.

A GGUF file holds key/value metadata (`llama.block_count`, `tokenizer.ggml.tokens`, ...) and named tensors
(`token_embd.weight`, `blk.0.attn_q.weight`, ...), each in a ggml type: plain floats or block-quantized
(Q8_0, Q4_0, Q4_K, ...). The `gguf` package reads the file and dequantizes the blocks; we map the names to ours.

What llama.cpp changes on the way in that we undo (the names and layouts: lora_lab/formats/gguf_names.py):
  - For the llama architecture, its converter reorders the rows of Q and K of each head from Hugging Face's
    rotate-half RoPE layout to llama.cpp's interleaved-pairs layout: `interleaved_to_halves` (gguf_names.py)
    is its exact inverse.
  - Gemma's RMSNorm scales by (1 + weight); llama.cpp stores 1 + weight. We store the weight.
  - GPT-NeoX, Falcon and Phi-3 (and Phi-2, optionally) fuse q, k and v into one attn_qkv matrix, [Q; K; V] rows; we
    split it, and Phi-3's ffn_up [gate; up] too. Falcon-40B's attn_norm is the MLP's norm and attn_norm_2 the
    attention's. Qwen3-MoE's experts are stacked per layer (ffn_*_exps): expert e is index e.
  - What llama.cpp fixes rather than stores (Gemma 2 / 3 window patterns and query scale, Gemma 3's local RoPE base,
    SmolLM3's RoPE-less 4th layers) is set in the Config as llama.cpp computes it.

Dequantized weights are what llama.cpp computes with, so the converted model matches the GGUF model, not the
original unquantized checkpoint.

    python -m lora_lab.formats.gguf_import --gguf_path SmolLM2-135M-Instruct.Q4_1.gguf --out_dir out/smollm2-gguf
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from lora_lab.checkpoint import copy_tokenizer_files, save_checkpoint
from lora_lab.config import Config
from lora_lab.formats.gguf_names import ARCHS, LLAMA3_SPLIT, QWEN2_SPLIT, gguf_name_to_ours, interleaved_to_halves
from lora_lab.formats.llama2c import as_dtype
from lora_lab.model import llama3_scale
from lora_lab.progress import progress
from lora_lab.formats.sp_vocab import CONTROL, NORMAL, USER_DEFINED, build_sentencepiece_bpe, write_tokenizer_files
from lora_lab.prompts import prompt_style_from_chat_template
from lora_lab.utils import LoraLabError, atomic_write_text

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SUPPORTED_ARCHS = tuple(ARCHS)
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")  # read into the Config


class _Meta:
    """Typed access to a GGUF file's metadata, with one-line errors naming the file and the key."""

    def __init__(self, reader, path: Path) -> None:
        self.reader, self.path = reader, path

    def __contains__(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def need(self, key: str) -> Any:
        if key not in self.reader.fields:
            raise LoraLabError(f"{self.path}: the GGUF metadata has no {key}; the file is incomplete or was written "
                               f"by an unsupported converter")
        return self.get(key)

    def one(self, key: str, default: Any = None) -> Any:
        """A number that some files store per layer (head counts, MLP width): all layers must agree.
        Without a default the key must be present."""
        value = self.need(key) if default is None else self.get(key, default)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise LoraLabError(f"{self.path}: {key} differs between layers ({sorted(set(value))}); models with "
                                   f"per-layer sizes are not supported")
            value = value[0]
        return value


def open_gguf(path: Union[str, Path]):
    """A GGUFReader for `path`, or a one-line error for a missing, foreign or truncated file."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise LoraLabError(f"GGUF file {path} does not exist")
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, OSError, UnicodeDecodeError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise LoraLabError(f"{path} is not a readable GGUF file, or it is truncated ({msg}): "
                           f"download it again") from None
    # the reader maps the file lazily: a file cut inside the tensor data may still parse, so check the sizes
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise LoraLabError(f"{path} is truncated: tensor {t.name} needs bytes up to {t.data_offset + t.n_bytes} "
                               f"but the file has {size}; download it again")
    return reader


def check_type(tensor, path: Path) -> None:
    if tensor.tensor_type.name not in SUPPORTED_TYPES:
        raise LoraLabError(f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which we cannot "
                           f"dequantize (supported: {', '.join(SUPPORTED_TYPES)}); use a GGUF file with those types")


def dequantize(tensor, path: Path) -> torch.Tensor:
    """One GGUF tensor as float32, shaped as PyTorch expects (GGUF lists dims innermost first)."""
    from gguf.quants import dequantize as gguf_dequantize

    check_type(tensor, path)
    values = np.array(gguf_dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)  # copy out of the mmap
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return torch.from_numpy(values).reshape(shape)


def config_from_gguf(meta: _Meta, tensors: dict, path: Path) -> Config:
    arch = meta.need("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise LoraLabError(f"{path}: GGUF architecture {arch!r} is not supported (supported: "
                           f"{', '.join(SUPPORTED_ARCHS)}); convert the original Hugging Face checkpoint with "
                           f"`python -m lora_lab.convert` instead")
    if "token_embd.weight" not in tensors:
        raise LoraLabError(f"{path} has no token_embd.weight tensor; is it a model (not a LoRA adapter) GGUF file?")
    n_embd = meta.need(f"{arch}.embedding_length")
    n_head = meta.one(f"{arch}.attention.head_count")
    head_size = meta.get(f"{arch}.attention.key_length", n_embd // n_head)
    rope_dim = meta.get(f"{arch}.rope.dimension_count", head_size)
    vocab_size = int(tensors["token_embd.weight"].shape[1])  # GGUF shape is (n_embd, vocab)
    kw: dict[str, Any] = dict(
        name=model_name_of(path), block_size=meta.need(f"{arch}.context_length"), vocab_size=vocab_size,
        n_layer=meta.need(f"{arch}.block_count"), n_embd=n_embd, n_head=n_head, head_size=head_size,
        n_query_groups=meta.one(f"{arch}.attention.head_count_kv", n_head),
        intermediate_size=meta.one(f"{arch}.feed_forward_length"), rotary_percentage=rope_dim / head_size,
        rope_base=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        norm_class="RMSNorm", norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        mlp_class="swiglu", tie_embeddings="output.weight" not in tensors,
        attn_qkv_bias="blk.0.attn_q.bias" in tensors, bias="blk.0.attn_output.bias" in tensors,
        sliding_window=meta.get(f"{arch}.attention.sliding_window"),
    )
    if arch == "gemma":
        kw.update(norm_unit_offset=True, mlp_class="geglu", gelu_approximate="tanh", scale_embeddings=True)
    if arch in ("qwen3", "qwen3moe"):
        kw.update(qk_norm="head")
    n_layer = kw["n_layer"]
    if arch == "qwen3moe":
        kw.update(n_expert=meta.need(f"{arch}.expert_count"), n_expert_per_token=meta.need(f"{arch}.expert_used_count"),
                  moe_intermediate_size=meta.need(f"{arch}.expert_feed_forward_length"), norm_topk_prob=True)
    if arch in ("gemma2", "gemma3"):  # the per-layer patterns and query scale llama.cpp fixes (gguf_names.py)
        step, big = (2, 46) if arch == "gemma2" else (6, 62)
        kw.update(norm_unit_offset=True, mlp_class="geglu", gelu_approximate="tanh", scale_embeddings=True,
                  post_norms=True, global_layers=[i for i in range(n_layer) if (i + 1) % step == 0],
                  attn_scale_base=float(n_embd / n_head if n_layer == big else head_size))
        if arch == "gemma2":
            kw.update(attn_softcap=float(meta.need(f"{arch}.attn_logit_softcapping")),
                      final_softcap=float(meta.need(f"{arch}.final_logit_softcapping")))
        else:
            kw.update(qk_norm="head", rope_local_base=10000.0)
    if arch == "olmo2":
        kw.update(pre_norms=False, post_norms=True, qk_norm="all")
        pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
        if kw["sliding_window"] and isinstance(pattern, list):  # OLMo 3: these slide, with the base unscaled
            kw.update(global_layers=[i for i, slides in enumerate(pattern) if not slides],
                      rope_local_base=kw["rope_base"])
    if arch == "smollm3":
        kw.update(nope_layers=[i for i in range(n_layer) if (i + 1) % 4 == 0])
    if arch == "phi3":
        kw.update(sliding_window=kw["sliding_window"] or None)  # 0: none
    if ARCHS[arch].layer_norm:
        kw.update(norm_class="LayerNorm", norm_eps=float(meta.need(f"{arch}.attention.layer_norm_epsilon")),
                  mlp_class="gelu", parallel_residual=True, attn_qkv_bias=None,
                  bias="blk.0.attn_output.bias" in tensors, lm_head_bias="output.bias" in tensors)
        if arch == "phi2":
            kw.update(shared_attention_norm=True, gelu_approximate="tanh")
        elif arch == "gptneox":
            kw.update(parallel_residual=bool(meta.get(f"{arch}.use_parallel_residual", True)))
        else:
            kw.update(shared_attention_norm="blk.0.attn_norm_2.weight" not in tensors)
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling == "linear" and arch == "gemma3":  # the global layers' positions / factor
        kw["rope_scaling"] = dict(rope_type="linear", factor=float(meta.need(f"{arch}.rope.scaling.factor")))
    elif scaling == "yarn" and arch in ("qwen3", "olmo2"):  # Qwen3's long context, OLMo 3
        key = f"{arch}.rope.scaling"
        kw["rope_scaling"] = dict(
            rope_type="yarn", factor=float(meta.need(f"{key}.factor")),
            original_max_seq_len=int(meta.need(f"{key}.original_context_length")),
            beta_fast=float(meta.get(f"{key}.yarn_beta_fast", 32.0)), beta_slow=float(meta.get(f"{key}.yarn_beta_slow", 1.0)),
            truncate=True, attention_factor=float(meta.get(f"{key}.yarn_attn_factor", 1.0)))
    elif scaling not in (None, "none"):
        raise LoraLabError(f"{path}: RoPE scaling {scaling!r} is not supported (only Llama 3's, stored as the "
                           f"rope_freqs tensor, LongRoPE's factor tensors, Gemma 3's linear and Qwen3 / OLMo 3's "
                           f"YaRN)")
    if "rope_factors_long.weight" in tensors:  # Phi-3 / 4's LongRoPE
        kw["rope_scaling"] = dict(
            rope_type="longrope", short_factor=dequantize(tensors["rope_factors_short.weight"], path).tolist(),
            long_factor=dequantize(tensors["rope_factors_long.weight"], path).tolist(),
            original_max_seq_len=int(meta.need(f"{arch}.rope.scaling.original_context_length")),
            attention_factor=float(meta.get(f"{arch}.rope.scaling.attn_factor", 1.0)))
    if "rope_freqs.weight" in tensors:
        kw["rope_scaling"] = llama3_scaling_from_factors(
            dequantize(tensors["rope_freqs.weight"], path), kw["rope_base"], int(rope_dim),
            meta.get(f"{arch}.rope.scaling.original_context_length"), path)
    file_type = meta.get("general.file_type")
    kw["extra"] = {"source": "gguf", "gguf_file": path.name, "gguf_architecture": arch,
                   "gguf_file_type": _file_type_name(file_type)}
    config = Config(**kw)
    config.hf_repo = config.known_hf_repo()  # SmolLM2-135M-Instruct.Q4_1.gguf is HuggingFaceTB/SmolLM2-135M-Instruct
    return config


# a quantization / precision suffix of a GGUF file name: SmolLM2-135M-Instruct.Q4_1, llama-2-7b.Q4_K_M, x-f16
_QUANT_SUFFIX = re.compile(r"[._-](?:I?Q\d\w*|[BF]F?16|F32|FP16|FP32)$", re.IGNORECASE)


def model_name_of(path: Path) -> str:
    """The model's name from its GGUF file's name, without the quantization suffix: a model is served and exported
    under its own name whatever file it came from."""
    return _QUANT_SUFFIX.sub("", path.stem) or path.stem


def _file_type_name(file_type: Optional[int]) -> Optional[str]:
    if file_type is None:
        return None
    from gguf import LlamaFileType

    try:
        return LlamaFileType(file_type).name
    except ValueError:
        return str(file_type)


def llama3_scaling_from_factors(factors: torch.Tensor, base: float, rope_dim: int, original_max_seq_len: Optional[int],
                                path: Path) -> Optional[dict]:
    """Recover Llama 3.1's rope_scaling dict from llama.cpp's `rope_freqs` tensor.

    llama.cpp stores, per frequency, the factor its wavelength is multiplied by: 1 for fast frequencies,
    `factor` for slow ones, 1 / ((1 - s) / factor + s) between, where s = (orig / wavelen - low) / (high - low)
    is linear in 1 / wavelen. Fitting that line gives low and high for the original context length."""
    factors = factors.double().flatten()  # (rope_dim/2,)
    inv_freq = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim))  # (rope_dim/2,)
    factor = float(factors.max())
    if factor <= 1 + 1e-6:  # all ones: no scaling
        return None
    orig = int(original_max_seq_len or 8192)
    medium = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
    low_freq_factor, high_freq_factor = 1.0, 4.0  # Llama 3.1's, when no frequency lies between the bands
    if int(medium.sum()) >= 2:
        s = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)  # smooth per medium frequency
        x = orig * inv_freq[medium] / (2 * math.pi)  # orig / wavelen
        slope, intercept = np.polyfit(x.numpy(), s.numpy(), 1)  # s = (x - low) / (high - low)
        low_freq_factor = float(-intercept / slope)
        high_freq_factor = float(low_freq_factor + 1 / slope)
        low_freq_factor, high_freq_factor = round(low_freq_factor, 4), round(high_freq_factor, 4)
    scaling = dict(factor=factor, low_freq_factor=low_freq_factor, high_freq_factor=high_freq_factor,
                   original_max_seq_len=orig)
    scaled = llama3_scale(inv_freq.float(), **scaling).double()
    if not torch.allclose(inv_freq / scaled, factors, rtol=1e-3):
        raise LoraLabError(f"{path}: the rope_freqs tensor is not Llama 3's frequency scaling; this RoPE variant "
                           f"is not supported")
    return scaling


def convert_gguf(gguf_path: Union[str, Path], out_dir: Union[str, Path], tokenizer_dir: Union[str, Path, None] = None,
                 dtype: Union[str, torch.dtype] = torch.float32) -> Config:
    """Convert a GGUF model file into a lora_lab checkpoint in `out_dir`; returns its Config.

    tokenizer_dir: a folder whose tokenizer.json / tokenizer.model (and tokenizer_config.json,
    generation_config.json) to copy; by default the folder of the GGUF file if it has them, else a
    tokenizer.json is built from the vocabulary embedded in the GGUF file."""
    path, out_dir = Path(gguf_path), Path(out_dir)
    dtype = as_dtype(dtype)
    reader = open_gguf(path)
    meta = _Meta(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    config = config_from_gguf(meta, tensors, path)

    # check every name and type before the (slow) dequantization
    for t in reader.tensors:
        if t.name in ROPE_TENSORS:
            continue
        if gguf_name_to_ours(t.name) is None:
            raise LoraLabError(f"{path}: tensor {t.name} has no counterpart in our {config.extra['gguf_architecture']} "
                               f"model; this GGUF variant is not supported")
        check_type(t, path)

    arch = config.extra["gguf_architecture"]
    falcon40b = arch == "falcon" and not config.shared_attention_norm
    state_dict = {}
    for t in progress(reader.tensors, desc=f"Converting {path.name}", unit="tensor"):
        if t.name in ROPE_TENSORS:
            continue
        name = gguf_name_to_ours(t.name)
        if falcon40b and ".norm_1." in name and ".attn_norm." in t.name:
            name = name.replace(".norm_1.", ".norm_2.")  # Falcon-40B: attn_norm feeds the MLP
        w = dequantize(t, path)
        if ".attn.qkv." in name:  # [Q; K; V] rows
            hs = config.head_size
            q, k, v = w.split([config.n_head * hs, config.n_query_groups * hs, config.n_query_groups * hs])
            for part, x in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                state_dict[name.replace(".qkv.", f".{part}.")] = x.clone().to(dtype)
            continue
        if ARCHS[arch].fused_gate_up and ".mlp.up_proj." in name:  # Phi-3's [gate; up] rows
            gate, up = w.chunk(2)
            state_dict[name.replace(".up_proj.", ".gate_proj.")] = gate.clone().to(dtype)
            state_dict[name] = up.clone().to(dtype)
            continue
        if ".mlp.experts." in name:  # (n_expert, out, in): expert e at index e
            block, proj = name.split(".mlp.experts.")
            for e, x in enumerate(w):
                state_dict[f"{block}.mlp.experts.{e}.{proj}"] = x.clone().to(dtype)
            continue
        if ARCHS[arch].permute_qk and (".attn.q_proj." in name or ".attn.k_proj." in name):
            n = config.n_head if ".q_proj." in name else config.n_query_groups
            w = interleaved_to_halves(w, n)  # (n * hs, C) back to rotate-half order
        if ARCHS[arch].norm_plus_one and "norm" in name.rsplit(".", 2)[-2]:
            w = w - 1  # llama.cpp stores Gemma's (1 + weight)
        state_dict[name] = w.to(dtype)

    config.prompt_style = _write_tokenizer(meta, path, out_dir, tokenizer_dir, config)
    save_checkpoint(out_dir, config, state_dict)
    return config


# ------------------------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------------------------
def _tokenizer_source(path: Path, tokenizer_dir) -> Optional[Path]:
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        if not ((tokenizer_dir / "tokenizer.json").is_file() or (tokenizer_dir / "tokenizer.model").is_file()):
            raise LoraLabError(f"{tokenizer_dir} has no tokenizer.json or tokenizer.model: pass the folder of the "
                               f"model's Hugging Face tokenizer, or leave tokenizer_dir out to use the GGUF's own")
        return tokenizer_dir
    here = path.parent
    if (here / "tokenizer.json").is_file() or (here / "tokenizer.model").is_file():
        return here
    return None


def _write_tokenizer(meta: _Meta, path: Path, out_dir: Path, tokenizer_dir, config: Config) -> str:
    """Copy or build the tokenizer files into out_dir; returns the prompt style."""
    out_dir.mkdir(parents=True, exist_ok=True)
    source = _tokenizer_source(path, tokenizer_dir)
    template = meta.get("tokenizer.chat_template")
    if source is None:
        if "tokenizer.ggml.tokens" not in meta:
            warnings.warn(f"{path} has no embedded vocabulary and no tokenizer files next to it: {out_dir} has no "
                          f"tokenizer; convert again with tokenizer_dir=FOLDER")
            return prompt_style_from_chat_template(template)
        write_gguf_tokenizer(meta, path, out_dir, config.block_size)
        return prompt_style_from_chat_template(template)
    copied = copy_tokenizer_files(source, out_dir)
    bos, eos, add_bos = _special_tokens(meta)
    if "tokenizer_config.json" not in copied:  # take the special tokens from the GGUF metadata
        tokens = meta.get("tokenizer.ggml.tokens") or []
        tok_config = {"bos_token": tokens[bos] if bos is not None and bos < len(tokens) else None,
                      "eos_token": tokens[eos] if eos is not None and eos < len(tokens) else None,
                      "add_bos_token": add_bos}
        if template:
            tok_config["chat_template"] = template
        atomic_write_text(out_dir / "tokenizer_config.json",
                          json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    else:
        template = json.loads((out_dir / "tokenizer_config.json").read_text()).get("chat_template") or template
    if "generation_config.json" not in copied:
        atomic_write_text(out_dir / "generation_config.json",
                          json.dumps({"bos_token_id": bos, "eos_token_id": eos}, indent=2) + "\n")
    return prompt_style_from_chat_template(template if isinstance(template, str) else None)


def _special_tokens(meta: _Meta) -> tuple[Optional[int], Optional[int], bool]:
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    # SentencePiece vocabularies (Llama 2, Mistral, Gemma) start with BOS; byte-level BPE ones do not by default
    add_bos = meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama")
    return bos, eos, bool(add_bos) and bos is not None


def gguf_tokenizer(meta: _Meta, path: Path):
    """A `tokenizers.Tokenizer` built from the vocabulary embedded in the GGUF file."""
    model = meta.need("tokenizer.ggml.model")
    tokens = meta.need("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    bos, _, add_bos = _special_tokens(meta)
    if model == "llama":  # SentencePiece BPE: pieces + scores
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None:
            raise LoraLabError(f"{path}: the SentencePiece vocabulary has no tokenizer.ggml.scores; pass "
                               f"tokenizer_dir with the model's tokenizer files")
        return build_sentencepiece_bpe(tokens, scores, types, add_bos=add_bos, bos_id=bos, source=str(path),
                                       add_dummy_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
    if model == "gpt2":  # byte-level BPE: tokens + merges
        return _byte_level_bpe(tokens, meta.need("tokenizer.ggml.merges"), types,
                               meta.get("tokenizer.ggml.pre", "default"), bos if add_bos else None, path)
    raise LoraLabError(f"{path}: tokenizer type {model!r} cannot be rebuilt (supported: llama, gpt2); pass "
                       f"tokenizer_dir with the model's tokenizer.json")


def _byte_level_bpe(tokens: list[str], merges: list[str], types: list[int], pre: str, bos_id: Optional[int],
                    path: Path):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("llama-bpe", "llama3", "qwen2", "smaug-bpe"):
        split = QWEN2_SPLIT if pre == "qwen2" else LLAMA3_SPLIT
        pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    elif pre == "smollm":  # every digit alone, then GPT-2's regex
        pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        if pre not in ("default", "gpt2", "gpt-2"):
            warnings.warn(f"{path}: pre-tokenizer {pre!r} is unknown to lora_lab; using GPT-2's. Pass tokenizer_dir "
                          f"with the model's tokenizer.json if the ids must match exactly")
        pre_tok = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(BPE(vocab=vocab, merges=pairs, dropout=None, fuse_unk=False, byte_fallback=False,
                        ignore_merges=pre in ("llama-bpe", "llama3")))
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    if user:
        tok.add_tokens(user)
    if bos_id is not None:
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    return tok


def write_gguf_tokenizer(meta: Union[_Meta, str, Path], path: Optional[Path] = None, out_dir: Union[str, Path] = ".",
                         model_max_length: Optional[int] = None) -> None:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json built from a GGUF's vocabulary.

    meta: a GGUF file path (or the `_Meta` of an open one)."""
    if not isinstance(meta, _Meta):
        path = Path(meta)
        meta = _Meta(open_gguf(path), path)
    tokens = meta.need("tokenizer.ggml.tokens")
    bos, eos, add_bos = _special_tokens(meta)

    def token(key: str) -> Optional[str]:
        i = meta.get(key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    write_tokenizer_files(Path(out_dir), gguf_tokenizer(meta, path), bos_token=token("tokenizer.ggml.bos_token_id"),
                          eos_token=token("tokenizer.ggml.eos_token_id"),
                          unk_token=token("tokenizer.ggml.unknown_token_id"),
                          pad_token=token("tokenizer.ggml.padding_token_id"), add_bos=add_bos, bos_id=bos,
                          eos_ids=[eos] if eos is not None else [], chat_template=meta.get("tokenizer.chat_template"),
                          model_max_length=model_max_length)


def main(gguf_path: Path, out_dir: Path, tokenizer_dir: Optional[Path] = None, dtype: str = "float32") -> None:
    """Convert a llama.cpp GGUF model file into a lora_lab checkpoint.

    Args:
        gguf_path: the .gguf file
        out_dir: where to write the checkpoint
        tokenizer_dir: folder with the model's tokenizer.json / tokenizer.model (default: next to the .gguf,
            else built from the GGUF's vocabulary)
        dtype: float32, bfloat16 or float16
    """
    config = convert_gguf(gguf_path, out_dir, tokenizer_dir, dtype=dtype)
    print(f"Wrote {out_dir} ({config.extra['gguf_architecture']}, {config.n_layer} layers, n_embd {config.n_embd}, "
          f"vocab {config.vocab_size}, prompt style {config.prompt_style})")


if __name__ == "__main__":
    from lora_lab.utils import cli

    cli(main)
