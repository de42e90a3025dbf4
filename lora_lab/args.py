"""The fine-tuning scripts' hyperparameters, in small groups (as LitGPT's TrainArgs / EvalArgs).

A script's `setup` takes the groups it needs with its own defaults, e.g. finetune/lora.py's

    lora: LoRAArgs = LoRAArgs(r=8, alpha=16.0, dropout=0.05, targets=("query", "value")),
    train: TrainArgs = TrainArgs(learning_rate=2e-3, ...),

and jsonargparse reads them as nested flags: `--lora.r 16 --train.learning_rate 1e-3`, or nested keys in a
`--config` YAML file. Each field also has its flat name, the flag the scripts took before they were grouped
(`--lora_r`, `--learning_rate`; FLAT below lists the few that differ from the field's name): lora_lab.utils.cli
translates flat flags and flat YAML keys to the nested ones, `flatten` gives a run's arguments under their flat names
(as check_args, the memory plan, hparams.yaml and the resume state read them), and `call_flat` calls a `setup` with
flat keyword arguments. What each field means is written once, in each script's docstring (its Args), since a
field may mean a little more in one script than in another (the data a DPO run reads are pairs).

Frozen: a script's defaults are shared instances, so a changed value is a new object (dataclasses.replace).
This module imports nothing from lora_lab (it is read by lora_lab.utils)."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Mapping, Optional, Union


@dataclass(frozen=True)
class LoRALayers:
    """LoRA's shape: which layers get an update, its rank and scale (finetune/classify.py's --method lora)."""
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: Union[tuple[str, ...], str] = ("query", "value")
    FLAT: ClassVar[dict[str, str]] = {"r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout",
                                      "targets": "lora_targets"}


@dataclass(frozen=True)
class ClassifierLoRAArgs(LoRALayers):
    """LoRA's shape and where it starts (finetune/classify.py's --method lora / qlora)."""
    init: str = "kaiming"
    loftq_iter: int = 1
    FLAT: ClassVar[dict[str, str]] = {**LoRALayers.FLAT, "init": "lora_init"}


@dataclass(frozen=True)
class LoRAArgs(LoRALayers):
    """LoRA: which layers get an update, its rank and scale, its variant, where it starts."""
    rslora: bool = False
    dora: bool = False
    lora_plus_ratio: Optional[float] = None
    init: str = "kaiming"
    loftq_iter: int = 1
    FLAT: ClassVar[dict[str, str]] = {**LoRALayers.FLAT, "rslora": "use_rslora", "dora": "use_dora",
                                      "init": "lora_init"}


@dataclass(frozen=True)
class PromptDataArgs:
    """Prompts to answer (finetune/grpo.py): instruction rows whose outputs only the reward functions read."""
    source: str = "json_extraction"
    val_data: Optional[str] = None
    prompt_style: Optional[str] = None
    max_seq_length: int = 512
    n_train: Optional[int] = None
    n_val: Optional[int] = None
    columns: Optional[dict[str, str]] = None
    FLAT: ClassVar[dict[str, str]] = {"source": "data"}


@dataclass(frozen=True)
class PairDataArgs(PromptDataArgs):
    """Preference pairs (finetune/dpo.py): a prompt, a chosen and a rejected answer; packed or padded."""
    source: str = "pairs.json"
    packing: bool = False


@dataclass(frozen=True)
class DataArgs(PairDataArgs):
    """Instruction data (or raw text): what is read and how it becomes token rows."""
    source: str = "json_extraction"
    blank_line_docs: bool = False
    mask_prompt: bool = True


@dataclass(frozen=True)
class LabelledDataArgs:
    """Labelled texts (finetune/classify.py): a file, its columns and classes, the validation and test splits."""
    source: str = "data.csv"
    val_data: Optional[str] = None
    text_column: str = "text"
    label_column: str = "label"
    labels: Optional[Union[tuple[str, ...], str]] = None
    test_data: Optional[str] = None
    val_split: float = 0.1
    test_split: float = 0.1
    max_seq_length: int = 256
    n_train: Optional[int] = None
    n_val: Optional[int] = None
    n_test: Optional[int] = None
    columns: Optional[dict[str, str]] = None
    packing: bool = False
    FLAT: ClassVar[dict[str, str]] = {"source": "data"}


@dataclass(frozen=True)
class TrainArgs:
    """Optimisation: steps, batches, the learning-rate schedule, memory and speed switches."""
    max_steps: Optional[int] = None
    epochs: float = 1.0
    batch_size: int = 16
    micro_batch_size: int = 4
    learning_rate: Optional[float] = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr: float = 0.0
    grad_clip: float = 1.0
    neftune_alpha: float = 0.0
    activation_checkpointing: bool = False
    compile: bool = False
    max_time: Optional[str] = None
    FLAT: ClassVar[dict[str, str]] = {}

    def grad_accum(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each device: batch_size is the global batch."""
        return max(1, self.batch_size // (self.micro_batch_size * world_size))


@dataclass(frozen=True)
class ValidateArgs:
    """Validation during training (finetune/classify.py: its final scores use every held-out text)."""
    interval: int = 25
    iters: int = 100
    FLAT: ClassVar[dict[str, str]] = {"interval": "eval_interval", "iters": "eval_iters"}


@dataclass(frozen=True)
class EvalArgs(ValidateArgs):
    """Validation during training, and the answers generated (and scored) before and after."""
    samples: int = 10
    FLAT: ClassVar[dict[str, str]] = {**ValidateArgs.FLAT, "samples": "eval_samples"}


@dataclass(frozen=True)
class LogArgs:
    """Checkpoints and logging."""
    save_interval: int = 100
    interval: int = 1
    logger_name: Literal["csv", "tensorboard", "mlflow", "wandb"] = "csv"
    FLAT: ClassVar[dict[str, str]] = {"interval": "log_interval"}


@dataclass(frozen=True)
class HardwareArgs:
    """Where and in which number format the run computes."""
    precision: Optional[str] = None
    peak_flops: Optional[float] = None
    devices: int = 1
    num_nodes: int = 1
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    FLAT: ClassVar[dict[str, str]] = {}


@dataclass(frozen=True)
class GRPOArgs:
    """GRPO (finetune/grpo.py): the rewards, the sampled group of completions per prompt, the clipped loss."""
    reward: Union[str, tuple[str, ...]] = "json_values"
    reward_weights: Union[str, tuple[float, ...], None] = None
    num_generations: int = 8
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    num_iterations: int = 1
    FLAT: ClassVar[dict[str, str]] = {}


# ------------------------------------------------------------------------------------------------------------
# flat names <-> groups
# ------------------------------------------------------------------------------------------------------------
def is_group(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def flat_name(group: Any, field: str) -> str:
    return getattr(group, "FLAT", {}).get(field, field)


def flatten(args: Mapping[str, Any]) -> dict[str, Any]:
    """`args` (a script's arguments, groups among them) with every group spread out under its fields' flat names:
    {"lora": LoRAArgs(r=8, ...), "seed": 42} -> {"lora_r": 8, ..., "seed": 42}."""
    flat = {}
    for name, value in args.items():
        if is_group(value):
            flat.update({flat_name(value, f.name): getattr(value, f.name) for f in dataclasses.fields(value)})
        else:
            flat[name] = value
    return flat


def flat_names(function: Callable) -> dict[str, tuple[str, Optional[str]]]:
    """{flat name: (parameter, field or None)} for `function`'s parameters: a group's fields under their flat names,
    a plain parameter under its own."""
    names = {}
    for name, p in inspect.signature(function).parameters.items():
        if is_group(p.default):
            names.update({flat_name(p.default, f.name): (name, f.name) for f in dataclasses.fields(p.default)})
        else:
            names[name] = (name, None)
    return names


def groups(function: Callable) -> dict[str, Any]:
    """{parameter: its default} for `function`'s grouped parameters."""
    return {name: p.default for name, p in inspect.signature(function).parameters.items() if is_group(p.default)}


def flat_defaults(function: Callable) -> dict[str, Any]:
    """`function`'s defaults under their flat names (as the scripts' flat signatures gave them)."""
    return flatten({name: p.default for name, p in inspect.signature(function).parameters.items()})


def nest(function: Callable, flat: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for `function` from flat ones (groups may be given whole too, and nested as dicts):
    {"lora_r": 4, "seed": 1} -> {"lora": replace(default lora, r=4), "seed": 1}."""
    names, defaults = flat_names(function), groups(function)
    kwargs: dict[str, Any] = {}
    fields: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if key in defaults and (is_group(value) or isinstance(value, dict)):
            if is_group(value):
                kwargs[key] = value
            else:
                fields.setdefault(key, {}).update(value)
        elif key in names and names[key][1] is not None:
            parameter, field = names[key]
            fields.setdefault(parameter, {})[field] = value
        elif key in names:
            kwargs[key] = value
        else:
            raise TypeError(f"{function.__name__}() got an unexpected keyword argument {key!r}")
    for parameter, values in fields.items():
        kwargs[parameter] = dataclasses.replace(kwargs.get(parameter, defaults[parameter]), **values)
    return kwargs


def call_flat(function: Callable, **flat: Any) -> Any:
    """`function(**flat)` as the scripts took it before their arguments were grouped: call_flat(setup, lora_r=4)."""
    return function(**nest(function, flat))


def nested_config(function: Callable, config: Mapping[str, Any]) -> dict[str, Any]:
    """A --config file's content with flat keys (`lora_r: 4`) moved into their groups (`lora: {r: 4}`)."""
    names, defaults = flat_names(function), groups(function)
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key in defaults and isinstance(value, dict):
            out.setdefault(key, {}).update(value)
        elif key in names and names[key][1] is not None:
            parameter, field = names[key]
            out.setdefault(parameter, {})[field] = value
        else:
            out[key] = value
    return out


def nested_flags(function: Callable, argv: list[str]) -> list[str]:
    """Command-line arguments with flat flags (`--lora_r 4`, `--learning_rate=1e-3`) renamed to the nested ones
    (`--lora.r 4`), and a bool flag given alone (`--resume`, `--packing`, `--lora.dora`) followed by `true`."""
    names = flat_names(function)
    bools = {name for name, p in inspect.signature(function).parameters.items()
             if p.annotation in (bool, "bool") or isinstance(p.default, bool)}
    for name, group in groups(function).items():
        bools |= {f"{name}.{f.name}" for f in dataclasses.fields(group) if f.type in (bool, "bool")}
    out = []
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if key in names and names[key][1] is not None:
                key = ".".join(names[key])
                arg = f"--{key}{eq}{value}"
            out.append(arg)
            if key in bools and not eq and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                out.append("true")
        else:
            out.append(arg)
    return out


def flag_help(function: Callable) -> dict[str, str]:
    """{"lora.r": "rank of the update B A.", ...}: the help of each grouped field, from `function`'s docstring Args
    (where each is written as `lora.r: ...`), for --help."""
    docs: dict[str, str] = {}
    doc = inspect.getdoc(function) or ""
    lines = doc.split("Args:", 1)[1].splitlines() if "Args:" in doc else []
    key = None
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        head, colon, text = stripped.partition(": ")
        if indent == 4 and colon and "." in head and " " not in head:
            key = head
            docs[key] = text
        elif indent == 4:
            key = None
        elif key and indent > 4 and stripped:
            docs[key] += " " + stripped
    return docs


def run_record(args: Mapping[str, Any]) -> dict[str, Any]:
    """A script's arguments (its main's locals() on entry) flat and plain, as hparams.yaml and the resume state keep
    them: {"checkpoint_dir": "checkpoints/...", "lora_r": 8, "learning_rate": 0.002, ...}."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in flatten(args).items() if k != "fabric"}


def with_precision(hardware: HardwareArgs, on_gpu: str = "bf16-true") -> HardwareArgs:
    """--precision's default: `on_gpu` on a GPU that has bfloat16, 32-true otherwise."""
    if hardware.precision is not None:
        return hardware
    import torch

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return dataclasses.replace(hardware, precision=on_gpu if bf16 else "32-true")
