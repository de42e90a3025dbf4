"""Verifiable rewards for GRPO (finetune/grpo.py --reward NAME[,NAME...] [--reward_weights w1,w2...]).

A reward function takes the batch's prompts and completions (texts) and the data's columns (each a list, one
entry per completion, as TRL passes them) and returns one number per completion:

    def my_reward(prompts: list[str], completions: list[str], **row) -> list[float]: ...

Built in (row["output"] is the data's expected answer):
  json_valid   1 if the completion starts with a JSON object, else 0
  json_keys    1 if that object has exactly the expected object's keys, else 0
  json_values  the share of keys (expected or present) whose value is right: 1 exactly when the object equals the
               expected one (lora_lab/json_score.py's all_correct), partial credit for each right value
  gsm8k        1 if the completion's final number equals the expected answer's (the number after "####", else
               the last number), else 0
  length       1 - |len(completion) - target| / target (characters, at least 0): `length` (target 100) or
               `length:N`
A user's own: `path/to/file.py:function`. Several are summed, weighted by --reward_weights (default 1 each).
A reward that raises, or returns a list of the wrong length or something not a number, stops the run with one
line naming it (`compute_rewards`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from lora_lab.json_score import parse_json_object
from lora_lab.utils import LoraLabError

RewardFunction = Callable[..., list]


def _expected_objects(row: dict, n: int) -> list[Optional[dict]]:
    outputs = row.get("output") or [None] * n
    objects = []
    for text in outputs:
        try:
            obj = json.loads(text) if isinstance(text, str) else text
        except json.JSONDecodeError:
            obj = None
        objects.append(obj if isinstance(obj, dict) else None)
    return objects


def json_valid(prompts, completions, **row) -> list[float]:
    return [float(parse_json_object(c) is not None) for c in completions]


def json_keys(prompts, completions, **row) -> list[float]:
    out = []
    for c, expected in zip(completions, _expected_objects(row, len(completions))):
        obj = parse_json_object(c)
        out.append(float(obj is not None and expected is not None and set(obj) == set(expected)))
    return out


def json_values(prompts, completions, **row) -> list[float]:
    out = []
    for c, expected in zip(completions, _expected_objects(row, len(completions))):
        obj = parse_json_object(c)
        if obj is None or not expected:
            out.append(0.0)
            continue
        keys = set(expected) | set(obj)  # an extra key costs as a wrong value does
        out.append(sum(k in obj and k in expected and obj[k] == expected[k] for k in keys) / len(keys))
    return out


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> Optional[float]:
    """The number after the last "####" (GSM8K's answer mark), else the last number in the text."""
    if not isinstance(text, str):
        return None
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    numbers = NUMBER.findall(tail)
    if not numbers:
        return None
    try:
        return float(numbers[0 if "####" in text else -1].replace(",", ""))
    except ValueError:
        return None


def gsm8k(prompts, completions, **row) -> list[float]:
    expected = row.get("output") or [None] * len(completions)
    out = []
    for c, e in zip(completions, expected):
        want, got = final_number(e), final_number(c)
        out.append(float(want is not None and got is not None and math.isclose(want, got, abs_tol=1e-6)))
    return out


def length_reward(target: int) -> RewardFunction:
    def length(prompts, completions, **row) -> list[float]:
        return [max(0.0, 1 - abs(len(c) - target) / target) for c in completions]

    return length


BUILTIN = {"json_valid": json_valid, "json_keys": json_keys, "json_values": json_values, "gsm8k": gsm8k,
           "length": length_reward(100)}


def split_list(value: Union[str, Sequence, None]) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def check_reward_spec(spec: str) -> None:
    """Cheap checks of one --reward entry (no import of the user's file): a built-in name or FILE.py:function."""
    name, _, arg = spec.partition(":")
    if name in BUILTIN:
        if arg and not (name == "length" and arg.isdigit() and int(arg) > 0):
            raise LoraLabError(f"--reward {spec}: only length takes an argument, a positive whole number "
                               "(length:200)")
        return
    if not name.endswith(".py") or not arg:
        raise LoraLabError(f"--reward {spec!r}: use a built-in ({', '.join(BUILTIN)}) or path/to/file.py:function")
    if not Path(name).expanduser().is_file():
        raise LoraLabError(f"--reward {spec}: {name} does not exist")


def load_reward(spec: str) -> tuple[str, RewardFunction]:
    """(name, function) of one --reward entry."""
    check_reward_spec(spec)
    name, _, arg = spec.partition(":")
    if name in BUILTIN:
        return (spec.replace(":", "_"), length_reward(int(arg))) if arg else (name, BUILTIN[name])
    path = Path(name).expanduser()
    module_spec = importlib.util.spec_from_file_location(f"lora_lab_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file: say which and why, in one line
        raise LoraLabError(f"--reward {spec}: importing {path} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, arg, None)
    if not callable(fn):
        raise LoraLabError(f"--reward {spec}: {path} has no function {arg!r}")
    return arg, fn


def load_rewards(reward: Union[str, Sequence[str]],
                 reward_weights: Union[str, Sequence[float], None] = None) -> tuple[list[str], list, torch.Tensor]:
    """(names, functions, weights (F,)) from --reward and --reward_weights."""
    specs = split_list(reward)
    if not specs:
        raise LoraLabError(f"--reward: name at least one reward function ({', '.join(BUILTIN)}, or file.py:function)")
    loaded = [load_reward(s) for s in specs]
    weights = check_reward_weights(reward_weights, len(specs))
    return [n for n, _ in loaded], [f for _, f in loaded], torch.tensor(weights, dtype=torch.float32)


def check_reward_weights(reward_weights, n: int) -> list[float]:
    if reward_weights is None:
        return [1.0] * n
    try:
        weights = [float(w) for w in split_list(reward_weights)]
    except ValueError:
        raise LoraLabError(f"--reward_weights {reward_weights!r}: give numbers, one per --reward") from None
    if len(weights) != n or not all(math.isfinite(w) for w in weights):
        raise LoraLabError(f"--reward_weights {reward_weights!r}: give {n} finite number(s), one per --reward")
    return weights


def compute_rewards(names: Sequence[str], functions: Sequence[RewardFunction], prompts: Sequence[str],
                    completions: Sequence[str], rows: Sequence[dict]) -> torch.Tensor:
    """(N, F) rewards, unweighted; a function that raises or answers wrongly stops with one line naming it."""
    columns = {k: [r.get(k) for r in rows] for k in rows[0]} if rows else {}
    out = torch.empty(len(completions), len(functions))
    for k, (name, fn) in enumerate(zip(names, functions)):
        try:
            values = fn(prompts=list(prompts), completions=list(completions), **columns)
        except Exception as e:  # noqa: BLE001 - any failure of a user's function is reported the same way
            raise LoraLabError(f"reward {name} raised {type(e).__name__}: {e}") from None
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise LoraLabError(f"reward {name} returned {got} for {len(completions)} completions: return a list "
                               "with one number per completion")
        try:
            out[:, k] = torch.tensor([float(v) for v in values])
        except (TypeError, ValueError):
            raise LoraLabError(f"reward {name} returned something that is not a number: {values!r:.80}") from None
        if not torch.isfinite(out[:, k]).all():
            raise LoraLabError(f"reward {name} returned a NaN or infinite value")
    return out
