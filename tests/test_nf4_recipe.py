"""One NF4 recipe: every consumer of a QLoRA adapter sees the 4-bit base it was trained on, bit for bit.

finetune/qlora.py quantizes the weights *as stored* (quantize_nf4 records its settings as model.base_quantization,
which the adapter saves); generate, evaluate (--compare's two columns), merge, the server and GGUF export must all
rebuild exactly those codes and scales, whatever --precision is. The checkpoint here is stored in float32 and read
in bfloat16 with non-default NF4 settings (blocksize 32, no double quantization): casting before quantizing, or
falling back to the defaults, gives other codes, which these tests catch.
"""

from __future__ import annotations

import pytest
import torch

from conftest import require_asset
from lora_lab.adapted import load_base, load_lora_model
from lora_lab.checkpoint import load_checkpoint
from lora_lab.evaluate.load import load_model, nf4_settings_of
from lora_lab.formats.merge import load_merged, merge_lora_checkpoint
from lora_lab.lora import LoRAConfig, inject_lora, lora_modules, merge_lora_into_dequantized, save_lora
from lora_lab.model import GPT
from lora_lab.nf4 import NF4_DEFAULTS, holds_nf4, nf4_settings, nf4_state_of, quantize_nf4

SETTINGS = {"blocksize": 32, "double_quant": False}  # not the defaults, so a loader that ignores them is caught


def nf4_tensors(model) -> dict[str, torch.Tensor]:
    """The packed codes and every statistic of each NF4 layer, by layer name (the server's multi-LoRA layers
    hold the base layer as `.base`)."""
    out = {}
    for name, m in model.named_modules():
        name = name.removesuffix(".base")
        if holds_nf4(m):
            out[f"{name}.codes"] = m.weight
            for key, t in nf4_state_of(m).tensors().items():
                out[f"{name}.{key}"] = t
    return out


def assert_same_base(model, reference: dict[str, torch.Tensor]) -> None:
    ours = nf4_tensors(model)
    assert ours.keys() == reference.keys()
    for k, t in reference.items():
        assert ours[k].dtype == t.dtype and torch.equal(ours[k], t), k


@pytest.fixture(scope="module")
def qlora(tmp_path_factory):
    """(checkpoint, adapter dir, the training model's NF4 tensors, the training model) as finetune/qlora.py makes
    them: the float32 checkpoint quantized as stored, LoRA on every target, B made non-zero."""
    from tiny_checkpoint import SMOL_TOKENIZER, write_tiny_checkpoint

    root = tmp_path_factory.mktemp("nf4_recipe")
    ckpt = write_tiny_checkpoint(root / "ckpt", require_asset(SMOL_TOKENIZER), seed=3)
    model = GPT.from_checkpoint(ckpt)
    quantize_nf4(model, **SETTINGS)
    assert model.base_quantization == {**nf4_settings(), **SETTINGS}  # what it used, recorded
    inject_lora(model, r=4, alpha=8, targets=["all"])
    torch.manual_seed(0)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.normal_(std=0.05)
    config = LoRAConfig(r=4, alpha=8, targets=["all"], base_model=str(ckpt), base_config=model.config.to_dict(),
                        prompt_style="chatml", base_quantization=model.base_quantization)
    save_lora(root / "adapter", model, config)
    return ckpt, root / "adapter", nf4_tensors(model), model


def test_quantize_nf4_records_its_settings():
    from tiny_checkpoint import tiny_config

    model = GPT(tiny_config(vocab_size=64))
    assert not hasattr(model, "base_quantization")
    quantize_nf4(model)
    assert model.base_quantization == NF4_DEFAULTS


def test_loaders_rebuild_the_trained_base(qlora):
    ckpt, adapter, reference, _ = qlora
    bf16 = torch.bfloat16
    # generate/lora.py, generate/adapter.py's base, merge (unmerged view): the adapter's own loader
    assert_same_base(load_lora_model(ckpt, adapter, quantize="nf4", merge=False, dtype=bf16), reference)
    assert_same_base(load_lora_model(None, adapter, quantize=None, merge=False, dtype=bf16), reference)
    # evaluate --compare --quantize nf4: the base column and the adapter column stand on the same 4-bit base
    nf4 = nf4_settings_of([None, adapter])
    assert_same_base(load_model(ckpt, None, quantize="nf4", dtype=bf16, nf4=nf4).model, reference)
    assert_same_base(load_model(ckpt, adapter, quantize="nf4", dtype=bf16, nf4=nf4).model, reference)
    # generate/base.py --quantize nf4 with these settings
    assert_same_base(load_base(ckpt, nf4={**nf4_settings(), **SETTINGS}, dtype=bf16), reference)


def test_cast_first_would_differ(qlora):
    """The test can tell: quantizing after the cast to bfloat16 gives other codes or scales."""
    ckpt, _, reference, _ = qlora
    model = GPT.from_checkpoint(ckpt, dtype=torch.bfloat16)
    quantize_nf4(model, **SETTINGS)
    ours = nf4_tensors(model)
    assert any(not torch.equal(ours[k].float(), reference[k].float()) for k in reference)


def test_server_takes_the_settings_from_the_adapter(qlora):
    pytest.importorskip("fastapi")
    from lora_lab.serve.server import ModelServer, served_nf4_settings

    ckpt, adapter, reference, _ = qlora
    assert served_nf4_settings({"q": adapter}) == {**nf4_settings(), **SETTINGS}
    assert served_nf4_settings({"q": adapter}, nf4_blocksize=128)["blocksize"] == 128  # a flag wins
    assert served_nf4_settings({}) == nf4_settings()
    server = ModelServer.load(ckpt, {"q": adapter}, quantize="nf4", precision="bf16-true", device="cpu",
                              max_seq_length=64, start=False)
    assert_same_base(server.model, reference)


def test_merge_and_gguf_merge_the_trained_base(qlora, tmp_path):
    ckpt, adapter, _, trained = qlora
    expected = GPT.from_checkpoint(ckpt)  # the training model's NF4 base + its LoRA, merged by the same rule
    quantize_nf4(expected, **SETTINGS)
    inject_lora(expected, r=4, alpha=8, targets=["all"], lora_dtype=torch.float32)
    expected.load_state_dict(trained.state_dict())
    merge_lora_into_dequantized(expected, dtype=torch.float32)
    want = expected.state_dict()

    merged, _ = load_merged(ckpt, adapter, torch.float32)
    got = merged.state_dict()
    for k in ("blocks.0.attn.q_proj.weight", "blocks.1.mlp.down_proj.weight"):
        assert torch.equal(got[k], want[k]), k

    merge_lora_checkpoint(None, adapter, tmp_path / "merged", dtype=torch.float32)  # python -m lora_lab.merge_lora
    sd = load_checkpoint(tmp_path / "merged")[1]
    assert torch.equal(sd["blocks.1.mlp.down_proj.weight"], want["blocks.1.mlp.down_proj.weight"])

    from lora_lab.formats.gguf_import import convert_gguf

    merge_lora_checkpoint(None, adapter, tmp_path / "merged.gguf", to="gguf", outtype="f32")
    convert_gguf(tmp_path / "merged.gguf", tmp_path / "back")
    back = GPT.from_checkpoint(tmp_path / "back").state_dict()
    assert torch.equal(back["blocks.1.mlp.down_proj.weight"], want["blocks.1.mlp.down_proj.weight"])
