"""--strategy fsdp (lora_lab/distributed.py): FSDP2 units on Fabric's ModelParallelStrategy, here on the CPU with gloo.

N processes must equal one: the same losses (atol 1e-5) and the same saved adapter / model (1e-5) with the same global
batch and seed, which also shows that each rank reads its own samples (the global stream split, as under DDP) and
that validation is averaged. The processes are started by Fabric's own launcher (`--devices N`), and for the
several-nodes case by torchrun (`--nnodes 2 --node_rank i`), as on a cluster.
"""

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = dict(data="json_extraction", n_train=10, n_val=4, eval_samples=0, max_steps=3, batch_size=4,
           micro_batch_size=1, max_seq_length=256, warmup_steps=2, eval_interval=3, eval_iters=2, log_interval=1,
           seed=7)
METHOD = {"lora": dict(learning_rate=1e-2, lora_dropout=0.0),
          "qlora": dict(learning_rate=1e-2, lora_dropout=0.0, lora_targets="all"),
          "full": dict(learning_rate=1e-3),
          "adapter": dict(learning_rate=1e-2, adapter_start_layer=0)}
FILE = {"lora": "lora.safetensors", "qlora": "lora.safetensors", "full": "model.safetensors",
        "adapter": "adapter.safetensors"}


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1"}


def args(ckpt: Path, out: Path, method: str, **extra) -> list[str]:
    out_args = ["--checkpoint_dir", str(ckpt), "--out_dir", str(out)]
    for k, v in {**RUN, **METHOD[method], **extra}.items():
        out_args += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return out_args


def launch(command: list[str], cwd: Path, timeout: float = 600) -> str:
    done = subprocess.run(command, capture_output=True, text=True, env=env(), cwd=cwd, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def train(ckpt: Path, out: Path, method: str, *flags: str, **extra) -> str:
    """finetune/METHOD.py in its own process(es): `--devices 2 --strategy fsdp` makes Fabric launch the second."""
    return launch([sys.executable, str(ROOT / "finetune" / f"{method}.py"), *args(ckpt, out, method, **extra),
                   *flags], cwd=out.parent)


def metrics(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_same_run(one: Path, many: Path, method: str) -> None:
    """The same losses step by step (and validation), and the same saved file users consume."""
    rows_one, rows_many = metrics(one), metrics(many)
    assert [r["step"] for r in rows_many] == [r["step"] for r in rows_one]
    for a, b in zip(rows_one, rows_many):
        assert abs(float(a["train_loss"]) - float(b["train_loss"])) < 1e-5, (a, b)
        if a["val_loss"] and b["val_loss"]:  # (a run stopped by --max_time validates at its stop too)
            assert abs(float(a["val_loss"]) - float(b["val_loss"])) < 1e-5, (a, b)
    assert rows_one[-1]["val_loss"] and rows_many[-1]["val_loss"]
    x, y = load_file(one / FILE[method]), load_file(many / FILE[method])
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=0, atol=1e-5)
    if method != "full":  # the consumer's config file is the same too
        config = FILE[method].replace(".safetensors", "_config.json")
        assert json.loads((one / config).read_text()) == json.loads((many / config).read_text())


@pytest.fixture(scope="module")
def single(tiny_ckpt, tmp_path_factory):
    """One process per method (made on first use)."""
    done = {}

    def get(method: str) -> Path:
        if method not in done:
            done[method] = tmp_path_factory.mktemp(f"one-{method}") / "out"
            train(tiny_ckpt, done[method], method)
        return done[method]

    return get


# ------------------------------------------------------------------------------------------------------------
# the units: trainable and frozen apart, gradients of the trainable parameters only, NF4 sharded
# ------------------------------------------------------------------------------------------------------------
def test_units_keep_trainable_and_frozen_apart_and_shard_the_nf4_base(tmp_path):
    out = launch([sys.executable, str(ROOT / "tests" / "fsdp_worker.py"), "2", "qlora"], cwd=tmp_path)
    reports = [json.loads(line.split("REPORT ", 1)[1]) for line in out.splitlines() if line.startswith("REPORT ")]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for r in reports:
        # 3 blocks x (frozen, trainable) + the root's frozen part + LoRA on lm_head: never both kinds in one unit
        assert all(len(u) == 1 for u in r["units"])
        assert sum(u == [True] for u in r["units"]) == 4 and sum(u == [False] for u in r["units"]) == 4
        assert r["in_units"] == r["params"]  # every parameter is in a unit (sharded)
        assert r["frozen_with_grad"] == 0
        assert r["grad_bytes"] == r["trainable_bytes"] > 0  # gradient memory: the trainable shards, nothing else
        assert r["nf4_local"] == pytest.approx(r["nf4_full"] / 2, abs=64)  # each rank: half of the 4-bit codes
        local, full = r["local_bytes"]  # the rest: the replicated tables (NF4 levels, nested codes)
        assert full / 2 < local < 0.6 * full


# ------------------------------------------------------------------------------------------------------------
# 1 process = 2 processes (and 4), for every method; resume; several nodes
# ------------------------------------------------------------------------------------------------------------
def test_fsdp_lora_equals_one_process_and_resumes_exactly(tiny_ckpt, tmp_path, single):
    """2 processes stopped after step 1 (--max_time 0: each rank writes its shard) and resumed with --resume end
    where one process does, with the same losses on the way and the same lora.safetensors."""
    out = tmp_path / "out"
    first = train(tiny_ckpt, out, "lora", "--devices", "2", "--strategy", "fsdp", "--max_time", "0")
    assert "FSDP: 5 units; parameter bytes per rank" in first  # 2 blocks x (frozen, LoRA) + the root
    assert (out / "train_state.shards").is_dir() and not (out / "train_state.shards.tmp").exists()
    assert [r["step"] for r in metrics(out)] == ["1"]
    second = train(tiny_ckpt, out, "lora", "--devices", "2", "--strategy", "fsdp", "--resume")
    assert "Resuming from step 1 of 3" in second
    assert second.count("step 3/3 |") == 1  # rank 0 alone logs
    assert_same_run(single("lora"), out, "lora")


def test_fsdp_qlora_equals_one_process_with_activation_checkpointing(tiny_ckpt, tmp_path, single):
    """QLoRA sharded (NF4 codes, absmax and LoRA over 2 ranks), LoRA on every layer incl. lm_head, activation
    checkpointing on: the same run as one process without it."""
    out = tmp_path / "out"
    log = train(tiny_ckpt, out, "qlora", "--devices", "2", "--strategy", "fsdp", "--activation_checkpointing")
    assert "FSDP: 6 units" in log
    assert_same_run(single("qlora"), out, "qlora")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "adapter"])
def test_fsdp_full_and_adapter_equal_one_process(tiny_ckpt, tmp_path, single, method):
    out = tmp_path / "out"
    train(tiny_ckpt, out, method, "--devices", "2", "--strategy", "fsdp")
    assert_same_run(single(method), out, method)


@pytest.mark.slow
def test_fsdp_four_processes(tiny_ckpt, tmp_path, single):
    out = tmp_path / "out"
    log = train(tiny_ckpt, out, "lora", "--devices", "4", "--strategy", "fsdp")
    assert "parameter bytes per rank" in log and log.count("MiB") >= 1
    assert_same_run(single("lora"), out, "lora")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_equal_two_processes_on_one_node(tiny_ckpt, tmp_path, single):
    """The cluster command: torchrun on each "node" (here two on 127.0.0.1) with --nnodes 2 --node_rank i and the
    master's address; the script gets --num_nodes 2 --devices 1. The same run as one process (= 2 on one node)."""
    out = tmp_path / "out"
    port = str(free_port())
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(i),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                               str(ROOT / "finetune" / "lora.py"), *args(tiny_ckpt, out, "lora"),
                               "--devices", "1", "--num_nodes", "2", "--strategy", "fsdp"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=tmp_path)
             for i in range(2)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), logs[0][-3000:] + logs[1][-3000:]
    assert "FSDP: 5 units" in logs[0]
    assert_same_run(single("lora"), out, "lora")
