"""lora_lab.evaluate against references we did not write: lm-eval's own `hf` model on our Hugging Face export
(per-request loglikelihoods, generations, accuracies) and a direct transformers perplexity; plus batching, JSON
scoring, comparing models and the one-line errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, require_asset
from tiny_checkpoint import SMOL_TOKENIZER, write_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
lm_eval = pytest.importorskip("lm_eval")

# a generate_until task on local data (SciQ's questions, answered in a few words), for the generation path
SCIQ_GEN = {
    "task": "sciq_gen", "dataset_path": "json", "validation_split": "validation", "output_type": "generate_until",
    "doc_to_text": "{{support.lstrip()}}\nQuestion: {{question}}\nAnswer:", "doc_to_target": "{{correct_answer}}",
    "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": 12, "do_sample": False},
    "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, "ignore_case": True}],
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random lora_lab checkpoint with SmolLM2's tokenizer, and its Hugging Face export."""
    from lora_lab.formats.hf import export_hf

    root = tmp_path_factory.mktemp("eval")
    ckpt = write_tiny_checkpoint(root / "ckpt", require_asset(SMOL_TOKENIZER))
    export_hf(ckpt, root / "hf")
    return ckpt, root / "hf"


def ours(checkpoint_dir, batch_size=8):
    from lora_lab.evaluate.lm_eval_model import LoraLabLM
    from lora_lab.evaluate.load import load_model

    loaded = load_model(checkpoint_dir)
    return LoraLabLM(loaded.model, loaded.tokenizer, batch_size=batch_size, progress=False)


def run_both(checkpoint_dir, hf_dir, tasks, limit):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from lora_lab.evaluate.local_tasks import task_manager_for

    manager, _ = task_manager_for([t for t in tasks if isinstance(t, str)])
    hf = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=8, dtype="float32")
    out = []
    for lm in (ours(checkpoint_dir), hf):
        out.append(simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=True,
                                   random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0))
    return out


def compare_runs(a, b, tasks):
    n = 0
    for task in tasks:
        sa = sorted(a["samples"][task], key=lambda s: s["doc_id"])
        sb = sorted(b["samples"][task], key=lambda s: s["doc_id"])
        assert len(sa) == len(sb) > 0
        for x, y in zip(sa, sb):
            assert x["arguments"] == y["arguments"]  # the same prompts ...
            for rx, ry in zip(x["resps"], y["resps"]):
                rx, ry = rx[0], ry[0]
                if isinstance(rx, str):  # generate_until: the same text
                    assert rx == ry
                else:  # loglikelihood: (logprob, is_greedy)
                    assert rx[0] == pytest.approx(ry[0], abs=1e-4)
                    assert rx[1] == ry[1]
                n += 1
        for key, value in b["results"][task].items():
            if isinstance(value, float) and "stderr" not in key:
                assert a["results"][task][key] == pytest.approx(value, abs=1e-9), (task, key)
    return n


def sciq_gen():
    return {**SCIQ_GEN, "dataset_kwargs": {"data_files": {"validation": str(require_asset("eval/sciq_validation.jsonl"))}}}


def test_same_loglikelihoods_and_generations_as_lm_eval_hf_tiny(tiny):
    """Tiny random model: our lm-eval model and lm-eval's hf model on our export agree request by request."""
    require_asset("eval/arc_easy_validation.jsonl")
    ckpt, hf_dir = tiny
    a, b = run_both(ckpt, hf_dir, ["arc_easy", sciq_gen()], limit=60)
    assert compare_runs(a, b, ["arc_easy", "sciq_gen"]) >= 250


@pytest.mark.slow
def test_same_loglikelihoods_and_generations_as_lm_eval_hf_smollm2(tmp_path):
    """SmolLM2-135M-Instruct (converted from the GGUF): the same, on real weights."""
    from lora_lab.formats.hf import export_hf

    gguf = require_asset("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
    require_asset("eval/arc_easy_validation.jsonl")
    subprocess.run([sys.executable, "-m", "lora_lab.convert", str(gguf), str(tmp_path / "smol")], check=True,
                   cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    export_hf(tmp_path / "smol", tmp_path / "hf")
    a, b = run_both(tmp_path / "smol", tmp_path / "hf", ["arc_easy", sciq_gen()], limit=40)
    assert compare_runs(a, b, ["arc_easy", "sciq_gen"]) >= 150
    assert a["results"]["arc_easy"]["acc,none"] > 0.4  # a real model, far above chance (0.25)


def test_batched_loglikelihoods_equal_unbatched(tiny):
    """Right padding must not leak: scores in batches of 5 (sorted by length, padded) == one request at a time."""
    ckpt, _ = tiny
    gen = torch.Generator().manual_seed(0)
    requests = []
    for _ in range(13):
        n_ctx, n_cont = int(torch.randint(1, 40, (1,), generator=gen)), int(torch.randint(1, 6, (1,), generator=gen))
        ids = torch.randint(0, 49152, (n_ctx + n_cont,), generator=gen).tolist()
        requests.append((("ctx", "cont"), ids[:n_ctx], ids[n_ctx:]))
    for answer in (330, 331, 332):  # one context, one-token answers (MMLU's " A" ... " D"): one shared row
        requests.append((("ctx", "cont"), requests[0][1], [answer]))
    one = ours(ckpt, batch_size=1)._loglikelihood_tokens(requests)
    batched = ours(ckpt, batch_size=5)._loglikelihood_tokens(requests)
    for (lp1, g1), (lp5, g5) in zip(one, batched):
        assert lp5 == pytest.approx(lp1, abs=1e-5)
        assert g1 == g5
    assert len({round(lp, 3) for lp, _ in one}) > 10  # the requests really differ
    assert len({lp for lp, _ in batched[-3:]}) == 3  # a shared row still scores each answer


def test_loglikelihood_rolling_is_the_sum_over_windows(tiny):
    """A text longer than block_size: loglikelihood_rolling == the token-by-token log-probability of the text
    computed with windows that each predict new tokens only (lm-eval's definition)."""
    from lm_eval.api.instance import Instance

    ckpt, _ = tiny
    lm = ours(ckpt)
    lm._max_length = 32  # force several windows
    text = require_asset("data/tinyshakespeare.txt").read_text()[:600]
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [lm.prefix_token_id] + lm.tok_encode(text)
    ref = 0.0
    with torch.no_grad():
        for start in range(1, len(ids), 32):  # tokens start..start+31 predicted from up to 32 tokens before
            end = min(start + 32, len(ids))
            ctx = ids[max(0, end - 33):end - 1]
            logp = torch.log_softmax(lm.model(torch.tensor([ctx]))[0].float(), -1)
            targets = ids[max(0, end - 33) + 1:end]
            first = len(targets) - (end - start)
            ref += sum(logp[i, t].item() for i, t in enumerate(targets) if i >= first)
    assert total == pytest.approx(ref, rel=1e-5)


def test_generate_until_stops_at_stop_sequences(tiny):
    """The text is cut before the first stop sequence, as lm-eval's hf model cuts it."""
    from lm_eval.api.instance import Instance

    ckpt, _ = tiny
    lm = ours(ckpt)
    free = lm.generate_until([Instance("generate_until", {}, ("Once upon a time", {"until": [],
                                                                                    "max_gen_toks": 20}), 0)])[0]
    assert len(free) > 3
    stop = free[len(free) // 2:len(free) // 2 + 2]
    cut = lm.generate_until([Instance("generate_until", {}, ("Once upon a time", {"until": [stop],
                                                                                   "max_gen_toks": 20}), 0)])[0]
    assert cut == free.split(stop)[0]


def test_perplexity_equals_transformers(tiny):
    """Sliding-window perplexity == the same windows scored with transformers on our export (token-weighted)."""
    from transformers import AutoModelForCausalLM

    from lora_lab.evaluate.load import load_model
    from lora_lab.evaluate.perplexity import perplexity

    ckpt, hf_dir = tiny
    text_file = ckpt.parent / "text.txt"
    text_file.write_text(require_asset("data/tinyshakespeare.txt").read_text()[:3000])
    loaded = load_model(ckpt)
    ours_ = perplexity(loaded.model, loaded.tokenizer, str(text_file), max_length=64, stride=24)

    # the reference: Hugging Face's documented loop (transformers docs, "Perplexity of fixed-length models"),
    # counting exactly the tokens each window scores
    from lora_lab.data.text import read_documents, token_stream

    ids = token_stream(read_documents(text_file), loaded.tokenizer)[None]  # the same stream: text, then EOS
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, ids.size(1), 24):
            end = min(begin + 64, ids.size(1))
            trg_len = end - prev_end
            input_ids = ids[:, begin:end]
            target_ids = input_ids.clone()
            target_ids[:, :-trg_len] = -100
            loss = hf(input_ids, labels=target_ids).loss
            n = int((target_ids[:, 1:] != -100).sum())
            nll_sum += loss.item() * n
            n_tokens += n
            prev_end = end
            if end == ids.size(1):
                break
    assert ours_["tokens"] == n_tokens == ids.size(1) - 1
    assert ours_["perplexity"] == pytest.approx(math.exp(nll_sum / n_tokens), rel=1e-5)


def test_answer_perplexity_scores_only_the_answers(tiny):
    """On instruction rows only the answer tokens (and EOS) are scored."""
    from lora_lab.data.sft import tokenize_sample
    from lora_lab.evaluate.load import load_model
    from lora_lab.evaluate.perplexity import perplexity
    from lora_lab.prompts import PromptStyle

    ckpt, _ = tiny
    rows = [{"instruction": "Say hi", "input": "", "output": "Hello there!"},
            {"instruction": "Count", "input": "to three", "output": "one two three"}]
    path = ckpt.parent / "rows.json"
    path.write_text(json.dumps(rows))
    loaded = load_model(ckpt)
    style = PromptStyle.from_name("chatml")
    result = perplexity(loaded.model, loaded.tokenizer, str(path), style)
    expected = sum(len(tokenize_sample(r, loaded.tokenizer, style)["input_ids"]) -
                   tokenize_sample(r, loaded.tokenizer, style)["n_prompt"] for r in rows)
    assert result["tokens"] == expected and result["kind"] == "answers"


def test_json_scoring_hand_made_answers():
    from lora_lab.json_score import score_json, summarize, validate_schema

    expected = {"product": "lamp", "sentiment": "negative", "rating": 2}
    schema = {"type": "object", "required": ["product", "sentiment", "rating"], "additionalProperties": False,
              "properties": {"product": {"type": "string"}, "sentiment": {"enum": ["positive", "negative"]},
                             "rating": {"type": "integer", "minimum": 1, "maximum": 5}}}
    valid = score_json('{"product": "lamp", "sentiment": "negative", "rating": 2}\nthanks', expected, schema)
    assert valid == {"valid_json": True, "exact_keys": True, "all_correct": True, "errors": [], "schema_valid": True}
    invalid = score_json('{"product": "lamp", "sentiment": ', expected, schema)
    assert not invalid["valid_json"] and not invalid["schema_valid"] and invalid["errors"] == ["not a JSON object"]
    assert not score_json('["lamp"]', expected)["valid_json"]  # JSON, but not an object
    extra = score_json('{"product": "lamp", "sentiment": "negative", "rating": 2, "issue": "x"}', expected, schema)
    assert extra["valid_json"] and not extra["exact_keys"] and not extra["all_correct"] and not extra["schema_valid"]
    assert "extra key(s) issue" in extra["errors"] and "schema: $: the key 'issue' is not allowed" in extra["errors"]
    wrong = score_json('{"product": "lamp", "sentiment": "negative", "rating": 3}', expected, schema)
    assert wrong["exact_keys"] and not wrong["all_correct"] and wrong["schema_valid"]
    assert wrong["errors"] == ["wrong value(s): rating=3 (expected 2)"]
    violation = score_json('{"product": "lamp", "sentiment": "meh", "rating": 9}', {**expected, "sentiment": "meh",
                                                                                  "rating": 9}, schema)
    assert violation["all_correct"] and not violation["schema_valid"]  # right by the data, wrong by the schema
    assert len([e for e in violation["errors"] if e.startswith("schema:")]) == 2
    assert validate_schema(True, {"type": "integer"}) and not validate_schema(2.0, {"type": "integer"})
    assert validate_schema([1, "a"], {"type": "array", "items": {"type": "integer"}}) == \
        ['$[1]: "a" is not of type integer']
    assert validate_schema({}, {"type": "object", "patternProperties": {}})[0].endswith("not supported by lora_lab's "
                                                                                        "validator")
    summary = summarize([valid, invalid, extra, wrong])
    assert summary == {"n": 4, "valid_json": 0.75, "exact_keys": 0.5, "all_correct": 0.25, "schema_valid": 0.5}


def test_json_extraction_scorer_is_a_use_of_the_general_one():
    from lora_lab.data.json_extraction import evaluate_extractions

    target = json.dumps({"product": "blender", "sentiment": "positive", "issue": "none", "rating": 5})
    scores = evaluate_extractions([target, target.replace("5", "4"), "nope"], [target] * 3)
    assert scores["valid_json"] == pytest.approx(2 / 3) and scores["all_correct"] == pytest.approx(1 / 3)
    assert scores["rating_correct"] == pytest.approx(1 / 3) and scores["product_correct"] == pytest.approx(2 / 3)


def lora_adapter(ckpt, out_dir, **overrides):
    """A LoRA adapter with non-zero B (so it changes the model), saved as finetune/lora.py saves one."""
    from lora_lab.lora import LoRAConfig, inject_lora, save_lora
    from lora_lab.model import GPT

    model = GPT.from_checkpoint(ckpt)
    inject_lora(model, r=4, alpha=8, targets=["query", "value"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    config = LoRAConfig(r=4, alpha=8, targets=["query", "value"], base_model=str(ckpt),
                        base_config={**model.config.to_dict(), **overrides}, prompt_style="chatml")
    save_lora(out_dir, model, config)
    return out_dir


def run_cli(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "lora_lab.evaluate", *map(str, args)], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                                                    **(env or {})}, timeout=600)


def test_compare_base_and_lora_perplexity_and_json(tiny, tmp_path):
    """--compare: the base, then base + adapter, side by side; per-row JSON results in the output file."""
    ckpt, _ = tiny
    adapter = lora_adapter(ckpt, tmp_path / "lora")
    text = tmp_path / "t.txt"
    text.write_text(require_asset("data/tinyshakespeare.txt").read_text()[:1500])
    out = tmp_path / "r.json"
    r = run_cli("--adapter_dir", adapter, "--compare", "--tasks", "perplexity", "--data", text, "--out_file", out)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    base, tuned = report["models"]
    assert base["name"] == "base" and tuned["name"] == "lora"
    assert base["perplexity"]["perplexity"] != tuned["perplexity"]["perplexity"]
    assert "| perplexity | ppl |" in r.stdout and "| change |" in r.stdout
    r = run_cli("--checkpoint_dir", ckpt, "--adapter_dir", "base", "--adapter_dir", adapter, "--tasks", "json",
                "--limit", 3, "--max_new_tokens", 8, "--out_file", out)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["models"][1]["json"]["rows"]
    assert len(rows) == 3 and {"answer", "expected", "valid_json", "errors"} <= set(rows[0])


def test_one_line_errors(tiny, tmp_path):
    ckpt, _ = tiny
    r = run_cli("--checkpoint_dir", ckpt, "--tasks", "arc_eazy")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: unknown task 'arc_eazy': did "
                                                                              "you mean arc_easy")
    empty = tmp_path / "no_eval_data"
    empty.mkdir()
    r = run_cli("--checkpoint_dir", ckpt, "--tasks", "hellaswag", env={"LORA_LAB_EVAL_DATA": str(empty)})
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and "hellaswag_validation.jsonl" in last and str(empty) in last and "Hub" in last
    other = lora_adapter(ckpt, tmp_path / "other", n_embd=64)  # recorded as trained on a wider base
    r = run_cli("--adapter_dir", other, "--compare", "--tasks", "perplexity", "--data", "x.txt")
    assert r.returncode == 1 and "n_embd 64 vs 32" in r.stderr.strip().splitlines()[-1]  # before the base is run
    r = run_cli("--checkpoint_dir", ckpt, "--tasks", "perplexity", "--data", tmp_path / "missing.txt")
    assert r.returncode == 1 and "missing.txt: no such file" in r.stderr.strip().splitlines()[-1]
    r = run_cli("--checkpoint_dir", ckpt, "--tasks", "perplexity")
    assert r.returncode == 1 and "needs --data" in r.stderr


def test_perplexity_and_json_do_not_import_lm_eval():
    """lm-eval is an optional extra: only the lm-eval path imports it."""
    import os

    code = ("import sys; import lora_lab.evaluate.__main__, lora_lab.evaluate.perplexity, lora_lab.evaluate.json_task,"
            " lora_lab.evaluate.load, lora_lab.data.json_extraction; assert 'lm_eval' not in sys.modules, 'imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr


def test_load_model_for_every_kind_of_fine_tune(tiny, tmp_path):
    """--adapter_dir takes what each finetune script writes; each loads to the model the script trained."""
    from lora_lab.adapter import AdapterConfig, inject_adapter, save_adapter
    from lora_lab.checkpoint import save_checkpoint
    from lora_lab.evaluate.load import adapter_kind, load_model
    from lora_lab.model import GPT
    from lora_lab.nf4 import NF4Linear

    ckpt, _ = tiny
    idx = torch.randint(0, 49152, (1, 12))
    base = GPT.from_checkpoint(ckpt).eval()
    with torch.no_grad():
        base_logits = base(idx)
        # a full fine-tune: a whole checkpoint
        full = GPT.from_checkpoint(ckpt)
        for p in full.parameters():
            p.add_(0.01)
        save_checkpoint(tmp_path / "full", full.config, full.state_dict(), tokenizer_dir=ckpt)
        loaded = load_model(ckpt, tmp_path / "full")
        assert adapter_kind(tmp_path / "full") == "full"
        assert torch.allclose(loaded.model(idx), full.eval()(idx), atol=1e-5)
        # a LLaMA-Adapter with non-zero gates
        model = GPT.from_checkpoint(ckpt)
        inject_adapter(model, adapter_prompt_length=3, adapter_start_layer=0)
        for name, p in model.named_parameters():
            if ".attn." in name and "gate" in name:  # the adapter's gates (zero at init), not mlp.gate_proj
                p.fill_(0.5)
        config = AdapterConfig(adapter_prompt_length=3, adapter_start_layer=0, base_model=str(ckpt),
                               base_config=model.config.to_dict(), prompt_style="chatml")
        save_adapter(tmp_path / "llama_adapter", model, config)
        loaded = load_model(None, tmp_path / "llama_adapter")  # the base from adapter_config.json
        assert adapter_kind(tmp_path / "llama_adapter") == "adapter" and loaded.prompt_style == "chatml"
        expected = model.eval()(idx)
        assert torch.allclose(loaded.model(idx), expected, atol=1e-5) and not torch.allclose(expected, base_logits)
        # LoRA merged, and LoRA beside an NF4 base
        lora_adapter(ckpt, tmp_path / "lora")
        merged = load_model(None, tmp_path / "lora").model(idx)
        nf4 = load_model(None, tmp_path / "lora", quantize="nf4")
        assert any(isinstance(m, NF4Linear) for m in nf4.model.modules())
        assert not torch.allclose(merged, base_logits)
        nf4_base = load_model(ckpt, quantize="nf4").model(idx)
        assert not torch.allclose(nf4.model(idx), nf4_base)  # the adapter runs beside the 4-bit weights
    with pytest.raises(Exception, match="holds none of"):
        load_model(ckpt, tmp_path)
