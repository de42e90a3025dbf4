"""--lora_init (lora_lab/lora_init.py): each init against PEFT's own, step 0, and the saved (converted) adapter.

References: PEFT's LoraConfig(init_lora_weights=...) on a transformers Llama holding the same weights as our GPT,
under the same RNG state; PEFT's loftq_init run on the CPU (its source hard-codes CUDA as the compute device; we
run that same source with the device string replaced), which quantizes with bitsandbytes, bit for bit our NF4.
Random inits (gaussian, pissa_niter_N) draw per layer after PEFT's two nn.Linear constructions (A then B, Kaiming
each): the test replays those draws, then calls our per-layer function, so both read the same random numbers.

Tolerances (float32): inits 1e-5 relative to the largest entry (PEFT runs the same torch calls; the SVD's signs
agree since both call the same LAPACK routine, and are aligned anyway); logits as in test_use_adapter.py.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn as nn

from lora_lab.adapted import load_lora_model
from lora_lab.lora import LoRAConfig, inject_lora, load_lora, load_lora_state_dict, lora_modules
from lora_lab.lora_init import (gaussian_init_, init_config, init_lora, loftq_factors, parse_lora_init,
                                pissa_factors, save_trained_lora, subtract_offset)
from lora_lab.model import GPT
from lora_lab.nf4 import dequantize_nf4, nf4_state_of, quantize_nf4
from lora_lab.utils import LoraLabError
from lora_lab.args import call_flat
from test_use_adapter import LLAMA, assert_float32_close, idx, logits, make_base

R, ALPHA = 4, 8.0
TARGETS = ["query", "value", "mlp"]
PEFT_TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
NF4 = dict(blocksize=64, double_quant=False)  # PEFT's LoftQ quantizes without double quantization


def close(a, b, rel=1e-5):
    torch.testing.assert_close(a.float(), b.float(), atol=rel * b.abs().max().item(), rtol=0)


def align_signs(A, B, A_ref):
    """An SVD's singular vectors are defined up to sign: flip our pairs (row of A, column of B) to the reference's."""
    s = torch.sign((A * A_ref).sum(1, keepdim=True))  # (r, 1)
    return A * s, B * s.t()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from lora_lab.config import Config
    from lora_lab.formats.hf import export_hf

    path = tmp_path_factory.mktemp("init") / "base"
    config = Config(name="tiny-llama", **LLAMA)
    config.hf_repo = "someone/tiny"
    make_base(path, config, scale=1.0)
    export_hf(path, path.parent / "base-hf")
    return path


def peft_model(base, init, alpha=ALPHA, seed=7, **kw):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(base.parent / "base-hf", dtype=torch.float32,
                                              attn_implementation="eager").eval()
    torch.manual_seed(seed)
    return get_peft_model(hf, LoraConfig(r=R, lora_alpha=alpha, target_modules=PEFT_TARGETS, init_lora_weights=init,
                                         **kw))


def peft_layers(model) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(A, B, base weight) of PEFT's LoRA layers, in module order (ours: the same order)."""
    out = []
    for name, m in model.named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            out.append((m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach(),
                        m.get_base_layer().weight.detach()))
    return out


def ours(base, alpha=ALPHA):
    model = GPT.from_checkpoint(base).eval()
    inject_lora(model, r=R, alpha=alpha, targets=TARGETS)
    return model


def replay_peft_construction(layer):
    """The draws of PEFT's nn.Linear(in, r) and nn.Linear(r, out) (Kaiming-uniform each), before its init."""
    nn.init.kaiming_uniform_(torch.empty(layer.r, layer.in_features), a=math.sqrt(5))
    nn.init.kaiming_uniform_(torch.empty(layer.out_features, layer.r), a=math.sqrt(5))


# ---- each init against PEFT's ---------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["gaussian", "pissa", "pissa_niter_2", "olora"])
def test_init_equals_peft(base, init):
    pytest.importorskip("peft")
    reference = peft_layers(peft_model(base, init))
    model = ours(base)
    layers = list(lora_modules(model))
    assert len(layers) == len(reference) == 2 * 5
    if init in ("gaussian", "pissa_niter_2"):  # random: the same draws as PEFT, layer by layer
        torch.manual_seed(7)
        for _, layer in layers:
            replay_peft_construction(layer)
            if init == "gaussian":
                gaussian_init_(layer)
            else:
                A, B = pissa_factors(layer.weight, layer.r, layer.scaling, niter=2)
                with torch.no_grad():
                    layer.lora_A.copy_(A), layer.lora_B.copy_(B)
                    layer.weight.copy_(subtract_offset(layer.weight, layer.scaling, B, A))
    else:
        record = init_lora(model, init)
        assert set(record) == {f"{n}.{k}" for n, _ in layers for k in
                               ("lora_A", "lora_B", "offset_A", "offset_B", "offset_scale")}
    for (name, layer), (A_ref, B_ref, W_ref) in zip(layers, reference):
        A, B = layer.lora_A.detach(), layer.lora_B.detach()
        if init.startswith("pissa"):
            A, B = align_signs(A, B, A_ref)
        close(A, A_ref)
        close(B, B_ref)
        close(layer.weight, W_ref)  # the residual base (gaussian: W unchanged)
    if init == "gaussian":
        assert all(float(m.lora_B.detach().abs().max()) == 0 for _, m in layers)


def peft_loftq_on_cpu():
    """PEFT's own loftq_init, with its hard-coded CUDA compute device replaced by the CPU."""
    import peft.utils.loftq_utils as lu

    source = inspect.getsource(lu.loftq_init)
    line = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    assert line in source, "PEFT's loftq_init changed: update this test"
    namespace = dict(vars(lu))
    exec(source.replace(line, 'compute_device = "cpu"'), namespace)
    return namespace["loftq_init"]


@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_equals_peft_and_starts_closer_to_w_than_nf4(base, iters):
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    peft_loftq = peft_loftq_on_cpu()
    model = ours(base, alpha=R)  # PEFT's LoftQ ignores the scale s (right for alpha = r only): compare at s = 1
    originals = {n: m.weight.detach().clone() for n, m in lora_modules(model)}
    record = init_lora(model, "loftq", nf4=NF4, loftq_iter=iters)
    for name, layer in lora_modules(model):
        W = originals[name]
        Q_ref, A_ref, B_ref = peft_loftq(W, num_bits=4, reduced_rank=R, num_iter=iters)
        Q = dequantize_nf4(layer.weight, nf4_state_of(layer), torch.float32)
        assert torch.equal(Q, Q_ref)  # the same NF4 codes and scales as bitsandbytes'
        close(layer.lora_A, A_ref)
        close(layer.lora_B, B_ref)
        # step 0: closer to W than the quantized base alone, and closer than plain QLoRA's NF4(W)
        packed, state = quantize_nf4(W, **NF4)
        plain = dequantize_nf4(packed, state, torch.float32)
        start = Q + layer.scaling * layer.lora_B @ layer.lora_A
        assert (W - start).norm() < 0.9 * (W - Q).norm()
        assert (W - start).norm() < (W - plain).norm()
        assert (f"{name}.offset_A" in record) == (iters > 1)  # T = 1 quantizes W itself


def test_loftq_scales_with_alpha():
    """s B A = L R whatever alpha is (PEFT's B A = L R holds only at alpha = r)."""
    W = torch.randn(48, 32)
    A1, B1, *_ = loftq_factors(W, 4, 1.0, NF4)
    A2, B2, *_ = loftq_factors(W, 4, 4.0, NF4)
    close(4.0 * B2 @ A2, B1 @ A1)


# ---- step 0 ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_float_step_0_is_the_base_model(base, init):
    x = idx()
    expected = logits(GPT.from_checkpoint(base).eval(), x)
    model = ours(base)
    init_lora(model, init)
    assert all(float(m.lora_B.detach().abs().max()) > 0 for _, m in lora_modules(model))  # the adapter holds part of W
    assert_float32_close(logits(model, x), expected)


def test_qpissa_quantizes_the_residual_closer_to_w(base):
    model = ours(base)
    originals = {n: m.weight.detach().clone() for n, m in lora_modules(model)}
    init_lora(model, "pissa", nf4=NF4)
    for name, layer in lora_modules(model):
        W = originals[name]
        packed, state = quantize_nf4(W, **NF4)
        plain = dequantize_nf4(packed, state, torch.float32)
        start = layer.base_weight(torch.float32) + layer.scaling * layer.lora_B @ layer.lora_A
        assert (W - start).norm() < (W - plain).norm()


# ---- saved, converted, reproduced -----------------------------------------------------------------------------
def train_a_little(model, steps=3):
    """A few AdamW steps on random tokens: A and B move away from their init."""
    for p in model.parameters():
        p.requires_grad = any(p is m.lora_A or p is m.lora_B for _, m in lora_modules(model))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(5))
    for _ in range(steps):
        loss = model(x, labels=x)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


CASES = [("pissa", None, False), ("olora", None, True), ("pissa_niter_2", NF4, False),
         ("loftq", dict(NF4, double_quant=True), False)]


@pytest.mark.parametrize("init,nf4,rslora", CASES)
def test_trained_adapter_is_reproduced_from_the_original_checkpoint(base, tmp_path, init, nf4, rslora):
    peft = pytest.importorskip("peft")
    model = GPT.from_checkpoint(base)
    inject_lora(model, r=R, alpha=ALPHA, targets=TARGETS, use_rslora=rslora)
    record = init_lora(model, init, nf4=nf4, loftq_iter=2)
    if nf4:
        from lora_lab.nf4 import quantize_nf4 as quantize_model
        quantize_model(model, **nf4)
    train_a_little(model)
    x = idx()
    trained = logits(model, x)
    config = LoRAConfig(r=R, alpha=ALPHA, targets=TARGETS, use_rslora=rslora, base_model=str(base),
                        base_config=model.config.to_dict(),
                        base_quantization=dict(method="nf4", **nf4) if nf4 else None,
                        init=init_config(init, 2))
    save_trained_lora(tmp_path / "adapter", model, config, record)

    saved, tensors = load_lora(tmp_path / "adapter")
    assert (saved.r, saved.init["trained_r"], saved.init["method"]) == (2 * R, R, init.split("_")[0])
    assert math.isclose(saved.alpha / (math.sqrt(saved.r) if rslora else saved.r), model_scaling(model))
    # generate / evaluate / merge: the trained model, from the untouched checkpoint
    rebuilt = load_lora_model(None, tmp_path / "adapter", merge=False)
    if nf4:  # the NF4 residual base rebuilt bit for bit
        assert torch.equal(logits(rebuilt, x), trained)
    else:
        assert_float32_close(logits(rebuilt, x), trained)
    assert_float32_close(logits(load_lora_model(None, tmp_path / "adapter", merge=True), x), trained)

    # the converted adapter as an ordinary LoRA on the float checkpoint (what the server, PEFT and GGUF export get)
    plain = GPT.from_checkpoint(base).eval()
    inject_lora(plain, r=saved.r, alpha=saved.alpha, targets=saved.targets, use_rslora=rslora)
    load_lora_state_dict(plain, tensors)
    converted = logits(plain, x)
    if not nf4:
        assert_float32_close(converted, trained)
    else:  # off by the quantization error of the residual base only, below plain QLoRA's |W - NF4(W)|
        for (name, m), (_, c) in zip(lora_modules(model), lora_modules(plain)):
            W = c.weight.detach()
            packed, state = quantize_nf4(W, **nf4)
            err = (W + c.delta_weight()) - (m.base_weight(torch.float32) + m.delta_weight())
            assert err.norm() < (W - dequantize_nf4(packed, state, torch.float32)).norm(), name

    # PEFT loading our exported adapter on the original base gives our (converted) logits
    from transformers import AutoModelForCausalLM

    from lora_lab.formats.peft import export_peft
    export_peft(tmp_path / "adapter", tmp_path / "peft")
    hf = AutoModelForCausalLM.from_pretrained(base.parent / "base-hf", dtype=torch.float32,
                                              attn_implementation="eager").eval()
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()(input_ids=x).logits
    assert_float32_close(got, converted)
    if init == "pissa":  # llama.cpp's LoRA GGUF: the same ordinary rank-2r adapter, scale alpha' / 2r = alpha / r
        from gguf import GGUFReader

        from lora_lab.formats.gguf_adapter import write_gguf_adapter
        summary = write_gguf_adapter(tmp_path / "adapter", tmp_path / "adapter.gguf", progress=False)
        assert (summary["r"], summary["alpha"]) == (2 * R, 2 * ALPHA)
        shapes = {t.name: tuple(t.shape) for t in GGUFReader(str(tmp_path / "adapter.gguf")).tensors}
        assert len(shapes) == 2 * len(list(lora_modules(model))) and 2 * R in next(iter(shapes.values()))


def model_scaling(model):
    return next(m for _, m in lora_modules(model)).scaling


# ---- refusals -------------------------------------------------------------------------------------------------
def test_bad_inits_are_one_line():
    assert parse_lora_init("pissa_niter_16") == {"method": "pissa", "niter": 16}
    for bad, fragment in [("eva2", "use one of"), ("pissa_niter_N", "use one of"), ("pissa_niter_0", "at least 1"),
                          ("PiSSA", "use one of")]:
        with pytest.raises(LoraLabError, match=fragment):
            parse_lora_init(bad)
    from lora_lab.config import Config

    model = GPT(Config(name="t", **LLAMA))
    inject_lora(model, r=R, targets=TARGETS)
    with pytest.raises(LoraLabError, match="only helps a quantized base"):
        init_lora(model, "loftq")
    dora = GPT(model.config)
    inject_lora(dora, r=R, targets=TARGETS, use_dora=True)
    with pytest.raises(LoraLabError, match="DoRA"):
        init_lora(dora, "pissa")


# ---- the scripts ----------------------------------------------------------------------------------------------
SCRIPT_RUN = dict(data="json_extraction", n_train=8, n_val=2, eval_samples=0, max_steps=2, batch_size=4,
                  micro_batch_size=2, max_seq_length=128, learning_rate=1e-2, warmup_steps=1, lora_dropout=0.0,
                  lora_r=4, lora_alpha=8.0, lora_targets="query,value,mlp", seed=7)


def rebuilt_from_train_state(ckpt, out_dir, init, nf4=None, loftq_iter=1):
    """What the script trained: the checkpoint, the same (deterministic) init, the rank-r A, B of the resume state."""
    from lora_lab.training import TRAIN_STATE_FILE, load_train_state

    model = GPT.from_checkpoint(ckpt).eval()
    inject_lora(model, r=4, alpha=8.0, targets=TARGETS)
    init_lora(model, init, nf4=nf4, loftq_iter=loftq_iter)
    if nf4:
        quantize_nf4(model, **nf4)
    load_lora_state_dict(model, load_train_state(out_dir / TRAIN_STATE_FILE)["lora"])
    return model


def test_finetune_lora_pissa_saves_the_converted_adapter(tiny_ckpt, tmp_path, capsys, one_thread):
    import finetune.lora as ft

    call_flat(ft.setup, checkpoint_dir=tiny_ckpt, out_dir=tmp_path / "out", lora_init="pissa", **SCRIPT_RUN)
    assert "--lora_init pissa: " in capsys.readouterr().out
    config, _ = load_lora(tmp_path / "out")
    assert (config.r, config.alpha) == (8, 16.0)  # rank 2r, the same scale alpha / r
    assert config.init == {"method": "pissa", "trained_r": 4, "trained_alpha": 8.0,
                           "base_offset": "lora_base.safetensors"}
    x = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    trained = logits(rebuilt_from_train_state(tiny_ckpt, tmp_path / "out", "pissa"), x)
    base = logits(GPT.from_checkpoint(tiny_ckpt).eval(), x)
    assert not torch.allclose(trained, base, atol=1e-3)  # it trained
    for merge in (False, True):  # generate/lora.py, evaluate, merge_lora: the ordinary rank-8 adapter on the checkpoint
        assert_float32_close(logits(load_lora_model(None, tmp_path / "out", merge=merge), x), trained)


def test_finetune_qlora_loftq_is_rebuilt_bit_for_bit(tiny_ckpt, tmp_path, capsys, one_thread):
    import finetune.qlora as ft

    call_flat(ft.setup, checkpoint_dir=tiny_ckpt, out_dir=tmp_path / "out", lora_init="loftq", loftq_iter=2, nf4_blocksize=32,
             double_quant=False, **SCRIPT_RUN)
    assert "--lora_init loftq: " in capsys.readouterr().out
    config, _ = load_lora(tmp_path / "out")
    assert config.init == {"method": "loftq", "loftq_iter": 2, "trained_r": 4, "trained_alpha": 8.0,
                           "base_offset": "lora_base.safetensors"}
    x = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    nf4 = dict(blocksize=32, double_quant=False)
    trained = logits(rebuilt_from_train_state(tiny_ckpt, tmp_path / "out", "loftq", nf4, 2), x)
    assert torch.equal(logits(load_lora_model(None, tmp_path / "out", merge=False), x), trained)


def test_script_refusals_are_one_line_before_loading(tiny_ckpt, tmp_path):
    import finetune.dpo as dpo
    import finetune.lora as ft
    import finetune.qlora as qft

    with pytest.raises(LoraLabError, match="only helps a quantized base"):
        call_flat(ft.setup, checkpoint_dir=tmp_path / "missing", lora_init="loftq")  # checked before the checkpoint is read
    with pytest.raises(LoraLabError, match="use one of kaiming, gaussian, pissa"):
        call_flat(qft.setup, checkpoint_dir=tmp_path / "missing", lora_init="evaa")
    with pytest.raises(LoraLabError, match="runs on one device"):
        call_flat(qft.setup, checkpoint_dir=tmp_path / "missing", lora_init="eva", devices=2)
    with pytest.raises(LoraLabError, match="not preference pairs"):
        call_flat(dpo.setup, checkpoint_dir=tmp_path / "missing", lora_init="eva")
    with pytest.raises(LoraLabError, match="--loftq_iter 0"):
        call_flat(qft.setup, checkpoint_dir=tmp_path / "missing", lora_init="loftq", loftq_iter=0)
    with pytest.raises(LoraLabError, match="DoRA"):
        call_flat(ft.setup, checkpoint_dir=tmp_path / "missing", lora_init="olora", use_dora=True)
    with pytest.raises(LoraLabError, match="only helps a quantized base"):
        call_flat(dpo.setup, checkpoint_dir=tmp_path / "missing", lora_init="loftq")


def test_tied_lm_head_gets_its_own_residual_and_loftq_leaves_it_float():
    from lora_lab.config import Config
    from test_use_adapter import LLAMA_TIED, random_base

    x = idx()
    base = random_base(Config(name="tied", **LLAMA_TIED), scale=1.0)
    expected = logits(base, x)
    embedding = base.wte.weight.detach().clone()
    inject_lora(base, r=R, alpha=ALPHA, targets=["query", "lm_head"])
    init_lora(base, "pissa")
    assert torch.equal(base.wte.weight, embedding) and base.lm_head.weight is not base.wte.weight
    assert_float32_close(logits(base, x), expected)

    quantized = random_base(Config(name="tied", **LLAMA_TIED), scale=1.0)
    inject_lora(quantized, r=R, alpha=ALPHA, targets=["query", "lm_head"])
    record = init_lora(quantized, "loftq", nf4=NF4)
    assert quantized.lm_head.quant_type is None and float(quantized.lm_head.lora_B.detach().abs().max()) == 0
    assert quantized.blocks[0].attn.q_proj.quant_type == "nf4" and record["lm_head.lora_B"].abs().max() == 0


def test_finetune_dpo_with_pissa_saves_the_converted_adapter(tiny_ckpt, tmp_path, one_thread):
    """DPO's reference is the policy at step 0: with pissa that is exactly the base model; the adapter is converted."""
    import finetune.dpo as dpo
    from test_dpo import PAIRS

    (tmp_path / "pairs.json").write_text(__import__("json").dumps(PAIRS[:8]))
    call_flat(dpo.setup, checkpoint_dir=tiny_ckpt, data=str(tmp_path / "pairs.json"), out_dir=tmp_path / "out", max_steps=1,
              batch_size=4, micro_batch_size=2, max_seq_length=128, eval_samples=0, lora_r=4, lora_alpha=8.0,
              lora_init="pissa", lora_targets="query,value", lora_dropout=0.0)
    config, tensors = load_lora(tmp_path / "out")
    assert (config.r, config.init["method"], config.init["trained_r"]) == (8, "pissa", 4)
    assert config.trained_with["method"] == "dpo"
    x = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    model = GPT.from_checkpoint(tiny_ckpt).eval()
    inject_lora(model, r=4, alpha=8.0, targets=["query", "value"])
    init_lora(model, "pissa")
    from lora_lab.training import TRAIN_STATE_FILE, load_train_state
    load_lora_state_dict(model, load_train_state(tmp_path / "out" / TRAIN_STATE_FILE)["lora"])
    assert_float32_close(logits(load_lora_model(None, tmp_path / "out"), x), logits(model, x))


# ---- EVA: A from the training inputs (lora_lab/eva.py) ------------------------------------------------------
def eva_batches():
    """Three micro-batches of 2 x 16 tokens; the first 5 of each row are 'prompt' (not trained: left out)."""
    g = torch.Generator().manual_seed(11)
    batches = []
    for _ in range(3):
        x = torch.randint(0, 96, (2, 16), generator=g)
        labels = x.clone()
        labels[:, :5] = -100
        batches.append({"input_ids": x, "labels": labels})
    return batches


def test_eva_equals_peft_and_saves_as_a_plain_lora(base, tmp_path):
    peft = pytest.importorskip("peft")
    from lora_lab.eva import eva_init
    from lora_lab.formats.peft import export_peft

    batches = eva_batches()
    reference = peft_model(base, "eva", eva_config=peft.EvaConfig(rho=1.0))  # rho 1: every layer keeps rank r
    peft.initialize_lora_eva_weights(reference, dataloader=[dict(b, attention_mask=torch.ones_like(b["input_ids"]))
                                                            for b in batches], show_progress_bar=False)
    model = ours(base)
    x = idx()
    expected = logits(GPT.from_checkpoint(base).eval(), x)
    rng = torch.get_rng_state()
    stats = eva_init(model, batches)
    assert torch.equal(torch.get_rng_state(), rng) and stats["not_converged"] == [] and stats["batches"] > 3
    layers = list(lora_modules(model))
    for (name, layer), (A_ref, B_ref, _) in zip(layers, peft_layers(reference), strict=True):
        assert torch.equal(layer.lora_B, B_ref) and float(B_ref.abs().max()) == 0, name
        close(layer.lora_A.detach(), A_ref, rel=1e-4)  # the same signs: both make each row's largest entry positive
    # layers that read the same input (query, value; gate, up) got the same A, orthonormal rows
    assert torch.equal(model.blocks[0].attn.q_proj.lora_A, model.blocks[0].attn.v_proj.lora_A)
    A = model.blocks[1].mlp.down_proj.lora_A.detach()
    close(A @ A.t(), torch.eye(R))
    assert_float32_close(logits(model, x), expected)  # step 0: the base model (B = 0)

    # trained, it is an ordinary LoRA: saved as it is, loaded back, and PEFT gives our logits from our export
    train_a_little(model)
    trained = logits(model, x)
    config = LoRAConfig(r=R, alpha=ALPHA, targets=TARGETS, base_model=str(base), base_config=model.config.to_dict(),
                        init=init_config("eva"))
    save_trained_lora(tmp_path / "adapter", model, config)
    saved, _ = load_lora(tmp_path / "adapter")
    assert (saved.r, saved.init) == (R, {"method": "eva"})
    assert_float32_close(logits(load_lora_model(None, tmp_path / "adapter"), x), trained)
    from transformers import AutoModelForCausalLM

    export_peft(tmp_path / "adapter", tmp_path / "peft")
    hf = AutoModelForCausalLM.from_pretrained(base.parent / "base-hf", dtype=torch.float32,
                                              attn_implementation="eager").eval()
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()(input_ids=x).logits
    assert_float32_close(got, trained)


class StatefulBatches(list):
    """A list of batches with a batch sampler whose position a DataLoader would advance."""

    class Sampler:
        position = 0

        def state_dict(self):
            return {"position": self.position}

        def load_state_dict(self, state):
            self.position = state["position"]

    def __init__(self, batches):
        super().__init__(batches)
        self.batch_sampler = self.Sampler()

    def __iter__(self):
        for b in super().__iter__():
            self.batch_sampler.position += 1
            yield b


def test_eva_leaves_the_loader_where_it_was_and_refuses_too_few_tokens(base):
    from lora_lab.eva import eva_init

    batches = StatefulBatches(eva_batches())
    model = ours(base)
    assert eva_init(model, batches, max_batches=4)["batches"] == 4 and batches.batch_sampler.position == 0
    for b in batches:
        b["labels"][:, 1:] = -100  # one trained token per row: fewer than r
    with pytest.raises(LoraLabError, match="fewer trained tokens than r"):
        eva_init(ours(base), batches)


def test_finetune_qlora_eva(tiny_ckpt, tmp_path, capsys, one_thread):
    import finetune.qlora as ft

    call_flat(ft.setup, checkpoint_dir=tiny_ckpt, out_dir=tmp_path / "out", lora_init="eva", nf4_blocksize=32,
              double_quant=False, **SCRIPT_RUN)
    assert "--lora_init eva: " in capsys.readouterr().out
    config, tensors = load_lora(tmp_path / "out")
    assert (config.r, config.init) == (4, {"method": "eva"})
    norms = [t.norm(dim=1) for k, t in tensors.items() if k.endswith("lora_A")]  # EVA's rows: unit vectors (Kaiming's
    assert all(((n > 0.8) & (n < 1.2)).all() for n in norms)  # ~0.58), moved little by 2 steps
    x = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    trained = rebuilt_from_train_state(tiny_ckpt, tmp_path / "out", "eva", dict(blocksize=32, double_quant=False))
    assert torch.equal(logits(load_lora_model(None, tmp_path / "out", merge=False), x), logits(trained, x))


# ---- classifiers (lora_lab/classifier.py): the residual base rebuilt on load ---------------------------------
@pytest.mark.parametrize("init,nf4", [("olora", None), ("loftq", dict(NF4, double_quant=True))])
def test_classifier_with_a_base_changing_init_loads_as_trained(base, tmp_path, init, nf4):
    """finetune/classify.py's lora / qlora with --lora_init: head, LoRA on the float weights, init_lora (NF4 bases
    for qlora), quantize_nf4; what load_classifier rebuilds from the untouched checkpoint is the trained classifier."""
    from lora_lab.classifier import ClassifierConfig, add_classification_head, load_classifier, save_classifier

    model = GPT.from_checkpoint(base)
    add_classification_head(model, 3)
    inject_lora(model, r=R, alpha=ALPHA, targets=TARGETS)
    init_lora(model, init, nf4=nf4, loftq_iter=2)
    if nf4:
        quantize_nf4(model, **nf4)
    with torch.no_grad():  # "trained": the adapters and the head moved
        for p in [p for n, p in model.named_parameters() if "lora_" in n] + [model.lm_head.weight]:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x = idx()
    trained = logits(model.eval(), x)
    config = ClassifierConfig(labels=["a", "b", "c"], method="qlora" if nf4 else "lora", base_model=str(base),
                              base_config=model.config.to_dict(), base_quantization=getattr(model, "base_quantization",
                                                                                            None),
                              lora=dict(r=R, alpha=ALPHA, dropout=0.0, targets=TARGETS, init=init_config(init, 2)))
    save_classifier(tmp_path / "clf", model, config)
    loaded, saved = load_classifier(tmp_path / "clf")
    assert saved.lora["init"]["method"] == init and load_lora(tmp_path / "clf")[0].r == 2 * R  # PEFT's pair: converted
    if nf4:
        assert saved.lora["init"]["base_offset"] == "lora_base.safetensors"
        assert torch.equal(logits(loaded, x), trained)  # NF4(W - L1 R1) + the rank-r adapter, bit for bit
    else:
        assert_float32_close(logits(loaded, x), trained)


def test_classifier_lora_init_checks():
    """finetune/classify.py's --lora_init (checks.py, before anything loads): LoRA methods only, and no eva."""
    from lora_lab.checks import check_args

    check_args(dict(label_column="label", method="qlora", lora_init="loftq", loftq_iter=2))
    for args, fragment in [(dict(method="head", lora_init="pissa"), "use it with --method lora or qlora"),
                           (dict(method="lora", lora_init="eva"), "one label per text"),
                           (dict(method="lora", lora_init="loftq"), "only helps a quantized base")]:
        with pytest.raises(LoraLabError, match=fragment):
            check_args(dict(args, label_column="label"))
