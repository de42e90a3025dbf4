"""The efficiency challenge's HTTP API (lora_lab/serve/challenge.py, `--challenge_api`) and logprobs on the OpenAI
routes: /process against generate/lora.py and against the evaluator's log-likelihood, /tokenize and /decode
against the tokenizer, the challenge's defaults, bad fields, and challenge requests mixed with OpenAI ones.

A tiny random Llama (weights x3: no near-ties in greedy decoding) with SmolLM2's real tokenizer and one adapter,
served by uvicorn on 127.0.0.1.
"""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_serve import LiveServer  # noqa: E402
from test_use_adapter import make_adapter, make_tokenized_base, run_in_process  # noqa: E402

from lora_lab.serve.server import ModelServer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["Question: what is 2 + 3?\nAnswer:", "The capital of France is", "Once upon a time"]
N_NEW = 8


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("challenge")
    make_tokenized_base(tmp / "base")
    make_adapter(tmp / "base", tmp / "qv4", ["query", "value"], r=4, prompt_style="chatml")
    return tmp


class Live(LiveServer):
    """create_app(server) plus the challenge's router, served as test_serve's LiveServer serves the app."""

    def __init__(self, server, model) -> None:
        from lora_lab.serve.app import create_app
        from lora_lab.serve.challenge import challenge_router

        app = create_app(server)
        app.include_router(challenge_router(server, model))
        super().__init__(server, app=app)
        self.server = server
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def post(self, path, body):
        return self.http.post(path, json=body)

    def stop(self) -> None:
        self.http.close()
        super().stop()


@pytest.fixture(scope="module")
def live(workdir):
    server = ModelServer.load(workdir / "base", {"qv4": workdir / "qv4"}, device="cpu", max_batch_size=6)
    live = Live(server, "qv4")
    yield live
    live.stop()


def generate_lora(workdir, capsys, monkeypatch, prompt):
    """What generate/lora.py prints for the raw prompt (--prompt_style plain), greedy."""
    from generate.lora import main

    result = run_in_process(main, "--adapter_dir", workdir / "qv4", "--prompt", prompt, "--prompt_style", "plain",
                            "--max_new_tokens", N_NEW, "--temperature", 0, "--device", "cpu",
                            capsys=capsys, monkeypatch=monkeypatch)
    assert result.returncode == 0, result.stderr
    return result.stdout[:-1]


def evaluator_loglikelihood(workdir, pairs):
    """lora_lab.evaluate's log p(continuation | context) for the adapter (lm-eval's loglikelihood request)."""
    from types import SimpleNamespace

    from lora_lab.evaluate.lm_eval_model import LoraLabLM
    from lora_lab.evaluate.load import load_model

    loaded = load_model(workdir / "base", workdir / "qv4", device="cpu")
    lm = LoraLabLM(loaded.model, loaded.tokenizer, progress=False)
    return [lp for lp, _ in lm.loglikelihood([SimpleNamespace(args=p) for p in pairs])]


def test_process_greedy_equals_generate_lora_and_its_logprob_the_evaluators(live, workdir, capsys, monkeypatch):
    answers = [live.post("/process", {"prompt": p, "max_new_tokens": N_NEW, "temperature": 0}) for p in PROMPTS]
    for a in answers:
        assert a.status_code == 200, a.text
    answers = [a.json() for a in answers]
    for prompt, a in zip(PROMPTS, answers):
        assert a["text"] == generate_lora(workdir, capsys, monkeypatch, prompt)
        assert "".join(t["text"] for t in a["tokens"]) == a["text"]
        assert a["logprob"] == pytest.approx(sum(t["logprob"] for t in a["tokens"]), abs=1e-9)
        for t in a["tokens"]:  # greedy: the top token is the one chosen
            assert list(t["top_logprob"].items()) == [(t["text"], pytest.approx(t["logprob"], abs=1e-6))]
        assert a["request_time"] > 0
    expected = evaluator_loglikelihood(workdir, [(p, a["text"]) for p, a in zip(PROMPTS, answers)])
    for a, ll in zip(answers, expected):
        assert a["logprob"] == pytest.approx(ll, abs=1e-4)
        assert a["logprob"] < -0.01  # a real sum, not zeros
    echo = live.post("/process", {"prompt": PROMPTS[1], "max_new_tokens": N_NEW, "temperature": 0,
                                  "echo_prompt": True}).json()
    assert echo["text"] == PROMPTS[1] + answers[1]["text"] and echo["logprob"] == pytest.approx(answers[1]["logprob"])


def test_process_defaults_sample_50_tokens_reproducibly(live):
    from lora_lab.serve.challenge import ProcessRequest, TokenizeRequest

    d = ProcessRequest(prompt="x")
    assert (d.num_samples, d.max_new_tokens, d.top_k, d.temperature, d.seed, d.echo_prompt) == (1, 50, 200, 0.8,
                                                                                               None, False)
    t = TokenizeRequest(text="x")
    assert (t.truncation, t.max_length) == (True, 2048)
    a, b, c = (live.post("/process", {"prompt": "Once", "seed": s}).json() for s in (7, 7, 8))
    assert a["text"] == b["text"] and a["logprob"] == b["logprob"]  # seeded
    assert len(a["tokens"]) <= 50 and a["text"] != c["text"]
    greedy = live.post("/process", {"prompt": "Once", "temperature": 0}).json()
    assert a["text"] != greedy["text"]  # 0.8 samples
    helm_greedy = live.post("/process", {"prompt": "Once", "temperature": 1e-7, "stop_sequences": []}).json()
    assert helm_greedy["text"] == greedy["text"]


def test_tokenize_and_decode(live):
    tok = live.server.tokenizer
    text = "Hello world, the efficiency challenge: 24 h on one GPU. ünïcödé ✓"
    got = live.post("/tokenize", {"text": text}).json()
    assert got["tokens"] == tok.encode(text).tolist() and got["request_time"] >= 0
    assert live.post("/tokenize", {"text": text, "max_length": 3}).json()["tokens"] == tok.encode(text).tolist()[:3]
    assert live.post("/tokenize", {"text": text, "max_length": 3, "truncation": False}).json()["tokens"] == \
        got["tokens"]
    assert live.post("/decode", {"tokens": got["tokens"]}).json()["text"] == text
    assert live.post("/decode", {"tokens": []}).json()["text"] == ""


@pytest.mark.parametrize("path,body,field", [
    ("/process", {}, "prompt"),
    ("/process", {"prompt": 3}, "prompt"),
    ("/process", {"prompt": "a", "max_new_tokens": 0}, "max_new_tokens"),
    ("/process", {"prompt": "a", "temperature": -1}, "temperature"),
    ("/process", {"prompt": "a", "num_samples": 2}, "num_samples"),
    ("/process", {"prompt": "a", "top_k": 0}, "top_k"),
    ("/process", {"prompt": "word " * 200}, "prompt"),  # longer than the context
    ("/tokenize", {"text": "a", "max_length": 0}, "max_length"),
    ("/tokenize", {}, "text"),
    ("/decode", {"tokens": ["a"]}, "tokens"),
    ("/decode", {"tokens": [1, 10 ** 9]}, "tokens.1"),
])
def test_bad_fields_are_400_naming_the_field(live, path, body, field):
    r = live.post(path, body)
    assert r.status_code == 400, r.text
    assert field in r.text
    assert live.post("/decode", {"tokens": [1, 2]}).status_code == 200  # still serving


def test_openai_logprobs_and_stream_refusal(live):
    prompt = PROMPTS[0]
    ref = live.post("/process", {"prompt": prompt, "max_new_tokens": N_NEW, "temperature": 0}).json()
    c = live.post("/v1/completions", {"model": "qv4", "prompt": prompt, "max_tokens": N_NEW, "temperature": 0,
                                      "logprobs": 3}).json()["choices"][0]
    assert c["text"] == ref["text"]
    lp = c["logprobs"]
    assert "".join(lp["tokens"]) == c["text"] and sum(lp["token_logprobs"]) == pytest.approx(ref["logprob"])
    assert all(len(top) == 3 and max(top.values()) == pytest.approx(v) for top, v in
               zip(lp["top_logprobs"], lp["token_logprobs"]))
    assert lp["text_offset"][0] == 0
    chat = live.post("/v1/chat/completions", {"model": "qv4", "messages": [{"role": "user", "content": "Hi"}],
                                              "max_tokens": N_NEW, "temperature": 0, "logprobs": True,
                                              "top_logprobs": 2}).json()["choices"][0]
    content = chat["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == chat["message"]["content"]
    assert all(t["top_logprobs"][0]["token"] == t["token"] and len(t["top_logprobs"]) == 2 for t in content)
    plain = live.post("/v1/completions", {"model": "qv4", "prompt": prompt, "max_tokens": 2}).json()
    assert plain["choices"][0]["logprobs"] is None
    r = live.post("/v1/completions", {"model": "qv4", "prompt": prompt, "logprobs": 1, "stream": True})
    assert r.status_code == 400 and "logprobs" in r.text


def test_concurrent_challenge_and_openai_requests(live):
    jobs = [("process", p) for p in PROMPTS] + [("openai", p) for p in PROMPTS] + [("process", PROMPTS[0])] * 2

    def one(job):
        kind, prompt = job
        if kind == "process":
            r = live.post("/process", {"prompt": prompt, "max_new_tokens": N_NEW, "temperature": 0})
            return r.json()["text"]
        r = live.post("/v1/completions", {"model": "qv4", "prompt": prompt, "max_tokens": N_NEW, "temperature": 0})
        return r.json()["choices"][0]["text"]

    alone = {p: one(("process", p)) for p in PROMPTS}
    steps = live.server.engine.steps
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(one, jobs))
    assert got == [alone[p] for _, p in jobs]
    assert live.server.engine.steps - steps < len(jobs) * N_NEW  # they shared batches
    deadline = time.time() + 10  # the engine frees a row just after the request's answer went out
    while live.server.engine.rows and time.time() < deadline:
        time.sleep(0.01)
    assert not live.server.engine.rows


def test_challenge_model_must_be_served(workdir):
    from lora_lab.serve.__main__ import parse_args
    from lora_lab.serve.challenge import challenge_router
    from lora_lab.utils import LoraLabError

    args = parse_args(["--checkpoint_dir", "x", "--challenge_api"])
    assert args.challenge_api and args.challenge_model is None
    server = ModelServer.load(workdir / "base", device="cpu", max_batch_size=1, start=False)
    with pytest.raises(LoraLabError, match="--challenge_model 'nope'"):
        challenge_router(server, "nope")
    assert challenge_router(server) is not None  # the base by default
