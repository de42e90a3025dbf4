"""Using a trained adapter: generate/lora.py, `python -m lora_lab.merge_lora` and `python -m lora_lab.export_peft`.

Adapters are made here directly (inject_lora, random non-zero lora_B, save_lora), on tiny random base models. The
reference everywhere is base + adapter, unmerged, in float32.

Tolerance (merged vs unmerged, and PEFT vs lora_lab logits, all float32): atol = 2e-6 x the largest |logit| (about
16 float32 roundings of it), rtol = 1e-5. Merging changes only the order of the roundings (x (W + s B A)^T instead of
x W^T + s (x A^T) B^T), and transformers + PEFT compute the same sums in another order; the adapters here are
strong (logits reach 6 to 85), and the differences seen are 1e-7 to 8e-7 of the largest logit.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lora_lab.checkpoint import load_config, save_checkpoint
from lora_lab.config import Config
from lora_lab.generate import generate
from lora_lab.lora import LoRAConfig, inject_lora, lora_modules, save_lora
from lora_lab.formats.merge import merge_lora_checkpoint
from lora_lab.model import GPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LLAMA = dict(n_layer=2, n_embd=32, n_head=4, n_query_groups=2, intermediate_size=48, vocab_size=96, block_size=64)
LLAMA_TIED = dict(LLAMA, tie_embeddings=True)
NEOX = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=96, block_size=64, rotary_percentage=0.25,
            parallel_residual=True, norm_class="LayerNorm", mlp_class="gelu", bias=True)


def random_base(config: Config, seed: int = 0, scale: float = 3.0) -> GPT:
    """A random model with norms and biases away from 1 / 0 and, with scale 3, logits far apart (no near-ties
    in greedy decoding)."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
            else:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def make_base(path, config: Config, tokenizer_dir=None, seed: int = 0, scale: float = 3.0):
    save_checkpoint(path, config, random_base(config, seed, scale).state_dict(), tokenizer_dir=tokenizer_dir)
    return path


def make_tokenized_base(path, name: str = "tiny", **fields):
    """A tiny random LLAMA base that speaks SmolLM2's tokenizer (what a server, batch or playground test serves);
    `fields` change its Config (block_size 96 and the chatml prompt style unless given)."""
    from conftest import require_asset

    config = Config(name=name, **{**LLAMA, "vocab_size": 49152, "block_size": 96, "prompt_style": "chatml", **fields})
    return make_base(path, config, tokenizer_dir=require_asset("models/smollm2-135m-instruct"))


def make_adapter(base_dir, adapter_dir, targets, r=4, alpha=8.0, use_rslora=False, use_dora=False,
                 prompt_style="plain") -> GPT:
    """Save an adapter with non-zero B (and moved DoRA magnitudes) for base_dir; return base + adapter, unmerged."""
    model = GPT.from_checkpoint(base_dir).eval()
    lora_config = LoRAConfig(r=r, alpha=alpha, targets=targets, use_rslora=use_rslora, use_dora=use_dora,
                             base_model=str(base_dir), base_config=model.config.to_dict(), prompt_style=prompt_style)
    inject_lora(model, r=r, alpha=alpha, targets=targets, use_rslora=use_rslora, use_dora=use_dora)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.normal_(0.0, 0.3)  # B = 0 (its init) would make the adapter a no-op
            if use_dora:
                m.lora_magnitude.mul_(1 + 0.3 * torch.rand_like(m.lora_magnitude))
    save_lora(adapter_dir, model, lora_config)
    return model


def idx() -> torch.Tensor:
    return torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))  # (B, T)


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x).float()


def assert_float32_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=2e-6 * expected.abs().max().item(), rtol=1e-5)


def greedy(model, n=20) -> list[int]:
    return list(generate(model, torch.tensor([3, 17, 42, 5, 9]), n, temperature=0.0))


def run(script_or_module, *args):
    cmd = ([sys.executable, os.path.join(ROOT, script_or_module)] if script_or_module.endswith(".py")
           else [sys.executable, "-m", script_or_module])
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


def run_in_process(main, *args, capsys, monkeypatch):
    """What `run` does, without starting an interpreter: main through lora_lab.utils.cli, with these arguments."""
    from lora_lab.utils import cli

    monkeypatch.setattr(sys, "argv", ["prog", *map(str, args)])
    capsys.readouterr()
    try:
        cli(main)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


# ------------------------------------------------------------------------------------------------------------
# generate/lora.py
# ------------------------------------------------------------------------------------------------------------
def test_generate_lora_script_matches_unmerged_in_process(assets, tmp_path):
    from lora_lab.prompts import PromptStyle
    from lora_lab.tokenizer import Tokenizer

    tok_dir = assets("models/smollm2-135m-instruct")
    config = Config(name="tiny", **dict(LLAMA, vocab_size=49152, block_size=128), prompt_style="plain")
    base = make_base(tmp_path / "base", config, tokenizer_dir=tok_dir)
    # the adapter was fine-tuned with ChatML although the base model's own style is plain
    model = make_adapter(base, tmp_path / "adapter", ["query", "value", "mlp"], prompt_style="chatml")

    # no --checkpoint_dir: the adapter's base_model is used
    result = run("generate/lora.py", "--adapter_dir", tmp_path / "adapter", "--prompt", "Hello",
                 "--max_new_tokens", 12, "--temperature", 0)
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stderr and "Traceback" not in result.stderr

    tokenizer = Tokenizer(base)
    stop = tokenizer.eos_ids + PromptStyle.from_name("chatml").stop_tokens(tokenizer)

    def expected(m, style):
        prompt_ids = tokenizer.encode(PromptStyle.from_name(style, checkpoint_dir=base).apply("Hello"))
        ids = [i for i in generate(m, prompt_ids, 12, eos_ids=stop) if i not in stop]
        context = tokenizer.decode(prompt_ids[-1:].tolist())
        return tokenizer.decode(prompt_ids[-1:].tolist() + ids)[len(context):] + "\n"

    chatml = expected(model, "chatml")
    assert result.stdout == chatml
    # the test can tell: the plain prompt, or the base model without the adapter, answer otherwise
    assert expected(model, "plain") != chatml
    assert expected(GPT.from_checkpoint(base).eval(), "chatml") != chatml


def test_generate_lora_missing_base_model_is_one_line(tmp_path, capsys, monkeypatch):
    base = make_base(tmp_path / "base", Config(**LLAMA))
    make_adapter(base, tmp_path / "adapter", ["query"])
    cfg = json.loads((tmp_path / "adapter" / "lora_config.json").read_text())
    cfg["base_model"] = "checkpoints/not/here"
    (tmp_path / "adapter" / "lora_config.json").write_text(json.dumps(cfg))
    from generate.lora import main

    monkeypatch.chdir(tmp_path)
    result = run_in_process(main, "--adapter_dir", tmp_path / "adapter", "--prompt", "hi", capsys=capsys,
                            monkeypatch=monkeypatch)
    assert_one_line_error(result, "checkpoints/not/here", "--checkpoint_dir")


# ------------------------------------------------------------------------------------------------------------
# merge_lora
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["untied-qv", "tied-lm_head-dora", "neox-all-rslora"])
def test_merge_lora_checkpoint(tmp_path, case):
    kw, targets, extra = {"untied-qv": (LLAMA, ["query", "value"], {}),
                          "tied-lm_head-dora": (LLAMA_TIED, ["query", "mlp", "lm_head"], dict(use_dora=True)),
                          "neox-all-rslora": (NEOX, "all", dict(use_rslora=True))}[case]
    base = make_base(tmp_path / "base", Config(name="tiny", **kw))
    model = make_adapter(base, tmp_path / "adapter", targets, prompt_style="alpaca", **extra)
    x = idx()
    expected = logits(model, x)
    assert not torch.allclose(expected, logits(GPT.from_checkpoint(base), x), atol=1e-2)  # the adapter matters

    if case == "tied-lm_head-dora":  # the CLI, end to end
        result = run("lora_lab.merge_lora", "--adapter_dir", tmp_path / "adapter", "--out_dir", tmp_path / "merged")
        assert result.returncode == 0, result.stderr
    else:
        merge_lora_checkpoint(base, tmp_path / "adapter", tmp_path / "merged")

    merged_config = load_config(tmp_path / "merged")
    assert merged_config.prompt_style == "alpaca"  # the adapter's, not the base model's "plain"
    weights = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert not [k for k in weights if "lora_" in k]
    merged = GPT.from_checkpoint(tmp_path / "merged").eval()
    assert not [n for n, _ in lora_modules(merged)]
    assert_float32_close(logits(merged, x), expected)
    assert greedy(merged) == greedy(model)
    if case == "tied-lm_head-dora":
        # lm_head now has its own (merged) weight, and the embedding is the base model's, unchanged
        assert not merged_config.tie_embeddings and "lm_head.weight" in weights
        torch.testing.assert_close(weights["wte.weight"], load_file(str(base / "model.safetensors"))["wte.weight"],
                                   atol=0, rtol=0)


def test_merge_lora_dtype(tmp_path):
    base = make_base(tmp_path / "base", Config(**LLAMA))
    model = make_adapter(base, tmp_path / "adapter", ["query", "value"])
    merge_lora_checkpoint(base, tmp_path / "adapter", tmp_path / "merged", dtype=torch.bfloat16)
    weights = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    # merged in float32, rounded once: exactly the float32 merge cast to bfloat16
    w = model.blocks[0].attn.q_proj
    torch.testing.assert_close(weights["blocks.0.attn.q_proj.weight"],
                               (w.weight + w.delta_weight()).detach().to(torch.bfloat16), atol=0, rtol=0)


@pytest.mark.parametrize("case", ["llama-tied-lm_head", "neox-fused-qkv"])
def test_merge_lora_to_hf_loads_in_transformers(tmp_path, case):
    transformers = pytest.importorskip("transformers")
    kw, targets = {"llama-tied-lm_head": (LLAMA_TIED, ["query", "value", "lm_head"]),
                   "neox-fused-qkv": (NEOX, ["query", "value", "mlp"])}[case]
    base = make_base(tmp_path / "base", Config(name="tiny", **kw))
    model = make_adapter(base, tmp_path / "adapter", targets)
    merge_lora_checkpoint(base, tmp_path / "adapter", tmp_path / "hf", to="hf")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    if case == "llama-tied-lm_head":
        assert hf.config.tie_word_embeddings is False  # merging untied the adapted lm_head
    else:
        assert hf.config.architectures == ["GPTNeoXForCausalLM"]
    x = idx()
    with torch.no_grad():
        assert_float32_close(hf(x).logits, logits(model, x))


@pytest.mark.parametrize("tool", ["generate/lora.py", "lora_lab.merge_lora"])
@pytest.mark.parametrize("mismatch", ["shapes", "r", "no-base-config"])
def test_mismatched_adapter_is_one_line(tmp_path, tool, mismatch, capsys, monkeypatch):
    base = make_base(tmp_path / "base", Config(**LLAMA))
    other = make_base(tmp_path / "other", Config(**dict(LLAMA, n_embd=48, n_head=4, intermediate_size=64)))
    adapter = tmp_path / "adapter"
    make_adapter(other if mismatch != "r" else base, adapter, ["query", "value"])
    cfg_path = adapter / "lora_config.json"
    cfg = json.loads(cfg_path.read_text())
    if mismatch == "r":  # a config that does not describe its weights
        cfg["r"] = 8
    if mismatch == "no-base-config":  # nothing to compare configs with: the weights' shapes give it away
        cfg["base_config"] = None
    cfg_path.write_text(json.dumps(cfg))
    args = ["--adapter_dir", adapter, "--checkpoint_dir", base]
    args += ["--prompt", "hi"] if tool.endswith(".py") else ["--out_dir", tmp_path / "merged"]
    if tool.endswith(".py"):
        from generate.lora import main
    else:
        from lora_lab.formats.merge import main
    result = run_in_process(main, *args, capsys=capsys, monkeypatch=monkeypatch)
    fragment = {"shapes": "n_embd 48 vs 32", "r": "r=4", "no-base-config": "different base model"}[mismatch]
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "merged").exists()


# ------------------------------------------------------------------------------------------------------------
# export_peft
# ------------------------------------------------------------------------------------------------------------
PEFT_CASES = {
    # name: (tiny HF config in tests/hf_tiny.py, targets, LoRA options)
    "llama-qv": ("llama3", ["query", "value"], {}),
    "llama-all": ("llama3", "all", {}),
    "llama-tied-all-rslora": ("llama32_tied", "all", dict(use_rslora=True)),
    "llama-dora": ("llama3", ["query", "key", "projection", "mlp", "lm_head"], dict(use_dora=True)),
    "qwen2-qv": ("qwen2", ["query", "value"], {}),
    "phi-all": ("phi", "all", {}),
    "pythia-qv": ("pythia", ["query", "value"], {}),
    "pythia-all-rslora": ("pythia", "all", dict(use_rslora=True)),
    "falcon7b-qv-dora": ("falcon7b", ["query", "value", "lm_head"], dict(use_dora=True)),
    "falcon40b-kv": ("falcon40b", ["key", "value", "projection"], {}),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_export_peft_matches_peft(tmp_path, case):
    pytest.importorskip("peft")
    from hf_tiny import tiny_hf_config
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_lab.formats.hf import config_from_hf, export_hf
    from lora_lab.formats.peft import main as export_peft_main

    hf_name, targets, options = PEFT_CASES[case]
    config = config_from_hf(tiny_hf_config(hf_name).to_dict(), name="tiny")
    config.hf_repo = "someone/tiny"
    base = make_base(tmp_path / "base", config, scale=1.0)
    export_hf(base, tmp_path / "base-hf")
    model = make_adapter(base, tmp_path / "adapter", targets, **options)
    export_peft_main(adapter_dir=tmp_path / "adapter", out_dir=tmp_path / "peft")

    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["task_type"] == "CAUSAL_LM"
    assert peft_config["base_model_name_or_path"] == "someone/tiny"
    assert (peft_config["use_rslora"], peft_config["use_dora"]) == (bool(options.get("use_rslora")),
                                                                    bool(options.get("use_dora")))
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") for k in tensors)
    assert any(k.endswith("lora_magnitude_vector") for k in tensors) == bool(options.get("use_dora"))

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base-hf", dtype=torch.float32,
                                              attn_implementation="eager").eval()
    x = idx()
    with torch.no_grad():
        hf_base = hf(x).logits
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    expected = logits(model, x)
    with torch.no_grad():
        got = peft_model(input_ids=x).logits
    assert not torch.allclose(hf_base, expected, atol=1e-2)  # the adapter matters
    assert_float32_close(got, expected)


def test_export_peft_fused_names_and_rank(tmp_path):
    """q and v of GPT-NeoX become one query_key_value LoRA of rank 2r, with alpha scaled to keep alpha / r."""
    pytest.importorskip("transformers")
    from hf_tiny import tiny_hf_config

    from lora_lab.formats.hf import config_from_hf
    from lora_lab.formats.peft import export_peft

    base = make_base(tmp_path / "base", config_from_hf(tiny_hf_config("pythia").to_dict()))
    make_adapter(base, tmp_path / "adapter", ["query", "value", "mlp"], r=4, alpha=8.0)
    written = export_peft(tmp_path / "adapter", tmp_path / "peft")
    assert written["target_modules"] == ["dense_4h_to_h", "dense_h_to_4h", "query_key_value"]
    assert (written["r"], written["lora_alpha"]) == (4, 8.0)
    assert written["rank_pattern"] == {"query_key_value": 8} and written["alpha_pattern"] == {"query_key_value": 16.0}
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert tensors["base_model.model.gpt_neox.layers.0.attention.query_key_value.lora_A.weight"].shape == (8, 64)
    assert tensors["base_model.model.gpt_neox.layers.0.attention.query_key_value.lora_B.weight"].shape == (192, 8)


def test_export_peft_refusals_are_one_line(tmp_path, capsys, monkeypatch):
    # DoRA on part of a fused q/k/v layer needs the base weights, which are gone
    from hf_tiny import tiny_hf_config

    from lora_lab.formats.hf import config_from_hf

    base = make_base(tmp_path / "base", config_from_hf(tiny_hf_config("pythia").to_dict()))
    make_adapter(base, tmp_path / "adapter", ["query"], use_dora=True)
    moved = tmp_path / "moved"
    base.rename(moved)
    result = run("lora_lab.export_peft", "--adapter_dir", tmp_path / "adapter", "--out_dir", tmp_path / "peft")
    assert_one_line_error(result, "DoRA", "query_key_value", "--checkpoint_dir")
    from lora_lab.formats.peft import main

    result = run_in_process(main, "--adapter_dir", tmp_path / "adapter", "--out_dir", tmp_path / "peft",
                            "--checkpoint_dir", moved, capsys=capsys, monkeypatch=monkeypatch)
    assert result.returncode == 0, result.stderr

    # a base model no Hugging Face architecture can express (LayerNorm with GeGLU)
    odd = make_base(tmp_path / "odd", Config(**dict(LLAMA, norm_class="LayerNorm", mlp_class="geglu")))
    make_adapter(odd, tmp_path / "odd-adapter", ["query"])
    result = run_in_process(main, "--adapter_dir", tmp_path / "odd-adapter", "--out_dir", tmp_path / "p2",
                            capsys=capsys, monkeypatch=monkeypatch)
    assert_one_line_error(result, "no Hugging Face architecture")


def test_export_peft_base_id_known_given_or_said(tmp_path, capsys):
    """base_model_name_or_path: the Hub id the base knows (a config named like one of ours, e.g. a GGUF converted to
    SmolLM2-135M-Instruct, knows HuggingFaceTB's), else --base_model_name_or_path, else null and one line saying
    what to do (PEFT's AutoPeftModel would try the Hub for nothing)."""
    from pathlib import Path

    from lora_lab.config import Config
    from lora_lab.formats.gguf_import import model_name_of
    from lora_lab.formats.peft import main as export_peft_main

    assert model_name_of(Path("SmolLM2-135M-Instruct.Q4_1.gguf")) == "SmolLM2-135M-Instruct"
    assert model_name_of(Path("llama-2-7b-chat.Q4_K_M.gguf")) == "llama-2-7b-chat"
    assert model_name_of(Path("merged.f16.gguf")) == "merged" and model_name_of(Path("q8_0.gguf")) == "q8_0"
    smol = Config.from_name("SmolLM2-135M-Instruct", hf_repo="")
    assert smol.known_hf_repo() == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert Config.from_name("SmolLM2-135M-Instruct", hf_repo="", n_layer=2).known_hf_repo() == ""  # other shape

    config = Config(name="tiny", block_size=64, vocab_size=64, n_layer=2, n_embd=16, n_head=2, n_query_groups=2,
                    intermediate_size=32, norm_class="RMSNorm", mlp_class="swiglu", bias=False)
    base = make_base(tmp_path / "base", config)
    make_adapter(base, tmp_path / "adapter", ["query", "value"])
    capsys.readouterr()
    export_peft_main(adapter_dir=tmp_path / "adapter", out_dir=tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    notes = [line for line in capsys.readouterr().err.splitlines() if "Hub id is unknown" in line]
    assert len(notes) == 1 and "--base_model_name_or_path" in notes[0] and "convert --to hf" in notes[0]
    export_peft_main(adapter_dir=tmp_path / "adapter", out_dir=tmp_path / "peft2", base_model_name_or_path="me/tiny")
    assert json.loads((tmp_path / "peft2" / "adapter_config.json").read_text())["base_model_name_or_path"] == "me/tiny"
    assert "Hub id is unknown" not in capsys.readouterr().err
