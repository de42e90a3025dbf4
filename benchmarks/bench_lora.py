"""One LoRA training step, lora_lab against transformers + PEFT: same model, weights, adapters, batch and optimizer.

    python benchmarks/bench_lora.py                    # SmolLM2-135M architecture, seeded random weights, CPU, float32
    python benchmarks/bench_lora.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
    python benchmarks/bench_lora.py --repeats 3 --memory false    # quicker: timings only

A step is what a fine-tuning loop does per batch: zero_grad, forward with the loss, backward, AdamW step. Both
sides get LoRA with the same r, alpha and targets (default r 8 on query and value, no dropout) and the same
adapter values (B is set to small random values, not zeros, so the check below covers the LoRA branch too), and
train on the same random (batch, seq) token batch, in two settings:
  all targets:    labels = input_ids (every next token is learned; both models shift the labels themselves)
  prompt masked:  the first half of each row's labels are -100, the usual instruction-tuning case
Before timing, the losses and every LoRA gradient of the two sides must agree, or we would not be timing the same
work.

Time: both sides in this one process, step by step in turn (alternating which goes first), so that noise from a
busy machine hits both alike; best and median of --repeats steps after a warm-up step. The speed-up is PEFT's
time / ours: of the best steps, and the median over the pairs of steps taken in turn ("paired"), which a slow
drift in the machine's load affects least. On a shared machine read the speed-ups, not the absolute times.

Memory: each side in its own fresh subprocess, with the model loaded, LoRA injected and the optimizer built:
  peak RSS growth:  how far the process's peak resident set size (VmHWM, Linux) rose above its size before
                    training, over two steps: what the machine really had to give for training (activations,
                    logits, gradients, optimizer state, plus what the allocator keeps and fragmentation), so it
                    varies by some MiB from run to run;
  peak tensors:     in a third step, the most memory the step's tensors held at once beyond what was held before
                    it, from the CPU allocator's events recorded by torch.profiler: exact and repeatable, but
                    blind to the allocator's caching and fragmentation.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from lora_lab.flops import peak_flops_of, training_flops
from lora_lab.utils import LoraLabError, cli

# the shared assets as the tests find them: $LORA_LAB_ASSETS, else ../shared/assets beside the repository
ASSETS = Path(os.environ.get("LORA_LAB_ASSETS", Path(__file__).resolve().parents[1].parent / "shared" / "assets"))
SMOLLM2_CONFIG = ASSETS / "models/smollm2-135m-instruct/config.json"
# PEFT's module names for our LoRA roles (Llama layout)
PEFT_TARGETS = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "projection": "o_proj"}
SIDES = ("ours", "peft")
ROWS = ("all targets", "prompt masked")


# ------------------------------------------------------------------------------------------------------------
# The two models: one set of weights and adapters, in both layouts
# ------------------------------------------------------------------------------------------------------------
def write_checkpoints(checkpoint_dir: Optional[str], tmp: Path) -> tuple[Path, Path]:
    """(our checkpoint dir, Hugging Face dir) holding the same float32 weights."""
    from lora_lab.formats.hf import convert_hf_checkpoint, export_hf

    if checkpoint_dir is not None:
        export_hf(checkpoint_dir, tmp / "hf", dtype=torch.float32)
        return Path(checkpoint_dir), tmp / "hf"
    from transformers import LlamaConfig, LlamaForCausalLM

    # SmolLM2-135M's architecture with seeded random weights, converted by our real converter
    hf_cfg = json.loads(SMOLLM2_CONFIG.read_text()) if SMOLLM2_CONFIG.is_file() else dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
        vocab_size=49152, tie_word_embeddings=True)
    hf_cfg = {k: v for k, v in hf_cfg.items() if k not in ("architectures", "torch_dtype", "dtype", "model_type")}
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**hf_cfg)).save_pretrained(tmp / "hf")
    convert_hf_checkpoint(tmp / "hf", tmp / "ours")
    return tmp / "ours", tmp / "hf"


def adapter_values(ours_dir: str, lora: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded adapter values under our names: A as LoRA initialises it (|A| <= 1/sqrt(in)), B small but non-zero.
    Only names and shapes are needed, so they come from a weightless (meta) copy of our model: neither side's
    process ever holds (and frees) the other's weights."""
    from lora_lab import GPT
    from lora_lab.checkpoint import load_config
    from lora_lab.lora import inject_lora

    with torch.device("meta"):
        skeleton = inject_lora(GPT(load_config(ours_dir)), r=lora["r"], alpha=lora["alpha"], targets=lora["targets"])
    return lora_values(skeleton, seed)


def lora_values(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded values for the LoRA layers of `model` (only their names and shapes are read)."""
    from lora_lab.lora import lora_modules

    g = torch.Generator().manual_seed(seed)
    values = {}
    for name, m in lora_modules(model):
        bound = 1 / m.in_features**0.5
        values[f"{name}.lora_A"] = (torch.rand(m.lora_A.shape, generator=g) * 2 - 1) * bound  # (r, in)
        values[f"{name}.lora_B"] = torch.randn(m.lora_B.shape, generator=g) * 0.01  # (out, r)
    return values


def peft_name(our_name: str) -> str:
    """blocks.3.attn.q_proj.lora_A -> base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight"""
    block, layer, param = re.fullmatch(r"blocks\.(\d+)\.attn\.(\w+)\.(lora_[AB])", our_name).groups()
    return f"base_model.model.model.layers.{block}.self_attn.{layer}.{param}.default.weight"


def build(side: str, dirs: dict, lora: dict, lr: float = 1e-4) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """(model in training mode, AdamW over its LoRA parameters) of side "ours" or "peft"."""
    from lora_lab import GPT
    from lora_lab.lora import inject_lora, load_lora_state_dict, mark_only_lora_trainable

    values = adapter_values(dirs["ours"], lora)
    if side == "ours":
        model = GPT.from_checkpoint(dirs["ours"], dtype=torch.float32)
        inject_lora(model, r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"], targets=lora["targets"])
        load_lora_state_dict(model, values)
        mark_only_lora_trainable(model)
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(dirs["hf"], dtype=torch.float32, attn_implementation="sdpa")
        model = get_peft_model(hf, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                              target_modules=[PEFT_TARGETS[t] for t in lora["targets"]]))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in values.items():
                params[peft_name(name)].copy_(value)
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def make_batches(vocab_size: int, batch_size: int, seq_len: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{row: (input ids (B, T), labels (B, T))}, from one seeded random batch."""
    x = torch.randint(0, vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))  # (B, T)
    masked = x.clone()
    masked[:, : seq_len // 2] = -100  # the "prompt" half teaches nothing
    return {"all targets": (x, x), "prompt masked": (x, masked)}


def loss_of(side: str, model, x: torch.Tensor, labels: torch.Tensor, loss_chunk_size: Optional[int]) -> torch.Tensor:
    if side == "ours":  # lm_head only where labels has a target, a chunk at a time
        return model(x, labels=labels, **({} if loss_chunk_size is None else {"loss_chunk_size": loss_chunk_size}))
    return model(input_ids=x, labels=labels).loss  # transformers shifts the labels itself


def train_step(side: str, model, optimizer, x, labels, loss_chunk_size: Optional[int] = None) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss_of(side, model, x, labels, loss_chunk_size).backward()
    optimizer.step()


def check_same_work(models: dict, x: torch.Tensor, labels: torch.Tensor, loss_chunk_size: Optional[int]) -> float:
    """The two sides' losses and LoRA gradients must agree; returns the loss."""
    losses, grads = {}, {}
    for side, (model, _) in models.items():
        model.zero_grad(set_to_none=True)
        loss = loss_of(side, model, x, labels, loss_chunk_size)
        loss.backward()
        losses[side] = loss.detach()
        grads[side] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(losses["ours"], losses["peft"], rtol=1e-5, atol=1e-5)
    for name, g in grads["ours"].items():
        torch.testing.assert_close(g, grads["peft"][peft_name(name)], rtol=1e-3, atol=1e-6, msg=name)
    return losses["ours"].item()


# ------------------------------------------------------------------------------------------------------------
# Memory: one side per fresh process
# ------------------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def peak_tensor_bytes(step) -> int:
    """The most bytes that tensors allocated during step() held at once, from the profiler's allocator events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type().name == "CPU")
    held = peak = 0
    for _, nbytes in events:  # allocations are positive, frees negative
        held += nbytes
        peak = max(peak, held)
    return peak


def memory_child(args: dict) -> None:
    """Runs in a subprocess: print one side's peak RSS growth over two training steps and peak tensor bytes in
    a third."""
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    side = args["side"]
    model, optimizer = build(side, args["dirs"], args["lora"])
    x, labels = make_batches(args["vocab_size"], args["batch_size"], args["seq_len"])[args["row"]]

    def step():
        train_step(side, model, optimizer, x, labels, args["loss_chunk_size"])

    print(json.dumps(step_memory(model, step)))


def step_memory(model: torch.nn.Module, step) -> dict:
    """Memory a training step adds over the loaded model (see the docstring): peak RSS growth over two steps
    (AdamW creates its state in the first), then the peak of live tensor bytes in a third."""
    for p in model.state_dict().values():  # every weight page (and NF4 buffer) resident before the baseline
        p.detach().sum()
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    step()
    step()
    rss = (_status_kib("VmHWM") - before) * 1024
    return {"tensors": peak_tensor_bytes(step), "rss": rss}


def measure_memory(side: str, row: str, args: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "_memory_child", json.dumps(dict(args, side=side, row=row))],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess for {side}, {row} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------------
def main(checkpoint_dir: Optional[str] = None, batch_size: int = 4, seq_len: int = 256, r: int = 8,
         alpha: float = 16.0, targets: list[str] = ["query", "value"], dropout: float = 0.0, repeats: int = 5,
         memory: bool = True, loss_chunk_size: Optional[int] = None, threads: int = 0) -> None:
    """Time a LoRA training step of lora_lab and of transformers + PEFT, and measure their peak memory.

    Args:
        checkpoint_dir: a lora_lab checkpoint (exported to Hugging Face for the other side); default: the
            SmolLM2-135M architecture with seeded random weights.
        batch_size: rows per batch.
        seq_len: tokens per row.
        r: LoRA rank.
        alpha: LoRA alpha (the update is scaled by alpha / r).
        targets: LoRA targets among query, key, value, projection.
        dropout: LoRA dropout (the two sides then drop different elements, so the check runs in eval mode).
        repeats: timed steps per side and row, after a warm-up step.
        memory: also measure peak memory, each side in its own subprocess.
        loss_chunk_size: our loss's chunk size (default: GPT.forward's).
        threads: torch threads (0: torch's default).
    """
    from peft import __version__ as peft_version
    from transformers import __version__ as tf_version

    if threads:
        torch.set_num_threads(threads)
    unknown = [t for t in targets if t not in PEFT_TARGETS]
    if unknown:
        raise LoraLabError(f"targets {unknown} are not benchmarked: use some of {', '.join(PEFT_TARGETS)}")
    lora = dict(r=r, alpha=alpha, targets=targets, dropout=dropout)
    with tempfile.TemporaryDirectory() as tmp:
        ours_dir, hf_dir = write_checkpoints(checkpoint_dir, Path(tmp))
        dirs = {"ours": str(ours_dir), "hf": str(hf_dir)}
        models = {side: build(side, dirs, lora) for side in SIDES}
        vocab_size = models["ours"][0].config.vocab_size
        batches = make_batches(vocab_size, batch_size, seq_len)
        # model FLOPs of a step of each row (lora_lab/flops.py): the same work on both sides
        step_flops = {row: training_flops(models["ours"][0])(
            labels.numel(), int((labels[:, 1:] != -100).sum()), batch_size * seq_len * (seq_len + 1) // 2)
            for row, (x, labels) in batches.items()}

        for row, (x, labels) in batches.items():
            for model, _ in models.values():
                model.train(not dropout)
            loss = check_same_work(models, x, labels, loss_chunk_size)
            print(f"{row}: the losses ({loss:.4f}) and all LoRA gradients agree")
        for model, _ in models.values():
            model.train()

        times = {(side, row): [] for side in SIDES for row in ROWS}
        for row, (x, labels) in batches.items():
            for side, (model, opt) in models.items():
                train_step(side, model, opt, x, labels, loss_chunk_size)  # warm-up
            for i in range(repeats):
                for side in (SIDES if i % 2 == 0 else SIDES[::-1]):
                    model, opt = models[side]
                    t0 = time.perf_counter()
                    train_step(side, model, opt, x, labels, loss_chunk_size)
                    times[side, row].append(time.perf_counter() - t0)
        del models

        mem = {}
        if memory:
            args = dict(dirs=dirs, lora=lora, vocab_size=vocab_size, batch_size=batch_size, seq_len=seq_len,
                        loss_chunk_size=loss_chunk_size, threads=threads)
            mem = {(side, row): measure_memory(side, row, args) for row in ROWS for side in SIDES}

    weights = "SmolLM2-135M architecture, seeded random weights" if checkpoint_dir is None else checkpoint_dir
    print(f"\n{weights}; float32, batch {batch_size} x {seq_len}, LoRA r {r} alpha {alpha:g} on {'+'.join(targets)}, "
          f"dropout {dropout:g}, AdamW; torch {torch.__version__}, transformers {tf_version}, peft {peft_version}, "
          f"{torch.get_num_threads()} threads, {repeats} interleaved steps per side and row\n")
    # speed-up: PEFT's best / our best, and the median of PEFT / ours over the steps the two took in turn
    peak, peak_source = peak_flops_of("cpu", torch.float32)
    print(f"MFU: model FLOPs of the best step (lora_lab/flops.py) over the {peak_source}: {peak / 1e9:.1f} GFLOP/s")
    columns = ["labels", "lora_lab s/step best, median", "PEFT s/step best, median", "speed-up best, paired",
               "MFU ours, PEFT"]
    if memory:
        columns += ["peak RSS growth MiB ours, PEFT", "peak tensors MiB ours, PEFT"]
    lines = []
    for row in ROWS:
        o, p = times["ours", row], times["peft", row]
        line = [row, f"{min(o):.2f}, {statistics.median(o):.2f}", f"{min(p):.2f}, {statistics.median(p):.2f}",
                f"{min(p) / min(o):.2f}x, {statistics.median(a / b for a, b in zip(p, o)):.2f}x",
                f"{100 * step_flops[row] / min(o) / peak:.1f}%, {100 * step_flops[row] / min(p) / peak:.1f}%"]
        if memory:
            line += [f"{mem['ours', row][k] / 2**20:.0f}, {mem['peft', row][k] / 2**20:.0f}" for k in ("rss", "tensors")]
        lines.append(line)
    print_table(columns, lines)


def print_table(columns: list[str], lines: list[list[str]]) -> None:
    """A markdown table, columns padded to their widest cell: the first left-aligned, the numbers right-aligned."""
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in lines:
        print("| " + " | ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths)))
              + " |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_memory_child":
        memory_child(json.loads(sys.argv[2]))
    else:
        cli(main)
