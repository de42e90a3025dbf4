"""GRPO steps: lora_lab (finetune/grpo.py's loop) against TRL's GRPOTrainer + PEFT, the same model and batch.

    python benchmarks/bench_grpo.py                         # SmolLM2-135M shape, 4 layers, CPU: a few minutes
    python benchmarks/bench_grpo.py --n_layer 30 --prompts 8 --num_generations 8 --max_completion_length 256

Both sides get the same random-weight model (SmolLM2-135M's architecture; --n_layer fewer layers for a quick run),
LoRA r 16 on every block linear layer (alpha 32, no dropout), --prompts prompts of the built-in JSON task times
--num_generations completions each per step, exactly --max_completion_length new tokens per completion (sampling
with temperature 1.0 on a random model; the EOS token is switched off on both sides, so the work is equal), a
constant reward function (no learning signal is needed to time the work), beta 0, loss dapo, micro-batches of
--micro_batch_size completions. TRL generates with transformers' generate inside its own loop (no vLLM); we with
lora_lab.generate.generate_batch (one KV cache for all rows). Each side runs in its own process, --steps steps
after one warm-up step.

Read: sampling tokens/s (completion tokens generated / time generating), update tokens/s (prompt + completion
tokens through the forward and backward passes / time of the rest of the step), the step's time, the peak memory
(the GPU's max allocated, or the process's peak RSS on a CPU) and the ratio ours / TRL's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ASSETS = ROOT.parent / "shared" / "assets"

from bench_challenge import random_model  # noqa: E402
from lora_lab.config import Config  # noqa: E402
from lora_lab.generate import generate_batch, peak_memory_bytes, reset_peak_memory, synchronize  # noqa: E402
from lora_lab.grpo import completion_logps, group_advantages, grpo_loss, pack_completions, token_weights  # noqa: E402
from lora_lab.lora import inject_lora, mark_only_lora_trainable  # noqa: E402

TARGETS = ["query", "key", "value", "projection", "mlp"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2_config(n_layer: int) -> Config:
    hf = json.loads((ASSETS / "models" / "smollm2-135m-instruct" / "config.json").read_text())
    from lora_lab.formats.hf import config_from_hf

    return Config(**{**config_from_hf(hf).to_dict(), "n_layer": n_layer})


def prompts_text(n: int) -> list[str]:
    from lora_lab.data.json_extraction import json_extraction_dataset
    from lora_lab.prompts import PromptStyle

    style = PromptStyle.from_name("chatml")
    return [style.apply(r["instruction"], r["input"]) for r in json_extraction_dataset(n_train=n, n_val=0)[0]]


def ours(config, prompts, num_generations, max_completion_length, micro_batch_size, steps, device, dtype) -> dict:
    from lora_lab import Tokenizer

    tokenizer = Tokenizer(ASSETS / "models" / "smollm2-135m-instruct")
    model = random_model(config, device, dtype)
    inject_lora(model, r=16, alpha=32.0, dropout=0.0, targets=TARGETS)
    mark_only_lora_trainable(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = [tokenizer.encode(p) for p in prompts for _ in range(num_generations)]
    times = []
    for step in range(steps + 1):
        synchronize(device)
        t0 = time.perf_counter()
        model.eval()
        completions = generate_batch(model, ids, max_completion_length, temperature=1.0, eos_ids=(),
                                     generator=torch.Generator(device).manual_seed(step))
        synchronize(device)
        t1 = time.perf_counter()
        model.train()
        adv, _ = group_advantages(torch.zeros(len(ids)), num_generations)
        batch = pack_completions(ids, completions)
        n_tokens = float(batch["mask"].sum())
        for start in range(0, len(ids), micro_batch_size):
            mb = {k: v[start:start + micro_batch_size] for k, v in batch.items()}
            logps, _ = completion_logps(model, mb)
            w = token_weights(mb["mask"].to(device), "dapo", len(ids), n_tokens, max_completion_length)
            loss, _ = grpo_loss(logps, logps.detach(), None, adv[start:start + micro_batch_size].to(device), w)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        t2 = time.perf_counter()
        if step == 0:
            reset_peak_memory(device)
        else:
            times.append((t1 - t0, t2 - t1))
    completion_tokens = sum(len(c) for c in completions)
    return {"sampling_s": min(t for t, _ in times), "update_s": min(u for _, u in times),
            "completion_tokens": completion_tokens, "total_tokens": completion_tokens + sum(len(i) for i in ids),
            "peak_memory": peak_memory_bytes(device)}


def trl(config, prompts, num_generations, max_completion_length, micro_batch_size, steps, device, dtype) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from bench_challenge import peer_model

    model = peer_model(random_model(config, device, dtype), device, dtype, quantize=False)
    model.generation_config.eos_token_id = None  # exactly max_completion_length tokens, as on our side
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "models" / "smollm2-135m-instruct")
    n = len(prompts) * num_generations
    args = GRPOConfig(output_dir="/tmp/bench_grpo_trl", report_to=[], use_cpu=device.type == "cpu",
                      bf16=dtype == torch.bfloat16, per_device_train_batch_size=micro_batch_size,
                      gradient_accumulation_steps=n // micro_batch_size, num_generations=num_generations,
                      max_completion_length=max_completion_length, temperature=1.0, learning_rate=1e-5,
                      max_steps=steps + 1, logging_steps=1, save_strategy="no", beta=0.0, loss_type="dapo",
                      shuffle_dataset=False, seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **k: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts] * (steps + 1)),
                          processing_class=tokenizer,
                          peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=HF_TARGETS,
                                                 task_type="CAUSAL_LM"))
    generating, stamps = [], []
    generate = trainer._generate

    def timed_generate(*a, **k):
        synchronize(device)
        t0 = time.perf_counter()
        out = generate(*a, **k)
        synchronize(device)
        generating.append(time.perf_counter() - t0)
        stamps.append(t0)
        return out

    trainer._generate = timed_generate
    completion_lengths = []
    score = trainer._generate_and_score_completions

    def scored(*a, **k):
        out = score(*a, **k)
        completion_lengths.append(int(out["completion_mask"].sum()))
        return out

    trainer._generate_and_score_completions = scored
    ends = []

    class Stamp:  # the end of every optimizer step
        def __getattr__(self, name):
            return lambda *a, **k: None

        def on_step_end(self, *a, **k):
            synchronize(device)
            ends.append(time.perf_counter())
            if len(ends) == 1:
                reset_peak_memory(device)

    from transformers import TrainerCallback

    trainer.add_callback(type("StampCallback", (TrainerCallback,), {"on_step_end": Stamp.on_step_end})())
    trainer.train()
    steps_s = [(ends[i] - stamps[i], generating[i]) for i in range(1, len(ends))]  # (step, of which generating)
    ids = tokenizer(prompts)["input_ids"]
    return {"sampling_s": min(g for _, g in steps_s), "update_s": min(s - g for s, g in steps_s),
            "completion_tokens": completion_lengths[-1],
            "total_tokens": completion_lengths[-1] + num_generations * sum(len(i) for i in ids),
            "peak_memory": peak_memory_bytes(device)}


def main(n_layer: int = 4, prompts: int = 2, num_generations: int = 4, max_completion_length: int = 32,
         micro_batch_size: int = 4, steps: int = 2, device: Optional[str] = None, threads: Optional[int] = None,
         side: Optional[str] = None) -> list[dict]:
    """Each side in its own process; one table.

    Args:
        n_layer: layers of SmolLM2-135M's architecture (30 is the real model).
        prompts: prompts per step.
        num_generations: completions per prompt.
        max_completion_length: new tokens per completion (every completion gets exactly this many).
        micro_batch_size: completions per forward/backward pass.
        steps: timed steps per side, after one warm-up step (the best counts).
        device: cuda or cpu (default: cuda when there is one).
        threads: torch threads.
        side: internal: run one side (ours or trl) here and print its JSON.
    """
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    config = smollm2_config(n_layer)
    texts = prompts_text(prompts)
    if side:
        fn = ours if side == "ours" else trl
        print("RESULT " + json.dumps(fn(config, texts, num_generations, max_completion_length, micro_batch_size,
                                        steps, dev, dtype)))
        return []
    print(f"SmolLM2-135M shape ({n_layer} of 30 layers), random weights, {str(dtype).removeprefix('torch.')} on "
          f"{dev}{' (' + torch.cuda.get_device_name(dev) + ')' if dev.type == 'cuda' else ''}: {prompts} prompts x "
          f"{num_generations} completions of {max_completion_length} tokens per step, micro-batch "
          f"{micro_batch_size}, LoRA r 16 on every block linear layer, best of {steps} steps after 1 warm-up",
          flush=True)
    rows = []
    for name in ("ours", "trl"):
        args = [sys.executable, __file__, "--side", name, "--n_layer", str(n_layer), "--prompts", str(prompts),
                "--num_generations", str(num_generations), "--max_completion_length", str(max_completion_length),
                "--micro_batch_size", str(micro_batch_size), "--steps", str(steps), "--device", str(dev)]
        args += ["--threads", str(threads)] if threads else []
        proc = subprocess.run(args, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}", flush=True)
            continue
        rows.append({"side": name, **json.loads(line.removeprefix("RESULT "))})
    print("\n| side | sampling tokens/s | update tokens/s | step s | peak memory |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        r["sampling_tps"] = r["completion_tokens"] / r["sampling_s"]
        r["update_tps"] = r["total_tokens"] / r["update_s"]
        print(f"| {'lora_lab' if r['side'] == 'ours' else 'TRL GRPOTrainer + PEFT'} | {r['sampling_tps']:,.0f} | "
              f"{r['update_tps']:,.0f} | {r['sampling_s'] + r['update_s']:.2f} | {r['peak_memory'] / 2**30:.2f} GiB |")
    if len(rows) == 2:
        a, b = rows
        print(f"ours / TRL: sampling {a['sampling_tps'] / b['sampling_tps']:.2f}x, update "
              f"{a['update_tps'] / b['update_tps']:.2f}x, step {(b['sampling_s'] + b['update_s']) / (a['sampling_s'] + a['update_s']):.2f}x faster; "
              f"completion tokens per step {a['completion_tokens']} vs {b['completion_tokens']}")
    print("peak memory: " + ("torch.cuda.max_memory_allocated" if dev.type == "cuda" else
                             "peak resident set size of the process (after the warm-up step)"))
    return rows


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
