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
    # per-layer switches (None: every layer alike). Layer i slides unless i is in global_layers; it rotates with
    # rope_local_base (no scaling) if it slides and that is set, and not at all if i is in nope_layers.
    global_layers: Optional[list[int]] = None  # with sliding_window: layers that see everything (Gemma 2 / 3)
    rope_local_base: Optional[float] = None  # the sliding layers' RoPE base (Gemma 3: 10k local, 1M global)
    nope_layers: Optional[list[int]] = None  # layers without RoPE (SmolLM3: every 4th)
    # attention details of the 2024-25 families
    qk_norm: Optional[Literal["head", "all"]] = None  # RMSNorm on q and k before RoPE: per head (Qwen3, Gemma 3)
    #                                                 or over the whole projection (OLMo 2)
    attn_scale_base: Optional[float] = None  # scores scaled by attn_scale_base**-0.5, not head_size**-0.5 (Gemma 2/3)
    attn_softcap: Optional[float] = None  # scores -> cap * tanh(scores / cap) before the softmax (Gemma 2)
    final_softcap: Optional[float] = None  # the same on the output logits (Gemma 2)
    # where the norms sit: before each sub-block (pre_norms), on its output before the residual add (post_norms)
    pre_norms: bool = True  # OLMo 2 has none
    post_norms: bool = False  # Gemma 2 / 3 (with pre_norms), OLMo 2
    # mixture of experts (n_expert > 0): the MLP of the layers in moe_layers (default all) is a router that sends
    # each token to its n_expert_per_token best experts, each a gated MLP of moe_intermediate_size
    n_expert: int = 0
    n_expert_per_token: int = 0
    moe_intermediate_size: Optional[int] = None
    norm_topk_prob: bool = False  # renormalise the chosen experts' weights to sum to 1 (Qwen3-MoE: yes)
    moe_layers: Optional[list[int]] = None
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
        if self.n_expert and not 0 < self.n_expert_per_token <= self.n_expert:
            raise ValueError(f"n_expert_per_token={self.n_expert_per_token} must be in 1..n_expert={self.n_expert}")
        if self.n_expert and self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size

    # ---- per-layer switches ----------------------------------------------------------------------------------
    def window_at(self, i: int) -> Optional[int]:
        """Layer i's sliding window (None: it attends to every earlier position)."""
        if self.sliding_window is None or (self.global_layers is not None and i in self.global_layers):
            return None
        return self.sliding_window

    def rope_at(self, i: int) -> Optional[str]:
        """Which rotary table layer i uses: "global", "local" (Gemma 3's sliding layers) or None (NoPE)."""
        if self.nope_layers is not None and i in self.nope_layers:
            return None
        if self.rope_local_base is not None and self.window_at(i) is not None:
            return "local"
        return "global"

    def moe_at(self, i: int) -> bool:
        return self.n_expert > 0 and (self.moe_layers is None or i in self.moe_layers)

    @property
    def uniform_layers(self) -> bool:
        """Every layer has the same window and the same rotary table (the common, fast case)."""
        return len({(self.window_at(i), self.rope_at(i)) for i in range(self.n_layer)}) <= 1

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

# ---- the 2024-25 families. A checkpoint's own config.json is the authority (`lora_lab.convert` reads it); these
# ---- are its published values for building models by name.

# Qwen3: per-head q/k RMSNorm, head_size 128 whatever n_embd is; small ones tie their embeddings
for size, (n_embd, n_layer, n_head, inter, tied) in {
    "0.6B": (1024, 28, 16, 3072, True),
    "1.7B": (2048, 28, 16, 6144, True),
    "4B": (2560, 36, 32, 9728, True),
    "8B": (4096, 36, 32, 12288, False),
    "14B": (5120, 40, 40, 17408, False),
    "32B": (5120, 64, 64, 25600, False),
}.items():
    for base in ("", "-Base"):
        _llama(f"Qwen3-{size}{base}", f"Qwen/Qwen3-{size}{base}", block_size=40960, vocab_size=151936,
               n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_query_groups=8, head_size=128,
               intermediate_size=inter, rope_base=1000000.0, tie_embeddings=tied, norm_eps=1e-6, qk_norm="head",
               prompt_style="plain" if base else "chatml")

# Qwen3-MoE: every layer a mixture of experts, top-8 of 128 experts, renormalised
for name, (n_embd, n_layer, n_head, n_kv) in {"Qwen3-30B-A3B": (2048, 48, 32, 4),
                                             "Qwen3-235B-A22B": (4096, 94, 64, 4)}.items():
    for base in ("", "-Base"):
        _llama(f"{name}{base}", f"Qwen/{name}{base}", block_size=40960, vocab_size=151936, n_embd=n_embd,
               n_layer=n_layer, n_head=n_head, n_query_groups=n_kv, head_size=128,
               intermediate_size=6144 if n_embd == 2048 else 12288, rope_base=1000000.0, norm_eps=1e-6,
               qk_norm="head", n_expert=128, n_expert_per_token=8, norm_topk_prob=True,
               moe_intermediate_size=768 if n_embd == 2048 else 1536, prompt_style="plain" if base else "chatml")


def _gemma2(name, hf_repo, **kw):
    base = dict(name=name, hf_repo=hf_repo, norm_class="RMSNorm", norm_eps=1e-6, norm_unit_offset=True,
                mlp_class="geglu", gelu_approximate="tanh", tie_embeddings=True, scale_embeddings=True,
                post_norms=True)
    base.update(kw)
    configs.append(base)


# Gemma 2: sliding (4096) and global layers alternate, soft-capped scores (50) and logits (30), 4 norms per block
for size, (n_embd, n_layer, n_head, n_kv, hs, inter, scale_base) in {
    "2b": (2304, 26, 8, 4, 256, 9216, 256),
    "9b": (3584, 42, 16, 8, 256, 14336, 256),
    "27b": (4608, 46, 32, 16, 128, 36864, 144),  # queries scaled by 1/sqrt(n_embd / n_head), not 1/sqrt(head_size)
}.items():
    for it in ("", "-it"):
        _gemma2(f"gemma-2-{size}{it}", f"google/gemma-2-{size}{it}", block_size=8192, vocab_size=256000,
                n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_query_groups=n_kv, head_size=hs,
                intermediate_size=inter, sliding_window=4096, global_layers=list(range(1, n_layer, 2)),
                attn_scale_base=float(scale_base), attn_softcap=50.0, final_softcap=30.0,
                prompt_style="gemma" if it else "plain")

# Gemma 3 (the text decoder; 4b and larger are image + text models whose text part this is): 5 sliding layers
# for every global one, the sliding ones with RoPE base 10k, the global ones 1M (4b+: linear scaling x8), q/k norms
for size, (n_embd, n_layer, n_head, n_kv, hs, inter, window, block, scale_base) in {
    "270m": (640, 18, 4, 1, 256, 2048, 512, 32768, 256),
    "1b": (1152, 26, 4, 1, 256, 6912, 512, 32768, 256),
    "4b": (2560, 34, 8, 4, 256, 10240, 1024, 131072, 256),
    "12b": (3840, 48, 16, 8, 256, 15360, 1024, 131072, 256),
    "27b": (5376, 62, 32, 16, 128, 21504, 1024, 131072, 168),
}.items():
    for kind in ("-pt", "-it"):
        _gemma2(f"gemma-3-{size}{kind}", f"google/gemma-3-{size}{kind}", block_size=block, vocab_size=262144,
                n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_query_groups=n_kv, head_size=hs,
                intermediate_size=inter, sliding_window=window, global_layers=list(range(5, n_layer, 6)),
                attn_scale_base=float(scale_base), rope_base=1000000.0, rope_local_base=10000.0,
                rope_scaling=dict(rope_type="linear", factor=8.0) if block > 32768 else None, qk_norm="head",
                prompt_style="gemma" if kind == "-it" else "plain")

# Phi-3-mini-4k: Llama-like (fused qkv and gate_up in its files), a 2047-token sliding window. The 128k and
# Phi-4-mini releases use LongRoPE factors: convert them from their config.json.
_llama("Phi-3-mini-4k-instruct", "microsoft/Phi-3-mini-4k-instruct", block_size=4096, vocab_size=32064,
       n_embd=3072, n_layer=32, n_head=32, n_query_groups=32, intermediate_size=8192, sliding_window=2047,
       norm_eps=1e-5, prompt_style="phi3")

# OLMo 2: norms after attention and MLP only, q/k norms over the whole projection
for size, (n_embd, n_layer, n_head, inter) in {"7B": (4096, 32, 32, 11008), "13B": (5120, 40, 40, 13824)}.items():
    for kind in ("", "-SFT", "-DPO", "-Instruct"):
        _llama(f"OLMo-2-1124-{size}{kind}", f"allenai/OLMo-2-1124-{size}{kind}", block_size=4096,
               vocab_size=100352, n_embd=n_embd, n_layer=n_layer, n_head=n_head, intermediate_size=inter,
               rope_base=500000.0, norm_eps=1e-6, pre_norms=False, post_norms=True, qk_norm="all",
               prompt_style="tulu" if kind else "plain")

# SmolLM3: Llama-like with RoPE skipped on every 4th layer
for kind in ("", "-Base"):
    _llama(f"SmolLM3-3B{kind}", f"HuggingFaceTB/SmolLM3-3B{kind}", block_size=65536, vocab_size=128256,
           n_embd=2048, n_layer=36, n_head=16, n_query_groups=4, intermediate_size=11008, rope_base=5000000.0,
           tie_embeddings=True, norm_eps=1e-6, nope_layers=list(range(3, 36, 4)),
           prompt_style="plain" if kind else "chatml")

name_to_config = {c["name"]: c for c in configs}
