"""finetune/lora.py end to end: outputs, exact resume, bad input, 2-process data parallel, and a real fine-tune.

Most runs are in-process (`call_flat(ft.setup, ...)`) on a tiny random model with SmolLM2's real tokenizer
(tests/tiny_checkpoint.py); a few are subprocesses where the process boundary is what is tested (a real
Ctrl-C, `--config FILE.yaml`, Fabric launching a second process, the exit status of an error)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader

import finetune.lora as ft
from conftest import ROOT, THREADS
from lora_lab.args import call_flat
from lora_lab.checkpoint import load_config
from lora_lab.data import ShuffledBatchSampler
from lora_lab.data.json_extraction import json_extraction_dataset
from lora_lab.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, load_lora
from lora_lab.training import TRAIN_STATE_FILE, micro_batches
from lora_lab.utils import LoraLabError, cli

SCRIPT = ROOT / "finetune" / "lora.py"

# A run of a few seconds: 12 training samples in micro-batches of 2 are 6 micro-batches, i.e. 3 optimizer steps
# of batch 4, per epoch, so 10 steps cross 3 epoch boundaries. Dropout > 0 makes the RNG state matter.
RUN = dict(data="json_extraction", n_train=12, n_val=4, eval_samples=0, max_steps=10, batch_size=4,
           micro_batch_size=2, max_seq_length=256, learning_rate=1e-2, warmup_steps=2, lora_dropout=0.1,
           eval_interval=5, eval_iters=2, save_interval=100, log_interval=1, seed=7)


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def run(ckpt: Path, out_dir: Path, **overrides) -> Path:
    call_flat(ft.setup, checkpoint_dir=ckpt, out_dir=out_dir, **{**RUN, **overrides})
    return out_dir


def cli_args(ckpt: Path, out_dir: Path, **overrides) -> list[str]:
    args = ["--checkpoint_dir", str(ckpt), "--out_dir", str(out_dir)]
    for key, value in {**RUN, **overrides}.items():
        args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def script(*args: str, cwd: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=cwd, **popen)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} did not finish in {timeout} s:\n{out}\n{err}")
    return proc.returncode, out, err


def metrics(out_dir: Path) -> list[dict]:
    with open(out_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def deterministic(rows: list[dict]) -> list[tuple]:
    """The columns of metrics.csv that do not depend on timing."""
    return [(r["step"], r["train_loss"], r["val_loss"], r["val_ppl"], r["lr"], r["tokens"]) for r in rows]


def adapter(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_lora(out_dir)[1]


def assert_adapters_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by up to {(a[k] - b[k]).abs().max().item():.3g}"


def stop_after(n_steps: int):
    """A StopRequest whose `requested` turns True once n_steps optimizer steps have been taken, as if Ctrl-C
    had been pressed during step n_steps (fit() reads `requested` after each step)."""

    class StopAfter:
        def __init__(self) -> None:
            self.steps = 0
            self.hook = register_optimizer_step_post_hook(self._count)

        def _count(self, optimizer, args, kwargs) -> None:
            self.steps += 1

        @property
        def requested(self) -> bool:
            if self.steps >= n_steps:
                self.hook.remove()
                return True
            return False

        def restore(self) -> None:
            self.hook.remove()

    return StopAfter


@pytest.fixture(scope="module")
def reference_run(tiny_ckpt, tmp_path_factory):
    """The uninterrupted run of RUN, that the interrupted-and-resumed runs must reproduce exactly."""
    return run(tiny_ckpt, tmp_path_factory.mktemp("reference") / "out")


# ------------------------------------------------------------------------------------------------------------
# 1. smoke: what a run writes and prints
# ------------------------------------------------------------------------------------------------------------
def test_run_writes_adapter_metrics_and_state(tiny_ckpt, tmp_path, capsys):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out = run(tiny_ckpt, tmp_path / "out", n_train=32, n_val=8, eval_samples=2, max_steps=4, eval_interval=2,
              lora_targets=("query", "value"), lora_r=4, lora_alpha=8.0)
    # fit() handled Ctrl-C while training (save, then stop) and gives it back when done
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert {p.name for p in out.iterdir()} >= {ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE, "metrics.csv",
                                               TRAIN_STATE_FILE}

    config, weights = load_lora(out)
    saved = json.loads((out / ADAPTER_CONFIG_FILE).read_text())
    assert (saved["r"], saved["alpha"], saved["targets"]) == (4, 8.0, ["query", "value"])
    assert saved["base_model"] == str(tiny_ckpt)
    assert saved["base_config"] == load_config(tiny_ckpt).to_dict()
    assert saved["prompt_style"] == "chatml"
    # only adapter tensors, one A and one B per adapted layer (2 blocks x q_proj, v_proj)
    assert sorted(weights) == sorted(f"blocks.{i}.attn.{p}.lora_{m}" for i in range(2) for p in ("q_proj", "v_proj")
                                     for m in "AB")
    assert weights["blocks.0.attn.q_proj.lora_A"].shape == (4, 32)
    assert all(weights[k].abs().max() > 0 for k in weights if k.endswith("lora_B"))  # B left zero: it trained

    rows = metrics(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(float(r["train_loss"])) and float(r["train_loss"]) > 0 for r in rows)
    assert [bool(r["val_loss"]) for r in rows] == [False, True, False, True]  # eval_interval=2
    assert all(math.isfinite(float(r["val_loss"])) for r in rows if r["val_loss"])

    state = torch.load(out / TRAIN_STATE_FILE, weights_only=True)
    assert state["counters"]["step"] == 4 and state["counters"]["micro_batches"] == 4 * 2
    assert_adapters_equal(state["lora"], weights)  # the resume state holds the same adapter

    stdout = capsys.readouterr().out
    for step in range(1, 5):
        assert re.search(rf"^step {step}/4 \| loss \d+\.\d{{4}} \| lr \S+ \| [\d,]+ tok/s \| MFU \d+\.\d% \| "
                         rf"ETA \d+:\d\d$", stdout,
                         re.M), stdout
    n_trainable = sum(t.numel() for t in weights.values())
    summary = re.search(r"^Trainable parameters ([\d,]+) \| 4 steps in \S+ \| [\d,]+ tokens/s \| "
                        r"MFU \d+\.\d% \(\S+ \S+/s of \S+ \S+/s, measured float32 matmul probe\) \| "
                        r"peak memory \d+\.\d\d GiB \| final val loss \d+\.\d+$", stdout, re.M)
    assert summary and int(summary.group(1).replace(",", "")) == n_trainable, stdout
    assert re.search(r"JSON before -> after fine-tuning: valid \d+% -> \d+%", stdout)


def test_run_on_a_jsonl_file_skips_malformed_rows(tiny_ckpt, tmp_path, capsys):
    rows, _ = json_extraction_dataset(n_train=20, n_val=0, seed=3)
    lines = [json.dumps(r) for r in rows]
    lines.insert(5, "{not json")
    lines.insert(9, json.dumps({"instruction": "a row without its output"}))
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(lines) + "\n")

    out = run(tiny_ckpt, tmp_path / "out", data=str(data), n_train=None, n_val=None, max_steps=2)
    err = capsys.readouterr().err
    assert f"Skipped 2 malformed row(s) of 22 in {data}" in err
    assert re.search(r"Data: 19 training and 1 validation samples .* 2 malformed rows skipped", err), err
    assert f"{data} line 6: not valid JSON" in err and f"{data} line 10: no 'output'" in err
    assert [int(r["step"]) for r in metrics(out)] == [1, 2]
    config, _ = load_lora(out)
    assert config.prompt_style == "chatml"


def test_config_yaml_and_flags_override_it(tiny_ckpt, tmp_path):
    """jsonargparse's --config: every hyperparameter from a YAML file, a flag after it wins."""
    out = tmp_path / "out"
    settings = {**RUN, "checkpoint_dir": str(tiny_ckpt), "out_dir": str(out), "max_steps": 2, "lora_r": 2,
                "lora_targets": ["query", "mlp"]}
    yaml = tmp_path / "run.yaml"
    yaml.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()))  # JSON values are YAML
    code, stdout, stderr = finish(script("--config", str(yaml), "--max_steps", "3", cwd=tmp_path))
    assert code == 0, stderr
    config, weights = load_lora(out)
    assert config.r == 2 and config.targets == ["query", "mlp"]
    assert "blocks.1.mlp.gate_proj.lora_A" in weights and "blocks.0.attn.q_proj.lora_B" in weights
    assert [int(r["step"]) for r in metrics(out)] == [1, 2, 3]  # --max_steps 3 overrode the file's 2


# ------------------------------------------------------------------------------------------------------------
# 2. resume: an interrupted run, resumed, ends exactly where the uninterrupted one does
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stop_at", [3, 4], ids=["at-epoch-end", "mid-epoch"])
def test_resume_after_stop_is_exact(tiny_ckpt, tmp_path, monkeypatch, capsys, reference_run, stop_at):
    out = tmp_path / "out"
    monkeypatch.setattr(ft, "StopRequest", stop_after(stop_at))
    run(tiny_ckpt, out)
    assert f"Stopped at step {stop_at}; state saved" in capsys.readouterr().out
    assert [int(r["step"]) for r in metrics(out)] == list(range(1, stop_at + 1))
    assert torch.load(out / TRAIN_STATE_FILE, weights_only=True)["counters"]["step"] == stop_at
    stopped = adapter(out)

    monkeypatch.undo()
    run(tiny_ckpt, out, resume=True)
    assert f"Resuming from step {stop_at} of 10" in capsys.readouterr().out
    final = adapter(out)
    assert not torch.equal(final["blocks.0.attn.q_proj.lora_B"], stopped["blocks.0.attn.q_proj.lora_B"])
    # bit for bit (CPU float32 is deterministic here; no tolerance needed)
    assert_adapters_equal(final, adapter(reference_run))
    # metrics.csv goes on from the stop: each step once, and the resumed steps' numbers are the reference's
    assert [int(r["step"]) for r in metrics(out)] == list(range(1, 11))
    assert deterministic(metrics(out)) == deterministic(metrics(reference_run))


def test_time_budget_stop_then_resume_is_exact(tiny_ckpt, tmp_path, capsys, reference_run):
    """--max_time 0 stops after step 1 with a validation the reference run does not do there: validating must
    leave training's random numbers (dropout) alone, or the resumed run would drift from the reference."""
    out = tmp_path / "out"
    run(tiny_ckpt, out, max_time="0")
    assert "Time budget of 0:00 spent after step 1: stopping" in capsys.readouterr().out
    assert [(r["step"], bool(r["val_loss"])) for r in metrics(out)] == [("1", True)]
    run(tiny_ckpt, out, resume=True)
    assert_adapters_equal(adapter(out), adapter(reference_run))


def test_resume_needs_the_saved_rng_state(tiny_ckpt, tmp_path, monkeypatch, reference_run):
    """The exact-resume test can fail: resuming without the saved RNG state (dropout masks) gives another adapter."""
    out = tmp_path / "out"
    monkeypatch.setattr(ft, "StopRequest", stop_after(4))
    run(tiny_ckpt, out)
    monkeypatch.undo()
    monkeypatch.setattr(ft, "set_rng_state", lambda state: None)
    run(tiny_ckpt, out, resume=True)
    assert not torch.equal(adapter(out)["blocks.0.attn.q_proj.lora_B"],
                           adapter(reference_run)["blocks.0.attn.q_proj.lora_B"])


def test_ctrl_c_then_resume_is_exact(tiny_ckpt, tmp_path, tmp_path_factory):
    """A real SIGINT to a running script: it finishes the step, saves and exits; --resume ends at the reference.
    (30 steps, so that the signal surely comes before the end even on a busy machine.)"""
    reference = run(tiny_ckpt, tmp_path / "reference", max_steps=30)
    out = tmp_path / "out"
    args = cli_args(tiny_ckpt, out, max_steps=30)
    proc = script(*args, cwd=tmp_path)
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / "metrics.csv").is_file() and len((out / "metrics.csv").read_text().splitlines()) >= 2:
            break  # a step is done: we are inside the training loop
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    code, stdout, stderr = finish(proc)
    assert code == 0, stderr
    stopped = re.search(r"Stopped at step (\d+); state saved", stdout)
    assert stopped, f"the run was not stopped by SIGINT (it ran to the end?):\n{stdout}"
    stop_step = int(stopped.group(1))
    assert 1 <= stop_step < 30
    assert [int(r["step"]) for r in metrics(out)] == list(range(1, stop_step + 1))

    code, stdout, stderr = finish(script(*args, "--resume", cwd=tmp_path))
    assert code == 0, stderr
    assert f"Resuming from step {stop_step} of 30" in stdout
    assert_adapters_equal(adapter(out), adapter(reference))
    assert [int(r["step"]) for r in metrics(out)] == list(range(1, 31))
    assert deterministic(metrics(out)) == deterministic(metrics(reference))


def test_metrics_rows_after_the_saved_state_are_dropped_on_resume(tiny_ckpt, tmp_path, monkeypatch, reference_run):
    """A run killed between two saves leaves metrics rows that the resumed run does again: none appears twice."""
    out = tmp_path / "out"
    monkeypatch.setattr(ft, "StopRequest", stop_after(6))
    run(tiny_ckpt, out)
    monkeypatch.undo()
    # as if it had then gone on to write steps 7 and 8 and been killed before its next save
    with open(out / "metrics.csv", "a") as f:
        f.writelines(line + "\n" for line in (reference_run / "metrics.csv").read_text().splitlines()[7:9])
    assert [int(r["step"]) for r in metrics(out)] == [1, 2, 3, 4, 5, 6, 7, 8]
    run(tiny_ckpt, out, resume=True)
    assert [int(r["step"]) for r in metrics(out)] == list(range(1, 11))
    assert deterministic(metrics(out)) == deterministic(metrics(reference_run))
    assert_adapters_equal(adapter(out), adapter(reference_run))


def test_micro_batches_keep_every_rank_at_the_same_sampler_position():
    """Two ranks share one global stream of micro-batches; after each optimizer step both have read exactly as far,
    so the sampler state rank 0 saves resumes every rank at its right batch (epochs of 5 micro-batches)."""
    world, accum, n = 2, 2, 5

    def loader():
        return DataLoader(list(range(n)), batch_sampler=ShuffledBatchSampler(n, 1, seed=3), collate_fn=lambda b: b[0])

    def steps(rank, n_steps, saved=None):
        dl, state = loader(), {"micro_batches": 0}
        if saved:
            dl.batch_sampler.load_state_dict(saved["sampler"])
            state.update(saved["counters"])
        stream = micro_batches(dl, rank, world, state)
        taken = [[next(stream) for _ in range(accum)] for _ in range(n_steps)]
        return taken, {"sampler": dl.batch_sampler.state_dict(), "counters": dict(state)}

    one_device = micro_batches(loader(), 0, 1, {"micro_batches": 0})
    global_order = [next(one_device) for _ in range(6 * world * accum)]  # 6 steps, crossing 4 epochs

    full = [steps(rank, 6)[0] for rank in range(world)]
    for s in range(6):  # a global step is the same micro-batches as one device with world x accum accumulation
        assert sorted(full[0][s] + full[1][s]) == sorted(global_order[s * world * accum:(s + 1) * world * accum])
        assert full[0][s] == global_order[s * 4:(s + 1) * 4:2] and full[1][s] == global_order[s * 4 + 1:(s + 1) * 4:2]

    first = [steps(rank, 3) for rank in range(world)]
    assert first[0][1] == first[1][1]  # same position on both ranks after the step
    for rank in range(world):  # every rank resumes from rank 0's saved position
        resumed, _ = steps(rank, 3, saved=first[0][1])
        assert first[rank][0] + resumed == full[rank]


# ------------------------------------------------------------------------------------------------------------
# 3. bad input: one `error:` line and exit status 1, never a traceback
# ------------------------------------------------------------------------------------------------------------
def run_cli(monkeypatch, capsys, *args: str) -> str:
    """The script's command line in this process (cli(ft.setup) is exactly what its __main__ runs)."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    with pytest.raises(SystemExit) as exit_info:
        cli(ft.setup)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


def test_error_missing_checkpoint_dir(monkeypatch, capsys, tmp_path):
    line = run_cli(monkeypatch, capsys, *cli_args(tmp_path / "nope", tmp_path / "out"))
    assert line == (f"error: Checkpoint directory {tmp_path / 'nope'} does not exist: download one with "
                    f"`python -m lora_lab.download REPO_ID` or convert one with `python -m lora_lab.convert SRC "
                    f"OUT_DIR`")
    assert not (tmp_path / "out").exists()


def test_error_resume_with_nothing_to_resume(tiny_ckpt, monkeypatch, capsys, tmp_path):
    line = run_cli(monkeypatch, capsys, *cli_args(tiny_ckpt, tmp_path / "out", resume=True))
    assert f"{tmp_path / 'out' / TRAIN_STATE_FILE} does not exist" in line and "start without --resume" in line


def test_error_existing_run_without_resume(tiny_ckpt, monkeypatch, capsys, tmp_path, reference_run):
    before = (reference_run / TRAIN_STATE_FILE).read_bytes()
    line = run_cli(monkeypatch, capsys, *cli_args(tiny_ckpt, reference_run))
    assert line == (f"error: {reference_run} already holds a run: add --resume to continue it, or choose "
                    f"another --out_dir")
    assert (reference_run / TRAIN_STATE_FILE).read_bytes() == before  # untouched


def test_error_no_sample_has_trainable_tokens(tiny_ckpt, monkeypatch, capsys, tmp_path):
    line = run_cli(monkeypatch, capsys, *cli_args(tiny_ckpt, tmp_path / "out", max_seq_length=16))
    assert "No training sample has trainable tokens" in line and "max_seq_length=16" in line
    assert "raise max_seq_length" in line


@pytest.mark.parametrize("targets", ["bogus", "[query,bogus]", "query,bogus"])
def test_error_unknown_lora_target(tiny_ckpt, monkeypatch, capsys, tmp_path, targets):
    line = run_cli(monkeypatch, capsys, *cli_args(tiny_ckpt, tmp_path / "out"), "--lora_targets", targets)
    assert line == ("error: unknown LoRA target 'bogus'; valid targets: query, key, value, projection, mlp, "
                    "lm_head, experts, all")


@pytest.mark.parametrize("targets, expected", [("all", ["query", "key", "value", "projection", "mlp", "lm_head",
                                                        "experts"]),
                                               ("mlp", ["mlp"]), ("value,query", ["query", "value"]),
                                               ("[key,projection]", ["key", "projection"])])
def test_lora_targets_flag_forms(tiny_ckpt, monkeypatch, tmp_path, targets, expected):
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *cli_args(tiny_ckpt, out, max_steps=1, lora_targets=targets)])
    cli(ft.setup)
    assert load_lora(out)[0].targets == expected


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_error_loss_not_finite_names_the_step(tiny_ckpt, tmp_path, grad_clip):
    """A learning rate of 1e30 blows the adapter up after a step or two: with gradient clipping the gradient norm is
    the first thing to overflow (a finite loss), without it the loss."""
    out = tmp_path / "out"
    with pytest.raises(LoraLabError) as e:
        run(tiny_ckpt, out, learning_rate=1e30, warmup_steps=0, lora_dropout=0.0, grad_clip=grad_clip,
            save_interval=1)
    what = "gradient norm" if grad_clip else "loss"
    found = re.fullmatch(rf"the {what} is (?:nan|inf) at step (\d+): lower --learning_rate \(or use --precision "
                         rf"32-true\); the last saved state is in {re.escape(str(out))} \(continue from it with "
                         rf"--resume\)", str(e.value))
    assert found, str(e.value)
    step = int(found.group(1))
    assert step == len(metrics(out)) + 1 >= 2  # the steps before it were fine (and logged, and saved)


def test_error_from_a_real_process(tmp_path):
    """The same one-line error at the process level: exit status 1, the line last on stderr, no traceback."""
    code, stdout, stderr = finish(script(*cli_args(tmp_path / "nope", tmp_path / "out"), cwd=tmp_path))
    assert code == 1 and "Traceback" not in stderr, stderr
    assert stderr.splitlines()[-1] == (f"error: Checkpoint directory {tmp_path / 'nope'} does not exist: download "
                                       f"one with `python -m lora_lab.download REPO_ID` or convert one with "
                                       f"`python -m lora_lab.convert SRC OUT_DIR`")


# ------------------------------------------------------------------------------------------------------------
# 4. two processes, data parallel on CPU (gloo)
# ------------------------------------------------------------------------------------------------------------
DDP = dict(batch_size=4, micro_batch_size=1, max_steps=3, lora_dropout=0.0, eval_interval=3, n_train=10)


@pytest.fixture(scope="module")
def single_device_run(tiny_ckpt, tmp_path_factory):
    return run(tiny_ckpt, tmp_path_factory.mktemp("single") / "out", **DDP)


def test_two_process_ddp_matches_one_process(tiny_ckpt, tmp_path, single_device_run):
    """2 processes x 2 accumulated micro-batches of 1 = 1 process x 4: the same global batches, the same adapter."""
    out = tmp_path / "out"
    code, stdout, stderr = finish(script(*cli_args(tiny_ckpt, out, **DDP), "--devices", "2", "--strategy", "ddp",
                                         cwd=tmp_path))
    assert code == 0, stderr
    assert "distributed_backend=gloo" in stderr
    one, two = adapter(single_device_run), adapter(out)
    assert one.keys() == two.keys()
    for k in one:  # the gradient all-reduce sums in another order: float tolerance, not bit equality
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)
    # the logged loss is the global batch's, as with one device
    for r2, r1 in zip(metrics(out), metrics(single_device_run), strict=True):
        assert math.isclose(float(r2["train_loss"]), float(r1["train_loss"]), rel_tol=1e-5)
        assert bool(r2["val_loss"]) == bool(r1["val_loss"])
        if r1["val_loss"]:
            assert math.isclose(float(r2["val_loss"]), float(r1["val_loss"]), rel_tol=1e-5)


@pytest.mark.slow
def test_two_process_ddp_resume(tiny_ckpt, tmp_path, single_device_run):
    """A 2-process run stopped after step 1 (--max_time 0) and resumed ends where one process does: rank 0 saves
    the data position for both ranks, and each must resume at its own next micro-batch."""
    out = tmp_path / "out"
    ddp = ["--devices", "2", "--strategy", "ddp"]
    code, stdout, stderr = finish(script(*cli_args(tiny_ckpt, out, **DDP), *ddp, "--max_time", "0", cwd=tmp_path))
    assert code == 0, stderr
    assert [int(r["step"]) for r in metrics(out)] == [1]
    code, stdout, stderr = finish(script(*cli_args(tiny_ckpt, out, **DDP), *ddp, "--resume", cwd=tmp_path))
    assert code == 0, stderr
    one, two = adapter(single_device_run), adapter(out)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# 5. the real thing: SmolLM2-135M-Instruct learns the JSON task on a CPU in a few minutes
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_finetune_learns_json_extraction(smollm2, tmp_path, monkeypatch):
    """12 steps of batch 8 (96 samples) on a CPU: the validation loss falls and the greedy answers to held-out
    reviews go from chatty or wrongly keyed JSON to the exact schema with the right values."""
    scores = []  # evaluate_json's results before and after fine-tuning

    def evaluate_json(*args, **kwargs):
        scores.append(original(*args, **kwargs))
        return scores[-1]

    original = ft.evaluate_json
    monkeypatch.setattr(ft, "evaluate_json", evaluate_json)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # the tiny tests above run on one thread; this one wants this worker's cores
    t0 = time.perf_counter()
    try:
        out = run(smollm2, tmp_path / "out", n_train=200, n_val=8, eval_samples=8, max_steps=12, batch_size=8,
                  micro_batch_size=8, learning_rate=3e-3, warmup_steps=2, max_seq_length=256, lora_dropout=0.05,
                  eval_interval=6, eval_iters=1, seed=42)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - t0
    before, after = scores
    val = [float(r["val_loss"]) for r in metrics(out) if r["val_loss"]]
    print(f"\nSmolLM2-135M-Instruct, 12 steps x batch 8 on CPU in {seconds:.0f} s: val loss {val[0]:.3f} (step 6) -> "
          f"{val[-1]:.3f} (step 12); on {before['n']} held-out prompts: valid JSON {before['valid_json']:.0%} -> "
          f"{after['valid_json']:.0%}, exact keys {before['exact_keys']:.0%} -> {after['exact_keys']:.0%}, all values "
          f"right {before['all_correct']:.0%} -> {after['all_correct']:.0%}")
    assert len(val) == 2 and val[-1] < val[0]
    assert after["exact_keys"] > before["exact_keys"] and after["all_correct"] > before["all_correct"]


def test_bare_boolean_flags_mean_true():
    from lora_lab.args import nested_flags

    assert nested_flags(ft.setup, ["--resume", "--out_dir", "x", "--use_dora"]) == \
        ["--resume", "true", "--out_dir", "x", "--lora.dora", "true"]
    assert nested_flags(ft.setup, ["--resume", "false", "--data", "d"]) == ["--resume", "false", "--data.source", "d"]
    assert nested_flags(ft.setup, ["--lora.dora", "--data.packing"]) == ["--lora.dora", "true", "--data.packing", "true"]


def printed_config(capsys, *args: str) -> dict:
    """The run configuration jsonargparse parses from `args` (--print_config: nothing runs)."""
    with pytest.raises(SystemExit):
        cli(ft.setup, [*args, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def test_flat_flags_nested_flags_and_a_flat_config_give_the_same_run(capsys, tmp_path):
    """Today's flat flags (--learning_rate, --lora_r, --lora_targets, bare --use_dora), their nested form
    (--train.learning_rate, --lora.r), a --config YAML with the flat keys and one with nested keys all parse to one
    configuration; and call_flat (Python, flat keywords) builds the same groups."""
    flat = ["--lora_r", "4", "--lora_targets", "query,mlp", "--use_dora", "--learning_rate", "0.005",
            "--data", "alpaca", "--max_steps=7", "--eval_interval", "3", "--log_interval", "2", "--precision",
            "32-true", "--resume"]
    nested = ["--lora.r", "4", "--lora.targets", "query,mlp", "--lora.dora", "true", "--train.learning_rate", "0.005",
              "--data.source", "alpaca", "--train.max_steps=7", "--eval.interval", "3", "--log.interval", "2",
              "--hardware.precision", "32-true", "--resume", "true"]
    flat_yaml, nested_yaml = tmp_path / "flat.yaml", tmp_path / "nested.yaml"
    flat_yaml.write_text("lora_r: 4\nlora_targets: query,mlp\nuse_dora: true\nlearning_rate: 0.005\ndata: alpaca\n"
                         "max_steps: 7\neval_interval: 3\nlog_interval: 2\nprecision: 32-true\nresume: true\n")
    nested_yaml.write_text("lora: {r: 4, targets: 'query,mlp', dora: true}\ntrain: {learning_rate: 0.005, max_steps: 7}\n"
                           "data: {source: alpaca}\neval: {interval: 3}\nlog: {interval: 2}\n"
                           "hardware: {precision: 32-true}\nresume: true\n")
    configs = [printed_config(capsys, *flat), printed_config(capsys, *nested),
               printed_config(capsys, "--config", str(flat_yaml)), printed_config(capsys, f"--config={nested_yaml}")]
    assert all(c == configs[0] for c in configs[1:]), configs
    c = configs[0]
    assert (c["lora"]["r"], c["lora"]["dora"], c["train"]["learning_rate"], c["data"]["source"], c["resume"]) == \
        (4, True, 0.005, "alpaca", True)
    assert c["lora"]["alpha"] == 16.0 and c["train"]["batch_size"] == 16  # the script's defaults for the rest
    # a flag given after --config wins over the file, in either spelling
    assert printed_config(capsys, "--config", str(flat_yaml), "--lora_r", "2")["lora"]["r"] == 2
    assert printed_config(capsys, "--config", str(flat_yaml), "--lora.r", "2")["lora"]["r"] == 2

    from lora_lab.args import nest

    kwargs = nest(ft.setup, dict(lora_r=4, lora_targets="query,mlp", use_dora=True, learning_rate=0.005,
                                 data="alpaca", max_steps=7, eval_interval=3, log_interval=2, precision="32-true",
                                 resume=True))
    assert kwargs["lora"] == ft.LoRAArgs(r=4, alpha=16.0, dropout=0.05, targets="query,mlp", dora=True)
    assert kwargs["train"].learning_rate == 0.005 and kwargs["train"].weight_decay == 0.0
    with pytest.raises(TypeError, match="unexpected keyword argument 'lora_rank'"):
        nest(ft.setup, dict(lora_rank=4))


def test_columns_flag_renames_the_columns_of_a_csv(tiny_ckpt, monkeypatch, capsys, tmp_path):
    """`--columns '{"instruction": "prompt_text", "output": "reply"}'` (prepare_dataset.md) on the command line: the
    rows of a CSV with other column names train; without it the loader's one-line error names the flag. (Not
    question/answer: that is GSM8K's layout, which the loader now reads by itself.)"""
    data = tmp_path / "qa.csv"
    with data.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt_text", "reply"])
        w.writerows([[f"What is {i} plus {i}?", str(2 * i)] for i in range(12)])
    columns = ["--columns", '{"instruction": "prompt_text", "output": "reply"}']
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *cli_args(tiny_ckpt, tmp_path / "out", data=data, max_steps=1),
                                      *columns])
    cli(ft.setup)
    config, weights = load_lora(tmp_path / "out")
    assert config.r == 8 and weights
    line = run_cli(monkeypatch, capsys, *cli_args(tiny_ckpt, tmp_path / "out2", data=data, max_steps=1))
    assert "has no 'instruction' column" in line and "--columns on the command line" in line


def test_a_resumed_run_reports_like_an_uninterrupted_one(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """A run interrupted (Ctrl-C) and resumed still prints the JSON before -> after line (the "before"
    scores travel in the resume state) and its summary counts all its steps and time, not only the resumed ones."""
    out = tmp_path / "out"
    monkeypatch.setattr(ft, "StopRequest", stop_after(1))
    run(tiny_ckpt, out, max_steps=3, eval_samples=1)
    monkeypatch.undo()
    first = capsys.readouterr().out
    assert "Stopped at step 1" in first and "JSON before -> after" not in first
    seconds = torch.load(out / TRAIN_STATE_FILE, weights_only=True)["counters"]["seconds"]
    run(tiny_ckpt, out, resume=True, max_steps=3, eval_samples=1)
    resumed = capsys.readouterr().out
    assert len(re.findall(r"^JSON before -> after fine-tuning: valid \d+% -> \d+%", resumed, re.M)) == 1
    summary = next(line for line in resumed.splitlines() if line.startswith("Trainable parameters"))
    assert "| 3 steps in " in summary
    assert torch.load(out / TRAIN_STATE_FILE, weights_only=True)["counters"]["seconds"] > seconds > 0
