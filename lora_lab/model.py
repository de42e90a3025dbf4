"""One decoder-only transformer that covers Llama, Mistral, Falcon, Pythia, Phi, Qwen, Gemma, StableLM and SmolLM,
and the 2024-25 families: Qwen3 (and Qwen3-MoE), Gemma 2 / 3, Phi-3 / 4, OLMo 2 and SmolLM3.

The families differ in a handful of switches, all in `Config`:
  - attention: multi-head, grouped-query or multi-query (n_query_groups), RoPE on all or part of each head
    (Llama 3 / linear / LongRoPE frequency scaling), an optional sliding window, bias on q/k/v, RMSNorm on q and k
    (per head: Qwen3, Gemma 3; over the projection: OLMo 2), Gemma 2's score scale and tanh soft-capping;
  - per layer: sliding or global (Gemma 2 alternates, Gemma 3 has 5 : 1 with its own RoPE base for each kind),
    with or without RoPE (SmolLM3 skips it on every 4th layer);
  - block: sequential (x + attn, then + mlp) or parallel residual (x + attn(n1(x)) + mlp(n2(x))), norms before
    each sub-block, after it (before the residual add), or both (Gemma 2 / 3: both, OLMo 2: after only);
  - norms: LayerNorm or RMSNorm (Gemma's scales by 1 + weight);
  - MLP: GELU (fc -> gelu -> proj), SwiGLU (silu(gate) * up -> down) or GeGLU (gelu(gate) * up -> down), or a
    mixture of experts: a router picks each token's top-k SwiGLU experts and mixes their outputs (Qwen3-MoE);
  - embeddings: tied or not, scaled by sqrt(n_embd) (Gemma); output logits soft-capped (Gemma 2).

Shapes: B batch, T sequence length, C n_embd, nh heads, ng key/value heads, hs head size.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from lora_lab.config import Config


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.lm_head_bias)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.rope = RoPE(config)
        # Gemma 3's sliding layers rotate with a base of their own (and no scaling)
        self.rope_local = RoPE(config, local=True) if config.rope_local_base is not None else None
        self.uniform_layers = config.uniform_layers  # False: each layer gets its own (cos, sin, mask), see forward
        # recompute each block's activations in the backward pass instead of storing them (less memory, ~30% slower)
        self.activation_checkpointing = False
        # mixture of experts: the training loss adds coef * load_balancing_loss (Switch Transformer's auxiliary loss,
        # as transformers adds router_aux_loss_coef * aux_loss) so that the router keeps every expert in use;
        # finetune/full.py's --router_aux_loss_coef sets it; 0 (the default) leaves the loss as it is
        self.router_aux_loss_coef = 0.0

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Union[str, Path], device=None, dtype=None) -> "GPT":
        """Build the model described by `checkpoint_dir/model_config.json` and load its weights."""
        from lora_lab.checkpoint import load_checkpoint

        config, state_dict = load_checkpoint(checkpoint_dir)
        with torch.device("meta"):
            model = cls(config)
        model.load_weights(state_dict, source=checkpoint_dir)
        return model.to(device=device, dtype=dtype)

    def load_weights(self, state_dict: dict, source: Union[str, Path] = "state dict", strict: bool = True) -> None:
        """Load weights, assigning the tensors (no copy); say in one line what does not fit."""
        from lora_lab.checkpoint import check_state_dict

        check_state_dict(self, state_dict, source, strict=strict)
        self.load_state_dict(state_dict, strict=False, assign=True)
        if self.config.tie_embeddings:  # assign=True replaced wte.weight: tie again
            self.lm_head.weight = self.wte.weight

    def set_kv_cache(self, batch_size: int, max_seq_length: Optional[int] = None, device=None, dtype=None) -> None:
        """Preallocate a key/value cache in every block for generation; `clear_kv_cache` removes it."""
        max_seq_length = max_seq_length or self.config.block_size
        p = self.wte.weight  # (lm_head may be quantized: its weight dtype is not the activations')
        for block in self.blocks:
            block.attn.kv_cache = KVCache(self.config, batch_size, max_seq_length, device or p.device, dtype or p.dtype)

    def clear_kv_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    def forward(self, idx: torch.Tensor, input_pos: Union[int, torch.Tensor, None] = None,
                labels: Optional[torch.Tensor] = None, neftune_alpha: float = 0.0,
                loss_chunk_size: Optional[int] = 1024, segment_ids: Optional[torch.Tensor] = None,
                logits_at: Optional[torch.Tensor] = None, return_hidden: bool = False) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab_size), or with `labels` (B, T) the mean next-token loss.

        input_pos: with a KV cache, the position of idx[:, 0] (0 for the prompt, then one more per new token):
        an int for the whole batch, or a (B,) tensor with one start per row, for rows that are at different points
        of their sequences (a server decoding many requests in one batch). Row b then writes its keys and values
        at positions input_pos[b]... of the cache and reads only the positions before them.
        segment_ids: (B, T), without a KV cache: a new segment starts wherever the id changes along a row; each
        token attends only to earlier tokens of its own segment and positions restart at 0 in each segment.
        Packing several samples into one row (one segment each) and padding on either side (the padding as a
        segment of its own, e.g. segment_ids = an HF-style attention_mask) both come down to this: every sample
        gets exactly the logits it gets alone.
        labels: targets aligned with idx (not shifted), IGNORE_INDEX where nothing is to be learned; the loss
        runs lm_head only where it is needed, in chunks (see next_token_loss).
        neftune_alpha: NEFTune (Jain et al. 2023): in training mode, add uniform noise of size
        alpha / sqrt(T * C) to the embeddings, a regulariser that helps instruction tuning.
        logits_at: a (B, T) bool mask: return only those positions' logits, (n, vocab_size) in row-major order.
        lm_head (49k-256k wide) then runs where it is needed, e.g. on DPO's answer tokens (lora_lab/dpo.py).
        return_hidden: return the final normed hidden states (B, T, C) that lm_head reads (`hidden_states`).
        """
        B, T = idx.shape
        mask = None  # None: each attention layer makes the causal mask it needs (it depends on the KV cache)
        if segment_ids is not None:
            if isinstance(input_pos, torch.Tensor) or input_pos:  # a cache read from an earlier step would not be in the (T, T) mask
                raise ValueError("segment_ids go with a whole sequence (input_pos None or 0), not a KV-cache step")
            positions, mask = segment_positions_and_mask(segment_ids, self.config.window_at(0))
        elif isinstance(input_pos, torch.Tensor):
            positions = input_pos.view(B, 1) + torch.arange(T, device=idx.device)  # (B, T)
        else:
            positions = None
        if positions is not None:
            end = int(positions.max()) + 1
            cos, sin = self.rope.at(positions)  # (B, 1, T, rope_n_elem) each
        else:
            end = (input_pos or 0) + T
            cos, sin = self.rope(input_pos or 0, T, idx.device)  # (T, rope_n_elem) each
        layer_inputs = None  # every layer reads (cos, sin, mask); per layer where layers differ (Gemma 2 / 3, SmolLM3)
        if not self.uniform_layers:
            layer_inputs = self.per_layer_inputs(idx, input_pos, positions, segment_ids, cos, sin, mask)
        if end > self.config.block_size:
            raise ValueError(f"Sequence of {end} tokens is longer than the model's block_size {self.config.block_size}")
        x = self.wte(idx)  # (B, T, C)
        if self.config.scale_embeddings:
            # Gemma rounds the scale to the activation dtype before multiplying; do the same to match it
            x = x * torch.tensor(self.config.n_embd**0.5, dtype=x.dtype)
        if neftune_alpha and self.training:
            x = x + torch.empty_like(x).uniform_(-1, 1) * (neftune_alpha / math.sqrt(T * x.size(-1)))
        for i, block in enumerate(self.blocks):
            if layer_inputs is not None:
                cos, sin, mask = layer_inputs[i]
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, input_pos, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, input_pos, mask)
        x = self.norm_f(x)  # (B, T, C)
        if return_hidden:
            return x
        head = self.lm_head if self.config.final_softcap is None else SoftCapped(self.lm_head, self.config.final_softcap)
        if labels is not None:
            loss = next_token_loss(head, x, labels, loss_chunk_size)
            if self.router_aux_loss_coef and self.training:  # validation losses stay the plain next-token loss
                loss = loss + self.router_aux_loss_coef * load_balancing_loss(self)
            return loss
        if logits_at is not None:
            return head(x[logits_at])  # (n, vocab_size)
        return head(x)  # (B, T, vocab_size)

    def per_layer_inputs(self, idx: torch.Tensor, input_pos, positions: Optional[torch.Tensor],
                         segment_ids: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                         mask: Optional[torch.Tensor]) -> list[tuple]:
        """(cos, sin, mask) for each layer when layers differ: the rotary table of its kind (None, None for a
        layer without RoPE) and, with segment_ids, the mask with or without its sliding window."""
        tables = {"global": (cos, sin), None: (None, None)}
        if self.rope_local is not None:
            if positions is not None:
                tables["local"] = self.rope_local.at(positions)
            else:
                tables["local"] = self.rope_local(input_pos or 0, idx.size(1), idx.device)
        masks = {self.config.window_at(0): mask}
        out = []
        for i in range(self.config.n_layer):
            window = self.config.window_at(i)
            if segment_ids is not None and window not in masks:
                masks[window] = segment_positions_and_mask(segment_ids, window)[1]
            out.append((*tables[self.config.rope_at(i)], masks.get(window)))
        return out

    def hidden_states(self, idx: torch.Tensor, input_pos: Union[int, torch.Tensor, None] = None,
                      segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The final normed hidden states (B, T, C), lm_head not run: what a classifier's head pools, what a
        server's prefill needs at each prompt's last position only (arguments as `forward`)."""
        return self.forward(idx, input_pos=input_pos, segment_ids=segment_ids, return_hidden=True)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head on hidden states from `hidden_states` (..., C) -> (..., vocab_size), soft-capped where the
        model caps its logits (Gemma 2): use this rather than lm_head itself."""
        if self.config.final_softcap is None:
            return self.lm_head(hidden)
        return soft_cap(self.lm_head(hidden), self.config.final_softcap)


class SoftCapped:
    """lm_head followed by Gemma 2's logit soft-capping, cap * tanh(logits / cap): logits stay within +-cap.
    Not an affine map, so next_token_loss takes its generic (recomputing) path for it."""

    def __init__(self, head: nn.Module, cap: float) -> None:
        self.head, self.cap = head, cap

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return soft_cap(self.head(x), self.cap)


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap


IGNORE_INDEX = -100


def _ce_sum(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()  # (n, vocab)
    return F.cross_entropy(logits, targets, reduction="sum")


def next_token_loss(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                    chunk_size: Optional[int] = 1024) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[:, t+1] from hidden[:, t], over the positions that have a target.

    hidden (B, T, C) are the final normed hidden states, labels (B, T) token ids with IGNORE_INDEX where there
    is nothing to learn (prompt, padding). Two savings over `cross_entropy(lm_head(hidden), ...)`:
      - lm_head runs only on positions with a target: with the prompt masked that is often half of them;
      - the logits are computed `chunk_size` rows at a time, so the float32 (n, vocab) logits and their gradient
        are never all in memory (vocab is 49k-256k wide: for 4 x 256 tokens and a 128k vocab that is 0.5 GB each).
        A head that is one affine map x W^T + b computes each chunk's gradient right away (LinearCrossEntropy):
        a plain nn.Linear, or a layer whose `as_linear()` gives its (W, b) (LLaMA-Adapter V2's scaled and biased
        head); any other head (LoRA on lm_head, a quantized head) recomputes its chunks in the backward pass.
    """
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE_INDEX  # (B, T-1)
    n = int(keep.sum())
    if n == 0:
        raise ValueError("a batch has no target tokens (all labels are -100): check the data's masking")
    h = hidden[:, :-1][keep]  # (n, C)
    t = targets[keep]  # (n,)
    chunk_size = chunk_size or n
    if not torch.is_grad_enabled():  # evaluation: nothing to keep for a backward pass
        total = sum(_ce_sum(lm_head, hc, tc) for hc, tc in zip(h.split(chunk_size), t.split(chunk_size)))
    elif (affine := head_as_linear(lm_head)) is not None:
        total = LinearCrossEntropy.apply(h, *affine, t, chunk_size)
    elif n <= chunk_size:
        total = _ce_sum(lm_head, h, t)
    else:
        total = sum(torch.utils.checkpoint.checkpoint(_ce_sum, lm_head, hc, tc, use_reentrant=False)
                    for hc, tc in zip(h.split(chunk_size), t.split(chunk_size)))
    return total / n


def head_as_linear(lm_head: nn.Module) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(W, b) such that lm_head(x) == x W^T + b, or None when the head is not known to be one affine map."""
    if type(lm_head) is nn.Linear:  # exactly: a subclass (e.g. a quantized layer) computes its own weight
        return lm_head.weight, lm_head.bias
    as_linear = getattr(lm_head, "as_linear", None)
    return as_linear() if as_linear is not None else None


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i cross_entropy(hidden_i W^T + b, targets_i), with its gradient computed in the forward, chunk by chunk.

    The gradient of cross-entropy with respect to the logits is softmax(logits) - onehot(target): each chunk's
    logits turn into their own gradient in place and go straight back through the head. So only one chunk of
    logits is ever in memory, and nothing is recomputed: the backward pass just scales the stored gradients by
    the (scalar) gradient of the loss. The head is computed once forward and once backward, as plain autograd
    does, but without log_softmax's and nll_loss's extra (chunk, vocab) tensors.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None  # (n, C)
        grad_w = torch.empty_like(weight) if need_w else None  # (vocab, C)
        grad_b = torch.empty_like(bias) if need_b else None  # (vocab,)
        total = torch.zeros((), device=hidden.device)
        for start in range(0, hidden.size(0), chunk_size):
            h = hidden[start:start + chunk_size]  # (c, C)
            loss, grad_logits = LinearCrossEntropy.chunk(h, weight, bias, targets[start:start + chunk_size],
                                                         need_grad=need_h or need_w or need_b)
            total += loss
            first = start == 0  # the first chunk writes the sums, the others add to them: no zero fill, no temporary
            if need_h:
                torch.mm(grad_logits, weight, out=grad_h[start:start + chunk_size])  # (c, C)
            if need_w:  # (vocab, C); out= forms, which FLOP counters see as the mm / addmm they are
                if first:
                    torch.mm(grad_logits.t(), h, out=grad_w)
                else:
                    torch.addmm(grad_w, grad_logits.t(), h, out=grad_w)
            if need_b:  # (vocab,)
                if first:
                    torch.sum(grad_logits, 0, out=grad_b)
                else:
                    grad_b.add_(grad_logits.sum(0))
            del grad_logits  # free this chunk's (c, vocab) before the next one is made
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return total

    @staticmethod
    def chunk(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], t: torch.Tensor,
              need_grad: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(summed loss of the chunk, its gradient with respect to the logits (c, vocab) or None)."""
        logits = F.linear(h, weight, bias).float()  # (c, vocab)
        target_logit = logits.gather(1, t[:, None])  # (c, 1)
        top = logits.amax(dim=-1, keepdim=True)  # (c, 1) subtracted before exp, so it cannot overflow
        probs = logits.sub_(top).exp_()  # (c, vocab) unnormalised softmax, in place of the logits
        norm = probs.sum(dim=-1, keepdim=True)  # (c, 1)
        loss = (top + norm.log() - target_logit).sum()  # -log softmax(logits)[t] = logsumexp(logits) - logits[t]
        if not need_grad:
            return loss, None
        grad_logits = probs.div_(norm)  # (c, vocab) softmax
        grad_logits[torch.arange(t.size(0), device=t.device), t] -= 1  # minus onehot(t)
        return loss, grad_logits.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        # scaled in place: these gradients were made for this one backward pass and are not read again
        grads = tuple(None if g is None else g.mul_(grad_total.to(g.dtype)) for g in ctx.saved_tensors)
        return *grads, None, None


class Block(nn.Module):
    def __init__(self, config: Config, layer: int = 0) -> None:
        super().__init__()
        # OLMo 2 has no norms before the sub-blocks (only after them): identities keep one forward for all
        self.norm_1 = make_norm(config) if config.pre_norms else nn.Identity()
        self.attn = CausalSelfAttention(config, layer)
        # Falcon-7B and Phi feed the MLP with the attention's norm: they have no second norm
        self.norm_2 = None if config.parallel_residual and config.shared_attention_norm else (
            make_norm(config) if config.pre_norms else nn.Identity())
        self.mlp = MoE(config) if config.moe_at(layer) else make_mlp(config)
        # Gemma 2 / 3 and OLMo 2 norm each sub-block's output before adding it to the residual stream
        self.post_attn_norm = make_norm(config) if config.post_norms else None
        self.post_mlp_norm = make_norm(config) if config.post_norms else None
        self.parallel_residual = config.parallel_residual

    def forward(self, x: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
                input_pos: Union[int, torch.Tensor, None], mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.norm_1(x)
        a = self.attn(h, cos, sin, input_pos, mask)
        if self.parallel_residual:
            return x + a + self.mlp(h if self.norm_2 is None else self.norm_2(x))
        if self.post_attn_norm is not None:
            a = self.post_attn_norm(a)
        x = x + a
        m = self.mlp(self.norm_2(x))
        if self.post_mlp_norm is not None:
            m = self.post_mlp_norm(m)
        return x + m


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config, layer: int = 0) -> None:
        super().__init__()
        hs, nh, ng = config.head_size, config.n_head, config.n_query_groups
        self.q_proj = nn.Linear(config.n_embd, nh * hs, bias=config.attn_qkv_bias)
        self.k_proj = nn.Linear(config.n_embd, ng * hs, bias=config.attn_qkv_bias)
        self.v_proj = nn.Linear(config.n_embd, ng * hs, bias=config.attn_qkv_bias)
        self.o_proj = nn.Linear(nh * hs, config.n_embd, bias=config.bias)
        self.n_head, self.n_query_groups, self.head_size = nh, ng, hs
        self.sliding_window = config.window_at(layer)
        # RMSNorm on queries and keys: over each head's hs dims (Qwen3, Gemma 3) or the whole projection (OLMo 2)
        self.qk_norm = config.qk_norm
        if config.qk_norm is not None:
            q_size, k_size = (hs, hs) if config.qk_norm == "head" else (nh * hs, ng * hs)
            self.q_norm = RMSNorm(q_size, eps=config.norm_eps, unit_offset=config.norm_unit_offset)
            self.k_norm = RMSNorm(k_size, eps=config.norm_eps, unit_offset=config.norm_unit_offset)
        self.scale = None if config.attn_scale_base is None else config.attn_scale_base**-0.5  # None: 1/sqrt(hs)
        self.softcap = config.attn_softcap
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: Union[int, torch.Tensor, None],
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, _ = x.shape
        _, y = self.attend(x, cos, sin, input_pos, mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_size)  # (B, T, nh * hs)
        return self.o_proj(y)

    def attend(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: Union[int, torch.Tensor, None],
               mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The queries (with RoPE) and what they read from the keys and values, per head: (q, y), both
        (B, nh, T, hs). Apart from forward so that LLaMA-Adapter can add its prefix term to y (lora_lab/adapter.py).

        mask: (B, 1, T, T) True = may attend (GPT.forward makes it from segment_ids), or None for the causal mask
        (with the sliding window) of the positions the KV cache holds."""
        B, T, _ = x.shape
        nh, ng, hs = self.n_head, self.n_query_groups, self.head_size
        q, k = self.q_proj(x), self.k_proj(x)  # (B, T, nh * hs), (B, T, ng * hs)
        if self.qk_norm == "all":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(B, T, nh, hs), k.view(B, T, ng, hs)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hs), (B, ng, T, hs)
        v = self.v_proj(x).view(B, T, ng, hs).transpose(1, 2)  # (B, ng, T, hs)
        if cos is not None:  # None: a layer without positions (SmolLM3's NoPE layers)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start = 0 if input_pos is None else input_pos
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(start, k, v)  # (B, ng, S, hs): S = start + T, or the whole cache per row
        if mask is None:
            mask = attention_mask(T, k.size(2), start, self.sliding_window, q.device)
        if self.softcap is not None:
            return q, softcapped_attention(q, k, v, mask, self.scale, self.softcap)
        # grouped-query attention without copying k and v to nh heads: SDPA broadcasts each group itself
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=ng != nh, scale=self.scale)  # (B, nh, T, hs)
        return q, y


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                         scale: Optional[float], cap: float) -> torch.Tensor:
    """Attention with Gemma 2's soft-capped scores, cap * tanh(q k^T * scale / cap), which SDPA cannot do.

    q (B, nh, T, hs), k and v (B, ng, S, hs); mask as for SDPA (True = may attend) or None for the plain causal
    mask (T == S) or none (T == 1). Returns (B, nh, T, hs). The softmax runs in float32, as transformers' does."""
    T, S = q.size(2), k.size(2)
    if k.size(1) != q.size(1):  # grouped-query: each key/value head serves nh / ng query heads
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
        v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    scores = q @ k.transpose(-2, -1) * (q.size(-1) ** -0.5 if scale is None else scale)  # (B, nh, T, S)
    scores = soft_cap(scores, cap)
    if mask is None and T > 1:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def attention_mask(T: int, S: int, start: Union[int, torch.Tensor], window: Optional[int],
                   device) -> Optional[torch.Tensor]:
    """Boolean mask where True = may attend: (T, S), or (B, 1, T, S) when `start` is a (B,) tensor of per-row
    starts; None when SDPA's own is_causal (or no mask) is right.

    Query i sits at position start + i and sees keys 0..start + i (and, with a sliding window, only the last
    `window` of them). SDPA's is_causal aligns the mask top-left, which is right only when T == S. With per-row
    starts the cache's positions after a row's own (stale, or another request's) are masked out too.
    """
    per_row = isinstance(start, torch.Tensor)
    if not per_row and (T == S or T == 1) and (window is None or S <= window):
        return None
    if per_row:
        q_pos = (start.view(-1, 1) + torch.arange(T, device=device))[:, None, :, None]  # (B, 1, T, 1)
    else:
        q_pos = torch.arange(start, start + T, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)  # (S,)
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask  # (T, S) or (B, 1, T, S)


def segment_positions_and_mask(segment_ids: torch.Tensor,
                               window: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (B, T) that restart at 0 in each segment and the mask (B, 1, T, T) that lets each token attend
    only to itself and the earlier tokens of its own segment (within the sliding window, if any).

    A segment is a run of equal ids along a row: [7, 7, 7, 0, 0] (right padding), [0, 0, 1, 1, 1] (left
    padding), [0, 0, 1, 1, 1, 2] (three packed samples). Every token sees at least itself, so no row of the mask
    is empty (SDPA would give NaN for a padding query that may attend to nothing)."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device)  # (T,)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)  # (B, T) True where a segment begins
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    run = starts.cumsum(dim=1)  # (B, T) which run each token is in
    first = torch.cummax(torch.where(starts, idx, 0), dim=1).values  # (B, T) where its run begins
    positions = idx - first  # (B, T)
    mask = (run[:, :, None] == run[:, None, :]) & (idx[:, None] >= idx[None, :])  # (B, T, T)
    if window is not None:
        mask &= idx[None, :] > idx[:, None] - window
    return positions, mask[:, None]  # (B, T), (B, 1, T, T)


class RoPE:
    """Rotary position embedding: pairs (x_i, x_{i + n/2}) of the first n = rope_n_elem dims of each head are
    rotated by angle position * inv_freq_i. The cos/sin table is computed per call, in float32, for the
    positions in use: nothing of size block_size is stored (Llama 3.1's block_size is 131072) and nothing
    needs moving between devices."""

    def __init__(self, config: Config, local: bool = False) -> None:
        n = config.rope_n_elem
        base = config.rope_local_base if local else config.rope_base
        exponents = torch.arange(0, n, 2, dtype=torch.int64, device="cpu").float() / n  # (n/2,)
        inv_freq = 1.0 / (base**exponents)
        scaling = None if local else config.rope_scaling
        kind = None if scaling is None else scaling.get("rope_type", "llama3")
        # LongRoPE (Phi-3 / 4): per-frequency divisors, a "short" set up to original_max_seq_len positions and a
        # "long" set beyond, and cos / sin scaled by attention_factor. As in transformers, a forward pass uses the
        # long set when its last position is past original_max_seq_len.
        self.long_inv_freq, self.long_after, self.attention_factor = None, None, 1.0
        if kind == "llama3":
            inv_freq = llama3_scale(inv_freq, **{k: v for k, v in scaling.items() if k != "rope_type"})
        elif kind == "linear":  # Gemma 3's global layers: positions / factor
            inv_freq = inv_freq / scaling["factor"]
        elif kind == "yarn":  # OLMo 3, Qwen3 long context: interpolate slow frequencies, keep fast ones
            inv_freq = yarn_scale(base, exponents, n, **{k: v for k, v in scaling.items()
                                                         if k not in ("rope_type", "attention_factor")})
            self.attention_factor = scaling["attention_factor"]
        elif kind == "longrope":
            self.long_inv_freq = 1.0 / (torch.tensor(scaling["long_factor"], dtype=torch.float32, device="cpu") * base**exponents)
            inv_freq = 1.0 / (torch.tensor(scaling["short_factor"], dtype=torch.float32, device="cpu") * base**exponents)
            self.long_after, self.attention_factor = scaling["original_max_seq_len"], scaling["attention_factor"]
        elif kind is not None:
            raise ValueError(f"rope_scaling type {kind!r} is not supported (llama3, linear, longrope, yarn)")
        self.inv_freq = inv_freq  # (n/2,)
        self._cache: dict = {}

    def _inv_freq(self, device, end: int) -> torch.Tensor:
        long = self.long_inv_freq is not None and end > self.long_after
        inv_freq = self._cache.get((device, long))
        if inv_freq is None:
            inv_freq = self._cache[(device, long)] = (self.long_inv_freq if long else self.inv_freq).to(device)
        return inv_freq

    def _cos_sin(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.attention_factor != 1.0:
            return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
        return emb.cos(), emb.sin()

    def __call__(self, start: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self._inv_freq(device, start + T)
        pos = torch.arange(start, start + T, device=device, dtype=torch.float32)  # (T,)
        freqs = torch.outer(pos, inv_freq)  # (T, n/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, n)
        return self._cos_sin(emb)

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, 1, T, n) for per-row positions (B, T) (packed samples, padding, per-row KV caches); they
        broadcast over the heads of q and k (B, nh, T, hs)."""
        end = int(positions.max()) + 1 if self.long_inv_freq is not None else 0
        inv_freq = self._inv_freq(positions.device, end)
        freqs = positions.float()[..., None] * inv_freq  # (B, T, n/2): the same products as torch.outer
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, n)
        return self._cos_sin(emb)


def llama3_scale(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                 original_max_seq_len: int) -> torch.Tensor:
    """Llama 3.1's frequency scaling: slow (long-wavelength) frequencies are divided by `factor`, fast ones are
    kept, and the band between is interpolated smoothly."""
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_max_seq_len / low_freq_factor
    high_freq_wavelen = original_max_seq_len / high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_seq_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def yarn_scale(base: float, exponents: torch.Tensor, n: int, factor: float, original_max_seq_len: int,
               beta_fast: float = 32.0, beta_slow: float = 1.0, truncate: bool = True) -> torch.Tensor:
    """YaRN (Peng et al. 2023): frequencies that turn fewer than beta_slow times over the original context are
    divided by `factor` (interpolated), those that turn more than beta_fast times are kept, with a linear ramp
    between (over the dims whose rotation counts fall between). cos / sin are then scaled by attention_factor."""
    def dim_of(rotations: float) -> float:  # the dim whose frequency turns `rotations` times in the original context
        return n * math.log(original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, n - 1)
    if low == high:
        high += 0.001  # (as transformers: no division by zero)
    ramp = ((torch.arange(n // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide it by factor)
    pos_freqs = base**exponents
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hs); cos, sin (T, n) with n <= hs: rotate the first n dims, pass the rest through."""
    n = cos.size(-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if n == x.size(-1):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin
    x_rope, x_pass = x[..., :n], x[..., n:]
    x1, x2 = x_rope.chunk(2, dim=-1)
    return torch.cat((x_rope * cos + torch.cat((-x2, x1), dim=-1) * sin, x_pass), dim=-1)


class KVCache(nn.Module):
    """Keys and values of the positions seen so far, written in place so generation never re-encodes them."""

    def __init__(self, config: Config, batch_size: int, max_seq_length: int, device, dtype) -> None:
        super().__init__()
        shape = (batch_size, config.n_query_groups, max_seq_length, config.head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, start: Union[int, torch.Tensor], k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, ng, T, hs) at positions start.. and return what the queries read: with an int start,
        positions 0..start+T of every row; with a (B,) tensor of per-row starts, the whole cache (the attention
        mask hides each row's positions after its own)."""
        T = k.size(2)
        if isinstance(start, torch.Tensor):
            pos = start.view(-1, 1) + torch.arange(T, device=start.device)  # (B, T)
            if int(pos.max()) >= self.k.size(2):
                raise ValueError(f"KV cache holds {self.k.size(2)} positions, asked to write up to {int(pos.max()) + 1}")
            rows = torch.arange(k.size(0), device=start.device)[:, None]  # (B, 1)
            self.k[rows, :, pos] = k.transpose(1, 2)  # indexed view (B, T, ng, hs)
            self.v[rows, :, pos] = v.transpose(1, 2)
            return self.k, self.v  # (B, ng, max_seq_length, hs)
        end = start + T
        if end > self.k.size(2):
            raise ValueError(f"KV cache holds {self.k.size(2)} positions, asked to write up to {end}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, ng, end, hs)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (Gemma: * (1 + weight), so zeros mean identity)."""

    def __init__(self, size: int, eps: float = 1e-5, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size) if not unit_offset else torch.zeros(size))
        self.eps, self.unit_offset = eps, unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (x * (1 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


def make_norm(config: Config) -> nn.Module:
    if config.norm_class == "RMSNorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps, unit_offset=config.norm_unit_offset)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps)


class GeluMLP(nn.Module):
    """fc -> GELU -> proj (GPT-NeoX, Falcon, Phi)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.approximate))


class GatedMLP(nn.Module):
    """act(gate_proj(x)) * up_proj(x) -> down_proj: SwiGLU (act = SiLU: Llama, Mistral, Qwen, StableLM) or
    GeGLU (act = GELU: Gemma)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.geglu = config.mlp_class == "geglu"
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)  # (B, T, intermediate)
        act = F.gelu(gate, approximate=self.approximate) if self.geglu else F.silu(gate)
        return self.down_proj(act * self.up_proj(x))


def make_mlp(config: Config) -> nn.Module:
    return GeluMLP(config) if config.mlp_class == "gelu" else GatedMLP(config)


class Router(nn.Module):
    """x -> router logits x W^T (N, n_expert). Not an nn.Linear on purpose: NF4 and LoRA adapt nn.Linear layers,
    and the router stays as it is (a few thousand weights that decide where every token goes)."""

    def __init__(self, n_embd: int, n_expert: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_expert, n_embd))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class MoE(nn.Module):
    """Mixture of experts (Qwen3-MoE): a router scores the experts for each token, the token goes to its top k,
    and their outputs are summed weighted by the router's softmax probabilities (renormalised over the chosen k
    with norm_topk_prob):

        p = softmax(x W_router^T)                 (N, E) in float32
        (w, e) = topk(p, k)                       (N, k) weights and expert indices
        y = sum_j w_j · expert_{e_j}(x)           each expert a SwiGLU MLP of moe_intermediate_size

    Each expert is a GatedMLP of its own (`experts.{e}.gate_proj` ...), so LoRA (the "experts" target) and NF4
    reach every expert's projections as they reach any linear layer. The router's logits of the last forward
    are kept (`router_logits`) for the load-balancing loss (`load_balancing_loss`)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.router = Router(config.n_embd, config.n_expert)
        expert_config = replace(config, intermediate_size=config.moe_intermediate_size, mlp_class="swiglu", bias=False)
        self.experts = nn.ModuleList(GatedMLP(expert_config) for _ in range(config.n_expert))
        self.top_k, self.norm_topk_prob = config.n_expert_per_token, config.norm_topk_prob
        self.router_logits: Optional[torch.Tensor] = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C) -> router logits (N, E), the top-k weights (N, k) in x's dtype and expert indices (N, k)."""
        logits = self.router(x)  # (N, E)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # (N, k) each
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(x.dtype), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, C)
        logits, weights, chosen = self.route(x)
        self.router_logits = logits
        out = torch.zeros_like(x)  # (N, C)
        # loop over the experts that got tokens: each runs once on all of its tokens
        for e in chosen.unique().tolist():
            token, slot = torch.where(chosen == e)  # which tokens chose e, and as their slot-th choice
            y = self.experts[e](x[token]) * weights[token, slot, None]  # (n_e, C)
            out.index_add_(0, token, y.to(out.dtype))
        return out.view(shape)


def load_balancing_loss(model: nn.Module) -> torch.Tensor:
    """Switch Transformer's auxiliary loss over the MoE layers of the last forward pass (as transformers'
    load_balancing_loss_func): E * sum_e f_e * P_e, with f_e the share of (token, choice) slots routed to expert
    e and P_e its mean router probability, both over all tokens of all MoE layers. It is 1 when the load is
    even, larger when it is not; full fine-tuning adds coef * this to the loss (Qwen3-MoE: coef 0.001) so that
    the router keeps using every expert. Every token of the batch counts (padding too, as in transformers
    without an attention mask)."""
    layers = [m for m in model.modules() if isinstance(m, MoE) and m.router_logits is not None]
    if not layers:
        raise ValueError("no MoE layer has router logits: run a forward pass of a mixture-of-experts model first")
    logits = torch.cat([m.router_logits for m in layers])  # (layers * N, E)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    E, k = logits.size(-1), layers[0].top_k
    _, chosen = torch.topk(probs, k, dim=-1)  # (layers * N, k)
    routed = F.one_hot(chosen, E).float().mean(dim=0)  # (k, E): share of tokens whose j-th choice is e
    return E * (routed * probs.mean(dim=0)).sum()
