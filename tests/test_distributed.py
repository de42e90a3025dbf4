"""--strategy fsdp (lora_lab/distributed.py): FSDP2 units on Fabric's ModelParallelStrategy, here on the CPU with gloo.

N processes must equal one: the same losses (atol 1e-5) and the same saved adapter / model (1e-5) with the same global
batch and seed, which also shows that each rank reads its own samples (the global stream split, as under DDP) and
that validation is averaged. The processes are started by Fabric's own launcher (`--devices N`), and for the
several-nodes case by torchrun (`--nnodes 2 --node_rank i`), as on a cluster.
"""

import csv
import json
import os
import random
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


def assert_same_run(one: Path, many: Path, method: str, atol: float = 1e-5) -> None:
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
        torch.testing.assert_close(y[k], x[k], rtol=0, atol=atol)
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


# ------------------------------------------------------------------------------------------------------------
# finetune/classify.py: the head (and LoRA, blocks) sharded; scores.json and classifier.safetensors as one process
# ------------------------------------------------------------------------------------------------------------
CLASSIFY = dict(max_steps=3, batch_size=4, micro_batch_size=1, max_seq_length=32, learning_rate=1e-2, warmup_steps=2,
                eval_interval=3, eval_iters=2, log_interval=1, seed=3, labels="bad,good", lora_dropout=0.0,
                trainable_blocks=1, n_test=8)


def reviews(path: Path) -> Path:
    """60 texts of filler words ending with a good or a bad word, labelled by it."""
    rng = random.Random(0)
    rows = ["text,label"]
    for _ in range(60):
        label = rng.choice(["good", "bad"])
        word = rng.choice(["great", "superb", "lovely"] if label == "good" else ["awful", "dull", "poor"])
        rows.append(" ".join([rng.choice(["the", "film", "plot", "was", "and"]) for _ in range(4)] + [word])
                    + f",{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


def classify(ckpt: Path, out: Path, method: str, *flags: str) -> str:
    command = [sys.executable, str(ROOT / "finetune" / "classify.py"), "--checkpoint_dir", str(ckpt), "--out_dir",
               str(out), "--data", str(reviews(out.parent / "reviews.csv")), "--method", method]
    for k, v in CLASSIFY.items():
        command += [f"--{k}", str(v)]
    return launch([*command, *flags], cwd=out.parent)


def assert_same_classifier(one: Path, many: Path) -> None:
    rows_one, rows_many = metrics(one), metrics(many)
    assert [r["step"] for r in rows_many] == [r["step"] for r in rows_one] == ["1", "2", "3"]
    for a, b in zip(rows_one, rows_many):
        for key in ("train_loss", "val_loss"):
            if a[key] and b[key]:  # (a run stopped by --max_time validates at its stop too)
                assert abs(float(a[key]) - float(b[key])) < 1e-5, (key, a, b)
    x, y = load_file(one / "classifier.safetensors"), load_file(many / "classifier.safetensors")
    assert x.keys() == y.keys() and rows_one[-1]["val_loss"] and rows_many[-1]["val_loss"]
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=0, atol=1e-5)
    assert json.loads((one / "classifier_config.json").read_text()) == \
        json.loads((many / "classifier_config.json").read_text())
    a, b = (json.loads((d / "scores.json").read_text()) for d in (one, many))
    for split in ("validation", "test"):
        assert a[split] == b[split]  # accuracy, macro-F1, confusion matrix: the same predictions


def test_fsdp_classifier_equals_one_process_and_resumes_exactly(tiny_ckpt, tmp_path):
    """classify --method lora under fsdp, stopped after step 1 and resumed: the LoRA matrices and the head (in one
    root unit apart from the frozen embeddings) train as on one process, to the same file and the same scores."""
    (tmp_path / "one").mkdir(), (tmp_path / "many").mkdir()
    classify(tiny_ckpt, tmp_path / "one" / "out", "lora")
    many = tmp_path / "many" / "out"
    first = classify(tiny_ckpt, many, "lora", "--devices", "2", "--strategy", "fsdp", "--max_time", "0")
    # 2 blocks x (frozen, LoRA), the embedding (untied from the head by the classifier), the root (frozen, head)
    assert "FSDP: 7 units; parameter bytes per rank" in first
    assert (many / "train_state.shards").is_dir() and [r["step"] for r in metrics(many)] == ["1"]
    second = classify(tiny_ckpt, many, "lora", "--devices", "2", "--strategy", "fsdp", "--resume")
    assert "Resuming from step 1 of 3" in second
    assert_same_classifier(tmp_path / "one" / "out", many)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["head", "blocks", "qlora", "full"])
def test_fsdp_classifier_methods_equal_one_process(tiny_ckpt, tmp_path, method):
    (tmp_path / "one").mkdir(), (tmp_path / "many").mkdir()
    classify(tiny_ckpt, tmp_path / "one" / "out", method)
    classify(tiny_ckpt, tmp_path / "many" / "out", method, "--devices", "2", "--strategy", "fsdp")
    assert_same_classifier(tmp_path / "one" / "out", tmp_path / "many" / "out")


# ------------------------------------------------------------------------------------------------------------
# finetune/dpo.py: the policy and its reference pass (the same sharded model, LoRA off) over 2 ranks
# ------------------------------------------------------------------------------------------------------------
DPO = dict(max_steps=3, batch_size=4, micro_batch_size=1, max_seq_length=64, learning_rate=2e-2, warmup_steps=1,
           lora_dropout=0.0, eval_interval=3, eval_iters=2, eval_samples=0, log_interval=1, seed=7, n_val=4)
POLITE = [{"instruction": f"Tell me about {t}.", "input": "",
           "chosen": f"Of course! Here is a short note about {t}; I hope it helps.",
           "rejected": f"Ugh, {t} again? Figure it out yourself."}
          for t in ["the weather", "a recipe", "the train times", "my essay", "a book", "the meeting", "this bug",
                    "a gift", "the exam", "a poem", "the budget", "the news", "my garden", "the sky", "a song"]]


def dpo(ckpt: Path, out: Path, *flags: str) -> str:
    data = out.parent / "pairs.json"
    data.write_text(json.dumps(POLITE))
    command = [sys.executable, str(ROOT / "finetune" / "dpo.py"), "--checkpoint_dir", str(ckpt), "--out_dir",
               str(out), "--data", str(data)]
    for k, v in DPO.items():
        command += [f"--{k}", str(v)]
    return launch([*command, *flags], cwd=out.parent)


def test_fsdp_qlora_dpo_equals_one_process(tiny_ckpt, tmp_path):
    """DPO on an NF4 base sharded over 2 ranks: the same losses, reward margins and lora.safetensors as one process."""
    (tmp_path / "one").mkdir(), (tmp_path / "many").mkdir()
    one, many = tmp_path / "one" / "out", tmp_path / "many" / "out"
    dpo(tiny_ckpt, one, "--quantize", "nf4")
    log = dpo(tiny_ckpt, many, "--quantize", "nf4", "--devices", "2", "--strategy", "fsdp")
    assert "FSDP: 5 units" in log
    rows_one, rows_many = metrics(one), metrics(many)
    assert [r["step"] for r in rows_many] == [r["step"] for r in rows_one] == ["1", "2", "3"]
    for a, b in zip(rows_one, rows_many):
        for key, value in a.items():
            if key not in ("step", "lr", "tokens", "tokens_per_sec") and value:  # (log-probs: sums of ~60 tokens)
                assert float(b[key]) == pytest.approx(float(value), rel=1e-6, abs=1e-5), (key, a, b)
    assert rows_one[-1]["val_loss"]
    x, y = load_file(one / "lora.safetensors"), load_file(many / "lora.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "adapter"])
def test_fsdp_full_and_adapter_equal_one_process(tiny_ckpt, tmp_path, single, method):
    out = tmp_path / "out"
    train(tiny_ckpt, out, method, "--devices", "2", "--strategy", "fsdp")
    assert_same_run(single(method), out, method)


@pytest.mark.slow
def test_fsdp_lora_with_pissa_init_saves_the_one_process_files(tiny_ckpt, tmp_path):
    """--lora_init pissa changes the frozen base (W - s B A): sharded, the converted rank-2r adapter and
    lora_base.safetensors that rank 0 writes are still those of one process."""
    (tmp_path / "one").mkdir(), (tmp_path / "many").mkdir()
    one, many = tmp_path / "one" / "out", tmp_path / "many" / "out"
    train(tiny_ckpt, one, "lora", lora_init="pissa")
    train(tiny_ckpt, many, "lora", "--devices", "2", "--strategy", "fsdp", lora_init="pissa")
    assert_same_run(one, many, "lora")
    x, y = load_file(one / "lora_base.safetensors"), load_file(many / "lora_base.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


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


# ------------------------------------------------------------------------------------------------------------
# the real model: SmolLM2-135M QLoRA over 2 ranks
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fsdp_qlora_of_smollm2_equals_one_process(smollm2, tmp_path):
    """SmolLM2-135M-Instruct, NF4 base and LoRA on every linear layer sharded over 2 ranks, each holding half of
    the parameter bytes: the losses (within 1e-5) and lora.safetensors of one process. Of the adapter's 2.8 M
    elements all but about 150 agree within 1e-5 and those within 8e-5: at step 2 a lora_A's gradient is tiny
    (B was zero at step 1), and Adam moves each element by about the learning rate whatever its gradient's size,
    so a gradient near zero that two ranks sum in another order than one process moves it by a share of 3e-3."""
    real = dict(n_train=16, n_val=2, max_steps=2, batch_size=2, max_seq_length=128, eval_interval=2, eval_iters=1,
                learning_rate=3e-3)
    (tmp_path / "one").mkdir(), (tmp_path / "many").mkdir()
    one, many = tmp_path / "one" / "out", tmp_path / "many" / "out"
    train(smollm2, one, "qlora", **real)
    log = train(smollm2, many, "qlora", "--devices", "2", "--strategy", "fsdp", **real)
    line = next(x for x in log.splitlines() if "parameter bytes per rank" in x)
    ranks = [float(b) for b in line.split("per rank ")[1].split(" MiB")[0].split(", ")]
    full = float(line.split(" MiB of ")[1].split(" MiB")[0])
    assert len(ranks) == 2 and all(0.49 * full < b < 0.51 * full for b in ranks), line
    assert_same_run(one, many, "qlora", atol=0.05 * real["learning_rate"])  # no element off by more than 5 % of a step
    x, y = load_file(one / "lora.safetensors"), load_file(many / "lora.safetensors")
    off = sum(int(((x[k] - y[k]).abs() > 1e-5).sum()) for k in x)
    assert off < 1e-4 * sum(t.numel() for t in x.values()), off  # and 99.99 % within 1e-5
