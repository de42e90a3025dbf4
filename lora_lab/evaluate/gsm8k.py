"""GSM8K as the efficiency challenge scored it: 8-shot chain of thought, exact match on the final number.

    python -m lora_lab.evaluate --checkpoint_dir DIR --tasks gsm8k --limit 100

The test split (1,319 grade-school word problems, the Hub's `question` / `answer` columns, each answer a worked
solution ending `#### N`) is read from gsm8k_test.jsonl in the local evaluation data (local_tasks.eval_data_dir():
$LORA_LAB_EVAL_DATA or ../shared/assets/eval). The prompt is the eight worked examples of Wei et al. (2022,
"Chain-of-thought prompting"), the same as lm-eval's `gsm8k_cot`, then the question, in that task's format:

    Q: <example question>\nA: <worked answer> The answer is 6.\n\n ... Q: <question>\nA:

passed as it is (no chat template: the challenge scored base-model style prompts), answered greedily until "Q:" or
a blank line (the model starting the next example) or at most 256 tokens. The answer's final number (HELM's
final_number_exact_match): the number after the last "The answer is", else the last number in the text; `$`,
thousands commas and a trailing period dropped, and compared as a number (18.00 == 18), with the number after `####`.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Optional

import torch

from lora_lab.utils import LoraLabError

TEST_FILE = "gsm8k_test.jsonl"
STOP = ("Q:", "\n\n")
MAX_NEW_TOKENS = 256
# Wei et al. (2022), table 20: the eight exemplars every GSM8K chain-of-thought evaluation uses
EXAMPLES = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there "
     "will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been "
     "21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason "
     "give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The "
     "answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
     "were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he "
     "had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
]

_NUMBER = r"-?\$?\s*(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
ANSWER_IS = re.compile(r"answer is\s*:?\s*(" + _NUMBER + ")", re.IGNORECASE)
NUMBER = re.compile(_NUMBER)


def prompt(question: str) -> str:
    shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in EXAMPLES)
    return f"{shots}Q: {question}\nA:"


def normalize_number(text: Optional[str]) -> Optional[str]:
    """'$1,234.50' -> '1234.5', '18.' -> '18', '-0' -> '0'; None if it is not a number."""
    if text is None:
        return None
    text = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    if value == 0:
        return "0"
    value = value.normalize()
    return format(value, "f")


def final_number(answer: str) -> Optional[str]:
    """The number an answer ends on: after its last "The answer is", else its last number (normalized)."""
    hits = ANSWER_IS.findall(answer)
    if hits:
        return normalize_number(hits[-1])
    numbers = NUMBER.findall(answer)
    return normalize_number(numbers[-1]) if numbers else None


def gold_number(solution: str) -> Optional[str]:
    """The reference number of a GSM8K solution: what follows `####`."""
    return normalize_number(solution.split("####")[-1].strip())


def is_correct(answer: str, solution: str) -> bool:
    got = final_number(answer)
    return got is not None and got == gold_number(solution)


def load_rows(data_dir: Optional[Path] = None, limit: Optional[float] = None) -> list[dict]:
    from lora_lab.evaluate.local_tasks import EVAL_DATA_ENV, eval_data_dir

    path = Path(data_dir or eval_data_dir()) / TEST_FILE
    if not path.is_file():
        raise LoraLabError(f"task gsm8k: {path} does not exist: set {EVAL_DATA_ENV} to the folder holding "
                           f"{TEST_FILE} (the Hub's gsm8k test split as JSON lines, `question` and `answer`)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    if limit is not None:
        rows = rows[:int(limit) if limit >= 1 else max(1, round(len(rows) * limit))]
    return rows


@torch.inference_mode()
def answer(model, tokenizer, question: str, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """The model's greedy chain of thought for one question, cut before a stop sequence."""
    from lora_lab.generate import generate

    ids = tokenizer.encode(prompt(question))
    ids = ids[-(model.config.block_size - max_new_tokens):]  # left-truncated, as lm-eval's generate_until does
    out: list[int] = []
    text = ""
    for token in generate(model, ids, max_new_tokens, temperature=0.0, eos_ids=tokenizer.eos_ids):
        if token in tokenizer.eos_ids:
            break
        out.append(token)
        text = tokenizer.decode(out)
        if any(s in text for s in STOP):
            break
    cut = min([i for i in (text.find(s) for s in STOP) if i >= 0], default=len(text))
    return text[:cut].strip()


def gsm8k_task(model, tokenizer, limit: Optional[float] = None, data_dir: Optional[Path] = None,
               max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """{"summary": {"n", "exact_match"}, "rows": [{question, answer, expected, predicted, correct}]}."""
    if model.config.block_size <= max_new_tokens:
        max_new_tokens = model.config.block_size // 2
    from lora_lab.progress import progress

    rows = load_rows(data_dir, limit)
    results = []
    for row in progress(rows, desc="gsm8k", unit="question"):
        text = answer(model, tokenizer, row["question"], max_new_tokens)
        results.append({"question": row["question"], "answer": text, "expected": gold_number(row["answer"]),
                        "predicted": final_number(text), "correct": is_correct(text, row["answer"])})
    n = len(results)
    return {"summary": {"n": n, "exact_match": sum(r["correct"] for r in results) / max(n, 1)}, "rows": results}
