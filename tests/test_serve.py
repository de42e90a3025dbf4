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

from test_use_adapter import make_adapter, make_tokenized_base, run_in_process  # noqa: E402

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
    tmp = tmp_path_factory.mktemp("serve")
    base = make_tokenized_base(tmp / "base")
    for name, (targets, r, extra) in ADAPTERS.items():
        make_adapter(base, tmp / "adapters" / name, targets, r=r, **extra)
    from lora_lab.formats.peft import export_peft

    export_peft(tmp / "adapters" / "qv4", tmp / "peft_qv4")  # the same adapter in PEFT's format
    other = make_tokenized_base(tmp / "other", name="other", n_embd=48, block_size=64, prompt_style="plain")
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
        # no adapter: exactly the base's output on the same batch (a matmul of another batch shape may round
        # differently in the last bit, on some CPUs)
        assert torch.equal(out[0], base(x)[0])
        for b, slot in enumerate(bank.slots.tolist()[1:], start=1):
            torch.testing.assert_close(out[b], refs[slot](x[b]), atol=1e-5, rtol=1e-5)
        layer.set_slot(2, None, None)  # an evicted slot adds nothing
        assert torch.equal(layer(x)[2], base(x)[2])


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


# ------------------------------------------------------------------------------------------------------------
# Over HTTP: uvicorn on 127.0.0.1, the stock openai client
# ------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving create_app(server) (or `app`, made around it) in a thread, on a free loopback port."""

    def __init__(self, server, options=None, app=None) -> None:
        import uvicorn

        from lora_lab.serve.app import create_app

        self.model_server = server
        self.port = free_port()
        app = create_app(server, options) if app is None else app
        self.uvicorn = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                     timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.uvicorn.started:
            assert time.time() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, api_key="none"):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(30)
        self.model_server.engine.shutdown()


@pytest.fixture(scope="module")
def live(workdir):
    pytest.importorskip("openai")
    runtime = workdir / "runtime"  # what clients may load at run time: below --adapters_root
    if not runtime.exists():
        import shutil

        for name in ADAPTERS:
            shutil.copytree(workdir / "adapters" / name, runtime / name)
        shutil.copytree(workdir / "peft_qv4", runtime / "uploads" / "peft_qv4")
        shutil.copytree(workdir / "misfit", runtime / "uploads" / "misfit")
    server = ModelServer.load(workdir / "base", {"qv4": workdir / "adapters" / "qv4"},
                              adapters_root=runtime, device="cpu", max_batch_size=8,
                              max_loaded_adapters=8, allow_runtime_loading=True)
    live = LiveServer(server)
    yield live
    live.stop()


def expected_engine(workdir, jobs):
    """Each (model, prompt) decoded alone by an engine of one row: the reference for the HTTP answers."""
    server = ModelServer.load(workdir / "base", adapters_root=workdir / "adapters", device="cpu", max_batch_size=1)
    try:
        return {k: v[0] for k, v in engine_answers(server, jobs).items()}
    finally:
        server.engine.shutdown()


def test_openai_client_chat_completions_streaming_models(live, workdir, capsys, monkeypatch):
    client = live.client()
    models = {m.id: m for m in client.models.list().data}
    assert set(models) >= {"tiny", "qv4", "all8", "mlp2", "dora4"}  # --adapters and --adapters_root
    assert models["tiny"].parent is None and models["qv4"].parent == "tiny"

    jobs = [(m, p) for m in ("tiny", "qv4", "all8", "dora4") for p in PROMPTS[:2]]
    want = {("tiny", p): script_answer(workdir, capsys, monkeypatch, None, p) for p in PROMPTS[:2]}
    want.update({(m, p): script_answer(workdir, capsys, monkeypatch, m, p) for m, p in jobs if m != "tiny"})

    def chat(job, stream):
        model, prompt = job
        kw = dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=N_NEW, temperature=0)
        if not stream:
            r = client.chat.completions.create(**kw)
            return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
        parts, reason = [], None
        for chunk in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                reason = chunk.choices[0].finish_reason or reason
            else:
                usage = chunk.usage
        return "".join(parts), reason, usage

    with ThreadPoolExecutor(16) as pool:  # all at once: they share the batch
        plain = dict(zip(jobs, pool.map(lambda j: chat(j, False), jobs)))
        streamed = dict(zip(jobs, pool.map(lambda j: chat(j, True), jobs)))
    for job in jobs:
        assert plain[job][0] == want[job], job
        assert streamed[job][0] == plain[job][0] and streamed[job][1] == plain[job][1]
        assert 0 < plain[job][2].completion_tokens <= N_NEW and plain[job][2].prompt_tokens > 0
        assert streamed[job][2].total_tokens == plain[job][2].total_tokens

    # completions: the prompt as it is (no chat template), the model's stop tokens still apply
    r = client.completions.create(model="mlp2", prompt="Once upon a time", max_tokens=N_NEW, temperature=0)
    s = "".join(c.choices[0].text for c in client.completions.create(model="mlp2", prompt="Once upon a time",
                                                                      max_tokens=N_NEW, temperature=0, stream=True))
    assert r.choices[0].text == s and r.usage.completion_tokens == N_NEW and r.choices[0].finish_reason == "length"
    # sampling with a seed is reproducible, and top_p / temperature are applied
    kw = dict(model="qv4", prompt="Once upon a time", max_tokens=N_NEW, temperature=1.0, top_p=0.9, seed=7)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text
    # stop strings: the text ends before the first one
    full = r.choices[0].text
    cut = full[len(full) // 2:len(full) // 2 + 2]
    if cut.strip():
        stopped = client.completions.create(model="mlp2", prompt="Once upon a time", max_tokens=N_NEW,
                                            temperature=0, stop=[cut])
        assert stopped.choices[0].text == full[:full.index(cut)] and stopped.choices[0].finish_reason == "stop"


def test_load_and_unload_adapter_at_run_time(live, workdir):
    import openai

    client = live.client()
    import httpx

    with httpx.Client(base_url=live.url, timeout=60, trust_env=False) as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "runtime", "lora_path": "uploads/peft_qv4"})
        assert r.status_code == 200, r.text
        assert "runtime" in {m.id for m in client.models.list().data}
        a = client.completions.create(model="runtime", prompt="Hello there", max_tokens=N_NEW, temperature=0)
        b = client.completions.create(model="qv4", prompt="Hello there", max_tokens=N_NEW, temperature=0)
        assert a.choices[0].text == b.choices[0].text  # the PEFT export of qv4 is qv4
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": "uploads/misfit"})
        assert r.status_code == 400 and "does not fit the served base model" in r.json()["error"]["message"]
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "runtime"}).status_code == 200
        assert "runtime" not in {m.id for m in client.models.list().data}
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="runtime", prompt="Hello there", max_tokens=2)
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "runtime"}).status_code == 404


def test_errors_are_openai_style_and_the_server_stays_up(live):
    import httpx
    import openai

    client = live.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found" and "nope" in e.value.body["message"]
    assert e.value.body["message"].endswith("this server has: tiny, " + ", ".join(live.model_server.store.names()))
    with httpx.Client(base_url=live.url, timeout=60, trust_env=False) as http:
        r = http.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] is None
        assert r.json()["error"]["message"].startswith("the request body is not valid JSON (")
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "temperature": "hot"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 0})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        r = http.post("/v1/chat/completions", json={"model": "tiny"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "word " * 200})
        assert r.status_code == 400 and "96" in r.json()["error"]["message"]  # the context limit is said
        r = http.post("/v1/chat/completions",
                      json={"model": "tiny", "messages": [{"role": "assistant", "content": "x"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert http.get("/health").json()["status"] == "ok"


def test_client_disconnect_mid_stream_frees_its_row(live):
    import httpx

    engine = live.model_server.engine
    released, release = [], engine.on_release
    engine.on_release = lambda r: (released.append(r), release(r))  # see how the request ends
    with httpx.Client(base_url=live.url, timeout=60, trust_env=False) as http:
        body = {"model": "all8", "prompt": "Tell me a long story", "max_tokens": 80, "temperature": 0, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # it is running
        # the connection is closed after one chunk: the request leaves the batch at a later step
        deadline = time.time() + 30
        while engine.busy() and time.time() < deadline:
            time.sleep(0.05)
        assert engine.busy() == 0 and not live.model_server.store.in_use
        engine.on_release = release
        assert released[0].finish_reason == "abort" and len(released[0].generated) < 80  # dropped, not finished
        r = http.post("/v1/completions", json={"model": "all8", "prompt": "hi", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_lru_drops_and_reloads_adapters(workdir):
    server = ModelServer.load(workdir / "base", adapters_root=workdir / "adapters", device="cpu", max_batch_size=2,
                              max_loaded_adapters=2)
    try:
        first = engine_answers(server, [("qv4", PROMPTS[0])])
        engine_answers(server, [("all8", PROMPTS[0])])
        engine_answers(server, [("mlp2", PROMPTS[0])])  # evicts qv4, the least recently used
        assert list(server.store.loaded) == ["all8", "mlp2"] and server.store.loads == 3
        again = engine_answers(server, [("qv4", PROMPTS[0])])  # read from disk again, into all8's slot
        assert server.store.loads == 4 and list(server.store.loaded) == ["mlp2", "qv4"]
        assert again == first
    finally:
        server.engine.shutdown()


def test_load_64_requests_over_8_adapters_with_disconnects(workdir):
    """64 concurrent requests over 8 adapters (4 of them ranks/targets of their own, 4 more copies under other
    names), a quarter of the clients leaving mid-stream: every other request answers exactly as alone."""
    import httpx

    root = workdir / "eight"
    if not root.exists():
        import shutil

        for i, name in enumerate(ADAPTERS):
            shutil.copytree(workdir / "adapters" / name, root / name)
            shutil.copytree(workdir / "adapters" / name, root / f"{name}-copy")
    names = sorted(p.name for p in root.iterdir())
    assert len(names) == 8
    jobs = [(names[i % 8], PROMPTS[i % 3]) for i in range(64)]
    want = expected_engine_root(root, workdir, sorted(set(jobs)))
    server = ModelServer.load(workdir / "base", adapters_root=root, device="cpu", max_batch_size=16,
                              max_loaded_adapters=8)
    released, release = [], server.engine.on_release
    server.engine.on_release = lambda r: (released.append(r.finish_reason), release(r))
    live = LiveServer(server)
    # one client for the 64 threads (a client per request would spend most of the test building SSL contexts)
    http = httpx.Client(base_url=live.url, timeout=120, trust_env=False, limits=httpx.Limits(max_connections=64))
    try:
        def call(i):
            model, prompt = jobs[i]
            body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": N_NEW,
                    "temperature": 0, "stream": True}
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                text = ""
                for line in r.iter_lines():
                    if i % 4 == 3:
                        return None  # this client goes away after the first event
                    if line == "data: [DONE]":
                        return text
                    if line.startswith("data: "):
                        text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            raise AssertionError("no [DONE]")

        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(call, range(64)))
        for i, text in enumerate(results):
            if i % 4 != 3:
                assert text == want[jobs[i]], jobs[i]
        deadline = time.time() + 30
        while server.engine.busy() and time.time() < deadline:
            time.sleep(0.05)
        with httpx.Client(base_url=live.url, timeout=30, trust_env=False) as http:
            health = http.get("/health").json()
        assert health == {"status": "ok", "running": 0, "waiting": 0, "loaded_adapters": health["loaded_adapters"]}
        assert not server.store.in_use and len(released) == 64
        assert 1 <= released.count("abort") <= 16  # clients that left were dropped (some may have finished first)
    finally:
        http.close()
        live.stop()


def expected_engine_root(root, workdir, jobs):
    server = ModelServer.load(workdir / "base", adapters_root=root, device="cpu", max_batch_size=1,
                              max_loaded_adapters=8)
    try:
        return {k: v[0] for k, v in engine_answers(server, jobs).items()}
    finally:
        server.engine.shutdown()


# ------------------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------------------
def test_cli_bad_adapter_is_one_line(workdir):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "lora_lab.serve", "--checkpoint_dir", str(workdir / "base"),
                        "--adapters", f"bad={workdir / 'misfit'}", "--device", "cpu"],
                       capture_output=True, text=True, env=env, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "does not fit the served base model" in lines[0] and "n_embd 48 vs 32" in lines[0]


def test_cli_serves_and_ctrl_c_exits_cleanly(workdir):
    import httpx

    port = free_port()
    key = "test-key-0123456789"
    env = dict(os.environ, PYTHONPATH=ROOT, LORA_LAB_API_KEY=key)
    proc = subprocess.Popen([sys.executable, "-m", "lora_lab.serve", "--checkpoint_dir", str(workdir / "base"),
                             "--adapters", f"qv4={workdir / 'adapters' / 'qv4'}", "--port", str(port),
                             "--device", "cpu", "--max_batch_size", "2", "--shutdown_grace", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 90
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, trust_env=False,
                          headers={"Authorization": f"Bearer {key}"}) as http:
            while True:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            r = http.post("/v1/completions", json={"model": "qv4", "prompt": "Hello", "max_tokens": 4,
                                                   "temperature": 0})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
            # a request still streaming when Ctrl-C arrives
            with http.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "Hello", "stream": True,
                                                              "max_tokens": 80, "temperature": 0}) as r:
                lines = r.iter_lines()
                next(lines)
                proc.send_signal(signal.SIGINT)
                rest = list(lines)  # finished or aborted: the stream ends either way
            assert "data: [DONE]" in rest[-2:], rest  # finished, or aborted after --shutdown_grace: a whole stream
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err and "server stopped" in err and "API keys: 1" in err
        assert key not in err  # never logged
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_render_chat_in_the_adapters_prompt_style():
    from lora_lab.prompts import PromptStyle
    from lora_lab.serve.server import render_chat
    from lora_lab.utils import LoraLabError

    style = PromptStyle.from_name("chatml", default_system="Be brief.")
    one = [{"role": "user", "content": "Hi"}]
    assert render_chat(style, one) == style.apply("Hi")  # what generate/*.py builds for --prompt Hi
    turns = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    assert render_chat(style, turns) == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                         "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                                         "<|im_start|>assistant\n")
    with pytest.raises(LoraLabError, match="end with a user message"):
        render_chat(style, turns[:3])


def test_adapter_saved_by_peft_serves_as_transformers_plus_peft_generates(workdir):
    """An adapter written by PEFT itself (save_pretrained), not by us: the engine's greedy tokens equal those of
    transformers + PEFT generating from the same base weights."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_lab.formats.hf import export_hf

    export_hf(workdir / "base", workdir / "base_hf", dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(workdir / "base_hf", dtype=torch.float32).eval()
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                               use_rslora=True))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    peft_model.save_pretrained(workdir / "peft_native")
    server = ModelServer.load(workdir / "base", {"native": workdir / "peft_native"}, device="cpu", max_batch_size=2)
    try:
        for prompt in PROMPTS[:2]:
            req_ids = server.tokenizer.encode(prompt).tolist()
            done = threading.Event()
            req = server.request("native", lambda kind, _: done.set() if kind != "text" else None, prompt=prompt,
                                 max_tokens=N_NEW, temperature=0.0)
            req.stop_ids = ()  # generate every token, as transformers does below
            server.engine.submit(req)
            assert done.wait(60)
            with torch.no_grad():
                out = peft_model.generate(input_ids=torch.tensor([req_ids]), max_new_tokens=N_NEW, do_sample=False,
                                          min_new_tokens=N_NEW, pad_token_id=0)
            assert req.generated == out[0, len(req_ids):].tolist(), prompt
            with torch.no_grad(), peft_model.disable_adapter():  # the adapter matters: the base answers otherwise
                base = peft_model.generate(input_ids=torch.tensor([req_ids]), max_new_tokens=N_NEW, do_sample=False,
                                           min_new_tokens=N_NEW, pad_token_id=0)
            assert base[0, len(req_ids):].tolist() != req.generated
    finally:
        server.engine.shutdown()
