"""Mixture of experts: a LoRA step on a Qwen3-MoE-shaped model, ours against transformers + PEFT, and the memory of
its weights in float32 and NF4.

    python benchmarks/bench_moe.py [--threads 1] [--repeats 3] [--tiny]

Both sides get the same random weights (a transformers Qwen3MoeForCausalLM converted with lora_lab.convert) and the
same LoRA: r = 8 on q, v and every expert's gate, up and down projections (PEFT: target_modules q_proj, v_proj and
target_parameters mlp.experts.gate_up_proj at rank 16 / down_proj, how PEFT 0.21 adapts transformers 5's stacked
experts; its gate_up lora_B is one dense (2I, 16) matrix per expert where ours are two (I, 8), so it trains more
parameters), B initialised to zero on both, so their first losses must agree; each side then takes AdamW steps on one batch.
Each side runs in its own process (its peak RSS: the libraries it imports, the model, the steps), timed in
thread CPU time with --threads 1. Prints one markdown table.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Qwen3-30B-A3B's shape scaled down: 16 experts, 4 per token, a quarter of each expert's width active
SHAPE = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_experts=16, num_experts_per_tok=4,
             norm_topk_prob=True, max_position_embeddings=512, tie_word_embeddings=False)
TINY = dict(SHAPE, vocab_size=256, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=2, num_experts=4,
            num_experts_per_tok=2, num_attention_heads=4, head_dim=16)


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_checkpoint(folder: Path, shape: dict) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_lab.formats.hf import convert_hf_checkpoint

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **shape), dtype=torch.float32)
    model.save_pretrained(folder / "hf")
    convert_hf_checkpoint(folder / "hf", folder / "ours")


def run_side(side: str, folder: Path, batch: int, seq: int, steps: int) -> dict:
    torch.manual_seed(1)
    idx = torch.randint(0, 256, (batch, seq))
    if side == "ours":
        from lora_lab.lora import inject_lora, mark_only_lora_trainable
        from lora_lab.model import GPT

        model = GPT.from_checkpoint(folder / "ours")
        inject_lora(model, r=8, alpha=16.0, targets=["query", "value", "experts"])
        mark_only_lora_trainable(model)

        def loss_fn():
            return model(idx, labels=idx)
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder / "hf", dtype=torch.float32, attn_implementation="sdpa")
        # gate_up at rank 16: it holds our gate and up adapters of rank 8 (as lora_lab.export_peft writes them)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                 target_parameters=["mlp.experts.gate_up_proj",
                                                                    "mlp.experts.down_proj"],
                                                 rank_pattern={"experts.gate_up_proj": 16},
                                                 alpha_pattern={"experts.gate_up_proj": 32}))

        def loss_fn():
            return model(input_ids=idx, labels=idx).loss
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    times, first = [], None
    for _ in range(steps):
        start = time.thread_time()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.thread_time() - start)
        first = loss.item() if first is None else first
    return dict(side=side, best=min(times), first_loss=first, trainable=trainable, peak_rss=rss_mib())


def weights_mib(folder: Path) -> tuple[float, float, int, int]:
    """float32 and NF4 weight MiB of our model, total and active-per-token parameters."""
    from lora_lab.model import GPT
    from lora_lab.nf4 import model_size_report, quantize_nf4

    model = GPT.from_checkpoint(folder / "ours")
    c = model.config
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - expert + expert * c.n_expert_per_token // c.n_expert
    fp32 = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    report = model_size_report(quantize_nf4(model))
    nf4 = report["total_bytes"] / 2**20
    return fp32, nf4, total, active


def main(threads: int = 1, repeats: int = 3, tiny: bool = False, batch: int = 2, seq: int = 128) -> list[dict]:
    shape = TINY if tiny else SHAPE
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_checkpoint(folder, shape)
        rows = []
        for side in ("ours", "peft"):
            out = subprocess.run([sys.executable, __file__, "--side", side, "--folder", str(folder), "--threads",
                                  str(threads), "--steps", str(repeats), "--batch", str(batch), "--seq", str(seq)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        fp32, nf4, total, active = weights_mib(folder)
    ours, peft = rows
    assert abs(ours["first_loss"] - peft["first_loss"]) < 1e-4 * abs(peft["first_loss"]), rows  # the same work
    tokens = batch * seq
    print(f"Qwen3-MoE shape {shape['num_hidden_layers']} layers x {shape['num_experts']} experts (top "
          f"{shape['num_experts_per_tok']}), {total / 1e6:.1f}M parameters, {active / 1e6:.1f}M active per token; "
          f"batch {batch} x {seq}; {threads} thread(s); weights {fp32:.1f} MiB float32, {nf4:.1f} MiB NF4")
    print("| side | trainable | s/step (best) | tokens/s | process peak RSS | first loss |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        name = "lora_lab" if r["side"] == "ours" else "transformers + PEFT"
        print(f"| {name} | {r['trainable']:,} | {r['best']:.3f} | {tokens / r['best']:.0f} | "
              f"{r['peak_rss']:.0f} MiB | {r['first_loss']:.4f} |")
    print(f"ours / PEFT tokens/s: {peft['best'] / ours['best']:.2f}x")
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--side", choices=["ours", "peft"])
    parser.add_argument("--folder")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.side:
        print(json.dumps(run_side(args.side, Path(args.folder), args.batch, args.seq, args.steps)))
    else:
        main(args.threads, args.repeats, args.tiny, args.batch, args.seq)
