"""lora_lab/adapted.py, the one adapter loader: the model it builds is the one built by hand from the primitives
(GPT.from_checkpoint, quantize_nf4, inject_lora, the adapter's tensors), bit for bit when unmerged; merged, it
computes the same logits up to rounding; a QLoRA adapter gets its NF4 base back; mistakes are one line.
Its users (generate/lora.py, generate/adapter.py, evaluation, merge_lora, the server) are tested in their own files."""

import pytest
import torch

from lora_lab.adapted import load_base, load_lora_model
from lora_lab.checkpoint import save_checkpoint
from lora_lab.config import Config
from lora_lab.lora import LoRAConfig, LoRALinear, inject_lora, load_lora, lora_modules, save_lora
from lora_lab.model import GPT
from lora_lab.nf4 import NF4Linear, holds_nf4, quantize_nf4
from lora_lab.utils import LoraLabError

CONFIG = Config(n_layer=2, n_embd=64, n_head=4, n_query_groups=2, intermediate_size=128, vocab_size=96, block_size=32)
NF4 = {"method": "nf4", "blocksize": 64, "double_quant": True}


def make(tmp_path, quantization=None, targets=("query", "value", "lm_head")):
    """A random base checkpoint and an adapter with non-zero B for it (trained on NF4 with quantization)."""
    torch.manual_seed(0)
    base = GPT(CONFIG).eval()
    save_checkpoint(tmp_path / "base", CONFIG, base.state_dict())
    model = GPT.from_checkpoint(tmp_path / "base")
    if quantization:
        quantize_nf4(model)
    inject_lora(model, r=4, alpha=8.0, targets=targets)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.normal_(0.0, 0.3)  # B = 0 (its init) would make the adapter a no-op
    save_lora(tmp_path / "adapter", model, LoRAConfig(r=4, alpha=8.0, targets=list(targets),
                                                      base_model=str(tmp_path / "base"),
                                                      base_config=CONFIG.to_dict(), base_quantization=quantization))
    return tmp_path / "base", tmp_path / "adapter"


def by_hand(base_dir, adapter_dir, nf4: bool) -> GPT:
    lora_config, tensors = load_lora(adapter_dir)
    model = GPT.from_checkpoint(base_dir).eval()
    if nf4:
        quantize_nf4(model)
    inject_lora(model, r=lora_config.r, alpha=lora_config.alpha, targets=lora_config.targets)
    assert not model.load_state_dict(tensors, strict=False).unexpected_keys
    return model


def logits(model) -> torch.Tensor:
    x = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))  # (B, T)
    with torch.no_grad():
        return model(x)  # (B, T, V)


@pytest.mark.parametrize("qlora", [False, True], ids=["lora", "qlora"])
def test_unmerged_is_the_model_built_by_hand_and_merged_computes_the_same(tmp_path, qlora):
    base_dir, adapter_dir = make(tmp_path, NF4 if qlora else None)
    reference = logits(by_hand(base_dir, adapter_dir, nf4=qlora))
    unmerged = load_lora_model(None, adapter_dir, merge=False)  # the recorded base
    assert any(isinstance(m, LoRALinear) for m in unmerged.modules())
    assert any(holds_nf4(m) for m in unmerged.modules()) == qlora  # a QLoRA adapter gets its NF4 base back
    assert torch.equal(logits(unmerged), reference)
    assert not any(m.training for m in unmerged.modules())
    merged = load_lora_model(base_dir, adapter_dir, merge=True)  # 16-bit weights: QLoRA's into the dequantized base
    assert not any(isinstance(m, NF4Linear) or holds_nf4(m) for m in merged.modules())
    assert all(m.merged for m in merged.modules() if isinstance(m, LoRALinear))
    assert not any(m.training for m in merged.modules())
    torch.testing.assert_close(logits(merged), reference, atol=2e-5 * reference.abs().max().item(), rtol=1e-5)


def test_nf4_puts_a_lora_adapter_unmerged_on_a_4_bit_base(tmp_path):
    base_dir, adapter_dir = make(tmp_path)
    model = load_lora_model(base_dir, adapter_dir, quantize="nf4", merge=True)  # 4-bit weights cannot absorb it
    assert sum(holds_nf4(m) for m in model.modules()) == 7 * CONFIG.n_layer  # q k v o gate up down; not lm_head
    assert torch.equal(logits(model), logits(by_hand(base_dir, adapter_dir, nf4=True)))
    assert torch.equal(logits(load_base(base_dir, nf4={})), logits(quantize_nf4(GPT.from_checkpoint(base_dir).eval())))


def test_mistakes_are_one_line(tmp_path):
    base_dir, adapter_dir = make(tmp_path)
    with pytest.raises(LoraLabError, match=r"^--quantize 'int8': use nf4 \(or leave it out\)$"):
        load_lora_model(base_dir, adapter_dir, quantize="int8")
    other = Config(**{**CONFIG.to_dict(), "n_embd": 32, "intermediate_size": 64})
    save_checkpoint(tmp_path / "other", other, GPT(other).state_dict())
    with pytest.raises(LoraLabError, match=r"whose shapes differ from .* \(n_embd 64 vs 32, ") as e:
        load_lora_model(tmp_path / "other", adapter_dir)
    assert "\n" not in str(e.value)
    base_dir.rename(tmp_path / "moved")  # the recorded base is gone
    with pytest.raises(LoraLabError, match="which does not exist here .*: pass --checkpoint_dir$") as e:
        load_lora_model(None, adapter_dir)
    assert "\n" not in str(e.value)
