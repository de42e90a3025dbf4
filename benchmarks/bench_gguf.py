"""Our GGUF exports in llama.cpp (llama-cpp-python) against our own generate: file sizes and tokens per second.

    python benchmarks/bench_gguf.py                                  # SmolLM2-135M-Instruct from the shared assets
    python benchmarks/bench_gguf.py --checkpoint_dir CKPT --outtypes [f16,q8_0,q4_0] --max_new_tokens 64

The checkpoint (by default SmolLM2-135M-Instruct, converted from the Q4_1 GGUF in ../shared/assets) is exported
with `lora_lab.export_gguf` at each --outtype; llama.cpp then decodes the same ChatML prompt greedily, as does our
`lora_lab.generate.generate` (float32, KV cache), in this one process with the same number of threads. Each side:
the prompt's prefill time, then the decode rate (new tokens / time after the first). Decoding is memory-bound, so
fewer bytes per weight decode faster; read the ratios, not the absolute numbers, on a shared machine. The first
new tokens of each side are printed so that a broken export shows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_lab.formats.gguf_export import export_gguf  # noqa: E402
from lora_lab.generate import generate  # noqa: E402
from lora_lab.model import GPT  # noqa: E402
from lora_lab.tokenizer import Tokenizer  # noqa: E402

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
ASSETS = ROOT.parent / "shared" / "assets" / "models" / "smollm2-135m-instruct"


def ours(checkpoint_dir: Path, ids: list[int], n: int, threads: int) -> tuple[float, float, list[int]]:
    torch.set_num_threads(threads)
    model = GPT.from_checkpoint(checkpoint_dir).eval()
    prompt = torch.tensor(ids)
    with torch.no_grad():
        t0 = time.perf_counter()
        out, times = [], []
        for token in generate(model, prompt, max_new_tokens=n, temperature=0.0):
            out.append(token)
            times.append(time.perf_counter())
    return times[0] - t0, (len(out) - 1) / (times[-1] - times[0]), out


def load_llama_cpp(gguf_file: Path, extra_buffer_types: bool = False, **kwargs):
    """llama_cpp.Llama(gguf_file, **kwargs), by default without llama.cpp's "extra buffer types" (weights
    repacked for AMX / AVX kernels). Why: a CPU that advertises AMX inside a sandbox that does not enable it (this
    project's machines) makes llama.cpp pick its AMX kernels for Q8_0 / Q4_0 weights, which then die of SIGILL;
    llama-cpp-python has no argument for it, so the default model params are adjusted while the model loads."""
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = extra_buffer_types
        return p

    lib.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(gguf_file), **kwargs)
    finally:
        lib.llama_model_default_params = default


def llama_cpp(gguf_file: Path, ids: list[int], n: int, threads: int) -> tuple[float, float, list[int]]:
    import numpy as np

    llm = load_llama_cpp(gguf_file, n_ctx=512, n_threads=threads, n_batch=512, logits_all=True, verbose=False)
    t0 = time.perf_counter()
    llm.eval(ids)
    out, times = [], []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))  # greedy, as ours
        out.append(token)
        times.append(time.perf_counter())
        llm.eval([token])
    return times[0] - t0, (len(out) - 1) / (times[-1] - times[0]), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint_dir", type=Path, default=None)
    parser.add_argument("--outtypes", default="[f16,q8_0,q4_0]")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    outtypes = args.outtypes.strip("[]").split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = args.checkpoint_dir
        if ckpt is None:
            from lora_lab.formats.gguf_import import convert_gguf

            ckpt = tmp / "ckpt"
            convert_gguf(ASSETS / "SmolLM2-135M-Instruct.Q4_1.gguf", ckpt)
        tok = Tokenizer(ckpt)
        ids = tok.encode(PROMPT).tolist()
        n = args.max_new_tokens
        weights = ckpt / "model.safetensors"
        rows = [("lora_lab generate (float32)", weights.stat().st_size, *ours(ckpt, ids, n, args.threads))]
        for outtype in outtypes:
            path = tmp / f"{outtype}.gguf"
            export_gguf(ckpt, path, outtype, progress=False)
            rows.append((f"llama.cpp {outtype}", path.stat().st_size, *llama_cpp(path, ids, n, args.threads)))
    base = rows[0][3]
    print(f"\n{len(ids)}-token prompt, {n} greedy tokens, {args.threads} threads\n")
    print("| runs | file MiB | prefill s | decode tokens/s | vs ours | first tokens |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, size, prefill, rate, out in rows:
        text = tok.decode(out[:12]).replace("\n", " ").replace("|", "/")
        print(f"| {name} | {size / 2**20:.1f} | {prefill:.3f} | {rate:.1f} | {rate / base:.2f}x | {text!r} |")


if __name__ == "__main__":
    main()
