"""The run record: --logger_name (each logger read back with its own library), loss.png and `python -m
lora_lab.plot`, file modes of what a run, a conversion and a merge write, and progress lines.

Runs are in-process finetune/lora.py runs on the tiny random model of tests/tiny_checkpoint.py (a few seconds)."""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import stat
import struct
import sys
from pathlib import Path

import pytest
import yaml

import finetune.lora as ft
from conftest import require_asset
from lora_lab.utils import LoraLabError
from lora_lab.args import call_flat

RUN = dict(data="json_extraction", n_train=12, n_val=4, eval_samples=0, max_steps=4, batch_size=4,
           micro_batch_size=2, max_seq_length=256, learning_rate=1e-2, warmup_steps=2, eval_interval=2, eval_iters=2,
           save_interval=100, log_interval=1, seed=7)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def run(ckpt: Path, out_dir: Path, **overrides) -> Path:
    call_flat(ft.setup, checkpoint_dir=ckpt, out_dir=out_dir, **{**RUN, **overrides})
    return out_dir


def metrics(out_dir: Path) -> list[dict]:
    with open(out_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"needs {module} (the test extra)")


# ------------------------------------------------------------------------------------------------------------
# loggers
# ------------------------------------------------------------------------------------------------------------
def test_csv_logger_writes_metrics_and_hparams(tiny_ckpt, tmp_path):
    out = run(tiny_ckpt, tmp_path / "out", logger_name="csv")
    rows = metrics(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [bool(r["val_loss"]) for r in rows] == [False, True, False, True]
    hparams = yaml.safe_load((out / "hparams.yaml").read_text())
    assert hparams["lora_r"] == 8 and hparams["max_steps"] == 4 and hparams["logger_name"] == "csv"
    assert hparams["lora_targets"] == ["query", "value"] and hparams["out_dir"] == str(out)


@needs("tensorboard")
def test_tensorboard_logger_read_back_with_tensorboard(tiny_ckpt, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = run(tiny_ckpt, tmp_path / "out", logger_name="tensorboard")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rows = metrics(out)
    train = [(e.step, e.value) for e in events.Scalars("train_loss")]
    assert [s for s, _ in train] == [1, 2, 3, 4]
    assert [v for _, v in train] == pytest.approx([float(r["train_loss"]) for r in rows], rel=1e-6)
    assert [e.step for e in events.Scalars("val_loss")] == [2, 4]
    assert {"lr", "tokens", "tokens_per_sec", "val_ppl"} <= set(events.Tags()["scalars"])
    hparams = yaml.safe_load((out / "tensorboard" / "hparams.yaml").read_text())  # Lightning's copy
    assert hparams["lora_r"] == 8 and hparams["learning_rate"] == 1e-2


@needs("mlflow")
def test_mlflow_logger_read_back_with_mlflow_client(tiny_ckpt, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from lora_lab.loggers import mlflow_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = run(tiny_ckpt, tmp_path / "out", logger_name="mlflow")
    assert (out / "mlruns" / "mlflow.db").is_file()
    client = MlflowClient(mlflow_uri(out))
    experiment = client.get_experiment_by_name("lora_lab")
    (run_info,) = client.search_runs([experiment.experiment_id])
    assert run_info.info.status == "FINISHED" and run_info.info.run_name == "out"
    history = client.get_metric_history(run_info.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [m.value for m in history] == pytest.approx([float(r["train_loss"]) for r in metrics(out)], rel=1e-6)
    assert [m.step for m in client.get_metric_history(run_info.info.run_id, "val_loss")] == [2, 4]
    params = run_info.data.params
    assert params["lora_r"] == "8" and params["max_steps"] == "4"


@needs("wandb")
def test_wandb_logger_offline_writes_its_run_folder(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = run(tiny_ckpt, tmp_path / "out", logger_name="wandb")
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("run-*.wandb")) and (run_dir / "files").is_dir()
    assert len(metrics(out)) == 4


def test_missing_logger_package_is_one_line(monkeypatch):
    from lora_lab import loggers

    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name: None)
    for name in ("tensorboard", "mlflow", "wandb"):
        with pytest.raises(LoraLabError, match=rf"--logger_name {name} needs the {name} package: "
                                               rf"pip install 'lora_lab\[{name}\]'"):
            loggers.check_logger_name(name)
    loggers.check_logger_name("csv")  # needs nothing


# ------------------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------------------
def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@needs("matplotlib")
def test_loss_png_after_a_run_and_plot_of_two_runs(tiny_ckpt, tmp_path, monkeypatch, capsys):
    from lora_lab import plot

    a = run(tiny_ckpt, tmp_path / "r8", lora_r=8)
    b = run(tiny_ckpt, tmp_path / "r16", lora_r=16)
    assert png_size(a / "loss.png") == (1000, 550)
    assert png_size(b / "loss.png") == (1000, 550)
    monkeypatch.chdir(tmp_path)
    plot.main([str(a), str(b)])
    assert png_size(tmp_path / "loss_comparison.png") == (1000, 550)
    plot.main([str(a), str(b), "--out", str(tmp_path / "both.png")])
    assert png_size(tmp_path / "both.png") == (1000, 550)
    assert plot.describe(a).startswith("r8: r 8, alpha 16.0, lr 0.01, batch 4, steps 4")
    with pytest.raises(SystemExit):
        plot.main([str(a), str(tmp_path / "nothing")])
    assert "nothing/metrics.csv does not exist" in capsys.readouterr().err


def test_smooth_is_bias_corrected():
    from lora_lab.plot import smooth

    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert smooth([1.0, 0.0, 0.0]) == [1.0, 0.0, 0.0]  # 3 steps: nothing to average over
    assert smooth([1.0] + [0.0] * 99)[1] == pytest.approx(0.09 / 0.19)  # beta 0.9 at 100 steps
    assert smooth([1.0, 0.0], beta=0.5) == pytest.approx([1.0, 1 / 3])


def test_a_missing_matplotlib_warns_once_and_the_run_finishes(tiny_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = run(tiny_ckpt, tmp_path / "out", save_interval=2)
    assert (out / "lora.safetensors").is_file() and not (out / "loss.png").exists()
    assert capsys.readouterr().err.count("warning: no loss.png (matplotlib is not installed: pip install") == 1


# ------------------------------------------------------------------------------------------------------------
# file modes: what a plain open() would give (0666 less the umask), not mkstemp's private 0600
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


def test_modes_of_what_a_run_writes(tiny_ckpt, tmp_path, umask_022):
    out = run(tiny_ckpt, tmp_path / "out")
    found = modes(out)
    assert {"lora.safetensors", "lora_config.json", "train_state.pt", "metrics.csv", "hparams.yaml"} <= set(found)
    assert found == {name: 0o644 for name in found}


def test_modes_of_a_conversion_and_a_merge(tiny_ckpt, tmp_path, umask_022):
    from lora_lab.formats.convert import convert
    from lora_lab.formats.merge import merge_lora_checkpoint

    convert(require_asset("models/stories260K/stories260K.bin"), tmp_path / "converted",
            tokenizer=require_asset("models/stories260K/tok512.bin"))
    adapter = run(tiny_ckpt, tmp_path / "adapter")
    merge_lora_checkpoint(tiny_ckpt, adapter, tmp_path / "merged")
    merge_lora_checkpoint(tiny_ckpt, adapter, tmp_path / "merged_hf", to="hf")
    for folder in ("converted", "merged", "merged_hf"):
        found = modes(tmp_path / folder)
        assert "model.safetensors" in found
        assert found == {name: 0o644 for name in found}, folder


def test_atomic_path_follows_the_umask(tmp_path):
    from lora_lab.utils import atomic_write_text

    old = os.umask(0o002)
    try:
        atomic_write_text(tmp_path / "group.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "group.txt").stat().st_mode) == 0o664


# ------------------------------------------------------------------------------------------------------------
# progress
# ------------------------------------------------------------------------------------------------------------
def test_progress_lines_when_not_a_terminal(monkeypatch):
    from lora_lab.progress import progress

    monkeypatch.delenv("LORA_LAB_PROGRESS", raising=False)
    monkeypatch.setenv("LORA_LAB_PROGRESS_INTERVAL", "0")
    out = io.StringIO()  # not a TTY
    assert list(progress(range(3), desc="Scoring", unit="prompt", file=out)) == [0, 1, 2]
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("Scoring: 1/3 prompts (33%), 0:00 elapsed, ETA")
    assert lines[1].startswith("Scoring: 2/3 prompts (67%)")
    assert lines[-1].startswith("Scoring: done, 3 prompts in 0:00") and len(lines) == 3
    from lora_lab.progress import _line

    assert _line("ll", 2, 9, "batch", 1.0).startswith("ll: 2/9 batches (22%)")  # not "batchs"
    monkeypatch.setenv("LORA_LAB_PROGRESS_INTERVAL", "3600")  # a short loop prints nothing at all
    out = io.StringIO()
    assert list(progress(range(3), file=out)) == [0, 1, 2] and out.getvalue() == ""


def test_progress_bar_on_a_terminal(monkeypatch):
    from lora_lab.progress import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("LORA_LAB_PROGRESS", raising=False)
    out = Terminal()
    assert list(progress(range(5), desc="Converting", unit="tensor", file=out)) == list(range(5))
    assert out.getvalue().startswith("\rConverting:   0%|") and "0/5 [" in out.getvalue()  # tqdm's bar, redrawn
    monkeypatch.setenv("LORA_LAB_PROGRESS", "off")
    out = Terminal()
    assert list(progress(range(5), file=out)) == list(range(5)) and out.getvalue() == ""
