"""QLoRA: LoRA on an NF4-quantized base (lora_lab/lora.py + lora_lab/nf4.py), finetune/qlora.py, the merge into a
16-bit model, and (slow, real weights) a QLoRA fine-tune of SmolLM2-135M against the same LoRA fine-tune."""

from __future__ import annotations

import copy
import csv
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

from conftest import require_asset
from lora_lab.config import Config
from lora_lab.generate import generate
from lora_lab.lora import (LoRAConfig, LoRALinear, count_parameters, inject_lora, load_lora, load_lora_state_dict,
                           lora_modules, lora_state_dict, mark_only_lora_trainable, merge_lora_into_dequantized,
                           save_lora)
from lora_lab.model import GPT
from lora_lab.nf4 import (NF4_BUFFERS, NF4Linear, dequantize_nf4, holds_nf4, model_size_report, nf4_state_of,
                          quantize_nf4)
from lora_lab.utils import LoraLabError
from lora_lab.args import call_flat


def tiny_config(**kw) -> Config:
    base = dict(name="tiny", block_size=32, vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_query_groups=2,
                intermediate_size=48)
    return Config(**{**base, **kw})


CONFIGS = {
    "llama-gqa": tiny_config(),
    "neox-gelu-bias": tiny_config(n_query_groups=4, parallel_residual=True, norm_class="LayerNorm", mlp_class="gelu",
                                  bias=True, rotary_percentage=0.25, lm_head_bias=True),
    "tied-mqa": tiny_config(n_query_groups=1, tie_embeddings=True, attn_qkv_bias=True),
}


def tokens(config: Config, B: int = 2, T: int = 12) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (B, T))


def float_model(config: Config, scale: float = 3.0) -> GPT:
    """A random model with larger weights than the default init: logits far apart, no near-ties in argmax."""
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model


def qlora_and_reference(config: Config, targets=("query", "value"), **lora_kw) -> tuple[GPT, GPT]:
    """(NF4 model + LoRA, float model + LoRA) where the float model's weights are the dequantized NF4 weights and
    the adapters are the same random (non-zero) tensors: both compute the same function."""
    base = float_model(config)
    qmodel = quantize_nf4(copy.deepcopy(base))
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, m in qmodel.named_modules():
            if isinstance(m, NF4Linear):
                ref.get_submodule(name).weight.copy_(m.dequantize(torch.float32))
    inject_lora(qmodel, targets=targets, **lora_kw)
    inject_lora(ref, targets=targets, **lora_kw)
    with torch.no_grad():
        for _, m in lora_modules(qmodel):
            m.lora_B.normal_(0, 0.1)
    load_lora_state_dict(ref, lora_state_dict(qmodel))
    return qmodel, ref


# ---- the fast CPU dequantization -------------------------------------------------------------------------------
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,blocksize", [((96, 80), 64), ((33, 71), 64), ((40, 30), 6), ((9, 14), 2),
                                             ((5,), 64), ((130, 64), 128)])
def test_chunked_cpu_dequantize_is_bit_identical_to_the_plain_one(monkeypatch, shape, blocksize, out_dtype):
    """_dequantize_cpu (byte table, chunks) against _dequantize_flat, for many chunks (CPU_CHUNK made tiny),
    block sizes that are not multiples of 4, partial last blocks, odd element counts and every output dtype."""
    import lora_lab.nf4 as nf4

    monkeypatch.setattr(nf4, "CPU_CHUNK", 96)
    w = torch.randn(shape) * torch.rand(shape[0], *[1] * (len(shape) - 1)) * 4  # scales that vary by row
    for double_quant in (True, False):
        packed, state = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
        absmax = state.block_absmax()
        flat = nf4._dequantize_flat(packed.view(-1), state.code, absmax, state.numel, blocksize, out_dtype)
        fast = dequantize_nf4(packed, state, out_dtype)
        assert fast.dtype == out_dtype and fast.shape == w.shape
        assert torch.equal(fast.view(-1), flat)
        # packed bytes at an odd offset in their storage (e.g. a slice of a larger buffer) give the same values
        shifted = torch.cat([torch.zeros(1, 1, dtype=torch.uint8), packed])[1:]
        assert shifted.storage_offset() == 1
        assert torch.equal(dequantize_nf4(shifted, state, out_dtype), fast)


# ---- LoRA on an NF4 base --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIGS)
def test_b_zero_gives_the_nf4_models_logits_exactly(name):
    config = CONFIGS[name]
    model = quantize_nf4(float_model(config))
    idx = tokens(config)
    with torch.no_grad():
        nf4_logits = model(idx)
        inject_lora(model, r=4, targets="all")
        assert torch.equal(model(idx), nf4_logits)
    # every targeted linear layer kept its 4-bit weight; lm_head is not quantized, so its LoRA has a float base
    for layer_name, m in lora_modules(model):
        assert holds_nf4(m) == (layer_name != "lm_head"), layer_name
    assert not any(isinstance(m, (NF4Linear, nn.Linear)) for m in model.modules())  # all are LoRA layers now


def test_lora_layer_keeps_the_nf4_buffers_under_nf4linears_names():
    config = CONFIGS["neox-gelu-bias"]
    model = quantize_nf4(float_model(config))
    nf4_sd = model.state_dict()
    q_proj = model.blocks[0].attn.q_proj
    buffers = {name: getattr(q_proj, name) for name in NF4_BUFFERS}
    inject_lora(model, r=4, targets=("query", "value"))
    lora = model.blocks[0].attn.q_proj
    assert isinstance(lora, LoRALinear) and lora.quant_type == "nf4"
    for name, t in buffers.items():
        assert getattr(lora, name) is t, name  # the same tensors: nothing was copied or dequantized
    assert lora.weight.dtype == torch.uint8 and lora.bias is q_proj.bias
    assert lora.lora_A.dtype == lora.lora_B.dtype == torch.float32  # the dtype the base was quantized from
    # the state dict: the NF4 model's keys and tensors, plus only the adapters
    sd = model.state_dict()
    lora_keys = {k for k in sd if k.rsplit(".", 1)[-1].startswith("lora_")}
    assert set(sd) - lora_keys == set(nf4_sd)
    assert all(torch.equal(sd[k], v) for k, v in nf4_sd.items())
    # the adapter keys are those of LoRA on the float model
    float_lora = inject_lora(GPT(config), r=4, targets=("query", "value"))
    assert set(lora_state_dict(model)) == set(lora_state_dict(float_lora)) == lora_keys
    assert "nf4 base" in repr(lora)


def test_only_lora_parameters_train_and_the_nf4_base_is_unchanged():
    config = CONFIGS["tied-mqa"]
    model = inject_lora(quantize_nf4(float_model(config, scale=1.0)), r=4, targets="all")
    mark_only_lora_trainable(model)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # every parameter to AdamW with weight decay: requires_grad=False alone must keep the base untouched
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    idx = tokens(config)
    model.train()
    for _ in range(3):
        loss = model(idx[:, :-1], labels=idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for k, v in after.items():
        if "lora_" in k:
            assert not torch.equal(v, before[k]), k
        else:
            assert torch.equal(v, before[k]), k  # packed codes, statistics, norms, embedding, biases


@pytest.mark.parametrize("name", ["llama-gqa", "neox-gelu-bias"])
def test_gradients_match_a_float_model_on_the_dequantized_weights(name):
    config = CONFIGS[name]
    qmodel, ref = qlora_and_reference(config, r=4, targets=("query", "value"))
    for model in (qmodel, ref):
        mark_only_lora_trainable(model)
    idx = tokens(config)
    logits_q, logits_ref = qmodel(idx), ref(idx)
    assert_close(logits_q, logits_ref)
    g = torch.randn_like(logits_q)
    logits_q.backward(g)
    logits_ref.backward(g)
    grads_q = {n: p.grad for n, p in qmodel.named_parameters() if p.requires_grad}
    grads_ref = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert set(grads_q) == set(grads_ref) and len(grads_q) == 4 * config.n_layer
    for n, grad in grads_q.items():
        assert grad is not None and grad.abs().sum() > 0, n  # through the NF4 MLPs and o_proj of later layers too
        assert_close(grad, grads_ref[n], msg=n)


def test_backward_keeps_no_dequantized_weight():
    """The QLoRA memory saving: between forward and backward no full-precision copy of an NF4 weight is kept."""
    linear = nn.Linear(128, 64)
    lora = LoRALinear.from_linear(NF4Linear.from_linear(linear), r=4)
    lora.lora_B.data.normal_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(3, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora(x)
    assert saved and not any(t.is_floating_point() and t.numel() >= 128 * 64 for t in saved)
    y.sum().backward()
    w = lora.base_weight()
    expected = (w + lora.scaling * lora.lora_B @ lora.lora_A).sum(0).expand(3, 128)  # d/dx sum(x W'^T)
    assert_close(x.grad, expected)


@pytest.mark.parametrize("lora_dtype", [None, torch.float32])
def test_bfloat16_model_dequantizes_to_the_compute_dtype(lora_dtype):
    """A bf16 run (bf16-true on a GPU, which casts the model after the scripts inject LoRA): adapters in bf16,
    or float32 ones injected after the cast with lora_dtype; the base dequantized to bf16 from float32 statistics."""
    config = CONFIGS["llama-gqa"]
    model = quantize_nf4(float_model(config))
    if lora_dtype is None:
        inject_lora(model, r=4, targets=("query", "value"))
        model.to(torch.bfloat16)  # what Fabric's bf16-true precision does
    else:
        model.to(torch.bfloat16)
        inject_lora(model, r=4, targets=("query", "value"), lora_dtype=lora_dtype)
    q = model.blocks[0].attn.q_proj
    assert q.weight.dtype == torch.uint8 and q.weight_absmax.dtype == torch.uint8  # double quantization: 8-bit codes
    assert q.weight_code.dtype == q.weight_nested_absmax.dtype == q.weight_offset.dtype == torch.float32
    assert q.lora_A.dtype == (lora_dtype or torch.bfloat16)
    x = torch.randn(2, 5, config.n_embd, dtype=torch.bfloat16)
    w = dequantize_nf4(q.weight, nf4_state_of(q), torch.bfloat16)  # float32 products rounded once to bf16
    assert torch.equal(q.base_weight(torch.bfloat16), w)
    assert torch.equal(q.base_forward(x), F.linear(x, w))
    assert q(x).dtype == torch.bfloat16
    idx = tokens(config)
    logits = model(idx)
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert q.lora_A.grad.dtype == q.lora_B.grad.dtype == q.lora_A.dtype
    assert q.lora_B.grad.abs().sum() > 0  # (B = 0 at the start: A's gradient is zero until B moves)


def test_qdora_starts_at_the_nf4_model_and_trains():
    config = CONFIGS["llama-gqa"]
    model = quantize_nf4(float_model(config))
    idx = tokens(config)
    nf4_logits = model(idx).detach()
    inject_lora(model, r=4, targets="all", use_dora=True)
    q = model.blocks[0].attn.q_proj
    assert_close(q.lora_magnitude, torch.linalg.vector_norm(q.base_weight(), dim=1), rtol=0, atol=0)
    assert torch.equal(model(idx), nf4_logits)
    mark_only_lora_trainable(model)
    model(idx).pow(2).mean().backward()
    assert q.lora_magnitude.grad is not None and q.lora_magnitude.grad.abs().sum() > 0


def test_quantizing_after_injecting_adapters_is_refused_in_one_line():
    """quantize_nf4 swaps plain nn.Linear layers only: a LoRA (or adapter v2) layer would silently stay float."""
    from lora_lab.adapter import inject_adapter

    model = inject_lora(float_model(CONFIGS["llama-gqa"]), r=4, targets=("query", "value"))
    with pytest.raises(LoraLabError, match=r"blocks.0.attn.q_proj is a LoRALinear.*quantize_nf4\(model\) before"):
        quantize_nf4(model)
    model = inject_adapter(float_model(CONFIGS["llama-gqa"]), adapter_start_layer=0, version=2)
    with pytest.raises(LoraLabError, match="AdapterV2Linear, not an nn.Linear"):
        quantize_nf4(model)
    # LoRA on lm_head only (skipped by default) is no obstacle
    assert holds_nf4(quantize_nf4(inject_lora(float_model(CONFIGS["llama-gqa"]), targets=("lm_head",))).blocks[0].attn.q_proj)


def test_parameter_count_and_size_report():
    config = CONFIGS["llama-gqa"]
    model = float_model(config)
    _, float_total = count_parameters(model)
    inject_lora(quantize_nf4(model), r=4, targets=("query", "value"))
    mark_only_lora_trainable(model)
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert total == float_total + trainable  # an NF4 weight counts as the parameters it stands for
    report = model_size_report(model)
    assert report["quantized_layers"] == 7 * config.n_layer  # q, k, v, o, gate, up, down (LoRA or not)
    assert report["quantized_params"] == float_total - 2 * config.vocab_size * config.n_embd - sum(
        p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert 4.1 < report["bits_per_quantized_param"] < 4.2


def test_qlora_adapter_loads_onto_the_float_base(tmp_path):
    config = CONFIGS["llama-gqa"]
    qmodel, ref = qlora_and_reference(config)
    lora_config = LoRAConfig(r=8, targets=["query", "value"],
                             base_quantization={"method": "nf4", "blocksize": 64, "double_quant": True})
    save_lora(tmp_path / "adapter", qmodel, lora_config)
    loaded_config, adapter = load_lora(tmp_path / "adapter")
    assert loaded_config == lora_config
    base = inject_lora(float_model(config), targets=("query", "value"))
    load_lora_state_dict(base, adapter)  # same keys and shapes as a LoRA adapter
    for n, t in lora_state_dict(base).items():
        assert torch.equal(t, adapter[n])
    with pytest.raises(LoraLabError, match="base_quantization"):
        LoRAConfig(base_quantization={"method": "int8"})


# ---- merging into a 16-bit model ------------------------------------------------------------------------------
def test_merge_of_a_quantized_layer_points_to_merge_lora_into_dequantized():
    lora = LoRALinear.from_linear(NF4Linear.from_linear(nn.Linear(64, 32)), r=4)
    with pytest.raises(LoraLabError, match="merge_lora_into_dequantized"):
        lora.merge()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("name", CONFIGS)
def test_merge_into_dequantized_float32_matches_nf4_plus_adapter(name, use_dora):
    config = CONFIGS[name]
    targets = ("query", "value", "mlp", "lm_head")  # lm_head: a float LoRA layer (tied in tied-mqa) merges too
    model, _ = qlora_and_reference(config, r=4, targets=targets, use_dora=use_dora)
    model.eval()
    idx = tokens(config)
    with torch.no_grad():
        expected = model(idx)
        merge_lora_into_dequantized(model, dtype=torch.float32)
        assert not any(holds_nf4(m) for m in model.modules())  # no 4-bit weight left
        assert all(m.merged for _, m in lora_modules(model))
        assert all(isinstance(model.blocks[i].attn.k_proj, nn.Linear) for i in range(config.n_layer))
        # measured: max |diff| 3e-6 to 6e-5 on logits up to ~100 (float32 rounding of W + s B A)
        assert_close(model(idx), expected, atol=1e-4, rtol=1e-4)
    sd = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    assert set(sd) == set(GPT(model.config).state_dict())  # an ordinary float checkpoint
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_merge_into_bfloat16_generates_what_nf4_plus_adapter_generates():
    config = CONFIGS["llama-gqa"]
    model, _ = qlora_and_reference(config, r=4, targets=("query", "value"))
    model.eval()
    prompt = torch.tensor([3, 17, 42, 5, 9])
    expected_ids = list(generate(model, prompt, max_new_tokens=20))
    with torch.no_grad():
        expected = model(prompt[None])
        merge_lora_into_dequantized(model, dtype=torch.bfloat16)
        q, k = model.blocks[0].attn.q_proj, model.blocks[0].attn.k_proj
        assert q.weight.dtype == k.weight.dtype == torch.bfloat16
        assert model.wte.weight.dtype == torch.bfloat16  # and so does the rest of the model
        logits = model(prompt[None])
    # measured on these tiny models: max |diff| 0.9% to 2.9% of max |logit|, mostly the bf16 arithmetic (the same
    # NF4 + adapter model run in bf16 is as far from its float32 run); a wrong merge is off by far more
    assert (logits.float() - expected).abs().max() <= 0.05 * expected.abs().max()
    assert list(generate(model, prompt, max_new_tokens=20)) == expected_ids


def test_merge_and_requantize_gives_a_4bit_model_without_adapters():
    config = CONFIGS["llama-gqa"]
    model, _ = qlora_and_reference(config, r=4, targets=("query", "value"))
    float_merged = merge_lora_into_dequantized(copy.deepcopy(model), dtype=torch.float32)
    k_proj = model.blocks[0].attn.k_proj
    merge_lora_into_dequantized(model, requantize=True)
    assert model.blocks[0].attn.k_proj is k_proj  # not adapted: left as it was
    assert not list(lora_modules(model)) and not any("lora_" in k for k in model.state_dict())
    for i in range(config.n_layer):
        for name in ("q_proj", "v_proj"):
            layer = getattr(model.blocks[i].attn, name)
            assert isinstance(layer, NF4Linear) and (layer.blocksize, layer.double_quant) == (64, True)
            # exactly NF4(dequant(W) + s B A), the float32 merge quantized once more
            packed, state = quantize_nf4(getattr(float_merged.blocks[i].attn, name).weight)
            assert torch.equal(layer.weight, packed) and torch.equal(layer.weight_absmax, state.absmax)
            assert layer.dtype == torch.float32


# ---- finetune/qlora.py -----------------------------------------------------------------------------------------
def test_finetune_qlora_script_smoke(tmp_path, one_thread, capsys):
    import finetune.qlora as ft
    from tiny_checkpoint import SMOL_TOKENIZER, write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", require_asset(SMOL_TOKENIZER))
    out_dir = tmp_path / "out"
    call_flat(ft.setup, checkpoint_dir=ckpt, out_dir=out_dir, data="json_extraction", n_train=8, n_val=2, eval_samples=0,
             max_steps=2, batch_size=4, micro_batch_size=2, max_seq_length=128, learning_rate=1e-2, warmup_steps=1,
             nf4_blocksize=32, double_quant=False, lora_targets="query,mlp")
    printed = capsys.readouterr().out
    # 2 layers x 7 projections; 4 bits + a float32 scale per block of 32 = 5 bits per weight
    assert "NF4 base: 14 linear layers, 18,432 weights" in printed and "(5.000 bits each)" in printed
    lora_config, adapter = load_lora(out_dir)
    assert lora_config.base_quantization == {"method": "nf4", "blocksize": 32, "double_quant": False}
    assert lora_config.targets == ["query", "mlp"]
    with open(out_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2] and math.isfinite(float(rows[-1]["val_loss"]))
    # the adapter trained, and loads onto the float base as well as onto the NF4 base it was trained on
    assert all(adapter[k].abs().sum() > 0 for k in adapter if k.endswith("lora_B"))
    for quantize in (False, True):
        model = GPT.from_checkpoint(ckpt)
        if quantize:
            quantize_nf4(model, blocksize=32, double_quant=False)
        inject_lora(model, r=lora_config.r, targets=lora_config.targets)
        load_lora_state_dict(model, adapter)

    with pytest.raises(LoraLabError, match="nf4_blocksize"):
        call_flat(ft.setup, checkpoint_dir=ckpt, out_dir=tmp_path / "bad", nf4_blocksize=63)


# ---- real weights (slow): QLoRA against LoRA on SmolLM2-135M ---------------------------------------------------
SMOLLM_GGUF = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
# LoRA on every linear layer of the blocks, as the QLoRA paper prescribes to match 16-bit fine-tuning: the NF4
# rounding of the MLPs raises this model's validation loss from 1.05 to 1.23, which adapters on query and value
# alone cannot undo (measured with those: QLoRA 13% above LoRA after 15 steps, 24% after 30)
REAL_RUN = dict(data="json_extraction", max_steps=15, batch_size=8, micro_batch_size=8, learning_rate=2e-3,
                max_seq_length=256, n_train=200, n_val=16, eval_samples=0, warmup_steps=2, eval_interval=15,
                eval_iters=100, lora_dropout=0.0, seed=1234,
                lora_targets=("query", "key", "value", "projection", "mlp"))


@pytest.fixture(scope="module")
def smollm_ckpt(tmp_path_factory):
    from lora_lab.formats.gguf_import import convert_gguf

    out = tmp_path_factory.mktemp("smollm2") / "ckpt"
    convert_gguf(require_asset(SMOLLM_GGUF), out)
    return out


def base_val_loss(ckpt, quantized: bool) -> float:
    """The validation loss before training, on the same validation batches the runs use."""
    from lora_lab import Tokenizer
    from lora_lab.data import get_dataloaders
    from lora_lab.prompts import PromptStyle

    tokenizer = Tokenizer(ckpt)
    style = PromptStyle.from_checkpoint(ckpt)
    _, val_dl, _ = get_dataloaders("json_extraction", tokenizer, style, max_seq_length=REAL_RUN["max_seq_length"],
                                   micro_batch_size=REAL_RUN["micro_batch_size"], seed=REAL_RUN["seed"],
                                   n_train=REAL_RUN["n_train"], n_val=REAL_RUN["n_val"], bucket_by_length=True,
                                   pad_id=tokenizer.eos_id or 0, verbose=False)
    model = GPT.from_checkpoint(ckpt).eval()
    if quantized:
        quantize_nf4(model)
    with torch.no_grad():
        losses = [model(b["input_ids"], labels=b["labels"]) for b in val_dl]
    return torch.stack(losses).mean().item()


def final_val_loss(out_dir) -> float:
    with open(out_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_loss")]
    return float(rows[-1]["val_loss"])


@pytest.mark.slow
def test_qlora_finetune_of_smollm2_ends_no_worse_than_lora(smollm_ckpt, tmp_path, one_thread):
    import finetune.lora as ft_lora
    import finetune.qlora as ft_qlora

    before = base_val_loss(smollm_ckpt, quantized=True)
    call_flat(ft_lora.setup, checkpoint_dir=smollm_ckpt, out_dir=tmp_path / "lora", **REAL_RUN)
    call_flat(ft_qlora.setup, checkpoint_dir=smollm_ckpt, out_dir=tmp_path / "qlora", **REAL_RUN)
    lora, qlora = final_val_loss(tmp_path / "lora"), final_val_loss(tmp_path / "qlora")
    print(f"\nval loss: NF4 base {before:.4f} | after {REAL_RUN['max_steps']} steps: LoRA {lora:.4f}, "
          f"QLoRA {qlora:.4f} ({100 * (qlora - lora) / lora:+.2f}%)")
    assert qlora < before / 2  # it learned the task
    # measured (seeds 1234, 42, 7): QLoRA ends 8%, 4% and 6% *below* LoRA; what must hold is that it is not worse
    assert qlora <= 1.03 * lora


# ---- generate/base.py --quantize nf4 ---------------------------------------------------------------------------
def test_generate_base_quantize_nf4(tmp_path, one_thread, capsys):
    import generate.base as gen
    from lora_lab import Tokenizer
    from lora_lab.prompts import PromptStyle
    from tiny_checkpoint import SMOL_TOKENIZER, write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", require_asset(SMOL_TOKENIZER))
    gen.main(checkpoint_dir=ckpt, prompt="Hello", max_new_tokens=12, temperature=0.0, quantize="nf4")
    out, err = capsys.readouterr()
    assert "NF4: 14 linear layers at 4.1" in err
    # greedy: exactly what generate() gives with the NF4 model (embedding and lm_head not quantized)
    model = quantize_nf4(GPT.from_checkpoint(ckpt).eval())
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.blocks[0].mlp.up_proj, NF4Linear)
    tokenizer, style = Tokenizer(ckpt), PromptStyle.from_checkpoint(ckpt)
    prompt_ids = tokenizer.encode(style.apply("Hello"))
    stop = tokenizer.eos_ids + style.stop_tokens(tokenizer)
    ids = [i for i in generate(model, prompt_ids, 12, eos_ids=stop) if i not in stop]
    assert out == tokenizer.decode(prompt_ids[-1:].tolist() + ids)[len(tokenizer.decode(prompt_ids[-1:])):] + "\n"


# ---- generate/lora.py: a QLoRA adapter on its NF4 base, --quantize ----------------------------------------------
def greedy_answer(model, ckpt, n: int = 12) -> str:
    """What generate/lora.py prints for the prompt "Hello" with greedy decoding, computed in process."""
    from lora_lab import Tokenizer
    from lora_lab.prompts import PromptStyle

    tokenizer, style = Tokenizer(ckpt), PromptStyle.from_checkpoint(ckpt)
    prompt_ids = tokenizer.encode(style.apply("Hello"))
    stop = tokenizer.eos_ids + style.stop_tokens(tokenizer)
    ids = [i for i in generate(model, prompt_ids, n, eos_ids=stop) if i not in stop]
    return tokenizer.decode(prompt_ids[-1:].tolist() + ids)[len(tokenizer.decode(prompt_ids[-1:])):] + "\n"


def save_random_adapter(model: GPT, ckpt, out_dir, base_quantization=None) -> GPT:
    """LoRA (r 8, all block linear layers) with strong random B on `model` (float or NF4), saved to out_dir."""
    targets = ["query", "key", "value", "projection", "mlp"]
    inject_lora(model, r=8, alpha=16, targets=targets, lora_dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.normal_(0, 0.5)
    save_lora(out_dir, model, LoRAConfig(r=8, alpha=16, targets=targets, base_model=str(ckpt),
                                         base_config=model.config.to_dict(), prompt_style="chatml",
                                         base_quantization=base_quantization))
    return model.eval()


def test_generate_lora_runs_a_qlora_adapter_on_its_nf4_base(tmp_path, one_thread, capsys):
    """A QLoRA adapter learned to correct NF4 weights: by default generate/lora.py rebuilds that base (with the
    adapter's own block size) and runs the adapter unmerged beside it; --quantize none runs the 16-bit model that
    merge_lora writes (dequantized base + update); a plain LoRA adapter runs on an NF4 base with --quantize nf4."""
    import generate.lora as gen
    from tiny_checkpoint import SMOL_TOKENIZER, write_tiny_checkpoint

    from lora_lab.checkpoint import save_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", require_asset(SMOL_TOKENIZER))
    model = GPT.from_checkpoint(ckpt)
    with torch.no_grad():  # blocks that matter next to the tied embedding, so NF4's rounding changes the answer
        for name, p in model.blocks.named_parameters():
            if p.dim() == 2:
                p.mul_(25)
    save_checkpoint(ckpt, model.config, model.state_dict(), tokenizer_dir=require_asset(SMOL_TOKENIZER))
    q = {"method": "nf4", "blocksize": 32, "double_quant": False}  # not the defaults: they must be read back
    qmodel = save_random_adapter(quantize_nf4(GPT.from_checkpoint(ckpt), blocksize=32, double_quant=False), ckpt,
                                 tmp_path / "qlora", base_quantization=q)

    def script(adapter_dir, **kw) -> tuple[str, str]:
        gen.main(adapter_dir=adapter_dir, prompt="Hello", max_new_tokens=12, temperature=0.0, **kw)
        return capsys.readouterr()

    out, err = script(tmp_path / "qlora")
    assert out == greedy_answer(qmodel, ckpt)
    assert "NF4: 14 linear layers at 5.000 bits" in err  # 4 + 32/32: a float32 absmax per block of 32
    # the test can tell: the adapter on the float base (what a merge into the 16-bit weights gives) answers otherwise
    float_plus_adapter = GPT.from_checkpoint(ckpt).eval()
    inject_lora(float_plus_adapter, r=8, alpha=16, targets=["query", "key", "value", "projection", "mlp"])
    float_plus_adapter.load_state_dict(dict(lora_state_dict(qmodel)), strict=False)
    assert greedy_answer(float_plus_adapter, ckpt) != out

    out, err = script(tmp_path / "qlora", quantize="none")
    assert out == greedy_answer(merge_lora_into_dequantized(copy.deepcopy(qmodel)), ckpt) and "NF4:" not in err

    lmodel = save_random_adapter(GPT.from_checkpoint(ckpt), ckpt, tmp_path / "lora")
    out, err = script(tmp_path / "lora", quantize="nf4")
    nf4_plus_adapter = quantize_nf4(GPT.from_checkpoint(ckpt)).eval()
    inject_lora(nf4_plus_adapter, r=8, alpha=16, targets=["query", "key", "value", "projection", "mlp"])
    load_lora_state_dict(nf4_plus_adapter, dict(lora_state_dict(lmodel)))
    assert out == greedy_answer(nf4_plus_adapter, ckpt) and "NF4: 14 linear layers at 4.1" in err
    assert script(tmp_path / "lora")[0] == greedy_answer(lmodel, ckpt)  # default for a LoRA adapter: 16-bit, merged


def test_merge_lora_cli_path_merges_a_qlora_adapter_into_the_dequantized_base(tmp_path):
    """python -m lora_lab.merge_lora on a QLoRA adapter: the merged float checkpoint computes NF4 base + adapter."""
    from lora_lab.checkpoint import save_checkpoint
    from lora_lab.formats.merge import merge_lora_checkpoint

    config = CONFIGS["llama-gqa"]
    base = float_model(config)
    save_checkpoint(tmp_path / "base", config, base.state_dict())
    qmodel = quantize_nf4(copy.deepcopy(base))
    inject_lora(qmodel, targets=("query", "value"))
    with torch.no_grad():
        for _, m in lora_modules(qmodel):
            m.lora_B.normal_(0, 0.1)
    lora_config = LoRAConfig(r=8, targets=["query", "value"], base_model=str(tmp_path / "base"),
                             base_config=config.to_dict(),
                             base_quantization={"method": "nf4", "blocksize": 64, "double_quant": True})
    save_lora(tmp_path / "adapter", qmodel, lora_config)
    merge_lora_checkpoint(None, tmp_path / "adapter", tmp_path / "merged")
    merged = GPT.from_checkpoint(tmp_path / "merged").eval()
    x = tokens(config)
    with torch.no_grad():
        assert_close(merged(x), qmodel.eval()(x), atol=1e-4, rtol=1e-4)
