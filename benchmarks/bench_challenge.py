"""The 1-GPU / 1-day shape: LoRA and QLoRA of a 7-8B model at up to 2048 tokens, against transformers + PEFT
(+ bitsandbytes for QLoRA) on the same device: step time, tokens/s, MFU and peak memory.

    python benchmarks/bench_challenge.py                                   # GPU: Llama-3.1-8B shape, 2 x 2048, bf16
    python benchmarks/bench_challenge.py --model mistral-7b --seq_len 1024 --batch_size 4
    python benchmarks/bench_challenge.py --compile true                    # our side compiled (peers stay eager)
    python benchmarks/bench_challenge.py --device cpu                      # CPU: a reduced size, stated in the output

The model is the named architecture (lora_lab.config: Llama-2-7b-hf, Mistral-7B-v0.1, Meta-Llama-3.1-8B) with
seeded random weights: nothing is downloaded. Both sides get the same weights (ours exported with
export_hf_state_dict into transformers' LlamaForCausalLM / MistralForCausalLM) and must agree on the first loss.
  lora    ours: inject_lora on the targets, the rest frozen.  peer: PEFT LoraConfig on the same modules.
  qlora   ours: quantize_nf4 (every linear but lm_head), then the same LoRA.  peer: the same linear layers as
          bitsandbytes Linear4bit (NF4, double quantization, block 64), then PEFT.
One step = forward with the loss over every token, backward, AdamW step on the adapters, zero_grad; best of
--repeats after --warmup steps. Each (side, method) runs in its own fresh process, so each side's peak memory is its
own: on CUDA torch.cuda.max_memory_allocated from the ready-to-train model (weights included) to the end, on CPU
the peak resident set size over the same span. MFU: lora_lab/flops.py's model FLOPs of the step (the same count
for both sides: 4N frozen + 6N adapters + causal attention) over the device's peak (benchmarks/README.md).

On a CPU the real shapes do not fit a shared 2-core machine's time or memory, so the defaults shrink what does not
change the kind of work per token: 1 layer (of the real width, heads, GQA and MLP size), the real vocabulary only
for Llama-2 / Mistral (32000; Llama-3.1's 128256 rows become 32000), batch 1 x 256 tokens, float32. Every
reduction is printed with the table. Override any of them (--n_layer, --vocab_size, --seq_len, --batch_size).
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

from lora_lab import GPT  # noqa: E402
from lora_lab.config import Config  # noqa: E402
from lora_lab.flops import measure_peak_flops, peak_flops_of, training_flops  # noqa: E402
from lora_lab.generate import peak_memory_bytes, reset_peak_memory  # noqa: E402
from lora_lab.lora import inject_lora, mark_only_lora_trainable, normalize_targets  # noqa: E402
from lora_lab.nf4 import quantize_nf4  # noqa: E402
from lora_lab.utils import LoraLabError  # noqa: E402

MODELS = {"llama-2-7b": "Llama-2-7b-hf", "mistral-7b": "Mistral-7B-v0.1", "llama-3.1-8b": "Meta-Llama-3.1-8B"}
# our LoRA target roles -> the Hugging Face module names PEFT matches
HF_TARGETS = {"query": ["q_proj"], "key": ["k_proj"], "value": ["v_proj"], "projection": ["o_proj"],
              "mlp": ["gate_proj", "up_proj", "down_proj"]}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_config(model: str, n_layer: Optional[int], vocab_size: Optional[int]) -> Config:
    if model not in MODELS:
        raise LoraLabError(f"--model {model!r}: choose one of {', '.join(MODELS)}")
    overrides = {k: v for k, v in dict(n_layer=n_layer, vocab_size=vocab_size).items() if v}
    return Config.from_name(MODELS[model], **overrides)


def random_model(config: Config, device: torch.device, dtype: torch.dtype) -> GPT:
    """Our GPT with seeded N(0, 0.02) weights (norms 1), built directly on the device in the compute dtype."""
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.02)
    return model


def peer_model(ours: GPT, device: torch.device, dtype: torch.dtype, quantize: bool):
    """transformers' model holding our weights; for QLoRA its block linears as bitsandbytes Linear4bit."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_lab.formats.hf import export_hf_state_dict

    hf_config, hf_state = export_hf_state_dict(ours.config, ours.state_dict())
    hf_config.pop("architectures", None)
    config = AutoConfig.for_model(hf_config.pop("model_type"), **{k: v for k, v in hf_config.items() if k != "dtype"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.load_state_dict(hf_state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    # the rotary embedding's inv_freq is not in the state dict (still on meta): build that module for real
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)
    if quantize:
        import bitsandbytes as bnb

        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                              compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                              device="cpu")
                        q.load_state_dict(child.state_dict())
                        setattr(parent, name, q.to(device))  # .to quantizes
    return model.to(device)


def worker(side: str, method: str, config: Config, batch_size: int, seq_len: int, device: torch.device,
           dtype: torch.dtype, targets: list[str], r: int, repeats: int, warmup: int, compile: bool) -> dict:
    """One side and method in this process: build, check, time, measure."""
    ours = random_model(config, device, dtype)
    x = torch.randint(0, config.vocab_size, (batch_size, seq_len), device=device,
                      generator=torch.Generator(device).manual_seed(1))
    if side == "lora_lab":
        model = ours
        if method == "qlora":
            quantize_nf4(model)
        inject_lora(model, r=r, alpha=2.0 * r, dropout=0.0, targets=targets)
        mark_only_lora_trainable(model)
        if compile:
            from lora_lab.compile import compile_blocks

            compile_blocks(model)

        def loss_fn():
            return model(x, labels=x)
    else:
        from peft import LoraConfig, get_peft_model

        hf = peer_model(ours, device, dtype, quantize=method == "qlora")
        del ours
        modules = [m for t in targets for m in HF_TARGETS[t]]
        model = get_peft_model(hf, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=modules))

        def loss_fn():
            return model(input_ids=x, labels=x).loss
    flops_model = random_model(config, torch.device("meta"), dtype)  # the same count for both sides
    inject_lora(flops_model, r=r, alpha=2.0 * r, targets=targets)
    mark_only_lora_trainable(flops_model)
    step_flops = training_flops(flops_model)(batch_size * seq_len, batch_size * (seq_len - 1),
                                             batch_size * seq_len * (seq_len + 1) // 2)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # one CPU thread: the thread's CPU time, which other processes on a shared machine do not inflate
    clock = time.thread_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter
    reset_peak_memory(device)
    losses, times = [], []
    for i in range(warmup + repeats):
        sync()
        t0 = clock()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(clock() - t0)
        losses.append(loss.item())
        if device.type == "cpu":  # the CPU's peak: the best probe between the steps, as the best step counts
            measure_peak_flops(device, dtype, fresh=True)
    peak, source = peak_flops_of(device, dtype)
    best = min(times[warmup:])
    return {"side": side, "method": method, "first_loss": losses[0], "best_s": best,
            "tokens_per_s": batch_size * seq_len / best, "mfu": step_flops / best / peak, "peak_source": source,
            "peak_memory": peak_memory_bytes(device), "trainable": sum(p.numel() for p in params)}


def main(model: str = "llama-3.1-8b", methods: tuple[str, ...] = ("lora", "qlora"),
         sides: tuple[str, ...] = ("lora_lab", "peft"), batch_size: Optional[int] = None,
         seq_len: Optional[int] = None, n_layer: Optional[int] = None, vocab_size: Optional[int] = None,
         lora_r: int = 8, lora_targets: str = "all", device: Optional[str] = None, dtype: Optional[str] = None,
         repeats: int = 3, warmup: int = 1, compile: bool = False, threads: Optional[int] = None,
         worker_spec: Optional[str] = None) -> None:
    """Run every (side, method) in its own process and print one table.

    Args:
        model: llama-2-7b, mistral-7b or llama-3.1-8b (shape only; random weights).
        methods: lora, qlora.
        sides: lora_lab (ours), peft (transformers + PEFT, + bitsandbytes for qlora).
        batch_size: rows per step (default 2 on a GPU, 1 on a CPU).
        seq_len: tokens per row (default 2048 on a GPU, 256 on a CPU).
        n_layer: override the number of layers (default: all on a GPU, 1 on a CPU).
        vocab_size: override the vocabulary (default: the model's on a GPU, at most 32000 on a CPU).
        lora_r: LoRA rank (alpha = 2 r, dropout 0).
        lora_targets: our target names (query, key, value, projection, mlp or all), mapped to PEFT's module names.
        device: cuda or cpu (default: cuda when there is one).
        dtype: bfloat16, float16 or float32 (default: bfloat16 on a GPU, float32 on a CPU).
        repeats: timed steps (the best counts).
        warmup: untimed steps first.
        compile: torch.compile our blocks (lora_lab/compile.py); the peer stays eager.
        threads: torch threads on a CPU (1: steps timed in the thread's CPU time, robust to a shared machine).
        worker_spec: internal: run one side,method in this process and print its JSON.
    """
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cpu = dev.type == "cpu"
    dtype_ = DTYPES[dtype or ("float32" if cpu else "bfloat16")]
    base = build_config(model, None, None)
    n_layer = n_layer or (1 if cpu else None)
    vocab_size = vocab_size or (min(base.vocab_size, 32000) if cpu else None)
    batch_size, seq_len = batch_size or (1 if cpu else 2), seq_len or (256 if cpu else 2048)
    config = build_config(model, n_layer, vocab_size)
    targets = normalize_targets(lora_targets.split(","))
    targets = [t for t in targets if t in HF_TARGETS]  # lm_head: not in this comparison
    if worker_spec:
        side, method = worker_spec.split(",")
        result = worker(side, method, config, batch_size, seq_len, dev, dtype_, targets, lora_r, repeats, warmup,
                        compile and side == "lora_lab")
        print("RESULT " + json.dumps(result))
        return

    reduced = [f"{k} {getattr(config, k)} (real: {getattr(base, k)})" for k in ("n_layer", "vocab_size")
               if getattr(config, k) != getattr(base, k)]
    print(f"{MODELS[model]} shape, random weights, {str(dtype_).removeprefix('torch.')} on {dev}"
          f"{' (' + torch.cuda.get_device_name(dev) + ')' if dev.type == 'cuda' else ''}, batch {batch_size} x "
          f"{seq_len}, LoRA r {lora_r} on {', '.join(targets)}, best of {repeats} after {warmup} warm-up"
          + (f"; REDUCED for this device: {', '.join(reduced)}" if reduced else ""), flush=True)
    rows = []
    for method in methods:
        for side in sides:
            args = [sys.executable, __file__, "--worker_spec", f"{side},{method}", "--model", model,
                    "--batch_size", str(batch_size), "--seq_len", str(seq_len), "--lora_r", str(lora_r),
                    "--lora_targets", ",".join(targets), "--device", str(dev),
                    "--dtype", str(dtype_).removeprefix("torch."), "--repeats", str(repeats), "--warmup", str(warmup),
                    "--compile", str(compile).lower()]
            args += [a for k, v in (("--n_layer", n_layer), ("--vocab_size", vocab_size), ("--threads", threads))
                     if v for a in (k, str(v))]
            proc = subprocess.run(args, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"{side} {method}: failed: {err}", flush=True)
                continue
            rows.append(json.loads(line.removeprefix("RESULT ")))
            r = rows[-1]
            print(f"  {side:<8} {method:<5} {r['best_s']:.3f} s/step  first loss {r['first_loss']:.4f}", flush=True)

    print("\n| method | side | s/step | tokens/s | MFU | peak memory | ours vs peer (tokens/s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        peer = next((p for p in rows if p["method"] == r["method"] and p["side"] == "peft"), None)
        speedup = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if peer and r["side"] == "lora_lab" else ""
        print(f"| {r['method']} | {r['side']} | {r['best_s']:.3f} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | "
              f"{r['peak_memory'] / 2**30:.2f} GiB | {speedup} |")
    if rows:
        print(f"MFU against {rows[0]['peak_source']}; peak memory: "
              + ("torch.cuda.max_memory_allocated" if dev.type == "cuda" else "peak resident set size of the process"))
    for method in methods:  # the two sides must have computed the same thing
        pair = [r for r in rows if r["method"] == method]
        if len(pair) == 2 and abs(pair[0]["first_loss"] - pair[1]["first_loss"]) > 2e-2 * abs(pair[1]["first_loss"]):
            print(f"WARNING {method}: first losses differ: {pair[0]['first_loss']} vs {pair[1]['first_loss']}")


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
