"""Adapters for the server: read a lora_lab or PEFT adapter directory, check it fits the base, and keep the most
recently used ones loaded in the slots of the stacked layers (lora_lab/serve/multi_lora.py).

    lora_lab adapter   lora_config.json + lora.safetensors (finetune/lora.py, finetune/qlora.py)
    PEFT adapter       adapter_config.json + adapter_model.safetensors (peft's save_pretrained, lora_lab.export_peft)

A PEFT adapter's module names are the Hugging Face ones; the name tables of lora_lab/convert_hf.py (through
export_peft.hf_module_names, the direction export_peft writes) map them back to ours. The formula is the same
in both libraries (lora_lab/export_peft.py), so the tensors are used unchanged. Refused, each in one line, when
loading: a directory that is neither, an adapter for another base (shapes, layers the model does not have),
PEFT rank_pattern/alpha_pattern or fused q/k/v layers, non-LoRA PEFT types.

LRU: at most `max_loaded` adapters sit in slots 1..max_loaded (slot 0 is "no adapter"). Asking for one that is
not loaded loads it from disk into a free slot, or into the slot of the least recently used adapter that no
running request is using. Tested in tests/test_serve.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from lora_lab.config import Config
from lora_lab.lora import ADAPTER_CONFIG_FILE, ROLES, check_adapter_fits, load_lora, role_of
from lora_lab.serve.multi_lora import AdapterBank, inject_multi_lora
from lora_lab.utils import LoraLabError

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass
class AdapterWeights:
    """One adapter, in our module names: {module: {"lora_A": (r, in), "lora_B": (out, r)[, "lora_magnitude"]}}."""

    name: str
    path: Path
    r: int
    scaling: float
    use_dora: bool
    prompt_style: Optional[str]  # None: the base model's
    modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    base_quantization: Optional[dict] = None
    load_seconds: float = 0.0

    @property
    def roles(self) -> list[str]:
        return [r for r in ROLES if any(role_of(m) == r for m in self.modules)]


def read_adapter(name: str, path, config: Config) -> AdapterWeights:
    """Read the adapter directory `path` (lora_lab or PEFT) for a base model `config`; one line if it does not fit."""
    t0 = time.perf_counter()
    path = Path(path)
    if (path / ADAPTER_CONFIG_FILE).is_file():
        lora_config, tensors = load_lora(path)
        try:
            check_adapter_fits(lora_config, config, path, "the served base model")
        except LoraLabError as e:  # its advice (--checkpoint_dir) is for the scripts: say what it means here
            raise LoraLabError(f"adapter {name!r} does not fit the served base model: "
                               f"{str(e).split(': pass the --checkpoint_dir')[0]}") from None
        adapter = AdapterWeights(name, path, lora_config.r, lora_config.scaling, lora_config.use_dora,
                                 lora_config.prompt_style, base_quantization=lora_config.base_quantization)
        for key, t in tensors.items():
            module, _, param = key.rpartition(".")
            adapter.modules.setdefault(module, {})[param] = t
    elif (path / PEFT_CONFIG_FILE).is_file():
        adapter = _read_peft(name, path, config)
    elif not path.is_dir():
        raise LoraLabError(f"adapter {name!r}: directory {path} does not exist")
    else:
        raise LoraLabError(f"adapter {name!r}: {path} holds neither {ADAPTER_CONFIG_FILE} (lora_lab) nor "
                           f"{PEFT_CONFIG_FILE} (PEFT)")
    _check_shapes(adapter, config)
    adapter.load_seconds = time.perf_counter() - t0
    return adapter


def _read_peft(name: str, path: Path, config: Config) -> AdapterWeights:
    from lora_lab.formats.hf import hf_family_for
    from lora_lab.formats.peft import PEFT_PARAM_NAMES, PEFT_PREFIX, hf_module_names

    try:
        pc = json.loads((path / PEFT_CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise LoraLabError(f"adapter {name!r}: {path / PEFT_CONFIG_FILE} is not valid JSON ({e})") from None
    if pc.get("peft_type", "LORA") != "LORA":
        raise LoraLabError(f"adapter {name!r}: PEFT type {pc.get('peft_type')} is not served; only LORA adapters are")
    if pc.get("rank_pattern") or pc.get("alpha_pattern"):
        raise LoraLabError(f"adapter {name!r}: PEFT rank_pattern/alpha_pattern (per-layer ranks) are not supported")
    if pc.get("modules_to_save"):
        raise LoraLabError(f"adapter {name!r}: PEFT modules_to_save (fully trained layers) are not supported")
    if not (path / PEFT_WEIGHTS_FILE).is_file():
        raise LoraLabError(f"adapter {name!r}: {path / PEFT_WEIGHTS_FILE} is missing")
    r, alpha = int(pc.get("r", 8)), float(pc.get("lora_alpha", 8))
    scaling = alpha / r ** 0.5 if pc.get("use_rslora") else alpha / r
    family, _ = hf_family_for(config)
    hf_to_ours = {}
    for ours, hf in hf_module_names(config, family).items():
        for i in (range(config.n_layer) if "{i}" in ours else [None]):
            hf_to_ours[hf.format(i=i)] = ours.format(i=i)
    param_of = {v: k for k, v in PEFT_PARAM_NAMES.items()}
    adapter = AdapterWeights(name, path, r, scaling, bool(pc.get("use_dora")), None)
    for key, t in load_file(str(path / PEFT_WEIGHTS_FILE)).items():
        body = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        module, param = next(((body[:-len(s) - 1], p) for s, p in param_of.items() if body.endswith("." + s)),
                             (None, None))
        module = module.replace(".default", "") if module else module  # some PEFT versions keep the adapter name
        ours = hf_to_ours.get(module)
        if ours is None or role_of(ours) is None or ours.endswith(".qkv"):
            raise LoraLabError(f"adapter {name!r}: {key} is not a LoRA weight of a layer the base model has "
                               f"(fused q/k/v and other architectures' names are not supported)")
        adapter.modules.setdefault(ours, {})[param] = t
    return adapter


def _check_shapes(adapter: AdapterWeights, config: Config) -> None:
    from lora_lab.model import GPT

    with torch.device("meta"):
        shapes = {n: (m.out_features, m.in_features) for n, m in GPT(config).named_modules()
                  if hasattr(m, "in_features")}
    for module, t in adapter.modules.items():
        if module not in shapes or role_of(module) is None:
            raise LoraLabError(f"adapter {adapter.name!r} ({adapter.path}) has weights for {module}, which the base "
                               f"model does not have: it was trained on a different base model")
        if "lora_A" not in t or "lora_B" not in t or (adapter.use_dora and "lora_magnitude" not in t):
            raise LoraLabError(f"adapter {adapter.name!r} ({adapter.path}) is incomplete at {module}")
        out, inp = shapes[module]
        a, b = tuple(t["lora_A"].shape), tuple(t["lora_B"].shape)
        if a[1:] != (inp,) or b[:1] != (out,) or a[0] != b[1]:
            raise LoraLabError(f"adapter {adapter.name!r} ({adapter.path}): {module} has A {a} and B {b} but the base "
                               f"layer is ({out}, {inp}): it was trained on a different base model")


class AdapterStore:
    """The adapters the server knows (name -> directory) and the ones loaded in slots, least recently used first.

    Every method runs under `lock`, which the engine also holds while it computes a step, so the stacked tensors
    never change under a forward pass."""

    def __init__(self, model, config: Config, max_loaded: int, adapters_root: Optional[Path] = None,
                 quantization: Optional[dict] = None) -> None:
        self.model, self.config = model, config
        self.max_loaded = max_loaded
        self.adapters_root = Path(adapters_root) if adapters_root else None
        self.quantization = quantization  # the served base's NF4 settings, or None for a float base
        self.bank = AdapterBank(max_loaded + 1, model.wte.weight.device)
        self.known: dict[str, Path] = {}  # registered with --adapters or /v1/load_lora_adapter
        self.loaded: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self.info: dict[str, AdapterWeights] = {}  # loaded adapters' configs (tensors dropped once in slots)
        self.in_use: dict[str, int] = {}  # name -> running requests
        self.lock = threading.RLock()
        self.loads = 0  # adapters read from disk so far (tests check the LRU reloads)

    # ---- names ---------------------------------------------------------------------------------------------
    def path_of(self, name: str) -> Optional[Path]:
        """The directory of adapter `name`: registered, or a folder of that name under --adapters_root."""
        if name in self.known:
            return self.known[name]
        if self.adapters_root is not None and name and "/" not in name and not name.startswith("."):
            candidate = self.adapters_root / name
            if (candidate / ADAPTER_CONFIG_FILE).is_file() or (candidate / PEFT_CONFIG_FILE).is_file():
                return candidate
        return None

    def names(self) -> list[str]:
        names = list(self.known)
        if self.adapters_root is not None and self.adapters_root.is_dir():
            names += sorted(p.name for p in self.adapters_root.iterdir()
                            if p.name not in names and self.path_of(p.name))
        return names

    def register(self, name: str, path) -> AdapterWeights:
        """Load adapter `name` from `path` now (so a bad one fails here, in one line) and remember where it is."""
        with self.lock:
            if name in self.known or name in self.loaded:
                raise LoraLabError(f"an adapter named {name!r} is already loaded")
            adapter = self._load(name, Path(path))
            self.known[name] = Path(path)
            return adapter

    def unregister(self, name: str) -> None:
        with self.lock:
            if name not in self.known and name not in self.loaded:
                raise LoraLabError(f"no adapter named {name!r} is loaded")
            self.known.pop(name, None)
            if not self.in_use.get(name):
                self._evict(name)

    # ---- slots ---------------------------------------------------------------------------------------------
    def acquire(self, name: str) -> tuple[int, AdapterWeights]:
        """The slot of adapter `name` (loading it if needed), counted as used until `release(name)`."""
        with self.lock:
            if name not in self.loaded:
                path = self.path_of(name)
                if path is None:
                    raise KeyError(name)
                self._load(name, path)
            self.loaded.move_to_end(name)
            self.in_use[name] = self.in_use.get(name, 0) + 1
            return self.loaded[name], self.info[name]

    def release(self, name: str) -> None:
        with self.lock:
            self.in_use[name] -= 1
            if not self.in_use[name]:
                del self.in_use[name]
                if self.path_of(name) is None:  # unloaded while it was running
                    self._evict(name)

    def _load(self, name: str, path: Path) -> AdapterWeights:
        adapter = read_adapter(name, path, self.config)
        q = adapter.base_quantization
        if q and self.quantization and any(q.get(k) != self.quantization.get(k) for k in ("blocksize", "double_quant")):
            raise LoraLabError(f"adapter {name!r} was trained on an NF4 base with {q}, the server's is "
                               f"{self.quantization}: start a server for it with --quantize nf4 --nf4_blocksize {q.get('blocksize')} "
                               f"--double_quant {str(q.get('double_quant')).lower()}")
        slot = self._free_slot(name)
        roles = adapter.roles
        inject_multi_lora(self.model, roles, self.bank)
        for module_name, layer in self.bank.layers.items():
            t = adapter.modules.get(module_name)
            if t is None:
                layer.set_slot(slot, None, None)
                continue
            A, B = t["lora_A"].float(), t["lora_B"].float()  # (r, in), (out, r)
            g = None
            if adapter.use_dora:  # g = m / ||W + s B A||, fixed while the adapter is loaded
                adapted = layer.base_weight() + adapter.scaling * (B @ A)  # (out, in)
                norm = torch.linalg.vector_norm(adapted, dim=1).clamp_min(torch.finfo(torch.float32).tiny)
                g = t["lora_magnitude"].float() / norm  # (out,)
            layer.set_slot(slot, A, B, g)
        self.bank.scaling[slot] = adapter.scaling
        adapter.modules = {}  # the tensors live in the slots now
        self.loaded[name] = slot
        self.info[name] = adapter
        self.loads += 1
        return adapter

    def _free_slot(self, name: str) -> int:
        used = set(self.loaded.values())
        free = [s for s in range(1, self.max_loaded + 1) if s not in used]
        if free:
            return free[0]
        victim = next((n for n in self.loaded if not self.in_use.get(n)), None)  # least recently used, idle
        if victim is None:
            raise LoraLabError(f"cannot load adapter {name!r}: all {self.max_loaded} adapter slots are used by "
                               f"running requests (raise --max_loaded_adapters)")
        return self._evict(victim)

    def _evict(self, name: str) -> int:
        slot = self.loaded.pop(name, None)
        self.info.pop(name, None)
        if slot is not None:
            for layer in self.bank.layers.values():
                layer.set_slot(slot, None, None)
            self.bank.scaling[slot] = 0.0
        return slot
