"""Tests of lora_lab/lora.py: the LoRA layer, its model-level helpers and adapter files (tiny models, CPU, fast)."""

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from lora_lab.checkpoint import save_checkpoint
from lora_lab.config import Config
from lora_lab.lora import (
    LoRAConfig,
    LoRALinear,
    adapted_roles,
    count_parameters,
    inject_lora,
    load_lora,
    load_lora_state_dict,
    lora_modules,
    lora_plus_param_groups,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    save_lora,
    unmerge_lora,
)
from lora_lab.model import GPT
from lora_lab.utils import LoraLabError


def tiny_config(**kw) -> Config:
    base = dict(name="tiny", block_size=32, vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_query_groups=2,
                intermediate_size=48)
    base.update(kw)
    return Config(**base)


CONFIGS = {
    "llama-gqa": tiny_config(),
    "neox-gelu-bias": tiny_config(n_query_groups=4, parallel_residual=True, norm_class="LayerNorm", mlp_class="gelu",
                                  bias=True, rotary_percentage=0.25, lm_head_bias=True),
    "tied-mqa": tiny_config(n_query_groups=1, tie_embeddings=True, attn_qkv_bias=True),
}


def tokens(config: Config, B: int = 2, T: int = 8) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (B, T))


def randomize_lora(model: nn.Module, std: float = 0.1) -> None:
    """Give every B (and DoRA magnitude) a non-zero value so the adapters change the output."""
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.normal_(0, std)
            if m.use_dora:
                m.lora_magnitude.mul_(1 + 0.1 * torch.randn_like(m.lora_magnitude))


def train_steps(model: GPT, steps: int = 3, lr: float = 1e-2) -> None:
    # every parameter goes to AdamW with weight decay: requires_grad=False alone must keep the base untouched
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    idx = tokens(model.config)
    for _ in range(steps):
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


# ---- the layer ---------------------------------------------------------------------------------------------
def test_init_and_parameter_count():
    layer = LoRALinear(576, 576, r=8, alpha=16)
    assert layer.lora_A.shape == (8, 576) and layer.lora_B.shape == (576, 8)
    assert torch.equal(layer.lora_B, torch.zeros(576, 8))
    bound = 1 / math.sqrt(576)  # Kaiming-uniform with a = sqrt(5)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    assert layer.scaling == 2.0
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    mark_only_lora_trainable(layer)
    # r·(in + out) trainable against in·out (+ bias) frozen: the docstring's 9,216 vs 331,776
    assert count_parameters(layer) == (9216, 9216 + 331776 + 576)


def test_from_linear_reuses_weight():
    linear = nn.Linear(16, 24)
    layer = LoRALinear.from_linear(linear, r=4, alpha=8)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not linear.weight.requires_grad
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), linear(x))


def test_forward_formula_without_materialising_BA():
    torch.manual_seed(1)
    layer = LoRALinear(40, 24, r=4, alpha=8, bias=True)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 40)

    shapes = []

    class RecordShapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            # new tensors only: views such as W.t() share their input's storage
            if isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() not in inputs:
                shapes.append(tuple(out.shape))
            return out

    with RecordShapes():
        y = layer(x)
    assert (2, 5, 24) in shapes  # the recorder sees the layer's output being made
    assert (24, 40) not in shapes and (40, 24) not in shapes  # but no (out, in) matrix was formed
    expected = F.linear(x, layer.weight, layer.bias) + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T
    assert_close(y, expected)


def test_dropout_only_on_lora_branch():
    layer = LoRALinear(16, 12, r=4, alpha=8, dropout=1.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 16)
    base = F.linear(x, layer.weight, layer.bias)
    layer.train()  # p = 1 drops all of the LoRA branch's input: the base output must pass through untouched
    assert torch.equal(layer(x), base)
    layer.eval()  # no dropout in eval: the LoRA branch is back
    assert_close(layer(x), base + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T)
    assert not torch.allclose(layer(x), base)


def test_injected_layers_follow_the_models_train_mode():
    config = CONFIGS["llama-gqa"]
    model = GPT(config).eval()
    inject_lora(model, targets="all", dropout=0.5)
    randomize_lora(model)
    assert all(not m.training for m in model.modules())
    idx = tokens(config)
    assert torch.equal(model(idx), model(idx))  # no dropout in eval
    model.train()
    assert not torch.equal(model(idx), model(idx))  # dropout on the LoRA branches in train


def test_rslora_scaling():
    plain = LoRALinear(16, 12, r=16, alpha=8)
    rs = LoRALinear(16, 12, r=16, alpha=8, use_rslora=True)
    assert plain.scaling == 8 / 16 and rs.scaling == 8 / 4
    with torch.no_grad():
        rs.weight.copy_(plain.weight), rs.bias.copy_(plain.bias), rs.lora_A.copy_(plain.lora_A)
        plain.lora_B.normal_()
        rs.lora_B.copy_(plain.lora_B)
    x = torch.randn(3, 16)
    base = plain.base_forward(x)
    assert_close(rs(x) - base, 4 * (plain(x) - base))  # alpha/sqrt(r) = 4 · alpha/r at r = 16
    cfg = LoRAConfig(r=16, alpha=8, use_rslora=True)
    assert cfg.scaling == 2.0


def test_merge_is_exact_and_idempotent():
    layer = LoRALinear(20, 12, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    w0 = layer.weight.detach().clone()
    x = torch.randn(3, 20)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    assert torch.equal(layer.weight, w0 + layer.scaling * (layer.lora_B @ layer.lora_A))
    merged_w = layer.weight.detach().clone()
    layer.merge()  # idempotent
    assert torch.equal(layer.weight, merged_w)
    assert torch.equal(layer(x), layer.base_forward(x))  # merged forward skips the LoRA branch
    assert_close(layer(x), unmerged)
    layer.unmerge()
    assert not layer.merged
    assert_close(layer.weight, w0)
    restored = layer.weight.detach().clone()
    layer.unmerge()  # idempotent
    assert torch.equal(layer.weight, restored)
    assert_close(layer(x), unmerged)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_meta_base_assigned_later(use_dora):
    linear = nn.Linear(16, 12)
    with torch.device("meta"):
        meta_linear = nn.Linear(16, 12)
    layer = LoRALinear.from_linear(meta_linear, r=4, alpha=8, use_dora=use_dora)
    assert layer.weight.is_meta and layer.lora_A.is_meta
    missing, unexpected = layer.load_state_dict(linear.state_dict(), strict=False, assign=True)
    assert sorted(missing) == ["lora_A", "lora_B"] + (["lora_magnitude"] if use_dora else []) and not unexpected
    x = torch.randn(3, 16)
    with pytest.raises(LoraLabError, match="meta device"):
        layer(x)
    layer.reset_lora_parameters()  # a new adapter, created on the loaded weight's device
    assert not layer.lora_A.is_meta and layer.lora_A.requires_grad and not layer.weight.requires_grad
    assert torch.equal(layer(x), linear(x))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_meta_model_loads_base_and_adapter(use_dora):
    config = CONFIGS["llama-gqa"]
    ref = inject_lora(GPT(config), targets="all", use_dora=use_dora)
    randomize_lora(ref)
    with torch.device("meta"):
        model = inject_lora(GPT(config), targets="all", use_dora=use_dora)
    base = {k: v for k, v in ref.state_dict().items() if "lora_" not in k}
    missing, unexpected = model.load_state_dict(base, strict=False, assign=True)
    assert set(missing) == set(lora_state_dict(ref)) and not unexpected
    load_lora_state_dict(model, lora_state_dict(ref))
    assert not any(p.is_meta for p in model.parameters())
    idx = tokens(config)
    assert torch.equal(model(idx), ref(idx))


@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16])
def test_bf16_base_with_adapters_in_float32_or_bf16(lora_dtype):
    torch.manual_seed(2)
    ref = LoRALinear(32, 16, r=4, alpha=8)
    with torch.no_grad():
        ref.lora_B.normal_()
    layer = LoRALinear.from_linear(nn.Linear(32, 16).to(torch.bfloat16), r=4, alpha=8, lora_dtype=lora_dtype)
    with torch.no_grad():
        layer.weight.copy_(ref.weight), layer.bias.copy_(ref.bias)
        layer.lora_A.copy_(ref.lora_A), layer.lora_B.copy_(ref.lora_B)
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == lora_dtype
    x = torch.randn(4, 32)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert_close(y.float(), ref(x), atol=0.05, rtol=0.02)
    y.float().sum().backward()
    assert layer.lora_B.grad.dtype == lora_dtype and layer.weight.grad is None
    unmerged = layer(x.bfloat16())
    layer.merge()
    assert layer.weight.dtype == torch.bfloat16
    assert_close(layer(x.bfloat16()).float(), unmerged.float(), atol=0.05, rtol=0.02)


# ---- model-level helpers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIGS)
def test_b_zero_gives_base_logits_exactly(name):
    config = CONFIGS[name]
    model = GPT(config)
    idx = tokens(config)
    before = model(idx)
    inject_lora(model, r=4, alpha=8, targets="all")
    assert len(list(lora_modules(model))) > 0
    assert torch.equal(model(idx), before)


def test_inject_targets_by_role():
    model = inject_lora(GPT(CONFIGS["llama-gqa"]), targets=("projection", "mlp"))
    names = sorted(name for name, _ in lora_modules(model))
    assert names == sorted(f"blocks.{i}.{m}" for i in range(2) for m in
                           ("attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    model = inject_lora(GPT(CONFIGS["neox-gelu-bias"]), targets="all")
    names = {name for name, _ in lora_modules(model)}
    assert names == {"lm_head"} | {f"blocks.{i}.{m}" for i in range(2) for m in
                                   ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.up_proj",
                                    "mlp.down_proj")}
    with pytest.raises(LoraLabError, match="already has LoRA"):
        inject_lora(model, targets="query")


def test_inject_unknown_role_lists_valid_ones():
    with pytest.raises(LoraLabError) as e:
        inject_lora(GPT(CONFIGS["llama-gqa"]), targets=("query", "attention"))
    msg = str(e.value)
    assert "'attention'" in msg and "\n" not in msg
    for role in ("query", "key", "value", "projection", "mlp", "lm_head", "all"):
        assert role in msg


def test_mark_only_lora_trainable_and_counts():
    config = CONFIGS["neox-gelu-bias"]
    model = inject_lora(GPT(config), r=4, targets=("query", "value"))
    mark_only_lora_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.attn.{p}_proj.lora_{ab}" for i in range(2) for p in "qv" for ab in "AB"}
    # each of the 4 layers has r·(in + out) = 4 · (32 + 32)
    assert count_parameters(model)[0] == 4 * 4 * (32 + 32)

    mark_only_lora_trainable(model, bias="lora_only")
    biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert biases == {f"blocks.{i}.attn.{p}_proj.bias" for i in range(2) for p in "qv"}
    mark_only_lora_trainable(model, bias="all")
    biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert biases == {n for n, _ in model.named_parameters() if n.endswith("bias")} and len(biases) > 4
    with pytest.raises(LoraLabError, match="bias="):
        mark_only_lora_trainable(model, bias="some")


def test_count_parameters_counts_tied_tensor_once():
    config = CONFIGS["tied-mqa"]
    model = GPT(config)
    unique = {id(p): p.numel() for p in model.state_dict(keep_vars=True).values()}
    trainable, total = count_parameters(model)
    assert total == sum(unique.values()) == trainable
    assert total < sum(p.numel() for p in model.state_dict().values())  # the state dict lists wte twice


def test_training_changes_only_lora_parameters():
    config = CONFIGS["llama-gqa"]
    model = inject_lora(GPT(config), r=4, targets="all")
    mark_only_lora_trainable(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model)
    after = model.state_dict()
    for k, v in after.items():
        if "lora_" in k:
            assert not torch.equal(v, before[k]), k
        else:
            assert torch.equal(v, before[k]), k


def test_tied_lm_head_lora_leaves_embedding_unchanged():
    config = CONFIGS["tied-mqa"]
    model = inject_lora(GPT(config), r=4, targets=("query", "lm_head"))
    mark_only_lora_trainable(model)
    assert model.lm_head.weight is model.wte.weight and model.lm_head.shares_weight
    wte0 = model.wte.weight.detach().clone()
    head_B0 = model.lm_head.lora_B.detach().clone()
    train_steps(model)
    assert torch.equal(model.wte.weight, wte0)
    assert model.lm_head.weight is model.wte.weight  # still tied: one frozen tensor
    assert not torch.equal(model.lm_head.lora_B, head_B0)

    with pytest.raises(LoraLabError, match="merge_lora"):
        model.lm_head.merge()  # in place it would change the embedding
    idx = tokens(config)
    unmerged = model(idx)
    merge_lora(model)
    assert torch.equal(model.wte.weight, wte0)
    assert model.lm_head.weight is not model.wte.weight and not model.config.tie_embeddings
    assert config.tie_embeddings  # the Config object the model was built from was not edited
    assert_close(model(idx), unmerged)
    unmerge_lora(model)
    assert model.lm_head.weight is model.wte.weight and model.config.tie_embeddings
    assert_close(model(idx), unmerged)


@pytest.mark.parametrize("name", ["llama-gqa", "neox-gelu-bias", "tied-mqa"])
def test_merge_lora_model_logits_close(name):
    config = CONFIGS[name]
    model = inject_lora(GPT(config), r=4, targets="all", use_rslora=True)
    randomize_lora(model)
    idx = tokens(config)
    base = GPT(config)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k})
    unmerged = model(idx)
    assert not torch.allclose(unmerged, base(idx), atol=1e-3)  # the adapters do change the output
    merge_lora(model)
    assert all(m.merged for _, m in lora_modules(model))
    assert_close(model(idx), unmerged, atol=1e-4, rtol=1e-4)
    unmerge_lora(model)
    assert_close(model(idx), unmerged, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_query_groups", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_query_value_lora_matches_fused_qkv_reference(n_query_groups):
    """LoRA on query and value must update exactly the q and v row blocks of the fused Wqkv = cat(Wq, Wk, Wv)."""
    config = tiny_config(n_head=4, n_query_groups=n_query_groups)
    model = inject_lora(GPT(config), r=4, alpha=8, targets=("query", "value"))
    randomize_lora(model)
    q_rows = config.n_head * config.head_size
    kv_rows = config.n_query_groups * config.head_size
    reference = GPT(config)
    ref_sd = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    eye = torch.eye(config.n_embd)
    for i, block in enumerate(model.blocks):
        attn = block.attn
        fused = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])  # (q + 2 kv, C)
        assert fused.shape == (q_rows + 2 * kv_rows, config.n_embd)
        # reference: B A lands on the q rows and the v rows of the fused matrix, nothing on the k rows
        ref_delta = torch.zeros_like(fused)
        ref_delta[:q_rows] = attn.q_proj.scaling * attn.q_proj.lora_B @ attn.q_proj.lora_A
        ref_delta[q_rows + kv_rows:] = attn.v_proj.scaling * attn.v_proj.lora_B @ attn.v_proj.lora_A
        # the injected model's effective fused weight, read off by feeding it the identity (no bias here)
        with torch.no_grad():
            effective = torch.cat([attn.q_proj(eye).T, attn.k_proj(eye).T, attn.v_proj(eye).T])
        delta = effective - fused
        assert torch.equal(delta[q_rows:q_rows + kv_rows], torch.zeros(kv_rows, config.n_embd))
        assert_close(delta, ref_delta, atol=1e-6, rtol=1e-5)
        wq, wk, wv = (fused + ref_delta).split([q_rows, kv_rows, kv_rows])
        ref_sd.update({f"blocks.{i}.attn.q_proj.weight": wq, f"blocks.{i}.attn.k_proj.weight": wk,
                       f"blocks.{i}.attn.v_proj.weight": wv})
    reference.load_state_dict(ref_sd)
    idx = tokens(config)
    assert_close(model(idx), reference(idx), atol=1e-5, rtol=1e-5)


def test_base_state_dict_loads_with_only_lora_keys_missing(tmp_path):
    config = CONFIGS["neox-gelu-bias"]
    base = GPT(config)
    model = inject_lora(GPT(config), targets="all", use_dora=True)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected
    assert set(missing) == set(lora_state_dict(model))
    assert all(k.rsplit(".", 1)[-1].startswith("lora_") for k in missing)
    # the order scripts use: load the checkpoint, then inject
    save_checkpoint(tmp_path / "ckpt", config, base.state_dict())
    loaded = inject_lora(GPT.from_checkpoint(tmp_path / "ckpt"), targets="all")
    idx = tokens(config)
    assert torch.equal(loaded(idx), base(idx))


def test_lora_state_dict_has_only_adapter_tensors():
    model = inject_lora(GPT(CONFIGS["llama-gqa"]), r=4, targets=("key", "mlp"), use_dora=True)
    sd = lora_state_dict(model)
    assert sd and all(k.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_magnitude") for k in sd)
    assert len(sd) == 2 * (1 + 3) * 3  # 2 blocks · 4 layers · (A, B, magnitude)


# ---- adapter files -----------------------------------------------------------------------------------------
def test_lora_config_round_trip_and_validation():
    cfg = LoRAConfig(r=4, alpha=8, targets="all", use_dora=True, lora_plus_ratio=16, base_model="tiny",
                     base_config=CONFIGS["llama-gqa"].to_dict(), prompt_style="chatml")
    assert cfg.targets == ["query", "key", "value", "projection", "mlp", "lm_head", "experts"]
    assert LoRAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert LoRAConfig(targets=("value", "query")).targets == ["query", "value"]
    with pytest.raises(LoraLabError, match="unknown LoRA config keys"):
        LoRAConfig.from_dict({"r": 4, "rank": 4})
    with pytest.raises(LoraLabError, match="valid targets"):
        LoRAConfig(targets=["qkv"])
    with pytest.raises(LoraLabError, match="positive integer"):
        LoRAConfig(r=0)


def test_save_and_load_lora_round_trip(tmp_path):
    config = CONFIGS["llama-gqa"]
    cfg = LoRAConfig(r=4, alpha=8, targets=("query", "value", "lm_head"), base_model="tiny",
                     base_config=config.to_dict(), prompt_style="alpaca")
    model = cfg.inject(GPT(config))
    randomize_lora(model)
    save_lora(tmp_path / "adapter", model, cfg)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["lora.safetensors", "lora_config.json"]
    loaded_cfg, sd = load_lora(tmp_path / "adapter")
    assert loaded_cfg == cfg
    assert sd.keys() == lora_state_dict(model).keys()
    for k, v in lora_state_dict(model).items():
        assert torch.equal(sd[k], v)
    fresh = GPT(config)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k})
    loaded_cfg.inject(fresh)
    load_lora_state_dict(fresh, sd, source=tmp_path / "adapter")
    idx = tokens(config)
    assert torch.equal(fresh(idx), model(idx))

    with pytest.raises(LoraLabError, match="does not describe"):
        save_lora(tmp_path / "other", model, LoRAConfig(r=8, targets=("query", "value", "lm_head")))
    with pytest.raises(LoraLabError, match="targets"):
        save_lora(tmp_path / "other", model, LoRAConfig(r=4, targets=("query", "value")))


def test_load_lora_errors_are_one_line(tmp_path):
    def error(path) -> str:
        with pytest.raises(LoraLabError) as e:
            load_lora(path)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "does not exist" in error(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "lora_config.json is missing" in error(tmp_path / "empty")
    model = inject_lora(GPT(CONFIGS["llama-gqa"]), r=4)
    save_lora(tmp_path / "a", model, LoRAConfig(r=4))
    weights = tmp_path / "a" / "lora.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])  # truncated
    assert "lora.safetensors is truncated or corrupt" in error(tmp_path / "a")
    weights.write_bytes(b"not a safetensors file at all")
    assert "lora.safetensors is truncated or corrupt" in error(tmp_path / "a")
    weights.unlink()
    assert "lora.safetensors is missing" in error(tmp_path / "a")
    save_lora(tmp_path / "b", model, LoRAConfig(r=4))
    (tmp_path / "b" / "lora_config.json").write_text("{r: 4")
    assert "lora_config.json is not valid JSON" in error(tmp_path / "b")
    (tmp_path / "b" / "lora_config.json").write_text('{"r": 4, "targets": ["qkv"]}')
    msg = error(tmp_path / "b")
    assert "lora_config.json is not a valid LoRA config" in msg and "'qkv'" in msg
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model_config.json").write_text("{}")
    assert "looks like a model checkpoint" in error(tmp_path / "ckpt")


def mismatch_error(model, sd) -> str:
    with pytest.raises(LoraLabError) as e:
        load_lora_state_dict(model, sd, source="adapter_dir")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("adapter_dir: ")
    return msg


def test_mismatched_adapter_gives_one_line():
    config = CONFIGS["llama-gqa"]
    adapter = lora_state_dict(inject_lora(GPT(config), r=16, targets=("query", "value")))
    model = inject_lora(GPT(config), r=8, targets=("query", "value"))
    msg = mismatch_error(model, adapter)
    assert "adapter has r=16 for blocks.0.attn.q_proj but the model was set up with r=8" in msg

    adapter = lora_state_dict(inject_lora(GPT(config), r=8, targets=("query", "key", "value")))
    msg = mismatch_error(model, adapter)
    assert "adapter has weights for key projections that the model has no LoRA on" in msg
    assert "blocks.0.attn.k_proj" in msg

    adapter = lora_state_dict(inject_lora(GPT(config), r=8, targets=("query",)))
    assert "the model has LoRA on value projections" in mismatch_error(model, adapter)

    adapter = lora_state_dict(inject_lora(GPT(tiny_config(n_embd=64)), r=8, targets=("query", "value")))
    msg = mismatch_error(model, adapter)
    assert "blocks.0.attn.q_proj.lora_A has shape (8, 64) but the model expects (8, 32)" in msg

    adapter = lora_state_dict(inject_lora(GPT(tiny_config(n_layer=3)), r=8, targets=("query", "value")))
    assert "blocks.2.attn.q_proj, which the model does not have" in mismatch_error(model, adapter)

    adapter = lora_state_dict(inject_lora(GPT(config), r=8, targets=("query", "value"), use_dora=True))
    assert "DoRA" in mismatch_error(model, adapter)
    dora_model = inject_lora(GPT(config), r=8, targets=("query", "value"), use_dora=True)
    plain = lora_state_dict(inject_lora(GPT(config), r=8, targets=("query", "value")))
    assert "set up with use_dora but the adapter is plain LoRA" in mismatch_error(dora_model, plain)

    assert "is not a LoRA weight" in mismatch_error(model, GPT(config).state_dict())
    # nothing was loaded by the failed attempts: B is still zero
    assert all(torch.equal(m.lora_B, torch.zeros_like(m.lora_B)) for _, m in lora_modules(model))


# ---- DoRA and LoRA+ ----------------------------------------------------------------------------------------
def test_dora_init_is_base_exactly_and_magnitude_is_row_norm():
    config = CONFIGS["neox-gelu-bias"]
    model = GPT(config)
    idx = tokens(config)
    before = model(idx)
    inject_lora(model, r=4, targets="all", use_dora=True)
    assert torch.equal(model(idx), before)
    for _, m in lora_modules(model):
        assert torch.equal(m.lora_magnitude, torch.linalg.vector_norm(m.weight, dim=1))


def test_dora_formula_merge_and_trainable_magnitude():
    torch.manual_seed(3)
    layer = LoRALinear(24, 16, r=4, alpha=8, use_dora=True)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
        layer.lora_magnitude.mul_(1 + 0.2 * torch.rand(16))
    x = torch.randn(5, 24)
    adapted = layer.weight + layer.scaling * layer.lora_B @ layer.lora_A
    w_dora = layer.lora_magnitude[:, None] * adapted / adapted.norm(dim=1, keepdim=True)
    y = layer(x)
    assert_close(y, F.linear(x, w_dora, layer.bias))
    y.sum().backward()
    assert layer.lora_magnitude.grad is not None and layer.lora_magnitude.grad.abs().sum() > 0
    assert layer.lora_A.grad.abs().sum() > 0 and layer.weight.grad is None

    w0 = layer.weight.detach().clone()
    layer.merge()
    assert_close(layer.weight, w_dora.detach())
    assert_close(layer(x), y)
    layer.unmerge()
    assert_close(layer.weight, w0)
    assert_close(layer(x), y)

    model = inject_lora(GPT(CONFIGS["llama-gqa"]), r=4, targets="all", use_dora=True)
    mark_only_lora_trainable(model)
    assert all(m.lora_magnitude.requires_grad for _, m in lora_modules(model))
    randomize_lora(model)
    idx = tokens(model.config)
    unmerged = model(idx)
    merge_lora(model)
    assert_close(model(idx), unmerged, atol=1e-4, rtol=1e-4)


def test_lora_plus_param_groups():
    model = inject_lora(GPT(CONFIGS["llama-gqa"]), r=4, targets="all", use_dora=True)
    mark_only_lora_trainable(model, bias="all")
    groups = lora_plus_param_groups(model, lr=1e-3, ratio=16)
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].rsplit(".", 1)[-1] for p in groups[1]["params"]} == {"lora_B"}
    assert {names[id(p)].rsplit(".", 1)[-1] for p in groups[0]["params"]} == {"lora_A", "lora_magnitude"}
    trainable = [p for p in model.parameters() if p.requires_grad]
    grouped = groups[0]["params"] + groups[1]["params"]
    assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable}
    opt = torch.optim.AdamW(groups)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 16e-3]


def test_adapted_roles_say_what_all_came_to_on_the_model():
    """`--lora_targets all` on a dense model adapts no experts (there are none), and the scripts' start-up line
    says so; on a mixture of experts the experts' projections are adapted too."""
    common = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=64, block_size=32)
    dense = inject_lora(GPT(Config(**common, intermediate_size=48)), targets="all")
    assert adapted_roles(dense) == ["query", "key", "value", "projection", "mlp", "lm_head"]
    moe = inject_lora(GPT(Config(**common, n_expert=4, n_expert_per_token=2, moe_intermediate_size=24)),
                      targets=["value", "experts"])
    assert adapted_roles(moe) == ["value", "experts"]
