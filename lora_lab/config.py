"""Model hyperparameters: one `Config` dataclass and the named configs of the families we support.

A checkpoint converted by `lora_lab.convert` carries its own `model_config.json`, derived from the source
checkpoint's config (or GGUF / llama2.c header), so any size of a supported family works; the named configs
below are for building models by name (`Config.from_name("SmolLM2-135M-Instruct")`) and for tests.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, Optional


@dataclass
class Config:
    name: str = ""
    hf_repo: str = ""  # "org/name" on the Hugging Face Hub
    block_size: int = 2048  # longest sequence the model was trained for
    vocab_size: int = 32000  # rows of the embedding and of lm_head
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    head_size: Optional[int] = None  # default n_embd // n_head (Gemma: 256 whatever n_embd is)
    n_query_groups: Optional[int] = None  # number of key/value heads: n_head = MHA, 1 = MQA, between = GQA
    intermediate_size: Optional[int] = None  # MLP hidden width, default 4 * n_embd
    # rotary position embedding
    rotary_percentage: float = 1.0  # share of each head's dims that rotate (Pythia 0.25, Phi-2 0.4)
    rope_base: float = 10000.0
    rope_scaling: Optional[dict] = None  # Llama 3.1+: {factor, low_freq_factor, high_freq_factor, original_max_seq_len}
    # block structure
    parallel_residual: bool = False  # x + attn(n1(x)) + mlp(n2(x))  (NeoX, Falcon, Phi)
    shared_attention_norm: bool = False  # with parallel_residual: mlp reads n1(x) too (Falcon-7B, Phi)
    norm_class: Literal["LayerNorm", "RMSNorm"] = "RMSNorm"
    norm_eps: float = 1e-5
    norm_unit_offset: bool = False  # Gemma's RMSNorm scales by (1 + weight)
    mlp_class: Literal["gelu", "swiglu", "geglu"] = "swiglu"
    gelu_approximate: Literal["none", "tanh"] = "none"
    # biases
    bias: bool = False  # on every linear layer of the blocks (NeoX, Phi)
    attn_qkv_bias: Optional[bool] = None  # bias on q/k/v only (Qwen2); default: same as `bias`
    lm_head_bias: bool = False  # Phi
    # embeddings
    tie_embeddings: bool = False  # lm_head shares the embedding matrix
    scale_embeddings: bool = False  # Gemma multiplies embeddings by sqrt(n_embd)
    sliding_window: Optional[int] = None  # Mistral v0.1: attend to the last N positions only
    # what generation and fine-tuning need to know about the model
    prompt_style: str = "plain"
    extra: dict = field(default_factory=dict)  # anything else a converter wants to remember

    def __post_init__(self):
        if self.head_size is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}; set head_size")
            self.head_size = self.n_embd // self.n_head
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.n_head % self.n_query_groups:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_query_groups={self.n_query_groups}")
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        if self.attn_qkv_bias is None:
            self.attn_qkv_bias = self.bias

    @property
    def rope_n_elem(self) -> int:
        """How many dims of each head rotate (always even)."""
        return int(self.rotary_percentage * self.head_size) // 2 * 2

    # ---- named configs -------------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        if name not in name_to_config:
            near = difflib.get_close_matches(name, name_to_config, n=5, cutoff=0.4)
            hint = f" Did you mean: {', '.join(near)}?" if near else ""
            raise ValueError(f"Unknown model name {name!r}.{hint} (all names: lora_lab.config.name_to_config)")
        return replace(cls(**name_to_config[name]), **overrides)

    def known_hf_repo(self) -> str:
        """The Hub id of this model: `hf_repo`, else that of the named config of the same name and shape (a
        checkpoint converted from a GGUF or a local folder called SmolLM2-135M-Instruct is HuggingFaceTB's), else
        "" (unknown)."""
        if self.hf_repo:
            return self.hf_repo
        named = name_to_config.get(self.name, {})
        same = all(named.get(k) == getattr(self, k) for k in ("n_layer", "n_embd", "n_head", "vocab_size"))
        return named.get("hf_repo", "") if named and same else ""

    # ---- (de)serialisation ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Unknown config keys {sorted(unknown)}; this file was not written by this lora_lab version")
        return cls(**d)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_file(cls, path: Path) -> "Config":
        return cls.from_dict(json.loads(Path(path).read_text()))


# ------------------------------------------------------------------------------------------------------------
# Named configs. Numbers are the published config.json values of each model.
# ------------------------------------------------------------------------------------------------------------
configs: list[dict] = []


def _llama(name, hf_repo, **kw):
    base = dict(name=name, hf_repo=hf_repo, norm_class="RMSNorm", mlp_class="swiglu", bias=False)
    base.update(kw)
    configs.append(base)


# Llama 2
for size, (n_embd, n_layer, n_head, n_kv, inter) in {
    "7b": (4096, 32, 32, 32, 11008),
    "13b": (5120, 40, 40, 40, 13824),
    "70b": (8192, 80, 64, 8, 28672),
}.items():
    for chat in ("", "-chat"):
        _llama(f"Llama-2-{size}{chat}-hf", f"meta-llama/Llama-2-{size}{chat}-hf", block_size=4096, vocab_size=32000,
               n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_query_groups=n_kv, intermediate_size=inter,
               norm_eps=1e-5, prompt_style="llama2-chat" if chat else "plain")

# Llama 3, 3.1, 3.2
_llama3_1_scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
_llama3_2_scaling = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
for version, sizes, block, scaling in [
    ("3", {"8B": (4096, 32, 32, 8, 14336, False), "70B": (8192, 80, 64, 8, 28672, False)}, 8192, None),
    ("3.1", {"8B": (4096, 32, 32, 8, 14336, False), "70B": (8192, 80, 64, 8, 28672, False)}, 131072, _llama3_1_scaling),
    ("3.2", {"1B": (2048, 16, 32, 8, 8192, True), "3B": (3072, 28, 24, 8, 8192, True)}, 131072, _llama3_2_scaling),
]:
    for size, (n_embd, n_layer, n_head, n_kv, inter, tied) in sizes.items():
        prefix = "Meta-Llama" if version in ("3", "3.1") else "Llama"
        for instruct in ("", "-Instruct"):
            name = f"{prefix}-{version}-{size}{instruct}"
            _llama(name, f"meta-llama/{name}", block_size=block, vocab_size=128256, n_embd=n_embd, n_layer=n_layer,
                   n_head=n_head, n_query_groups=n_kv, intermediate_size=inter, rope_base=500000.0,
                   rope_scaling=dict(scaling) if scaling else None, tie_embeddings=tied, norm_eps=1e-5,
                   prompt_style="llama3" if instruct else "plain")

# TinyLlama
_llama("TinyLlama-1.1B-intermediate-step-1431k-3T", "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
       block_size=2048, vocab_size=32000, n_embd=2048, n_layer=22, n_head=32, n_query_groups=4,
       intermediate_size=5632, norm_eps=1e-5)
_llama("TinyLlama-1.1B-Chat-v1.0", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", block_size=2048, vocab_size=32000,
       n_embd=2048, n_layer=22, n_head=32, n_query_groups=4, intermediate_size=5632, norm_eps=1e-5,
       prompt_style="zephyr")

# SmolLM2
for size, (n_embd, n_layer, n_head, n_kv, inter, theta) in {
    "135M": (576, 30, 9, 3, 1536, 100000.0),
    "360M": (960, 32, 15, 5, 2560, 100000.0),
    "1.7B": (2048, 24, 32, 32, 8192, 130000.0),
}.items():
    for instruct in ("", "-Instruct"):
        _llama(f"SmolLM2-{size}{instruct}", f"HuggingFaceTB/SmolLM2-{size}{instruct}", block_size=8192,
               vocab_size=49152, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_query_groups=n_kv,
               intermediate_size=inter, rope_base=theta, tie_embeddings=True, norm_eps=1e-5,
               prompt_style="chatml" if instruct else "plain")

# Mistral
_llama("Mistral-7B-v0.1", "mistralai/Mistral-7B-v0.1", block_size=32768, vocab_size=32000, n_embd=4096, n_layer=32,
       n_head=32, n_query_groups=8, intermediate_size=14336, sliding_window=4096, norm_eps=1e-5)
_llama("Mistral-7B-Instruct-v0.1", "mistralai/Mistral-7B-Instruct-v0.1", block_size=32768, vocab_size=32000,
       n_embd=4096, n_layer=32, n_head=32, n_query_groups=8, intermediate_size=14336, sliding_window=4096,
       norm_eps=1e-5, prompt_style="mistral")
for instruct in ("", "-Instruct"):
    _llama(f"Mistral-7B{instruct}-v0.3", f"mistralai/Mistral-7B{instruct}-v0.3", block_size=32768, vocab_size=32768,
           n_embd=4096, n_layer=32, n_head=32, n_query_groups=8, intermediate_size=14336, rope_base=1000000.0,
           norm_eps=1e-5, prompt_style="mistral" if instruct else "plain")

# Falcon: parallel attention + MLP; 7B shares one LayerNorm and uses multi-query attention, 40B has two norms and 8 KV heads
configs.append(dict(name="falcon-7b", hf_repo="tiiuae/falcon-7b", block_size=2048, vocab_size=65024, n_embd=4544,
                    n_layer=32, n_head=71, head_size=64, n_query_groups=1, intermediate_size=4 * 4544,
                    parallel_residual=True, shared_attention_norm=True, norm_class="LayerNorm", mlp_class="gelu",
                    bias=False, tie_embeddings=True))
configs.append(dict(name="falcon-40b", hf_repo="tiiuae/falcon-40b", block_size=2048, vocab_size=65024, n_embd=8192,
                    n_layer=60, n_head=128, head_size=64, n_query_groups=8, intermediate_size=4 * 8192,
                    parallel_residual=True, shared_attention_norm=False, norm_class="LayerNorm", mlp_class="gelu",
                    bias=False, tie_embeddings=True))

# Pythia (GPT-NeoX)
for size, (n_embd, n_layer, n_head) in {
    "14m": (128, 6, 4), "31m": (256, 6, 8), "70m": (512, 6, 8), "160m": (768, 12, 12), "410m": (1024, 24, 16),
    "1b": (2048, 16, 8), "1.4b": (2048, 24, 16), "2.8b": (2560, 32, 32), "6.9b": (4096, 32, 32),
    "12b": (5120, 36, 40),
}.items():
    configs.append(dict(name=f"pythia-{size}", hf_repo=f"EleutherAI/pythia-{size}", block_size=2048, vocab_size=50304,
                        n_embd=n_embd, n_layer=n_layer, n_head=n_head, rotary_percentage=0.25,
                        parallel_residual=True, norm_class="LayerNorm", mlp_class="gelu", bias=True))

# Phi
configs.append(dict(name="phi-1_5", hf_repo="microsoft/phi-1_5", block_size=2048, vocab_size=51200, n_embd=2048,
                    n_layer=24, n_head=32, intermediate_size=8192, rotary_percentage=0.5, parallel_residual=True,
                    shared_attention_norm=True, norm_class="LayerNorm", mlp_class="gelu", gelu_approximate="tanh",
                    bias=True, lm_head_bias=True))
configs.append(dict(name="phi-2", hf_repo="microsoft/phi-2", block_size=2048, vocab_size=51200, n_embd=2560,
                    n_layer=32, n_head=32, intermediate_size=10240, rotary_percentage=0.4, parallel_residual=True,
                    shared_attention_norm=True, norm_class="LayerNorm", mlp_class="gelu", gelu_approximate="tanh",
                    bias=True, lm_head_bias=True))

# Qwen2.5: bias on q/k/v only
for size, (n_embd, n_layer, n_head, n_kv, inter, vocab, tied) in {
    "0.5B": (896, 24, 14, 2, 4864, 151936, True),
    "1.5B": (1536, 28, 12, 2, 8960, 151936, True),
    "3B": (2048, 36, 16, 2, 11008, 151936, True),
    "7B": (3584, 28, 28, 4, 18944, 152064, False),
}.items():
    for instruct in ("", "-Instruct"):
        _llama(f"Qwen2.5-{size}{instruct}", f"Qwen/Qwen2.5-{size}{instruct}", block_size=32768, vocab_size=vocab,
               n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_query_groups=n_kv, intermediate_size=inter,
               rope_base=1000000.0, attn_qkv_bias=True, tie_embeddings=tied, norm_eps=1e-6,
               prompt_style="chatml")

# Gemma: GeGLU, RMSNorm(1 + w), embeddings scaled by sqrt(n_embd), head_size 256
for size, (n_embd, n_layer, n_head, n_kv, inter) in {
    "2b": (2048, 18, 8, 1, 16384),
    "7b": (3072, 28, 16, 16, 24576),
}.items():
    for it in ("", "-it"):
        configs.append(dict(name=f"gemma-{size}{it}", hf_repo=f"google/gemma-{size}{it}", block_size=8192,
                            vocab_size=256000, n_embd=n_embd, n_layer=n_layer, n_head=n_head, head_size=256,
                            n_query_groups=n_kv, intermediate_size=inter, norm_class="RMSNorm", norm_eps=1e-6,
                            norm_unit_offset=True, mlp_class="geglu", gelu_approximate="tanh", tie_embeddings=True,
                            scale_embeddings=True, prompt_style="gemma" if it else "plain"))

# StableLM 3B: LayerNorm, SwiGLU, a quarter of each head rotates
configs.append(dict(name="stablelm-3b-4e1t", hf_repo="stabilityai/stablelm-3b-4e1t", block_size=4096,
                    vocab_size=50304, n_embd=2560, n_layer=32, n_head=32, intermediate_size=6912,
                    rotary_percentage=0.25, norm_class="LayerNorm", mlp_class="swiglu", bias=False))

# llama2.c "tinyllamas" trained on TinyStories
for size, (n_embd, n_layer, n_head, n_kv, inter, vocab, block) in {
    "260K": (64, 5, 8, 4, 172, 512, 512),
    "15M": (288, 6, 6, 6, 768, 32000, 256),
    "42M": (512, 8, 8, 8, 1376, 32000, 1024),
    "110M": (768, 12, 12, 12, 2048, 32000, 1024),
}.items():
    _llama(f"stories{size}", "karpathy/tinyllamas", block_size=block, vocab_size=vocab, n_embd=n_embd,
           n_layer=n_layer, n_head=n_head, n_query_groups=n_kv, intermediate_size=inter, tie_embeddings=True,
           norm_eps=1e-5)

name_to_config = {c["name"]: c for c in configs}
