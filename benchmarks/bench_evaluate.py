"""Evaluation speed: our lm-eval model (lora_lab/evaluate/lm_eval_model.py) against lm-eval's own `hf` model on our
Hugging Face export of the same weights, on the same requests, in one process.

    python benchmarks/bench_evaluate.py --checkpoint_dir /tmp/smol --tasks arc_easy,hellaswag --limit 100

Both run lm_eval.simple_evaluate on the same tasks and documents with the same batch size; the sides alternate
(ours, hf, ours, hf, ... for --repeats rounds) so that a busy machine slows both alike. Timed: the model's own
work, i.e. the time spent inside each model's loglikelihood / loglikelihood_rolling / generate_until calls
(tokenizing included; lm-eval's data loading and metrics excluded). Before timing, the two must agree: every
request's loglikelihood within 1e-4 and every generation identical. Printed: requests, seconds and requests/s of each
side (best of the repeats) and ours / hf.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_lab.utils import cli  # noqa: E402

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
GGUF = ASSETS / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def timed(lm):
    """Wrap lm's request methods so that the seconds spent in them add up in lm.model_seconds."""
    lm.model_seconds, lm.timed_requests = 0.0, 0
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        method = getattr(lm, name)

        def wrapper(requests, *args, _method=method, **kwargs):
            t0 = time.perf_counter()
            out = _method(requests, *args, **kwargs)
            lm.model_seconds += time.perf_counter() - t0
            lm.timed_requests += len(requests)
            return out

        setattr(lm, name, wrapper)
    return lm


def main(checkpoint_dir: Optional[Path] = None, tasks: str = "arc_easy,hellaswag", limit: int = 100,
         batch_size: int = 8, repeats: int = 2, threads: Optional[int] = None) -> list[dict]:
    """Time ours vs lm-eval's hf model.

    Args:
        checkpoint_dir: a lora_lab checkpoint (default: SmolLM2-135M-Instruct converted from the shared GGUF).
        tasks: lm-eval tasks (local copies: lora_lab/evaluate/local_tasks.py).
        limit: documents per task.
        batch_size: both sides' batch size.
        repeats: rounds of (ours, hf); the best of each side is reported.
        threads: torch intra-op threads (default: torch's choice).
    """
    import subprocess

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from lora_lab.formats.hf import export_hf
    from lora_lab.evaluate.lm_eval_model import LoraLabLM
    from lora_lab.evaluate.load import load_model
    from lora_lab.evaluate.local_tasks import task_manager_for

    if threads:
        torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_evaluate_"))
    if checkpoint_dir is None:
        checkpoint_dir = tmp / "smol"
        subprocess.run([sys.executable, "-m", "lora_lab.convert", str(GGUF), str(checkpoint_dir)], check=True,
                       capture_output=True)
    export_hf(checkpoint_dir, tmp / "hf")
    names = [t for t in tasks.split(",") if t]
    manager, names = task_manager_for(names)
    loaded = load_model(checkpoint_dir)
    sides = {"lora_lab": lambda: LoraLabLM(loaded.model, loaded.tokenizer, batch_size=batch_size, progress=False),
             "lm-eval hf": lambda: HFLM(pretrained=str(tmp / "hf"), device="cpu", batch_size=batch_size,
                                        dtype="float32")}
    best: dict = {}
    samples: dict = {}
    for _ in range(repeats):
        for side, make in sides.items():
            lm = timed(make())
            out = simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=manager, log_samples=True,
                                  random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
            samples[side] = out["samples"]
            if side not in best or lm.model_seconds < best[side]["seconds"]:
                best[side] = {"requests": lm.timed_requests, "seconds": lm.model_seconds,
                              "acc": {t: out["results"][t].get("acc,none") for t in names}}
    # the same answers before any speed is believed
    for task in names:
        for x, y in zip(sorted(samples["lora_lab"][task], key=lambda s: s["doc_id"]),
                        sorted(samples["lm-eval hf"][task], key=lambda s: s["doc_id"])):
            for rx, ry in zip(x["resps"], y["resps"]):
                rx, ry = rx[0], ry[0]
                assert (rx == ry) if isinstance(rx, str) else abs(rx[0] - ry[0]) < 1e-4, (task, rx, ry)
    rows = []
    print(f"\n{', '.join(names)}, {limit} documents each, batch {batch_size}, {torch.get_num_threads()} threads, "
          f"best of {repeats}")
    print("| model | requests | seconds | requests/s | accuracy |\n|---|---:|---:|---:|---|")
    for side, r in best.items():
        rate = r["requests"] / r["seconds"]
        rows.append({"side": side, **r, "requests_per_s": rate})
        acc = ", ".join(f"{t} {a:.3f}" for t, a in r["acc"].items() if a is not None)
        print(f"| {side} | {r['requests']} | {r['seconds']:.1f} | {rate:.1f} | {acc} |")
    print(f"ours / hf requests per second: {rows[0]['requests_per_s'] / rows[1]['requests_per_s']:.2f}x")
    return rows


if __name__ == "__main__":
    cli(main)
