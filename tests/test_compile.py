"""--compile (lora_lab/compile.py): compiled blocks give the eager losses and gradients, with the fused loss and
with NF4 layers, from one graph for all blocks; the scripts run with it. Compiling on a CPU takes a minute or
more: these tests are marked slow."""

from __future__ import annotations

import pytest
import torch

from conftest import require_asset
from lora_lab import GPT
from lora_lab.compile import compile_blocks
from lora_lab.lora import inject_lora, mark_only_lora_trainable
from lora_lab.nf4 import quantize_nf4
from lora_lab.args import call_flat
from tiny_checkpoint import SMOL_TOKENIZER, tiny_config, write_tiny_checkpoint

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def model_for(method: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=3, vocab_size=256))
    if method == "qlora":
        quantize_nf4(model, blocksize=64)
    inject_lora(model, r=4, alpha=8.0, targets=["query", "value", "mlp"])
    mark_only_lora_trainable(model)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_compiled_blocks_give_the_eager_loss_and_gradients(method):
    import torch._dynamo.utils

    model = model_for(method)
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    segment_ids = torch.tensor([[1] * 10 + [2] * 14, [1] * 24])  # packed rows, as --packing makes them

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(x, labels=x, segment_ids=segment_ids)  # the fused loss on top of the blocks
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    eager_loss, eager_grads = step()
    keys = list(model.state_dict())
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_blocks(model)
    loss, grads = step()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # two graphs for any depth: block 0 (whose input needs no gradient under LoRA) and one for all the others
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert list(model.state_dict()) == keys  # nothing renamed: adapters and resume states are unchanged
    # evaluation runs the eager blocks (no compilation for other shapes or a KV cache)
    frames = torch._dynamo.utils.counters["stats"]["calls_captured"]
    model.eval()
    with torch.no_grad():
        model(x[:, :7])
    assert torch._dynamo.utils.counters["stats"]["calls_captured"] == frames


def test_lora_script_with_compile_and_packing(tmp_path, capsys):
    import finetune.lora as ft

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", require_asset(SMOL_TOKENIZER))
    common = dict(checkpoint_dir=ckpt, data="json_extraction", n_train=24, n_val=4, eval_samples=0, max_steps=3,
                  batch_size=2, micro_batch_size=2, max_seq_length=256, warmup_steps=1, eval_interval=3,
                  eval_iters=1, lora_dropout=0.0, packing=True, seed=3)
    call_flat(ft.setup, out_dir=tmp_path / "eager", **common)
    eager = capsys.readouterr().out
    call_flat(ft.setup, out_dir=tmp_path / "compiled", compile=True, **common)
    compiled = capsys.readouterr().out

    def losses(out):
        return [float(line.split("| loss ")[1].split()[0]) for line in out.splitlines() if line.startswith("step ")
                and "| loss " in line]

    assert len(losses(compiled)) == 3
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4)
    assert "MFU" in compiled.splitlines()[-2]


def test_dpo_script_with_compile_and_packing(tmp_path):
    """finetune/dpo.py --compile: the compiled blocks train to the eager run's losses and rewards, packed (one
    shape family) and unpacked; the reference pass (eval, no grad) runs the eager blocks."""
    import csv
    import json

    import finetune.dpo as dpo

    from test_dpo import PAIRS, RUN

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", require_asset(SMOL_TOKENIZER))
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(PAIRS))
    common = {**RUN, "checkpoint_dir": ckpt, "data": str(data), "n_val": 2, "eval_iters": 1, "max_steps": 3,
              "eval_interval": 3, "lora_dropout": 0.0}

    def logged(out_dir):
        with open(out_dir / "metrics.csv", newline="") as f:
            return [{k: float(v) for k, v in row.items() if v and k in ("loss", "rewards/margins", "val_loss")}
                    for row in csv.DictReader(f)]

    for packing in (False, True):
        eager, compiled = tmp_path / f"eager_{packing}", tmp_path / f"compiled_{packing}"
        call_flat(dpo.setup, out_dir=eager, packing=packing, **common)
        call_flat(dpo.setup, out_dir=compiled, packing=packing, compile=True, **common)
        ours, theirs = logged(compiled), logged(eager)
        assert len(ours) == 3 and ours[-1]["val_loss"] > 0
        for a, b in zip(ours, theirs):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
