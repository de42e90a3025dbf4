"""Serving many adapters at once: the lora_lab engine (lora_lab/serve) against serving them one adapter at a time
and against transformers + PEFT's mixed-adapter batch, on the same CPU, in one process.

    python benchmarks/bench_serve.py                        # SmolLM2-135M shape, random weights, 32 requests
    python benchmarks/bench_serve.py --adapter_counts [1,8] --peft false --new_tokens 8     # quicker

The model is SmolLM2-135M's architecture (30 layers, d 576, vocab 49152) with seeded random weights, converted by our
converter (bench_lora.write_checkpoints), float32. Adapters: seeded random LoRA r 8 on query and value (as
finetune/lora.py's defaults), saved as lora_lab adapter directories (and, for PEFT, exported with export_peft).

Workload: `--requests` (32) requests arrive together, each a `--prompt_len` random-token prompt that generates
exactly `--new_tokens` tokens greedily (no end-of-sequence stop, so every side does the same number of steps).
Request i uses adapter i mod k, for k in `--adapter_counts`. Rows of the table:

  base alone           the same requests with no adapter (the engine without adapter work)
  engine, k adapters   lora_lab's engine: one continuous batch mixing the k adapters (stacked A/B, gathered per row)
  one by one, k        the same engine, but one batch per adapter, the batches one after the other, as k separate
                       deployments sharing this machine would (each batch holds only its adapter's requests)
  PEFT, k adapters     transformers' generate on a PeftModel holding the k adapters, one batch, with
                       adapter_names=[adapter of each row] (PEFT's mixed-adapter batch inference), KV cache on

Measured: aggregate generated tokens/s (all tokens / wall time from the common start to the last token) and time to
first token (median over requests, from the common start; for PEFT the time of a 1-token generate of the same
batch, since generate gives nothing before it ends). `--repeats` rounds run every setup once each, in turn, and the
best round of each setup is reported, so that the load of a shared machine drifting during the run hits all alike.
Cold load: reading one adapter directory and writing it into
the engine's stacked layers (median of 5). Before timing, every side decodes the first requests and the greedy
tokens are compared: the engine must equal lora_lab.generate on each prompt alone, with the adapter merged.
On a shared machine read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_lora's helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_lora import SMOLLM2_CONFIG, print_table, write_checkpoints  # noqa: E402

from lora_lab.utils import LoraLabError, cli  # noqa: E402

TARGETS = ["query", "value"]


def make_adapters(ours_dir: Path, out: Path, n: int, r: int, peft: bool) -> list[str]:
    """n seeded random adapters (lora_lab directories a0.., and PEFT exports peft0.. with `peft`): A as LoRA
    initialises it (|A| <= 1/sqrt(in)), B random and non-zero so that every adapter changes the answers."""
    from lora_lab.checkpoint import load_config, save_adapter_files
    from lora_lab.formats.peft import export_peft
    from lora_lab.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, LoRAConfig, inject_lora, lora_modules
    from lora_lab.model import GPT

    config = load_config(ours_dir)
    with torch.device("meta"):  # only the LoRA layers' names and shapes are needed
        layers = list(lora_modules(inject_lora(GPT(config), r=r, alpha=2.0 * r, targets=TARGETS)))
    lora_config = LoRAConfig(r=r, alpha=2.0 * r, targets=TARGETS, base_model=str(ours_dir),
                             base_config=config.to_dict())
    for k in range(n):
        g = torch.Generator().manual_seed(100 + k)
        tensors = {}
        for name, m in layers:
            tensors[f"{name}.lora_A"] = (torch.rand(r, m.in_features, generator=g) * 2 - 1) / m.in_features ** 0.5
            tensors[f"{name}.lora_B"] = torch.randn(m.out_features, r, generator=g) * 0.05
        save_adapter_files(out / f"a{k}", tensors, lora_config.to_dict(), ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE)
        if peft:
            export_peft(out / f"a{k}", out / f"peft{k}", checkpoint_dir=ours_dir)
    return [f"a{k}" for k in range(n)]


def run_engine(server, prompts: list[list[int]], adapters: list[Optional[str]], new_tokens: int,
               groups: Optional[list[list[int]]] = None) -> dict:
    """Submit the requests (all at once, or group after group), wait for all; tokens/s, TTFT and the tokens."""
    from lora_lab.serve.engine import Request

    groups = groups or [list(range(len(prompts)))]
    reqs = [None] * len(prompts)
    t0 = time.perf_counter()
    for group in groups:
        done = threading.Semaphore(0)
        for i in group:
            slot = server.store.acquire(adapters[i])[0] if adapters[i] else 0
            reqs[i] = Request(prompt_ids=prompts[i], max_tokens=new_tokens, slot=slot, adapter=adapters[i],
                              on_event=lambda kind, _: done.release() if kind != "text" else None)
            reqs[i].submit_time = t0
            server.engine.submit(reqs[i])
        for _ in group:
            done.acquire()
    wall = time.perf_counter() - t0
    n = sum(len(r.generated) for r in reqs)
    return {"tok_s": n / wall, "ttft": statistics.median(r.first_token_time - t0 for r in reqs), "wall": wall,
            "tokens": [r.generated for r in reqs]}


def run_peft(peft_model, prompts, adapters, new_tokens: int) -> dict:
    x = torch.tensor(prompts)  # (B, P): all prompts have the same length, no padding
    kw = dict(do_sample=False, adapter_names=adapters, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        t0 = time.perf_counter()
        peft_model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = peft_model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, **kw)
        wall = time.perf_counter() - t0
    gen = out[:, x.size(1):]
    return {"tok_s": gen.numel() / wall, "ttft": ttft, "wall": wall, "tokens": gen.tolist()}


def main(requests: int = 32, adapter_counts: list[int] = [1, 8, 32], prompt_len: int = 32, new_tokens: int = 16,
         r: int = 8, peft: bool = True, threads: Optional[int] = None, check: int = 2,
         repeats: int = 2) -> list[dict]:
    """Print the table; returns its rows.

    Args:
        requests: concurrent requests (the engine's max_batch_size too).
        adapter_counts: numbers of distinct adapters the requests are spread over.
        prompt_len: tokens of each (random) prompt.
        new_tokens: tokens each request generates.
        r: LoRA rank of every adapter (query and value).
        peft: also time transformers + PEFT's mixed-adapter batch.
        threads: torch threads (default: torch's choice).
        check: how many requests are checked against lora_lab.generate alone (greedy tokens) before timing.
        repeats: rounds over all the setups; each setup's best round is reported.
    """
    from lora_lab.generate import generate
    from lora_lab.formats.merge import load_merged
    from lora_lab.serve.server import ModelServer

    if threads:
        torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    ours_dir, hf_dir = write_checkpoints(None, tmp)
    from lora_lab.checkpoint import copy_tokenizer_files

    if not copy_tokenizer_files(SMOLLM2_CONFIG.parent, ours_dir):  # the server needs one (prompts here are ids)
        raise LoraLabError(f"needs SmolLM2's tokenizer files in {SMOLLM2_CONFIG.parent}")
    n_adapters = max(adapter_counts)
    names = make_adapters(ours_dir, tmp / "adapters", n_adapters + 1, r, peft)  # +1: the cold-load one
    cold_name = names.pop()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 49152, (requests, prompt_len), generator=g).tolist()
    print(f"SmolLM2-135M shape, random weights, float32, CPU ({torch.get_num_threads()} threads); {requests} "
          f"requests x ({prompt_len} prompt + {new_tokens} new tokens); adapters r {r} on {'+'.join(TARGETS)}")

    server = ModelServer.load(ours_dir, {n: tmp / "adapters" / n for n in names}, device="cpu",
                              max_batch_size=requests, max_loaded_adapters=n_adapters + 1,
                              max_seq_length=prompt_len + new_tokens + 1)
    # the check: the engine's greedy tokens == lora_lab.generate with the adapter merged, prompt by prompt
    mixed = [names[i % n_adapters] for i in range(requests)]
    got = run_engine(server, prompts, mixed, new_tokens)["tokens"]
    for i in range(check):
        alone = load_merged(ours_dir, tmp / "adapters" / mixed[i])[0].eval()
        want = list(generate(alone, torch.tensor(prompts[i]), new_tokens))
        agree = sum(a == b for a, b in zip(got[i], want)) / new_tokens
        print(f"check: request {i} ({mixed[i]}): {100 * agree:.0f}% of the engine's tokens equal generate() alone")
    peft_model = None
    if peft:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
        peft_model = PeftModel.from_pretrained(hf, str(tmp / "adapters" / "peft0"), adapter_name="a0")
        for k in range(1, n_adapters):
            peft_model.load_adapter(str(tmp / "adapters" / f"peft{k}"), adapter_name=f"a{k}")
        peft_model.eval()

    # the setups, each a function running the whole workload once; `repeats` rounds, every setup once per round
    # in the same order, so that the machine's load drifting over the run hits them all; the best round counts
    setups = [("base alone (no adapter)", 0, lambda: run_engine(server, prompts, [None] * requests, new_tokens))]
    for k in adapter_counts:
        use = [names[i % k] for i in range(requests)]
        groups = [[i for i in range(requests) if use[i] == n] for n in dict.fromkeys(use)]
        setups.append((f"engine, {k} adapter(s) mixed", k,
                       lambda use=use: run_engine(server, prompts, use, new_tokens)))
        setups.append((f"one batch per adapter, {k}", k,
                       lambda use=use, groups=groups: run_engine(server, prompts, use, new_tokens, groups=groups)))
        if peft_model is not None:
            setups.append((f"transformers + PEFT, {k}", k,
                           lambda use=use: run_peft(peft_model, prompts, use, new_tokens)))
    best: dict = {}
    for _ in range(repeats):
        for setup, k, fn in setups:
            res = fn()
            if setup not in best or res["tok_s"] > best[setup]["tok_s"]:
                best[setup] = {"setup": setup, "k": k, **res}
    rows = [best[setup] for setup, _, _ in setups]
    for row in rows:  # PEFT decodes the same greedy tokens as the engine (same weights, same adapters)?
        if row["setup"].startswith("transformers"):
            engine_tokens = best[f"engine, {row['k']} adapter(s) mixed"]["tokens"]
            same = sum(a == b for x, y in zip(row["tokens"], engine_tokens) for a, b in zip(x, y))
            row["note"] = f"{100 * same / (requests * new_tokens):.0f}% tokens = engine"
    base_tok = rows[0]["tok_s"]
    one_adapter = next((r["tok_s"] for r in rows if r["setup"] == "engine, 1 adapter(s) mixed"), None)

    # cold load: read an adapter directory and write it into the stacked layers
    times = []
    for i in range(5):
        t0 = time.perf_counter()
        server.store.register(f"cold{i}", tmp / "adapters" / cold_name)
        times.append(time.perf_counter() - t0)
        server.store.unregister(f"cold{i}")
    server.engine.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)

    lines = []
    for row in rows:
        ratios = [f"{row['tok_s'] / base_tok:.2f}"]
        ratios.append(f"{row['tok_s'] / one_adapter:.2f}" if one_adapter and row["k"] else "")
        lines.append([row["setup"], f"{row['tok_s']:.1f}", f"{row['ttft']:.2f}", f"{row['wall']:.1f}", *ratios,
                      row.get("note", "")])
    print_table(["setup", "tokens/s", "TTFT median (s)", "wall (s)", "x base", "x 1 adapter", "note"], lines)
    cold = statistics.median(times)
    print(f"cold load of one adapter (r {r}, {'+'.join(TARGETS)}, {len(server.store.bank.layers)} layers): "
          f"{1000 * cold:.1f} ms (median of 5)")
    return rows + [{"setup": "cold load", "seconds": cold}]


if __name__ == "__main__":
    cli(main)
