"""Named configs carry the published hyperparameters, and model-level behaviour not covered by the parity tests."""

from dataclasses import replace

import pytest
import torch

from lora_lab import GPT, Config
from lora_lab.config import name_to_config
from lora_lab.model import attention_mask

# parameter counts as published on each model's Hugging Face page / safetensors metadata
PUBLISHED_PARAMS = {
    "Llama-2-7b-hf": 6_738_415_616,
    "Llama-2-13b-hf": 13_015_864_320,
    "Llama-2-70b-hf": 68_976_648_192,
    "Meta-Llama-3-8B": 8_030_261_248,
    "Meta-Llama-3-70B": 70_553_706_496,
    "Llama-3.2-1B": 1_235_814_400,
    "Llama-3.2-3B": 3_212_749_824,
    "TinyLlama-1.1B-Chat-v1.0": 1_100_048_384,
    "SmolLM2-135M": 134_515_008,
    "SmolLM2-360M": 361_821_120,
    "SmolLM2-1.7B": 1_711_376_384,
    "Mistral-7B-v0.1": 7_241_732_096,
    "falcon-7b": 6_921_720_704,
    "pythia-70m": 70_426_624,
    "pythia-160m": 162_322_944,
    "pythia-1b": 1_011_781_632,
    "phi-1_5": 1_418_270_720,
    "phi-2": 2_779_683_840,
    "Qwen2.5-0.5B": 494_032_768,
    "Qwen2.5-7B": 7_615_616_512,
    "gemma-2b": 2_506_172_416,
    "gemma-7b": 8_537_680_896,
    "stablelm-3b-4e1t": 2_795_443_200,
    # the 2024-25 families
    "Qwen3-8B": 8_190_735_360,
    "Qwen3-30B-A3B": 30_532_122_624,
    "gemma-2-2b": 2_614_341_888,
    "gemma-2-9b": 9_241_705_984,
    "gemma-3-1b-it": 999_885_952,
    "Phi-3-mini-4k-instruct": 3_821_079_552,
}


def n_params(config: Config) -> int:
    """Built with 1 and 2 layers (on the meta device): every layer of a named config has the same parameters,
    so the count is affine in n_layer (building 18k expert modules of a 48-layer MoE would take a minute)."""
    assert config.moe_layers is None

    def count(n_layer: int) -> int:
        with torch.device("meta"):
            model = GPT(replace(config, n_layer=n_layer))
        return sum(p.numel() for p in model.parameters())  # a tied weight is one parameter, counted once

    one, two = count(1), count(2)
    return one + (config.n_layer - 1) * (two - one)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_named_config_has_published_parameter_count(name):
    assert n_params(Config.from_name(name)) == PUBLISHED_PARAMS[name]


def test_every_named_config_builds():
    for name in name_to_config:
        config = Config.from_name(name)
        assert config.n_head % config.n_query_groups == 0
        assert n_params(config) > 0


def test_unknown_name_lists_near_matches():
    with pytest.raises(ValueError, match="Unknown model name 'SmolLM2-135M-instruct'.*SmolLM2-135M-Instruct"):
        Config.from_name("SmolLM2-135M-instruct")


def test_from_name_overrides_and_llama3_scaling_lengthens_slow_wavelengths():
    config = Config.from_name("Meta-Llama-3.1-8B", n_layer=2)
    assert config.n_layer == 2 and config.rope_scaling["factor"] == 8.0
    from lora_lab.model import RoPE

    plain = RoPE(Config.from_name("Meta-Llama-3-8B")).inv_freq
    scaled = RoPE(config).inv_freq
    assert torch.equal(scaled[:10], plain[:10])  # fast frequencies kept
    torch.testing.assert_close(scaled[-1], plain[-1] / 8)  # the slowest divided by the factor


def test_attention_mask_causal_offset_and_sliding_window():
    assert attention_mask(5, 5, 0, None, "cpu") is None  # SDPA's own is_causal is right
    assert attention_mask(1, 9, 8, None, "cpu") is None  # one new token sees everything cached
    m = attention_mask(2, 6, 4, None, "cpu")  # queries at positions 4, 5 over keys 0..5
    assert m.tolist() == [[True] * 5 + [False], [True] * 6]
    w = attention_mask(4, 4, 0, 2, "cpu")  # each query sees itself and one key before
    assert w.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]


def test_sequence_longer_than_block_size_is_refused():
    model = GPT(Config(n_layer=1, n_embd=16, n_head=2, vocab_size=10, block_size=8))
    with pytest.raises(ValueError, match="longer than the model's block_size 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_loss_matches_cross_entropy_on_logits_and_ignores_masked_positions():
    model = GPT(Config(n_layer=2, n_embd=32, n_head=4, n_query_groups=2, vocab_size=50, block_size=32))
    x = torch.randint(0, 50, (2, 20))
    labels = x.clone()
    labels[:, :7] = -100
    logits = model(x)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
    for chunk in (None, 5):  # chunked and recomputed in backward, or all at once: the same loss and gradients
        model.zero_grad()
        loss = model(x, labels=labels, loss_chunk_size=chunk)
        loss.backward()
        torch.testing.assert_close(loss, ref)
        grad = model.wte.weight.grad.clone()
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1)).backward()
        torch.testing.assert_close(grad, model.wte.weight.grad)


@pytest.mark.parametrize("head_trainable", [False, True])  # frozen: the LoRA case, only hidden states need grads
def test_fused_loss_gradients_match_autograd_with_frozen_or_trainable_head_and_bias(head_trainable):
    torch.manual_seed(0)
    model = GPT(Config(n_layer=1, n_embd=32, n_head=4, vocab_size=50, block_size=32, lm_head_bias=True))
    model.lm_head.requires_grad_(head_trainable)
    x = torch.randint(0, 50, (2, 16))
    labels = x.clone()
    labels[0, :5] = -100
    ref = torch.nn.functional.cross_entropy(model(x)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
    ref.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for chunk in (None, 7):
        model.zero_grad(set_to_none=True)
        loss = model(x, labels=labels, loss_chunk_size=chunk)
        loss.backward()
        torch.testing.assert_close(loss, ref)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert grads.keys() == expected.keys()
        assert ("lm_head.bias" in grads) == head_trainable
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected[name], msg=name)
        with torch.no_grad():  # evaluation takes the path without gradients: the same loss
            torch.testing.assert_close(model(x, labels=labels, loss_chunk_size=chunk), ref)
        model.zero_grad(set_to_none=True)  # a scaled loss (gradient accumulation: loss / steps) scales every gradient
        (model(x, labels=labels, loss_chunk_size=chunk) * 0.25).backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, 0.25 * expected[name], msg=name)


def test_activation_checkpointing_gives_the_same_gradients():
    model = GPT(Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, block_size=32))
    x = torch.randint(0, 50, (2, 16))
    model(x, labels=x).backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    model(x, labels=x).backward()
    for r, p in zip(ref, model.parameters()):
        torch.testing.assert_close(p.grad, r)


def test_neftune_noise_only_in_training_and_of_the_stated_size():
    model = GPT(Config(n_layer=1, n_embd=32, n_head=4, vocab_size=50, block_size=32))
    x = torch.randint(0, 50, (1, 16))
    model.eval()
    assert torch.equal(model(x, neftune_alpha=5.0), model(x))
    model.train()
    assert not torch.equal(model(x, neftune_alpha=5.0), model(x))


def test_logits_at_returns_exactly_the_chosen_positions_logits():
    torch.manual_seed(0)
    model = GPT(Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, block_size=32)).eval()
    x = torch.randint(0, 50, (3, 10))
    at = torch.rand(3, 10) < 0.4
    with torch.no_grad():
        full = model(x)  # (B, T, V)
        picked = model(x, logits_at=at)  # (n, V)
    assert picked.shape == (int(at.sum()), 50)
    torch.testing.assert_close(picked, full[at], rtol=0, atol=1e-6)
