"""Serve one base model with many LoRA adapters over the OpenAI API (`python -m lora_lab.serve`).

    multi_lora.py   the stacked multi-adapter layer: each row of a batch gathers its own adapter's A and B
    adapters.py     reading lora_lab / PEFT adapter directories; the LRU of loaded adapters
    engine.py       continuous batching on a KV cache with one row per request and per-row positions
    server.py       the model, tokenizer, adapters and engine together (used in-process by tests and benchmarks)
    app.py          the FastAPI app: create_app, the guard in front of every route (keys, body size, request
                    counts), /health; the routers below are included there
    openai_api.py   /v1/completions, /v1/chat/completions, /v1/models, adapter (un)loading (an APIRouter)
    metrics.py      /metrics in Prometheus' format
    errors.py       OpenAI's error bodies
    playground.py   the web page at / (static/: plain HTML, CSS, JavaScript) comparing models side by side
    batch.py        batch inference's files (generate/batch.py runs the engine in-process over them)
    __main__.py     the command line (uvicorn)

The HTTP part needs the optional extra `serve` (pip install -e ".[serve]": FastAPI, uvicorn, prometheus_client).
See tutorials/serve.md.
"""
