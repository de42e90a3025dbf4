"""The memory planner (lora_lab/plan.py): exact parameter bytes, predictions against measured peak memory on this
CPU, the table of `python -m lora_lab.plan` and of `finetune/*.py --plan`."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from lora_lab.classifier import add_classification_head
from lora_lab.config import Config
from lora_lab.lora import inject_lora, mark_only_lora_trainable
from lora_lab.model import GPT
from lora_lab.plan import build_meta_model, plan_memory, tensor_bytes
from lora_lab.utils import LoraLabError
from lora_lab.args import call_flat

sys.path.insert(0, str(ROOT / "tests"))
from plan_measure import CONFIG, build  # noqa: E402


@pytest.mark.parametrize("method", ["lora", "qlora", "full", "adapter"])
def test_parameter_bytes_are_exact(method):
    """The meta-device model the planner builds holds exactly the bytes (and trainable parameters) of the real one."""
    config = Config(**CONFIG)
    torch.manual_seed(0)
    real = build(config, method, ckpt=False)
    meta = build_meta_model(config, method, "32-true", lora_targets=["query", "value", "mlp"])
    assert tensor_bytes(meta) == tensor_bytes(real)
    assert sum(tensor_bytes(real).values()) == sum(
        t.numel() * t.element_size() for t in {id(t): t for t in [*real.parameters(), *real.buffers()]}.values())
    trainable = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert trainable(meta) == trainable(real) > 0


@pytest.mark.parametrize("method", ["head", "blocks", "lora", "full"])
def test_classifier_plan_is_the_classifier(method):
    """--num_labels: the planned model is finetune/classify.py's, lm_head swapped for a 3-label head that trains,
    with exactly the bytes and the trainable parameters of the classifier it builds."""
    config = Config(**CONFIG)
    real = GPT(config)
    add_classification_head(real, 3)
    if method == "lora":
        inject_lora(real, r=8, alpha=16, targets=["query", "value", "mlp"])
    real.requires_grad_(method == "full")  # classify.py's lines that decide what trains
    if method == "lora":
        mark_only_lora_trainable(real)
    for module in ([real.blocks[-1], real.norm_f] if method == "blocks" else []) + [real.lm_head]:
        module.requires_grad_(True)
    meta = build_meta_model(config, method, "32-true", lora_targets=["query", "value", "mlp"], num_labels=3,
                            trainable_blocks=1)
    assert tensor_bytes(meta) == tensor_bytes(real)
    assert meta.lm_head.out_features == 3
    trainable = lambda m: {n: p.numel() for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert trainable(meta) == trainable(real)
    head = plan_memory(config, "head", 4, 128, precision="32-true", num_labels=3)
    blocks = plan_memory(config, "blocks", 4, 128, precision="32-true", num_labels=3, trainable_blocks=1)
    # a frozen model below the head saves nothing for a backward pass; the last block's activations do
    assert head.rows["activations (saved for backward)"] < blocks.rows["activations (saved for backward)"]
    assert head.trainable == config.n_embd * 3


# (method, micro batch, tokens, activation checkpointing, processes under --strategy fsdp): a spread of what
# dominates the peak
CASES = [("lora", 4, 256, False, 1), ("full", 4, 256, False, 1), ("qlora", 2, 384, True, 1),
         ("classify-blocks", 4, 256, False, 1), ("classify-lora", 4, 256, False, 1), ("full", 2, 256, False, 2),
         pytest.param("qlora", 2, 384, True, 2, marks=pytest.mark.slow),
         pytest.param("lora", 4, 256, False, 2, marks=pytest.mark.slow),
         pytest.param("adapter", 2, 256, False, 1, marks=pytest.mark.slow),
         pytest.param("lora", 4, 256, True, 1, marks=pytest.mark.slow)]


@pytest.mark.parametrize("method,batch,seq_len,ckpt,devices", CASES)
def test_prediction_matches_measured_peak(method, batch, seq_len, ckpt, devices):
    """Weights + gradients + optimizer state + activations + transient (+ under fsdp the gathered units), as
    planned, against the peak resident memory of a steady-state training step (2 micro-batches accumulated, then
    AdamW) measured in a fresh process (or the largest of the fsdp ranks)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "16384"}
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "plan_measure.py"), method, str(batch), str(seq_len)]
                         + (["ckpt"] if ckpt else []) + ([f"fsdp={devices}"] if devices > 1 else []),
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = int(out.stdout.split()[-1])
    classifier = dict(num_labels=3, trainable_blocks=1) if method.startswith("classify-") else {}
    planned = plan_memory(Config(**CONFIG), method.removeprefix("classify-"), batch, seq_len, precision="32-true",
                          devices=devices, strategy="fsdp" if devices > 1 else "auto", activation_checkpointing=ckpt, lora_targets=["query", "value", "mlp"], lora_dropout=0.05,
                          **classifier)
    assert abs(planned.total - measured) / measured < 0.10, (planned.rows, measured)


def test_checkpointing_and_sharding_lower_the_plan():
    base = dict(model=Config(**CONFIG), method="full", micro_batch_size=4, max_seq_length=256, precision="32-true")
    one = plan_memory(**base)
    ckpt = plan_memory(**base, activation_checkpointing=True)
    fsdp = plan_memory(**base, devices=4, strategy="fsdp")
    assert ckpt.rows["activations (saved for backward)"] < one.rows["activations (saved for backward)"] / 4
    # weights, gradients and AdamW state are sharded 4 ways; activations are per device as before
    for row in ("weights: float32", "gradients (trainable only)", "optimizer state (AdamW: 2 moments)"):
        assert fsdp.rows[row] == pytest.approx(one.rows[row] / 4, abs=4)
    assert fsdp.rows["activations (saved for backward)"] == one.rows["activations (saved for backward)"]
    # activations grow linearly with the micro batch (the planner traces 1 and 2 and extrapolates)
    assert plan_memory(**{**base, "micro_batch_size": 8}).rows["activations (saved for backward)"] == pytest.approx(
        2 * one.rows["activations (saved for backward)"], rel=0.01)


def test_cli_table_and_errors():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "lora_lab.plan", "--model", "Llama-2-7b-hf", "--method", "qlora",
                          "--micro_batch_size", "1", "--max_seq_length", "512", "--gpu", "T4"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "weights: NF4 4-bit codes" in out.stdout and "T4 (15.0 GiB): fits" in out.stdout
    assert "largest micro batch that fits" in out.stdout and "tokens/s per device" in out.stdout
    # 4-bit codes of Llama-2-7B's block linears: 32 layers x (4 x 4096^2 + 3 x 4096 x 11008) / 2 bytes
    codes = 32 * (4 * 4096**2 + 3 * 4096 * 11008) // 2
    assert f"{codes / 2**30:.2f}" in out.stdout
    with pytest.raises(LoraLabError, match="--gpu"):
        plan_memory("Llama-2-7b-hf", "lora", 1, 512, gpu="V100")
    with pytest.raises(LoraLabError, match="--model"):
        plan_memory("no-such-model", "lora", 1, 512)
    with pytest.raises(LoraLabError, match="block_size"):
        plan_memory("SmolLM2-135M", "lora", 1, 100_000)


@pytest.mark.parametrize("script,method", [("lora", "lora"), ("qlora", "qlora"), ("full", "full"),
                                           ("adapter", "adapter")])
def test_finetune_plan_flag_prints_the_same_table(script, method, tiny_ckpt, capsys, monkeypatch):
    """`finetune/X.py --plan` prints the planner's table for its own arguments and trains nothing."""
    import importlib

    module = importlib.import_module(f"finetune.{script}")
    monkeypatch.setattr(module, "main", lambda *a, **k: pytest.fail("--plan must not train"))
    extra = {"adapter_start_layer": 0} if method == "adapter" else {}
    call_flat(module.setup, checkpoint_dir=tiny_ckpt, plan=True, micro_batch_size=2, max_seq_length=64, precision="32-true",
                 **extra)
    printed = capsys.readouterr().out
    expected = plan_memory(tiny_ckpt, method, 2, 64, precision="32-true",
                           **({"lora_dropout": 0.05} if "lora" in method else extra))
    assert expected.title in printed
    assert f"{expected.total / 2**30:>9.2f}" in printed


def test_classify_plan_flag_plans_the_classifier(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """`finetune/classify.py --plan`: the classifier of its --labels (three here) and --method, not a language model."""
    import finetune.classify as module

    monkeypatch.setattr(module, "main", lambda *a, **k: pytest.fail("--plan must not train"))
    data = tmp_path / "texts.csv"
    data.write_text("text,label\na fine film,good\na dull one,bad\nso so,meh\n")
    call_flat(module.setup, checkpoint_dir=tiny_ckpt, data=str(data), labels="bad,meh,good", method="blocks",
              trainable_blocks=1, plan=True, micro_batch_size=2, max_seq_length=64, precision="32-true")
    printed = capsys.readouterr().out
    expected = plan_memory(tiny_ckpt, "blocks", 2, 64, precision="32-true", num_labels=3, trainable_blocks=1)
    assert "classifier (3 labels), the last 1 block," in expected.title and expected.title in printed
    assert f"{expected.total / 2**30:>9.2f}" in printed
