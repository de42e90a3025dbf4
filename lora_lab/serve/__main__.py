"""Serve a base model and many LoRA adapters over the OpenAI API.

    python -m lora_lab.serve --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --adapters sql=out/finetune/lora-sql chat=out/finetune/lora-chat --adapters_root out/adapters \
        --port 8000

On a network (tutorials/serve.md, "Serving on a network"): LORA_LAB_API_KEY=... (or --api_key), --max_queue,
--max_tokens_limit, --timeout; --allow_runtime_loading lets clients load adapters from below --adapters_root.

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"model": "sql", "messages": [{"role": "user", "content": "List all users"}], "max_tokens": 64}'

Needs the `serve` extra: pip install -e ".[serve]" (FastAPI and uvicorn). See tutorials/serve.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lora_lab.utils import LoraLabError, one_line_errors


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lora_lab.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint_dir", type=Path, required=True, help="the base model (a lora_lab checkpoint)")
    p.add_argument("--adapters", nargs="*", default=[], metavar="NAME=DIR",
                   help="adapters loaded at start: lora_lab or PEFT adapter directories, served under NAME")
    p.add_argument("--adapters_root", type=Path, default=None,
                   help="a folder of adapter directories, each served by its folder name and read on first use")
    p.add_argument("--allow_runtime_loading", action="store_true",
                   help="let clients load adapters (/v1/load_lora_adapter, or a new folder's name) from below "
                        "--adapters_root; off by default")
    p.add_argument("--api_key", action="append", default=None, metavar="KEY",
                   help="require Authorization: Bearer KEY on every route but /health (repeat for several keys; "
                        "or LORA_LAB_API_KEY=KEY1,KEY2, which other users of the machine cannot read in `ps`)")
    p.add_argument("--max_queue", type=int, default=64,
                   help="requests that may wait beyond the running batch; more get HTTP 429 with Retry-After")
    p.add_argument("--max_tokens_limit", type=int, default=None,
                   help="the largest max_tokens a request may ask for (default: the context)")
    p.add_argument("--max_body_kb", type=int, default=1024, help="larger request bodies get HTTP 413")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a request may take from arrival (waiting included) before it ends with an error "
                        "and frees its row")
    p.add_argument("--max_adapter_mb", type=float, default=2048.0,
                   help="larger adapter files are refused before they are read")
    p.add_argument("--max_lora_rank", type=int, default=256, help="adapters of a higher rank are refused")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="nf4: a 4-bit base (adapters stay float)")
    p.add_argument("--nf4_blocksize", type=int, default=None,
                   help="with --quantize nf4: weights per absmax scale (default: what the --adapters' QLoRA configs "
                        "record, else 64 as QLoRA)")
    p.add_argument("--double_quant", type=lambda v: v.lower() in ("1", "true", "yes"), default=None,
                   help="with --quantize nf4: quantize the scales too (default: as the QLoRA adapters, else true)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max_batch_size", type=int, default=16, help="requests decoded together (KV cache rows)")
    p.add_argument("--max_loaded_adapters", type=int, default=8,
                   help="adapters kept loaded; the least recently used are dropped and reloaded when asked for")
    p.add_argument("--max_seq_length", type=int, default=None,
                   help="tokens per request (prompt + completion); default: the model's block_size, at most 2048. "
                        "The KV cache holds max_batch_size x max_seq_length tokens, allocated at start")
    p.add_argument("--shutdown_grace", type=float, default=5.0,
                   help="on Ctrl-C, seconds running requests may take to finish before they are aborted")
    p.add_argument("--challenge_api", action="store_true",
                   help="also serve the NeurIPS 2023 LLM Efficiency Challenge's /process, /tokenize and /decode "
                        "(lora_lab/serve/challenge.py)")
    p.add_argument("--challenge_model", default=None,
                   help="the model /process answers with; default: the first --adapters adapter, else the base")
    p.add_argument("--precision", default=None, help="bf16-true, 16-true or 32-true; default bf16 on a GPU, else 32")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    return p.parse_args(argv)


def parse_adapters(pairs: list[str]) -> dict[str, Path]:
    adapters = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise LoraLabError(f"--adapters {pair!r}: write NAME=DIR")
        if name in adapters:
            raise LoraLabError(f"--adapters: the name {name!r} is given twice")
        adapters[name] = Path(path)
    return adapters


def api_keys(args) -> tuple[str, ...]:
    """--api_key values and LORA_LAB_API_KEY's comma-separated ones."""
    keys = list(args.api_key or []) + [k.strip() for k in os.environ.get("LORA_LAB_API_KEY", "").split(",")]
    keys = tuple(dict.fromkeys(k for k in keys if k))
    if any(len(k) < 8 for k in keys):
        raise LoraLabError("an API key must have at least 8 characters (e.g. python -c 'import secrets; "
                           "print(secrets.token_urlsafe(32))')")
    return keys


def main(argv=None) -> None:
    args = parse_args(argv)
    with one_line_errors():
        try:
            import uvicorn

            from lora_lab.serve.app import ServeOptions, create_app
        except ImportError as e:
            raise LoraLabError(f"the server needs FastAPI and uvicorn ({e}): pip install -e '.[serve]'") from None
        from lora_lab.checkpoint import load_config
        from lora_lab.serve.adapters import AdapterLimits
        from lora_lab.serve.server import ModelServer

        adapters = parse_adapters(args.adapters)
        options = ServeOptions(api_keys(args), max_body_bytes=args.max_body_kb * 1024,
                               max_tokens_limit=args.max_tokens_limit)
        config = load_config(args.checkpoint_dir)  # one line if it is not a checkpoint, before any loading
        max_seq_length = args.max_seq_length or min(config.block_size, 2048)
        server = ModelServer.load(args.checkpoint_dir, adapters, args.adapters_root, args.quantize, args.precision,
                                  args.device, args.max_batch_size, args.max_loaded_adapters, max_seq_length,
                                  nf4_blocksize=args.nf4_blocksize, double_quant=args.double_quant,
                                  allow_runtime_loading=args.allow_runtime_loading,
                                  limits=AdapterLimits(args.max_adapter_mb, args.max_lora_rank),
                                  max_queue=args.max_queue, timeout=args.timeout)
        print(f"serving {server.name} with {len(server.store.names())} adapter(s) on http://{args.host}:{args.port} "
              f"(max_batch_size {args.max_batch_size}, max_queue {args.max_queue}, context "
              f"{server.engine.max_seq_length}; API keys: {len(options.api_keys) or 'none'}"
              f"{', run-time adapter loading on' if args.allow_runtime_loading else ''})", file=sys.stderr)
        if not options.api_keys and args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: serving on {args.host} without an API key: anyone who reaches the port can use it "
                  f"(set LORA_LAB_API_KEY)", file=sys.stderr)
        # Ctrl-C: uvicorn stops accepting connections; the engine lets running requests finish for
        # --shutdown_grace seconds, then aborts the rest (their streams end with finish_reason "abort" and
        # [DONE]); then the app's shutdown stops the engine thread. A second Ctrl-C exits at once.
        grace = args.shutdown_grace

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:
                server.engine.drain(grace)
                super().handle_exit(sig, frame)

        app = create_app(server, options)
        if args.challenge_api:
            from lora_lab.serve.challenge import challenge_router

            app.include_router(challenge_router(server, args.challenge_model or next(iter(adapters), None)))
        try:
            Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                  timeout_graceful_shutdown=grace + 10)).run()
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: stopping is what was asked for
            pass
        print("server stopped", file=sys.stderr)


if __name__ == "__main__":
    main()
