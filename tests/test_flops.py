"""lora_lab/flops.py: the FLOPs formula against torch's own count (FlopCounterMode) of a real training step, the
batch counts (padding and packing), the peak table and the meter."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lora_lab import GPT
from lora_lab.adapter import inject_adapter, mark_only_adapter_trainable
from lora_lab.flops import PEAK_FLOPS, FlopsMeter, batch_counts, peak_flops_of, training_flops
from lora_lab.lora import inject_lora, mark_only_lora_trainable
from lora_lab.model import IGNORE_INDEX
from lora_lab.nf4 import quantize_nf4
from tiny_checkpoint import tiny_config

B, T = 2, 16


def tiny_model(method: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=4, vocab_size=256))
    if method in ("lora", "qlora"):
        if method == "qlora":
            quantize_nf4(model, blocksize=64)
        inject_lora(model, r=4, alpha=8.0, targets=["query", "value"])
        mark_only_lora_trainable(model)
    elif method == "adapter":
        inject_adapter(model, adapter_prompt_length=3, adapter_start_layer=2)
        mark_only_adapter_trainable(model)
    return model


def counted(model: GPT, x: torch.Tensor, labels: torch.Tensor) -> dict:
    """torch's count of one forward + backward, by op. The math SDPA backend runs attention as bmm, which the
    counter sees (the fused CPU kernel it does not)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, labels=labels).backward()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def test_full_fine_tuning_is_exactly_6n_plus_attention():
    model = tiny_model("full")
    x = torch.randint(0, 256, (B, T))
    labels = x.clone()
    labels[:, :5] = IGNORE_INDEX  # a masked prompt: lm_head runs only on the targets
    ops = counted(model, x, labels)
    f = training_flops(model)
    targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
    n_blocks = sum(m.weight.numel() for b in model.blocks for m in b.modules() if isinstance(m, torch.nn.Linear))
    assert f.per_token == 6 * n_blocks
    assert f.per_target == 6 * model.lm_head.weight.numel()
    assert ops["aten.mm"] == f.per_token * B * T + f.per_target * targets
    # the math backend computes every (query, key) pair, masked or not: compare with T * T pairs per row
    assert ops["aten.bmm"] == f.per_pair * B * T * T


@pytest.mark.parametrize("method", ["lora", "qlora", "adapter"])
def test_frozen_weights_count_4n_and_trainable_6n(method):
    """LoRA / QLoRA: 4N for the frozen weights and 6N for A and B; adapter: 2N below its first layer. The
    formula counts the input gradients of the first trainable block's first layers, which autograd skips when
    nothing below trains: an overcount of at most one block's 2N per token."""
    model = tiny_model(method)
    x = torch.randint(0, 256, (B, T))
    ops = counted(model, x, x)
    f = training_flops(model)
    ours = f.per_token * B * T + f.per_target * (B * (T - 1))
    one_block = 2 * sum(m.in_features * m.out_features for m in model.blocks[0].modules()
                        if hasattr(m, "in_features") and not isinstance(m, type(model.blocks[0])))
    assert ops["aten.mm"] <= ours <= ops["aten.mm"] + one_block * B * T
    n_blocks = sum(m.in_features * m.out_features for b in model.blocks for m in b.modules()
                   if isinstance(m, torch.nn.Linear) or type(m).__name__ in ("LoRALinear", "NF4Linear"))
    if method in ("lora", "qlora"):
        n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        assert f.per_token == 4 * n_blocks + 6 * n_lora
        assert f.per_target == 4 * model.lm_head.weight.numel()
    else:  # blocks 0-1 forward only, 2-3 forward and input gradient
        assert f.per_token == 2 * n_blocks / 2 + 4 * n_blocks / 2
        assert f.per_pair == 4 * model.config.n_head * model.config.head_size * (1 + 1 + 3 + 3)


def test_the_comparison_can_fail():
    """Counting LoRA's frozen weights as trainable (6N) breaks the bound."""
    model = tiny_model("lora")
    x = torch.randint(0, 256, (B, T))
    ops = counted(model, x, x)
    for p in model.blocks.parameters():
        p.requires_grad_(True)
    f = training_flops(model)
    assert f.per_token * B * T + f.per_target * B * (T - 1) > ops["aten.mm"] * 1.2


def test_batch_counts_skip_padding_and_restart_pairs_per_packed_sample():
    ids = torch.zeros(2, 6, dtype=torch.long)
    labels = torch.tensor([[-100, -100, 5, 6, -100, -100],  # 4 real tokens, then 2 of padding
                           [-100, 7, -100, 8, 9, -100]])  # packed below: samples of 2 and 3 tokens, 1 pad
    tokens, targets, pairs = batch_counts({"input_ids": ids, "labels": labels})
    assert (tokens, targets) == (4 + 5, 2 + 3)
    assert pairs == (1 + 2 + 3 + 4) + (1 + 2 + 3 + 4 + 5)
    segment_ids = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 2, 2, 2, 0]])
    tokens, targets, pairs = batch_counts({"input_ids": ids, "labels": labels, "segment_ids": segment_ids})
    assert pairs == (1 + 2 + 3 + 4) + (1 + 2) + (1 + 2 + 3)


def classifier(method: str) -> GPT:
    """tiny_model's GPT as finetune/classify.py makes a classifier of it: lm_head -> a 3-class head, and what trains."""
    from lora_lab.classifier import add_classification_head

    model = tiny_model("lora" if method == "lora" else "full")
    add_classification_head(model, 3)
    if method != "full":
        model.requires_grad_(False)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("lm_head.") or (method == "lora" and "lora_" in name)
                             or (method == "blocks" and name.startswith(("blocks.2.", "blocks.3.", "norm_f."))))
    return model


@pytest.mark.parametrize("method", ["head", "blocks", "lora", "full"])
def test_classifier_step_is_counted_at_every_real_token(method):
    """A classifier's step (lora_lab/classifier.py classify: the head scores every position, one is pooled)
    against torch's count: per_token and per_target (the n_embd x 3 head) at every token of rows without padding;
    the head-only method needs no input gradient below the head (4 n_head, not 6). Then the counts of a padded
    and of a packed batch: real tokens only, pairs causal within each text."""
    from lora_lab.classifier import classify

    model = classifier(method)
    x = torch.randint(0, 256, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    y = torch.tensor([0, 2])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(classify(model, x, mask), y).backward()
    ops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    f = training_flops(model)
    n_head = model.lm_head.weight.numel()
    assert f.per_target == {"head": 4, "blocks": 6, "lora": 6, "full": 6}[method] * n_head
    tokens, targets, pairs = batch_counts({"input_ids": x, "attention_mask": mask, "labels": y})
    assert (tokens, targets, pairs) == (B * T, B * T, B * T * (T + 1) // 2)
    ours = f(tokens, targets, pairs) - f.per_pair * pairs
    if method == "lora":  # the first block's input gradients autograd skips (see the LoRA test above)
        one_block = 2 * sum(m.in_features * m.out_features for m in model.blocks[0].modules()
                            if hasattr(m, "in_features") and not isinstance(m, type(model.blocks[0])))
        assert ops["aten.mm"] <= ours <= ops["aten.mm"] + one_block * B * T
    else:
        assert ops["aten.mm"] == ours
    # the math backend computes every (query, key) pair; under LoRA on q and v block 0 needs no dK (the same
    # first-block approximation, at most one layer's backward: 2 of the per_pair's 4 nh hs units per layer)
    one_layer_backward = 8 * model.config.n_head * model.config.head_size * B * T * T
    assert ops["aten.bmm"] <= f.per_pair * B * T * T <= ops["aten.bmm"] + one_layer_backward * (method == "lora")

    # padding (right or left) is not counted; packed texts restart their pairs
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]])
    assert batch_counts({"input_ids": mask, "attention_mask": mask, "labels": y}) == (7, 7, 10 + 6)
    segment_ids = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 2, 2, 3, 3, 3]])
    packed = {"input_ids": segment_ids, "attention_mask": (segment_ids > 0).long(), "segment_ids": segment_ids,
              "labels": torch.zeros(5, dtype=torch.long)}
    assert batch_counts(packed) == (11, 11, (3 + 6) + (1 + 3 + 6))


def test_peaks_table_override_and_cpu_probe():
    assert peak_flops_of("cpu", torch.float32, 1e12) == (1e12, "--peak_flops")
    peak, source = peak_flops_of("cpu", torch.float32)
    assert 1e8 < peak < 1e14 and "probe" in source
    for gpu, peaks in PEAK_FLOPS.items():
        assert peaks["fp32"] <= peaks.get("tf32", peaks["fp32"]) <= peaks["fp16"]


def test_meter_reports_mfu_of_the_counted_flops():
    model = tiny_model("lora")
    meter = FlopsMeter(model, "cpu", torch.float32, peak_flops=1e9)
    x = torch.randint(0, 256, (B, T))
    flops = meter.update({"input_ids": x, "labels": x})
    assert flops == training_flops(model)(B * T, B * (T - 1), B * T * (T + 1) // 2)
    assert meter.mfu(elapsed=flops / 0.5e9) == pytest.approx(0.5)
    assert meter.format(flops / 0.5e9) == "MFU 50.0%"
    assert "of 1.0 GFLOP/s, --peak_flops" in meter.summary(flops / 0.5e9)


@pytest.mark.parametrize("precision, dtype", [("bf16-true", torch.bfloat16), ("bf16-mixed", torch.bfloat16),
                                              ("32-true", torch.float32)])
def test_meter_for_fabric_takes_the_precisions_compute_dtype(precision, dtype):
    import lightning as L

    fabric = L.Fabric(accelerator="cpu", devices=1, precision=precision)
    meter = FlopsMeter.for_fabric(tiny_model("lora"), fabric, peak_flops=1e9)
    assert meter.dtype == dtype and meter.device.type == "cpu" and meter.peak == 1e9


# ------------------------------------------------------------------------------------------------------------
# DPO (finetune/dpo.py): a batch of b pairs is 2b sequences, [b chosen; b rejected], each prompt + its answer
# ------------------------------------------------------------------------------------------------------------
def dpo_pairs(prompt_lengths=(5, 3), chosen_lengths=(6, 2), rejected_lengths=(4, 7)) -> list[dict]:
    from lora_lab.data.preference import IGNORE_INDEX as IGNORE

    g = torch.Generator().manual_seed(0)
    pairs = []
    for p, c, r in zip(prompt_lengths, chosen_lengths, rejected_lengths):
        prompt = torch.randint(0, 256, (p,), generator=g)
        pair = {}
        for name, n in (("chosen", c), ("rejected", r)):
            ids = torch.cat([prompt, torch.randint(0, 256, (n,), generator=g)])
            labels = ids.clone()
            labels[:p] = IGNORE
            pair[name] = {"input_ids": ids, "labels": labels}
        pairs.append(pair)
    return pairs


def test_dpo_batch_counts_both_answers_sequences_packed_or_not():
    """The policy's training cost of a DPO micro-batch: forward + backward over every token of both sequences of
    every pair (prompt + chosen, prompt + rejected), lm_head on the answers' tokens, attention causal within each
    sequence; the padding of the (2b, T) batch is not counted, and packing the sequences changes nothing."""
    from lora_lab.data.preference import collate_packed_pairs, collate_pairs

    pairs = dpo_pairs()
    lengths = [5 + 6, 3 + 2, 5 + 4, 3 + 7]  # [chosen 0, chosen 1, rejected 0, rejected 1]
    expected = (sum(lengths), 6 + 2 + 4 + 7, sum(n * (n + 1) // 2 for n in lengths))
    unpacked = collate_pairs(pairs)
    assert unpacked["input_ids"].shape == (4, 11)  # 44 positions, 35 real
    assert batch_counts(unpacked) == expected
    packed = collate_packed_pairs(pairs, max_seq_length=32)
    assert packed["input_ids"].shape[0] < 4 and batch_counts(packed) == expected
    model = tiny_model("lora")
    meter = FlopsMeter(model, "cpu", torch.float32, peak_flops=1e9)
    assert meter.update(unpacked) == meter.update(packed) == training_flops(model)(*expected)


def test_dpo_step_costs_at_least_the_counted_flops():
    """torch's count of a real DPO step (answer_logps over the (2b, T) batch, the pair loss, backward) against
    ours: the blocks' matmuls are the counted per-token ones (over every position, padding included: the
    counter sees the work done, we count the useful part), and lm_head runs only at the answers' tokens
    (answer_logps asks the model for those positions' logits alone), as we count it. So the MFU the script
    reports never overstates."""
    from lora_lab.data.preference import collate_pairs
    from lora_lab.dpo import answer_logps, preference_loss

    model = tiny_model("lora")
    batch = collate_pairs(dpo_pairs())
    rows, T = batch["input_ids"].shape
    f = training_flops(model)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logps, _ = answer_logps(model, batch["input_ids"], batch["labels"])
        chosen, rejected = logps.chunk(2)
        preference_loss(chosen, rejected, torch.zeros(2), torch.zeros(2), 0.1)["losses"].mean().backward()
    mm = counter.get_flop_counts()["Global"][torch.ops.aten.mm]
    tokens, targets, _ = batch_counts(batch)
    assert f(tokens, targets, 0) < mm  # ours: the useful part
    n_head = model.lm_head.weight.numel()
    done = f.per_token * rows * T + 4 * n_head * targets  # blocks at every position; lm_head forward + input
    # gradient at the answer tokens only
    one_block = 2 * sum(m.in_features * m.out_features for m in model.blocks[0].modules()
                        if hasattr(m, "in_features") and not isinstance(m, type(model.blocks[0])))
    assert mm <= done <= mm + one_block * rows * T  # (the formula's known overcount: see the LoRA test above)
