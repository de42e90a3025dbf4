"""The adapter server (lora_lab/serve): the stacked multi-adapter layer, the continuous-batching engine against
generate/base.py and generate/lora.py, the OpenAI API through the stock `openai` client and raw HTTP, errors, the
adapter LRU, a bounded load test and Ctrl-C.

The base is a tiny random Llama with SmolLM2's real tokenizer and ChatML template; its weights are scaled (x3, as in
tests/test_use_adapter.py) so greedy decoding has no near-ties and batching's different rounding cannot flip a
token. Adapters of different ranks and targets (plain LoRA, rsLoRA, DoRA, a PEFT export) are made with random B.
Everything runs on 127.0.0.1, each wait bounded by a timeout.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_use_adapter import LLAMA, make_adapter, make_base, run_in_process  # noqa: E402

from lora_lab.config import Config  # noqa: E402
from lora_lab.lora import LoRALinear  # noqa: E402
from lora_lab.serve.multi_lora import AdapterBank, MultiLoRALinear  # noqa: E402
from lora_lab.serve.server import ModelServer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["Hello", "What is the capital of France?", "Write a haiku about llamas and their favourite food"]
# name -> (targets, r, extra): ranks 2..8, different targets, rsLoRA, DoRA, a tied-free lm_head
ADAPTERS = {
    "qv4": (["query", "value"], 4, dict(prompt_style="chatml")),
    "all8": ("all", 8, dict(use_rslora=True, prompt_style="plain")),
    "mlp2": (["mlp", "lm_head"], 2, dict(prompt_style="chatml")),
    "dora4": (["query", "projection"], 4, dict(use_dora=True, prompt_style="chatml")),
}
N_NEW = 10


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from conftest import require_asset

    tok = require_asset("models/smollm2-135m-instruct")
    tmp = tmp_path_factory.mktemp("serve")
    config = Config(name="tiny", **dict(LLAMA, vocab_size=49152, block_size=96), prompt_style="chatml")
    base = make_base(tmp / "base", config, tokenizer_dir=tok)
    for name, (targets, r, extra) in ADAPTERS.items():
        make_adapter(base, tmp / "adapters" / name, targets, r=r, **extra)
    from lora_lab.export_peft import export_peft

    export_peft(tmp / "adapters" / "qv4", tmp / "peft_qv4")  # the same adapter in PEFT's format
    other = make_base(tmp / "other", Config(name="other", **dict(LLAMA, n_embd=48, vocab_size=49152)), tokenizer_dir=tok)
    make_adapter(other, tmp / "misfit", ["query"])  # trained on a base of other shapes
    return tmp


def script_answer(workdir, capsys, monkeypatch, adapter, prompt, quantize=None):
    """What generate/lora.py (or generate/base.py for adapter None) prints for `prompt` alone, greedy."""
    args = ["--prompt", prompt, "--max_new_tokens", N_NEW, "--temperature", 0, "--device", "cpu"]
    if quantize:
        args += ["--quantize", quantize]
    if adapter is None:
        from generate.base import main

        args += ["--checkpoint_dir", workdir / "base"]
    else:
        from generate.lora import main

        args += ["--adapter_dir", workdir / "adapters" / adapter]
    result = run_in_process(main, *args, capsys=capsys, monkeypatch=monkeypatch)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")
    return result.stdout[:-1]


def engine_answers(server, jobs, **kw):
    """Submit every (model, prompt) at once to the running engine; their (text, finish_reason, generated)."""
    results = {}
    done = threading.Event()
    lock = threading.Lock()

    def submit(key):
        model, prompt = key
        parts = []

        def on_event(kind, payload):
            if kind == "text":
                parts.append(payload)
            else:
                with lock:
                    results[key] = ("".join(parts), payload, req.generated)
                    if len(results) == len(jobs):
                        done.set()

        req = server.request(model, on_event, messages=[{"role": "user", "content": prompt}],
                             max_tokens=N_NEW, **{"temperature": 0.0, **kw})
        server.engine.submit(req)

    for key in jobs:
        submit(key)
    assert done.wait(120), f"only {len(results)} of {len(jobs)} finished"
    return results


# ------------------------------------------------------------------------------------------------------------
# The stacked layer
# ------------------------------------------------------------------------------------------------------------
def test_multi_lora_layer_matches_lora_linear_per_row():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12)
    bank = AdapterBank(n_slots=4, device="cpu")
    layer = MultiLoRALinear(base, bank)
    refs = {}
    for slot, (r, dora) in {1: (2, False), 2: (6, True), 3: (4, False)}.items():  # mixed ranks, one DoRA
        ref = LoRALinear.from_linear(base, r=r, alpha=3.0, use_dora=dora)
        with torch.no_grad():
            ref.lora_B.normal_()
            if dora:
                ref.lora_magnitude.mul_(1.5)
        g = ref.lora_magnitude / ref._dora_row_norm() if dora else None
        layer.set_slot(slot, ref.lora_A.detach(), ref.lora_B.detach(), None if g is None else g.detach())
        bank.scaling[slot] = ref.scaling
        refs[slot] = ref
    x = torch.randn(5, 3, 16)  # (B, T, in)
    bank.slots = torch.tensor([0, 1, 2, 3, 2])
    with torch.no_grad():
        out = layer(x)
        assert torch.equal(out[0], base(x[0]))  # no adapter: the base output exactly
        for b, slot in enumerate(bank.slots.tolist()[1:], start=1):
            torch.testing.assert_close(out[b], refs[slot](x[b]), atol=1e-5, rtol=1e-5)
        layer.set_slot(2, None, None)  # an evicted slot adds nothing
        assert torch.equal(layer(x)[2], base(x[2]))


# ------------------------------------------------------------------------------------------------------------
# Exactness: one engine, concurrent greedy requests == the generate scripts on each prompt alone
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_concurrent_mixed_adapters_match_generate_scripts(workdir, capsys, monkeypatch, quantize):
    models = [None, "qv4", "all8", "mlp2", "dora4"]
    expected = {(m, p): script_answer(workdir, capsys, monkeypatch, m, p, quantize) for m in models for p in PROMPTS}
    assert len({expected[(m, PROMPTS[1])] for m in models}) == len(models)  # every adapter changes the answer
    server = ModelServer.load(workdir / "base", {m: workdir / "adapters" / m for m in models if m},
                              quantize=quantize, device="cpu", max_batch_size=6, max_loaded_adapters=4)
    try:
        jobs = [("tiny" if m is None else m, p) for p in PROMPTS for m in models]  # 15 requests, 6 rows at a time
        got = engine_answers(server, jobs)
        for (model, prompt), (text, reason, _) in got.items():
            assert text == expected[(None if model == "tiny" else model, prompt)], (model, prompt)
            assert reason in ("stop", "length")
        assert server.engine.steps > N_NEW  # requests joined while others were decoding
        assert not server.engine.rows and not server.store.in_use
    finally:
        server.engine.shutdown()


def test_peft_adapter_serves_like_the_lora_lab_one(workdir):
    server = ModelServer.load(workdir / "base", {"lab": workdir / "adapters" / "qv4", "peft": workdir / "peft_qv4"},
                              device="cpu", max_batch_size=4)
    try:
        got = engine_answers(server, [(m, p) for m in ("lab", "peft") for p in PROMPTS[:2]])
        for p in PROMPTS[:2]:
            assert got[("peft", p)][2] == got[("lab", p)][2]
    finally:
        server.engine.shutdown()
