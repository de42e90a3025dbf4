"""Scaling out: LoRA training on 1, 2 and 4 processes, lora_lab --strategy fsdp against transformers + PEFT under
accelerate, same model shape, adapters, micro batch and steps.

    python benchmarks/bench_scale.py                                  # CPU / gloo: a small Llama shape
    python benchmarks/bench_scale.py --processes 1,2,4,8 --n_layer 32 --n_embd 4096 --intermediate_size 11008 \
        --vocab_size 32000 --seq_len 2048 --precision bf16-true        # on GPUs: Llama-2-7B's shape

Each (side, processes) runs in its own `torchrun --nproc_per_node N` job. Per rank: a seeded random Llama-style
model (no weights to download), LoRA r 8 on query and value, a micro batch of --micro_batch_size x --seq_len random
tokens, AdamW; one warm-up step, then --steps timed steps. Reported:
  tokens/s     all ranks' tokens over the timed steps' wall time (rank 0's clock, after a barrier);
  per rank     the largest over the ranks of the peak memory of a training step: CUDA max_memory_allocated over
               the timed steps; on the CPU, in a second job of the same shape, the peak resident set (VmHWM,
               reset after the warm-up) of a step over the process's before the model was built, with glibc told
               to return every freed block of 16 KiB or more at once (MALLOC_MMAP_THRESHOLD_, as
               tests/plan_measure.py) so that the figure is the live tensors' (that setting slows every step, so
               the timed job runs without it); and the parameter bytes the rank holds (its shards, or the whole
               model when replicated). The model is built whole on each rank before it is sharded: that moment is not in
               the figure (the finetune scripts load the checkpoint the same way; see tutorials/multi_gpu.md).
Ours: lora_lab's GPT with --strategy fsdp (lora_lab/distributed.py: every block a unit, LoRA in units of its own)
for N > 1, one plain process for N = 1. Peer: transformers' LlamaForCausalLM + peft's LoRA, prepared by
accelerate with its FSDP2 plugin (LlamaDecoderLayer units). accelerate has no FSDP on the CPU: there its
Accelerator falls back to MULTI_CPU, i.e. DDP with every weight on every rank, and the table says so.
On a shared CPU read the ratios of one run, not the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def shape(a) -> dict:
    return dict(vocab_size=a.vocab_size, n_embd=a.n_embd, n_layer=a.n_layer, n_head=a.n_head,
                n_query_groups=a.n_query_groups, intermediate_size=a.intermediate_size)


def worker_ours(a) -> dict:
    import torch

    from lora_lab.config import Config
    from lora_lab.distributed import local_bytes, make_fabric
    from lora_lab.lora import inject_lora, mark_only_lora_trainable
    from lora_lab.model import GPT

    n = int(os.environ.get("WORLD_SIZE", "1"))
    fabric = make_fabric(n, 1, "fsdp" if n > 1 else "auto", a.precision)
    fabric.launch()
    base = rss()
    torch.manual_seed(0)
    config = Config(name="bench", block_size=a.seq_len, norm_class="RMSNorm", mlp_class="swiglu", bias=False,
                    **shape(a))
    with fabric.init_module():
        model = GPT(config)
    inject_lora(model, r=8, alpha=16, targets=["query", "value"])
    mark_only_lora_trainable(model)
    gpt = model
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW([p for p in gpt.parameters() if p.requires_grad]))
    x = torch.randint(0, a.vocab_size, (a.micro_batch_size, a.seq_len), device=fabric.device)

    def step():
        loss = model(x, labels=x)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, fabric.barrier, fabric.device, base, local_bytes(gpt)[0], fabric.global_rank, fabric.all_reduce)


def worker_peer(a) -> dict:
    import torch
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    use_cpu = not torch.cuda.is_available()
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
    accelerator = Accelerator(fsdp_plugin=plugin, cpu=use_cpu,
                              mixed_precision="no" if a.precision == "32-true" else "bf16")
    base = rss()
    torch.manual_seed(0)
    s = shape(a)
    config = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["n_embd"], intermediate_size=s["intermediate_size"],
                         num_hidden_layers=s["n_layer"], num_attention_heads=s["n_head"],
                         num_key_value_heads=s["n_query_groups"], max_position_embeddings=a.seq_len)
    model = LlamaForCausalLM(config)
    if a.precision == "bf16-true":
        model = model.to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model = accelerator.prepare(model)
    optimizer = accelerator.prepare(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]))
    x = torch.randint(0, a.vocab_size, (a.micro_batch_size, a.seq_len), device=accelerator.device)

    def step():
        loss = model(input_ids=x, labels=x).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def all_reduce(t, reduce_op="sum"):
        return accelerator.reduce(t, reduction=reduce_op)

    local = 0
    for p in model.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        local += t.numel() * t.element_size()
    result = timed(step, accelerator.wait_for_everyone, accelerator.device, base, local, accelerator.process_index,
                   all_reduce)
    result["mode"] = str(accelerator.distributed_type).split(".")[-1]
    return result


def timed(step, barrier, device, base: int, local_param_bytes: int, rank: int, all_reduce) -> dict:
    import torch

    step()  # warm-up (allocations, kernels)
    barrier()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(ARGS.steps):
        step()
    barrier()
    seconds = time.perf_counter() - start
    if cuda:
        memory = torch.cuda.max_memory_allocated(device)
    elif os.environ.get("MALLOC_MMAP_THRESHOLD_"):  # the memory job: one more step, its peak
        with open("/proc/self/clear_refs", "w") as f:  # VmHWM := the current resident set
            f.write("5")
        step()
        memory = peak_rss() - base
    else:  # the timed job: its memory figure is not the live tensors' (glibc keeps freed blocks)
        memory = 0
    n = int(os.environ.get("WORLD_SIZE", "1"))
    mine = torch.zeros(2 * n, dtype=torch.float64, device=device)
    mine[rank], mine[n + rank] = memory, local_param_bytes
    every = all_reduce(mine, reduce_op="sum").tolist()
    tokens = ARGS.steps * ARGS.micro_batch_size * ARGS.seq_len * n
    return {"rank": rank, "tokens_per_s": tokens / seconds, "memory": max(every[:n]), "params": max(every[n:])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(side: str, n: int, argv: list[str]) -> dict:
    """One torchrun job of N processes; on the CPU a second one for the memory figure (see the docstring)."""
    result = job(side, n, argv)
    if not result["memory"]:
        result["memory"] = job(side, n, argv, {"MALLOC_MMAP_THRESHOLD_": "16384"})["memory"]
    return result


def job(side: str, n: int, argv: list[str], extra_env: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           **(extra_env or {})}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__,
                          "--worker", side, *argv], capture_output=True, text=True, env=env, timeout=3600)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{side} on {n} processes failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT "):])


def main(argv=None) -> list[dict]:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--processes", default="1,2,4")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro_batch_size", type=int, default=1)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_query_groups", type=int, default=2)
    p.add_argument("--intermediate_size", type=int, default=1024)
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-true"])
    p.add_argument("--worker", choices=["ours", "peer"], default=None, help=argparse.SUPPRESS)
    ARGS = p.parse_args(argv)
    if ARGS.worker:
        result = (worker_ours if ARGS.worker == "ours" else worker_peer)(ARGS)
        if result["rank"] == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return [result]
    forward = [a for a in (argv if argv is not None else sys.argv[1:])]
    rows = []
    print(f"LoRA r 8 on query, value | {ARGS.n_layer} layers x {ARGS.n_embd} | micro batch {ARGS.micro_batch_size} x "
          f"{ARGS.seq_len} tokens per rank | {ARGS.precision} | {ARGS.steps} timed steps")
    print(f"{'processes':>9} {'side':<28} {'tokens/s':>10} {'per-rank memory MiB':>20} {'per-rank params MiB':>20}")
    for n in [int(x) for x in ARGS.processes.split(",")]:
        for side in ("ours", "peer"):
            r = run(side, n, forward)
            label = "lora_lab" + (" fsdp" if n > 1 else "") if side == "ours" else \
                "transformers+peft" + (f" {r.get('mode', '').lower()}" if n > 1 else "")
            rows.append({"processes": n, "side": side, **r})
            print(f"{n:>9} {label:<28} {r['tokens_per_s']:>10,.0f} {r['memory'] / 2**20:>20.1f} "
                  f"{r['params'] / 2**20:>20.2f}", flush=True)
    return rows


ARGS = None

if __name__ == "__main__":
    main()
