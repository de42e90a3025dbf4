"""GGUF export (lora_lab/formats/gguf_export.py, gguf_adapter.py), checked by llama.cpp itself through llama-cpp-python, and by our importer.

- For a tiny random model of each exported family (Gemma 2 / 3, Phi-4-mini, OLMo 2, SmolLM3 and Qwen3-MoE too; with
  a real tokenizer: SmolLM2's byte-level BPE, or Llama 2's
  SentencePiece model) llama.cpp loads our F32 file and gives our logits (per-family tolerance below), the same
  greedy tokens, and the same token ids as our tokenizer; the same for SmolLM2-135M-Instruct, whose Q8_0 file
  also gives our first 32 greedy tokens on the "capital of France" prompt.
- Our LoRA adapter GGUF applied by llama.cpp (lora_path) gives the logits of our merged model: q/v, all targets,
  rsLoRA, and a fused attn_qkv family.
- Round trip: lora_lab.formats.gguf_import reads every file we write back to the same weights (F32 exactly).

llama.cpp runs with an F32 KV cache (its default is F16) so that the comparison is of the models, not of the cache.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, require_asset
from lora_lab.checkpoint import load_checkpoint, save_checkpoint
from lora_lab.config import Config
from lora_lab.formats.gguf_adapter import write_gguf_adapter
from lora_lab.formats.gguf_export import export_gguf
from lora_lab.formats.gguf_names import gguf_architecture, halves_to_interleaved, interleaved_to_halves
from lora_lab.lora import LoRAConfig, inject_lora, lora_state_dict, merge_lora, save_lora
from lora_lab.model import GPT
from lora_lab.tokenizer import Tokenizer
from lora_lab.utils import LoraLabError

SMOL = "models/smollm2-135m-instruct"
LLAMA2_SP = "tokenizers/llama2"
CHATML_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
TEXTS = ["Hello world! The quick brown fox jumps over the lazy dog.",
         "Numbers 1234567 and 3.14159, symbols #@$%^&*, unicode: café, naïve, 日本語, emoji 🙂.",
         "  leading spaces,\ttabs,\n\nnew lines   and trailing spaces  ",
         CHATML_PROMPT + "The capital of France is Paris.<|im_end|>"]

_base = dict(block_size=128, n_layer=2, n_embd=64, vocab_size=49152, rope_base=10000.0)
# name -> (Config kwargs, tokenizer asset, llama.cpp architecture, logits tolerance (atol) against ours)
# RMSNorm / SiLU families agree to float32 rounding; llama.cpp's GELU is the tanh approximation computed through
# a float16 table, so GELU families (Gemma's GeGLU, Phi-2, GPT-NeoX, Falcon) agree to about 1e-3.
FAMILIES = {
    "llama2_sp": (dict(_base, vocab_size=32000, n_head=4, intermediate_size=96), LLAMA2_SP, "llama", 2e-4),
    "llama3_scaled": (dict(_base, n_head=8, n_query_groups=2, intermediate_size=96, rope_base=500000.0,
                           rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_seq_len=32)), SMOL, "llama", 2e-4),
    "smollm2_tied": (dict(_base, n_head=4, n_query_groups=2, intermediate_size=96, tie_embeddings=True,
                          prompt_style="chatml"), SMOL, "llama", 2e-4),
    "mistral_window": (dict(_base, n_head=4, n_query_groups=2, intermediate_size=96, sliding_window=64), SMOL,
                       "llama", 2e-4),
    "qwen2": (dict(_base, n_head=4, n_query_groups=2, intermediate_size=96, attn_qkv_bias=True, tie_embeddings=True,
                   rope_base=1e6, norm_eps=1e-6), SMOL, "qwen2", 2e-4),
    "qwen3": (dict(_base, n_head=4, n_query_groups=2, head_size=24, intermediate_size=96, qk_norm="head",
                   tie_embeddings=True, rope_base=1e6, norm_eps=1e-6, prompt_style="chatml"), SMOL, "qwen3", 2e-4),
    # the 2024-25 families: each with the per-layer patterns llama.cpp hard-codes (Gemma 2's alternating windows,
    # Gemma 3's 5 sliding : 1 global with RoPE base 10000 on the sliding layers, SmolLM3's RoPE-less 4th layers),
    # windows shorter than the 24 test tokens, small soft-caps so that they bite
    "gemma2": (dict(_base, n_layer=4, n_head=4, n_query_groups=2, head_size=24, intermediate_size=96,
                    norm_unit_offset=True, mlp_class="geglu", gelu_approximate="tanh", tie_embeddings=True,
                    scale_embeddings=True, norm_eps=1e-6, post_norms=True, attn_softcap=2.0, final_softcap=3.0,
                    attn_scale_base=24, sliding_window=5, global_layers=[1, 3]), SMOL, "gemma2", 5e-3),
    "gemma3": (dict(_base, n_layer=7, n_head=4, n_query_groups=2, head_size=24, intermediate_size=96,
                    norm_unit_offset=True, mlp_class="geglu", gelu_approximate="tanh", tie_embeddings=True,
                    scale_embeddings=True, norm_eps=1e-6, post_norms=True, qk_norm="head", sliding_window=5,
                    global_layers=[5], rope_base=1e6, rope_local_base=10000.0,
                    rope_scaling=dict(rope_type="linear", factor=4.0)), SMOL, "gemma3", 5e-3),
    # Phi-4-mini: 3/4 of each head rotates, LongRoPE beyond an original 16 positions (llama.cpp takes the long
    # factors when its context exceeds that, we when the pass does: both do for the 24 test tokens)
    "phi4mini": (dict(_base, n_head=4, n_query_groups=2, intermediate_size=96, rotary_percentage=0.75,
                      tie_embeddings=True, rope_scaling=dict(rope_type="longrope", original_max_seq_len=16,
                                                             short_factor=[1.0, 1.2, 1.5, 2.0, 2.5, 3.0],
                                                             long_factor=[1.0, 1.5, 2.0, 3.0, 4.0, 6.0],
                                                             attention_factor=1.19)), SMOL, "phi3", 2e-4),
    "olmo2": (dict(_base, n_layer=3, n_head=4, n_query_groups=2, intermediate_size=96, pre_norms=False,
                   post_norms=True, qk_norm="all", norm_eps=1e-6, rope_base=5e5), SMOL, "olmo2", 2e-4),
    # OLMo 3: 3 sliding : 1 global layers, YaRN on the global one; Qwen3 with YaRN (its long-context setting)
    "olmo3": (dict(_base, n_layer=4, n_head=4, n_query_groups=2, intermediate_size=96, pre_norms=False,
                   post_norms=True, qk_norm="all", norm_eps=1e-6, rope_base=5e5, rope_local_base=5e5, sliding_window=5,
                   global_layers=[3], rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_seq_len=8,
                                                        beta_fast=16.0, beta_slow=2.0, truncate=True,
                                                        attention_factor=1.1386)), SMOL, "olmo2", 2e-4),
    "qwen3_yarn": (dict(_base, n_head=4, n_query_groups=2, head_size=24, intermediate_size=96, qk_norm="head",
                        rope_base=1e6, norm_eps=1e-6, rope_scaling=dict(
                            rope_type="yarn", factor=4.0, original_max_seq_len=8, beta_fast=32.0, beta_slow=1.0,
                            truncate=True, attention_factor=1.1386)), SMOL, "qwen3", 2e-4),
    "smollm3": (dict(_base, n_layer=4, n_head=4, n_query_groups=2, intermediate_size=96, tie_embeddings=True,
                     nope_layers=[3], rope_base=5e6), SMOL, "smollm3", 2e-4),
    "qwen3moe": (dict(_base, n_head=4, n_query_groups=2, head_size=24, intermediate_size=96, qk_norm="head",
                      n_expert=4, n_expert_per_token=2, moe_intermediate_size=32, norm_topk_prob=True, rope_base=1e6,
                      norm_eps=1e-6), SMOL, "qwen3moe", 2e-4),
    "gemma": (dict(_base, n_head=4, n_query_groups=1, head_size=32, intermediate_size=96, norm_unit_offset=True,
                   mlp_class="geglu", gelu_approximate="tanh", tie_embeddings=True, scale_embeddings=True,
                   norm_eps=1e-6), SMOL, "gemma", 5e-3),
    "phi2": (dict(_base, n_head=4, intermediate_size=256, rotary_percentage=0.4, parallel_residual=True,
                  shared_attention_norm=True, norm_class="LayerNorm", mlp_class="gelu", gelu_approximate="tanh",
                  bias=True, lm_head_bias=True), SMOL, "phi2", 5e-3),
    "pythia": (dict(_base, n_head=4, intermediate_size=256, rotary_percentage=0.25, parallel_residual=True,
                    norm_class="LayerNorm", mlp_class="gelu", bias=True), SMOL, "gptneox", 5e-3),
    "neox_sequential": (dict(_base, n_head=4, intermediate_size=128, rotary_percentage=0.5, norm_class="LayerNorm",
                             mlp_class="gelu", gelu_approximate="tanh", bias=True), SMOL, "gptneox", 5e-3),
    "falcon7b": (dict(_base, n_head=4, n_query_groups=1, parallel_residual=True, shared_attention_norm=True,
                      norm_class="LayerNorm", mlp_class="gelu", tie_embeddings=True), SMOL, "falcon", 5e-3),
    "falcon40b": (dict(_base, n_head=8, n_query_groups=2, parallel_residual=True, norm_class="LayerNorm",
                       mlp_class="gelu"), SMOL, "falcon", 5e-3),
}


def write_family_checkpoint(out_dir: Path, family: str, tokenizer_dir: Path = None, seed: int = 0) -> Path:
    """A random checkpoint of `family` with the real tokenizer files of its tokenizer asset (or of tokenizer_dir,
    with that tokenizer's vocabulary size)."""
    kwargs, tokenizer, _, _ = FAMILIES[family]
    if tokenizer_dir is not None:
        kwargs = dict(kwargs, vocab_size=Tokenizer(tokenizer_dir).vocab_size)
    config = Config(name=f"tiny-{family}", **kwargs)
    gen = torch.Generator().manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # away from 1 / 0, so a swapped or dropped norm shows
                p.copy_((0.0 if config.norm_unit_offset else 1.0) * (name.endswith("weight")) +
                        0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if "wte" in name or "lm_head" in name else 0.08))
    save_checkpoint(out_dir, config, model.state_dict(), tokenizer_dir=tokenizer_dir or require_asset(tokenizer))
    return Path(out_dir)


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory) -> Path:
    """stories260K's real 512-piece SentencePiece vocabulary as tokenizer.json: files that write and read fast."""
    from lora_lab.formats.llama2c import llama2c_tokenizer
    from lora_lab.formats.sp_vocab import write_tokenizer_files

    out = tmp_path_factory.mktemp("tok512")
    tokenizer, _ = llama2c_tokenizer(require_asset("models/stories260K/tok512.bin"))
    write_tokenizer_files(out, tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos=True,
                          bos_id=1, eos_ids=[2])
    return out


def llama_cpp(model_path: Path, lora_path: Path = None, n_ctx: int = 256):
    """llama.cpp on our file, through benchmarks/bench_gguf.py's loader (no AMX-repacked weights: see there)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (.ci/run installs it)")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_gguf import load_llama_cpp

    return load_llama_cpp(model_path, lora_path=str(lora_path) if lora_path else None, logits_all=True,
                          n_ctx=n_ctx, n_threads=2, n_batch=256, seed=0, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def llama_cpp_logits(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))  # (T, vocab)


def llama_cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


@torch.no_grad()
def our_greedy(model: GPT, ids: list[int], n: int) -> list[int]:
    ids, out = list(ids), []
    for _ in range(n):
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        ids.append(nxt)
        out.append(nxt)
    return out


def sample_ids(tok: Tokenizer, T: int = 24) -> list[int]:
    return tok.encode(TEXTS[0] + " " + TEXTS[1]).tolist()[:T]


# ---------------------------------------------------------------------------------------------------------------
# without llama.cpp: layouts, round trip through our importer, refusals
# ---------------------------------------------------------------------------------------------------------------
def test_halves_to_interleaved_is_llamacpps_permute_and_inverts_our_importer():
    w = torch.randn(4 * 16, 8)
    # llama.cpp's convert_hf_to_gguf.py permute, written out: reshape (n_head, 2, hs/2), swap axes 1 and 2
    theirs = w.reshape(4, 2, 8, 8).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(halves_to_interleaved(w, 4), theirs)
    assert torch.equal(interleaved_to_halves(halves_to_interleaved(w, 4), 4), w)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_f32_file_reads_back_to_the_same_weights(family, tmp_path, small_vocab):
    from lora_lab.formats.gguf_import import convert_gguf

    ckpt = write_family_checkpoint(tmp_path / "ckpt", family, small_vocab)
    export_gguf(ckpt, tmp_path / "m.gguf", "f32", progress=False)
    config = convert_gguf(tmp_path / "m.gguf", tmp_path / "back")
    (c1, sd1), (c2, sd2) = load_checkpoint(ckpt), load_checkpoint(tmp_path / "back")
    assert config.extra["gguf_architecture"] == FAMILIES[family][2]
    for k, v in sd1.items():
        if k not in sd2:  # a tied lm_head written out for an architecture that needs output.weight
            assert k == "lm_head.weight" and c1.tie_embeddings
            continue
        # Gemma's norms are stored as 1 + w (one rounding there and back); everything else is bit-exact
        assert torch.equal(sd2[k], (v + 1) - 1 if c1.norm_unit_offset and "norm" in k else v), k
    if c1.tie_embeddings and "lm_head.weight" in sd2:
        assert torch.equal(sd2["lm_head.weight"], sd1["wte.weight"])
    # the model computes the same thing (the importer recovered the architecture's flags)
    idx = torch.randint(0, c1.vocab_size, (1, 12))
    with torch.no_grad():
        ours, back = GPT.from_checkpoint(ckpt).eval()(idx), GPT.from_checkpoint(tmp_path / "back").eval()(idx)
    gelu_variant = c1.mlp_class == "gelu" and c1.gelu_approximate != c2.gelu_approximate
    torch.testing.assert_close(back, ours, atol=5e-3 if gelu_variant else 1e-6, rtol=0)


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0", "q4_0"])
def test_quantized_file_reads_back_to_the_quantized_weights(outtype, tmp_path, small_vocab):
    import gguf

    from lora_lab.formats.gguf_import import convert_gguf

    ckpt = write_family_checkpoint(tmp_path / "ckpt", "smollm2_tied", small_vocab)
    export_gguf(ckpt, tmp_path / "m.gguf", outtype, progress=False)
    convert_gguf(tmp_path / "m.gguf", tmp_path / "back")
    (_, sd1), (_, sd2) = load_checkpoint(ckpt), load_checkpoint(tmp_path / "back")
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[outtype]
    for k, v in sd1.items():
        if v.dim() == 1:
            assert torch.equal(sd2[k], v), k  # norms stay F32
            continue
        t = qtype if not (outtype == "q4_0" and k == "wte.weight") else gguf.GGMLQuantizationType.Q8_0
        if t == gguf.GGMLQuantizationType.F16:
            expected = v.half().float()
        else:
            a = v.numpy()
            if k.endswith(("q_proj.weight", "k_proj.weight")):  # quantized in llama.cpp's row order
                n = 4 if "q_proj" in k else 2
                a = halves_to_interleaved(v, n).numpy()
            expected = torch.from_numpy(np.array(gguf.quants.dequantize(gguf.quants.quantize(a, t), t),
                                                 dtype=np.float32)).reshape(v.shape)
            if k.endswith(("q_proj.weight", "k_proj.weight")):
                expected = interleaved_to_halves(expected, 4 if "q_proj" in k else 2)
        assert torch.equal(sd2[k], expected), k


def test_unsupported_configs_and_adapters_are_one_line_errors(tmp_path, small_vocab):
    stablelm = Config(name="stablelm", n_layer=1, n_embd=32, n_head=4, norm_class="LayerNorm", mlp_class="swiglu")
    with pytest.raises(LoraLabError, match="cannot be exported to GGUF.*StableLM"):
        gguf_architecture(stablelm)
    ckpt = write_family_checkpoint(tmp_path / "ckpt", "smollm2_tied", small_vocab)
    with pytest.raises(LoraLabError, match="--outtype q5_k"):
        export_gguf(ckpt, tmp_path / "m.gguf", "q5_k")
    model = GPT.from_checkpoint(ckpt)
    inject_lora(model, r=4, targets=["query", "value"], use_dora=True)
    lc = LoRAConfig(r=4, targets=["query", "value"], use_dora=True, base_model=str(ckpt),
                    base_config=model.config.to_dict())
    save_lora(tmp_path / "dora", model, lc)
    with pytest.raises(LoraLabError, match="DoRA.*merge it instead.*merge_lora"):
        write_gguf_adapter(tmp_path / "dora", tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_cli_convert_to_gguf_and_merge_lora_to_gguf(tmp_path, small_vocab):
    ckpt = write_family_checkpoint(tmp_path / "ckpt", "smollm2_tied", small_vocab)
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env,
                                       cwd=tmp_path)
    r = run("lora_lab.convert", "--to", "gguf", str(ckpt), "out.gguf", "--outtype", "q8_0")
    assert r.returncode == 0, r.stderr
    assert "llama.cpp llama, q8_0" in r.stdout and (tmp_path / "out.gguf").is_file()
    r = run("lora_lab.convert", "--to", "gguf", str(ckpt), "out.gguf", "--outtype", "q3")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == ["error: --outtype q3: use one of f32, f16, bf16, "
                                                                    "q8_0, q4_0"]
    model = GPT.from_checkpoint(ckpt)
    inject_lora(model, r=4, targets=["query", "value"])
    lc = LoRAConfig(r=4, targets=["query", "value"], base_model=str(ckpt), base_config=model.config.to_dict(),
                    prompt_style="alpaca")
    save_lora(tmp_path / "lora", model, lc)
    r = run("lora_lab.merge_lora", "--adapter_dir", "lora", "--to", "gguf", "merged.gguf", "--outtype", "f32")
    assert r.returncode == 0, r.stderr
    from lora_lab.formats.gguf_import import _Meta, open_gguf

    meta = _Meta(open_gguf(tmp_path / "merged.gguf"), tmp_path / "merged.gguf")
    assert "### Instruction:" in meta.get("tokenizer.chat_template")  # the adapter's prompt style, not ChatML's


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp itself
# ---------------------------------------------------------------------------------------------------------------
def assert_same_greedy(theirs: list[int], our_logits: torch.Tensor, prompt_len: int, atol: float) -> None:
    """llama.cpp's greedy continuation is ours: at each step our argmax is its token, unless our two best logits
    are within the logits tolerance (a tie that rounding may break either way)."""
    for i, t in enumerate(theirs):
        row = our_logits[prompt_len - 1 + i]  # (vocab,)
        if int(row.argmax()) != t:
            gap = float(row.max() - row[t])
            assert gap <= 2 * atol, f"step {i}: llama.cpp chose {t}, we chose {int(row.argmax())} (gap {gap:.2e})"


def check_against_llama_cpp(ckpt: Path, gguf_file: Path, atol: float, n_greedy: int = 8) -> None:
    tok = Tokenizer(ckpt)
    llm = llama_cpp(gguf_file)
    for text in TEXTS:  # the same token ids as our tokenizer
        assert llm.tokenize(text.encode(), add_bos=tok.add_bos, special=True) == tok.encode(text).tolist(), text
    model = GPT.from_checkpoint(ckpt).eval()
    ids = sample_ids(tok)
    theirs = llama_cpp_logits(llm, ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]  # (T, vocab)
    torch.testing.assert_close(theirs, ours, atol=atol, rtol=0)
    greedy = llama_cpp_greedy(llm, ids, n_greedy)
    with torch.no_grad():
        ours = model(torch.tensor([ids + greedy]))[0]
    assert_same_greedy(greedy, ours, len(ids), atol)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_gives_our_logits_greedy_tokens_and_token_ids(family, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (.ci/run installs it)")
    ckpt = write_family_checkpoint(tmp_path / "ckpt", family)
    export_gguf(ckpt, tmp_path / "m.gguf", "f32", progress=False)
    check_against_llama_cpp(ckpt, tmp_path / "m.gguf", FAMILIES[family][3])


@pytest.mark.parametrize("family", ["llama2_sp", "pythia"])
def test_llama_cpp_small_vocab(family, tmp_path, small_vocab):
    """The SentencePiece-style tokenizer.json path (scores from merge ranks) and a fused attn_qkv, quickly."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (.ci/run installs it)")
    ckpt = write_family_checkpoint(tmp_path / "ckpt", family, small_vocab)
    export_gguf(ckpt, tmp_path / "m.gguf", "f32", progress=False)
    check_against_llama_cpp(ckpt, tmp_path / "m.gguf", FAMILIES[family][3])


ADAPTERS = {  # name -> (family, LoRAConfig kwargs)
    "llama_qv": ("llama2_sp", dict(r=4, alpha=8.0, targets=["query", "value"])),
    "llama_all": ("llama2_sp", dict(r=4, alpha=16.0, targets=["all"])),
    "llama_rslora": ("llama3_scaled", dict(r=8, alpha=4.0, targets=["query", "key", "mlp"], use_rslora=True)),
    "qwen2_qkv": ("qwen2", dict(r=4, alpha=8.0, targets=["query", "key", "value", "projection"])),
    "pythia_fused_qv": ("pythia", dict(r=4, alpha=8.0, targets=["query", "value", "mlp"])),
    "falcon_fused_all": ("falcon40b", dict(r=2, alpha=4.0, targets=["all"], use_rslora=True)),
    # the 2024-25 families: Phi-3's fused qkv and [gate; up], Qwen3-MoE's stacked experts, Gemma 3's block
    "phi4mini_all": ("phi4mini", dict(r=4, alpha=8.0, targets=["all"])),  # tied lm_head: phi3 writes output
    "qwen3moe_experts": ("qwen3moe", dict(r=4, alpha=8.0, targets=["query", "value", "experts"])),
    "gemma3_blocks": ("gemma3", dict(r=4, alpha=8.0, targets=["query", "key", "value", "projection", "mlp"])),
}


@pytest.mark.parametrize("case", list(ADAPTERS))
def test_llama_cpp_applies_our_lora_adapter_as_our_merged_model(case, tmp_path, small_vocab):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (.ci/run installs it)")
    family, kwargs = ADAPTERS[case]
    ckpt = write_family_checkpoint(tmp_path / "ckpt", family, small_vocab)
    model = GPT.from_checkpoint(ckpt).eval()
    inject_lora(model, **kwargs)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for k, p in lora_state_dict(model).items():  # B != 0, so the adapter matters
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    lc = LoRAConfig(**kwargs, base_model=str(ckpt), base_config=model.config.to_dict())
    save_lora(tmp_path / "lora", model, lc)
    export_gguf(ckpt, tmp_path / "base.gguf", "f32", progress=False)
    summary = write_gguf_adapter(tmp_path / "lora", tmp_path / "adapter.gguf", progress=False)
    assert summary["alpha"] == pytest.approx(lc.alpha * math.sqrt(lc.r) if lc.use_rslora else lc.alpha)
    ids = sample_ids(Tokenizer(ckpt))
    merge_lora(model)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]  # (T, vocab)
        base = GPT.from_checkpoint(ckpt).eval()(torch.tensor([ids]))[0]
    theirs = llama_cpp_logits(llama_cpp(tmp_path / "base.gguf", tmp_path / "adapter.gguf"), ids)
    atol = FAMILIES[family][3]
    assert (ours - base).abs().max() > 20 * atol  # the adapter changes the logits far beyond the tolerance
    torch.testing.assert_close(theirs, ours, atol=atol, rtol=0)


def test_adapter_cli_writes_gguf_and_modelfile(tmp_path, small_vocab):
    ckpt = write_family_checkpoint(tmp_path / "ckpt", "smollm2_tied", small_vocab)
    model = GPT.from_checkpoint(ckpt)
    inject_lora(model, r=4, targets=["query", "value"])
    lc = LoRAConfig(r=4, targets=["query", "value"], base_model=str(ckpt), base_config=model.config.to_dict(),
                    prompt_style="chatml")
    save_lora(tmp_path / "lora", model, lc)
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "lora_lab.export_gguf", "--adapter_dir", str(tmp_path / "lora"),
                        "--out_file", str(tmp_path / "out" / "adapter.gguf")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    from lora_lab.formats.gguf_import import _Meta, open_gguf

    meta = _Meta(open_gguf(tmp_path / "out" / "adapter.gguf"), tmp_path / "adapter.gguf")
    assert (meta.get("general.type"), meta.get("adapter.type"), meta.get("general.architecture")) == (
        "adapter", "lora", "llama")
    assert meta.get("adapter.lora.alpha") == pytest.approx(16.0)
    names = {t.name for t in open_gguf(tmp_path / "out" / "adapter.gguf").tensors}
    assert names == {f"blk.{i}.attn_{p}.weight.lora_{ab}" for i in range(2) for p in "qv" for ab in "ab"}
    modelfile = (tmp_path / "out" / "Modelfile").read_text().splitlines()
    assert "FROM ./base.gguf" in modelfile and "ADAPTER ./adapter.gguf" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'TEMPLATE """{{ if .System }}<|im_start|>system' in "\n".join(modelfile)


# ---------------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct as our checkpoint (from the Q4_1 GGUF in the assets), and our F32 and Q8_0 exports."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (.ci/run installs it)")
    from lora_lab.formats.gguf_import import convert_gguf

    out = tmp_path_factory.mktemp("smollm2-export")
    convert_gguf(require_asset(f"{SMOL}/SmolLM2-135M-Instruct.Q4_1.gguf"), out / "ckpt")
    for outtype in ("f32", "q8_0"):
        export_gguf(out / "ckpt", out / f"{outtype}.gguf", outtype, progress=False)
    return out


@pytest.mark.slow
def test_smollm2_f32_export_in_llama_cpp(smollm2):
    """Logits (atol 2e-3 after 30 layers in float32), greedy tokens and token ids of the real model."""
    tok = Tokenizer(smollm2 / "ckpt")
    llm = llama_cpp(smollm2 / "f32.gguf", n_ctx=512)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=tok.add_bos, special=True) == tok.encode(text).tolist(), text
    model = GPT.from_checkpoint(smollm2 / "ckpt").eval()
    ids = tok.encode(CHATML_PROMPT).tolist()
    greedy = llama_cpp_greedy(llm, ids, 32)
    assert tok.decode(greedy).startswith("The capital of France is Paris.")
    with torch.no_grad():
        ours = model(torch.tensor([ids + greedy]))[0]
    theirs = llama_cpp_logits(llm, ids + greedy)
    torch.testing.assert_close(theirs, ours, atol=2e-3, rtol=0)
    assert_same_greedy(greedy, ours, len(ids), 2e-3)


@pytest.mark.slow
def test_smollm2_q8_0_export_gives_our_first_32_greedy_tokens(smollm2):
    tok = Tokenizer(smollm2 / "ckpt")
    ids = tok.encode(CHATML_PROMPT).tolist()
    model = GPT.from_checkpoint(smollm2 / "ckpt").eval()
    assert llama_cpp_greedy(llama_cpp(smollm2 / "q8_0.gguf", n_ctx=512), ids, 32) == our_greedy(model, ids, 32)


@pytest.mark.parametrize("qlora", [False, True])
def test_merge_lora_to_gguf_holds_the_merged_weights(qlora, tmp_path, small_vocab):
    """merge_lora --to gguf writes what merge_lora --to lora_lab writes (QLoRA: merged into the dequantized NF4
    base), read back by our importer bit for bit at F32."""
    from lora_lab.formats.gguf_import import convert_gguf
    from lora_lab.formats.merge import merge_lora_checkpoint
    from lora_lab.nf4 import quantize_nf4

    ckpt = write_family_checkpoint(tmp_path / "ckpt", "llama3_scaled", small_vocab)
    model = GPT.from_checkpoint(ckpt)
    quant = {"method": "nf4", "blocksize": 64, "double_quant": True} if qlora else None
    if qlora:
        quantize_nf4(model, blocksize=64, double_quant=True)
    inject_lora(model, r=4, targets=["query", "key", "mlp"])
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.normal_(0, 0.1)
    save_lora(tmp_path / "lora", model, LoRAConfig(r=4, targets=["query", "key", "mlp"], base_model=str(ckpt),
                                                   base_config=GPT.from_checkpoint(ckpt).config.to_dict(),
                                                   base_quantization=quant))
    merge_lora_checkpoint(None, tmp_path / "lora", tmp_path / "merged", to="lora_lab")
    merge_lora_checkpoint(None, tmp_path / "lora", tmp_path / "merged.gguf", to="gguf", outtype="f32")
    convert_gguf(tmp_path / "merged.gguf", tmp_path / "back")
    (_, merged), (_, back) = load_checkpoint(tmp_path / "merged"), load_checkpoint(tmp_path / "back")
    assert merged.keys() == back.keys()
    for k, v in merged.items():
        assert torch.equal(back[k], v.float()), k
