"""Tests of lora_lab/adapter.py (LLaMA-Adapter): exact start, the formula, what trains, KV-cache generation,
grouped-query attention, adapter files and their errors. Tiny models on the CPU: the file runs in seconds."""

import json
import math

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

from lora_lab.adapter import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    AdapterAttention,
    AdapterConfig,
    adapter_modules,
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
from lora_lab.model import GPT, apply_rope
from lora_lab.nf4 import NF4Linear, quantize_nf4
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


def adapted(config: Config, prompt_length: int = 6, start_layer: int = 1, seed: int = 0) -> tuple[GPT, GPT]:
    """(base model, the same weights with adapters) in eval mode."""
    torch.manual_seed(seed)
    base = GPT(config).eval()
    model = GPT(config).eval()
    model.load_state_dict(base.state_dict())
    inject_adapter(model, adapter_prompt_length=prompt_length, adapter_start_layer=start_layer)
    return base, model


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

    before = {k: v.clone() for k, v in model.state_dict().items()}
    # every parameter goes to AdamW with weight decay: requires_grad=False alone must keep the base untouched
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(idx[:, :-1], labels=idx[:, 1:].clone()).backward()
        opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(adapter_state_dict(model))  # prefixes (after the first step opened the gates) and gates


def test_activation_checkpointing_gives_the_same_gradients():
    config = CONFIGS["llama-gqa"]
    _, model = adapted(config)
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
                     "base_config": config.to_dict(), "prompt_style": "chatml"}

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
