"""The data mix (lora_lab/data/mix.py, `--data mix.yaml`): weights and counts honoured, seeded, exact and
near-duplicate removal, decontamination that drops exactly the planted overlapping rows, the record a run keeps,
and one-line errors. Sources are small hand-made files, so every count is known."""

import json

import pytest
import yaml

from lora_lab.data.mix import load_mix, mix_table, normalize
from lora_lab.utils import LoraLabError
from lora_lab.args import call_flat

EVAL_ROW = {"question": "Which planet in our solar system has the largest number of confirmed moons orbiting it today?",
            "choices": ["Saturn", "Mars"], "answer": "Saturn"}


def rows(prefix, n):
    return [{"instruction": f"{prefix} task number {i}", "input": "", "output": f"answer {prefix} {i}"}
            for i in range(n)]


def write(path, data):
    path.write_text("\n".join(json.dumps(r) for r in data) + "\n")
    return path


def mix_file(tmp_path, spec, name="mix.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def sources(tmp_path):
    write(tmp_path / "a.jsonl", rows("alpha", 100))
    write(tmp_path / "b.jsonl", rows("beta", 50))
    write(tmp_path / "c.jsonl", rows("gamma", 30))
    return tmp_path


def source_of(row):
    return row["instruction"].split()[0]


def test_weights_and_counts_are_honoured(sources, monkeypatch):
    monkeypatch.delenv("LORA_LAB_EVAL_DATA", raising=False)
    spec = {"total_rows": 80, "sources": [{"data": "a.jsonl", "weight": 3}, {"data": "b.jsonl", "weight": 1},
                                          {"data": "c.jsonl", "rows": 10}]}
    got, _, report = load_mix(mix_file(sources, spec), verbose=False)
    counts = {s: sum(source_of(r) == s for r in got) for s in ("alpha", "beta", "gamma")}
    assert counts == {"alpha": 60, "beta": 20, "gamma": 10} and len(got) == 90
    assert len({json.dumps(r, sort_keys=True) for r in got}) == 90  # drawn without replacement
    assert [s["taken"] for s in report["sources"]] == [60, 20, 10]
    # no total_rows: as large as it gets without repeating a weighted source (b's 50 rows are 1/4 of 200; a has 100)
    spec.pop("total_rows")
    got, _, report = load_mix(mix_file(sources, spec), verbose=False)
    assert [s["taken"] for s in report["sources"]] == [100, 33, 10] and report["total_rows"] == 143
    # more rows than a source has: whole passes, counted as repeated
    spec["sources"][2]["rows"] = 70
    _, _, report = load_mix(mix_file(sources, spec), verbose=False)
    assert report["sources"][2]["taken"] == 70 and report["sources"][2]["repeated"] == 40


def test_the_same_file_gives_the_same_rows_and_the_seed_changes_them(sources, monkeypatch):
    monkeypatch.delenv("LORA_LAB_EVAL_DATA", raising=False)
    spec = {"seed": 3, "total_rows": 40,
            "sources": [{"data": "a.jsonl", "weight": 1}, {"data": "b.jsonl", "weight": 1}]}
    first = load_mix(mix_file(sources, spec), verbose=False)[0]
    assert load_mix(mix_file(sources, spec, "again.yaml"), verbose=False)[0] == first
    spec["seed"] = 4
    other = load_mix(mix_file(sources, spec), verbose=False)[0]
    assert other != first and len(other) == len(first)


def test_exact_and_near_duplicates_are_removed_first_occurrence_kept(tmp_path, monkeypatch):
    monkeypatch.delenv("LORA_LAB_EVAL_DATA", raising=False)
    a = rows("alpha", 10)
    a += [dict(a[0]), dict(a[1])]  # 2 exact duplicates inside a
    a.append({"instruction": "ALPHA task-number 2!", "input": "", "output": "Answer: alpha 2."})  # near duplicate
    b = [dict(a[3]), {"instruction": "  alpha task number 4 ", "input": "", "output": "answer ALPHA 4"}]
    b += rows("beta", 5)
    write(tmp_path / "a.jsonl", a)
    write(tmp_path / "b.jsonl", b)
    spec = {"sources": [{"data": "a.jsonl", "rows": 10}, {"data": "b.jsonl", "rows": 5}]}
    got, _, report = load_mix(mix_file(tmp_path, spec), verbose=False)
    sa, sb = report["sources"]
    assert (sa["read"], sa["exact_duplicates"], sa["near_duplicates"], sa["kept"]) == (13, 2, 1, 10)
    assert (sb["read"], sb["exact_duplicates"], sb["near_duplicates"], sb["kept"]) == (7, 1, 1, 5)
    assert len({normalize(r["instruction"] + " " + r["output"]) for r in got}) == len(got) == 15
    assert normalize("Hello,   World!") == normalize("hello world") == "hello world"


def test_decontamination_drops_exactly_the_planted_rows(tmp_path, monkeypatch):
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    write(eval_dir / "quiz_test.jsonl", [EVAL_ROW, {"question": "What is two plus two?", "answer": "four"}])
    words = EVAL_ROW["question"].split()
    clean = rows("alpha", 20)
    planted = [  # each shares a 13-word span with an evaluation row, in other case and punctuation
        {"instruction": "Answer this: " + " ".join(words[:13]).upper() + "!!", "input": "", "output": "Saturn"},
        {"instruction": "Trivia", "input": "", "output": "As asked: " + " ".join(words[2:15]) + ", it is Saturn."},
        {"instruction": "What is two plus two?", "input": "", "output": "four"},  # a short evaluation row, whole
    ]
    near_miss = [  # 12 words of the span only, or the short row inside a longer text: kept
        {"instruction": " ".join(words[:12]), "input": "", "output": "something else entirely here"},
        {"instruction": "Tell me: what is two plus two? Explain it step by step.", "input": "", "output": "4"},
    ]
    data = clean[:10] + planted[:2] + near_miss + clean[10:] + planted[2:]
    write(tmp_path / "train.jsonl", data)
    spec = {"sources": [{"data": "train.jsonl", "weight": 1}], "decontaminate": {"eval_data": ["eval"]}}
    got, _, report = load_mix(mix_file(tmp_path, spec), verbose=False)
    src = report["sources"][0]
    assert src["contaminated"] == 3 and src["contaminated_by"] == {"quiz_test.jsonl": 3}
    assert sorted(map(json.dumps, got)) == sorted(map(json.dumps, clean + near_miss))
    assert report["eval_files"] == [str(eval_dir / "quiz_test.jsonl")]
    # the default: every evaluation file in LORA_LAB_EVAL_DATA
    monkeypatch.setenv("LORA_LAB_EVAL_DATA", str(eval_dir))
    spec.pop("decontaminate")
    _, _, report = load_mix(mix_file(tmp_path, spec), verbose=False)
    assert report["sources"][0]["contaminated"] == 3
    table = mix_table(report)
    assert "| train.jsonl | weight 1 | 25 | 0 | 0 | 3 | 22 | 22 | 0 |" in table
    monkeypatch.delenv("LORA_LAB_EVAL_DATA")
    _, _, report = load_mix(mix_file(tmp_path, spec), verbose=False)
    assert report["sources"][0]["contaminated"] == 0 and "NOT decontaminated" in mix_table(report)


@pytest.mark.parametrize("spec,message", [
    ({"sources": [{"data": "a.jsonl", "weight": 1, "rows": 3}]}, "give either `weight` or `rows`"),
    ({"sources": [{"data": "a.jsonl"}]}, "give either `weight` or `rows`"),
    ({"sources": [{"data": "a.jsonl", "weight": -1}]}, "weight must be a positive number"),
    ({"sources": [{"data": "a.jsonl", "weigth": 1}]}, "unknown key(s) ['weigth']"),
    ({"sources": []}, "a mix file holds `sources:`"),
    ({"sources": [{"data": "a.jsonl", "rows": 3}], "total_rows": 5}, "no source has a weight"),
    ({"sources": [{"data": "nope.jsonl", "rows": 3}]}, "'nope.jsonl' is neither a dataset name"),
    ({"sources": [{"data": "a.jsonl", "rows": 3}], "decontaminate": {"eval_data": ["missing"]}}, "does not exist"),
])
def test_bad_mix_files_are_one_line(sources, spec, message):
    with pytest.raises(LoraLabError) as e:
        load_mix(mix_file(sources, spec), verbose=False)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_run_on_a_mix_records_it(tiny_ckpt, sources, monkeypatch, capsys):
    import finetune.lora as ft

    monkeypatch.delenv("LORA_LAB_EVAL_DATA", raising=False)
    path = mix_file(sources, {"sources": [{"data": "a.jsonl", "rows": 12}, {"data": "b.jsonl", "rows": 6}]})
    out = sources / "out"
    call_flat(ft.setup, checkpoint_dir=tiny_ckpt, out_dir=out, data=str(path), max_steps=1, batch_size=2, micro_batch_size=2,
             max_seq_length=64, eval_interval=100, eval_iters=1, eval_samples=0, log_interval=1)
    record = json.loads((out / "data_mix.json").read_text())
    assert [(s["name"], s["taken"]) for s in record["sources"]] == [("a.jsonl", 12), ("b.jsonl", 6)]
    assert "| a.jsonl | rows 12 | 100 | 0 | 0 | 0 | 100 | 12 | 0 |" in capsys.readouterr().err
