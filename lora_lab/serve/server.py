"""What the server holds: the base model (float or NF4), its tokenizer, the adapter store and the engine.

    server = ModelServer.load("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct", adapters={"sql": "out/sql"})
    req = server.request("sql", prompt_ids, max_tokens=64, on_event=...)   # then server.engine.submit(req)

Kept apart from the HTTP layer (lora_lab/serve/app.py) so tests, benchmarks and batch generation drive the same
engine in-process. Prompt styles: an adapter's requests are wrapped in the style it was fine-tuned with (its
lora_config.json), the base model's in the checkpoint's; chat messages are rendered by `render_chat`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

from lora_lab.adapted import load_base
from lora_lab.checkpoint import load_config
from lora_lab.generate import select_device, select_dtype
from lora_lab.lora import ADAPTER_CONFIG_FILE as LORA_CONFIG_FILE
from lora_lab.model import GPT
from lora_lab.nf4 import nf4_settings
from lora_lab.prompts import PromptStyle
from lora_lab.serve.adapters import AdapterLimits, AdapterStore
from lora_lab.serve.engine import Engine, QueueFull, Request
from lora_lab.tokenizer import Tokenizer
from lora_lab.utils import LoraLabError


def served_nf4_settings(adapters: dict, nf4_blocksize: Optional[int] = None,
                        double_quant: Optional[bool] = None) -> dict:
    """The NF4 settings of a --quantize nf4 base: the flags where given, else those the start-up QLoRA adapters
    recorded (their base_quantization; they must agree, since one base serves them all), else QLoRA's defaults."""
    recorded = {}
    for name, path in adapters.items():
        config_path = Path(path) / LORA_CONFIG_FILE
        if config_path.is_file():
            q = json.loads(config_path.read_text()).get("base_quantization")
            if q:
                recorded[name] = {k: q[k] for k in ("blocksize", "double_quant") if k in q}
    settings = {**nf4_settings(), **(next(iter(recorded.values())) if recorded else {})}
    if len({json.dumps(q, sort_keys=True) for q in recorded.values()}) > 1:
        raise LoraLabError(f"the QLoRA adapters were trained on different NF4 bases ({recorded}): one server has one "
                           f"base; serve them from separate servers, or pass --nf4_blocksize / --double_quant")
    if nf4_blocksize is not None:
        settings["blocksize"] = nf4_blocksize
    if double_quant is not None:
        settings["double_quant"] = double_quant
    return settings


class ModelServer:
    def __init__(self, model: GPT, tokenizer: Tokenizer, checkpoint_dir: Path, store: AdapterStore,
                 engine: Engine, name: str) -> None:
        self.model, self.tokenizer, self.checkpoint_dir = model, tokenizer, checkpoint_dir
        self.store, self.engine, self.name = store, engine, name
        self.base_style = PromptStyle.from_checkpoint(checkpoint_dir)
        self.created = int(time.time())

    @classmethod
    def load(cls, checkpoint_dir, adapters: Optional[dict] = None, adapters_root=None, quantize: Optional[str] = None,
             precision: Optional[str] = None, device: str = "auto", max_batch_size: int = 16,
             max_loaded_adapters: int = 8, max_seq_length: Optional[int] = None, start: bool = True,
             nf4_blocksize: Optional[int] = None, double_quant: Optional[bool] = None,
             allow_runtime_loading: bool = False, limits: AdapterLimits = AdapterLimits(),
             max_queue: Optional[int] = None, timeout: Optional[float] = None) -> "ModelServer":
        """Load the base (quantized to NF4 with quantize="nf4": `served_nf4_settings`), register and load `adapters`
        {name: dir} (each checked now, so a bad one fails at start), and start the engine thread. The adapters of
        `adapters_root` are served by folder name, read on first use; allow_runtime_loading: also what a client
        names below it (lora_lab/serve/adapters.py). limits: the largest adapter file and rank; max_queue, timeout:
        the engine's bounds (lora_lab/serve/engine.py)."""
        checkpoint_dir = Path(checkpoint_dir)
        if max_batch_size < 1 or max_loaded_adapters < 1:
            raise LoraLabError("--max_batch_size and --max_loaded_adapters must be at least 1")
        if quantize not in (None, "nf4", "none"):
            raise LoraLabError(f"--quantize {quantize}: use nf4 (or leave it out)")
        if adapters_root is not None and not Path(adapters_root).is_dir():
            raise LoraLabError(f"--adapters_root {adapters_root} is not a directory")
        if allow_runtime_loading and adapters_root is None:
            raise LoraLabError("--allow_runtime_loading needs --adapters_root: the folder run-time loading may read")
        if max_queue is not None and max_queue < 0 or timeout is not None and not timeout > 0:
            raise LoraLabError("--max_queue must be at least 0 and --timeout positive")
        device = select_device(device)
        dtype = select_dtype(precision, device)
        config = load_config(checkpoint_dir)
        nf4 = served_nf4_settings(adapters or {}, nf4_blocksize, double_quant) if quantize == "nf4" else None
        # nf4: as generate/lora.py, the stored weights quantized (every nn.Linear but lm_head), then the rest cast
        model = load_base(checkpoint_dir, nf4=nf4, device=device, dtype=dtype)
        model.requires_grad_(False)
        tokenizer = Tokenizer(checkpoint_dir)
        store = AdapterStore(model, config, max_loaded_adapters, adapters_root,
                             quantization=nf4, allow_runtime_loading=allow_runtime_loading, limits=limits)
        for name, path in (adapters or {}).items():
            if not name or name == (config.name or checkpoint_dir.name):
                raise LoraLabError(f"adapter name {name!r} is empty or the base model's name")
            store.register(name, path)
        engine = Engine(model, tokenizer, store, max_batch_size, max_seq_length,
                        on_release=lambda r: store.release(r.adapter) if r.adapter else None,
                        max_queue=max_queue, timeout=timeout)
        server = cls(model, tokenizer, checkpoint_dir, store, engine, config.name or checkpoint_dir.name)
        if start:
            engine.start()
        return server

    # ---- requests -----------------------------------------------------------------------------------------------
    def is_base(self, model: str) -> bool:
        return model in (self.name, str(self.checkpoint_dir))

    def knows(self, model: str) -> bool:
        """Whether `model` is the base or an adapter this server can serve (loaded or not)."""
        return self.is_base(model) or self.store.path_of(model) is not None

    def style_for(self, adapter) -> PromptStyle:
        name = adapter.prompt_style if adapter is not None and adapter.prompt_style else None
        return PromptStyle.from_checkpoint(self.checkpoint_dir, name=name) if name else self.base_style

    def request(self, model: str, on_event: Callable, prompt: Optional[str] = None,
                messages: Optional[list[dict]] = None, ignore_eos: bool = False, **kwargs) -> Request:
        """A Request for `model` (the base's name or an adapter's), its adapter slot taken (KeyError: unknown
        model). `prompt` is passed as it is (completions), `messages` rendered in the adapter's prompt style.
        ignore_eos: no stop at the end-of-text or end-of-turn tokens (max_tokens tokens, for benchmarks).
        A LoraLabError says in `.param` which field it is about ("model", "messages" or "prompt"), for the API."""
        if not self.engine.has_room():  # before an adapter is read for a request that would be refused anyway
            raise QueueFull(f"the server is at capacity ({self.engine.max_batch_size} running and "
                            f"{self.engine.max_queue} waiting requests): retry later")
        adapter_name = None if self.is_base(model) else model
        try:
            slot, adapter = self.store.acquire(adapter_name) if adapter_name else (0, None)
        except LoraLabError as e:  # the adapter could not be read or has no free slot
            e.param = "model"
            raise
        try:
            style = self.style_for(adapter)
            text = prompt if messages is None else render_chat(style, messages)
            prompt_ids = self.tokenizer.encode(text).tolist()
            if not prompt_ids:
                raise LoraLabError("the prompt is empty")
            limit = self.engine.max_seq_length
            if len(prompt_ids) >= limit:
                raise LoraLabError(f"the prompt has {len(prompt_ids)} tokens but this server's context holds {limit} "
                                   f"tokens (prompt + completion): shorten it")
            stop_ids = list(dict.fromkeys(self.tokenizer.eos_ids + style.stop_tokens(self.tokenizer)))
            if ignore_eos:
                stop_ids = []
            return Request(prompt_ids=prompt_ids, on_event=on_event, stop_ids=stop_ids, slot=slot,
                           adapter=adapter_name, **kwargs)
        except BaseException as e:
            if adapter_name:
                self.store.release(adapter_name)
            if isinstance(e, LoraLabError):
                e.param = "messages" if messages is not None else "prompt"
            raise


def render_chat(style: PromptStyle, messages: list[dict]) -> str:
    """OpenAI chat messages -> the prompt text in `style`. A system message (first) goes where the style puts
    one; each user turn is wrapped by style.apply, each earlier assistant answer follows its turn and is closed
    by the style's end-of-turn text. One user message gives exactly style.apply(content, system=...), the
    prompt generate/*.py builds."""
    system = None
    if messages and messages[0]["role"] in ("system", "developer"):
        system, messages = messages[0]["content"], messages[1:]
    if not messages or messages[-1]["role"] != "user":
        raise LoraLabError("messages must end with a user message")
    plain = type(style)(default_system=None)  # later turns: no (default) system message again
    text = ""
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "user":
            expected_user = i % 2 == 0
            if not expected_user:
                raise LoraLabError(f"messages[{i}]: user and assistant messages must alternate")
            text += style.apply(m["content"], system=system) if i == 0 else plain.apply(m["content"])
        elif role == "assistant":
            if i % 2 == 0:
                raise LoraLabError(f"messages[{i}]: user and assistant messages must alternate")
            text += m["content"] + style.turn_end
        else:
            raise LoraLabError(f"messages[{i}].role {role!r}: only a first system message, then user and "
                               f"assistant messages are supported")
    return text
