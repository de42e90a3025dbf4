"""GRPO: reinforcement learning with verifiable rewards, without a value model.

For each prompt q the policy pi (the model being trained: its LoRA) samples a GROUP of G completions o_1..o_G
(`--num_generations`); programs score them (lora_lab/rewards.py): r_i = sum_k w_k R_k(q, o_i). Shao et al.
(DeepSeekMath, 2024) replace PPO's learned value baseline by the group's own mean:

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + 1e-4)                         (scale_rewards = group)

(std with Bessel's correction, as TRL; `batch` divides by the std over the whole batch instead, `none` not at all,
as Dr. GRPO recommends). A group whose completions all score the same has A = 0 for all: it teaches nothing
(`frac_reward_zero_std` counts them). Every token t of completion i then gets its completion's advantage, and the
loss is PPO's clipped surrogate on the per-token probability ratio against the policy that sampled (pi_old):

    rho_it = pi(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
    l_it   = -min(rho_it A_i, clip(rho_it, 1 - epsilon, 1 + epsilon_high) A_i) + beta KL_it
    KL_it  = rho_it (pi_ref / pi - log(pi_ref / pi) - 1)        (Schulman's k3 estimator, >= 0, of KL(pi || pi_ref);
                                                                  times rho: TRL's use_bias_correction_kl)

- With --num_iterations 1 (the default) each batch is used for one step: pi_old IS pi (detached), so rho = 1, the
  clip never acts and the gradient is the plain policy gradient  -A_i grad log pi(o_it). With num_iterations > 1
  the same completions train several steps and pi_old's log-probs are scored once, before the first of them.
- pi_ref is the starting model: the base with the LoRA switched off (lora_disabled), or, when an SFT adapter is
  continued, the base with that adapter's weights as they were (adapter_swapped): never a second copy of the model.
  beta = 0 (the default, as TRL's GRPOConfig today: "LoRA Without Regret" and DAPO drop the KL term) skips it.
- How the token losses are summed (`token_weights`): loss = sum_it w_it l_it over the step's batch, with
    grpo     w_it = 1 / (|o_i| N)           the mean over completions of each completion's token mean
    dr_grpo  w_it = 1 / (L N)               L = max_completion_length: a constant, no length bias (Dr. GRPO)
    dapo     w_it = 1 / sum_i |o_i|         the mean over all the batch's tokens (DAPO; TRL's default)
  N completions in the step. The weights are fixed per step, so micro-batches of gradient accumulation just add up.
- Log-probabilities are of the SAMPLING distribution: log softmax(logits / temperature), as TRL scores them; only
  the completion tokens' logits are made (GPT.forward's logits_at): never the (B, T, vocab) tensor.

Logged under TRL's names (`step_metrics`): reward, reward_std, rewards/NAME/mean, rewards/NAME/std,
frac_reward_zero_std, completions/mean_length, completions/min_length, completions/max_length,
completions/clipped_ratio, kl (beta > 0), entropy, clip_ratio/low_mean, clip_ratio/high_mean, clip_ratio/region_mean.

Each claim is checked in tests/test_grpo.py:
    the loss and its gradient equal TRL's GRPOTrainer._compute_loss, each loss_type, with and without KL,
    with gradient accumulation                                         test_loss_matches_trl_grpo_trainer
    completion log-probs equal TRL's (PEFT model, temperature)       test_completion_logps_match_trl
    group advantages, zero-std groups, batch / none scaling           test_group_advantages_*
    the reference is the starting model, bit for bit                  test_reference_is_the_starting_model_*
    batched KV-cache sampling equals one-by-one; seeded reproducible   test_batched_sampling_*
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence

import torch

from lora_lab.lora import lora_modules
from lora_lab.utils import LoraLabError

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


def check_grpo_settings(num_generations: int, beta: float, epsilon: float, epsilon_high: Optional[float],
                        loss_type: str, scale_rewards: str, num_iterations: int, max_completion_length: int,
                        batch_size: int, micro_batch_size: int, temperature: float = 1.0) -> None:
    """One line for a bad GRPO setting, before any slow work."""
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise LoraLabError(f"--temperature {temperature!r}: GRPO learns from differences between sampled "
                           "completions: use a temperature > 0 (1.0 is usual)")
    if loss_type not in LOSS_TYPES:
        raise LoraLabError(f"--loss_type {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
    if scale_rewards not in SCALE_REWARDS:
        raise LoraLabError(f"--scale_rewards {scale_rewards!r}: choose one of {', '.join(SCALE_REWARDS)}")
    for flag, value in (("num_generations", num_generations), ("num_iterations", num_iterations),
                        ("max_completion_length", max_completion_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LoraLabError(f"--{flag} {value!r}: use a whole number >= 1")
    if num_generations < 2:
        raise LoraLabError(f"--num_generations {num_generations}: GRPO compares completions of the same prompt, so it "
                           "needs at least 2 per prompt (8 is usual)")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise LoraLabError(f"--beta {beta!r}: use a number >= 0 (0 = no KL term, TRL's default; 0.04 was GRPO's)")
    for flag, value in (("epsilon", epsilon), ("epsilon_high", epsilon_high)):
        if value is not None and not (isinstance(value, (int, float)) and 0 < value < 10):
            raise LoraLabError(f"--{flag} {value!r}: use a clipping range > 0 (0.2 is usual; DAPO's high one 0.28)")
    if batch_size % num_generations:
        raise LoraLabError(f"--batch_size {batch_size} is not a multiple of --num_generations {num_generations}: "
                           "the batch counts completions, num_generations of each prompt")
    if batch_size % micro_batch_size:
        raise LoraLabError(f"--batch_size {batch_size} is not a multiple of --micro_batch_size {micro_batch_size}")


# ------------------------------------------------------------------------------------------------------------
# Advantages
# ------------------------------------------------------------------------------------------------------------
def bessel_std(x: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """The standard deviation with Bessel's correction (TRL's nanstd, without NaNs); NaN for a single value."""
    return x.std(dim=dim, correction=1) if dim is not None else x.std(correction=1)


def group_advantages(rewards: torch.Tensor, num_generations: int,
                     scale_rewards: str = "group") -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages (N,), zero_std (N,) bool) of rewards (N,) ordered as G consecutive completions per prompt.

    A_i = r_i - its group's mean, divided by (the group's std + 1e-4) (group), by (the batch's std + 1e-4)
    (batch), or not divided (none). zero_std marks completions whose group (batch for `batch`) has std 0."""
    grouped = rewards.view(-1, num_generations)  # (P, G)
    mean = grouped.mean(dim=1).repeat_interleave(num_generations)  # (N,)
    if scale_rewards == "batch":
        std = bessel_std(rewards).expand_as(rewards)  # (N,)
    else:
        std = bessel_std(grouped, dim=1).repeat_interleave(num_generations)  # (N,)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return advantages, torch.isclose(std, torch.zeros_like(std))


# ------------------------------------------------------------------------------------------------------------
# Completion tokens and their log-probabilities
# ------------------------------------------------------------------------------------------------------------
def pack_completions(prompts: Sequence[torch.Tensor], completions: Sequence[Sequence[int]],
                     pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Each prompt + its completion in one right-padded row, and where the completion tokens are.

    input_ids (B, T): prompt_b, completion_b, padding. at (B, T) bool: the positions whose logits predict a
    completion token (p_b - 1 ... p_b + c_b - 2). completion_ids (B, C) and mask (B, C): the completion tokens,
    right-padded, as TRL lays them out. Padding sits after every real token, so causal attention never reads it."""
    B = len(prompts)
    T = max(len(p) + len(c) for p, c in zip(prompts, completions))
    C = max(max(len(c) for c in completions), 1)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    at = torch.zeros(B, T, dtype=torch.bool)
    completion_ids = torch.full((B, C), pad_id, dtype=torch.long)
    mask = torch.zeros(B, C, dtype=torch.bool)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        p, c = torch.as_tensor(p, dtype=torch.long), torch.as_tensor(list(c), dtype=torch.long)
        input_ids[b, :len(p)] = p
        input_ids[b, len(p):len(p) + len(c)] = c
        at[b, len(p) - 1:len(p) + len(c) - 1] = True
        completion_ids[b, :len(c)] = c
        mask[b, :len(c)] = True
    return {"input_ids": input_ids, "at": at, "completion_ids": completion_ids, "mask": mask}


def completion_logps(model, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                     with_entropy: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token log-probabilities (B, C) of the completion tokens under log softmax(logits / temperature), 0 on
    the padding; and (with_entropy) each position's entropy (B, C), without a gradient.

    lm_head runs only at the completion positions (logits_at): (n, vocab) logits, n = completion tokens."""
    device = next(model.parameters()).device
    mask = batch["mask"].to(device)  # (B, C)
    logits = model(batch["input_ids"].to(device), logits_at=batch["at"].to(device)).float()  # (n, V)
    if temperature != 1.0:
        logits = logits / temperature
    log_probs = logits.log_softmax(dim=-1)  # (n, V), row-major as mask orders the tokens
    targets = batch["completion_ids"].to(device)[mask]  # (n,)
    token_logps = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (n,)
    per_token = torch.zeros(mask.shape, dtype=token_logps.dtype, device=device).masked_scatter(mask, token_logps)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            h = -(log_probs.exp() * log_probs).sum(dim=-1)  # (n,)
            entropy = torch.zeros(mask.shape, dtype=h.dtype, device=device).masked_scatter(mask, h)
    return per_token, entropy


# ------------------------------------------------------------------------------------------------------------
# The loss
# ------------------------------------------------------------------------------------------------------------
def token_weights(mask: torch.Tensor, loss_type: str, n_sequences: int, n_tokens: float,
                  max_completion_length: int) -> torch.Tensor:
    """w (B, C) of a micro-batch such that the step's loss is sum over its micro-batches of sum(w * l) (see the
    module docstring). n_sequences: completions in the step (on this device); n_tokens: completion tokens in the
    step (dapo; over all devices, divided by their number, as data-parallel gradients are averaged)."""
    mask = mask.float()
    if loss_type == "grpo":
        return mask / (mask.sum(dim=1, keepdim=True).clamp(min=1.0) * n_sequences)
    if loss_type == "dr_grpo":
        return mask / (n_sequences * max_completion_length)
    if loss_type == "dapo":
        return mask / max(n_tokens, 1.0)
    raise LoraLabError(f"loss_type {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: Optional[torch.Tensor],
              advantages: torch.Tensor, weights: torch.Tensor, beta: float = 0.0, epsilon: float = 0.2,
              epsilon_high: Optional[float] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the micro-batch's share of the step's loss, per-token tensors for the metrics).

    logps, old_logps, ref_logps (B, C): per-token log-probs of the policy (with a gradient), of the policy that
    sampled (no gradient) and of the reference (needed when beta > 0); advantages (B,); weights (B, C) from
    token_weights (0 on the padding)."""
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    advantages = advantages.unsqueeze(1)  # (B, 1): every token of a completion gets its advantage
    ratio = torch.exp(logps - old_logps)  # (B, C) rho
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)  # (B, C)
    out = {"low_clipped": (ratio < 1 - epsilon) & (advantages < 0),
           "high_clipped": (ratio > 1 + epsilon_high) & (advantages > 0)}
    if beta != 0.0:
        log_ref_ratio = ref_logps - logps  # log(pi_ref / pi)
        kl = (torch.exp(log_ref_ratio) - log_ref_ratio - 1) * ratio  # (B, C) k3, bias-corrected by rho
        per_token = per_token + beta * kl
        out["kl"] = kl.detach()
    return (per_token * weights).sum(), out


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(sum of x over the mask, count): summed over micro-batches, then divided, for exact step means."""
    return float((x.float() * mask).sum()), float(mask.sum())


# ------------------------------------------------------------------------------------------------------------
# The reference: the starting model, never a second copy
# ------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def lora_disabled(model) -> Iterator[None]:
    """The base model alone: every LoRA layer skips its update (a fresh LoRA's starting point, exactly)."""
    layers = [m for _, m in lora_modules(model)]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m in layers:
            m.disabled = False


@contextlib.contextmanager
def adapter_swapped(model, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """The model with its LoRA tensors set to `state` (the SFT adapter as it was), then back to the trained ones.
    Only the adapter's tensors (a few MB) are kept and copied, never the model."""
    params = dict(model.named_parameters())
    trained = {k: params[k].detach().clone() for k in state}
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in trained.items():
                params[k].copy_(v)


def reference_context(model, start_state: Optional[dict[str, torch.Tensor]]):
    """pi_ref: lora_disabled for a fresh adapter (start_state None), else adapter_swapped to the starting one."""
    return lora_disabled(model) if start_state is None else adapter_swapped(model, start_state)


# ------------------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------------------
def reward_metrics(rewards_per_func: torch.Tensor, weights: torch.Tensor, names: Sequence[str],
                   zero_std: torch.Tensor) -> dict[str, float]:
    """TRL's reward metrics of a batch: rewards_per_func (N, F) unweighted, weights (F,)."""
    rewards = (rewards_per_func * weights).sum(dim=1)  # (N,)
    out = {"reward": rewards.mean().item(), "reward_std": bessel_std(rewards).item() if len(rewards) > 1 else 0.0}
    for k, name in enumerate(names):
        col = rewards_per_func[:, k]
        out[f"rewards/{name}/mean"] = col.mean().item()
        out[f"rewards/{name}/std"] = bessel_std(col).item() if len(col) > 1 else 0.0
    out["frac_reward_zero_std"] = zero_std.float().mean().item()
    return out


def length_metrics(completions: Sequence[Sequence[int]], eos_ids: Sequence[int]) -> dict[str, float]:
    """completions/mean_length, min, max (tokens) and clipped_ratio (the share that ended without a stop token)."""
    lengths = [len(c) for c in completions]
    clipped = [not c or c[-1] not in eos_ids for c in completions]
    return {"completions/mean_length": sum(lengths) / len(lengths), "completions/min_length": float(min(lengths)),
            "completions/max_length": float(max(lengths)),
            "completions/clipped_ratio": sum(clipped) / len(clipped)}
