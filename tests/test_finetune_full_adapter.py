"""finetune/full.py and finetune/adapter.py end to end, and generate/full.py, generate/adapter.py on what they write.

Like tests/test_finetune_lora.py (whose helpers this file reuses), most runs are in-process on a tiny random model with
SmolLM2's real tokenizer (tests/tiny_checkpoint.py). What the two scripts share with finetune/lora.py (the training
loop, validation, Ctrl-C and time budget, bad-input lines, data parallel) is tested there and kept identical by
tests/test_scripts_consistency.py; here: what each method writes, one exact resume each, the method's own options
and errors, and (slow) a real fine-tune of SmolLM2-135M-Instruct with each."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import finetune.adapter as fa
import finetune.full as ff
import generate.adapter as gen_adapter
import generate.full as gen_full
from conftest import ROOT, THREADS, require_asset
from lora_lab.adapter import (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, AdapterConfig, load_adapter,
                              load_adapter_state_dict)
from lora_lab.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_config, load_state_dict, save_checkpoint
from lora_lab.generate import generate
from lora_lab.model import GPT
from lora_lab.nf4 import quantize_nf4
from lora_lab.prompts import PromptStyle
from lora_lab.tokenizer import Tokenizer
from lora_lab.training import TRAIN_STATE_FILE
from lora_lab.utils import LoraLabError, cli
from lora_lab.args import call_flat
from test_finetune_lora import deterministic, metrics, stop_after
from tiny_checkpoint import SMOL_TOKENIZER, write_tiny_checkpoint

# 12 training samples in micro-batches of 2: 3 optimizer steps of batch 4 per epoch, so 8 steps cross 2 epoch
# boundaries. NEFTune noise makes the RNG state matter for an exact resume (the models have no dropout).
RUN = dict(data="json_extraction", n_train=12, n_val=4, eval_samples=0, max_steps=8, batch_size=4,
           micro_batch_size=2, max_seq_length=256, warmup_steps=2, neftune_alpha=5.0, eval_interval=4,
           eval_iters=2, save_interval=100, log_interval=1, seed=7)
FULL = dict(RUN, learning_rate=1e-3)
ADAPTER = dict(RUN, learning_rate=3e-2, adapter_prompt_length=4, adapter_start_layer=1)  # the tiny model has 2 layers


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def run_full(ckpt: Path, out_dir: Path, **overrides) -> Path:
    call_flat(ff.setup, checkpoint_dir=ckpt, out_dir=out_dir, **{**FULL, **overrides})
    return out_dir


# besides metrics.csv, every run writes its hyperparameters and its loss plot (tests/test_run_record.py)
RUN_RECORD = ("hparams.yaml", "loss.png")


def run_adapter(ckpt: Path, out_dir: Path, **overrides) -> Path:
    call_flat(fa.setup, checkpoint_dir=ckpt, out_dir=out_dir, **{**ADAPTER, **overrides})
    return out_dir


def assert_tensors_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by up to {(a[k].float() - b[k].float()).abs().max().item():.3g}"


def summary_line(stdout: str, n_steps: int) -> int:
    """The trainable-parameter count of the run's closing line (which must be there, well formed)."""
    found = re.search(rf"^Trainable parameters ([\d,]+) \| {n_steps} steps in \S+ \| [\d,]+ tokens/s \| MFU \d+\.\d% "
                      rf"\([^)]*\) \| peak memory \d+\.\d\d GiB \| final val loss \d+\.\d+$", stdout, re.M)
    assert found, stdout
    return int(found.group(1).replace(",", ""))


def run_cli(monkeypatch, capsys, main, *args: str) -> str:
    """A script's command line in this process; it must fail with exactly one `error:` line, no traceback."""
    monkeypatch.setattr(sys, "argv", ["script", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli(main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


def generated_text(monkeypatch, capsys, main, *args: str) -> str:
    monkeypatch.setattr(sys, "argv", ["script", *args])
    cli(main)
    return capsys.readouterr().out


def greedy_reference(model: GPT, ckpt: Path, prompt: str, style_name: str, n: int = 12) -> str:
    """What a generate/*.py script must print for `prompt` at temperature 0: the model's own greedy answer."""
    tokenizer = Tokenizer(ckpt)
    style = PromptStyle.from_checkpoint(ckpt, style_name)
    stop = list(dict.fromkeys(tokenizer.eos_ids + style.stop_tokens(tokenizer)))
    ids = [i for i in generate(model.eval(), tokenizer.encode(style.apply(prompt)), n, eos_ids=stop) if i not in stop]
    return tokenizer.decode(ids)


# ------------------------------------------------------------------------------------------------------------
# finetune/full.py
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_reference(tiny_ckpt, tmp_path_factory):
    """The uninterrupted full fine-tuning run that the stopped-and-resumed one must reproduce exactly."""
    return run_full(tiny_ckpt, tmp_path_factory.mktemp("full_reference") / "out")


def test_full_run_writes_a_checkpoint_that_loads_everywhere(tiny_ckpt, full_reference, tmp_path, monkeypatch, capsys):
    out = full_reference
    tokenizer_files = {p.name for p in tiny_ckpt.iterdir()} - {CONFIG_FILE, WEIGHTS_FILE}
    assert tokenizer_files >= {"tokenizer.json", "tokenizer_config.json"}
    assert {p.name for p in out.iterdir()} == {CONFIG_FILE, WEIGHTS_FILE, "metrics.csv", TRAIN_STATE_FILE,
                                               *RUN_RECORD, *tokenizer_files}
    base_config, config = load_config(tiny_ckpt), load_config(out)
    assert config.prompt_style == "chatml" and config.extra == {"finetuned_from": str(tiny_ckpt)}
    assert {**config.to_dict(), "extra": {}} == {**base_config.to_dict(), "extra": {}}
    # every tensor trained, and the checkpoint holds what the resume state holds (float32 here: no rounding)
    base, tuned = load_state_dict(tiny_ckpt / WEIGHTS_FILE), load_state_dict(out / WEIGHTS_FILE)
    assert tuned.keys() == base.keys() and "lm_head.weight" not in tuned  # tied: saved once, as the base
    assert all(not torch.equal(tuned[k], base[k]) for k in base)
    state = torch.load(out / TRAIN_STATE_FILE, weights_only=True)
    assert_tensors_equal({k: v for k, v in state["model"].items() if k != "lm_head.weight"}, tuned)
    assert state["counters"] == {"step": 8, "micro_batches": 16, "tokens": state["counters"]["tokens"],
                                 "seconds": state["counters"]["seconds"],
                                 "lr_schedule": state["counters"]["lr_schedule"]}  # the budget schedule's state
    assert len(state["optimizer"]["state"]) == len(tuned)  # AdamW moments for every parameter, by name
    rows = metrics(out)
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert [bool(r["val_loss"]) for r in rows] == [False, False, False, True] * 2
    assert float(rows[-1]["val_loss"]) < float(rows[3]["val_loss"])

    # GPT.from_checkpoint, generate/full.py, and a Hugging Face export that converts back to the same weights
    model = GPT.from_checkpoint(out)
    prompt = "Extract the name: Ada Lovelace wrote the first program."
    expected = greedy_reference(model, out, prompt, "chatml")
    printed = generated_text(monkeypatch, capsys, gen_full.main, "--checkpoint_dir", str(out), "--prompt", prompt,
                             "--temperature", "0", "--max_new_tokens", "12")
    assert printed == expected + "\n" and expected
    from lora_lab.formats.convert import main as convert_main

    convert_main(["--to", "hf", str(out), str(tmp_path / "hf")])
    convert_main([str(tmp_path / "hf"), str(tmp_path / "back")])
    assert_tensors_equal(load_state_dict(tmp_path / "back" / WEIGHTS_FILE), tuned)


def test_full_resume_after_stop_is_exact(tiny_ckpt, full_reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(ff, "StopRequest", stop_after(4))  # mid-epoch (3 steps per epoch)
    run_full(tiny_ckpt, out)
    assert "Stopped at step 4; state saved" in capsys.readouterr().out
    stopped = load_state_dict(out / WEIGHTS_FILE)
    monkeypatch.undo()
    run_full(tiny_ckpt, out, resume=True)
    assert "Resuming from step 4 of 8" in capsys.readouterr().out
    final = load_state_dict(out / WEIGHTS_FILE)
    assert not torch.equal(final["wte.weight"], stopped["wte.weight"])
    assert_tensors_equal(final, load_state_dict(full_reference / WEIGHTS_FILE))  # bit for bit
    assert deterministic(metrics(out)) == deterministic(metrics(full_reference))


@pytest.mark.parametrize("optimizer, state_keys", [("sgd", {"momentum_buffer"}),
                                                   ("adafactor", {"step", "row_var", "col_var", "variance"})])
def test_full_other_optimizers_train_and_save_their_state(tiny_ckpt, tmp_path, capsys, optimizer, state_keys):
    out = run_full(tiny_ckpt, tmp_path / "out", optimizer=optimizer, learning_rate=None, max_steps=2, eval_interval=2)
    stdout = capsys.readouterr().out
    assert f"Full fine-tuning with {optimizer}:" in stdout
    lr = ff.DEFAULT_LEARNING_RATES[optimizer]
    assert [float(r["lr"]) for r in metrics(out)] == [lr / 2, lr]  # warm-up to the optimizer's default rate
    state = torch.load(out / TRAIN_STATE_FILE, weights_only=True)["optimizer"]["state"]
    assert set().union(*(s.keys() for s in state.values())) <= state_keys | {"step"}
    assert state_keys <= set().union(*(s.keys() for s in state.values()))
    assert not torch.equal(load_state_dict(out / WEIGHTS_FILE)["wte.weight"],
                           load_state_dict(tiny_ckpt / WEIGHTS_FILE)["wte.weight"])


@pytest.mark.parametrize("base_dtype, precision, trained_dtype", [(torch.float32, "bf16-true", torch.bfloat16),
                                                                    (torch.bfloat16, "32-true", torch.float32)])
def test_full_trains_in_the_precisions_dtype_and_saves_in_the_bases(tiny_ckpt, tmp_path, base_dtype, precision,
                                                                   trained_dtype):
    """bf16-true trains bfloat16 weights; every other precision float32 master weights, even from a bfloat16
    checkpoint. model.safetensors has the base's dtype, the resume state the weights as they trained."""
    base = tmp_path / "base"
    weights = {k: v.to(base_dtype) for k, v in load_state_dict(tiny_ckpt / WEIGHTS_FILE).items()}
    save_checkpoint(base, load_config(tiny_ckpt), weights, tokenizer_dir=tiny_ckpt)
    out = run_full(base, tmp_path / "out", precision=precision, max_steps=2, eval_interval=2)
    state = torch.load(out / TRAIN_STATE_FILE, weights_only=True)
    assert {v.dtype for v in state["model"].values()} == {trained_dtype}
    saved = load_state_dict(out / WEIGHTS_FILE)
    assert {v.dtype for v in saved.values()} == {base_dtype}
    assert torch.equal(saved["wte.weight"], state["model"]["wte.weight"].to(base_dtype))
    assert not torch.equal(saved["wte.weight"], weights["wte.weight"])


def test_full_activation_checkpointing_changes_nothing_but_memory(tiny_ckpt, full_reference, tmp_path):
    out = run_full(tiny_ckpt, tmp_path / "out", activation_checkpointing=True)
    assert_tensors_equal(load_state_dict(out / WEIGHTS_FILE), load_state_dict(full_reference / WEIGHTS_FILE))


def test_full_errors(tiny_ckpt, tmp_path, monkeypatch, capsys):
    with pytest.raises(LoraLabError) as e:
        run_full(tiny_ckpt, tmp_path / "out", optimizer="lion")
    assert str(e.value) == "--optimizer 'lion': use one of adamw, sgd, adafactor"
    # a resume state from another optimizer does not fit: one line, not a KeyError deep in torch
    out = run_full(tiny_ckpt, tmp_path / "sgd", optimizer="sgd", max_steps=1, eval_interval=1)
    line = run_cli(monkeypatch, capsys, ff.setup, "--checkpoint_dir", str(tiny_ckpt), "--out_dir", str(out),
                   "--optimizer", "adafactor", "--resume", "--max_steps", "2")
    assert line == (f"error: {out / TRAIN_STATE_FILE} does not fit this model or --optimizer (KeyError): resume "
                    f"with the settings the run started with")


@pytest.mark.slow
def test_full_two_process_ddp_stop_and_resume_matches_one_process(tiny_ckpt, tmp_path):
    """Saving gathers the state on every rank and rank 0 writes it; resuming loads it on every rank: a 2-process
    run stopped after step 1 (--max_time 0) and resumed ends where one process does."""
    ddp = dict(FULL, n_train=10, max_steps=3, batch_size=4, micro_batch_size=1, eval_interval=3, neftune_alpha=0.0)
    args = [sys.executable, str(ROOT / "finetune" / "full.py"), "--checkpoint_dir", str(tiny_ckpt), "--out_dir",
            str(tmp_path / "out"), "--devices", "2", "--strategy", "ddp"]
    args += [a for k, v in ddp.items() for a in (f"--{k}", str(v))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra in (["--max_time", "0"], ["--resume"]):
        done = subprocess.run(args + extra, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr
    assert [int(r["step"]) for r in metrics(tmp_path / "out")] == [1, 2, 3]
    one = run_full(tiny_ckpt, tmp_path / "one", **ddp)
    two = load_state_dict(tmp_path / "out" / WEIGHTS_FILE)
    for k, v in load_state_dict(one / WEIGHTS_FILE).items():  # the gradient all-reduce sums in another order
        torch.testing.assert_close(two[k], v, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# finetune/adapter.py
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter_reference(tiny_ckpt, tmp_path_factory):
    return run_adapter(tiny_ckpt, tmp_path_factory.mktemp("adapter_reference") / "out")


def test_adapter_run_writes_the_adapter(tiny_ckpt, adapter_reference, tmp_path, monkeypatch, capsys):
    out = run_adapter(tiny_ckpt, tmp_path / "out", max_steps=3, eval_interval=3, eval_samples=2)
    stdout = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE, "metrics.csv",
                                               TRAIN_STATE_FILE, *RUN_RECORD}
    config, weights = load_adapter(out)
    assert config == AdapterConfig(adapter_prompt_length=4, adapter_start_layer=1, base_model=str(tiny_ckpt),
                                   base_config=load_config(tiny_ckpt).to_dict(), prompt_style="chatml")
    assert sorted(weights) == ["blocks.1.attn.adapter_gate", "blocks.1.attn.adapter_prefix"]
    assert weights["blocks.1.attn.adapter_prefix"].shape == (4, 32)
    assert weights["blocks.1.attn.adapter_gate"].shape == (4,)
    assert weights["blocks.1.attn.adapter_gate"].abs().min() > 0  # the gates opened
    n_trainable = 4 * 32 + 4
    assert "LLaMA-Adapter: 4 prompt vectors in layers 1-1: 132 trainable parameters" in stdout
    assert summary_line(stdout, 3) == n_trainable
    assert re.search(r"JSON before -> after fine-tuning: valid \d+% -> \d+%", stdout)
    state = torch.load(out / TRAIN_STATE_FILE, weights_only=True)
    assert_tensors_equal(state["adapter"], weights)

    # generate/adapter.py prints the adapted model's greedy answer (with the base named in adapter_config.json)
    model = GPT.from_checkpoint(tiny_ckpt)
    config.inject(model)
    load_adapter_state_dict(model, weights)
    prompt = "Extract the city: the train left Lyon at noon."
    expected = greedy_reference(model, tiny_ckpt, prompt, "chatml")
    printed = generated_text(monkeypatch, capsys, gen_adapter.main, "--adapter_dir", str(out), "--prompt", prompt,
                             "--temperature", "0", "--max_new_tokens", "12")
    assert printed == expected + "\n" and expected
    # and what that model computes is not the base model's: the gates opened
    idx = Tokenizer(tiny_ckpt).encode(prompt)[None]  # (1, T)
    assert not torch.allclose(model(idx), GPT.from_checkpoint(tiny_ckpt)(idx), atol=1e-4)
    # --quantize nf4: the adapter on the 4-bit base
    monkeypatch.setattr(sys, "argv", ["script", "--adapter_dir", str(out), "--checkpoint_dir", str(tiny_ckpt),
                                      "--prompt", prompt, "--temperature", "0", "--max_new_tokens", "12",
                                      "--quantize", "nf4"])
    cli(gen_adapter.main)
    printed, err = capsys.readouterr()
    assert re.search(r"^NF4: 14 linear layers at 4\.\d+ bits per weight", err, re.M), err  # 2 blocks x 7
    nf4_model = quantize_nf4(GPT.from_checkpoint(tiny_ckpt))
    config.inject(nf4_model)
    load_adapter_state_dict(nf4_model, weights)
    assert printed == greedy_reference(nf4_model, tiny_ckpt, prompt, "chatml") + "\n"


def test_adapter_resume_after_stop_is_exact(tiny_ckpt, adapter_reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(fa, "StopRequest", stop_after(3))  # at an epoch's end
    run_adapter(tiny_ckpt, out)
    assert "Stopped at step 3; state saved" in capsys.readouterr().out
    stopped = load_adapter(out)[1]
    monkeypatch.undo()
    run_adapter(tiny_ckpt, out, resume=True)
    assert "Resuming from step 3 of 8" in capsys.readouterr().out
    final = load_adapter(out)[1]
    assert not torch.equal(final["blocks.1.attn.adapter_prefix"], stopped["blocks.1.attn.adapter_prefix"])
    assert_tensors_equal(final, load_adapter(adapter_reference)[1])
    assert [int(r["step"]) for r in metrics(out)] == list(range(1, 9))
    assert deterministic(metrics(out)) == deterministic(metrics(adapter_reference))


def test_adapter_errors_are_one_line(tiny_ckpt, tmp_path, monkeypatch, capsys):
    args = ["--checkpoint_dir", str(tiny_ckpt), "--out_dir", str(tmp_path / "out"), "--max_steps", "1"]
    line = run_cli(monkeypatch, capsys, fa.setup, *args)  # the default start layer 2 of a 2-layer model
    assert line == ("error: adapter_start_layer=2 but the model has only 2 layers (0 ... 1): choose a start layer "
                    "below 2")
    line = run_cli(monkeypatch, capsys, fa.setup, *args, "--adapter_start_layer", "0", "--adapter_prompt_length", "0")
    assert line == "error: adapter_prompt_length must be a positive integer, got 0"
    assert not (tmp_path / "out").exists()  # checked before anything was loaded or written

    line = run_cli(monkeypatch, capsys, gen_adapter.main, "--adapter_dir", str(tiny_ckpt))
    assert line == (f"error: {tiny_ckpt} is not a LLaMA-Adapter directory: adapter_config.json is missing (it looks "
                    f"like a model checkpoint, not an adapter); pass the output directory of finetune/adapter.py")


def test_adapter_on_another_base_is_one_line(tiny_ckpt, adapter_reference, tmp_path, monkeypatch, capsys):
    wider = write_tiny_checkpoint(tmp_path / "wider", require_asset(SMOL_TOKENIZER), n_embd=48, n_head=6,
                                  n_query_groups=3)
    line = run_cli(monkeypatch, capsys, gen_adapter.main, "--adapter_dir", str(adapter_reference),
                   "--checkpoint_dir", str(wider))
    assert line.startswith(f"error: {adapter_reference} was trained on tiny-smollm2, whose shapes differ from {wider} "
                           f"(n_embd 32 vs 48")


# ------------------------------------------------------------------------------------------------------------
# finetune/adapter.py --adapter_version 2 (LLaMA-Adapter V2)
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter_v2_reference(tiny_ckpt, tmp_path_factory):
    return run_adapter(tiny_ckpt, tmp_path_factory.mktemp("adapter_v2_reference") / "out", adapter_version=2)


def test_adapter_v2_run_writes_the_adapter_and_generate_reads_its_version(tiny_ckpt, tmp_path, monkeypatch, capsys):
    out = run_adapter(tiny_ckpt, tmp_path / "out", max_steps=3, eval_interval=3, adapter_version=2)
    stdout = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE, "metrics.csv",
                                               TRAIN_STATE_FILE, *RUN_RECORD}
    config, weights = load_adapter(out)
    assert config.adapter_version == 2
    # the v1 tensors, a scale and a bias on each of the 2 x 7 linear layers and lm_head, the 5 norms' weights
    linears = [f"blocks.{i}.{m}" for i in (0, 1) for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj",
                                                            "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                            "mlp.down_proj")] + ["lm_head"]
    norms = ["blocks.0.norm_1", "blocks.0.norm_2", "blocks.1.norm_1", "blocks.1.norm_2", "norm_f"]
    assert sorted(weights) == sorted(["blocks.1.attn.adapter_gate", "blocks.1.attn.adapter_prefix"]
                                     + [f"{m}.adapter_{p}" for m in linears for p in ("scale", "bias")]
                                     + [f"{n}.weight" for n in norms])
    # 132 (v1) + 2 x 2 x (32 + 16 + 16 + 32 + 64 + 64 + 32) + 2 x 49,152 (lm_head) + 5 x 32 (norms)
    n_trainable = 132 + 2 * 2 * 256 + 2 * 49_152 + 5 * 32
    assert (f"LLaMA-Adapter V2: 4 prompt vectors in layers 1-1, scale and bias on every linear layer, trainable "
            f"norms: {n_trainable:,} trainable parameters") in stdout
    assert summary_line(stdout, 3) == n_trainable == 99_620
    rows = metrics(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and all(float(r["train_loss"]) > 0 for r in rows)
    assert rows[-1]["val_loss"]
    base = load_state_dict(tiny_ckpt / WEIGHTS_FILE)
    for name in ("norm_f.weight", "blocks.0.norm_1.weight"):  # the norms trained (and are saved)
        assert not torch.equal(weights[name], base[name])
    assert not torch.equal(weights["lm_head.adapter_scale"], torch.ones(49_152))
    state = torch.load(out / TRAIN_STATE_FILE, weights_only=True)
    assert_tensors_equal(state["adapter"], weights)
    # weight decay (the default 0.02) on the prefixes and gates, none on the scales, biases and norms
    assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [0.02, 0.0]

    # generate/adapter.py reads the version from adapter_config.json: it prints the V2 model's greedy answer
    model = GPT.from_checkpoint(tiny_ckpt)
    config.inject(model)
    load_adapter_state_dict(model, weights)
    prompt = "Extract the city: the train left Lyon at noon."
    printed = generated_text(monkeypatch, capsys, gen_adapter.main, "--adapter_dir", str(out), "--prompt", prompt,
                             "--temperature", "0", "--max_new_tokens", "12")
    assert printed == greedy_reference(model, tiny_ckpt, prompt, "chatml") + "\n"
    # --quantize nf4: V2's scales and biases on the 4-bit linear layers
    monkeypatch.setattr(sys, "argv", ["script", "--adapter_dir", str(out), "--prompt", prompt, "--temperature", "0",
                                      "--max_new_tokens", "12", "--quantize", "nf4"])
    cli(gen_adapter.main)
    printed, err = capsys.readouterr()
    assert "+ LLaMA-Adapter V2" in err
    assert re.search(r"^NF4: 14 linear layers at 4\.\d+ bits per weight", err, re.M), err
    nf4_model = quantize_nf4(GPT.from_checkpoint(tiny_ckpt))
    config.inject(nf4_model)
    load_adapter_state_dict(nf4_model, weights)
    assert printed == greedy_reference(nf4_model, tiny_ckpt, prompt, "chatml") + "\n"


def test_adapter_v2_resume_after_stop_is_exact(tiny_ckpt, adapter_v2_reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(fa, "StopRequest", stop_after(4))  # mid-epoch
    run_adapter(tiny_ckpt, out, adapter_version=2)
    assert "Stopped at step 4; state saved" in capsys.readouterr().out
    stopped = load_adapter(out)[1]
    monkeypatch.undo()
    run_adapter(tiny_ckpt, out, resume=True, adapter_version=2)
    assert "Resuming from step 4 of 8" in capsys.readouterr().out
    final = load_adapter(out)[1]
    assert not torch.equal(final["norm_f.weight"], stopped["norm_f.weight"])
    assert_tensors_equal(final, load_adapter(adapter_v2_reference)[1])  # bit for bit
    assert deterministic(metrics(out)) == deterministic(metrics(adapter_v2_reference))


def test_adapter_version_errors_are_one_line(tiny_ckpt, adapter_reference, tmp_path, monkeypatch, capsys):
    args = ["--checkpoint_dir", str(tiny_ckpt), "--max_steps", "1", "--adapter_start_layer", "1"]
    line = run_cli(monkeypatch, capsys, fa.setup, *args, "--out_dir", str(tmp_path / "out"), "--adapter_version", "3")
    assert line == "error: adapter_version must be 1 (LLaMA-Adapter) or 2 (LLaMA-Adapter V2), got 3"
    assert not (tmp_path / "out").exists()
    # a v1 run resumed as V2: its state has no scales, biases or norms
    out = tmp_path / "v1"
    shutil.copytree(adapter_reference, out)
    line = run_cli(monkeypatch, capsys, fa.setup, *args, "--out_dir", str(out), "--resume", "--adapter_version", "2",
                   "--adapter_prompt_length", "4", "--n_train", "12", "--n_val", "4", "--eval_samples", "0")
    assert line == (f"error: {out / TRAIN_STATE_FILE}: the adapter is a LLaMA-Adapter v1 but the model has v2 "
                    f"adapters: inject_adapter with version=1 (the adapter_version of its adapter_config.json)")


# ------------------------------------------------------------------------------------------------------------
# the real thing: SmolLM2-135M-Instruct on the JSON task, each method for a few steps on a CPU
# ------------------------------------------------------------------------------------------------------------
REAL = dict(data="json_extraction", n_train=200, n_val=16, eval_samples=0, max_steps=8, batch_size=8,
            micro_batch_size=8, max_seq_length=256, warmup_steps=2, eval_interval=4, eval_iters=2, seed=42)


@pytest.fixture(scope="module")
def base_val_loss(smollm2):
    """The untrained model's loss on the same validation batches the runs validate on."""
    import lightning as L

    from lora_lab.data import get_dataloaders

    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
    tokenizer = Tokenizer(smollm2)
    style = PromptStyle.from_checkpoint(smollm2)
    _, val_dl, _ = get_dataloaders("json_extraction", tokenizer, style, max_seq_length=REAL["max_seq_length"],
                                   micro_batch_size=REAL["micro_batch_size"], seed=REAL["seed"],
                                   n_train=REAL["n_train"], n_val=REAL["n_val"], mask_prompt=True, bucket_by_length=True,
                                   pad_id=tokenizer.eos_id or 0, verbose=False)
    return ff.validate(fabric, GPT.from_checkpoint(smollm2), val_dl, REAL["eval_iters"])


@pytest.fixture
def all_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # the tiny tests run on one thread; these want this worker's cores
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "adapter"])
def test_real_finetune_lowers_validation_loss(method, smollm2, base_val_loss, tmp_path, all_threads):
    """8 steps of batch 8: full fine-tuning (AdamW, float32 on the CPU) and LLaMA-Adapter (10 prompt vectors from
    layer 2) each take the validation loss on the JSON task well below the base model's."""
    t0 = time.perf_counter()
    out = tmp_path / "out"
    # the scripts' own defaults besides REAL (not the tiny runs' RUN, whose NEFTune noise would come along)
    if method == "full":
        call_flat(ff.setup, checkpoint_dir=smollm2, out_dir=out, **REAL, learning_rate=5e-5)
    else:
        call_flat(fa.setup, checkpoint_dir=smollm2, out_dir=out, **REAL, learning_rate=3e-2, adapter_prompt_length=10,
                 adapter_start_layer=2)
    seconds = time.perf_counter() - t0
    val = [float(r["val_loss"]) for r in metrics(out) if r["val_loss"]]
    print(f"\nSmolLM2-135M-Instruct, {method}, 8 steps x batch 8 on CPU in {seconds:.0f} s: val loss "
          f"{base_val_loss:.4f} (base) -> {val[0]:.4f} (step 4) -> {val[1]:.4f} (step 8)")
    assert len(val) == 2 and val[1] < val[0] < base_val_loss
    assert val[1] < 0.6 * base_val_loss


def test_router_aux_loss_coef_on_a_mixture_of_experts_only(tmp_path):
    """--router_aux_loss_coef adds coef x the load-balancing loss to full fine-tuning's loss on a mixture-of-experts
    model (the first step's loss, same weights and batch, is larger by coef x the balancing loss: k = 2 when the
    load is even, up to E x k); on a dense model it is one line, before any data or model is loaded."""
    tok = require_asset(SMOL_TOKENIZER)
    moe = write_tiny_checkpoint(tmp_path / "moe", tok, n_expert=4, n_expert_per_token=2, moe_intermediate_size=16)
    first = {}
    for coef in (0.0, 1.0):
        out = run_full(moe, tmp_path / f"out{coef}", max_steps=1, router_aux_loss_coef=coef, neftune_alpha=0.0)
        first[coef] = float(metrics(out)[0]["train_loss"])
    assert 1.0 < first[1.0] - first[0.0] < 8.0
    dense = write_tiny_checkpoint(tmp_path / "dense", tok)
    with pytest.raises(LoraLabError, match="not a mixture-of-experts model"):
        run_full(dense, tmp_path / "out_dense", router_aux_loss_coef=0.001)
    assert not (tmp_path / "out_dense").exists()
