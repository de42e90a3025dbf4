"""Experiment tracking: send a run's metrics and hyperparameters to TensorBoard, MLflow or Weights & Biases.

    python finetune/lora.py --logger_name tensorboard     # csv (default) | tensorboard | mlflow | wandb

Every run writes OUT_DIR/metrics.csv and OUT_DIR/hparams.yaml whatever the logger (they are the run's own
record: `python -m lora_lab.plot` reads them, and a resumed run continues them). --logger_name adds one of
Lightning's loggers, which gets the same rows and the same hyperparameters. All of them work offline:
  - tensorboard: event files in OUT_DIR/tensorboard/ (`tensorboard --logdir OUT_DIR/tensorboard`)
  - mlflow: a local store in OUT_DIR/mlruns/ (runs in mlflow.db, artifacts beside it:
    `mlflow ui --backend-store-uri sqlite:///OUT_DIR/mlruns/mlflow.db`), unless MLFLOW_TRACKING_URI points
    elsewhere (a tracking server)
  - wandb: OUT_DIR/wandb/; with WANDB_MODE=offline nothing leaves the machine (`wandb sync` uploads it later)
Each needs its package (the extras lora_lab[tensorboard], [mlflow], [wandb]); a missing one is reported in one
line, before anything slow starts. tests/test_run_record.py reads each logger's output back with its own library.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

from lora_lab.utils import LoraLabError

LOGGER_NAMES = ("csv", "tensorboard", "mlflow", "wandb")
# the module each logger needs, and the extra that installs it
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check_logger_name(name: str) -> None:
    """One line if `name` is not a logger or its package is missing: cheap, so the scripts call it first."""
    if name not in LOGGER_NAMES:
        raise LoraLabError(f"--logger_name {name!r}: use one of {', '.join(LOGGER_NAMES)}")
    module = _PACKAGES.get(name)
    if module and importlib.util.find_spec(module) is None:
        raise LoraLabError(f"--logger_name {name} needs the {module} package: pip install 'lora_lab[{name}]' "
                           f"(or pip install {module})")


def mlflow_uri(out_dir: Path) -> str:
    """The tracking URI of a run's local MLflow store (`mlflow ui --backend-store-uri URI` shows it)."""
    return f"sqlite:///{(Path(out_dir) / 'mlruns' / 'mlflow.db').resolve()}"


def make_logger(name: str, out_dir: Path, run_name: Optional[str] = None):
    """The Lightning logger for `name` writing under out_dir (None for csv: metrics.csv is written anyway)."""
    check_logger_name(name)
    out_dir = Path(out_dir)
    run_name = run_name or out_dir.resolve().name
    if name == "csv":
        return None
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        # version="": the events go straight into OUT_DIR/tensorboard (a resumed run adds an event file there)
        return TensorBoardLogger(save_dir=str(out_dir), name="tensorboard", version="", default_hp_metric=False)
    if name == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        if os.environ.get("MLFLOW_TRACKING_URI"):  # a tracking server, or a store the user chose
            return MLFlowLogger(experiment_name="lora_lab", run_name=run_name,
                                tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
        # a local store in OUT_DIR/mlruns: MLflow 3 keeps runs in a database (its ./mlruns file store is frozen,
        # in "maintenance mode"), so sqlite for the runs and the folder beside it for artifacts
        store = (out_dir / "mlruns").resolve()
        store.mkdir(parents=True, exist_ok=True)
        return MLFlowLogger(experiment_name="lora_lab", run_name=run_name, tracking_uri=mlflow_uri(out_dir),
                            artifact_location=(store / "artifacts").as_uri())
    from lightning.pytorch.loggers import WandbLogger

    # WANDB_MODE (offline, disabled) and WANDB_PROJECT are read by wandb itself
    return WandbLogger(name=run_name, save_dir=str(out_dir), project=os.environ.get("WANDB_PROJECT", "lora_lab"))


def close_logger(logger) -> None:
    """Flush and close what a logger has open (wandb's background process included)."""
    logger.finalize("success")
    if type(logger).__name__ == "WandbLogger":
        import wandb

        wandb.finish()
