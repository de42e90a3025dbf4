"""The efficiency challenge's tasks offline: GSM8K's scoring on hand-made answers, its prompt against lm-eval's
gsm8k_cot, the combined score, and `--tasks challenge` end to end on a tiny model with the real local data."""

import json
from pathlib import Path

import pytest

from lora_lab.evaluate import challenge
from lora_lab.evaluate.gsm8k import EXAMPLES, final_number, gold_number, is_correct, normalize_number, prompt

pytestmark = pytest.mark.usefixtures("one_thread")
SOLUTION = "She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18"


@pytest.mark.parametrize("answer,correct", [
    ("9 * 2 = 18. The answer is 18.", True),
    ("The answer is $18.", True),
    ("The answer is 18", True),
    ("the answer is: 18.00", True),  # number formats
    ("She makes 18 dollars a day.", True),  # no "The answer is": the last number
    ("16 - 3 - 4 = 9 eggs, 9 * 2 = $18", True),
    ("The answer is 18. Q: 3 more", True),  # "The answer is" wins over a later number
    ("The answer is 17.", False),
    ("The answer is 180.", False),
    ("18 eggs, so 36 dollars.", False),  # the final number, not any number
    ("I do not know.", False),
    ("", False),
])
def test_gsm8k_scoring_hand_made_answers(answer, correct):
    assert is_correct(answer, SOLUTION) is correct


def test_gsm8k_number_normalization():
    assert gold_number("so 80,000 + 50,000\n#### 70,000") == "70000"
    assert final_number("The answer is $1,234.50.") == "1234.5"
    assert final_number("It costs -5 dollars") == "-5"
    assert final_number("The answer is 0.0") == "0" == normalize_number("-0")
    assert final_number("He paid $ 1,000") == "1000"
    assert final_number("about .5 of them") == "0.5"
    assert normalize_number("12") == normalize_number("12.") == normalize_number("12.000") == "12"
    assert normalize_number("abc") is None and final_number("no digits") is None
    assert is_correct("The answer is 1,000,000.", "...\n#### 1000000")


def test_gsm8k_prompt_is_lm_evals_gsm8k_cot():
    """The eight exemplars and the format are lm-eval's gsm8k_cot (Wei et al.), read from lm-eval's own YAML."""
    lm_eval = pytest.importorskip("lm_eval")
    import yaml

    cfg = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k-cot.yaml").read_text())
    assert cfg["num_fewshot"] == 8
    samples = [(s["question"], s["target"]) for s in cfg["fewshot_config"]["samples"]]
    assert EXAMPLES == samples
    text = cfg["doc_to_text"].replace("{{question}}", "How many?")  # 'Q: {{question}}\nA:'
    expected = "".join(f"{cfg['doc_to_text'].replace('{{question}}', q)} {a}\n\n" for q, a in samples) + text
    assert prompt("How many?") == expected


def test_combined_score_and_each_tasks_share():
    result = challenge.combined({"mmlu": 0.5, "gsm8k": 0.1, "boolq": 0.6})
    assert result["score"] == pytest.approx(0.4)
    assert result["tasks"]["gsm8k"] == pytest.approx({"score": 0.1, "weight": 1 / 3, "contribution": 0.1 / 3})
    assert sum(t["contribution"] for t in result["tasks"].values()) == pytest.approx(result["score"])
    assert {"BIG-bench", "TruthfulQA", "CNN/DailyMail", "BBQ", "HellaSwag", "OpenbookQA"} <= set(result["not_run"])
    table = challenge.table(result)
    assert "| gsm8k | GSM8K | 8 | exact_match | 0.1000 | 0.333 | 0.0333 |" in table
    assert "**0.4000**" in table and "not run offline: BIG-bench (open evaluation: no local data)" in table
    lm = {"groups": {"mmlu": {"acc,none": 0.25}}, "results": {"boolq": {"acc,none": 0.5, "acc_stderr,none": 0.1}}}
    assert challenge.scores(lm, {"exact_match": 0.0}) == {"mmlu": 0.25, "gsm8k": 0.0, "boolq": 0.5}


@pytest.mark.slow  # ~40 s of CPU, mostly lm-eval building the 61 tasks from the full local files
def test_tasks_challenge_end_to_end(tiny_ckpt, tmp_path, assets, capsys):
    """Every task runs on the real local data (2 documents each), the table and the out_file agree."""
    pytest.importorskip("lm_eval")
    assets("eval/gsm8k_test.jsonl")
    from lora_lab.evaluate.__main__ import main

    main(checkpoint_dir=tiny_ckpt, tasks="challenge", limit=2, device="cpu", out_file=tmp_path / "r.json")
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "r.json").read_text())["models"][0]
    result = record["challenge"]
    assert set(result["tasks"]) == set(challenge.TASKS)  # everything we hold ran
    assert record["gsm8k"]["summary"]["n"] == 2 and len(record["gsm8k"]["rows"]) == 2
    assert result["score"] == pytest.approx(sum(t["score"] for t in result["tasks"].values()) / len(challenge.TASKS))
    assert f"**{result['score']:.4f}**" in out and "not run offline: BIG-bench" in out
    mmlu = record["challenge_lm_eval"]["configs"]["mmlu_abstract_algebra"]
    assert mmlu["num_fewshot"] == 5 and mmlu["dataset_kwargs"]["data_files"]["test"].endswith("mmlu_test.jsonl")
