"""One training step of each fine-tuning method on the same model and batch: full, LLaMA-Adapter (v1 and V2), LoRA,
QLoRA, and transformers' full fine-tuning of the same weights.

    python benchmarks/bench_methods.py                 # SmolLM2-135M architecture, seeded random weights, CPU, float32
    python benchmarks/bench_methods.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
    python benchmarks/bench_methods.py --threads 1 --memory false --methods [full,lora]

Each method is built as its script builds it, with the script's defaults read from its setup() signature:
  full         finetune/full.py:    every weight trains; its make_optimizer("adamw"): AdamW, betas (0.9, 0.95)
  adapter      finetune/adapter.py: LLaMA-Adapter (10 prompt vectors from layer 2), the rest frozen
  adapter_v2   finetune/adapter.py --adapter_version 2: also a scale and bias on every linear layer, norms train
  lora         finetune/lora.py:    LoRA r 8, alpha 16, dropout 0.05 on query and value, the rest frozen
  qlora        finetune/qlora.py:   quantize_nf4(model) (every linear layer but lm_head), then the same LoRA
  transformers AutoModelForCausalLM of the same weights (exported with export_hf), every weight trains, the same
               AdamW as full
All in float32 on the CPU, on one seeded random (batch, seq) batch with labels = input_ids. A step is what the
scripts do per batch, less gradient clipping: zero_grad, forward with the loss, backward, AdamW step. Before
timing, our full fine-tuning and transformers' must give the same loss and the same gradient for every weight.

Time: all methods in this one process, step by step in turn (the first method of each round rotates), so noise
from a busy machine hits all alike; best and median of --repeats steps after a warm-up step. "vs LoRA" is each
method's time / LoRA's: of the best steps, and the median over the rounds of the ratio within a round ("paired").

Memory: each method in its own fresh subprocess, as benchmarks/bench_lora.py measures it (its helpers are used):
peak RSS growth over the loaded, ready-to-train model in two steps (what the machine had to give for training:
gradients, optimizer state, activations, allocator slack), and the peak of live tensor bytes in a third step
(torch.profiler; exact, blind to the allocator). "weights" is the bytes of the model's weights and adapters
(model_size_report: NF4 codes and statistics counted as they are stored), which the growth comes on top of.
"""

from __future__ import annotations

import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the finetune/ scripts import as modules (their defaults and optimizer are used)

from bench_lora import make_batches, print_table, step_memory, write_checkpoints  # noqa: E402

from lora_lab import GPT  # noqa: E402
from lora_lab.adapter import adapter_param_groups, inject_adapter, mark_only_adapter_trainable  # noqa: E402
from lora_lab.formats.hf import export_hf_state_dict  # noqa: E402
from lora_lab.flops import peak_flops_of, training_flops  # noqa: E402
from lora_lab.lora import count_parameters, inject_lora, mark_only_lora_trainable, normalize_targets  # noqa: E402
from lora_lab.nf4 import model_size_report, quantize_nf4  # noqa: E402
from lora_lab.utils import LoraLabError, cli  # noqa: E402

METHODS = ("full", "adapter", "adapter_v2", "lora", "qlora", "transformers")
SCRIPT = {"full": "full", "adapter": "adapter", "adapter_v2": "adapter", "lora": "lora", "qlora": "qlora",
          "transformers": "full"}
# a tiny Llama for a quick check of this script (--tiny): 4 layers, so the adapter's start layer 2 still fits
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=512, tie_word_embeddings=True)


def script_defaults(method: str) -> dict:
    """The default arguments of the method's finetune/<script>.py setup(), under their flat names (lora_r, ...)."""
    from lora_lab.args import flat_defaults

    return flat_defaults(importlib.import_module(f"finetune.{SCRIPT[method]}").setup)


def build(method: str, dirs: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """(model in training mode, its script's AdamW over the trainable parameters)."""
    d = script_defaults(method)
    torch.manual_seed(0)  # the adapter prefixes and LoRA's A start from the same numbers in every process
    if method == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(dirs["hf"], dtype=torch.float32, attn_implementation="sdpa")
    else:
        model = GPT.from_checkpoint(dirs["ours"], dtype=torch.float32)
    if SCRIPT[method] == "adapter":  # adapter_v2: finetune/adapter.py --adapter_version 2
        inject_adapter(model, adapter_prompt_length=d["adapter_prompt_length"],
                       adapter_start_layer=d["adapter_start_layer"], version=2 if method == "adapter_v2" else 1)
        mark_only_adapter_trainable(model)
    elif method in ("lora", "qlora"):
        if method == "qlora":
            quantize_nf4(model, blocksize=d["nf4_blocksize"], double_quant=d["double_quant"])
        inject_lora(model, r=d["lora_r"], alpha=d["lora_alpha"], dropout=d["lora_dropout"],
                    targets=normalize_targets(d["lora_targets"]), use_rslora=d["use_rslora"], use_dora=d["use_dora"])
        mark_only_lora_trainable(model)
    model.train()
    # the adapter's groups as its script makes them (V2's scales, biases and norms without weight decay)
    params = (adapter_param_groups(model) if SCRIPT[method] == "adapter"
              else [{"params": [p for p in model.parameters() if p.requires_grad]}])
    if SCRIPT[method] == "full":
        full = importlib.import_module("finetune.full")
        lr = d["learning_rate"] or full.DEFAULT_LEARNING_RATES["adamw"]
        return model, full.make_optimizer("adamw", params, lr, d["weight_decay"])
    return model, torch.optim.AdamW(params, lr=d["learning_rate"], weight_decay=d["weight_decay"], betas=(0.9, 0.95))


def loss_of(method: str, model, x: torch.Tensor) -> torch.Tensor:
    # labels = inputs: both models shift the labels themselves
    return model(input_ids=x, labels=x).loss if method == "transformers" else model(x, labels=x)


def train_step(method: str, model, optimizer, x: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss_of(method, model, x).backward()
    optimizer.step()


def check_full_matches_transformers(models: dict, x: torch.Tensor) -> float:
    """Our full fine-tuning and transformers' must agree on the loss and on the gradient of every weight (ours
    renamed and fused as export_hf would write them); returns the loss."""
    losses, grads = {}, {}
    for method in ("full", "transformers"):
        model = models[method][0]
        model.zero_grad(set_to_none=True)
        loss = loss_of(method, model, x)
        loss.backward()
        losses[method] = loss.detach()
        grads[method] = {n: p.grad for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(losses["full"], losses["transformers"], rtol=1e-5, atol=1e-5)
    _, ours = export_hf_state_dict(models["full"][0].config, grads["full"])
    assert ours.keys() == grads["transformers"].keys(), sorted(ours.keys() ^ grads["transformers"].keys())[:3]
    for name, g in ours.items():
        # relative to the gradient's scale: a sum over many float32 terms in another order differs in its last bits
        tol = 1e-4 * grads["transformers"][name].abs().max().item()
        torch.testing.assert_close(g, grads["transformers"][name], rtol=1e-3, atol=tol, msg=name)
    return losses["full"].item()


# ------------------------------------------------------------------------------------------------------------
# Memory: one method per fresh process (bench_lora.py's measures)
# ------------------------------------------------------------------------------------------------------------
def memory_child(args: dict) -> None:
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    method = args["method"]
    model, optimizer = build(method, args["dirs"])
    x = make_batches(args["vocab_size"], args["batch_size"], args["seq_len"])["all targets"][0]

    def step():
        train_step(method, model, optimizer, x)

    print(json.dumps(step_memory(model, step)))  # as bench_lora.py measures it


def measure_memory(method: str, args: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "_memory_child", json.dumps(dict(args, method=method))],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess for {method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------------
def main(checkpoint_dir: Optional[str] = None, methods: list[str] = list(METHODS), batch_size: int = 4,
         seq_len: int = 256, repeats: int = 5, memory: bool = True, threads: int = 0, tiny: bool = False) -> list[dict]:
    """Time a training step of each fine-tuning method on the same model and batch, and measure peak memory.

    Args:
        checkpoint_dir: a lora_lab checkpoint (exported to Hugging Face for the transformers row); default: the
            SmolLM2-135M architecture with seeded random weights.
        methods: some of full, adapter, adapter_v2, lora, qlora, transformers (lora is always timed: the others are relative to it).
        batch_size: rows per batch.
        seq_len: tokens per row.
        repeats: timed steps per method, after a warm-up step.
        memory: also measure peak memory, each method in its own subprocess.
        threads: torch threads (0: torch's default).
        tiny: a tiny random Llama instead (4 layers, width 64, 512 tokens): a quick check of this script.

    Returns one dict per method (the table's numbers).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise LoraLabError(f"methods {unknown} are not benchmarked: use some of {', '.join(METHODS)}")
    methods = [m for m in METHODS if m in methods or m == "lora"]  # the table's order; LoRA is the yardstick
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if tiny:
            from transformers import LlamaConfig, LlamaForCausalLM

            from lora_lab.formats.hf import convert_hf_checkpoint

            torch.manual_seed(0)
            LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(tmp / "tiny_hf")
            convert_hf_checkpoint(tmp / "tiny_hf", tmp / "tiny")
            checkpoint_dir = str(tmp / "tiny")
        ours_dir, hf_dir = write_checkpoints(checkpoint_dir, tmp)
        dirs = {"ours": str(ours_dir), "hf": str(hf_dir)}
        models = {m: build(m, dirs) for m in methods}
        vocab_size = models["lora"][0].config.vocab_size
        x = make_batches(vocab_size, batch_size, seq_len)["all targets"][0]  # (B, T) seeded random tokens

        if "full" in models and "transformers" in models:
            loss = check_full_matches_transformers(models, x)
            print(f"full fine-tuning, ours and transformers': the losses ({loss:.4f}) and all gradients agree")
        rows = [{"method": m, "trainable": count_parameters(model)[0], "total": count_parameters(model)[1],
                 "weight_bytes": model_size_report(model)["total_bytes"]} for m, (model, _) in models.items()]
        # model FLOPs of one step (lora_lab/flops.py); transformers' full fine-tuning does our full's
        with torch.device("meta"):
            full_model = GPT(models["lora"][0].config)
        for row in rows:
            counted = full_model if row["method"] == "transformers" else models[row["method"]][0]
            row["step_flops"] = training_flops(counted)(batch_size * seq_len, batch_size * (seq_len - 1),
                                                        batch_size * seq_len * (seq_len + 1) // 2)

        times = {m: [] for m in methods}
        for m, (model, opt) in models.items():
            train_step(m, model, opt, x)  # warm-up (and AdamW's state)
        for i in range(repeats):
            for m in methods[i % len(methods):] + methods[: i % len(methods)]:
                model, opt = models[m]
                t0 = time.perf_counter()
                train_step(m, model, opt, x)
                times[m].append(time.perf_counter() - t0)
        del models

        for row in rows:
            t, lora = times[row["method"]], times["lora"]
            row.update(best=min(t), median=statistics.median(t), vs_lora_best=min(t) / min(lora),
                       vs_lora_paired=statistics.median(a / b for a, b in zip(t, lora)))
        peak, peak_source = peak_flops_of("cpu", torch.float32)
        for row in rows:
            row["mfu"] = row["step_flops"] / row["best"] / peak
        if memory:
            args = dict(dirs=dirs, vocab_size=vocab_size, batch_size=batch_size, seq_len=seq_len, threads=threads)
            for row in rows:
                row.update(measure_memory(row["method"], args))

    from transformers import __version__ as tf_version

    weights = "tiny random Llama" if tiny else checkpoint_dir or "SmolLM2-135M architecture, seeded random weights"
    print(f"\n{weights}; float32, batch {batch_size} x {seq_len}, labels = inputs, AdamW; torch {torch.__version__}, "
          f"transformers {tf_version}, {torch.get_num_threads()} threads, {repeats} interleaved steps per method\n")
    print(f"MFU: model FLOPs of the best step (lora_lab/flops.py) over the {peak_source}: "
          f"{peak / 1e9:.1f} GFLOP/s")
    columns = ["method", "trainable parameters", "weights MiB", "s/step best, median", "vs LoRA best, paired", "MFU"]
    if memory:
        columns += ["peak RSS growth MiB", "peak tensors MiB"]
    lines = []
    for row in rows:
        line = [row["method"], f"{row['trainable']:,} ({100 * row['trainable'] / row['total']:.3g}%)",
                f"{row['weight_bytes'] / 2**20:.1f}", f"{row['best']:.2f}, {row['median']:.2f}",
                f"{row['vs_lora_best']:.2f}x, {row['vs_lora_paired']:.2f}x", f"{100 * row['mfu']:.1f}%"]
        if memory:
            line += [f"{row['rss'] / 2**20:.0f}", f"{row['tensors'] / 2**20:.0f}"]
        lines.append(line)
    print_table(columns, lines)
    if "full" in times and "transformers" in times:
        f, t = times["full"], times["transformers"]
        print(f"\nfull fine-tuning, ours / transformers' step time: best {min(f) / min(t):.2f}x, paired "
              f"{statistics.median(a / b for a, b in zip(f, t)):.2f}x")
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_memory_child":
        memory_child(json.loads(sys.argv[2]))
    else:
        cli(main)
