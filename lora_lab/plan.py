"""Will it fit? The memory of a fine-tuning run, per device, before renting the GPU.

    python -m lora_lab.plan --model Mistral-7B-v0.1 --method qlora --lora_r 64 \
        --micro_batch_size 2 --max_seq_length 2048 --gpu RTX4090

--model is a name of lora_lab.config (e.g. Meta-Llama-3.1-8B) or a lora_lab checkpoint folder; `finetune/*.py
... --plan` prints the same table for its own arguments and exits.

What each row is, per device (the memory of one training step at steady state):
  - weights: every parameter and buffer of the model with the method applied, built on the meta device from the
    real Config (no memory, no weights read), so the bytes are exact: NF4 4-bit codes, their absmax and double-
    quantization state, and the 16/32-bit rest (embeddings, norms, lm_head). Under --strategy fsdp each device
    holds 1/N of them (lora_lab/distributed.py shards every parameter, the NF4 codes included), plus what is
    all-gathered whole ("fsdp gather"): the root unit (final norm, head, and a tied embedding: FSDP2 keeps the
    root whole from its forward to its backward; an untied embedding is a unit of its own, whole only for its
    lookup), and around the block being computed (whole), the next one prefetched: its
    all-gather output buffer, the copy of it into the block's whole parameters, and the all-gather input (one
    shard): 3 + 1/N blocks. Measured on this CPU (gloo, 2 processes; tests/test_plan.py) within a few %.
  - gradients: of the trainable parameters only (frozen ones have none; FSDP units keep them apart), held across
    the micro-batches of a step while they accumulate; DDP keeps a second copy in its all-reduce buckets.
  - optimizer state: AdamW's two moments, in the parameters' dtype.
  - activations: what the blocks save for the backward pass. Not a formula: the model's own forward runs on the
    meta device at the planned shape under torch.autograd.graph.saved_tensors_hooks and every saved tensor is
    counted once (views share storage; weights are already counted). Attention counts as the fused kernels
    (CPU and CUDA flash / memory-efficient) save it: q, k, v, output and the log-sum-exp, no (T, T) matrix.
    With --activation_checkpointing each block keeps only its input, and one block is recomputed at a time.
    Every token is assumed to be a target (the worst case; a masked prompt saves a little in the loss).
  - transient: the larger of two moments. The loss: lora_lab/model.py's fused loss keeps the gradient of the
    hidden states (n x C) and, for one chunk of at most 1024 rows, the float32 logits turned into their gradient
    (chunk x vocab), never the (B, T, vocab) logits. A block's backward pass: the gradients of its MLP's
    (B, T, intermediate) tensors and of x, plus (with activation checkpointing) the recomputed block.
  - framework reserve: on a GPU the CUDA context, cuBLAS workspaces and the caching allocator's slack (1 GiB +
    5 % of the tensors: torch.cuda.max_memory_allocated does not see it, nvidia-smi does); 0 on the CPU.

tests/test_plan.py checks the weights + activations + loss against the peak memory measured on this CPU (float32,
several shapes and methods, within 10 %); tutorials/multi_gpu.md compares it with published GPU figures.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_lab.adapter import inject_adapter, mark_only_adapter_trainable
from lora_lab.args import flatten
from lora_lab.classifier import add_classification_head
from lora_lab.config import Config, name_to_config
from lora_lab.flops import PEAK_FLOPS, training_flops
from lora_lab.lora import inject_lora, mark_only_lora_trainable, normalize_targets
from lora_lab.model import GPT
from lora_lab.nf4 import quantize_nf4
from lora_lab.utils import LoraLabError, cli

GiB = 2**30
# usable memory as the driver reports it (MiB), and the name lora_lab.flops.PEAK_FLOPS knows the card by
GPUS: dict[str, tuple[int, str]] = {
    "RTX4090": (24564, "RTX 4090"),
    "A100-40GB": (40960, "A100"),
    "A100-80GB": (81920, "A100"),
    "H100-80GB": (81559, "H100"),
    "L4": (23034, "L4"),
    "T4": (15360, "T4"),
}
METHODS = ("lora", "qlora", "full", "adapter")
CLASSIFIER_METHODS = ("head", "blocks", "lora", "qlora", "full")  # finetune/classify.py's that train (--num_labels)
LOSS_CHUNK = 1024  # GPT.forward's loss_chunk_size
GPU_RESERVE_FIXED, GPU_RESERVE_SHARE = 1 * GiB, 0.05


@dataclass
class Plan:
    """The planned bytes per device, row by row (`rows`), and what they add up to."""

    title: str
    rows: dict[str, int]
    trainable: int
    total_params: int
    micro_batch_size: int
    max_seq_length: int
    devices: int
    gpu: Optional[str] = None
    flops_per_token: float = 0.0
    at: Optional[Callable[[int], "Plan"]] = None  # the same plan at another micro batch size

    @property
    def total(self) -> int:
        return sum(self.rows.values())


def param_dtype(precision: str) -> torch.dtype:
    """The dtype the weights are kept in: *-true casts them, 32-true and *-mixed keep float32."""
    return {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision, torch.float32)


def compute_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") \
        else torch.float32


def resolve_config(model: Union[str, Path]) -> tuple[Config, str]:
    """A Config from a lora_lab checkpoint folder or a known model name."""
    path = Path(model)
    if path.is_dir():
        from lora_lab.checkpoint import load_config

        return load_config(path), path.name
    # a name, or a checkpoint folder not downloaded yet whose last part is a name (checkpoints/ORG/NAME)
    known = {k.lower(): k for k in name_to_config}
    for candidate in (str(model), path.name):
        if candidate.lower() in known:
            return Config.from_name(known[candidate.lower()]), known[candidate.lower()]
    raise LoraLabError(f"--model {model}: neither a lora_lab checkpoint folder nor a known model name "
                       f"(python -c 'from lora_lab.config import name_to_config; print(*name_to_config)')")


def build_meta_model(config: Config, method: str, precision: str = "32-true", lora_r: int = 8,
                     lora_alpha: float = 16.0, lora_dropout: float = 0.05, lora_targets=("query", "value"),
                     nf4_blocksize: int = 64, double_quant: bool = True, adapter_prompt_length: int = 10,
                     adapter_start_layer: int = 2, adapter_version: int = 1, num_labels: Optional[int] = None,
                     trainable_blocks: int = 2) -> GPT:
    """The model the script would train, with the method applied, on the meta device: shapes, dtypes and which
    parameters train, and no memory. num_labels: a classifier (finetune/classify.py), whose lm_head is a trained
    Linear(n_embd, num_labels); its methods head and blocks (the last trainable_blocks) too."""
    methods = METHODS if num_labels is None else CLASSIFIER_METHODS
    if method not in methods:
        hint = (" (head and blocks are a classifier's: add --num_labels K)" if method in CLASSIFIER_METHODS
                else " (a classifier's methods)" if num_labels is not None else "")
        raise LoraLabError(f"--method {method!r}: use one of {', '.join(methods)}{hint}")
    with torch.device("meta"):
        model = GPT(config)
        if num_labels is not None:
            add_classification_head(model, num_labels)  # lm_head -> score (n_embd -> num_labels), as classify.py
    model.to(param_dtype(precision))
    if method == "qlora":
        quantize_nf4(model, blocksize=nf4_blocksize, double_quant=double_quant)  # meta: empty 4-bit shells
    if method in ("lora", "qlora"):
        targets = normalize_targets(lora_targets.split(",") if isinstance(lora_targets, str) else lora_targets)
        inject_lora(model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=targets)
        mark_only_lora_trainable(model)
    elif method == "adapter":
        inject_adapter(model, adapter_prompt_length, adapter_start_layer, version=adapter_version)
        mark_only_adapter_trainable(model)
    if num_labels is not None and method != "full":  # what classify.py trains besides LoRA: the head (+ blocks)
        if method in ("head", "blocks"):
            model.requires_grad_(False)
        trained = [*model.blocks[-trainable_blocks:], model.norm_f] if method == "blocks" else []
        for module in [*trained, model.lm_head]:
            module.requires_grad_(True)
    return model


def tensor_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's parameters and buffers by kind: nf4 codes, nf4 statistics, float weights."""
    out = {"nf4": 0, "nf4_stats": 0, "float": 0}
    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        n = t.numel() * t.element_size()
        module = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        leaf = name.rpartition(".")[2]
        if getattr(module, "quant_type", None) == "nf4" and leaf.startswith("weight"):
            out["nf4" if leaf == "weight" else "nf4_stats"] += n
        else:
            out["float"] += n
    return out


class _FlashLikeAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention while tracing on meta (whose kernel is the math one, which
    keeps the (T, T) probabilities): saves what the fused kernels save, q, k, v, the output and the float32
    log-sum-exp per query."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)  # (B, nh, T, hs)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)  # (B, nh, T)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the trace has no backward pass
        raise NotImplementedError


@contextmanager
def _fused_attention():
    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return _FlashLikeAttention.apply(q, k, v)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def saved_activation_bytes(model: GPT, batch: int, seq_len: int, dtype: torch.dtype) -> tuple[int, list[int], int]:
    """Trace the forward pass (embeddings, blocks, final norm) on meta and count the bytes autograd keeps for
    the backward pass: (outside the blocks, [per block], one block's input)."""
    weights = {t.untyped_storage()._cdata for t in list(model.parameters()) + list(model.buffers())}
    seen: set = set()
    total = [0]

    def pack(t: torch.Tensor):
        key = t.untyped_storage()._cdata
        if key not in seen and key not in weights:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    was_training = model.training
    model.train()
    idx = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    per_block = []
    with _fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x = model.wte(idx).to(dtype)  # (B, T, C)
        cos, sin = model.rope(0, seq_len, "meta")
        outside = total[0]
        for block in model.blocks:
            before = total[0]
            x = block(x, cos, sin, None, None)
            per_block.append(total[0] - before)
        before = total[0]
        model.norm_f(x)
        outside += total[0] - before
    model.train(was_training)
    return outside, per_block, batch * seq_len * model.config.n_embd * dtype.itemsize


def loss_bytes(model: GPT, n_targets: int, dtype: torch.dtype) -> int:
    """The fused loss's memory at its peak: the hidden states' gradient (n, C), one chunk's float32 logits /
    gradient (chunk, vocab) plus its copy in the head's dtype, and the head's own gradient buffer if it trains.
    (A classifier's head has num_labels outputs in place of the vocabulary.)"""
    head = model.lm_head
    vocab, C = head.out_features, model.config.n_embd
    chunk = min(LOSS_CHUNK, n_targets)
    head_dtype = head.weight.dtype if head.weight.is_floating_point() else dtype
    total = 2 * n_targets * C * dtype.itemsize  # the selected hidden rows (n, C) and their gradient
    total += chunk * vocab * (4 + (head_dtype.itemsize if head_dtype != torch.float32 else 0))
    if head.weight.requires_grad:
        total += head.weight.numel() * head.weight.element_size()
    return total


def plan_memory(model: Union[str, Path, Config], method: str, micro_batch_size: int, max_seq_length: int,
                devices: int = 1, strategy: str = "auto", precision: str = "bf16-true",
                activation_checkpointing: bool = False, gpu: Optional[str] = None, lora_r: int = 8,
                lora_alpha: float = 16.0, lora_dropout: float = 0.05, lora_targets=("query", "value"),
                nf4_blocksize: int = 64, double_quant: bool = True, adapter_prompt_length: int = 10,
                adapter_start_layer: int = 2, adapter_version: int = 1, num_labels: Optional[int] = None,
                trainable_blocks: int = 2) -> Plan:
    """The per-device plan of a training run (see the module docstring for each row); num_labels: of a classifier
    (finetune/classify.py), with its methods head and blocks besides lora, qlora and full."""
    if gpu is not None and gpu not in GPUS:
        raise LoraLabError(f"--gpu {gpu!r}: use one of {', '.join(GPUS)}")
    if strategy not in ("auto", "ddp", "fsdp"):
        raise LoraLabError(f"--strategy {strategy!r}: use auto, ddp or fsdp")
    for name, value in (("micro_batch_size", micro_batch_size), ("max_seq_length", max_seq_length),
                        ("devices", devices), ("num_labels", num_labels or 2), ("trainable_blocks", trainable_blocks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LoraLabError(f"--{name} {value!r}: use a whole number >= 1")
    if isinstance(model, Config):
        config, label = model, model.name
    else:
        config, label = resolve_config(model)
    if max_seq_length > config.block_size:
        raise LoraLabError(f"--max_seq_length {max_seq_length} is longer than {label}'s block_size "
                           f"{config.block_size}")
    gpt = build_meta_model(config, method, precision, lora_r, lora_alpha, lora_dropout, lora_targets,
                           nf4_blocksize, double_quant, adapter_prompt_length, adapter_start_layer, adapter_version,
                           num_labels, trainable_blocks)
    act = compute_dtype(precision)
    sharded = strategy == "fsdp" and devices > 1
    shard = devices if sharded else 1
    kinds = tensor_bytes(gpt)
    params = list(gpt.parameters())
    trainable = [p for p in params if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    train_bytes = sum(p.numel() * p.element_size() for p in trainable)
    n_total = sum(p.numel() for p in params)

    fixed: dict[str, int] = {}
    if kinds["nf4"]:
        fixed["weights: NF4 4-bit codes"] = kinds["nf4"] // shard
        fixed["weights: NF4 absmax (+ double quant)"] = kinds["nf4_stats"] // shard
    fixed[f"weights: {str(param_dtype(precision)).removeprefix('torch.')}"] = kinds["float"] // shard
    if precision.endswith("-mixed"):  # autocast keeps a 16-bit copy of each weight it casts for a matmul
        fixed["autocast 16-bit weight copies"] = train_bytes // 2 // shard
    if sharded:
        def nbytes(tensors) -> int:
            return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())

        elsewhere = {id(t) for b in gpt.blocks for t in [*b.parameters(), *b.buffers()]}
        if getattr(gpt.lm_head, "weight", None) is not gpt.wte.weight:  # an untied embedding: a unit of its own
            elsewhere.add(id(gpt.wte.weight))
        fixed["fsdp gather: root unit (head, norm), whole all step"] = nbytes(
            t for t in [*gpt.parameters(), *gpt.buffers()] if id(t) not in elsewhere)
        block_bytes = max(nbytes([*b.parameters(), *b.buffers()]) for b in gpt.blocks)
        fixed["fsdp gather: blocks (current + next: buffer, copy)"] = int((3 + 1 / devices) * block_bytes)
    fixed["gradients (trainable only)"] = train_bytes // shard
    if strategy == "ddp" and devices > 1:
        fixed["ddp gradient buckets"] = train_bytes
    fixed["optimizer state (AdamW: 2 moments)"] = 2 * train_bytes // shard

    def saved_at(batch: int) -> tuple[int, int]:
        """(kept through the forward pass, recomputed one block at a time in the backward pass)"""
        outside, per_block, block_input = saved_activation_bytes(gpt, batch, max_seq_length, act)
        if activation_checkpointing:  # each block keeps its input; one block's activations exist at a time
            return outside + len(per_block) * block_input, max(per_block)
        return outside + sum(per_block), 0

    # what the blocks save grows linearly with the micro batch: two traces give it for every size
    (saved1, block1), (saved2, block2) = saved_at(1), saved_at(2)
    what = {"lora": f"LoRA r={lora_r}", "qlora": f"QLoRA r={lora_r}", "full": "full fine-tuning",
            "adapter": f"LLaMA-Adapter v{adapter_version}", "head": "head only",
            "blocks": f"the last {trainable_blocks} block{'s' if trainable_blocks != 1 else ''}"}[method]
    if num_labels is not None:
        what = f"classifier ({num_labels} labels), {what}"
    flops = training_flops(gpt).per_token_at(max_seq_length)
    n_total += sum(m.in_features * m.out_features for m in gpt.modules() if getattr(m, "quant_type", None) == "nf4")

    def at(batch: int) -> Plan:
        rows = dict(fixed)
        rows["activations (saved for backward)"] = saved1 + (batch - 1) * (saved2 - saved1)
        # the peak is at the loss or in a block's backward pass (the loss is done and freed by then): the larger.
        # A block's backward holds the gradients of its MLP's (B, T, intermediate) tensors and of x (B, T, C),
        # and, under activation checkpointing, the activations of the one block being recomputed
        loss = loss_bytes(gpt, batch * (max_seq_length - 1), act)
        grads = batch * max_seq_length * (3 * config.intermediate_size + 2 * config.n_embd) * act.itemsize
        recomputed = block1 + (batch - 1) * (block2 - block1)
        rows["transient: loss chunk, or a block's backward"] = max(loss, grads + recomputed)
        if gpu is not None:
            rows["framework reserve (CUDA context, allocator)"] = int(GPU_RESERVE_FIXED + GPU_RESERVE_SHARE * sum(
                rows.values()))
        title = (f"{label}: {what}, {precision}, micro batch {batch} x {max_seq_length} tokens, "
                 f"{devices} device{'s' if devices > 1 else ''} ({strategy if devices > 1 else 'one process'}"
                 f"{', activation checkpointing' if activation_checkpointing else ''})")
        return Plan(title, rows, n_train, n_total, batch, max_seq_length, devices, gpu, flops, at)

    return at(micro_batch_size)


def largest_micro_batch(plan: Plan) -> int:
    """The largest micro batch whose plan fits the card (0 if not even 1)."""
    plan_at = plan.at
    budget = GPUS[plan.gpu][0] * 2**20
    if plan_at(1).total > budget:
        return 0
    low, high = 1, 2
    while plan_at(high).total <= budget and high < 4096:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if plan_at(mid).total <= budget else (low, mid)
    return low


def format_plan(plan: Plan, largest: Optional[int] = None, mfu: float = 0.4) -> str:
    width = max(len(k) for k in plan.rows) + 2
    lines = [plan.title, f"trainable parameters {plan.trainable:,} of {plan.total_params:,} "
                         f"({100 * plan.trainable / plan.total_params:.2f}%)",
             f"{'per device':<{width}}{'GiB':>9}"]
    lines += [f"{k:<{width}}{v / GiB:>9.2f}" for k, v in plan.rows.items()]
    lines.append(f"{'total':<{width}}{plan.total / GiB:>9.2f}")
    if plan.gpu is not None:
        mib, name = GPUS[plan.gpu]
        fits = plan.total <= mib * 2**20
        lines.append(f"{plan.gpu} ({mib / 1024:.1f} GiB): {'fits' if fits else 'does NOT fit'}"
                     + (f"; largest micro batch that fits: {largest}" if largest is not None else ""))
        peaks = PEAK_FLOPS[name]
        peak = peaks.get("bf16", peaks["fp16"])
        tps = mfu * peak / plan.flops_per_token
        lines.append(f"at {mfu:.0%} MFU ({peak / 1e12:.0f} TFLOP/s 16-bit peak, {plan.flops_per_token / 1e9:.2f} "
                     f"GFLOP per token): ~{tps:,.0f} tokens/s per device, {tps * plan.devices:,.0f} in all")
    return "\n".join(lines)


def plan(model: str, method: Literal["lora", "qlora", "full", "adapter", "head", "blocks"] = "lora", micro_batch_size: int = 1,
         max_seq_length: int = 2048, devices: int = 1, strategy: Literal["auto", "ddp", "fsdp"] = "auto",
         precision: str = "bf16-true", activation_checkpointing: bool = False, gpu: Optional[str] = None,
         lora_r: int = 8, lora_alpha: float = 16.0, lora_dropout: float = 0.05,
         lora_targets: Union[tuple[str, ...], str] = ("query", "value"), nf4_blocksize: int = 64,
         double_quant: bool = True, adapter_prompt_length: int = 10, adapter_start_layer: int = 2,
         adapter_version: int = 1, num_labels: Optional[int] = None, trainable_blocks: int = 2,
         mfu: float = 0.4) -> Plan:
    """Print the per-device memory of a fine-tuning run, whether it fits --gpu, and the throughput at --mfu.

    Args:
        model: a model name (lora_lab.config, e.g. Mistral-7B-v0.1) or a lora_lab checkpoint folder.
        method: lora, qlora, full or adapter (and a classifier's head or blocks, with --num_labels).
        micro_batch_size: samples per forward/backward pass on one device.
        max_seq_length: tokens per sample (planned at full length: the worst case).
        devices: devices in all (data parallel; with --strategy fsdp the weights are sharded over them).
        strategy: auto (one device), ddp or fsdp.
        precision: bf16-true, bf16-mixed, 16-mixed, 32-true.
        activation_checkpointing: recompute each block's activations in the backward pass.
        gpu: the card to check against: RTX4090, A100-40GB, A100-80GB, H100-80GB, L4, T4.
        lora_r: LoRA rank. lora_alpha, lora_dropout, lora_targets: as in finetune/lora.py.
        nf4_blocksize: QLoRA: weights per absmax. double_quant: QLoRA: quantize the absmax too.
        adapter_prompt_length, adapter_start_layer, adapter_version: as in finetune/adapter.py.
        num_labels: plan a classifier of this many labels (finetune/classify.py: lm_head becomes a Linear(n_embd,
            num_labels) that trains); --method then also head or blocks. trainable_blocks: --method blocks's.
        mfu: the model FLOPs utilisation the tokens/s figure assumes (0.4: a well-fed GPU; each run prints its own).
    """
    result = plan_memory(model, method, micro_batch_size, max_seq_length, devices=devices, strategy=strategy,
                         precision=precision, activation_checkpointing=activation_checkpointing, gpu=gpu,
                         lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=lora_targets,
                         nf4_blocksize=nf4_blocksize, double_quant=double_quant,
                         adapter_prompt_length=adapter_prompt_length, adapter_start_layer=adapter_start_layer,
                         adapter_version=adapter_version, num_labels=num_labels, trainable_blocks=trainable_blocks)
    largest = None
    if gpu is not None:
        largest = largest_micro_batch(result)
    print(format_plan(result, largest, mfu))
    return result


def plan_script(args: dict, script_file: str) -> None:
    """`finetune/*.py --plan`: the plan of the script's own arguments (its locals()), printed; nothing trains."""
    script = Path(script_file).stem  # lora, qlora, full, adapter, classify, dpo
    args = flatten(args)  # grouped arguments (lora: LoRAArgs, ...) under their flat names (lora_r, ...)

    def get(name, default):
        return default if args.get(name) is None else args[name]

    method, batch, num_labels = script, get("micro_batch_size", 1), None
    if script == "dpo":  # LoRA on the policy; chosen and rejected answers go through the model together
        method, batch = "lora", 2 * batch
    elif script == "classify":
        method = get("method", "head")
        if method not in CLASSIFIER_METHODS:
            raise LoraLabError(f"--plan covers classify's {', '.join(CLASSIFIER_METHODS)} methods, not --method "
                               f"{method} (it trains nothing: its memory is one forward pass)")
        labels = args.get("labels")  # the classes, when given; else planned as two (the head is tiny either way)
        num_labels = len(labels.split(",") if isinstance(labels, str) else labels) if labels else 2
    precision = get("precision", "bf16-true" if torch.cuda.is_available() else "32-true")
    plan(str(get("checkpoint_dir", "")), method, batch, get("max_seq_length", 2048),
         devices=get("devices", 1) * get("num_nodes", 1), strategy=get("strategy", "auto"), precision=precision,
         activation_checkpointing=bool(get("activation_checkpointing", False)), lora_r=get("lora_r", 8),
         lora_alpha=get("lora_alpha", 16.0), lora_dropout=get("lora_dropout", 0.0),
         lora_targets=get("lora_targets", ("query", "value")), nf4_blocksize=get("nf4_blocksize", 64),
         double_quant=get("double_quant", True), adapter_prompt_length=get("adapter_prompt_length", 10),
         adapter_start_layer=get("adapter_start_layer", 2), adapter_version=get("adapter_version", 1),
         num_labels=num_labels, trainable_blocks=get("trainable_blocks", 2))


if __name__ == "__main__":
    cli(plan)
