"""The server under sustained load: requests/s and latency percentiles at a few concurrency levels, over HTTP.

    python benchmarks/bench_serve_load.py                                  # SmolLM2-135M shape, 4 adapters
    python benchmarks/bench_serve_load.py --model tiny --requests 48       # a 2-layer model: the server's overhead

`python -m lora_lab.serve`'s whole path is measured: uvicorn on 127.0.0.1 in this process, the guard (an API key
is set, so the key check is included), the OpenAI routes, the engine. The model has seeded random weights (float32,
CPU) and SmolLM2's tokenizer; `--adapters` random LoRA adapters (r 8, query and value) plus the base are spread
over the requests, a third of them streamed. Each concurrency level C runs C closed-loop clients (each sends its
next request when the previous one answered) until `--requests` requests have been answered, with exactly
`--new_tokens` tokens each (no stop at end of text), from one common start:

  req/s        answered requests / wall time (sustained: the clients keep the server full)
  p50, p99     each request's latency, send to last byte
  tokens/s     generated tokens / wall time
  429          requests refused (the server runs with --max_queue `--max_queue`, so C above
               max_batch_size + max_queue sees some; a refused client waits Retry-After / 10 and sends again)

A warm-up round (every adapter loaded once) is not counted. On a shared machine the absolute numbers move with its
load; the ratios between concurrency levels of one run hold better.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_lora import SMOLLM2_CONFIG, print_table  # noqa: E402
from bench_serve import make_adapters  # noqa: E402

from lora_lab.utils import LoraLabError, cli  # noqa: E402

KEY = "bench-key-0123456789"
TINY = dict(n_layer=2, n_embd=64, n_head=4, n_query_groups=2, intermediate_size=128, block_size=256)


def write_base(tmp: Path, model: str) -> Path:
    from lora_lab.checkpoint import save_checkpoint
    from lora_lab.config import Config
    from lora_lab.model import GPT

    tok = SMOLLM2_CONFIG.parent
    if not (tok / "tokenizer.json").is_file():
        raise LoraLabError(f"needs SmolLM2's tokenizer files in {tok} (../shared/assets)")
    if model == "tiny":
        config = Config(name="tiny", vocab_size=49152, prompt_style="chatml", **TINY)
    elif model == "smollm2":
        config = Config.from_name("SmolLM2-135M-Instruct", block_size=512)
    else:
        raise LoraLabError(f"--model {model}: use tiny or smollm2")
    torch.manual_seed(0)
    save_checkpoint(tmp / "base", config, GPT(config).state_dict(), tokenizer_dir=tok)
    return tmp / "base"


def client_loop(url: str, jobs: list, take, results: list, lock: threading.Lock, new_tokens: int) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=300, trust_env=False, headers={"Authorization": f"Bearer {KEY}"}) as http:
        while True:
            i = take()
            if i is None:
                return
            model, prompt = jobs[i % len(jobs)]
            stream = i % 3 == 0
            body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
                    "stream": stream, "ignore_eos": True}
            while True:
                t0 = time.perf_counter()
                if stream:
                    with http.stream("POST", "/v1/completions", json=body) as r:
                        for _ in r.iter_lines():
                            pass
                        status = r.status_code
                        n = new_tokens if status == 200 else 0
                else:
                    r = http.post("/v1/completions", json=body)
                    status = r.status_code
                    n = r.json()["usage"]["completion_tokens"] if status == 200 else 0
                latency = time.perf_counter() - t0
                if status == 429:
                    with lock:
                        results.append(("429", latency, 0))
                    time.sleep(float(r.headers.get("retry-after", 1)) / 10)
                    continue
                if status != 200:
                    raise LoraLabError(f"HTTP {status}: {r.text if not stream else ''}")
                with lock:
                    results.append(("ok", latency, n))
                break


def run_level(url: str, jobs: list, concurrency: int, requests: int, new_tokens: int) -> dict:
    lock, results, counter = threading.Lock(), [], iter(range(requests))

    def take():
        with lock:
            return next(counter, None)

    threads = [threading.Thread(target=client_loop, args=(url, jobs, take, results, lock, new_tokens))
               for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = sorted(lat for kind, lat, _ in results if kind == "ok")
    p99 = ok[min(len(ok) - 1, int(round(0.99 * (len(ok) - 1))))]
    return {"concurrency": concurrency, "req_s": len(ok) / wall, "p50": statistics.median(ok), "p99": p99,
            "tok_s": sum(n for kind, _, n in results if kind == "ok") / wall,
            "refused": sum(kind == "429" for kind, _, _ in results), "wall": wall}


def main(model: str = "smollm2", concurrency: list[int] = [1, 4, 16, 32], requests: int = 64, new_tokens: int = 16,
         adapters: int = 4, max_batch_size: int = 16, max_queue: int = 8, threads: int = 0) -> list[dict]:
    """Print the table; returns its rows.

    Args:
        model: smollm2 (SmolLM2-135M's shape) or tiny (2 layers, d 64: what is left is the server's own cost).
        concurrency: numbers of clients sending at once.
        requests: answered requests per level.
        new_tokens: tokens each request generates.
        adapters: random LoRA adapters served beside the base (requests cycle through base + adapters).
        max_batch_size: the server's running batch.
        max_queue: the server's waiting requests beyond the batch (more get 429).
        threads: torch threads (0: torch's choice).
    """
    import uvicorn

    from lora_lab.serve.app import ServeOptions, create_app
    from lora_lab.serve.server import ModelServer

    if threads:
        torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_load_"))
    try:
        base = write_base(tmp, model)
        names = make_adapters(base, tmp / "adapters", adapters, 8, peft=False)
        server = ModelServer.load(base, {n: tmp / "adapters" / n for n in names}, device="cpu",
                                  max_batch_size=max_batch_size, max_loaded_adapters=max(1, adapters),
                                  max_queue=max_queue)
        prompts = ["Hello", "Write a haiku about llamas", "What is the capital of France?",
                   "Summarise: the quick brown fox jumps over the lazy dog"]
        models = [server.name] + names
        jobs = [(models[i % len(models)], prompts[i % len(prompts)]) for i in range(len(models) * len(prompts))]
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        userver = uvicorn.Server(uvicorn.Config(create_app(server, ServeOptions(api_keys=(KEY,))), host="127.0.0.1",
                                                port=port, log_level="warning"))
        thread = threading.Thread(target=userver.run, daemon=True)
        thread.start()
        while not userver.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        print(f"{model} shape, random weights, float32, CPU ({torch.get_num_threads()} threads); base + {adapters} "
              f"adapters (r 8, query+value); {requests} requests per level x {new_tokens} new tokens; "
              f"max_batch_size {max_batch_size}, max_queue {max_queue}; over HTTP on 127.0.0.1 with an API key")
        run_level(url, jobs, min(len(jobs), max_batch_size), len(jobs), new_tokens)  # warm-up: every adapter loaded
        rows = [run_level(url, jobs, c, requests, new_tokens) for c in concurrency]
        userver.should_exit = True
        thread.join(30)
        server.engine.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(["clients", "req/s", "p50 (s)", "p99 (s)", "tokens/s", "429", "wall (s)"],
                [[str(r["concurrency"]), f"{r['req_s']:.2f}", f"{r['p50']:.3f}", f"{r['p99']:.3f}",
                  f"{r['tok_s']:.1f}", str(r["refused"]), f"{r['wall']:.1f}"] for r in rows])
    return rows


if __name__ == "__main__":
    cli(main)
