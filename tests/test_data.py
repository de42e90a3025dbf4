import csv
import json
import shutil
import urllib.error

import pytest
import torch
from torch.utils.data import DataLoader

from lora_lab.data import instructions
from lora_lab.data.instructions import load_instructions, read_instruction_file, split_rows
from lora_lab.data.sft import (IGNORE_INDEX, LengthBucketSampler, SFTDataset, ShuffledBatchSampler, collate,
                               get_dataloaders, padding_fraction, tokenize_sample)
from lora_lab.prompts import PromptStyle
from lora_lab.tokenizer import Tokenizer
from lora_lab.utils import LoraLabError

SMOL = "models/smollm2-135m-instruct"
DATA = "data"


@pytest.fixture
def smol_tokenizer(assets):
    return Tokenizer(assets(SMOL))


# ------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------
def test_shared_alpaca_dolly_lima_load_with_their_columns(assets):
    raw = json.loads(assets(f"{DATA}/alpaca_5000.json").read_text())
    rows, bad = read_instruction_file(assets(f"{DATA}/alpaca_5000.json"))
    # two of the 5000 rows have an empty output: reported with their index, and skipped
    assert len(rows) == 4998 and len(bad) == 2
    assert [m.split(": ", 1)[0].rsplit(" ", 2)[1:] for m in bad] == [["index", "2335"], ["index", "4658"]]
    assert all(m.endswith("empty output") and "alpaca_5000.json" in m for m in bad)
    assert rows[0] == raw[0] and rows[-1] == raw[-1]

    dolly_raw = [json.loads(line) for line in assets(f"{DATA}/dolly_151.jsonl").read_text().splitlines()]
    rows, bad = read_instruction_file(assets(f"{DATA}/dolly_151.jsonl"))
    assert len(rows) == 151 and bad == []
    assert [r["input"] for r in rows] == [r["context"] for r in dolly_raw]
    assert [r["output"] for r in rows] == [r["response"] for r in dolly_raw]
    assert any(r["input"] for r in rows)  # some Dolly rows have a context

    lima_raw = json.loads(assets(f"{DATA}/lima_1029.json").read_text())
    rows, bad = read_instruction_file(assets(f"{DATA}/lima_1029.json"))
    assert len(rows) == 1029 and bad == []
    multi = [i for i, r in enumerate(lima_raw) if r["history"]]
    assert len(multi) == 29
    i = multi[0]  # a multi-turn row keeps its first exchange
    assert rows[i] == {"instruction": lima_raw[i]["history"][0][0], "input": "",
                       "output": lima_raw[i]["history"][0][1]}
    j = next(k for k, r in enumerate(lima_raw) if not r["history"])
    assert rows[j] == {f: lima_raw[j][f] for f in ("instruction", "input", "output")}


def test_split_is_deterministic_disjoint_and_sized(assets):
    data = load_instructions(assets(f"{DATA}/alpaca_5000.json"), val_split_fraction=0.1, seed=3, verbose=False)
    assert (len(data.train), len(data.val), data.n_rows, data.n_skipped) == (4498, 500, 5000, 2)
    again = load_instructions(assets(f"{DATA}/alpaca_5000.json"), val_split_fraction=0.1, seed=3, verbose=False)
    assert (again.train, again.val) == (data.train, data.val)
    other = load_instructions(assets(f"{DATA}/alpaca_5000.json"), val_split_fraction=0.1, seed=4, verbose=False)
    assert other.val != data.val
    rows, _ = read_instruction_file(assets(f"{DATA}/alpaca_5000.json"))
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(data.train + data.val, key=key) == sorted(rows, key=key)  # each row in exactly one part
    assert split_rows(rows, 0.1, 3) == (data.train, data.val)
    assert split_rows(list(range(10)), 0.25, 0) == split_rows(list(range(10)), 0.25, 0)
    train, val = split_rows(list(range(10)), 0.25, 0)
    assert len(val) == 2 and sorted(train + val) == list(range(10)) and train == sorted(train)
    assert split_rows(list(range(10)), 0.0, 0) == (list(range(10)), [])
    assert split_rows([1, 2, 3], 0.01, 0)[1] != []  # a positive fraction gives at least one validation row
    with pytest.raises(LoraLabError, match="leaves no training rows"):
        split_rows([1, 2], 0.9, 0)
    with pytest.raises(LoraLabError, match=r"val_split_fraction=1.0: use a number in \[0, 1\)"):
        split_rows([1, 2], 1.0, 0)


def test_custom_files_with_renamed_columns(tmp_path):
    rows = [{"question": "What is 2+2?", "ctx": "", "answer": "4"},
            {"question": "Translate", "ctx": "Bonjour", "answer": "Hello"},
            {"question": "Name a color", "answer": "Blue, with a comma"}]
    want = [{"instruction": "What is 2+2?", "input": "", "output": "4"},
            {"instruction": "Translate", "input": "Bonjour", "output": "Hello"},
            {"instruction": "Name a color", "input": "", "output": "Blue, with a comma"}]
    columns = {"instruction": "question", "input": "ctx", "output": "answer"}

    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    with open(tmp_path / "rows.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "ctx", "answer"])
        writer.writeheader()
        writer.writerows([{**r, "ctx": r.get("ctx", "")} for r in rows])
    for name in ("list.json", "wrapped.json", "rows.jsonl", "rows.csv"):
        got, bad = read_instruction_file(tmp_path / name, columns=columns)
        assert (got, bad) == (want, []), name

    # JSON lines in a .json file still load
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))
    assert read_instruction_file(tmp_path / "lines.json", columns=columns) == (want, [])
    # LIMA as published on the Hub: {"conversations": [user, assistant, ...]} keeps the first exchange
    (tmp_path / "lima.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"conversations": ["Q1", "A1", "Q2", "A2"], "source": "stackexchange"},
        {"conversations": ["only a question"], "source": "x"}]))
    assert read_instruction_file(tmp_path / "lima.jsonl") == (
        [{"instruction": "Q1", "input": "", "output": "A1"}],
        [f"{tmp_path / 'lima.jsonl'} line 2: 'conversations' is not a list of at least 2 texts (user, assistant)"])

    # a column that does not exist is named, with the file's actual columns
    with pytest.raises(LoraLabError, match=r"no 'prompt' column \(its columns: answer, ctx, question\)"):
        read_instruction_file(tmp_path / "list.json", columns={"instruction": "prompt", "output": "answer"})
    with pytest.raises(LoraLabError, match="no 'instruction' column"):
        read_instruction_file(tmp_path / "list.json")  # default column names
    with pytest.raises(LoraLabError, match="unknown key"):
        read_instruction_file(tmp_path / "list.json", columns={"question": "instruction"})
    # a separate validation file replaces the split
    data = load_instructions(tmp_path / "list.json", val_data=tmp_path / "rows.csv", columns=columns, verbose=False)
    assert (data.train, data.val) == (want, want)


def test_malformed_rows_are_reported_and_skipped_or_fatal(tmp_path, capsys):
    lines = [
        json.dumps({"instruction": "ok 1", "output": "fine"}),  # line 1
        json.dumps({"instruction": "no output"}),  # line 2
        '{"instruction": "broken json", ',  # line 3
        json.dumps({"instruction": "number", "output": 5}),  # line 4
        "",  # line 5: blank lines are not rows
        json.dumps({"instruction": "blank", "output": "   "}),  # line 6
        json.dumps(["not", "an", "object"]),  # line 7
        json.dumps({"output": "no instruction"}),  # line 8
        json.dumps({"instruction": "ok 2", "input": None, "output": "fine"}),  # line 9: null input is ""
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rows, bad = read_instruction_file(path)
    assert [r["instruction"] for r in rows] == ["ok 1", "ok 2"] and rows[1]["input"] == ""
    assert bad == [f"{path} line 2: no 'output'", f"{path} line 3: not valid JSON (Expecting property name enclosed "
                   f"in double quotes)", f"{path} line 4: 'output' is int, not text", f"{path} line 6: empty output",
                   f"{path} line 7: is a JSON list, not an object", f"{path} line 8: no 'instruction'"]

    data = load_instructions(path, val_split_fraction=0.0)
    assert data.n_skipped == 6 and data.n_rows == 8 and len(data.train) == 2
    err = capsys.readouterr().err
    assert f"skipped {path} line 4: 'output' is int, not text" in err
    assert f"Skipped 6 malformed row(s) of 8 in {path}" in err

    with pytest.raises(LoraLabError) as e:
        load_instructions(path, on_bad_row="error")
    assert str(e.value).startswith(f"{path} line 2: no 'output'") and "\n" not in str(e.value)

    # JSON lists report the index; CSV the line a record starts on (a quoted cell may span lines)
    (tmp_path / "rows.json").write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a"}]))
    assert read_instruction_file(tmp_path / "rows.json")[1] == [f"{tmp_path / 'rows.json'} index 1: no 'output'"]
    (tmp_path / "rows.csv").write_text('instruction,output\n"two\nlines",x\nempty,\nok,y\n')
    rows, bad = read_instruction_file(tmp_path / "rows.csv")
    assert rows == [{"instruction": "two\nlines", "input": "", "output": "x"},
                    {"instruction": "ok", "input": "", "output": "y"}]
    assert bad == [f"{tmp_path / 'rows.csv'} line 4: empty output"]
    (tmp_path / "first.csv").write_text('instruction,output\nfirst,\nok,y\n')
    assert read_instruction_file(tmp_path / "first.csv")[1] == [f"{tmp_path / 'first.csv'} line 2: empty output"]

    (tmp_path / "all_bad.jsonl").write_text(json.dumps({"instruction": "x", "output": ""}) + "\n")
    with pytest.raises(LoraLabError, match="none of its 1 rows is usable"):
        read_instruction_file(tmp_path / "all_bad.jsonl")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LoraLabError, match="is not valid JSON"):
        read_instruction_file(tmp_path / "bad.json")
    with pytest.raises(LoraLabError, match="on_bad_row"):
        load_instructions(path, on_bad_row="ignore")


# ------------------------------------------------------------------------------------------------------------
# Named datasets: cache, download, offline
# ------------------------------------------------------------------------------------------------------------
def _no_network(monkeypatch):
    def hub(*args, **kwargs):
        raise ConnectionError("Failed to establish a new connection: [Errno 101] Network is unreachable")

    def url(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(instructions, "_fetch_hub", hub)
    monkeypatch.setattr(instructions, "_fetch_url", url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.mark.parametrize("name", ["alpaca", "alpaca-cleaned", "alpaca-finance", "dolly", "lima"])
def test_named_dataset_offline_is_a_one_line_error(tmp_path, monkeypatch, name):
    _no_network(monkeypatch)
    with pytest.raises(LoraLabError) as e:
        load_instructions(name, data_dir=tmp_path, verbose=False)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"Cannot download the {name} dataset")
    assert "pass a local path" in message and instructions.NAMED_DATASETS[name].filename in message
    assert ("name resolution" if name == "alpaca" else "Network is unreachable") in message

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoraLabError, match="HF_HUB_OFFLINE is set.*pass a local path"):
        load_instructions(name, data_dir=tmp_path, verbose=False)


def test_named_dataset_uses_the_cached_file_and_http_errors_are_not_offline(tmp_path, monkeypatch, assets):
    _no_network(monkeypatch)
    (tmp_path / "dolly").mkdir()
    shutil.copy(assets(f"{DATA}/dolly_151.jsonl"), tmp_path / "dolly" / "databricks-dolly-15k.jsonl")
    data = load_instructions("dolly", data_dir=tmp_path, val_split_fraction=0.0, verbose=False)
    assert len(data.train) == 151 and data.source == str(tmp_path / "dolly" / "databricks-dolly-15k.jsonl")

    def not_found(url, dest):
        raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)

    monkeypatch.setattr(instructions, "_fetch_url", not_found)
    with pytest.raises(LoraLabError, match=r"Downloading the alpaca dataset from https://raw\S+ failed"):
        load_instructions("alpaca", data_dir=tmp_path, verbose=False)

    # a download writes the file into the cache, where the next run finds it
    def fake_download(url, dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps([{"instruction": "i", "input": "", "output": "o"}] * 3))

    monkeypatch.setattr(instructions, "_fetch_url", fake_download)
    assert len(load_instructions("alpaca", data_dir=tmp_path, val_split_fraction=0.0, verbose=False).train) == 3
    assert (tmp_path / "alpaca" / "alpaca_data.json").is_file()
    with pytest.raises(LoraLabError, match="neither a dataset name .*json_extraction, alpaca.* nor an existing file"):
        load_instructions("alpacca", data_dir=tmp_path)


# ------------------------------------------------------------------------------------------------------------
# Tokenization and masking
# ------------------------------------------------------------------------------------------------------------
def test_prompt_is_masked_and_answer_plus_eos_is_kept(smol_tokenizer):
    tok, style = smol_tokenizer, PromptStyle.from_name("chatml")
    sample = {"instruction": "Name the capital of France.", "input": "Answer in one word.",
              "output": " Paris,\n  of course!  "}
    s = tokenize_sample(sample, tok, style)
    prompt_ids = tok.encode(style.apply(sample["instruction"], sample["input"]))
    n = len(prompt_ids)
    assert s["n_prompt"] == n and not s["truncated"]
    assert torch.equal(s["input_ids"][:n], prompt_ids)  # exactly what generation feeds the model
    assert s["input_ids"][-1].item() == tok.eos_id == tok.token_to_id("<|im_end|>")
    assert (s["labels"][:n] == IGNORE_INDEX).all() and (s["labels"][n:] != IGNORE_INDEX).all()
    assert torch.equal(s["labels"][n:], s["input_ids"][n:])
    kept = s["labels"][s["labels"] != IGNORE_INDEX]
    assert tok.decode(kept, skip_special_tokens=False) == sample["output"] + "<|im_end|>"

    unmasked = tokenize_sample(sample, tok, style, mask_prompt=False)
    assert torch.equal(unmasked["labels"], unmasked["input_ids"])
    assert torch.equal(unmasked["input_ids"], s["input_ids"])
    # a system message goes into the prompt (and so under the mask)
    with_system = tokenize_sample(sample, tok, style, system="Be brief.")
    assert with_system["n_prompt"] > n and torch.equal(with_system["input_ids"][with_system["n_prompt"]:],
                                                       s["input_ids"][n:])


def test_sentencepiece_bos_and_masking(assets):
    tok = Tokenizer(assets("tokenizers/llama2"))
    style = PromptStyle.from_name("alpaca")
    sample = {"instruction": "Name the capital of France.", "input": "", "output": "Paris is the capital."}
    s = tokenize_sample(sample, tok, style)
    assert s["input_ids"][0].item() == tok.bos_id and s["input_ids"][-1].item() == tok.eos_id
    assert (s["input_ids"] == tok.bos_id).sum() == 1  # the answer is encoded without a second BOS
    n = s["n_prompt"]
    assert torch.equal(s["input_ids"][:n], tok.encode(style.apply(sample["instruction"])))
    assert (s["labels"][:n] == IGNORE_INDEX).all()
    assert tok.decode(s["labels"][n:-1]) == sample["output"]


def test_truncation_and_samples_without_trainable_tokens(smol_tokenizer):
    tok, style = smol_tokenizer, PromptStyle.from_name("plain")
    short = {"instruction": "Hi", "input": "", "output": "Hello"}
    long_answer = {"instruction": "Count", "input": "", "output": " one two three four five six seven eight nine ten"
                                                                  " eleven twelve"}
    long_prompt = {"instruction": " ".join(["word"] * 40), "input": "", "output": "ok"}
    lengths = {k: len(tokenize_sample(r, tok, style)["input_ids"])
               for k, r in (("short", short), ("long_answer", long_answer), ("long_prompt", long_prompt))}
    assert lengths["short"] < 12 < lengths["long_answer"] and lengths["long_prompt"] > 12

    ds = SFTDataset([short, long_answer, long_prompt, short], tok, style, max_seq_length=12)
    assert ds.n_truncated == 2 and ds.n_no_trainable == 1  # long_prompt: cut to 12 prompt tokens, no target
    assert ds.rows == [short, long_answer, short] and len(ds) == 3
    assert ds.lengths == [lengths["short"], 12, lengths["short"]]
    item = ds[1]
    assert item["input_ids"].shape == item["labels"].shape == (12,)
    assert item["input_ids"][-1].item() != tok.eos_id  # the EOS was cut with the end of the answer
    assert (item["labels"] != IGNORE_INDEX).sum() == 12 - ds.n_prompt[1]

    # the prompt filling max_seq_length exactly leaves no target either (position 0 is never predicted)
    prompt_len = len(tok.encode(style.apply(long_prompt["instruction"])))
    assert SFTDataset([long_prompt], tok, style, max_seq_length=prompt_len).n_no_trainable == 1
    assert SFTDataset([long_prompt], tok, style, max_seq_length=prompt_len + 1).n_no_trainable == 0

    with pytest.raises(LoraLabError) as e:
        get_dataloaders([long_prompt] * 3, tok, style, max_seq_length=12, micro_batch_size=2,
                        val_split_fraction=0.0, verbose=False)
    assert str(e.value).startswith("No training sample has trainable tokens") and "max_seq_length=12" in str(e.value)

    _, val_dl, stats = get_dataloaders([short, long_answer, long_prompt, short], tok, style, max_seq_length=12,
                                       micro_batch_size=2, val_split_fraction=0.0, verbose=False)
    assert val_dl is None
    assert (stats["n_train"], stats["n_val"], stats["n_truncated"], stats["n_no_trainable"]) == (3, 0, 2, 1)


# ------------------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------------------
def test_collate_pads_inputs_and_labels():
    samples = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
               {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])}]
    batch = collate(samples, pad_id=0)
    torch.testing.assert_close(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    torch.testing.assert_close(batch["labels"], torch.tensor([[-100, 6, 7], [8, -100, -100]]))
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long

    batch = collate(samples, pad_id=2, pad_multiple_of=8)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 8)
    torch.testing.assert_close(batch["input_ids"][1], torch.tensor([8, 2, 2, 2, 2, 2, 2, 2]))
    assert (batch["labels"][:, 3:] == -100).all()
    # never padded past max_seq_length
    assert collate(samples, pad_multiple_of=8, max_seq_length=5)["input_ids"].shape == (2, 5)


def test_samplers_are_deterministic_cover_every_sample_and_resume():
    s = ShuffledBatchSampler(10, 3, seed=1)
    epoch0 = list(s)
    assert [len(b) for b in epoch0] == [3, 3, 3, 1] and sorted(i for b in epoch0 for i in b) == list(range(10))
    epoch1 = list(s)  # a finished pass moves on to the next epoch
    assert epoch1 != epoch0 and epoch0 == ShuffledBatchSampler(10, 3, seed=1).batches(0)
    assert ShuffledBatchSampler(10, 3, seed=2).batches(0) != epoch0
    assert ShuffledBatchSampler(10, 3, seed=1, drop_last=True).batches(0) == epoch0[:3]
    assert len(ShuffledBatchSampler(10, 3, drop_last=True)) == 3 and len(s) == 4
    assert list(ShuffledBatchSampler(5, 2, shuffle=False)) == [[0, 1], [2, 3], [4]]
    s.set_epoch(0, skip=2)
    assert list(s) == epoch0[2:]

    lengths = [(i * 37) % 101 for i in range(200)]
    b = LengthBucketSampler(lengths, 4, seed=5, bucket_batches=10)
    batches = b.batches(3)
    assert batches == LengthBucketSampler(lengths, 4, seed=5, bucket_batches=10).batches(3)
    assert batches != b.batches(4) and sorted(i for x in batches for i in x) == list(range(200))


def test_bucketing_lowers_padding_on_alpaca(assets, smol_tokenizer):
    rows = load_instructions(assets(f"{DATA}/alpaca_5000.json"), val_split_fraction=0.0, verbose=False).train
    ds = SFTDataset(rows, smol_tokenizer, "alpaca", max_seq_length=512)
    shuffled = padding_fraction(ds.lengths, ShuffledBatchSampler(len(ds), 8, seed=0).batches(0))
    bucketed = padding_fraction(ds.lengths, LengthBucketSampler(ds.lengths, 8, seed=0).batches(0))
    print(f"alpaca_5000, micro batch 8: padding {shuffled:.1%} shuffled, {bucketed:.1%} length-bucketed")
    assert bucketed < 0.05 < 0.3 < shuffled
    # exact check of the measure: batches [0, 1] of lengths 2 and 4 -> 8 slots, 2 of them padding
    assert padding_fraction([2, 4, 3], [[0, 1], [2]]) == pytest.approx(2 / 11)


def test_json_extraction_through_get_dataloaders_and_exact_resume(smol_tokenizer):
    tok = smol_tokenizer
    kwargs = dict(max_seq_length=128, micro_batch_size=4, seed=7, n_train=40, n_val=8, verbose=False)
    train_dl, val_dl, stats = get_dataloaders("json_extraction", tok, "chatml", **kwargs)
    assert (stats["n_train"], stats["n_val"], stats["n_skipped"], stats["n_truncated"]) == (40, 8, 0, 0)
    assert stats["source"] == "json_extraction" and len(train_dl) == 10 and len(val_dl) == 2
    batches = list(train_dl)
    assert len(batches) == 10
    for batch in batches:
        B, T = batch["input_ids"].shape
        assert B == 4 and batch["labels"].shape == (B, T) and T <= 128
    # every answer is a JSON object followed by <|im_end|>
    labels = batches[0]["labels"][0]
    answer = tok.decode(labels[labels != IGNORE_INDEX], skip_special_tokens=False)
    assert answer.endswith("<|im_end|>") and json.loads(answer[:-len("<|im_end|>")])["rating"] in range(1, 6)
    # the train loader's dataset keeps the rows, e.g. for evaluating generations
    assert len(train_dl.dataset.rows) == 40 and set(train_dl.dataset.rows[0]) == {"instruction", "input", "output"}

    # resume: a fresh run that loads the sampler state after 3 batches continues with batch 4
    dl, _, _ = get_dataloaders("json_extraction", tok, "chatml", **kwargs)
    it = iter(dl)
    for _ in range(3):
        next(it)
    state = dl.batch_sampler.state_dict()
    assert state == {"epoch": 0, "batch": 3}
    resumed, _, _ = get_dataloaders("json_extraction", tok, "chatml", **kwargs)
    resumed.batch_sampler.load_state_dict(state)
    assert resumed.batch_sampler.state_dict() == state
    rest = list(resumed)
    assert len(rest) == 7
    for got, want in zip(rest, batches[3:]):
        torch.testing.assert_close(got["input_ids"], want["input_ids"])
        torch.testing.assert_close(got["labels"], want["labels"])
    # the resumed sampler then goes on with epoch 1, the same as an uninterrupted run
    assert resumed.batch_sampler.state_dict() == {"epoch": 1, "batch": 0}
    torch.testing.assert_close(next(iter(resumed))["input_ids"], next(iter(train_dl))["input_ids"])

    bucketed, _, bstats = get_dataloaders("json_extraction", tok, "chatml", bucket_by_length=True,
                                          pad_multiple_of=8, **kwargs)
    assert isinstance(bucketed.batch_sampler, LengthBucketSampler) and bstats["n_train"] == 40
    assert all(b["input_ids"].shape[1] % 8 == 0 for b in bucketed)
    assert isinstance(bucketed, DataLoader)  # plain torch DataLoaders
