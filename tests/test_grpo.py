"""GRPO: the loss (lora_lab/grpo.py) against TRL's GRPOTrainer, the advantages, the reference, batched sampling, the
rewards (lora_lab/rewards.py), and finetune/grpo.py end to end (files, TRL's metric names, exact resume, bad input).

The runs are in-process on a tiny random model with SmolLM2's real tokenizer (tests/tiny_checkpoint.py)."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import finetune.grpo as grpo_script
from test_finetune_lora import assert_adapters_equal, stop_after
from lora_lab.generate import generate, generate_batch
from lora_lab.grpo import (adapter_swapped, completion_logps, group_advantages, grpo_loss, lora_disabled,
                           pack_completions, token_weights)
from lora_lab.lora import LoRAConfig, inject_lora, load_lora, load_lora_state_dict, lora_modules, lora_state_dict
from lora_lab.model import GPT
from lora_lab.rewards import compute_rewards, final_number, load_rewards
from lora_lab.training import TRAIN_STATE_FILE
from lora_lab.utils import LoraLabError
from lora_lab.args import call_flat

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ------------------------------------------------------------------------------------------------------------
# 1. advantages
# ------------------------------------------------------------------------------------------------------------
def test_group_advantages_by_hand_and_zero_std_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4; the second all equal
    adv, zero = group_advantages(rewards, 4, "group")
    std = math.sqrt((4 * 0.25) / 3)  # Bessel: sum of squares / (G - 1)
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4)
    torch.testing.assert_close(adv, torch.cat([expected, torch.zeros(4)]))
    assert zero.tolist() == [False] * 4 + [True] * 4  # a group that all scores the same teaches nothing
    # batch: the group's mean, the batch's std; none: the mean only (Dr. GRPO)
    adv_b, zero_b = group_advantages(rewards, 4, "batch")
    torch.testing.assert_close(adv_b, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / (rewards.std() + 1e-4))
    assert not zero_b.any()
    torch.testing.assert_close(group_advantages(rewards, 4, "none")[0],
                               torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_group_advantages_match_trls_formula():
    pytest.importorskip("trl")
    from trl.trainer.utils import nanstd

    rewards = torch.randn(24)
    mean = rewards.view(-1, 6).mean(1).repeat_interleave(6)
    std = nanstd(rewards.view(-1, 6), dim=1).repeat_interleave(6)
    torch.testing.assert_close(group_advantages(rewards, 6)[0], (rewards - mean) / (std + 1e-4))
    torch.testing.assert_close(group_advantages(rewards, 6, "batch")[0], (rewards - mean) / (nanstd(rewards) + 1e-4))


# ------------------------------------------------------------------------------------------------------------
# 2. the loss against TRL's GRPOTrainer._compute_loss
# ------------------------------------------------------------------------------------------------------------
def trl_loss(per_token_logps, inputs, loss_type, beta, epsilon, epsilon_high, max_completion_length,
             accumulation=1):
    """TRL's GRPOTrainer._compute_loss on given log-probs: the trainer's own code, with a stand-in `self` whose
    model pass returns `per_token_logps` (so only the loss is compared, on exactly the same numbers)."""
    from trl import GRPOTrainer

    accelerator = SimpleNamespace(num_processes=1, reduce=lambda t, reduction: t, gather=lambda t: t,
                                  gather_for_metrics=lambda t: t)
    args = SimpleNamespace(use_bias_correction_kl=True, delta=None, steps_per_generation=accumulation)
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (per_token_logps, torch.zeros_like(per_token_logps), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, args=args, loss_type=loss_type, epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=accumulation, max_completion_length=max_completion_length,
        accelerator=accelerator, _entropy_bonus_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)))
    return GRPOTrainer._compute_loss(stub, None, inputs), stub._metrics["train"]


def made_up_batch(B=6, C=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])[:B]
    mask = (torch.arange(C) < lengths[:, None]).long()  # (B, C)
    logps = -torch.rand(B, C, generator=gen) * 3
    old = logps + torch.randn(B, C, generator=gen) * 0.3  # ratios well outside [0.8, 1.2] for some tokens
    ref = logps + torch.randn(B, C, generator=gen) * 0.5
    adv = torch.randn(B, generator=gen)
    return logps, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("off_policy", [False, True])
def test_loss_matches_trl_grpo_trainer(loss_type, beta, off_policy):
    """Same completions, advantages, old and reference log-probs: the same loss and the same gradient with respect
    to the policy's log-probs (hence to every parameter), within 1e-5; also over 2 accumulated micro-batches."""
    pytest.importorskip("trl")
    logps, old, ref, adv, mask = made_up_batch()
    B, C = mask.shape
    L, eps, eps_high = 16, 0.2, (0.28 if off_policy else None)
    theirs_in = logps.clone().requires_grad_(True)
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, C, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "num_items_in_batch": mask.sum(), "ref_per_token_logps": ref}
    if off_policy:  # num_iterations > 1: pi_old scored before the policy moved
        inputs["old_per_token_logps"] = old
    theirs, logged = trl_loss(theirs_in, inputs, loss_type, beta, eps, eps_high, L)
    theirs.backward()

    ours_in = logps.clone().requires_grad_(True)
    weights = token_weights(mask.bool(), loss_type, B, float(mask.sum()), L)
    ours, parts = grpo_loss(ours_in, old if off_policy else ours_in.detach(), ref if beta else None, adv, weights,
                            beta, eps, eps_high)
    ours.backward()
    torch.testing.assert_close(ours, theirs.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=0, atol=1e-5)
    assert ours_in.grad.abs().sum() > 0 and (ours_in.grad[mask == 0] == 0).all()
    if beta:
        kl = (parts["kl"] * mask).sum() / mask.sum()
        assert abs(kl.item() - logged["kl"][-1]) < 1e-5
    region = ((parts["low_clipped"] | parts["high_clipped"]).float() * mask).sum() / mask.sum()
    assert abs(region.item() - logged["clip_ratio/region_mean"][-1]) < 1e-6
    if off_policy:
        assert region > 0  # the clip acts: the comparison covers it

    # gradient accumulation: TRL's two micro-batch losses add up to ours, our weights fixed for the whole step
    half = B // 2
    total_theirs, total_ours = 0.0, 0.0
    for rows in (slice(0, half), slice(half, B)):
        part = {k: (v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in inputs.items()}
        t, _ = trl_loss(logps[rows].clone(), part, loss_type, beta, eps, eps_high, L, accumulation=2)
        total_theirs += t.item()
        w = token_weights(mask[rows].bool(), loss_type, B, float(mask.sum()), L)
        o, _ = grpo_loss(logps[rows], old[rows] if off_policy else logps[rows], ref[rows], adv[rows], w, beta, eps,
                         eps_high)
        total_ours += o.item()
    assert abs(total_ours - total_theirs) < 1e-5
    assert abs(total_ours - ours.item()) < 1e-5


def test_on_policy_loss_is_the_policy_gradient():
    """num_iterations 1: rho = 1, the clip never acts, and d loss / d log pi(o_it) = -A_i w_it."""
    logps, _, _, adv, mask = made_up_batch()
    x = logps.clone().requires_grad_(True)
    w = token_weights(mask.bool(), "dapo", 6, float(mask.sum()), 16)
    loss, parts = grpo_loss(x, x.detach(), None, adv, w)
    loss.backward()
    torch.testing.assert_close(x.grad, -adv[:, None] * w)
    torch.testing.assert_close(loss, -(adv[:, None] * w).sum())
    assert not parts["low_clipped"].any() and not parts["high_clipped"].any()


# ------------------------------------------------------------------------------------------------------------
# 3. log-probs, the reference, sampling
# ------------------------------------------------------------------------------------------------------------
def trained_lora(ckpt, seed=3, targets="all", dropout=0.0) -> GPT:
    model = GPT.from_checkpoint(ckpt)
    inject_lora(model, r=4, alpha=8.0, dropout=dropout, targets=targets)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.5)
    return model


def prompts_and_completions(seed=0):
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 49152, (n,), generator=gen) for n in (5, 9, 3, 7)]
    completions = [torch.randint(0, 49152, (n,), generator=gen).tolist() for n in (4, 1, 6, 3)]
    return prompts, completions


def test_completion_logps_are_the_tempered_log_softmax_of_the_completion_tokens(tiny_ckpt):
    model = trained_lora(tiny_ckpt).eval()
    prompts, completions = prompts_and_completions()
    batch = pack_completions(prompts, completions)
    logps, entropy = completion_logps(model, batch, temperature=0.7, with_entropy=True)
    assert logps.shape == (4, 6)
    with torch.no_grad():
        for b, (p, c) in enumerate(zip(prompts, completions)):
            full = torch.cat([p, torch.tensor(c)])[None]
            lp = (model(full)[0] / 0.7).log_softmax(-1)  # (T, V)
            expected = torch.stack([lp[len(p) - 1 + j, c[j]] for j in range(len(c))])
            torch.testing.assert_close(logps[b, :len(c)], expected, rtol=1e-5, atol=1e-5)
            assert (logps[b, len(c):] == 0).all() and (entropy[b, :len(c)] > 0).all()


def test_completion_logps_match_trl(tiny_ckpt, tmp_path):
    """TRL's own per-token log-probs (its GRPOTrainer on the PEFT model of the same adapter, left-padded prompts,
    temperature 0.7) equal ours within 1e-5."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from lora_lab.formats.hf import export_hf
    from lora_lab.formats.peft import export_peft
    from lora_lab.lora import save_lora

    export_hf(tiny_ckpt, tmp_path / "hf")
    ours = trained_lora(tiny_ckpt, targets=("query", "value", "mlp")).eval()
    config = LoRAConfig(r=4, alpha=8.0, targets=["query", "value", "mlp"], base_model=str(tiny_ckpt),
                        base_config=ours.config.to_dict(), prompt_style="chatml")
    save_lora(tmp_path / "adapter", ours, config)
    export_peft(tmp_path / "adapter", tmp_path / "peft")
    peft_json = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, temperature=0.7,
                      per_device_train_batch_size=4, num_generations=4, max_completion_length=8)
    trainer = GRPOTrainer(model=hf, reward_funcs=lambda completions, **k: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_list([{"prompt": "hi"}] * 4),
                          processing_class=AutoTokenizer.from_pretrained(tmp_path / "hf"),
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=peft_json["target_modules"],
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
    set_peft_model_state_dict(trainer.model, load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    trainer.model.eval()

    prompts, completions = prompts_and_completions()
    P, C = max(len(p) for p in prompts), max(len(c) for c in completions)
    prompt_ids = torch.zeros(4, P, dtype=torch.long)
    prompt_mask = torch.zeros(4, P, dtype=torch.long)
    completion_ids = torch.zeros(4, C, dtype=torch.long)
    completion_mask = torch.zeros(4, C, dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompts, completions)):  # TRL: prompts left-padded, completions right-padded
        prompt_ids[b, P - len(p):], prompt_mask[b, P - len(p):] = p, 1
        completion_ids[b, :len(c)], completion_mask[b, :len(c)] = torch.tensor(c), 1
    with torch.no_grad():
        theirs, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1),
            C)
        mine, _ = completion_logps(ours, pack_completions(prompts, completions), temperature=0.7)
    keep = completion_mask.bool()
    torch.testing.assert_close(mine[keep], theirs[keep], rtol=1e-5, atol=1e-5)


def test_reference_is_the_starting_model_bit_for_bit(tiny_ckpt):
    """lora_disabled: a trained LoRA model scores exactly what the bare base scores; adapter_swapped: exactly what
    base + the starting (SFT) adapter scores; both give back the trained weights untouched. No model copy."""
    prompts, completions = prompts_and_completions(1)
    batch = pack_completions(prompts, completions)
    bare = GPT.from_checkpoint(tiny_ckpt).eval()
    policy = trained_lora(tiny_ckpt, seed=5).eval()
    start = {k: v.clone() for k, v in lora_state_dict(policy).items()}
    sft = GPT.from_checkpoint(tiny_ckpt).eval()  # base + the starting adapter, built apart
    inject_lora(sft, r=4, alpha=8.0, targets="all")
    load_lora_state_dict(sft, start)
    with torch.no_grad():
        for _, m in lora_modules(policy):  # the policy trains away from its start
            m.lora_A.add_(0.1)
        trained = {k: v.clone() for k, v in lora_state_dict(policy).items()}
        with lora_disabled(policy):
            off = completion_logps(policy, batch)[0]
        with adapter_swapped(policy, start):
            swapped = completion_logps(policy, batch)[0]
        moved = completion_logps(policy, batch)[0]
        assert torch.equal(off, completion_logps(bare, batch)[0])
        assert torch.equal(swapped, completion_logps(sft, batch)[0])
        assert not torch.allclose(moved, swapped)
    assert_adapters_equal(lora_state_dict(policy), trained)


def test_batched_sampling_equals_one_by_one_and_is_seeded(tiny_ckpt):
    model = trained_lora(tiny_ckpt).eval()
    prompts, _ = prompts_and_completions(2)
    greedy = generate_batch(model, prompts, 10, temperature=0.0)
    assert greedy == [list(generate(model, p, 10, temperature=0.0)) for p in prompts]  # the KV cache, per row
    # with an EOS id the row stops there (included), the others go on
    eos = greedy[1][3]
    stopped = generate_batch(model, prompts, 10, temperature=0.0, eos_ids=[eos])
    assert stopped[1] == greedy[1][:greedy[1].index(eos) + 1]
    first = generate_batch(model, prompts * 4, 12, generator=torch.Generator().manual_seed(7))
    again = generate_batch(model, prompts * 4, 12, generator=torch.Generator().manual_seed(7))
    other = generate_batch(model, prompts * 4, 12, generator=torch.Generator().manual_seed(8))
    assert first == again and first != other
    assert len({tuple(c) for c in first[::4]}) > 1  # the copies of a prompt get different samples


# ------------------------------------------------------------------------------------------------------------
# 4. rewards
# ------------------------------------------------------------------------------------------------------------
EXPECTED = json.dumps({"product": "desk lamp", "sentiment": "negative", "issue": "arrived broken", "rating": 2})


def test_builtin_rewards():
    names, fns, weights = load_rewards("json_valid,json_keys,json_values,gsm8k,length:10", "1,1,2,1,0.5")
    completions = [EXPECTED,  # all right
                   '{"product": "desk lamp", "sentiment": "positive", "issue": "arrived broken", "rating": 2} ok',
                   '{"product": "desk lamp", "rating": 2, "colour": "red"}',  # 2 right of 5 keys (one extra)
                   "not json"]
    rows = [{"output": EXPECTED}] * 4
    r = compute_rewards(names, fns, ["p"] * 4, completions, rows)
    assert names == ["json_valid", "json_keys", "json_values", "gsm8k", "length_10"]
    assert r[:, 0].tolist() == [1, 1, 1, 0] and r[:, 1].tolist() == [1, 1, 0, 0]
    torch.testing.assert_close(r[:, 2], torch.tensor([1.0, 0.75, 0.4, 0.0]))
    assert weights.tolist() == [1, 1, 2, 1, 0.5]
    # GSM8K: the number after ####, else the last number; commas and $ ignored
    g = compute_rewards(["gsm8k"], [fns[3]], ["p"] * 3, ["so 3 + 4 = 7 apples", "#### 1,200", "it is 8"],
                        [{"output": "... = 7"}, {"output": "Total $1200.\n#### 1,200"}, {"output": "#### 7"}])
    assert g[:, 0].tolist() == [1, 1, 0]
    assert final_number("no number") is None
    assert compute_rewards(["length_10"], [fns[4]], ["p"] * 2, ["x" * 10, "x" * 15], [{}, {}])[:, 0].tolist() == \
        [1.0, 0.5]


def test_user_reward_and_one_line_errors(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text("def shout(prompts, completions, **row):\n    return [c.count('!') for c in completions]\n"
                    "def broken(prompts, completions, **row):\n    raise KeyError('answer')\n"
                    "def short(prompts, completions, **row):\n    return [1.0]\n")
    names, fns, _ = load_rewards(f"{path}:shout")
    assert compute_rewards(names, fns, ["p", "p"], ["hi!!", "no"], [{}, {}])[:, 0].tolist() == [2, 0]
    with pytest.raises(LoraLabError, match=r"^reward broken raised KeyError: 'answer'$"):
        compute_rewards(*load_rewards(f"{path}:broken")[:2], ["p"], ["c"], [{}])
    with pytest.raises(LoraLabError, match=r"^reward short returned 1 values for 2 completions"):
        compute_rewards(*load_rewards(f"{path}:short")[:2], ["p", "p"], ["c", "d"], [{}, {}])
    for spec, message in (("nope", "--reward 'nope': use a built-in"), (f"{path}:missing", "has no function"),
                          ("gone.py:f", "gone.py does not exist"), ("json_valid:3", "only length takes")):
        with pytest.raises(LoraLabError, match=message):
            load_rewards(spec)
    with pytest.raises(LoraLabError, match="give 2 finite number"):
        load_rewards("json_valid,json_keys", "1")


# ------------------------------------------------------------------------------------------------------------
# 5. finetune/grpo.py end to end
# ------------------------------------------------------------------------------------------------------------
RUN = dict(data="json_extraction", n_train=12, n_val=4, max_steps=4, batch_size=8, micro_batch_size=4,
           num_generations=4, max_completion_length=8, reward="json_valid,length:30", eval_interval=2,
           eval_iters=1, eval_samples=1, learning_rate=5e-2, warmup_steps=0, num_iterations=2, beta=0.04,
           epsilon_high=0.28, seed=3, save_interval=100)


def run(ckpt, out_dir, **overrides):
    call_flat(grpo_script.setup, checkpoint_dir=ckpt, out_dir=out_dir, **{**RUN, **overrides})
    return out_dir


def metrics(out_dir) -> list[dict]:
    with open(out_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def reference_run(tiny_ckpt, tmp_path_factory):
    return run(tiny_ckpt, tmp_path_factory.mktemp("grpo") / "out")


def test_run_writes_an_adapter_and_trl_named_metrics(reference_run, tiny_ckpt, capsys):
    config, weights = load_lora(reference_run)
    assert config.trained_with["method"] == "grpo" and config.trained_with["reward"] == ["json_valid", "length_30"]
    assert config.dropout == 0.0  # dropout off by default (TRL's disable_dropout)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if k.endswith("lora_B"))  # it trained
    rows = metrics(reference_run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    for name in ("loss", "reward", "reward_std", "rewards/json_valid/mean", "rewards/length_30/mean",
                 "frac_reward_zero_std", "completions/mean_length", "kl", "entropy", "clip_ratio/region_mean",
                 "val_reward", "val_solved", "val_rewards/length_30/mean"):
        assert rows[1].get(name) not in (None, ""), name  # (held-out: at step 2, the eval interval)
    assert float(rows[0]["kl"]) == 0.0  # the first step: the policy is the reference
    assert float(rows[1]["kl"]) > 0  # the second step trains on the first one's completions: it has moved
    assert rows[0]["reward"] == rows[1]["reward"]  # num_iterations 2: one batch of completions, two steps
    assert float(rows[0]["clip_ratio/region_mean"]) == 0.0  # on-policy: nothing clipped
    pytest.importorskip("matplotlib")
    from lora_lab import plot
    from test_run_record import png_size

    assert png_size(reference_run / "loss.png") == (1000, 825)  # the loss above, the reward panel below
    assert plot.describe(reference_run).endswith("beta 0.04, reward json_valid,length:30")


def test_interrupted_run_resumes_exactly(reference_run, tiny_ckpt, tmp_path, monkeypatch):
    """Stopped after step 3 (mid-way through the second batch's two steps), resumed: the same adapter and the same
    metrics as the uninterrupted run (the batch's completions are in the resume state; sampling is seeded)."""
    out = tmp_path / "out"
    monkeypatch.setattr(grpo_script, "StopRequest", stop_after(3))
    run(tiny_ckpt, out)
    assert len(metrics(out)) == 3 and "rollout" in torch.load(out / TRAIN_STATE_FILE)["counters"]
    monkeypatch.undo()
    run(tiny_ckpt, out, resume=True)
    assert_adapters_equal(load_lora(out)[1], load_lora(reference_run)[1])
    timing = ("tokens_per_sec", "sampling_tokens_per_sec")
    assert ([{k: v for k, v in r.items() if k not in timing} for r in metrics(out)]
            == [{k: v for k, v in r.items() if k not in timing} for r in metrics(reference_run)])


@pytest.mark.parametrize("bad, message", [
    (dict(reward="nope"), "--reward 'nope': use a built-in"),
    (dict(reward_weights="1"), "--reward_weights '1': give 2 finite number"),
    (dict(num_generations=1), "--num_generations 1: GRPO compares"),
    (dict(batch_size=6), "--batch_size 6 is not a multiple of --num_generations 4"),
    (dict(loss_type="ppo"), "--loss_type 'ppo'"),
    (dict(beta=-1.0), "--beta -1.0"),
    (dict(temperature=0.0), "--temperature 0.0: GRPO learns from differences"),
    (dict(data="missing.json"), "--data 'missing.json' is neither"),
])
def test_bad_input_is_one_line_before_the_model_loads(tiny_ckpt, tmp_path, monkeypatch, bad, message):
    def slow(*a, **k):
        raise AssertionError("reached the slow part before the mistake was reported")

    monkeypatch.setattr(GPT, "from_checkpoint", slow)
    monkeypatch.setattr(grpo_script, "load_instructions", slow)
    with pytest.raises(LoraLabError, match=message.replace("(", r"\(").replace(".", r"\.")):
        run(tiny_ckpt, tmp_path / "out", **bad)


def test_a_failing_reward_stops_the_run_with_one_line_naming_it(tiny_ckpt, tmp_path):
    path = tmp_path / "r.py"
    path.write_text("def wrong(prompts, completions, **row):\n    return [0.0] * (len(completions) - 1)\n")
    with pytest.raises(LoraLabError, match=r"^reward wrong returned 1 values for 2 completions: return a list"):
        run(tiny_ckpt, tmp_path / "out", reward=f"{path}:wrong", n_val=2, max_steps=1)


def test_gsm8k_test_file_loads_as_it_is():
    """The shared GSM8K test set ({question, answer} with #### N) is read as instruction rows, and the gsm8k reward
    scores its own answers 1."""
    from conftest import require_asset
    from lora_lab.data.instructions import load_instructions
    from lora_lab.rewards import gsm8k

    rows = load_instructions(require_asset("eval/gsm8k_test.jsonl"), val_split_fraction=0.0, verbose=False).train
    assert len(rows) == 1319 and rows[0]["instruction"].startswith("Janet") and rows[0]["output"].endswith("#### 18")
    assert gsm8k(None, ["She makes $18."], output=[rows[0]["output"]]) == [1.0]
