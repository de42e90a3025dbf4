"""DPO: learn from pairs of answers (one preferred, one not) without a reward model or sampling.

For a prompt x with a chosen answer y_w and a rejected one y_l, a policy pi (the model being trained) and a frozen
reference pi_ref (the same model as it was before this training), Rafailov et al. (2023) show that the RLHF
objective (maximise a reward, stay close to pi_ref by a KL penalty of weight beta) is solved by the policy whose
implicit reward is

    r(x, y) = beta * (log pi(y | x) - log pi_ref(y | x))              (up to a term that depends on x only)

so the reward model can be replaced by the policy itself, and fitting Bradley-Terry preferences becomes

    delta = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))      (the margin, / beta)
    sigmoid (DPO):     L = -log sigmoid(beta * delta)
    hinge (SLiC-HF):   L = max(0, 1 - beta * delta)                     (Zhao et al. 2023)
    ipo (IPO):         L = (delta - 1 / (2 * beta))^2                    (Azar et al. 2023, eq. 17, beta = tau)

- log pi(y | x) is the sum of the answer's token log-probabilities, EOS included, the prompt's excluded
  (`answer_logps`): sum_t log softmax(logits[t-1])[y_t] over the answer positions t.
- At the start the policy is the reference, so delta = 0 and the sigmoid loss is ln 2 = 0.693 for every pair,
  the rewards and margins 0; the hinge loss is 1 and the IPO loss 1 / (4 beta^2).
- The sigmoid loss's gradient is -beta * sigmoid(-beta * delta) * (grad log pi(y_w) - grad log pi(y_l)): each pair
  pushes the chosen answer up and the rejected one down, weighted by how wrong the implicit reward still ranks them.
- IPO regresses delta onto 1/(2 beta) instead of pushing it to infinity. Its delta is taken on the answers'
  per-token MEAN log-probabilities, as TRL does (their note: confirmed with the IPO authors; the squared loss would
  otherwise grow with the answers' length).
- beta: the strength of the KL leash to pi_ref. Small beta (0.1, the usual) lets the policy move further.

What is logged, under TRL's and torchtune's names (`pair_metrics`), averaged over the pairs of a step:
    rewards/chosen  = beta (log pi(y_w) - log pi_ref(y_w))       rewards/rejected = the same for y_l
    rewards/margins = rewards/chosen - rewards/rejected            rewards/accuracies = share with a margin > 0
    logps/chosen    = log pi(y_w)                                  logps/rejected   = log pi(y_l)

Each claim is checked in tests/test_dpo.py:
    answer log-probs, TRL's per-pair log-probs and loss    test_matches_trl_dpo_trainer
    ln 2 and zero margins at the start                     test_loss_is_ln2_at_the_start (and the script's smoke test)
    the reference is the starting model, bit for bit      test_reference_is_the_starting_model_bit_for_bit
    hinge and ipo known values                             test_hinge_known_values, test_ipo_known_values
    packed rows give the unpacked log-probs, loss, grads   tests/test_dpo_packing.py
"""

from __future__ import annotations

import math
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F

from lora_lab.model import IGNORE_INDEX
from lora_lab.utils import LoraLabError

LOSSES = ("sigmoid", "ipo", "hinge")
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def answer_logps(model, input_ids: torch.Tensor, labels: torch.Tensor, segment_ids: Optional[torch.Tensor] = None,
                 neftune_alpha: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the answer tokens' log-probabilities, number of answer tokens) of each sequence.

    labels: input_ids with IGNORE_INDEX on the prompt and the padding, so only the answer (and its EOS) counts.
    One sequence per row (B,) each; or, with segment_ids (packed rows, lora_lab.data.preference's
    collate_packed_pairs: segment k + 1 is sequence k, 0 padding), one per segment (n,) in segment order: each
    sequence attends only to itself and its sum runs over its own segment, so the numbers are the unpacked ones.
    neftune_alpha: NEFTune noise on the embeddings (training mode only, so never in the reference pass)."""
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE_INDEX  # (B, T-1)
    # lm_head and the log-softmax only at the positions with a target, in float32: the vocabulary is wide (49k+),
    # the answers short, so the (B, T, V) logits of every position are never made
    at = F.pad(keep, (0, 1), value=False)  # (B, T): the last position predicts nothing
    picked = model(input_ids, segment_ids=segment_ids, neftune_alpha=neftune_alpha,
                   logits_at=at).float().log_softmax(dim=-1)  # (n, V), row-major as keep orders them
    token_logps = picked.gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)  # (n,)
    per_token = torch.zeros(targets.shape, dtype=token_logps.dtype, device=token_logps.device)  # (B, T-1)
    per_token = per_token.masked_scatter(keep, token_logps)  # row-major order, as logits[keep] took them
    if segment_ids is None:
        return per_token.sum(dim=-1), keep.sum(dim=-1)  # (B,), (B,)
    # packed: a target's sequence is its token's segment (a segment's first token is never a target: its prompt)
    owner = segment_ids[:, 1:].reshape(-1)  # (B*(T-1),)
    n = int(segment_ids.max())
    sums = per_token.new_zeros(n + 1).index_add(0, owner, per_token.reshape(-1))  # (n+1,) [padding, seq 0, ...]
    counts = keep.new_zeros(n + 1, dtype=torch.long).index_add(0, owner, keep.reshape(-1).long())  # (n+1,)
    return sums[1:], counts[1:]  # (n,), (n,)


# ------------------------------------------------------------------------------------------------------------
# The losses, from delta (the difference of the two log-ratios)
# ------------------------------------------------------------------------------------------------------------
def sigmoid_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO: -log sigmoid(beta * delta), per pair."""
    return -F.logsigmoid(beta * delta)


def hinge_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC-HF: max(0, 1 - beta * delta), per pair."""
    return torch.relu(1 - beta * delta)


def ipo_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO: (delta - 1/(2 beta))^2, per pair (delta from mean per-token log-probs: see the module docstring)."""
    return (delta - 1 / (2 * beta)) ** 2


LOSS_FUNCTIONS = {"sigmoid": sigmoid_loss, "ipo": ipo_loss, "hinge": hinge_loss}


def check_dpo_settings(beta: float, loss: str) -> None:
    """One line for a bad --beta / --loss, before any slow work."""
    if loss not in LOSS_FUNCTIONS:
        raise LoraLabError(f"--loss {loss!r}: choose one of {', '.join(LOSSES)}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise LoraLabError(f"--beta {beta!r}: use a positive number (0.1 is the usual value)")


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float, loss: str = "sigmoid",
                    chosen_tokens: Optional[torch.Tensor] = None,
                    rejected_tokens: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Per-pair losses (B,) and the implicit rewards (B,) of the chosen and rejected answers (detached).

    All log-probs are sums over the answer tokens; ipo needs the answers' token counts to use means instead."""
    chosen_ratio = policy_chosen - ref_chosen  # (B,) log pi(y_w)/pi_ref(y_w)
    rejected_ratio = policy_rejected - ref_rejected  # (B,)
    if loss == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise LoraLabError("the ipo loss needs the answers' token counts (chosen_tokens, rejected_tokens)")
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
    else:
        delta = chosen_ratio - rejected_ratio  # (B,)
    return {"losses": LOSS_FUNCTIONS[loss](delta, beta),
            "chosen_rewards": beta * chosen_ratio.detach(), "rejected_rewards": beta * rejected_ratio.detach()}


def pair_metrics(out: dict[str, torch.Tensor], policy_chosen: torch.Tensor,
                 policy_rejected: torch.Tensor) -> dict[str, float]:
    """SUMS over the pairs of a micro-batch of what is logged (METRICS), plus "pairs": divide by it for means, so
    that micro-batches of different sizes average exactly."""
    chosen, rejected = out["chosen_rewards"], out["rejected_rewards"]
    return {"loss": out["losses"].detach().sum().item(),
            "rewards/chosen": chosen.sum().item(), "rewards/rejected": rejected.sum().item(),
            "rewards/accuracies": (chosen > rejected).float().sum().item(),
            "rewards/margins": (chosen - rejected).sum().item(),
            "logps/chosen": policy_chosen.detach().sum().item(),
            "logps/rejected": policy_rejected.detach().sum().item(),
            "pairs": float(len(chosen))}


def add_metrics(total: dict[str, float], part: dict[str, float]) -> dict[str, float]:
    for k, v in part.items():
        total[k] = total.get(k, 0.0) + v
    return total


def mean_metrics(total: dict[str, float]) -> dict[str, float]:
    """The logged means (METRICS) from summed pair_metrics."""
    return {k: total[k] / max(total["pairs"], 1.0) for k in METRICS}


@torch.no_grad()
def reference_logps(model, dataset, batch_size: int, verbose: bool = False) -> torch.Tensor:
    """log pi_ref of every pair's two answers, (N, 2) [chosen, rejected], from `model` as it is now.

    Called once before training, this IS the reference pass (TRL's precompute_ref_log_probs): the model then is
    the starting policy (a fresh LoRA, whose B = 0 adds exactly nothing, or the SFT adapter we continue), so no
    second copy of the weights is kept and no adapter has to be switched off later. Eval mode (no dropout), the
    dataset's order, and no random draw: the global RNG, hence training's dropout masks, stays untouched."""
    from lora_lab.data.preference import collate_pairs

    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    out = torch.empty(len(dataset), 2)  # (N, 2)
    t0, shown = time.perf_counter(), 0.0
    for start in range(0, len(dataset), batch_size):
        if verbose and time.perf_counter() - shown > 30:  # a long pass says where it is
            shown = time.perf_counter()
            print(f"Scoring the reference: {start}/{len(dataset)} pairs ({shown - t0:.0f} s)", file=sys.stderr,
                  flush=True)
        idx = list(range(start, min(start + batch_size, len(dataset))))
        batch = collate_pairs([dataset.pair(i) for i in idx])
        logps, _ = answer_logps(model, batch["input_ids"].to(device), batch["labels"].to(device))  # (2b,)
        out[idx] = torch.stack(logps.float().cpu().chunk(2), dim=1)  # (b, 2)
    model.train(was_training)
    return out
