"""Batch inference (generate/batch.py, lora_lab/serve/batch.py): answers equal generate/lora.py's row by row, order
and ids kept, rows of different adapters in one run equal each adapter alone, a killed run resumed writes each row
exactly once, a malformed row is recorded and skipped, the input formats, the summary and the schema scores.

The base is tiny and random with SmolLM2's real tokenizer and ChatML template, its weights scaled x3 (as in
tests/test_serve.py) so greedy decoding has no near-ties that batching's different rounding could flip.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from test_use_adapter import make_adapter, make_tokenized_base, run_in_process

from lora_lab.serve.batch import InputRows, OutputFile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["Hello", "What is the capital of France?", "Write a haiku about llamas", "Name three colours",
           "Is this review positive? The film was a delight."]
N_NEW = 8


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batch")
    base = make_tokenized_base(tmp / "base", block_size=128)
    make_adapter(base, tmp / "adapters" / "qv4", ["query", "value"], r=4, prompt_style="chatml")
    make_adapter(base, tmp / "adapters" / "mlp2", ["mlp", "lm_head"], r=2, prompt_style="plain")
    return tmp


def batch(workdir, capsys, monkeypatch, *args):
    from generate.batch import main

    return run_in_process(main, "--checkpoint_dir", workdir / "base", "--max_new_tokens", N_NEW, "--device", "cpu",
                          *args, capsys=capsys, monkeypatch=monkeypatch)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def script_answer(workdir, capsys, monkeypatch, adapter, prompt, quantize=None):
    """What generate/lora.py (generate/base.py for adapter None) prints for `prompt` alone, greedy."""
    args = ["--prompt", prompt, "--max_new_tokens", N_NEW, "--temperature", 0, "--device", "cpu"]
    args += ["--quantize", quantize] if quantize else []
    if adapter is None:
        from generate.base import main

        args += ["--checkpoint_dir", workdir / "base"]
    else:
        from generate.lora import main

        args += ["--adapter_dir", workdir / "adapters" / adapter]
    result = run_in_process(main, *args, capsys=capsys, monkeypatch=monkeypatch)
    assert result.returncode == 0, result.stderr
    return result.stdout[:-1]


# ------------------------------------------------------------------------------------------------------------
# Exactness: rows of mixed adapters in one batch == generate/lora.py on each prompt alone == each adapter alone
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_mixed_adapters_equal_generate_scripts_and_each_adapter_alone(workdir, tmp_path, capsys, monkeypatch,
                                                                       quantize):
    models = [None, "qv4", "mlp2"] if quantize is None else [None, "qv4"]
    expected = {(m, p): script_answer(workdir, capsys, monkeypatch, m, p, quantize) for m in models for p in PROMPTS}
    assert len({expected[(m, PROMPTS[1])] for m in models}) == len(models)  # every adapter changes the answer
    rows = [{"id": f"r{k}", "model": m or "base", "prompt": p, "extra": k}
            for k, (p, m) in enumerate((p, m) for p in PROMPTS for m in models)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    q = ["--quantize", quantize] if quantize else []
    result = batch(workdir, capsys, monkeypatch, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl",
                   "--adapters_root", workdir / "adapters", "--max_batch_size", 4, *q)
    assert result.returncode == 0, result.stderr
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["row"] for r in out] == list(range(len(rows)))  # the input's order
    for row, got in zip(rows, out):
        assert {k: got[k] for k in row} == row  # the id and every field kept
        model = None if row["model"] == "base" else row["model"]
        assert got["output"] == expected[(model, row["prompt"])], row
        assert got["error"] is None and got["finish_reason"] in ("stop", "length")
    # each adapter alone (--adapter_dir, no model column) answers its rows as the mixed run did
    for m in models[1:]:
        alone = tmp_path / f"{m}.txt"
        alone.write_text("".join(p + "\n" for p in PROMPTS))
        result = batch(workdir, capsys, monkeypatch, "--input", alone, "--output", tmp_path / f"{m}.jsonl",
                       "--adapter_dir", workdir / "adapters" / m, "--max_batch_size", 3, *q)
        assert result.returncode == 0, result.stderr
        assert [r["output"] for r in read_jsonl(tmp_path / f"{m}.jsonl")] == [
            r["output"] for r in out if r["model"] == m]


# ------------------------------------------------------------------------------------------------------------
# Resume after a kill: each row exactly once, the same answers as an uninterrupted run
# ------------------------------------------------------------------------------------------------------------
KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from lora_lab.serve import batch as io
write = io.OutputFile.write
def write_then_die(self, index, row):
    n = write(self, index, row)
    if self.done >= 5:  # 5 rows written: cut the next line in half and die as `kill -9` would
        self.file.write('{{"row": %d, "text": "cut' % self.done)
        self.file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return n
io.OutputFile.write = write_then_die
sys.argv = ["batch.py"] + sys.argv[1:]
from generate.batch import main
from lora_lab.utils import cli
cli(main)
"""


def test_resume_after_kill_writes_each_row_exactly_once(workdir, tmp_path, capsys, monkeypatch):
    texts = [f"{p} ({k})" for k, p in enumerate(PROMPTS * 3)]  # 15 rows
    (tmp_path / "in.txt").write_text("".join(t + "\n" for t in texts))
    common = ["--input", tmp_path / "in.txt", "--adapter_dir", workdir / "adapters" / "qv4", "--max_batch_size", 2]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    killed = subprocess.run([sys.executable, "-c", KILLER.format(root=ROOT), "--checkpoint_dir", workdir / "base",
                             "--max_new_tokens", str(N_NEW), "--device", "cpu", "--output", tmp_path / "out.jsonl",
                             *map(str, common)], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    partial = (tmp_path / "out.jsonl").read_text()
    assert not partial.endswith("\n") and partial.count("\n") == 5  # 5 whole rows and a cut line
    result = batch(workdir, capsys, monkeypatch, *common, "--output", tmp_path / "out.jsonl")
    assert result.returncode == 0, result.stderr
    assert "5 of 15 rows already written" in result.stderr
    resumed = read_jsonl(tmp_path / "out.jsonl")  # every line is JSON again
    assert [r["row"] for r in resumed] == list(range(15)) and [r["text"] for r in resumed] == texts
    full = batch(workdir, capsys, monkeypatch, *common, "--output", tmp_path / "full.jsonl")
    assert full.returncode == 0, full.stderr
    assert resumed == read_jsonl(tmp_path / "full.jsonl")
    again = batch(workdir, capsys, monkeypatch, *common, "--output", tmp_path / "out.jsonl")  # nothing left to do
    assert again.returncode == 0 and "Loaded" not in again.stderr and read_jsonl(tmp_path / "out.jsonl") == resumed


def test_output_of_another_input_is_refused(workdir, tmp_path, capsys, monkeypatch):
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    (tmp_path / "b.txt").write_text("three\nfour\n")
    args = ["--output", tmp_path / "out.jsonl", "--max_batch_size", 2]
    assert batch(workdir, capsys, monkeypatch, "--input", tmp_path / "a.txt", *args).returncode == 0
    result = batch(workdir, capsys, monkeypatch, "--input", tmp_path / "b.txt", *args)
    assert result.returncode == 1 and "rows of another input" in result.stderr and "Loaded" not in result.stderr


# ------------------------------------------------------------------------------------------------------------
# Bad rows, formats, the summary
# ------------------------------------------------------------------------------------------------------------
def test_malformed_rows_are_recorded_and_skipped(workdir, tmp_path, capsys, monkeypatch):
    lines = ['{"id": 1, "prompt": "Hello"}', '{"id": 2, "prompt": ', '["not", "an object"]',
             '{"id": 4, "other": "no prompt"}', '{"id": 5, "prompt": "' + "word " * 300 + '"}',
             '{"id": 6, "prompt": "Hello", "model": "nope"}', '{"id": 7, "prompt": "Hello"}']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("LORA_LAB_PROGRESS", "lines")  # progress as plain lines, one per row written
    monkeypatch.setenv("LORA_LAB_PROGRESS_INTERVAL", "0")
    result = batch(workdir, capsys, monkeypatch, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "o.jsonl")
    assert result.returncode == 0, result.stderr
    out = read_jsonl(tmp_path / "o.jsonl")
    assert [r["row"] for r in out] == list(range(7))
    errors = [r["error"] for r in out]
    assert errors[0] is None and errors[6] is None and out[0]["output"] == out[6]["output"] != ""
    assert "line 2 is not JSON" in errors[1] and "line 3 is not a JSON object" in errors[2]
    assert "no field 'prompt'" in errors[3] and "context holds" in errors[4] and "'nope'" in errors[5]
    assert all(r["output"] is None for r in out[1:6]) and [r.get("id") for r in out] == [1, None, None, 4, 5, 6, 7]
    assert "5 failed" in result.stderr
    progress = [line for line in result.stderr.splitlines() if line.startswith("batch: ")]
    assert progress[0].startswith("batch: 1/7 texts (14%)") and "ETA" in progress[0]
    assert all(" texts/s, " in line and line.endswith(" tokens/s") for line in progress[:-1]), progress


def test_csv_template_schema_scores_and_summary(workdir, tmp_path, capsys, monkeypatch):
    (tmp_path / "in.csv").write_text('id,text,label\n7,"A fine, warm film",fresh\n8,Dull,rotten\n9,a,b,c,d\n')
    schema = {"type": "object", "required": ["sentiment"]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    result = batch(workdir, capsys, monkeypatch, "--input", tmp_path / "in.csv", "--output", tmp_path / "o.jsonl",
                   "--template", 'Review: {text}\nAnswer as JSON {"sentiment": ...}', "--json_schema",
                   tmp_path / "schema.json", "--usd_per_hour", 0.5)
    assert result.returncode == 0, result.stderr
    out = read_jsonl(tmp_path / "o.jsonl")
    assert [(r["id"], r.get("label")) for r in out[:2]] == [("7", "fresh"), ("8", "rotten")]
    assert out[2]["error"].startswith("CSV record on line 4 has 5 fields")
    assert out[0]["json"] == {"valid_json": False, "schema_valid": False, "errors": ["not a JSON object"]}
    assert "1 failed" in result.stderr and "texts/s" in result.stderr and "peak RSS" in result.stderr
    assert "1M such texts:" in result.stderr and "at $0.5/hour" in result.stderr
    assert "0.0 % valid JSON, 0.0 % schema-valid" in result.stderr
    # the same prompt through --prompt_field gives the same answer as through the template
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": 'Review: A fine, warm film\nAnswer as JSON '
                                                            '{"sentiment": ...}'}) + "\n")
    result = batch(workdir, capsys, monkeypatch, "--input", tmp_path / "p.jsonl", "--output", tmp_path / "p.out")
    assert read_jsonl(tmp_path / "p.out")[0]["output"] == out[0]["output"]


def test_bad_settings_fail_in_one_line_before_loading(workdir, tmp_path, capsys, monkeypatch):
    (tmp_path / "in.jsonl").write_text('{"question": "Hi", "output": "x"}\n')
    cases = [(["--prompt_field", "prompt"], "no such field"), ([], "pass --prompt_field NAME or --template"),
             (["--template", "{answer}"], "first row has no field 'answer'"),
             (["--prompt_field", "question"], "rename it or pass --output_field"),
             (["--prompt_field", "question", "--output_field", "row"], "--output_field 'row'")]
    for args, message in cases:
        result = batch(workdir, capsys, monkeypatch, "--input", tmp_path / "in.jsonl", "--output",
                       tmp_path / "o.jsonl", *args)
        assert result.returncode == 1 and message in result.stderr and "Loaded" not in result.stderr, result.stderr
    assert not (tmp_path / "o.jsonl").exists()
    result = batch(workdir, capsys, monkeypatch, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "o.jsonl",
                   "--prompt_field", "question", "--output_field", "answer")
    assert result.returncode == 0 and read_jsonl(tmp_path / "o.jsonl")[0]["output"] == "x"


def test_input_formats(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"prompt": "x"}, 3]))
    (tmp_path / "b.txt").write_text("first\n\nsecond\n")
    (tmp_path / "c.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n')
    assert list(InputRows(tmp_path / "a.json")) == [(0, {"prompt": "x"}, None), (1, None, "item 1 is not a JSON object")]
    assert list(InputRows(tmp_path / "b.txt")) == [(0, {"text": "first"}, None), (1, {"text": "second"}, None)]
    assert [r for _, r, _ in InputRows(tmp_path / "c.jsonl")] == [{"a": 1}, {"a": 2}]
    out = OutputFile(tmp_path / "o.jsonl", InputRows(tmp_path / "b.txt"))
    assert out.write(1, {"row": 1}) == 0 and out.write(0, {"row": 0}) == 2  # written in the input's order
    out.close()
    assert [json.loads(x)["row"] for x in (tmp_path / "o.jsonl").read_text().splitlines()] == [0, 1]


def test_bench_batch_sides_give_the_same_answers(workdir, tmp_path):
    """benchmarks/bench_batch.py on the tiny model: batch.py, the generate/lora.py loop and transformers + PEFT's
    padded batches do the same work (the same greedy answers), and each gets a rate and a cost."""
    pytest.importorskip("peft")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_batch

    (tmp_path / "reviews.csv").write_text("text,label\n" + "".join(
        f"{t},fresh\n" for t in ["Great fun", "A dull and long film", "Loved it", "Not for me", "Superb acting"]))
    rows = bench_batch.main(checkpoint_dir=workdir / "base", adapter_dir=workdir / "adapters" / "qv4", n_texts=5,
                            loop_texts=3, max_new_tokens=6, max_batch_size=2, quantize=["none"],
                            reviews=tmp_path / "reviews.csv")
    assert [(r["side"], r["texts"]) for r in rows] == [("generate/lora.py loop", 3), ("batch.py", 5),
                                                       ("transformers+PEFT", 5)]
    for r in rows:
        assert r["same_as_loop"] == 1.0 and r["texts_per_s"] > 0 and r["usd_per_1M"] > 0, r
