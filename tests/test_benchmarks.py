"""benchmarks/bench_methods.py on a tiny random Llama (--tiny): it builds each method as its script does, checks our
full fine-tuning against transformers', and prints one table row per method."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import ROOT
from lora_lab.utils import LoraLabError

sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmarks import each other's helpers as top-level modules
import bench_methods  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_bench_methods_tiny(capsys):
    rows = bench_methods.main(tiny=True, batch_size=2, seq_len=32, repeats=1, memory=False)
    out = capsys.readouterr().out
    assert "full fine-tuning, ours and transformers': the losses" in out and "all gradients agree" in out
    assert "MFU: model FLOPs of the best step" in out
    assert [r["method"] for r in rows] == list(bench_methods.METHODS)
    for r in rows:
        assert f"| {r['method']} " in out
        assert r["best"] > 0 and r["median"] >= r["best"]
        assert 0 < r["mfu"] < 1.5 and r["step_flops"] > 0
    trainable = {r["method"]: r["trainable"] for r in rows}
    t = bench_methods.TINY
    hidden, layers, heads = t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"]
    kv_width = hidden // heads * t["num_key_value_heads"]
    # full: every weight, the tied embedding once, and the same count on the transformers side
    embedding, norms = t["vocab_size"] * hidden, (2 * layers + 1) * hidden
    attention = 2 * hidden * hidden + 2 * hidden * kv_width
    mlp = 3 * hidden * t["intermediate_size"]
    assert trainable["full"] == trainable["transformers"] == embedding + norms + layers * (attention + mlp)
    assert rows[0]["total"] == trainable["full"]
    # LoRA r 8 on query (hidden -> hidden) and value (hidden -> kv_width) of every layer; QLoRA the same
    assert trainable["lora"] == trainable["qlora"] == layers * 8 * ((hidden + hidden) + (hidden + kv_width))
    # LLaMA-Adapter: 10 prompt vectors and a gate per head in layers 2 ... layers - 1
    assert trainable["adapter"] == (layers - 2) * (10 * hidden + heads)
    # V2 adds a scale and a bias per output of every linear layer (lm_head too) and trains the norms
    outputs = layers * (hidden + 2 * kv_width + hidden + 2 * t["intermediate_size"] + hidden) + t["vocab_size"]
    assert trainable["adapter_v2"] == trainable["adapter"] + 2 * outputs + norms
    weights = {r["method"]: r["weight_bytes"] for r in rows}
    assert weights["qlora"] < 0.6 * weights["lora"]  # the embedding stays float32, the block weights go to NF4


def test_bench_methods_rejects_an_unknown_method():
    with pytest.raises(LoraLabError, match=r"methods \['dora'\] are not benchmarked: use some of full, adapter"):
        bench_methods.main(tiny=True, methods=["dora"])


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_bench_challenge_sides_compute_the_same_step(method):
    """bench_challenge.py's two sides on a tiny Llama: our LoRA / QLoRA and transformers + PEFT (+ bitsandbytes
    NF4) start from the same loss, and both report tokens/s, MFU and peak memory."""
    import torch

    import bench_challenge
    from tiny_checkpoint import tiny_config

    config = tiny_config(n_layer=2, vocab_size=256)
    kwargs = dict(config=config, batch_size=2, seq_len=32, device=torch.device("cpu"), dtype=torch.float32,
                  targets=["query", "value"], r=4, repeats=1, warmup=1, compile=False)
    ours = bench_challenge.worker("lora_lab", method, **kwargs)
    peer = bench_challenge.worker("peft", method, **kwargs)
    assert ours["trainable"] == peer["trainable"] == 2 * 4 * ((32 + 32) + (32 + 16))
    # NF4: our codes equal bitsandbytes' (tests/test_nf4.py), but on these tiny matrices the double-quantized scales
    # differ in the last bits (on the 7B shape they agree to 4 decimals)
    assert ours["first_loss"] == pytest.approx(peer["first_loss"], rel=1e-5 if method == "lora" else 1e-3)
    for r in (ours, peer):
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1.5 and r["peak_memory"] > 0


def test_profile_model_times_every_aten_call_by_shapes():
    import profile_model

    a, b = torch.randn(8, 16), torch.randn(16, 4)
    with profile_model.OpTimer() as timer:
        (a @ b).relu().sum()
        a @ b
    assert timer.calls[("mm", ((8, 16), (16, 4)))] == 2
    assert timer.calls[("relu", ((8, 4),))] == 1 and timer.calls[("sum", ((8, 4),))] == 1
    assert all(s >= 0 for s in timer.seconds.values()) and set(timer.seconds) == set(timer.calls)


@pytest.mark.slow
def test_bench_scale_tiny(capsys):
    """benchmarks/bench_scale.py on a tiny shape, 1 and 2 processes (torchrun, gloo): ours shards the parameters
    in two under fsdp, the peer (accelerate on the CPU: DDP) keeps them whole; every row has its figures."""
    import bench_scale

    rows = bench_scale.main(["--processes", "1,2", "--steps", "1", "--n_layer", "2", "--n_embd", "64",
                             "--intermediate_size", "128", "--n_head", "4", "--n_query_groups", "2",
                             "--vocab_size", "256", "--seq_len", "32"])
    out = capsys.readouterr().out
    by = {(r["processes"], r["side"]): r for r in rows}
    assert set(by) == {(1, "ours"), (1, "peer"), (2, "ours"), (2, "peer")}
    assert by[2, "ours"]["params"] == by[1, "ours"]["params"] / 2 == by[1, "peer"]["params"] / 2
    assert by[2, "peer"]["params"] == by[1, "peer"]["params"] and by[2, "peer"]["mode"] == "MULTI_CPU"
    assert all(r["tokens_per_s"] > 0 and r["memory"] > 0 for r in rows)
    assert "lora_lab fsdp" in out and "transformers+peft multi_cpu" in out
