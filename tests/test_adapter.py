"""Tests of lora_lab/adapter.py (LLaMA-Adapter, and V2 at the end): exact start, the formula, what trains, KV-cache
generation, grouped-query attention, adapter files and their errors. Tiny models on the CPU: the file runs in
seconds."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

from lora_lab.adapter import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    AdapterAttention,
    AdapterConfig,
    AdapterV2Linear,
    adapter_modules,
    adapter_param_groups,
    adapter_state_dict,
    inject_adapter,
    load_adapter,
    load_adapter_state_dict,
    mark_only_adapter_trainable,
    save_adapter,
)
from lora_lab.config import Config
from lora_lab.generate import generate
from lora_lab.lora import count_parameters, inject_lora, save_lora, LoRAConfig
from lora_lab.model import GPT, RMSNorm, apply_rope
from lora_lab.nf4 import NF4Linear, model_size_report, quantize_nf4
from lora_lab.utils import LoraLabError


def tiny_config(**kw) -> Config:
    base = dict(name="tiny", block_size=64, vocab_size=64, n_layer=3, n_embd=32, n_head=4, n_query_groups=2,
                intermediate_size=48)
    base.update(kw)
    return Config(**base)


CONFIGS = {
    "llama-gqa": tiny_config(),
    "mha": tiny_config(n_query_groups=4),
    "mqa-tied-qkv-bias": tiny_config(n_query_groups=1, tie_embeddings=True, attn_qkv_bias=True),
    "neox-parallel-partial-rope": tiny_config(n_query_groups=4, parallel_residual=True, norm_class="LayerNorm",
                                              mlp_class="gelu", bias=True, rotary_percentage=0.25),
    "sliding-window": tiny_config(sliding_window=5),
}


def tokens(config: Config, B: int = 2, T: int = 12) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (B, T))


def perturb_gates(model: nn.Module, std: float = 0.5) -> None:
    """Open the gates, so the prefixes change the output (at init they are closed: exactly the base model)."""
    with torch.no_grad():
        for _, m in adapter_modules(model):
            m.adapter_gate.normal_(0, std)


def adapted(config: Config, prompt_length: int = 6, start_layer: int = 1, seed: int = 0,
            version: int = 1) -> tuple[GPT, GPT]:
    """(base model, the same weights with adapters) in eval mode."""
    torch.manual_seed(seed)
    base = GPT(config).eval()
    model = GPT(config).eval()
    model.load_state_dict(base.state_dict())
    inject_adapter(model, adapter_prompt_length=prompt_length, adapter_start_layer=start_layer, version=version)
    return base, model


def changed_by_adamw(model, idx, steps: int = 3) -> set[str]:
    """The state-dict keys that 3 AdamW steps with weight decay change, when *every* parameter is handed to the
    optimizer: requires_grad=False alone must keep the frozen ones where they are."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        opt.zero_grad()
        model(idx[:, :-1], labels=idx[:, 1:].clone()).backward()
        opt.step()
    after = model.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


# ---- the layer -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIGS)
def test_adapter_at_init_is_the_base_model_exactly(name):
    config = CONFIGS[name]
    base, model = adapted(config)
    idx = tokens(config)
    assert torch.equal(model(idx), base(idx))  # bit for bit: the closed gate adds exact zeros
    perturb_gates(model)  # and the comparison can fail: an open gate changes the logits
    assert not torch.allclose(model(idx), base(idx), atol=1e-3)


def test_inject_swaps_attention_reusing_the_projections():
    config = CONFIGS["llama-gqa"]
    model = GPT(config)
    old = [b.attn for b in model.blocks]
    inject_adapter(model, adapter_prompt_length=7, adapter_start_layer=1)
    assert type(model.blocks[0].attn) is not AdapterAttention and model.blocks[0].attn is old[0]
    for i in (1, 2):
        attn = model.blocks[i].attn
        assert isinstance(attn, AdapterAttention)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert getattr(attn, proj) is getattr(old[i], proj)  # the same modules: no copy of the base
        assert attn.adapter_prefix.shape == (7, 32) and attn.adapter_gate.shape == (4,)
        assert torch.equal(attn.adapter_gate, torch.zeros(4))
        assert 0.5 < attn.adapter_prefix.std().item() < 1.5  # N(0, 1), like nn.Embedding rows
    # the state dict is the base's plus the adapter tensors: base checkpoints and base tools keep working
    base_keys = set(GPT(config).state_dict())
    assert set(model.state_dict()) - base_keys == {f"blocks.{i}.attn.adapter_{p}" for i in (1, 2)
                                                   for p in ("prefix", "gate")}


def test_prefix_attention_formula_gqa_no_rope_no_mask():
    """y = causal softmax attention + gate_h * softmax(q Kp^T / sqrt(hs)) Vp, written out by hand: the prefix gets
    no rotary embedding, every query sees the whole prefix, group g serves query heads g*nh/ng ... (g+1)*nh/ng-1,
    and the two softmaxes are separate."""
    config = tiny_config(n_head=6, n_query_groups=2, n_embd=48, attn_qkv_bias=True)
    torch.manual_seed(3)
    model = GPT(config).eval()
    inject_adapter(model, adapter_prompt_length=5, adapter_start_layer=0)
    attn = model.blocks[0].attn
    perturb_gates(model)
    B, T, C, nh, ng, hs, P = 2, 9, 48, 6, 2, 8, 5
    x = torch.randn(B, T, C)
    cos, sin = model.rope(0, T, x.device)

    q = apply_rope(attn.q_proj(x).view(B, T, nh, hs).transpose(1, 2), cos, sin)  # (B, nh, T, hs)
    k = apply_rope(attn.k_proj(x).view(B, T, ng, hs).transpose(1, 2), cos, sin)  # (B, ng, T, hs)
    v = attn.v_proj(x).view(B, T, ng, hs).transpose(1, 2)
    k, v = k.repeat_interleave(nh // ng, dim=1), v.repeat_interleave(nh // ng, dim=1)  # (B, nh, T, hs)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2) / math.sqrt(hs)).masked_fill(~causal, float("-inf"))
    y = scores.softmax(-1) @ v  # (B, nh, T, hs)
    pk = attn.k_proj(attn.adapter_prefix).view(P, ng, hs).transpose(0, 1).repeat_interleave(nh // ng, 0)  # (nh, P, hs)
    pv = attn.v_proj(attn.adapter_prefix).view(P, ng, hs).transpose(0, 1).repeat_interleave(nh // ng, 0)
    prefix = (q @ pk.transpose(-1, -2) / math.sqrt(hs)).softmax(-1) @ pv  # (B, nh, T, hs)
    y = y + attn.adapter_gate.view(1, nh, 1, 1) * prefix
    expected = attn.o_proj(y.transpose(1, 2).reshape(B, T, nh * hs))
    assert_close(attn(x, cos, sin, None), expected)


def test_only_adapter_parameters_train():
    config = CONFIGS["llama-gqa"]
    _, model = adapted(config, prompt_length=6, start_layer=1)
    model.train()
    mark_only_adapter_trainable(model)
    # per adapted layer P x n_embd + n_head: 2 layers x (6 x 32 + 4)
    trainable, total = count_parameters(model)
    assert trainable == 2 * (6 * 32 + 4)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(
        f"blocks.{i}.attn.adapter_{p}" for i in (1, 2) for p in ("prefix", "gate"))

    idx = tokens(config)
    loss = model(idx[:, :-1], labels=idx[:, 1:].clone())
    loss.backward()
    # a closed gate passes no gradient to the prefix yet: the gates move first (zero-init attention)
    attn = model.blocks[1].attn
    assert torch.equal(attn.adapter_prefix.grad, torch.zeros_like(attn.adapter_prefix))
    assert attn.adapter_gate.grad.abs().min() > 0

    # prefixes (after the first step opened the gates) and gates
    assert changed_by_adamw(model, idx) == set(adapter_state_dict(model))


@pytest.mark.parametrize("version", [1, 2])
def test_activation_checkpointing_gives_the_same_gradients(version):
    config = CONFIGS["llama-gqa"]
    _, model = adapted(config, version=version)
    perturb_gates(model)
    mark_only_adapter_trainable(model)
    model.train()
    idx = tokens(config)
    grads = []
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        model.zero_grad()
        model(idx[:, :-1], labels=idx[:, 1:].clone()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for n in grads[0]:
        assert_close(grads[1][n], grads[0][n])


# ---- generation with a KV cache ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama-gqa", "mqa-tied-qkv-bias", "sliding-window"])
def test_kv_cache_decoding_matches_full_forward(name):
    """The prefix is not in the cache but attended at every step: feeding one token at a time through the cache
    gives the logits of the full forward, and greedy generation the same tokens."""
    config = CONFIGS[name]
    _, model = adapted(config)
    perturb_gates(model)
    idx = tokens(config, B=1, T=14)
    full = model(idx)  # (1, T, vocab)
    model.set_kv_cache(batch_size=1, max_seq_length=14)
    try:
        steps = [model(idx[:, :4], input_pos=0)]  # a prompt of 4, then token by token
        steps += [model(idx[:, t:t + 1], input_pos=t) for t in range(4, 14)]
    finally:
        model.clear_kv_cache()
    assert model.blocks[1].attn.kv_cache is None
    assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)

    prompt = idx[0, :5]
    cached = list(generate(model, prompt, max_new_tokens=20, use_kv_cache=True))
    uncached = list(generate(model, prompt, max_new_tokens=20, use_kv_cache=False))
    assert cached == uncached and len(cached) == 20


def test_adapter_on_an_nf4_base():
    """generate/adapter.py --quantize nf4: the frozen projections in 4 bits, the prefix and gate in float."""
    config = CONFIGS["llama-gqa"]
    base, model = (quantize_nf4(m) for m in adapted(config, prompt_length=4, start_layer=1))
    assert isinstance(model.blocks[1].attn.k_proj, NF4Linear)  # quantized after inject_adapter
    model = quantize_nf4(adapted(config)[0])  # ... or before
    inject_adapter(model, adapter_prompt_length=4, adapter_start_layer=1)
    attn = model.blocks[1].attn
    assert isinstance(attn.k_proj, NF4Linear) and attn.adapter_prefix.dtype == torch.float32
    idx = tokens(config)
    assert torch.equal(model(idx), base(idx))
    perturb_gates(model)
    assert list(generate(model, idx[0, :5], 10, use_kv_cache=True)) == list(
        generate(model, idx[0, :5], 10, use_kv_cache=False))


def test_bf16_model_gets_bf16_adapters_unless_told():
    config = CONFIGS["llama-gqa"]
    model = GPT(config).to(torch.bfloat16).eval()
    inject_adapter(model, adapter_start_layer=2)
    assert model.blocks[2].attn.adapter_prefix.dtype == torch.bfloat16
    model32 = inject_adapter(GPT(config).to(torch.bfloat16), adapter_start_layer=2, dtype=torch.float32)
    attn = model32.blocks[2].attn
    assert attn.adapter_prefix.dtype == attn.adapter_gate.dtype == torch.float32
    perturb_gates(model32)
    assert model32(tokens(config)).dtype == torch.bfloat16  # the float32 prefix is cast to the activations' dtype


# ---- settings and their errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(adapter_start_layer=3), "adapter_start_layer=3 but the model has only 3 layers (0 ... 2): choose a start "
                                  "layer below 3"),
    (dict(adapter_start_layer=-1), "adapter_start_layer must be a non-negative integer, got -1"),
    (dict(adapter_prompt_length=0), "adapter_prompt_length must be a positive integer, got 0"),
    (dict(adapter_prompt_length=2.5), "adapter_prompt_length must be a positive integer, got 2.5"),
])
def test_inject_rejects_impossible_settings(kwargs, message):
    with pytest.raises(LoraLabError) as e:
        inject_adapter(GPT(CONFIGS["llama-gqa"]), **kwargs)
    assert str(e.value) == message


def test_inject_twice_is_an_error():
    model = inject_adapter(GPT(CONFIGS["llama-gqa"]))
    with pytest.raises(LoraLabError, match="already has adapters: inject_adapter once per model"):
        inject_adapter(model)


# ---- files ---------------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    config = CONFIGS["llama-gqa"]
    base, model = adapted(config, prompt_length=5, start_layer=1)
    perturb_gates(model)
    adapter_config = AdapterConfig(adapter_prompt_length=5, adapter_start_layer=1, base_model="ckpt",
                                   base_config=config.to_dict(), prompt_style="chatml")
    save_adapter(tmp_path, model, adapter_config)
    # the two files and nothing else (no temporary files left over)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE])
    saved = json.loads((tmp_path / ADAPTER_CONFIG_FILE).read_text())
    assert saved == {"adapter_prompt_length": 5, "adapter_start_layer": 1, "base_model": "ckpt",
                     "base_config": config.to_dict(), "prompt_style": "chatml", "adapter_version": 1}

    loaded_config, state_dict = load_adapter(tmp_path)
    assert loaded_config == adapter_config
    assert sorted(state_dict) == sorted(f"blocks.{i}.attn.adapter_{p}" for i in (1, 2) for p in ("prefix", "gate"))
    fresh = GPT(config).eval()
    fresh.load_state_dict(base.state_dict())
    loaded_config.inject(fresh)
    load_adapter_state_dict(fresh, state_dict, source=tmp_path / ADAPTER_WEIGHTS_FILE)
    idx = tokens(config)
    assert torch.equal(fresh(idx), model(idx))


def test_save_checks_the_config_describes_the_model(tmp_path):
    _, model = adapted(CONFIGS["llama-gqa"], prompt_length=5, start_layer=1)
    with pytest.raises(LoraLabError) as e:
        save_adapter(tmp_path, model, AdapterConfig(adapter_prompt_length=5, adapter_start_layer=2))
    assert str(e.value) == ("the adapter config (adapter_start_layer=2, adapter_prompt_length=5) does not describe "
                            "the model (adapters on layers 1-2, prompt length [5])")
    with pytest.raises(LoraLabError, match="no adapters to save"):
        save_adapter(tmp_path, GPT(CONFIGS["llama-gqa"]), AdapterConfig())
    assert not any(tmp_path.iterdir())


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_mismatched_adapter_gives_one_line(tmp_path):
    config = CONFIGS["llama-gqa"]
    _, model = adapted(config, prompt_length=5, start_layer=1)
    state_dict = adapter_state_dict(model)

    other_start = inject_adapter(GPT(config), adapter_prompt_length=5, adapter_start_layer=2)
    with pytest.raises(LoraLabError) as e:
        load_adapter_state_dict(other_start, state_dict, source="a/adapter.safetensors")
    assert one_line(e) == ("a/adapter.safetensors: the adapter has weights for layers 1-2 but the model has adapters "
                           "on layers 2: inject_adapter with the adapter's adapter_start_layer (or use the base model "
                           "it was trained on)")

    other_length = inject_adapter(GPT(config), adapter_prompt_length=8, adapter_start_layer=1)
    with pytest.raises(LoraLabError) as e:
        load_adapter_state_dict(other_length, state_dict, source="a/adapter.safetensors")
    assert one_line(e) == ("a/adapter.safetensors: blocks.1.attn.adapter_prefix has shape (5, 32) but the model "
                           "expects (8, 32) (adapter_prompt_length x n_embd): inject_adapter with the adapter's "
                           "adapter_prompt_length, on the base model it was trained on")

    wider = inject_adapter(GPT(tiny_config(n_embd=48, n_head=6)), adapter_prompt_length=5, adapter_start_layer=1)
    with pytest.raises(LoraLabError) as e:
        load_adapter_state_dict(wider, state_dict)
    assert "has shape (5, 32) but the model expects (5, 48)" in one_line(e)

    with pytest.raises(LoraLabError) as e:
        load_adapter_state_dict(other_start, GPT(config).state_dict(), source="model.safetensors")
    assert one_line(e).startswith("model.safetensors: wte.weight is not an adapter weight")

    with pytest.raises(LoraLabError) as e:
        load_adapter_state_dict(GPT(config), state_dict)
    assert "the model has no adapters to load into" in one_line(e)


def test_load_adapter_errors_are_one_line(tmp_path):
    config = CONFIGS["llama-gqa"]
    with pytest.raises(LoraLabError) as e:
        load_adapter(tmp_path / "missing")
    assert one_line(e).startswith(f"adapter directory {tmp_path / 'missing'} does not exist")

    lora_dir = tmp_path / "lora"
    model = inject_lora(GPT(config))
    save_lora(lora_dir, model, LoRAConfig())
    with pytest.raises(LoraLabError) as e:
        load_adapter(lora_dir)
    assert one_line(e) == (f"{lora_dir} is not a LLaMA-Adapter directory: adapter_config.json is missing (it looks "
                           f"like a LoRA adapter: use generate/lora.py); pass the output directory of "
                           f"finetune/adapter.py")

    good = tmp_path / "good"
    _, model = adapted(config)
    save_adapter(good, model, AdapterConfig(adapter_prompt_length=6, adapter_start_layer=1))
    (good / ADAPTER_WEIGHTS_FILE).write_bytes((good / ADAPTER_WEIGHTS_FILE).read_bytes()[:50])
    with pytest.raises(LoraLabError) as e:
        load_adapter(good)
    assert one_line(e).startswith(f"{good / ADAPTER_WEIGHTS_FILE} is truncated or corrupt")

    (good / ADAPTER_CONFIG_FILE).write_text('{"adapter_prompt_length": 0}')
    with pytest.raises(LoraLabError) as e:
        load_adapter(good)
    assert one_line(e) == (f"{good / ADAPTER_CONFIG_FILE} is not a valid adapter config (adapter_prompt_length must "
                           f"be a positive integer, got 0): save the adapter again")
    (good / ADAPTER_CONFIG_FILE).write_text('{"r": 8}')
    with pytest.raises(LoraLabError) as e:
        load_adapter(good)
    assert "unknown adapter config keys ['r']" in one_line(e)
    (good / ADAPTER_CONFIG_FILE).write_text("{not json")
    with pytest.raises(LoraLabError) as e:
        load_adapter(good)
    assert one_line(e).startswith(f"{good / ADAPTER_CONFIG_FILE} is not valid JSON")


def test_adapter_config_checks_start_layer_against_its_base():
    with pytest.raises(LoraLabError, match="adapter_start_layer=30 but the model has only 30 layers"):
        AdapterConfig(adapter_start_layer=30, base_config=Config.from_name("SmolLM2-135M-Instruct").to_dict())


def test_smollm2_parameter_count_of_the_docstring():
    """28 adapted layers (2 ... 29) x (10 x 576 + 9 heads) = 161,532 trainable parameters, 0.12% of the model."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = GPT(Config.from_name("SmolLM2-135M-Instruct"))
        inject_adapter(model, adapter_prompt_length=10, adapter_start_layer=2)
    mark_only_adapter_trainable(model)
    trainable, total = count_parameters(model)
    assert trainable == 28 * (10 * 576 + 9) == 161_532
    assert total == 134_515_008 + 161_532  # SmolLM2-135M's published 134.5M (tied embeddings counted once)
    assert f"{100 * trainable / total:.2f}%" == "0.12%"


# ---- LLaMA-Adapter V2: a scale and a bias on every linear layer, trainable norms --------------------------------
V2_CONFIGS = ["llama-gqa", "mqa-tied-qkv-bias", "neox-parallel-partial-rope"]


def perturb_v2(model: nn.Module, std: float = 0.3) -> None:
    """Open the gates and move every scale, bias and norm away from its start, so v2 changes the output."""
    perturb_gates(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("adapter_scale", "adapter_bias")) or ".norm" in name or name.startswith("norm_f"):
                p.add_(torch.randn_like(p) * std)


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def v2_trainable_names(model: nn.Module, start_layer: int) -> set[str]:
    """What v2 trains, spelled out: prefix and gate from start_layer on, scale and bias of every linear layer,
    every parameter of every norm."""
    n_layer = len(model.blocks)
    names = {f"blocks.{i}.attn.adapter_{p}" for i in range(start_layer, n_layer) for p in ("prefix", "gate")}
    names |= {f"{layer}.adapter_{p}" for layer in linear_names(model) for p in ("scale", "bias")}
    names |= {f"{norm}.{p}" for norm, m in model.named_modules() if isinstance(m, (nn.LayerNorm, RMSNorm))
              for p, _ in m.named_parameters(recurse=False)}
    return names


@pytest.mark.parametrize("name", CONFIGS)
def test_v2_at_init_is_the_base_model_exactly(name):
    config = CONFIGS[name]
    base, model = adapted(config, version=2)
    idx = tokens(config)
    assert torch.equal(model(idx), base(idx))  # scale 1 and bias 0 change nothing, bit for bit
    with torch.no_grad():  # and the comparison can fail: a scale alone (gates closed) changes the logits
        model.blocks[0].mlp.down_proj.adapter_scale.fill_(1.5)
    assert not torch.allclose(model(idx), base(idx), atol=1e-3)


@pytest.mark.parametrize("name", V2_CONFIGS)
def test_v2_swaps_every_linear_layer_keeping_its_weights(name):
    config = CONFIGS[name]
    model = GPT(config)
    old = {layer: model.get_submodule(layer) for layer in linear_names(model)}
    inject_adapter(model, adapter_prompt_length=5, adapter_start_layer=1, version=2)
    mlp_layers = 2 if config.mlp_class == "gelu" else 3
    assert len(old) == 3 * (4 + mlp_layers) + 1  # q, k, v, o and the MLP's in each of 3 blocks; lm_head
    for layer, linear in old.items():
        new = model.get_submodule(layer)
        assert type(new) is AdapterV2Linear and new.weight is linear.weight and new.bias is linear.bias
        assert torch.equal(new.adapter_scale, torch.ones(linear.out_features))
        assert torch.equal(new.adapter_bias, torch.zeros(linear.out_features))
    assert model.blocks[1].attn.k_proj is model.get_submodule("blocks.1.attn.k_proj")  # the prefix goes through it
    if config.tie_embeddings:
        assert model.lm_head.weight is model.wte.weight  # still tied
    # base keys unchanged, plus the adapter's own
    added = set(model.state_dict()) - set(GPT(config).state_dict())
    assert added == {k for k in v2_trainable_names(model, 1) if "adapter_" in k}
    assert set(GPT(config).state_dict()) <= set(model.state_dict())


def test_v2_linear_formula():
    """y = adapter_scale * (x W^T + b + adapter_bias), with and without a base bias."""
    torch.manual_seed(0)
    for bias in (True, False):
        linear = nn.Linear(8, 5, bias=bias)
        layer = AdapterV2Linear.from_linear(linear)
        with torch.no_grad():
            layer.adapter_scale.normal_()
            layer.adapter_bias.normal_()
        x = torch.randn(3, 4, 8)
        b = linear.bias if bias else 0
        assert_close(layer(x), layer.adapter_scale * (x @ linear.weight.T + b + layer.adapter_bias))


@pytest.mark.parametrize("name", ["llama-gqa", "neox-parallel-partial-rope"])  # lm_head without / with a bias
def test_v2_head_takes_the_fused_loss_with_the_gradients_of_plain_logits(name):
    """The scaled and biased lm_head is one affine map (as_linear): next_token_loss fuses it, and the loss and every
    gradient equal cross-entropy on the full logits of the v2 model; at the start its (W', b') are lm_head's own."""
    from lora_lab.model import head_as_linear

    config = dataclasses.replace(CONFIGS[name], lm_head_bias=name.startswith("neox"))
    _, model = adapted(config, version=2)
    w, b = head_as_linear(model.lm_head)  # not None: the fused path
    assert torch.equal(w, model.lm_head.weight)  # s = 1, ab = 0: W' and b' are W and b bit for bit
    assert torch.equal(b, model.lm_head.bias if config.lm_head_bias else torch.zeros(config.vocab_size))
    perturb_v2(model)
    mark_only_adapter_trainable(model)
    x = torch.randint(0, config.vocab_size, (2, 12))
    labels = x.clone()
    labels[0, :4] = -100
    ref = F.cross_entropy(model(x)[:, :-1].reshape(-1, config.vocab_size), labels[:, 1:].reshape(-1))
    ref.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    loss = model(x, labels=labels, loss_chunk_size=5)  # several chunks
    loss.backward()
    assert_close(loss, ref)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, expected[n], msg=n)


@pytest.mark.parametrize("name", V2_CONFIGS)
def test_v2_only_adapter_parameters_and_norms_train(name):
    config = CONFIGS[name]
    _, model = adapted(config, prompt_length=6, start_layer=1, version=2)
    model.train()
    mark_only_adapter_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == v2_trainable_names(model, 1) == set(adapter_state_dict(model))

    idx = tokens(config)
    model(idx[:, :-1], labels=idx[:, 1:].clone()).backward()
    for n, p in model.named_parameters():
        if n not in trainable:
            assert p.grad is None, n
        elif n.endswith("adapter_prefix"):  # a closed gate passes nothing to its prefix yet, as in v1
            assert torch.equal(p.grad, torch.zeros_like(p)), n
        else:
            assert p.grad.abs().sum() > 0, n

    assert changed_by_adamw(model, idx) == set(adapter_state_dict(model))


def test_v2_param_groups_decay_only_prefixes_and_gates():
    config = CONFIGS["llama-gqa"]
    _, v1 = adapted(config)
    mark_only_adapter_trainable(v1)
    groups = adapter_param_groups(v1)
    assert len(groups) == 1 and len(groups[0]["params"]) == 4  # v1: one group, as before (2 layers x prefix, gate)
    _, v2 = adapted(config, version=2)
    mark_only_adapter_trainable(v2)
    decayed, not_decayed = adapter_param_groups(v2)
    names = {id(p): n for n, p in v2.named_parameters()}
    assert {names[id(p)].rsplit(".", 1)[-1] for p in decayed["params"]} == {"adapter_prefix", "adapter_gate"}
    assert not_decayed["weight_decay"] == 0.0
    assert {names[id(p)] for p in not_decayed["params"]} == v2_trainable_names(v2, 1) - set(prefix_and_gates(v2))


def prefix_and_gates(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.endswith(("adapter_prefix", "adapter_gate"))]


@pytest.mark.parametrize("name", V2_CONFIGS)
def test_v2_kv_cache_decoding_matches_full_forward(name):
    config = CONFIGS[name]
    _, model = adapted(config, version=2)
    perturb_v2(model)
    idx = tokens(config, B=1, T=14)
    full = model(idx)
    model.set_kv_cache(batch_size=1, max_seq_length=14)
    try:
        steps = [model(idx[:, :4], input_pos=0)] + [model(idx[:, t:t + 1], input_pos=t) for t in range(4, 14)]
    finally:
        model.clear_kv_cache()
    assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    prompt = idx[0, :5]
    cached = list(generate(model, prompt, max_new_tokens=20, use_kv_cache=True))
    assert cached == list(generate(model, prompt, max_new_tokens=20, use_kv_cache=False)) and len(cached) == 20


def test_v2_on_an_nf4_base():
    """generate/adapter.py --quantize nf4 with a v2 adapter: the linear layers keep their 4-bit weights (same keys
    as NF4Linear's) and dequantize on the fly; the scales and biases stay in float and get gradients."""
    config = CONFIGS["llama-gqa"]
    base = quantize_nf4(adapted(config)[0])
    nf4_keys = set(base.state_dict())
    model = quantize_nf4(adapted(config)[0])
    inject_adapter(model, adapter_prompt_length=4, adapter_start_layer=1, version=2)
    q = model.blocks[0].attn.q_proj
    assert type(q) is AdapterV2Linear and q.quant_type == "nf4" and q.weight.dtype == torch.uint8
    assert q.adapter_scale.dtype == torch.float32
    assert nf4_keys <= set(model.state_dict())
    assert model_size_report(model)["quantized_layers"] == model_size_report(base)["quantized_layers"] == 3 * 7
    idx = tokens(config)
    assert torch.equal(model(idx), base(idx))

    perturb_v2(model)
    # the same as a float layer holding the dequantized weight
    x = torch.randn(2, 5, 32)
    reference = AdapterV2Linear.from_linear(nn.Linear(32, q.out_features, bias=False))
    with torch.no_grad():
        reference.weight.copy_(base.blocks[0].attn.q_proj.dequantize())
        reference.adapter_scale.copy_(q.adapter_scale)
        reference.adapter_bias.copy_(q.adapter_bias)
    assert_close(q(x), reference(x))
    mark_only_adapter_trainable(model)
    model(idx[:, :-1], labels=idx[:, 1:].clone()).backward()
    assert q.adapter_scale.grad.abs().sum() > 0 and q.adapter_bias.grad.abs().sum() > 0
    assert list(generate(model.eval(), idx[0, :5], 10, use_kv_cache=True)) == list(
        generate(model, idx[0, :5], 10, use_kv_cache=False))
    model.to(torch.bfloat16)  # the NF4 statistics keep their dtype, the adapters follow
    assert q.weight_absmax.dtype == base.blocks[0].attn.q_proj.weight_absmax.dtype
    assert q.adapter_scale.dtype == torch.bfloat16


def test_v2_float32_adapter_on_a_bfloat16_model():
    config = CONFIGS["llama-gqa"]
    model = inject_adapter(GPT(config).to(torch.bfloat16), adapter_start_layer=2, dtype=torch.float32, version=2)
    assert model.lm_head.adapter_scale.dtype == model.blocks[0].mlp.up_proj.adapter_bias.dtype == torch.float32
    perturb_v2(model)
    assert model(tokens(config)).dtype == torch.bfloat16  # cast to the activations' dtype


def test_v2_save_and_load_round_trip_after_training(tmp_path):
    config = CONFIGS["neox-parallel-partial-rope"]
    base, model = adapted(config, prompt_length=5, start_layer=1, version=2)
    model.train()
    mark_only_adapter_trainable(model)
    opt = torch.optim.AdamW(adapter_param_groups(model), lr=1e-2, weight_decay=0.02)
    idx = tokens(config)
    for _ in range(2):  # the first step opens the gates, the second moves the prefixes too
        opt.zero_grad()
        model(idx[:, :-1], labels=idx[:, 1:].clone()).backward()
        opt.step()
    model.eval()
    adapter_config = AdapterConfig(adapter_prompt_length=5, adapter_start_layer=1, base_model="ckpt",
                                   base_config=config.to_dict(), adapter_version=2)
    save_adapter(tmp_path, model, adapter_config)
    assert json.loads((tmp_path / ADAPTER_CONFIG_FILE).read_text())["adapter_version"] == 2

    loaded_config, state_dict = load_adapter(tmp_path)
    assert loaded_config == adapter_config
    assert set(state_dict) == v2_trainable_names(model, 1)  # norms included: they trained
    assert "blocks.0.norm_1.bias" in state_dict and "norm_f.weight" in state_dict  # LayerNorm: biases too
    fresh = GPT(config).eval()
    fresh.load_state_dict(base.state_dict())
    loaded_config.inject(fresh)
    assert not torch.equal(fresh(idx), model(idx))
    load_adapter_state_dict(fresh, state_dict, source=tmp_path / ADAPTER_WEIGHTS_FILE)
    assert torch.equal(fresh(idx), model(idx))


def test_v1_adapter_files_without_a_version_load_as_v1(tmp_path):
    """adapter_config.json as written before adapter_version existed: a v1 adapter."""
    config = CONFIGS["llama-gqa"]
    _, model = adapted(config, prompt_length=5, start_layer=1)
    perturb_gates(model)
    save_adapter(tmp_path, model, AdapterConfig(adapter_prompt_length=5, adapter_start_layer=1))
    saved = json.loads((tmp_path / ADAPTER_CONFIG_FILE).read_text())
    del saved["adapter_version"]
    (tmp_path / ADAPTER_CONFIG_FILE).write_text(json.dumps(saved))
    loaded_config, state_dict = load_adapter(tmp_path)
    assert loaded_config.adapter_version == 1
    fresh = loaded_config.inject(adapted(config)[0])
    load_adapter_state_dict(fresh, state_dict)
    idx = tokens(config)
    assert torch.equal(fresh(idx), model(idx))


def test_v2_mismatches_give_one_line(tmp_path):
    config = CONFIGS["llama-gqa"]
    _, v1 = adapted(config, prompt_length=5, start_layer=1)
    _, v2 = adapted(config, prompt_length=5, start_layer=1, version=2)
    with pytest.raises(LoraLabError) as e:
        load_adapter_state_dict(v1, adapter_state_dict(v2), source="a/adapter.safetensors")
    assert one_line(e) == ("a/adapter.safetensors: the adapter is a LLaMA-Adapter v2 but the model has v1 adapters: "
                           "inject_adapter with version=2 (the adapter_version of its adapter_config.json)")
    with pytest.raises(LoraLabError) as e:
        load_adapter_state_dict(v2, adapter_state_dict(v1), source="a/adapter.safetensors")
    assert ("the adapter is a LLaMA-Adapter v1 but the model has v2 adapters: inject_adapter with version=1"
            in one_line(e))
    state_dict = adapter_state_dict(v2)
    del state_dict["norm_f.weight"]
    with pytest.raises(LoraLabError) as e:
        load_adapter_state_dict(v2, state_dict, source="a/adapter.safetensors")
    assert one_line(e) == ("a/adapter.safetensors: the adapter lacks 1 of the model's adapter tensors (norm_f.weight, "
                           "...): use the base model it was trained on, or save it again")
    with pytest.raises(LoraLabError) as e:
        load_adapter_state_dict(v2, GPT(config).state_dict(), source="model.safetensors")
    assert one_line(e).startswith("model.safetensors: wte.weight is not an adapter weight")

    # files: a config that does not say v2, a version that does not exist
    with pytest.raises(LoraLabError) as e:
        save_adapter(tmp_path, v2, AdapterConfig(adapter_prompt_length=5, adapter_start_layer=1))
    assert one_line(e) == ("the adapter config (adapter_version=1) does not describe the model (a LLaMA-Adapter v2)")
    save_adapter(tmp_path, v2, AdapterConfig(adapter_prompt_length=5, adapter_start_layer=1, adapter_version=2))
    saved = json.loads((tmp_path / ADAPTER_CONFIG_FILE).read_text())
    (tmp_path / ADAPTER_CONFIG_FILE).write_text(json.dumps({**saved, "adapter_version": 1}))
    with pytest.raises(LoraLabError) as e:
        load_adapter(tmp_path)
    assert one_line(e) == (f"{tmp_path / ADAPTER_WEIGHTS_FILE} holds a LLaMA-Adapter v2 but "
                           f"{tmp_path / ADAPTER_CONFIG_FILE} says adapter_version=1: save the adapter again")
    (tmp_path / ADAPTER_CONFIG_FILE).write_text(json.dumps({**saved, "adapter_version": 3}))
    with pytest.raises(LoraLabError) as e:
        load_adapter(tmp_path)
    assert "adapter_version must be 1 (LLaMA-Adapter) or 2 (LLaMA-Adapter V2), got 3" in one_line(e)
    with pytest.raises(LoraLabError) as e:
        inject_adapter(GPT(config), version=True)
    assert one_line(e) == "adapter_version must be 1 (LLaMA-Adapter) or 2 (LLaMA-Adapter V2), got True"
    with pytest.raises(LoraLabError, match="already has adapters"):
        inject_adapter(v2)


def test_smollm2_v2_parameter_count_of_the_docstring():
    """v1's 161,532 + 30 blocks x 2 x (576 + 192 + 192 + 576 + 1,536 + 1,536 + 576) + 2 x 49,152 (lm_head)
    + 61 x 576 (norms) = 606,012 trainable parameters, 0.45% of the model."""
    with torch.device("meta"):
        model = GPT(Config.from_name("SmolLM2-135M-Instruct"))
        inject_adapter(model, adapter_prompt_length=10, adapter_start_layer=2, version=2)
    mark_only_adapter_trainable(model)
    trainable, total = count_parameters(model)
    linear = 30 * 2 * (576 + 192 + 192 + 576 + 1536 + 1536 + 576)
    assert (linear, 2 * 49_152, 61 * 576) == (311_040, 98_304, 35_136)
    assert trainable == 161_532 + linear + 2 * 49_152 + 61 * 576 == 606_012
    # the base's 134,515,008 (the norms are among them) plus the new tensors: prefixes, gates, scales and biases
    assert total == 134_515_008 + 161_532 + linear + 2 * 49_152
    assert f"{100 * trainable / total:.2f}%" == "0.45%"
