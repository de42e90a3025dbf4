"""The server on a network (lora_lab/serve, tutorials/serve.md "Serving on a network"): API keys, confined run-time
adapter loading and adapter limits, back-pressure (429 past --max_queue, --timeout, body and max_tokens limits),
/metrics read back with prometheus_client's parser, the unambiguous adapter kinds, per-request random generators,
and a soak test: hundreds of mixed requests, some clients leaving, some refused, that loses nothing and leaks nothing.

The base and adapters are tests/test_serve.py's (a tiny Llama with SmolLM2's tokenizer); everything on 127.0.0.1.
"""

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

import httpx  # noqa: E402
from test_serve import ADAPTERS, N_NEW, PROMPTS, LiveServer, engine_answers  # noqa: E402
from test_use_adapter import make_adapter, make_tokenized_base  # noqa: E402

from lora_lab.serve import adapters as adapters_module  # noqa: E402
from lora_lab.serve.adapters import AdapterLimits, PathRefused, confine, open_below, read_adapter  # noqa: E402
from lora_lab.serve.app import ServeOptions  # noqa: E402
from lora_lab.serve.server import ModelServer  # noqa: E402
from lora_lab.utils import LoraLabError  # noqa: E402

KEYS = ("key-one-0123456789", "key-two-9876543210")


@pytest.fixture(scope="module")
def netdir(tmp_path_factory):
    """base/, root/ (the adapters the server may read: qv4, all8, mlp2, dora4, and PEFT's export of qv4),
    outside/ (adapters it must not read, a misfit among them)."""
    tmp = tmp_path_factory.mktemp("serve_net")
    base = make_tokenized_base(tmp / "base")
    for name, (targets, r, extra) in ADAPTERS.items():
        make_adapter(base, tmp / "root" / name, targets, r=r, **extra)
    from lora_lab.formats.peft import export_peft

    export_peft(tmp / "root" / "qv4", tmp / "root" / "peft_qv4")
    shutil.copytree(tmp / "root" / "qv4", tmp / "outside" / "qv4")
    other = make_tokenized_base(tmp / "other", name="other", n_embd=48, block_size=64, prompt_style="plain")
    make_adapter(other, tmp / "outside" / "misfit", ["query"])
    return tmp


def load(netdir, **kw):
    kw = {"device": "cpu", "max_batch_size": 4, "max_loaded_adapters": 6, "adapters_root": netdir / "root", **kw}
    return ModelServer.load(netdir / "base", **kw)


@pytest.fixture
def reads(monkeypatch):
    """Every adapter file the server inspects or reads, as (function, arguments) (refused paths are never touched)."""
    seen = []
    for name in ("adapter_kind", "safe_open", "load_file", "_read_config"):
        real = getattr(adapters_module, name)

        def spy(*a, _real=real, _name=name, **kw):
            seen.append((_name, " ".join(map(str, a))))
            return _real(*a, **kw)

        monkeypatch.setattr(adapters_module, name, spy)
    return seen


def post(http, path, **body):
    return http.post(path, json=body)


# ------------------------------------------------------------------------------------------------------------
# Keys
# ------------------------------------------------------------------------------------------------------------
def test_api_keys(netdir):
    import openai

    live = LiveServer(load(netdir), ServeOptions(api_keys=KEYS))
    try:
        with httpx.Client(base_url=live.url, timeout=60, trust_env=False) as http:
            assert http.get("/health").json() == {"status": "ok", "running": 0, "waiting": 0}  # open, no names
            for path in ("/v1/models", "/metrics"):
                r = http.get(path)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
                assert r.json() == {"error": {"message": r.json()["error"]["message"], "type":
                                              "invalid_request_error", "param": None, "code": None}}
                assert "API key" in r.json()["error"]["message"]
            wrong = "key-one-0123456780"  # one character off
            r = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi"},
                          headers={"Authorization": f"Bearer {wrong}"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert wrong not in r.text and KEYS[0] not in r.text  # never echoed
            r = http.get("/v1/models", headers={"Authorization": f"Basic {KEYS[0]}"})  # not Bearer
            assert r.status_code == 401
            r = http.get("/metrics", headers={"Authorization": f"Bearer {KEYS[1]}"})
            assert r.status_code == 200
        with pytest.raises(openai.AuthenticationError):
            live.client(api_key="sk-nope").models.list()
        for key in KEYS:  # the openai client's api_key= works unchanged, with either key
            r = live.client(api_key=key).completions.create(model="qv4", prompt="Hello", max_tokens=3, temperature=0)
            assert r.usage.completion_tokens <= 3
    finally:
        live.stop()


def test_api_keys_from_the_command_line_and_environment(monkeypatch):
    from lora_lab.serve.__main__ import api_keys, parse_args

    monkeypatch.setenv("LORA_LAB_API_KEY", f"{KEYS[0]}, {KEYS[1]}")
    args = parse_args(["--checkpoint_dir", "x", "--api_key", "key-three-abcdefgh"])
    assert api_keys(args) == ("key-three-abcdefgh",) + KEYS
    monkeypatch.setenv("LORA_LAB_API_KEY", "short")
    with pytest.raises(LoraLabError, match="at least 8 characters"):
        api_keys(args)
    options = ServeOptions(api_keys=("key-three-abcdefgh",), public_paths=("/health", "/static/"))
    assert "key-three" not in repr(options)
    assert options.key_ok(b"key-three-abcdefgh") and not options.key_ok(b"key-three-abcdefg")
    assert options.is_public("/health") and options.is_public("/static/app.js")
    assert not options.is_public("/healthz") and not options.is_public("/static") and not options.is_public("/")


# ------------------------------------------------------------------------------------------------------------
# Confined adapter loading
# ------------------------------------------------------------------------------------------------------------
def test_runtime_loading_is_off_by_default(netdir, reads):
    server = load(netdir)
    live = LiveServer(server)
    try:
        with httpx.Client(base_url=live.url, timeout=60, trust_env=False) as http:
            r = post(http, "/v1/load_lora_adapter", lora_name="x", lora_path="qv4")
            assert r.status_code == 403 and "--allow_runtime_loading" in r.json()["error"]["message"]
            assert post(http, "/v1/unload_lora_adapter", lora_name="qv4").status_code == 403
            # the root's adapters at start are served (read on first use) ...
            assert post(http, "/v1/completions", model="all8", prompt="hi", max_tokens=2).status_code == 200
            # ... but a folder that appears after start is not loaded on first use
            shutil.copytree(netdir / "root" / "qv4", netdir / "root" / "late")
            try:
                r = post(http, "/v1/completions", model="late", prompt="hi", max_tokens=2)
                assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            finally:
                shutil.rmtree(netdir / "root" / "late")
        assert not any("late" in args for _, args in reads)
    finally:
        live.stop()


def test_runtime_loading_only_below_the_root(netdir, reads):
    (netdir / "root" / "escape").symlink_to(netdir / "outside" / "qv4")  # a symlink out of the root
    sneaky = netdir / "root" / "sneaky"  # a real folder in the root whose weights file links out
    sneaky.mkdir()
    shutil.copy(netdir / "root" / "qv4" / "lora_config.json", sneaky)
    (sneaky / "lora.safetensors").symlink_to(netdir / "outside" / "qv4" / "lora.safetensors")
    server = load(netdir, allow_runtime_loading=True)
    live = LiveServer(server)
    try:
        with httpx.Client(base_url=live.url, timeout=60, trust_env=False) as http:
            refused = []
            for path in ["../outside/qv4", str(netdir / "outside" / "qv4"), str(netdir / "outside" / "nothing"),
                         "qv4/../../outside/qv4", "escape", "/etc", str(netdir / "root"), ".", "sneaky"]:
                r = post(http, "/v1/load_lora_adapter", lora_name="x", lora_path=path)
                assert r.status_code == 403, (path, r.text)
                refused.append(r.json()["error"]["message"])
                assert "outside" not in r.text and "nothing" not in r.text
            # one answer, whether the path exists or not (the weights link of `sneaky` gets it too)
            assert len(set(refused)) == 1, refused
            assert not any("outside" in args or args.endswith("/etc") for _, args in reads), reads
            assert "escape" not in server.store.names()  # and not served by its folder name either
            r = post(http, "/v1/completions", model="escape", prompt="hi", max_tokens=2)
            assert r.status_code == 404
            # inside the root: loaded, relative or absolute
            r = post(http, "/v1/load_lora_adapter", lora_name="mine", lora_path="peft_qv4")
            assert r.status_code == 200, r.text
            r = post(http, "/v1/load_lora_adapter", lora_name="mine2", lora_path=str(netdir / "root" / "dora4"))
            assert r.status_code == 200, r.text
            r = post(http, "/v1/load_lora_adapter", lora_name="none", lora_path="no_such_adapter")
            assert r.status_code == 400  # below the root: saying it is not there reveals nothing outside
            a = post(http, "/v1/completions", model="mine", prompt="Hello there", max_tokens=N_NEW, temperature=0)
            b = post(http, "/v1/completions", model="qv4", prompt="Hello there", max_tokens=N_NEW, temperature=0)
            assert a.json()["choices"][0]["text"] == b.json()["choices"][0]["text"]
            assert post(http, "/v1/unload_lora_adapter", lora_name="mine").status_code == 200
    finally:
        live.stop()
        (netdir / "root" / "escape").unlink()
        shutil.rmtree(sneaky)


def test_confine_resolves_before_reading(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    (root / "link").symlink_to(tmp_path / "out")
    (root / "loop").symlink_to(root / "loop")
    assert confine(root, "a") == (root / "a").resolve()
    assert confine(root, str(root / "a" / ".." / "a")) == (root / "a").resolve()
    for bad in ["..", "../out", str(tmp_path / "out"), "link", "link/x", "a/../../out", "", "loop", "a\0b"]:
        with pytest.raises(PathRefused, match="below the server's --adapters_root"):
            confine(root, bad)
    # what confine passed is then opened without following symlinks: one swapped in after the check cannot lead out
    (root / "a" / "w.safetensors").write_text("inside")
    (tmp_path / "out" / "secret").write_text("outside")
    checked = confine(root, "a/w.safetensors")
    with open_below(root, checked) as readable:
        assert readable.read_text() == "inside"
    (root / "a" / "w.safetensors").unlink()
    (root / "a" / "w.safetensors").symlink_to(tmp_path / "out" / "secret")  # the swap
    with pytest.raises(PathRefused):
        with open_below(root, checked):
            pass
    shutil.rmtree(root / "a")
    (root / "a").symlink_to(tmp_path / "out")  # a directory swapped for a link
    with pytest.raises(PathRefused):
        with open_below(root, checked):
            pass


def test_adapter_limits_and_another_base_refused_before_the_tensors_are_read(netdir, reads, tmp_path):
    from lora_lab.checkpoint import load_config

    config = load_config(netdir / "base")
    with pytest.raises(LoraLabError, match="rank 8, more than this server's --max_lora_rank 4"):
        read_adapter("all8", netdir / "root" / "all8", config, AdapterLimits(max_lora_rank=4))
    with pytest.raises(LoraLabError, match=r"MB, more than this server's --max_adapter_mb 0.001"):
        read_adapter("qv4", netdir / "root" / "qv4", config, AdapterLimits(max_adapter_mb=0.001))
    with pytest.raises(LoraLabError, match="does not fit the served base model.*n_embd 48 vs 32"):
        read_adapter("misfit", netdir / "outside" / "misfit", config)
    liar = tmp_path / "liar"  # a PEFT config that says r 1 over rank-4 tensors: the header's shapes decide
    shutil.copytree(netdir / "root" / "peft_qv4", liar)
    pc = json.loads((liar / "adapter_config.json").read_text())
    (liar / "adapter_config.json").write_text(json.dumps(dict(pc, r=1)))
    with pytest.raises(LoraLabError, match="rank 4 at .*more than this server's --max_lora_rank 2"):
        read_adapter("liar", liar, config, AdapterLimits(max_lora_rank=2))
    assert not any(fn == "load_file" for fn, _ in reads)  # no tensor read for any of them
    assert not any(fn == "safe_open" and "misfit" in args for fn, args in reads)  # its config said enough
    a = read_adapter("qv4", netdir / "root" / "qv4", config, AdapterLimits(max_adapter_mb=1, max_lora_rank=4))
    assert a.r == 4 and a.modules


def test_adapter_kinds_are_told_apart_in_one_place(netdir, tmp_path):
    from lora_lab.adapted import adapter_kind

    assert adapter_kind(netdir / "root" / "qv4") == "lora"
    assert adapter_kind(netdir / "root" / "peft_qv4") == "peft"
    assert adapter_kind(netdir / "base") == "full"
    assert adapter_kind(tmp_path) is None and adapter_kind(tmp_path / "missing") is None
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "adapter_config.json").write_text(json.dumps({"adapter_version": 2}))
    assert adapter_kind(tmp_path / "llama") == "adapter"
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert adapter_kind(tmp_path / "peft") == "peft"  # its weights not there yet: the config says
    # its users: evaluate, the GGUF exporter (and the server, above) tell the same kinds apart
    from lora_lab.evaluate.load import adapter_kind as evaluate_kind
    from lora_lab.formats.gguf_adapter import write_gguf_adapter

    assert evaluate_kind(netdir / "root" / "qv4") == "lora" and evaluate_kind(tmp_path / "llama") == "adapter"
    with pytest.raises(LoraLabError, match="is a PEFT adapter"):
        evaluate_kind(netdir / "root" / "peft_qv4")
    with pytest.raises(LoraLabError, match="is a LLaMA-Adapter"):
        write_gguf_adapter(tmp_path / "llama", tmp_path / "x.gguf")


# ------------------------------------------------------------------------------------------------------------
# Limits and back-pressure
# ------------------------------------------------------------------------------------------------------------
def test_429_past_the_queue_with_retry_after(netdir):
    import openai

    server = load(netdir, max_batch_size=1, max_queue=1, start=False)  # the engine waits: nothing moves
    live = LiveServer(server)
    try:
        with ThreadPoolExecutor(2) as pool:
            def call(_):
                with httpx.Client(base_url=live.url, timeout=60, trust_env=False) as http:
                    return post(http, "/v1/completions", model="qv4", prompt="Hello", max_tokens=3, temperature=0)

            accepted = [pool.submit(call, i) for i in range(2)]  # one for the batch, one waiting
            deadline = time.time() + 30
            while len(server.engine.waiting) < 2:
                assert time.time() < deadline
                time.sleep(0.02)
            with httpx.Client(base_url=live.url, timeout=60, trust_env=False) as http:
                r = post(http, "/v1/completions", model="qv4", prompt="Hello", max_tokens=3)
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "rate_limit_exceeded" and r.json()["error"]["type"] == "requests"
            with pytest.raises(openai.RateLimitError):
                live.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
            assert server.store.in_use == {"qv4": 2}  # the refused requests took no adapter slot
            server.engine.start()
            for f in accepted:
                assert f.result(timeout=60).status_code == 200
    finally:
        live.stop()
    assert server.engine.busy() == 0 and not server.store.in_use


def test_body_size_and_max_tokens_limits(netdir):
    live = LiveServer(load(netdir), ServeOptions(max_body_bytes=2000, max_tokens_limit=8))
    try:
        with httpx.Client(base_url=live.url, timeout=60, trust_env=False) as http:
            r = post(http, "/v1/completions", model="tiny", prompt="word " * 500)
            assert r.status_code == 413 and "2000 bytes" in r.json()["error"]["message"]
            big = json.dumps({"model": "tiny", "prompt": "word " * 500}).encode()
            r = http.post("/v1/completions", content=iter([big[:1000], big[1000:]]),  # chunked: no Content-Length
                          headers={"Content-Type": "application/json"})
            assert r.status_code == 413
            small = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2}).encode()
            r = http.post("/v1/completions", content=iter([small[:10], small[10:]]),
                          headers={"Content-Type": "application/json"})
            assert r.status_code == 200, r.text
            r = post(http, "/v1/completions", model="tiny", prompt="hi", max_tokens=9)
            assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens" and "8" in r.text
            r = post(http, "/v1/chat/completions", model="tiny", messages=[{"role": "user", "content": "hi"}],
                     temperature=0)  # no max_tokens: the limit, not the context
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 8
    finally:
        live.stop()


def test_timeout_ends_the_request_and_frees_its_row(netdir):
    server = load(netdir, max_batch_size=1, timeout=30.0, start=False)
    events = {}

    def submit(model, tag):
        req = server.request(model, lambda kind, payload: events.setdefault(tag, []).append((kind, payload)),
                             prompt="Hello", max_tokens=50, temperature=0.0)
        server.engine.submit(req)
        return req

    running, waiting = submit("qv4", "running"), submit("all8", "waiting")
    server.engine.step()  # `running` takes the only row, `waiting` waits
    assert server.engine.rows == [running] and list(server.engine.waiting) == [waiting]
    running.submit_time -= 60
    waiting.submit_time -= 60  # both arrived a minute ago
    server.engine.step()
    for tag, req in (("running", running), ("waiting", waiting)):
        assert events[tag][-1][0] == "error" and "--timeout of 30 s" in events[tag][-1][1]
        assert req.finish_reason == "timeout"
    assert server.engine.busy() == 0 and not server.store.in_use and server.engine.finished == {"timeout": 2}
    # over HTTP: 503 with code "timeout" (a stream gets an error event), and the server goes on
    live = LiveServer(server)
    try:
        with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=live.url, timeout=60, trust_env=False) as http:
            late = pool.submit(post, http, "/v1/completions", model="tiny", prompt="Hello", max_tokens=5)
            deadline = time.time() + 30
            while not server.engine.waiting:
                assert time.time() < deadline
                time.sleep(0.02)
            server.engine.waiting[0].submit_time -= 60
            server.engine.step()  # (the engine thread is not started: the test steps it)
            r = late.result(timeout=60)
            assert r.status_code == 503 and r.json()["error"]["code"] == "timeout"
            assert "--timeout of 30 s" in r.json()["error"]["message"]
    finally:
        live.stop()


def test_unseeded_sampling_leaves_the_global_rng_alone(netdir):
    server = load(netdir)
    try:
        torch.manual_seed(123)
        expected = torch.rand(3)
        torch.manual_seed(123)
        got = engine_answers(server, [("qv4", PROMPTS[0]), ("tiny", PROMPTS[1])], temperature=1.0)
        assert torch.equal(torch.rand(3), expected) and len(got) == 2
        a = engine_answers(server, [("qv4", PROMPTS[1])], temperature=1.0, seed=5)
        b = engine_answers(server, [("qv4", PROMPTS[1])], temperature=1.0, seed=5)
        assert a == b  # seeded: reproducible
    finally:
        server.engine.shutdown()


# ------------------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------------------
def scrape(http) -> dict:
    """{(name, labels as a sorted tuple): value} of every sample of /metrics, through prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_move_with_requests(netdir):
    pytest.importorskip("prometheus_client")
    server = load(netdir, max_loaded_adapters=1)
    live = LiveServer(server)
    try:
        with httpx.Client(base_url=live.url, timeout=60, trust_env=False) as http:
            before = scrape(http)
            tokens = 0
            for model in ("qv4", "all8", "qv4"):  # one slot: all8 evicts qv4, then qv4 evicts all8
                r = post(http, "/v1/completions", model=model, prompt="Hello", max_tokens=4, temperature=0)
                tokens += r.json()["usage"]["completion_tokens"]
            body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200 and "data: [DONE]" in list(r.iter_lines())
            post(http, "/v1/completions", model="nope", prompt="Hello")
            after = scrape(http)

        def moved(name, **labels):
            key = (name, tuple(sorted(labels.items())))
            return after.get(key, 0) - before.get(key, 0)

        assert moved("lora_lab_requests_total", model="qv4", status="200") == 2
        assert moved("lora_lab_requests_total", model="all8", status="200") == 1
        assert moved("lora_lab_requests_total", model="tiny", status="200") == 1
        assert moved("lora_lab_requests_total", model="none", status="404") == 1  # unknown names are no label
        generated = moved("lora_lab_generated_tokens_total")
        assert generated >= tokens + 1
        assert moved("lora_lab_time_to_first_token_seconds_count") == 4
        assert moved("lora_lab_time_per_output_token_seconds_count") == generated - 4  # every token but the first
        assert moved("lora_lab_request_duration_seconds_count", finish_reason="length") == 4
        assert moved("lora_lab_adapters_loaded_total") == 3 and moved("lora_lab_adapters_evicted_total") == 2
        assert after[("lora_lab_queue_length", ())] == 0 and after[("lora_lab_running_rows", ())] == 0
        assert after[("lora_lab_adapters_in_memory", ())] == 1
        assert after[("lora_lab_time_to_first_token_seconds_sum", ())] > 0
    finally:
        live.stop()


# ------------------------------------------------------------------------------------------------------------
# Soak: hundreds of mixed requests, some leaving, some refused; nothing lost, nothing leaked
# ------------------------------------------------------------------------------------------------------------
def rss_mb() -> float:
    """Resident memory, after the garbage collector and glibc's malloc_trim hand back what is free."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


SOAK_REQUESTS, SOAK_CLIENTS = 400, 16  # 16 clients against 6 rows + 4 waiting: some are refused
BACKOFF = 0.5  # a refused client waits before its next request (Retry-After says 1 s; scaled down for the test)
RSS_MARGIN_MB = 40  # resident memory after the soak, against after a warm-up round of the same requests


def soak_call(http, i, model, prompt):
    """One client: kind of request by i. Returns ("ok", text) | ("429", None) | ("left", None)."""
    stream, leaves, chat = i % 2 == 0, i % 10 == 4, i % 3 != 0
    body = {"model": model, "max_tokens": N_NEW, "temperature": 0, "stream": stream}
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if not stream:
        r = http.post(path, json=body)
        if r.status_code == 429:
            assert r.headers["retry-after"] and r.json()["error"]["code"] == "rate_limit_exceeded"
            time.sleep(BACKOFF)
            return "429", None
        assert r.status_code == 200, r.text
        c = r.json()["choices"][0]
        return "ok", c["message"]["content"] if chat else c["text"]
    with http.stream("POST", path, json=body) as r:
        if r.status_code == 429:
            r.read()
            assert r.headers["retry-after"] and json.loads(r.text)["error"]["code"] == "rate_limit_exceeded"
            time.sleep(BACKOFF)
            return "429", None
        assert r.status_code == 200
        text = ""
        for line in r.iter_lines():
            if leaves:
                return "left", None  # gone after the first event
            if line == "data: [DONE]":
                return "ok", text
            if line.startswith("data: "):
                c = json.loads(line[6:])["choices"][0]
                text += (c["delta"].get("content") or "") if chat else c["text"]
    raise AssertionError("no [DONE]")


@pytest.mark.slow
def test_soak_mixed_requests_lose_nothing_and_leak_nothing(netdir):
    models = ["tiny", "qv4", "all8", "mlp2", "dora4", "peft_qv4"]
    jobs = [(models[i % len(models)], PROMPTS[(i // len(models)) % len(PROMPTS)]) for i in range(SOAK_REQUESTS)]
    # the reference: each (model, prompt, chat or not) alone, greedy, on an engine of one row
    ref = load(netdir, max_batch_size=1)
    try:
        want = {}
        for model, prompt in sorted(set(jobs)):
            for chat in (True, False):
                done, parts = threading.Event(), []

                def on_event(kind, payload, done=done, parts=parts):
                    parts.append(payload) if kind == "text" else done.set()

                req = ref.request(model, on_event,
                                  **({"messages": [{"role": "user", "content": prompt}]} if chat else
                                     {"prompt": prompt}), max_tokens=N_NEW, temperature=0.0)
                ref.engine.submit(req)
                assert done.wait(60)
                want[(model, prompt, chat)] = "".join(parts)
    finally:
        ref.engine.shutdown()

    server = load(netdir, max_batch_size=6, max_queue=4, max_loaded_adapters=5)
    live = LiveServer(server)
    t0 = time.perf_counter()
    try:
        limits = httpx.Limits(max_connections=SOAK_CLIENTS, max_keepalive_connections=SOAK_CLIENTS)
        http = httpx.Client(base_url=live.url, timeout=120, trust_env=False, limits=limits)

        def run(n):
            with ThreadPoolExecutor(SOAK_CLIENTS) as pool:
                return list(pool.map(lambda i: soak_call(http, i, *jobs[i]), range(n)))

        run(36)  # warm-up: allocator, caches, every adapter loaded once
        rss_before, finished_before = rss_mb(), dict(server.engine.finished)
        results = run(SOAK_REQUESTS)
        deadline = time.time() + 30
        while server.engine.busy() and time.time() < deadline:
            time.sleep(0.05)
        rss_after = rss_mb()
        http.close()
        kinds = [k for k, _ in results]
        for i, (kind, text) in enumerate(results):
            if kind == "ok":
                model, prompt = jobs[i]
                assert text == want[(model, prompt, i % 3 != 0)], (i, jobs[i])
        n_ok, n_429, n_left = kinds.count("ok"), kinds.count("429"), kinds.count("left")
        assert n_ok + n_429 + n_left == SOAK_REQUESTS and n_ok >= SOAK_REQUESTS // 5
        assert n_429 > 0, "the queue limit was never reached: raise SOAK_CLIENTS"
        assert n_left > 0
        # no slot, row or cache row leaked: the engine's counters are back at zero
        engine = server.engine
        assert engine.busy() == 0 and not engine.rows and not engine.waiting and not engine.lengths
        assert not server.store.in_use and len(server.store.loaded) <= 5
        done = {k: engine.finished.get(k, 0) - finished_before.get(k, 0) for k in engine.finished}
        assert sum(done.values()) == n_ok + n_left and done.get("error", 0) == 0  # every accepted one ended once
        assert rss_after - rss_before < RSS_MARGIN_MB, (rss_before, rss_after)
        print(f"soak: {SOAK_REQUESTS} requests ({n_ok} answered, {n_429} refused with 429, {n_left} clients left) "
              f"in {time.perf_counter() - t0:.1f} s; RSS {rss_before:.0f} -> {rss_after:.0f} MB")
    finally:
        live.stop()


def test_bench_serve_load_tiny(capsys):
    """benchmarks/bench_serve_load.py on its tiny model: a row per concurrency level, the over-full level refused
    with 429 and still answering every request."""
    import sys

    from conftest import ROOT, require_asset

    require_asset("models/smollm2-135m-instruct")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_serve_load

    rows = bench_serve_load.main(model="tiny", concurrency=[1, 6], requests=8, new_tokens=4, adapters=2,
                                 max_batch_size=2, max_queue=0)
    out = capsys.readouterr().out
    assert "| clients | req/s | p50 (s) | p99 (s) |" in out
    assert [r["concurrency"] for r in rows] == [1, 6] and rows[0]["refused"] == 0 and rows[1]["refused"] > 0
    for r in rows:
        assert r["req_s"] > 0 and 0 < r["p50"] <= r["p99"] and r["tok_s"] == pytest.approx(4 * r["req_s"])
