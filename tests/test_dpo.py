"""DPO: the losses and answer log-probs (lora_lab/dpo.py) against TRL's DPOTrainer and the published formulas, the
preference data (lora_lab/data/preference.py), and finetune/dpo.py end to end (files, exact resume, the reference).

The runs are in-process on a tiny random model with SmolLM2's real tokenizer (tests/tiny_checkpoint.py); the slow
test fine-tunes the real SmolLM2-135M-Instruct on real preference pairs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

import finetune.dpo as dpo_script
from conftest import require_asset
from lora_lab.data.preference import (PreferenceDataset, collate_pairs, get_preference_dataloaders,
                                      load_preferences)
from lora_lab.dpo import (answer_logps, hinge_loss, ipo_loss, preference_loss, reference_logps, sigmoid_loss)
from lora_lab.lora import (ADAPTER_CONFIG_FILE, LoRAConfig, inject_lora, load_lora, load_lora_state_dict,
                           lora_modules, save_lora)
from lora_lab.model import IGNORE_INDEX, GPT
from lora_lab.prompts import PromptStyle
from lora_lab.tokenizer import Tokenizer
from lora_lab.training import TRAIN_STATE_FILE, load_train_state
from lora_lab.utils import LoraLabError
from lora_lab.args import call_flat
from test_finetune_lora import assert_adapters_equal, stop_after

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

LN2 = math.log(2)

# polite (chosen) and curt (rejected) answers, in the layout of preference_polite_1100.json
TOPICS = ["the weather", "a recipe", "the train times", "my essay", "a book", "the meeting", "this bug", "a gift",
          "the capital of Peru", "a good film", "my garden", "the exam", "a poem", "the budget", "the news",
          "my bicycle", "the sky", "a song", "the river", "a walk"]
PAIRS = [{"instruction": f"Tell me about {t}.", "input": "" if i % 3 else "Be brief.",
          "chosen": f"Of course! Here is a short note about {t}; I hope it helps.",
          "rejected": f"Ugh, {t} again? Figure it out yourself."} for i, t in enumerate(TOPICS)]

RUN = dict(max_steps=6, batch_size=4, micro_batch_size=2, max_seq_length=128, learning_rate=2e-2,
           warmup_steps=1, lora_dropout=0.1, eval_interval=3, eval_iters=2, eval_samples=0, save_interval=100,
           log_interval=1, seed=7)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Training pairs; the held-out ones are in val_file next to it."""
    path = tmp_path_factory.mktemp("data") / "pairs.json"
    path.write_text(json.dumps(PAIRS[:16]))
    (path.parent / "val.json").write_text(json.dumps(PAIRS[16:]))
    return path


def run(ckpt, data, out_dir, **overrides):
    val_data = str(Path(data).parent / "val.json")
    call_flat(dpo_script.setup, checkpoint_dir=ckpt, data=str(data), out_dir=out_dir, val_data=val_data, **{**RUN, **overrides})
    return out_dir


def metrics(out_dir) -> list[dict]:
    with open(out_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def sft_adapter(ckpt, out_dir, seed=1, scale=0.3, targets=("query", "value")):
    """An adapter with non-zero B, as an SFT run would leave one (r=4, alpha=8)."""
    model = GPT.from_checkpoint(ckpt)
    config = LoRAConfig(r=4, alpha=8.0, targets=list(targets), base_model=str(ckpt),
                        base_config=model.config.to_dict(), prompt_style="chatml")
    config.inject(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * scale)
    save_lora(out_dir, model, config)
    return out_dir


def base_with_adapter(ckpt, adapter_dir) -> GPT:
    model = GPT.from_checkpoint(ckpt)
    config, weights = load_lora(adapter_dir)
    config.inject(model)
    load_lora_state_dict(model, weights)
    return model


# ------------------------------------------------------------------------------------------------------------
# 1. the losses: known values from the published formulas
# ------------------------------------------------------------------------------------------------------------
def test_sigmoid_known_values():
    delta = torch.tensor([0.0, 10.0, -10.0])
    # -log sigmoid(0.1 * delta): ln 2, ln(1 + e^-1), ln(1 + e)
    expected = torch.tensor([LN2, math.log1p(math.exp(-1)), math.log1p(math.e)])
    torch.testing.assert_close(sigmoid_loss(delta, 0.1), expected)


def test_hinge_known_values():
    # SLiC-HF: max(0, 1 - beta * delta)
    torch.testing.assert_close(hinge_loss(torch.tensor([0.0, 5.0, 10.0, 20.0, -3.0]), 0.1),
                               torch.tensor([1.0, 0.5, 0.0, 0.0, 1.3]))


def test_ipo_known_values():
    # IPO eq. 17: (delta - 1/(2 tau))^2; tau = 0.1 puts the target margin at 5
    torch.testing.assert_close(ipo_loss(torch.tensor([0.0, 5.0, 7.0, -1.0]), 0.1),
                               torch.tensor([25.0, 0.0, 4.0, 36.0]))
    # through preference_loss delta uses per-token means: (10 - 2)/4 - (-3 - 1)/2 = 2 + 2 = 4 -> (4 - 5)^2 = 1
    out = preference_loss(torch.tensor([10.0]), torch.tensor([-3.0]), torch.tensor([2.0]), torch.tensor([1.0]),
                          beta=0.1, loss="ipo", chosen_tokens=torch.tensor([4]), rejected_tokens=torch.tensor([2]))
    torch.testing.assert_close(out["losses"], torch.tensor([1.0]))
    # the rewards are beta times the summed log-ratios, whatever the loss
    torch.testing.assert_close(out["chosen_rewards"], torch.tensor([0.8]))
    torch.testing.assert_close(out["rejected_rewards"], torch.tensor([-0.4]))


def test_loss_is_ln2_at_the_start():
    """policy == reference: delta = 0, every pair's sigmoid loss is ln 2, rewards and margins are 0."""
    logps = torch.tensor([-12.5, -30.0, -7.25])
    out = preference_loss(logps, logps - 3, logps, logps - 3, beta=0.1)
    torch.testing.assert_close(out["losses"], torch.full((3,), LN2))
    assert torch.equal(out["chosen_rewards"], torch.zeros(3)) and torch.equal(out["rejected_rewards"], torch.zeros(3))


# ------------------------------------------------------------------------------------------------------------
# 2. data and the answer log-probs
# ------------------------------------------------------------------------------------------------------------
def test_rows_columns_and_left_out_pairs(tmp_path, tiny_ckpt):
    rows = PAIRS[:4] + [
        {"instruction": "Say hi.", "chosen": "Hello!", "rejected": "Hello!"},  # identical
        {"instruction": "Say hi.", "chosen": "Hello!"},  # no rejected
        {"instruction": "Say hi.", "chosen": 3, "rejected": "No."},  # not text
        "not an object",
        {"instruction": "Say hi.", "chosen": "Hi " * 300, "rejected": "No."},  # too long for 128 tokens
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    tok = Tokenizer(tiny_ckpt)
    train_dl, val_dl, stats = get_preference_dataloaders(path, tok, "chatml", max_seq_length=128, micro_batch_size=2,
                                                         val_split_fraction=0.0, verbose=False)
    assert (stats["n_train"], stats["n_malformed"], stats["n_identical"], stats["n_too_long"]) == (4, 4, 1, 1)
    assert val_dl is None
    assert "line 5: chosen and rejected are the same text" in stats["left_out"]["identical"][0]
    assert any("line 10: not valid JSON" in m for m in stats["left_out"]["malformed"])

    # TRL's {prompt, chosen, rejected}, and renamed columns
    prompt_rows = [{"prompt": r["instruction"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in PAIRS]
    data, bad = load_preferences(prompt_rows, val_split_fraction=0.0)
    assert data.train[0] == {"instruction": PAIRS[0]["instruction"], "input": "", "chosen": PAIRS[0]["chosen"],
                             "rejected": PAIRS[0]["rejected"]}
    renamed = [{"q": r["instruction"], "good": r["chosen"], "bad": r["rejected"]} for r in PAIRS]
    data, _ = load_preferences(renamed, columns={"instruction": "q", "chosen": "good", "rejected": "bad"},
                               val_split_fraction=0.0)
    assert len(data.train) == len(PAIRS) and data.train[1]["chosen"] == PAIRS[1]["chosen"]
    with pytest.raises(LoraLabError, match="has no 'chosen' column"):
        load_preferences([{"instruction": "a", "output": "b"}])


def test_a_pair_shares_its_batch_and_only_answers_are_scored(tiny_ckpt):
    tok, style = Tokenizer(tiny_ckpt), PromptStyle.from_name("chatml")
    ds = PreferenceDataset(PAIRS[:3], tok, style)
    batch = collate_pairs([ds[0], ds[1], ds[2]], pad_id=tok.eos_id)
    assert batch["input_ids"].shape[0] == 6  # [3 chosen; 3 rejected]
    for i, row in enumerate(PAIRS[:3]):
        prompt = tok.encode(style.apply(row["instruction"], row["input"]))
        for j, answer in ((i, row["chosen"]), (i + 3, row["rejected"])):
            answer_ids = tok.encode(answer, bos=False, eos=True)
            n = len(prompt) + len(answer_ids)
            assert batch["input_ids"][j, :n].tolist() == prompt.tolist() + answer_ids.tolist()
            assert (batch["labels"][j, :len(prompt)] == IGNORE_INDEX).all()  # the prompt is masked
            assert batch["labels"][j, len(prompt):n].tolist() == answer_ids.tolist()
            assert (batch["labels"][j, n:] == IGNORE_INDEX).all()  # and the padding

    # answer_logps = the brute-force sum of log softmax over the answer positions, per sequence
    model = GPT.from_checkpoint(tiny_ckpt).eval()
    with torch.no_grad():
        logps, n_tokens = answer_logps(model, batch["input_ids"], batch["labels"])
        logits = model(batch["input_ids"]).float().log_softmax(-1)  # (6, T, V)
    for j in range(6):
        positions = [t for t in range(1, batch["labels"].shape[1]) if batch["labels"][j, t] != IGNORE_INDEX]
        expected = sum(logits[j, t - 1, batch["input_ids"][j, t]] for t in positions)
        assert n_tokens[j] == len(positions)
        torch.testing.assert_close(logps[j], expected, rtol=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# 3. the reference is the starting model, bit for bit
# ------------------------------------------------------------------------------------------------------------
def test_reference_is_the_starting_model_bit_for_bit(tiny_ckpt):
    """A fresh LoRA (B = 0, dropout on, train mode) scores exactly what the bare base scores, and scoring draws no
    random number (training's dropout masks do not shift) and gives the model back in train mode."""
    ds = PreferenceDataset(PAIRS, Tokenizer(tiny_ckpt), "chatml")
    bare = GPT.from_checkpoint(tiny_ckpt)
    policy = GPT.from_checkpoint(tiny_ckpt)
    inject_lora(policy, r=4, alpha=8.0, dropout=0.3, targets="all")
    policy.train()
    rng = torch.get_rng_state()
    ref = reference_logps(policy, ds, batch_size=4)
    assert torch.equal(torch.get_rng_state(), rng) and policy.training
    assert torch.equal(ref, reference_logps(bare, ds, batch_size=4))
    assert ref.shape == (len(PAIRS), 2) and (ref < 0).all()


def test_script_reference_is_base_plus_sft_adapter(tiny_ckpt, pairs_file, tmp_path):
    """With --adapter_dir the reference scores are those of base + that adapter (not the bare base), bit for bit;
    the policy starts from the adapter, so step 1's loss is ln 2 and its margins 0."""
    val_file = pairs_file.parent / "val.json"
    adapter = sft_adapter(tiny_ckpt, tmp_path / "sft")
    out = run(tiny_ckpt, pairs_file, tmp_path / "out", adapter_dir=adapter, lora_dropout=0.0, max_steps=1)
    saved = load_train_state(out / TRAIN_STATE_FILE)["counters"]["reference"]

    tok = Tokenizer(tiny_ckpt)
    style = PromptStyle.from_checkpoint(tiny_ckpt)  # as the script wraps prompts (with the model's system message)
    train_dl, val_dl, _ = get_preference_dataloaders(pairs_file, tok, style, max_seq_length=RUN["max_seq_length"],
                                                     micro_batch_size=RUN["micro_batch_size"], seed=RUN["seed"],
                                                     val_data=val_file, pad_id=tok.eos_id, verbose=False)
    start = base_with_adapter(tiny_ckpt, adapter)
    for ds, ref in zip((train_dl.dataset, val_dl.dataset), saved):
        assert torch.equal(ref, reference_logps(start, ds, RUN["micro_batch_size"]))
        assert not torch.allclose(ref, reference_logps(GPT.from_checkpoint(tiny_ckpt), ds, RUN["micro_batch_size"]))

    first = metrics(out)[0]
    assert abs(float(first["loss"]) - LN2) < 1e-5
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(float(first[key])) < 1e-5, (key, first[key])
    config = json.loads((out / ADAPTER_CONFIG_FILE).read_text())
    assert (config["r"], config["alpha"], config["targets"]) == (4, 8.0, ["query", "value"])  # the SFT adapter's
    assert config["trained_with"]["sft_adapter"] == str(adapter)


def test_dropout_is_off_by_default_so_step_one_from_an_sft_adapter_is_ln2(tiny_ckpt, pairs_file, tmp_path):
    """As TRL's disable_dropout=True: with the default --lora_dropout (0) the policy pass computes what the
    reference pass scored, so from an SFT adapter step 1's loss is ln 2 (to float precision); --lora_dropout still
    turns dropout on, and then the first policy pass differs from the reference (the old 0.69299)."""
    adapter = sft_adapter(tiny_ckpt, tmp_path / "sft")
    args = {k: v for k, v in RUN.items() if k != "lora_dropout"}
    call_flat(dpo_script.setup, checkpoint_dir=tiny_ckpt, data=str(pairs_file), out_dir=tmp_path / "off", adapter_dir=adapter,
                     val_data=str(pairs_file.parent / "val.json"), **{**args, "max_steps": 1})
    assert load_lora(tmp_path / "off")[0].dropout == 0.0
    assert abs(float(metrics(tmp_path / "off")[0]["loss"]) - LN2) < 1e-6
    run(tiny_ckpt, pairs_file, tmp_path / "on", adapter_dir=adapter, lora_dropout=0.3, max_steps=1)
    assert abs(float(metrics(tmp_path / "on")[0]["loss"]) - LN2) > 1e-5


# ------------------------------------------------------------------------------------------------------------
# 4. against TRL's DPOTrainer (PEFT model, ref_model=None)
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("start", ["fresh", "sft_adapter"])
def test_matches_trl_dpo_trainer(tiny_ckpt, tmp_path, start):
    """Per-pair answer log-probs (policy and reference) and the sigmoid loss equal TRL's within 1e-5.

    fresh: TRL trains a new LoRA (peft_config=...) and its reference is the base with the adapter disabled; we give
    the trained-looking adapter to both and compare with our base + adapter and bare base. sft_adapter: TRL is given
    a PeftModel of the SFT adapter, copies it as its frozen "ref" adapter; we then change the trainable one to a
    second adapter in both, so the policy is adapter 2 and the reference adapter 1 (our --adapter_dir)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig, PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from lora_lab.formats.hf import export_hf
    from lora_lab.formats.peft import export_peft

    export_hf(tiny_ckpt, tmp_path / "hf")
    targets = ("query", "value", "mlp")
    policy_dir = sft_adapter(tiny_ckpt, tmp_path / "policy", seed=2, scale=0.5, targets=targets)
    export_peft(policy_dir, tmp_path / "policy-peft")
    policy_peft = load_file(str(tmp_path / "policy-peft" / "adapter_model.safetensors"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, attn_implementation="eager")
    if start == "fresh":
        peft_config = json.loads((tmp_path / "policy-peft" / "adapter_config.json").read_text())
        kwargs = dict(model=hf, peft_config=LoraConfig(r=peft_config["r"], lora_alpha=peft_config["lora_alpha"],
                                                       target_modules=peft_config["target_modules"], lora_dropout=0.0,
                                                       task_type="CAUSAL_LM"))
        ours_policy, ours_ref = base_with_adapter(tiny_ckpt, policy_dir), GPT.from_checkpoint(tiny_ckpt)
    else:
        sft_dir = sft_adapter(tiny_ckpt, tmp_path / "sft", seed=1, scale=0.5, targets=targets)
        export_peft(sft_dir, tmp_path / "sft-peft")
        kwargs = dict(model=PeftModel.from_pretrained(hf, tmp_path / "sft-peft", is_trainable=True))
        ours_policy, ours_ref = base_with_adapter(tiny_ckpt, policy_dir), base_with_adapter(tiny_ckpt, sft_dir)

    style, tok = PromptStyle.from_name("chatml"), Tokenizer(tiny_ckpt)
    rows = [{"prompt": style.apply(r["instruction"], r["input"]), "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in PAIRS[:5]]
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, loss_type=["sigmoid"], report_to=[], use_cpu=True,
                     bf16=False, fp16=False, max_length=None, per_device_train_batch_size=1)
    trainer = DPOTrainer(args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(tmp_path / "hf"), **kwargs)
    # the trainable ("default") adapter becomes the policy adapter; TRL's reference stays as it set it up
    set_peft_model_state_dict(trainer.model, policy_peft, adapter_name="default")
    trainer.model.eval()

    ours_policy.eval(), ours_ref.eval()
    ds = PreferenceDataset(PAIRS[:5], tok, style)
    for i, example in enumerate(trainer.train_dataset):
        # same tokens: TRL's prompt + answer + EOS is our pair
        pair = ds[i]
        assert example["prompt_ids"] + example["chosen_ids"] == pair["chosen"]["input_ids"].tolist()
        assert example["prompt_ids"] + example["rejected_ids"] == pair["rejected"]["input_ids"].tolist()

        batch = trainer.data_collator([example])
        with torch.no_grad():
            trl_loss = trainer.compute_loss(trainer.model, batch)
            trl_ref_chosen, trl_ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
        logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

        ours = collate_pairs([pair], pad_id=tok.eos_id)
        with torch.no_grad():
            policy, _ = answer_logps(ours_policy, ours["input_ids"], ours["labels"])
            ref, _ = answer_logps(ours_ref, ours["input_ids"], ours["labels"])
        out = preference_loss(policy[:1], policy[1:], ref[:1], ref[1:], beta=0.1)
        # log-probs of ~ -140 (13 tokens of a 49k vocabulary) are float32 numbers whose last bit is 1.5e-5: within
        # 1e-5 or 1e-6 of their size; the loss (~0.7) and rewards within 1e-5
        logps_close, close = dict(rtol=1e-6, atol=1e-5), dict(rtol=0, atol=1e-5)
        torch.testing.assert_close(policy, torch.tensor([logged["logps/chosen"], logged["logps/rejected"]]),
                                   **logps_close)
        torch.testing.assert_close(ref, torch.cat([trl_ref_chosen, trl_ref_rejected]), **logps_close)
        torch.testing.assert_close(out["losses"].mean(), trl_loss, **close)
        torch.testing.assert_close(out["chosen_rewards"], torch.tensor([logged["rewards/chosen"]]), **close)
        torch.testing.assert_close(out["rejected_rewards"], torch.tensor([logged["rewards/rejected"]]), **close)
        assert abs(trl_loss.item() - LN2) > 1e-3  # policy and reference differ: the comparison is not trivial


# ------------------------------------------------------------------------------------------------------------
# 5. finetune/dpo.py: files, metrics, exact resume, bad input, QLoRA, the adapter's consumers
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_run(tiny_ckpt, pairs_file, tmp_path_factory):
    return run(tiny_ckpt, pairs_file, tmp_path_factory.mktemp("reference") / "out")


def test_run_writes_adapter_and_trl_named_metrics(reference_run, tiny_ckpt):
    out = reference_run
    config, weights = load_lora(out)  # an ordinary adapter: LoRAConfig.from_dict reads trained_with
    assert config.trained_with == {"method": "dpo", "loss": "sigmoid", "beta": 0.1, "reference": "the base model"}
    assert any(v.abs().sum() > 0 for k, v in weights.items() if k.endswith("lora_B"))  # it trained
    rows = metrics(out)
    assert [int(r["step"]) for r in rows] == list(range(1, RUN["max_steps"] + 1))
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "val_loss", "val_rewards/accuracies", "val_rewards/margins"):
        assert name in rows[0], name
    # a fresh LoRA (B = 0) is the base: step 1 starts at ln 2 with zero rewards (dropout on a zero B changes nothing)
    assert abs(float(rows[0]["loss"]) - LN2) < 1e-5 and abs(float(rows[0]["rewards/margins"])) < 1e-5
    for r in rows:  # the logged margin is the difference of the logged rewards
        assert abs(float(r["rewards/margins"]) - (float(r["rewards/chosen"]) - float(r["rewards/rejected"]))) < 1e-5
    # on these easy pairs the held-out margin grows
    assert float(rows[-1]["val_rewards/margins"]) > 0 and float(rows[-1]["val_loss"]) < LN2


def test_run_record_hparams_tracker_and_loss_png_with_reward_accuracy(reference_run, tmp_path):
    """lora.py's run record: hparams.yaml (DPO's own settings included) and loss.png, which for a DPO run draws
    the loss (TRL's `loss` column) and, in a panel below, the reward accuracy: a taller figure than an SFT run's."""
    import yaml

    from lora_lab import plot
    from test_run_record import png_size

    pytest.importorskip("matplotlib")
    hparams = yaml.safe_load((reference_run / "hparams.yaml").read_text())
    assert (hparams["beta"], hparams["loss"], hparams["logger_name"], hparams["packing"]) == (0.1, "sigmoid", "csv",
                                                                                              False)
    assert png_size(reference_run / "loss.png") == (1000, 825)  # loss above, reward accuracy below
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "metrics.csv").write_text("step,train_loss,val_loss,val_ppl,lr,tokens,tokens_per_sec\n1,2.0,,,0.1,8,1\n")
    assert png_size(plot.plot_runs([sft], sft / "loss.png")) == (1000, 550)
    series = plot.read_metrics(reference_run)
    assert "loss" in series and "rewards/accuracies" in series and "val_rewards/accuracies" in series
    assert plot.describe(reference_run).endswith("pairs.json, beta 0.1")


def test_neftune_noises_the_policy_only(reference_run, tiny_ckpt, pairs_file, tmp_path):
    """--neftune_alpha (as TRL's DPOTrainer takes it): the policy's training forward gets embedding noise, so step
    1 is no longer exactly ln 2; the reference is scored without noise, bit for bit as without the flag."""
    out = run(tiny_ckpt, pairs_file, tmp_path / "out", max_steps=1, neftune_alpha=50.0)
    ours = load_train_state(out / TRAIN_STATE_FILE)["counters"]["reference"]
    theirs = load_train_state(reference_run / TRAIN_STATE_FILE)["counters"]["reference"]
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert abs(float(metrics(out)[0]["loss"]) - LN2) > 1e-4


def test_interrupted_run_resumes_exactly(reference_run, tiny_ckpt, pairs_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(dpo_script, "StopRequest", stop_after(4))
    run(tiny_ckpt, pairs_file, out)
    assert len(metrics(out)) == 4
    monkeypatch.undo()
    run(tiny_ckpt, pairs_file, out, resume=True)
    assert_adapters_equal(load_lora(out)[1], load_lora(reference_run)[1])
    timing = ("tokens_per_sec",)
    assert ([{k: v for k, v in r.items() if k not in timing} for r in metrics(out)]
            == [{k: v for k, v in r.items() if k not in timing} for r in metrics(reference_run)])


@pytest.mark.parametrize("bad, message", [
    (dict(loss="kto"), "--loss 'kto'"),
    (dict(beta=0.0), "--beta 0.0"),
    (dict(adapter_dir="does/not/exist"), "--adapter_dir does/not/exist does not exist"),
    (dict(adapter_dir="CKPT"), ("is not a LoRA adapter folder: lora_config.json is missing (it looks like a model "
                                "checkpoint")),
    (dict(data="missing.json"), ("--data 'missing.json' is not an existing file: pass a .json, .jsonl or .csv file "
                                 "of preference pairs")),
    (dict(data="alpaca"), "--data 'alpaca' is not an existing file"),  # no built-in instruction set here
    (dict(val_data="missing_val.json"), "--val_data 'missing_val.json' is not an existing file"),
    (dict(data="TXT"), "is not .json, .jsonl or .csv"),
    (dict(columns={"output": "answer"}), "--columns: unknown field output: map some of instruction, input, chosen"),
])
def test_bad_input_is_one_line_before_the_model_loads(tiny_ckpt, pairs_file, tmp_path, monkeypatch, bad, message):
    """check_args judges DPO's own arguments too (preference files, the adapter folder, beta, loss), before the
    data set or the model is touched."""
    txt = tmp_path / "pairs.txt"
    txt.write_text("not pairs")
    bad = {k: {"CKPT": str(tiny_ckpt), "TXT": str(txt)}.get(v, v) if isinstance(v, str) else v for k, v in bad.items()}
    args = {"data": pairs_file, **bad}

    def slow(*a, **k):
        raise AssertionError("reached the slow part before the mistake was reported")

    monkeypatch.setattr(GPT, "from_checkpoint", slow)
    monkeypatch.setattr(dpo_script, "get_preference_dataloaders", slow)
    with pytest.raises(LoraLabError, match=message.replace("(", r"\(").replace(".", r"\.")):
        if "val_data" in args:
            call_flat(dpo_script.setup, checkpoint_dir=tiny_ckpt, out_dir=tmp_path / "out", **{**RUN, **args})
        else:
            run(tiny_ckpt, args.pop("data"), tmp_path / "out", **args)
    assert not (tmp_path / "out" / TRAIN_STATE_FILE).exists()


def test_qlora_dpo_and_the_adapter_works_everywhere(tiny_ckpt, pairs_file, tmp_path, capsys):
    """--quantize nf4 trains on a 4-bit base; the adapter then goes through generate/lora.py, merge_lora and
    export_peft like any other."""
    from generate.lora import main as generate_lora
    from lora_lab.formats.peft import export_peft
    from lora_lab.formats.merge import merge_lora_checkpoint

    out = run(tiny_ckpt, pairs_file, tmp_path / "out", quantize="nf4", max_steps=2, loss="ipo")
    config, _ = load_lora(out)
    assert config.base_quantization == {"method": "nf4", "blocksize": 64, "double_quant": True}
    assert config.trained_with["loss"] == "ipo"
    capsys.readouterr()
    generate_lora(adapter_dir=out, checkpoint_dir=tiny_ckpt, prompt="Hi", max_new_tokens=3, temperature=0.0)
    assert "Loaded" in capsys.readouterr().err
    merge_lora_checkpoint(tiny_ckpt, out, tmp_path / "merged")
    assert GPT.from_checkpoint(tmp_path / "merged").config.n_layer == 2
    export_peft(out, tmp_path / "peft", checkpoint_dir=tiny_ckpt)
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------------------
# 6. real weights, real pairs
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_dpo_on_polite_pairs_raises_the_held_out_reward_accuracy(tmp_path, capsys):
    """SmolLM2-135M-Instruct on preference_polite_1100.json: after 6 steps of 8 pairs the held-out loss is below
    ln 2, the mean held-out margin is positive and more held-out pairs are ranked right than wrong (measured: 0.678,
    0.048, 62.5 %; the tutorial's 12-step run reaches 93.8 %)."""
    from lora_lab.formats.gguf_import import convert_gguf

    ckpt = tmp_path / "smollm2"
    convert_gguf(require_asset("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"), ckpt)
    data = require_asset("data/preference_polite_1100.json")
    out = tmp_path / "out"
    call_flat(dpo_script.setup, checkpoint_dir=ckpt, data=str(data), out_dir=out, n_train=48, n_val=16, max_steps=6,
                     batch_size=8, micro_batch_size=8, learning_rate=2e-3, warmup_steps=2, max_seq_length=160,
                     eval_interval=6, eval_samples=0, beta=0.1)
    last = metrics(out)[-1]
    assert float(last["val_loss"]) < LN2 - 0.01
    assert float(last["val_rewards/margins"]) > 0.02
    assert float(last["val_rewards/accuracies"]) > 0.5
    assert "reward accuracy 0.0% ->" in capsys.readouterr().out  # before: policy == reference, exactly
