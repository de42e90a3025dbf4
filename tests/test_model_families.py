"""The 2024-25 families (Qwen3, Qwen3-MoE, Gemma 2, Gemma 3, Phi-3 / 4, OLMo 2 / 3, SmolLM3) against transformers, on
tiny random models (tests/hf_tiny.py: odd sizes, GQA, enough layers for every per-layer pattern):

  - KV-cache decoding one token at a time, past the sliding windows, equals transformers' own cached decoding;
  - a left-padded batch (segment_ids = the attention mask) equals transformers with that mask and positions;
  - a LoRA adapter exported to PEFT (fused layers, MoE experts as target_parameters) gives our logits in PEFT;
  - each switch matters (so the parity tests can fail): soft-caps, per-layer windows, NoPE, local RoPE base, ...
  - MoE: routing equals transformers' token by token, the load-balancing loss equals theirs, LoRA on the experts
    trains, and NF4 expert weights are bit-identical to bitsandbytes'.
Conversion both ways (prefill logits, bit-exact round trip) is in test_convert_hf.py, which runs every family of
hf_tiny too. Tolerance: float32, rtol 1e-5 and atol 1e-5 x the largest |logit|.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_tiny import NEW_FAMILIES, VOCAB, tiny_hf_config, tiny_hf_model  # noqa: E402
from lora_lab.checkpoint import save_checkpoint  # noqa: E402
from lora_lab.config import Config  # noqa: E402
from lora_lab.formats.hf import config_from_hf, convert_hf_checkpoint, export_hf  # noqa: E402
from lora_lab.lora import LoRAConfig, inject_lora, lora_modules, mark_only_lora_trainable, save_lora  # noqa: E402
from lora_lab.model import GPT, MoE, load_balancing_loss  # noqa: E402

T = 16


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-5,
                               atol=1e-5 * float(expected.abs().max()))


def converted(tmp_path, name: str):
    """(the transformers model, ours converted from its save_pretrained folder)."""
    hf_model = tiny_hf_model(name)
    hf_model.save_pretrained(tmp_path / "hf")
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "ours")
    return hf_model, GPT.from_checkpoint(tmp_path / "ours").eval()


def tokens(batch: int = 2, length: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NEW_FAMILIES)
@torch.no_grad()
def test_kv_cache_decoding_equals_transformers(tmp_path, name):
    """A 3-token prompt, then 13 tokens one at a time (windows are 5 and 6: decoding goes past them)."""
    hf_model, model = converted(tmp_path, name)
    x, prompt = tokens(), 3
    out = hf_model(x[:, :prompt], use_cache=True)
    expected, cache = [out.logits], out.cache
    for t in range(prompt, T):
        out = hf_model(x[:, t:t + 1], cache=cache, use_cache=True)
        expected.append(out.logits)
        cache = out.cache
    model.set_kv_cache(batch_size=2, max_seq_length=T)
    got = [model(x[:, :prompt], input_pos=0)] + [model(x[:, t:t + 1], input_pos=t) for t in range(prompt, T)]
    close(torch.cat(got, dim=1), torch.cat(expected, dim=1))


@pytest.mark.parametrize("name", NEW_FAMILIES)
@torch.no_grad()
def test_left_padding_equals_transformers(tmp_path, name):
    hf_model, model = converted(tmp_path, name)
    x = tokens()
    mask = torch.ones_like(x)
    mask[0, :5] = 0  # row 0: 5 padding tokens on the left
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    expected = hf_model(x, attention_mask=mask, position_ids=positions).logits
    got = model(x, segment_ids=mask)
    real = mask.bool()
    close(got[real], expected[real])


# ---- PEFT ----------------------------------------------------------------------------------------------------
def random_adapter(model: GPT, targets, r: int = 4, alpha: float = 8.0) -> LoRAConfig:
    lora_config = LoRAConfig(r=r, alpha=alpha, targets=targets, base_config=model.config.to_dict())
    inject_lora(model, r=r, alpha=alpha, targets=targets)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.normal_(0.0, 0.3)  # B = 0 (its init) would make the adapter a no-op
    return lora_config


@pytest.mark.parametrize("name", ["qwen3", "gemma2", "gemma3", "phi4mini", "olmo2", "smollm3", "qwen3_moe"])
def test_peft_export_equals_peft(tmp_path, name):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_lab.formats.peft import export_peft

    config = config_from_hf(tiny_hf_config(name).to_dict(), name="tiny")
    torch.manual_seed(0)
    model = GPT(config).eval()
    save_checkpoint(tmp_path / "base", config, model.state_dict())
    export_hf(tmp_path / "base", tmp_path / "base-hf")
    # (Qwen3-MoE: PEFT reads the dense layers' gate/up/down_proj as experts, so no "mlp" there: see the refusal)
    targets = ["query", "key", "value", "projection", "lm_head", "experts"] if name == "qwen3_moe" else "all"
    lora_config = random_adapter(model, targets)
    lora_config.base_model = str(tmp_path / "base")
    save_lora(tmp_path / "adapter", model, lora_config)
    written = export_peft(tmp_path / "adapter", tmp_path / "peft")
    if name == "qwen3_moe":
        assert written["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
        assert written["rank_pattern"]["experts.gate_up_proj"] == 8 and written["lora_dropout"] == 0.0
    if name.startswith("phi"):
        assert {"qkv_proj", "gate_up_proj"} <= set(written["target_modules"])
        assert written["rank_pattern"] == {"qkv_proj": 12, "gate_up_proj": 8}

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base-hf", dtype=torch.float32,
                                              attn_implementation="eager").eval()
    x = tokens()
    with torch.no_grad():
        base = hf(x).logits
        peft_logits = PeftModel.from_pretrained(hf, tmp_path / "peft").eval()(input_ids=x).logits
        ours = model(x)
    assert not torch.allclose(base, ours, atol=1e-2)  # the adapter matters
    close(peft_logits, ours)


# ---- each switch matters -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, field, off", [
    ("gemma2", "attn_softcap", None), ("gemma2", "final_softcap", None), ("gemma2", "global_layers", None),
    ("gemma2", "post_norms", False), ("gemma2", "attn_scale_base", None), ("gemma3", "rope_local_base", None),
    ("gemma3", "rope_scaling", None), ("qwen3", "qk_norm", None), ("olmo2", "qk_norm", None),
    ("smollm3", "nope_layers", None), ("qwen3", "rope_scaling", None), ("olmo3", "rope_scaling", None),
    ("olmo3", "global_layers", None), ("phi4mini", "rope_scaling", None), ("qwen3_moe", "norm_topk_prob", False),
])
@torch.no_grad()
def test_switch_changes_the_logits(name, field, off):
    config = config_from_hf(tiny_hf_config(name).to_dict())
    assert getattr(config, field) not in (None, False)
    torch.manual_seed(0)
    model = GPT(config).eval()
    state = {k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    changed = GPT(Config(**{**config.to_dict(), field: off})).eval()
    changed.load_state_dict(state, strict=False)
    x = tokens()
    assert not torch.allclose(model(x), changed(x), atol=1e-4)


def test_per_layer_patterns_are_read():
    gemma2 = config_from_hf(tiny_hf_config("gemma2").to_dict())
    assert [gemma2.window_at(i) for i in range(4)] == [5, None, 5, None]  # sliding, global, ...
    gemma3 = config_from_hf(tiny_hf_config("gemma3").to_dict())
    assert [gemma3.rope_at(i) for i in range(7)] == ["local"] * 5 + ["global", "local"]
    assert (gemma3.rope_base, gemma3.rope_local_base, gemma3.rope_scaling) == (1e6, 1e4, {"rope_type": "linear",
                                                                                         "factor": 4.0})
    smollm3 = config_from_hf(tiny_hf_config("smollm3").to_dict())
    assert smollm3.nope_layers == [3] and smollm3.rope_at(3) is None
    qwen3 = config_from_hf(tiny_hf_config("qwen3_sliding").to_dict())
    assert [qwen3.window_at(i) for i in range(4)] == [None, None, 5, 5]
    moe = config_from_hf(tiny_hf_config("qwen3_moe").to_dict())
    assert (moe.n_expert, moe.n_expert_per_token, moe.moe_layers) == (5, 2, [0, 2])
    phi = config_from_hf(tiny_hf_config("phi4mini").to_dict())
    assert phi.rope_n_elem == 12 and phi.rope_scaling["original_max_seq_len"] == 8


def test_uniform_models_keep_the_shared_path():
    """Families without per-layer differences take the one-table path (no per-layer lists built)."""
    for name in ("qwen3", "olmo2", "phi3", "qwen3_moe"):
        assert config_from_hf(tiny_hf_config(name).to_dict()).uniform_layers, name
    for name in ("gemma2", "gemma3", "smollm3", "qwen3_sliding"):
        assert not config_from_hf(tiny_hf_config(name).to_dict()).uniform_layers, name


# ---- mixture of experts --------------------------------------------------------------------------------------
@torch.no_grad()
def test_moe_routing_equals_transformers_token_by_token(tmp_path):
    hf_model, model = converted(tmp_path, "qwen3_moe")
    x = torch.randn(2 * T, 40)  # (N, C) hidden states into layer 0's MoE
    hf_logits, hf_weights, hf_chosen = hf_model.model.layers[0].mlp.gate(x)
    logits, weights, chosen = model.blocks[0].mlp.route(x)
    assert torch.equal(chosen, hf_chosen)  # the same experts, in the same order
    torch.testing.assert_close(weights, hf_weights, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logits, hf_logits, rtol=1e-6, atol=1e-6)
    close(model.blocks[0].mlp(x[None])[0], hf_model.model.layers[0].mlp(x[None])[0])


@torch.no_grad()
def test_moe_load_balancing_loss_equals_transformers(tmp_path):
    hf_model, model = converted(tmp_path, "qwen3_moe")
    x = tokens()
    expected = hf_model(x, output_router_logits=True).aux_loss
    model(x)
    torch.testing.assert_close(load_balancing_loss(model), expected, rtol=1e-5, atol=1e-6)
    assert sum(isinstance(m, MoE) for m in model.modules()) == 2  # layer 1 is dense (mlp_only_layers)


def test_moe_lora_on_experts_trains_with_the_router_frozen():
    config = config_from_hf(tiny_hf_config("qwen3_moe").to_dict())
    torch.manual_seed(0)
    model = GPT(config)
    inject_lora(model, r=4, alpha=8.0, targets="experts")
    mark_only_lora_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".experts." in n and ".lora_" in n for n in trainable)
    assert len(trainable) == 2 * 3 * 5 * 2  # 2 MoE layers x 3 projections x 5 experts x (A, B)
    router = model.blocks[0].mlp.router.weight.clone()
    x = tokens(4, T, seed=3)
    labels = x.clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(30):
        loss = model(x, labels=labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert torch.equal(model.blocks[0].mlp.router.weight, router)


def test_moe_full_finetuning_gets_the_balancing_gradient():
    config = config_from_hf(tiny_hf_config("qwen3_moe").to_dict())
    torch.manual_seed(0)
    model = GPT(config)
    x = tokens()
    loss = model(x, labels=x) + 0.001 * load_balancing_loss(model)
    loss.backward()
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0


def test_moe_nf4_experts_equal_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    from lora_lab.nf4 import NF4Linear, quantize_nf4

    config = config_from_hf(tiny_hf_config("qwen3_moe").to_dict())
    torch.manual_seed(0)
    model = GPT(config)
    weights = {e: model.blocks[0].mlp.experts[e].up_proj.weight.detach().clone() for e in range(config.n_expert)}
    quantize_nf4(model)
    assert type(model.blocks[0].mlp.router).__name__ == "Router"  # the router stays in full precision
    for e, w in weights.items():
        layer = model.blocks[0].mlp.experts[e].up_proj
        assert isinstance(layer, NF4Linear)
        packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        assert torch.equal(layer.weight, packed)
        assert torch.equal(layer.weight_absmax, state.absmax)
        assert torch.equal(layer.weight_nested_absmax, state.state2.absmax)
        assert torch.equal(layer.weight_offset, state.offset)


def test_peft_export_refusals_for_moe(tmp_path):
    from lora_lab.formats.peft import export_peft
    from lora_lab.utils import LoraLabError

    config = config_from_hf(tiny_hf_config("qwen3_moe").to_dict())
    model = GPT(config)
    save_checkpoint(tmp_path / "base", config, model.state_dict())
    lora_config = LoRAConfig(r=2, targets="experts", use_dora=True, base_model=str(tmp_path / "base"),
                             base_config=config.to_dict())
    inject_lora(model, r=2, targets="experts", use_dora=True)
    save_lora(tmp_path / "adapter", model, lora_config)
    with pytest.raises(LoraLabError, match="no DoRA for mixture-of-experts"):
        export_peft(tmp_path / "adapter", tmp_path / "peft")
    model = GPT(config)
    inject_lora(model, r=2, targets="all")
    save_lora(tmp_path / "all", model, LoRAConfig(r=2, targets="all", base_model=str(tmp_path / "base"),
                                                  base_config=config.to_dict()))
    with pytest.raises(LoraLabError, match=r"dense MLP layers \(blocks.1.mlp.\w+_proj\)"):
        export_peft(tmp_path / "all", tmp_path / "peft")
    assert not (tmp_path / "peft" / "adapter_config.json").exists()
    assert json.loads((tmp_path / "adapter" / "lora_config.json").read_text())["targets"] == ["experts"]


def test_moe_flops_count_the_chosen_experts_only():
    """Two of four experts of width 24 per token cost what one MLP of width 48 costs."""
    from lora_lab.flops import training_flops

    common = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=64, block_size=32)
    moe = GPT(Config(**common, n_expert=4, n_expert_per_token=2, moe_intermediate_size=24))
    dense = GPT(Config(**common, intermediate_size=48))
    assert training_flops(moe).per_token == training_flops(dense).per_token


# tiny HF config -> the llama.cpp architecture it exports as, or why it is refused (tests/test_export_gguf.py runs
# each exported architecture in llama.cpp)
GGUF_ARCH = {"gemma3": "gemma3", "phi4mini": "phi3", "phi3": "llama", "olmo2": "olmo2", "smollm3": "smollm3",
             "qwen3": "qwen3", "olmo3": "olmo2", "qwen3_sliding": "sliding and global layers",
             "gemma2": "gemma2 scales queries by 12\\*\\*-0.5 for 4 layers, not by 20",
             "qwen3_moe": "qwen3moe has experts on every layer"}


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_gguf_architecture_of_each_family_or_one_line_why_not(name):
    """What llama.cpp would run as another model is refused in one line: Qwen3's per-layer windows (llama.cpp's
    qwen3 has none), a Gemma 2 query scale llama.cpp does not derive, a Qwen3-MoE with dense layers."""
    from lora_lab.formats.gguf_names import ARCHS, gguf_architecture
    from lora_lab.utils import LoraLabError

    config = config_from_hf(tiny_hf_config(name).to_dict())
    if GGUF_ARCH[name] in ARCHS:
        assert gguf_architecture(config).name == GGUF_ARCH[name]
    else:
        with pytest.raises(LoraLabError, match=f"cannot be exported to GGUF: .*{GGUF_ARCH[name]}") as e:
            gguf_architecture(config)
        assert "\n" not in str(e.value)


def test_gemma3_image_text_folder_converts_to_its_text_model(tmp_path, capsys):
    """Gemma 3 4b and larger are Gemma3ForConditionalGeneration: text_config nested, the decoder under
    language_model.*, a vision tower beside it. convert takes the text model (one line says the rest is dropped) and
    our logits equal transformers' for a text-only prompt."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from hf_tiny import TINY_HF, perturb_

    text = TINY_HF["gemma3"][1]
    hf_config = Gemma3Config(text_config=dict(text), vision_config=dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
        patch_size=14), mm_tokens_per_image=4, boi_token_index=VOCAB - 8, eoi_token_index=VOCAB - 7,
        image_token_index=VOCAB - 6)
    torch.manual_seed(0)
    hf_model = perturb_(Gemma3ForConditionalGeneration(hf_config)).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    config = convert_hf_checkpoint(tmp_path / "hf", tmp_path / "ours")
    note = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "Gemma3ForConditionalGeneration" in note[0] and "vision tower" in note[0]
    assert config.extra["hf_architecture"] == "Gemma3ForCausalLM" and config.global_layers == [5]
    idx = tokens()
    with torch.no_grad():
        theirs = hf_model(input_ids=idx).logits
        ours = GPT.from_checkpoint(tmp_path / "ours").eval()(idx)
    close(ours, theirs)


def test_every_released_size_of_the_new_families_has_a_gguf_architecture():
    """The named configs (the published config.json values) fit what llama.cpp fixes: Gemma 2 / 3's window
    patterns and query scales (27B: n_embd / n_head), SmolLM3's NoPE layers, Qwen3-MoE's all-MoE layers."""
    from lora_lab.config import name_to_config
    from lora_lab.formats.gguf_names import gguf_architecture

    expected = {"Qwen3-8B": "qwen3", "Qwen3-30B-A3B": "qwen3moe", "Qwen3-235B-A22B-Base": "qwen3moe",
                "gemma-2-2b": "gemma2", "gemma-2-27b-it": "gemma2", "gemma-3-270m-it": "gemma3",
                "gemma-3-4b-pt": "gemma3", "gemma-3-27b-it": "gemma3", "Phi-3-mini-4k-instruct": "llama",
                "OLMo-2-1124-13B-Instruct": "olmo2", "SmolLM3-3B": "smollm3"}
    assert {n: gguf_architecture(Config.from_name(n)).name for n in expected} == expected
    families = ("Qwen3", "gemma-2-", "gemma-3-", "OLMo-2", "SmolLM3")
    for name in (n for n in name_to_config if n.startswith(families)):
        gguf_architecture(Config.from_name(name))  # none refused
