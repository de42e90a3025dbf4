"""Cheap checks first: every argument that can be judged without data or a model is refused, in one line, before
the data set is built or a model loaded, in all four finetune scripts and all four generate scripts.

The scripts run in-process with the model loader and the data pipeline replaced by functions that fail the test
if they are reached; one CLI run checks the one-line message, the exit status and that nothing was fetched."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from lora_lab.model import GPT
from lora_lab.utils import LoraLabError
from lora_lab.args import call_flat

FINETUNE = ["lora", "qlora", "full", "adapter"]
GENERATE = ["base", "full", "lora", "adapter"]


def load_script(path: Path):
    return importlib.import_module(f"{path.parent.name}.{path.stem}")  # finetune.lora, generate.base, ...


@pytest.fixture
def nothing_slow(monkeypatch):
    """Loading a model or building a data set fails the test."""
    def slow(*args, **kwargs):
        raise AssertionError("reached the slow part before the mistake was reported")

    monkeypatch.setattr(GPT, "from_checkpoint", slow)
    monkeypatch.setattr("lora_lab.data.get_dataloaders", slow)
    return slow


# (overrides, the message) for every script; script-specific ones below
COMMON = [
    (dict(batch_size=0), r"--batch_size 0: use a whole number >= 1"),
    (dict(micro_batch_size=0), r"--micro_batch_size 0"),
    (dict(batch_size=4, micro_batch_size=8), r"--micro_batch_size 8 is larger than --batch_size 4"),
    (dict(max_steps=0), r"--max_steps 0"),
    (dict(learning_rate=-1.0), r"--learning_rate -1.0: use a number > 0"),
    (dict(eval_interval=0), r"--eval_interval 0"),
    (dict(max_seq_length=0), r"--max_seq_length 0"),
    (dict(precision="bf17-true"), r"--precision 'bf17-true': use one of .*bf16-true"),
    (dict(logger_name="tensorbored"), r"--logger_name 'tensorbored': use one of csv, tensorboard, mlflow, wandb"),
    (dict(data="no_such_file.json"), r"--data 'no_such_file.json' is neither a dataset name"),
    (dict(val_data="no_such_val.json"), r"--val_data 'no_such_val.json'"),
    (dict(max_time="soon"), r"--max_time 'soon'"),
    (dict(checkpoint_dir=Path("no/such/checkpoint")), r"Checkpoint directory no/such/checkpoint does not exist"),
    (dict(columns={"question": "q"}), r"--columns: unknown field question: map some of instruction, input"),
    (dict(columns={"output": "answer"}), r"--data json_extraction has no columns to rename"),
]
SPECIFIC = {
    "lora": [(dict(lora_r=0), r"--lora_r 0: use a whole number >= 1"),
             (dict(lora_alpha=0.0), r"--lora_alpha 0.0"),
             (dict(lora_dropout=1.0), r"--lora_dropout 1.0"),
             (dict(lora_targets="quary"), r"unknown LoRA target 'quary'")],
    "qlora": [(dict(lora_r=-4), r"--lora_r -4"), (dict(nf4_blocksize=0), r"--nf4_blocksize 0")],
    "full": [(dict(optimizer="adam"), r"--optimizer 'adam'")],
    "adapter": [(dict(adapter_prompt_length=0), r"adapter_prompt_length must be a positive integer, got 0"),
                (dict(adapter_version=3, adapter_start_layer=1), r"adapter_version must be 1 \(LLaMA-Adapter\) or 2"),
                (dict(adapter_start_layer=2), r"adapter_start_layer=2 but the model has only 2 layers")],
}


@pytest.mark.parametrize("name", FINETUNE)
def test_finetune_scripts_check_arguments_before_anything_slow(name, tiny_ckpt, tmp_path, nothing_slow):
    script = load_script(ROOT / "finetune" / f"{name}.py")
    for overrides, message in COMMON + SPECIFIC[name]:
        args = {"checkpoint_dir": tiny_ckpt, "out_dir": tmp_path / "out", **overrides}
        with pytest.raises(LoraLabError, match=message):
            call_flat(script.setup, **args)
    file = tmp_path / "a_file"
    file.write_text("")
    with pytest.raises(LoraLabError, match="--out_dir .*a_file is a file"):
        call_flat(script.setup, checkpoint_dir=tiny_ckpt, out_dir=file)


GENERATE_CASES = [
    (dict(max_new_tokens=0), r"--max_new_tokens 0"),
    (dict(temperature=-0.5), r"--temperature -0.5: use a number >= 0"),
    (dict(top_k=0), r"--top_k 0"),
    (dict(top_p=1.5), r"--top_p 1.5: use a probability in \(0, 1\]"),
    (dict(precision="bf17"), r"--precision 'bf17': use one of .*bfloat16"),
    (dict(checkpoint_dir=Path("no/such/checkpoint")), r"Checkpoint directory no/such/checkpoint does not exist"),
]


@pytest.mark.parametrize("name", GENERATE)
def test_generate_scripts_check_arguments_before_anything_slow(name, tiny_ckpt, tmp_path, nothing_slow):
    script = load_script(ROOT / "generate" / f"{name}.py")
    for overrides, message in GENERATE_CASES:
        args = {"checkpoint_dir": tiny_ckpt, **overrides}
        if name in ("lora", "adapter"):
            args["adapter_dir"] = tmp_path / "no_adapter_needed"  # the checks come before the adapter is read
        with pytest.raises(LoraLabError, match=message):
            script.main(**args)


def test_cli_mistake_is_one_line_in_a_second_and_fetches_nothing(tmp_path):
    """From a fresh folder (the default model missing): a bad --lora_r is reported before the default model
    would be fetched, in one line, with exit status 1."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "finetune" / "lora.py"), "--lora_r", "0"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t0
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == ["error: --lora_r 0: use a whole number >= 1"]
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "out").exists()
    print(f"\n--lora_r 0 refused in {seconds:.1f} s (imports included)")
