"""Serve a base model and many LoRA adapters over the OpenAI API.

    python -m lora_lab.serve --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --adapters sql=out/finetune/lora-sql chat=out/finetune/lora-chat --adapters_root out/adapters \
        --port 8000

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"model": "sql", "messages": [{"role": "user", "content": "List all users"}], "max_tokens": 64}'

Needs the `serve` extra: pip install -e ".[serve]" (FastAPI and uvicorn). See tutorials/serve.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_lab.utils import LoraLabError, one_line_errors


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lora_lab.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint_dir", type=Path, required=True, help="the base model (a lora_lab checkpoint)")
    p.add_argument("--adapters", nargs="*", default=[], metavar="NAME=DIR",
                   help="adapters loaded at start: lora_lab or PEFT adapter directories, served under NAME")
    p.add_argument("--adapters_root", type=Path, default=None,
                   help="a folder of adapter directories, each loaded on first use by its folder name")
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


def main(argv=None) -> None:
    args = parse_args(argv)
    with one_line_errors():
        try:
            import uvicorn

            from lora_lab.serve.app import create_app
        except ImportError as e:
            raise LoraLabError(f"the server needs FastAPI and uvicorn ({e}): pip install -e '.[serve]'") from None
        from lora_lab.checkpoint import load_config
        from lora_lab.serve.server import ModelServer

        adapters = parse_adapters(args.adapters)
        config = load_config(args.checkpoint_dir)  # one line if it is not a checkpoint, before any loading
        max_seq_length = args.max_seq_length or min(config.block_size, 2048)
        server = ModelServer.load(args.checkpoint_dir, adapters, args.adapters_root, args.quantize, args.precision,
                                  args.device, args.max_batch_size, args.max_loaded_adapters, max_seq_length,
                                  nf4_blocksize=args.nf4_blocksize, double_quant=args.double_quant)
        print(f"serving {server.name} with {len(adapters)} adapter(s) on http://{args.host}:{args.port} "
              f"(max_batch_size {args.max_batch_size}, context {server.engine.max_seq_length})", file=sys.stderr)
        # Ctrl-C: uvicorn stops accepting connections; the engine lets running requests finish for
        # --shutdown_grace seconds, then aborts the rest (their streams end with finish_reason "abort" and
        # [DONE]); then the app's shutdown stops the engine thread. A second Ctrl-C exits at once.
        grace = args.shutdown_grace

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:
                server.engine.drain(grace)
                super().handle_exit(sig, frame)

        app = create_app(server)
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
