"""Adapters for the server: read a lora_lab or PEFT adapter directory, check it fits the base, and keep the most
recently used ones loaded in the slots of the stacked layers (lora_lab/serve/multi_lora.py).

    lora_lab adapter   lora_config.json + lora.safetensors (finetune/lora.py, finetune/qlora.py)
    PEFT adapter       adapter_config.json + adapter_model.safetensors (peft's save_pretrained, lora_lab.export_peft)

(which is which: lora_lab.adapted.adapter_kind, the one place that tells the formats apart). A PEFT adapter's module
names are the Hugging Face ones; the name tables of lora_lab/formats/hf.py (through peft.hf_module_names, the
direction export_peft writes) map them back to ours. The formula is the same in both libraries
(lora_lab/formats/peft.py), so the tensors are used unchanged.

Reading is in two steps, so that what is refused is refused before its tensors are read: first the config and the
safetensors header (names, shapes: a few KB), checked against the limits (`AdapterLimits`: file size, rank) and the
base (shapes, layers it has); then the tensors, with safetensors only (no pickle). Refused, each in one line: a
directory that is neither format, an adapter for another base, PEFT rank_pattern/alpha_pattern or fused q/k/v
layers, non-LoRA PEFT types, an adapter over the size or rank limit.

Where adapters may come from (a server on a network must not read what a client names):
  --adapters NAME=DIR        the operator's: read at start
  --adapters_root DIR        the operator's folder: its adapter sub-folders at start are served by folder name,
                             each read on first use (and again after the LRU dropped it)
  run-time loading           /v1/load_lora_adapter and names that appeared in the root after start: only with
                             --allow_runtime_loading, and only below --adapters_root. `confine` resolves the path
                             (symlinks and `..`) before anything is read, and so is every file read from the
                             adapter directory; a path outside gets one 403 line that is the same whether or not
                             it exists (`PathRefused`); each file is then opened from the root one component at
                             a time without following symlinks (`open_below`), so a symlink swapped in after the
                             check cannot lead out either.

LRU: at most `max_loaded` adapters sit in slots 1..max_loaded (slot 0 is "no adapter"). Asking for one that is
not loaded loads it from disk into a free slot, or into the slot of the least recently used adapter that no
running request is using. Tested in tests/test_serve.py and tests/test_serve_network.py.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import OrderedDict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from lora_lab.adapted import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, adapter_kind
from lora_lab.config import Config
from lora_lab.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, ROLES, LoRAConfig, base_shape_diffs, role_of
from lora_lab.serve.multi_lora import AdapterBank, inject_multi_lora
from lora_lab.utils import LoraLabError


class PathRefused(LoraLabError):
    """A run-time path outside --adapters_root, or run-time loading switched off (HTTP 403)."""

    status = 403


class SlotsBusy(LoraLabError):
    """Every adapter slot is held by running requests (HTTP 503: retry later)."""

    status = 503


REFUSED = "lora_path must name an adapter directory below the server's --adapters_root"


def confine(root: Path, path) -> Path:
    """`path` (relative to `root`, or absolute) with symlinks and `..` resolved, if that lies strictly below `root`
    (itself resolved); else PathRefused, with the same words whether or not the path exists. Reads no file."""
    try:
        root = Path(root).resolve()
        p = Path(path)
        resolved = (p if p.is_absolute() else root / p).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        raise PathRefused(REFUSED) from None
    if resolved == root or root not in resolved.parents:
        raise PathRefused(REFUSED)
    return resolved


@dataclass
class AdapterLimits:
    """What an adapter may be, checked from its config and safetensors header before its tensors are read."""

    max_adapter_mb: Optional[float] = None  # the weights file's size
    max_lora_rank: Optional[int] = None


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


@contextmanager
def open_below(root: Path, path: Path):
    """`path` (confined already) opened from `root` one component at a time, following no symlink (O_NOFOLLOW): a
    symlink swapped in after `confine` checked the path cannot lead out. Yields a path that reads the open file
    (/proc/self/fd/N); without /proc (not Linux) `path` itself, and confine's check is what there is."""
    if not hasattr(os, "O_NOFOLLOW") or not os.path.isdir("/proc/self/fd"):
        yield path
        return
    rel = path.relative_to(Path(root).resolve())
    fd = os.open(Path(root).resolve(), os.O_RDONLY | os.O_DIRECTORY)
    last = None
    try:
        for part in rel.parts[:-1]:
            below = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = below
        last = os.open(rel.parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
    except FileNotFoundError:
        pass  # not there: the caller says it is missing
    except OSError:  # a symlink (ELOOP, ENOTDIR) where confine saw none
        raise PathRefused(REFUSED) from None
    finally:
        os.close(fd)
    try:
        yield path if last is None else Path(f"/proc/self/fd/{last}")
    finally:
        if last is not None:
            os.close(last)


def read_adapter(name: str, path, config: Config, limits: AdapterLimits = AdapterLimits(),
                 root: Optional[Path] = None) -> AdapterWeights:
    """Read the adapter directory `path` (lora_lab or PEFT) for a base model `config`; one line if it does not fit.
    root: every file read must resolve below it (run-time loading), and is opened without following symlinks."""
    path = Path(path)
    with ExitStack() as opened:
        def file(fname: str) -> Path:
            f = path / fname
            return f if root is None else opened.enter_context(open_below(root, confine(root, f)))

        return _read_adapter(name, path, config, limits, file)


def _read_adapter(name: str, path: Path, config: Config, limits: AdapterLimits, file) -> AdapterWeights:
    t0 = time.perf_counter()
    kind = adapter_kind(path)
    if kind == "lora":
        config_file, weights_file = file(ADAPTER_CONFIG_FILE), file(ADAPTER_WEIGHTS_FILE)
        weights_name = ADAPTER_WEIGHTS_FILE
        lora_config = _read_config(name, config_file, ADAPTER_CONFIG_FILE, LoRAConfig.from_dict)
        diffs = base_shape_diffs(lora_config, config)
        if diffs:
            raise LoraLabError(f"adapter {name!r} does not fit the served base model: it was trained on "
                               f"{lora_config.base_config.get('name') or lora_config.base_model or 'another model'} "
                               f"({', '.join(diffs)})")
        adapter = AdapterWeights(name, path, lora_config.r, lora_config.scaling, lora_config.use_dora,
                                 lora_config.prompt_style, base_quantization=lora_config.base_quantization)
        names = _split_lora_names
    elif kind == "peft":
        config_file, weights_file = file(PEFT_CONFIG_FILE), file(PEFT_WEIGHTS_FILE)
        weights_name = PEFT_WEIGHTS_FILE
        adapter, names = _read_peft_config(name, path, config_file, config)
    elif not path.is_dir():
        raise LoraLabError(f"adapter {name!r}: directory {path} does not exist")
    else:
        raise LoraLabError(f"adapter {name!r}: {path} holds neither {ADAPTER_CONFIG_FILE} (lora_lab) nor "
                           f"{PEFT_CONFIG_FILE} (PEFT)")
    if not weights_file.is_file():
        raise LoraLabError(f"adapter {name!r}: {path / weights_name} is missing")
    mb = weights_file.stat().st_size / 2**20
    if limits.max_adapter_mb is not None and mb > limits.max_adapter_mb:
        raise LoraLabError(f"adapter {name!r} is {mb:.1f} MB, more than this server's --max_adapter_mb "
                           f"{limits.max_adapter_mb:g}")
    if limits.max_lora_rank is not None and adapter.r > limits.max_lora_rank:
        raise LoraLabError(f"adapter {name!r} has rank {adapter.r}, more than this server's --max_lora_rank "
                           f"{limits.max_lora_rank}")
    # the header: every tensor's name and shape, checked against the base (and the rank limit) before the tensors
    try:
        with safe_open(str(weights_file), "pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraLabError(f"adapter {name!r}: {weights_name} is not a valid safetensors file ({e})") from None
    layout = {}
    for key, shape in shapes.items():
        module, param = names(name, key)
        layout.setdefault(module, {})[param] = shape
    _check_shapes(adapter, layout, config, limits.max_lora_rank)
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraLabError(f"adapter {name!r}: {weights_name} is truncated or corrupt ({e})") from None
    for key, t in tensors.items():
        module, param = names(name, key)
        adapter.modules.setdefault(module, {})[param] = t
    adapter.load_seconds = time.perf_counter() - t0
    return adapter


def _read_config(name: str, config_file: Path, shown: str, from_dict):
    try:
        return from_dict(json.loads(config_file.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoraLabError(f"adapter {name!r}: {shown} is not valid JSON ({e})") from None
    except (LoraLabError, TypeError, AttributeError) as e:
        raise LoraLabError(f"adapter {name!r}: {shown} is not a valid adapter config ({e})") from None


def _split_lora_names(name: str, key: str) -> tuple[str, str]:
    """lora.safetensors key -> (module, param), our names: "blocks.0.attn.query.lora_A" -> ("blocks.0.attn.query",
    "lora_A")."""
    module, _, param = key.rpartition(".")
    return module, param


def _read_peft_config(name: str, path: Path, config_file: Path, config: Config):
    """A PEFT adapter's AdapterWeights (no tensors yet) and its key -> (our module, param) function."""
    from lora_lab.formats.hf import hf_family_for
    from lora_lab.formats.peft import PEFT_PARAM_NAMES, PEFT_PREFIX, hf_module_names

    pc = _read_config(name, config_file, PEFT_CONFIG_FILE, lambda d: d if isinstance(d, dict) else None)
    if not isinstance(pc, dict):
        raise LoraLabError(f"adapter {name!r}: {PEFT_CONFIG_FILE} is not a JSON object")
    if pc.get("peft_type", "LORA") != "LORA":
        raise LoraLabError(f"adapter {name!r}: PEFT type {pc.get('peft_type')} is not served; only LORA adapters are")
    if pc.get("rank_pattern") or pc.get("alpha_pattern"):
        raise LoraLabError(f"adapter {name!r}: PEFT rank_pattern/alpha_pattern (per-layer ranks) are not supported")
    if pc.get("modules_to_save"):
        raise LoraLabError(f"adapter {name!r}: PEFT modules_to_save (fully trained layers) are not supported")
    try:
        r, alpha = int(pc.get("r", 8)), float(pc.get("lora_alpha", 8))
    except (TypeError, ValueError):
        raise LoraLabError(f"adapter {name!r}: {PEFT_CONFIG_FILE} has an invalid r or lora_alpha") from None
    if r < 1:
        raise LoraLabError(f"adapter {name!r}: {PEFT_CONFIG_FILE} has rank r {r}")
    scaling = alpha / r ** 0.5 if pc.get("use_rslora") else alpha / r
    family, _ = hf_family_for(config)
    hf_to_ours = {}
    for ours, hf in hf_module_names(config, family).items():
        for i in (range(config.n_layer) if "{i}" in ours else [None]):
            hf_to_ours[hf.format(i=i)] = ours.format(i=i)
    param_of = {v: k for k, v in PEFT_PARAM_NAMES.items()}

    def names(name: str, key: str) -> tuple[str, str]:
        body = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        module, param = next(((body[:-len(s) - 1], p) for s, p in param_of.items() if body.endswith("." + s)),
                             (None, None))
        module = module.replace(".default", "") if module else module  # some PEFT versions keep the adapter name
        ours = hf_to_ours.get(module)
        if ours is None or role_of(ours) is None or ours.endswith(".qkv"):
            raise LoraLabError(f"adapter {name!r}: {key} is not a LoRA weight of a layer the base model has "
                               f"(fused q/k/v and other architectures' names are not supported)")
        return ours, param

    return AdapterWeights(name, path, r, scaling, bool(pc.get("use_dora")), None), names


def _check_shapes(adapter: AdapterWeights, layout: dict[str, dict[str, tuple]], config: Config,
                  max_rank: Optional[int] = None) -> None:
    """layout {module: {param: shape}} (from the safetensors header) against the base's layers and the rank limit."""
    from lora_lab.model import GPT

    with torch.device("meta"):
        shapes = {n: (m.out_features, m.in_features) for n, m in GPT(config).named_modules()
                  if hasattr(m, "in_features")}
    if not layout:
        raise LoraLabError(f"adapter {adapter.name!r} ({adapter.path}) holds no LoRA weights")
    for module, t in layout.items():
        if module not in shapes or role_of(module) is None:
            raise LoraLabError(f"adapter {adapter.name!r} ({adapter.path}) has weights for {module}, which the base "
                               f"model does not have: it was trained on a different base model")
        if "lora_A" not in t or "lora_B" not in t or (adapter.use_dora and "lora_magnitude" not in t):
            raise LoraLabError(f"adapter {adapter.name!r} ({adapter.path}) is incomplete at {module}")
        out, inp = shapes[module]
        a, b = t["lora_A"], t["lora_B"]
        if len(a) != 2 or len(b) != 2 or a[1:] != (inp,) or b[:1] != (out,) or a[0] != b[1]:
            raise LoraLabError(f"adapter {adapter.name!r} ({adapter.path}): {module} has A {a} and B {b} but the base "
                               f"layer is ({out}, {inp}): it was trained on a different base model")
        if max_rank is not None and a[0] > max_rank:
            raise LoraLabError(f"adapter {adapter.name!r} has rank {a[0]} at {module}, more than this server's "
                               f"--max_lora_rank {max_rank}")


class AdapterStore:
    """The adapters the server knows (name -> directory) and the ones loaded in slots, least recently used first.

    Every method runs under `lock`, which the engine also holds while it computes a step, so the stacked tensors
    never change under a forward pass."""

    def __init__(self, model, config: Config, max_loaded: int, adapters_root: Optional[Path] = None,
                 quantization: Optional[dict] = None, allow_runtime_loading: bool = False,
                 limits: AdapterLimits = AdapterLimits()) -> None:
        self.model, self.config = model, config
        self.max_loaded = max_loaded
        self.adapters_root = Path(adapters_root) if adapters_root else None
        if allow_runtime_loading and self.adapters_root is None:
            raise LoraLabError("--allow_runtime_loading needs --adapters_root: the folder run-time loading may read")
        self.allow_runtime_loading = allow_runtime_loading
        self.limits = limits
        self.quantization = quantization  # the served base's NF4 settings, or None for a float base
        self.bank = AdapterBank(max_loaded + 1, model.wte.weight.device)
        self.known: dict[str, Path] = {}  # registered with --adapters or /v1/load_lora_adapter
        self.confined: set[str] = set()  # registered at run time: every read stays below the root
        self.loaded: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self.info: dict[str, AdapterWeights] = {}  # loaded adapters' configs (tensors dropped once in slots)
        self.in_use: dict[str, int] = {}  # name -> running requests
        self.lock = threading.RLock()
        self.loads = 0  # adapters read from disk so far (tests check the LRU reloads)
        self.evictions = 0  # adapters dropped from their slot (LRU or unloaded)
        self.in_root: dict[str, Path] = self._scan_root()  # the root's adapters at start (the operator's)

    # ---- names ---------------------------------------------------------------------------------------------
    def _root_entry(self, name: str) -> Optional[Path]:
        """root/name, resolved and confined, if it is an adapter directory; None otherwise."""
        if (self.adapters_root is None or not name or name.startswith(".") or "/" in name or "\\" in name
                or "\0" in name):
            return None
        try:
            path = confine(self.adapters_root, name)
        except PathRefused:
            return None
        return path if adapter_kind(path) in ("lora", "peft") else None

    def _scan_root(self) -> dict[str, Path]:
        found = {}
        if self.adapters_root is None:
            return found
        if not self.adapters_root.is_dir():
            raise LoraLabError(f"--adapters_root {self.adapters_root} is not a directory")
        for entry in sorted(os.listdir(self.adapters_root)):
            path = self._root_entry(entry)
            if path is not None:
                found[entry] = path
            elif (self.adapters_root / entry).is_symlink():
                print(f"warning: {self.adapters_root / entry} leads outside --adapters_root: not served",
                      file=sys.stderr)
        return found

    def path_of(self, name: str) -> Optional[Path]:
        """The directory of adapter `name`: registered, in the root at start, or (with --allow_runtime_loading) a
        folder of that name in the root now."""
        if name in self.known:
            return self.known[name]
        if name in self.in_root:
            return self.in_root[name]
        return self._root_entry(name) if self.allow_runtime_loading else None

    def names(self) -> list[str]:
        names = list(self.known) + [n for n in self.in_root if n not in self.known]
        if self.allow_runtime_loading and self.adapters_root.is_dir():
            names += sorted(n for n in os.listdir(self.adapters_root) if n not in names and self._root_entry(n))
        return names

    def register(self, name: str, path, root: Optional[Path] = None) -> AdapterWeights:
        """Load adapter `name` from `path` now (so a bad one fails here, in one line) and remember where it is.
        root: the files must resolve below it (run-time loading)."""
        if name in self.known or name in self.loaded:
            raise LoraLabError(f"an adapter named {name!r} is already loaded")
        adapter = self._read(name, Path(path), root)  # from disk without the lock: decoding goes on meanwhile
        with self.lock:
            if name in self.known or name in self.loaded:
                raise LoraLabError(f"an adapter named {name!r} is already loaded")
            self._install(name, adapter)
            self.known[name] = Path(path)
            if root is not None:
                self.confined.add(name)
            return adapter

    def register_at_run_time(self, name: str, lora_path: str) -> AdapterWeights:
        """/v1/load_lora_adapter: `lora_path` (relative to --adapters_root, or absolute) if run-time loading is on
        and the path resolves below the root; PathRefused (403) otherwise, before anything is read."""
        if not self.allow_runtime_loading:
            raise PathRefused("run-time adapter loading is off: start the server with --allow_runtime_loading "
                              "(and --adapters_root)")
        path = confine(self.adapters_root, lora_path)
        if not path.is_dir():
            raise LoraLabError(f"adapter {name!r}: no adapter directory at lora_path {lora_path!r} below the "
                               f"server's --adapters_root")
        return self.register(name, path, root=self.adapters_root)

    def unregister(self, name: str) -> None:
        with self.lock:
            if name not in self.known and name not in self.loaded:
                raise LoraLabError(f"no adapter named {name!r} is loaded")
            self.known.pop(name, None)
            self.in_root.pop(name, None)
            self.confined.discard(name)
            if not self.in_use.get(name):
                self._evict(name)

    # ---- slots ---------------------------------------------------------------------------------------------
    def acquire(self, name: str) -> tuple[int, AdapterWeights]:
        """The slot of adapter `name` (loading it if needed), counted as used until `release(name)`."""
        with self.lock:
            if name in self.loaded:
                return self._take(name)
            path = self.path_of(name)
            if path is None:
                raise KeyError(name)
            # what came from the root (at start, on first use or through run-time loading) is read confined
            root = self.adapters_root if name not in self.known or name in self.confined else None
        adapter = self._read(name, path, root)  # from disk without the lock: decoding goes on meanwhile
        with self.lock:
            if name not in self.loaded:  # (unless a request for the same adapter installed it meanwhile)
                self._install(name, adapter)
            return self._take(name)

    def _take(self, name: str) -> tuple[int, AdapterWeights]:
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

    def _read(self, name: str, path: Path, root: Optional[Path] = None) -> AdapterWeights:
        adapter = read_adapter(name, path, self.config, self.limits, root)
        q = adapter.base_quantization
        if q and self.quantization and any(q.get(k) != self.quantization.get(k) for k in ("blocksize", "double_quant")):
            raise LoraLabError(f"adapter {name!r} was trained on an NF4 base with {q}, the server's is "
                               f"{self.quantization}: start a server for it with --quantize nf4 --nf4_blocksize "
                               f"{q.get('blocksize')} --double_quant {str(q.get('double_quant')).lower()}")
        return adapter

    def _install(self, name: str, adapter: AdapterWeights) -> None:
        """Write `adapter` into a free slot (or the least recently used idle one's); under the lock."""
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

    def _free_slot(self, name: str) -> int:
        used = set(self.loaded.values())
        free = [s for s in range(1, self.max_loaded + 1) if s not in used]
        if free:
            return free[0]
        victim = next((n for n in self.loaded if not self.in_use.get(n)), None)  # least recently used, idle
        if victim is None:
            raise SlotsBusy(f"cannot load adapter {name!r}: all {self.max_loaded} adapter slots are used by "
                            f"running requests (raise --max_loaded_adapters)")
        return self._evict(victim)

    def _evict(self, name: str) -> int:
        slot = self.loaded.pop(name, None)
        self.info.pop(name, None)
        if slot is not None:
            for layer in self.bank.layers.values():
                layer.set_slot(slot, None, None)
            self.bank.scaling[slot] = 0.0
            self.evictions += 1
        return slot
