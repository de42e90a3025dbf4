"""Training on several processes: Fabric's strategy, FSDP2 units with trainable and frozen parameters apart, and
sharded resume states.

    fabric = make_fabric(devices, num_nodes, strategy, precision)   # the one line in finetune/*.py

--strategy auto / ddp are Fabric's own. --strategy fsdp is Lightning Fabric's ModelParallelStrategy (FSDP2: torch's
`fully_shard`, as LitGPT uses since its PR #2086) with `shard_model` below as its parallelize function, on the
GPUs, or on the CPU with the gloo backend (Fabric's FSDPStrategy, FSDP1, refuses the CPU; FSDP2 does not). All the
communication is torch's and Fabric's: the all-gathers and reduce-scatters of fully_shard, Fabric's all_reduce,
torch.distributed.checkpoint for the shards.

How the model is cut (shard_model):
  - every transformer block is its own unit, and so is the rest (final norm, head) at the root; an embedding not
    tied to the head is a unit of its own too: FSDP2 keeps the root whole from its forward to its backward, while
    the embedding is whole only while it looks the tokens up (a 128k x 4096 vocabulary: 1 GiB in bf16 that each
    device then does not hold all step). A tied embedding is the head's weight and stays at the root;
  - inside a unit, trainable and frozen parameters never share one: a block with LoRA becomes a frozen unit (its
    norms and base weights) and a trainable unit (the LoRA matrices of its layers), so the gradients, their
    reduce-scatter and the optimizer state are those of the trainable parameters only (LitGPT #1417: one FSDP1
    flat parameter mixing both kept 1.45 B gradient elements for 106 K trainable ones);
  - a QLoRA base is sharded too (what LitGPT refuses): the packed uint8 NF4 codes and their absmax / double-quant
    scales become frozen parameters (same state dict names), so each rank holds 1/N of the 4-bit base; the unit's
    all-gather brings the whole layer's codes back for its forward and backward, where the NF4 layer
    dequantizes them as on one device. The 16 levels and the 256 nested codes (tables) stay small buffers.

Each rank then trains on its own micro-batches (lora_lab/training.py's micro_batches splits the global stream), the
losses and validation are averaged over ranks, rank 0 writes the logs and the files users consume.

Saving: `gathered(model)` all-gathers the trainable (or all) units for the length of a `with`, so save_lora /
save_adapter / save_checkpoint write the ordinary single-file adapter or model, byte for byte what one process
writes. The resume state is sharded: `save_sharded_state` has every rank write its shard of the trainable
parameters and of the optimizer state (torch.distributed.checkpoint) into a temporary folder that replaces the old
one only once every rank has finished, and `load_sharded_state` reads them back (same world size: every rank gets
its own shard back).
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from lora_lab.utils import LoraLabError

SHARDS_DIR = "train_state.shards"  # next to TRAIN_STATE_FILE: each rank's shard of the trainable state
NF4_SHARDED = ("weight", "weight_absmax", "weight_nested_absmax")  # per-weight tensors: sharded with the layer


def make_fabric(devices: int = 1, num_nodes: int = 1, strategy: str = "auto", precision: str = "32-true"):
    """Lightning Fabric for the scripts: auto and ddp as Fabric has them; fsdp: FSDP2 units (shard_model) on
    Fabric's ModelParallelStrategy, on the GPUs (NCCL) or the CPU (gloo)."""
    import lightning as L

    if strategy != "fsdp":
        return L.Fabric(devices=devices, num_nodes=num_nodes, strategy=strategy, precision=precision)
    from lightning.fabric.strategies import ModelParallelStrategy

    mixed = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
    if precision not in ("32-true", "bf16-true", "16-true", *mixed):
        raise LoraLabError(f"--strategy fsdp with --precision {precision}: use 32-true, bf16-true or bf16-mixed")
    policy = None
    if precision in mixed:  # FSDP2's own mixed precision: float32 shards, 16-bit all-gathered weights
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=mixed[precision], reduce_dtype=torch.float32)
        precision = "32-true"
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    fsdp = ModelParallelStrategy(parallelize_fn=partial(shard_model, mp_policy=policy),
                                 data_parallel_size=devices * num_nodes, tensor_parallel_size=1)
    return L.Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=fsdp,
                    precision=precision)


def is_sharded(model: nn.Module) -> bool:
    """True for a model (or the module Fabric wrapped) cut into FSDP2 units."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def nf4_as_parameters(model: nn.Module) -> None:
    """Turn every NF4 layer's packed codes and absmax scales from buffers into frozen Parameters (same names, same
    tensors), so that fully_shard shards them; the tiny tables stay buffers."""
    for module in model.modules():
        if getattr(module, "quant_type", None) != "nf4":
            continue
        for name in NF4_SHARDED:
            tensor = module._buffers.pop(name, None)
            if tensor is not None:
                module.register_parameter(name, nn.Parameter(tensor, requires_grad=False))


def _own_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of `module` that no FSDP unit below it holds already (each once)."""
    from torch.distributed.fsdp import FSDPModule

    found, seen = [], set()

    def visit(m: nn.Module) -> None:
        if m is not module and isinstance(m, FSDPModule):
            return
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                found.append(p)
        for child in m.children():
            visit(child)

    visit(module)
    return found


def shard_unit(module: nn.Module, mesh, mp_policy=None) -> None:
    """fully_shard `module` as one unit, or, when it holds trainable and frozen parameters, as two: the frozen
    unit on `module`, the trainable one on the submodules that own trainable parameters (e.g. the LoRA layers)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    kwargs = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
    params = _own_parameters(module)
    trainable = {p for p in params if p.requires_grad}
    frozen = {p for p in params if not p.requires_grad}
    if not trainable or not frozen:
        fully_shard(module, **kwargs)
        return
    fully_shard(module, **kwargs, ignored_params=trainable)  # the frozen unit: all-gathered, never reduced
    owners = []

    def visit(m: nn.Module) -> None:
        if m is not module and isinstance(m, FSDPModule) and m not in owners:
            return
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            owners.append(m)
        for child in m.children():
            visit(child)

    visit(module)
    owner_frozen = {p for m in owners for p in m.parameters() if not p.requires_grad}
    fully_shard(owners, **kwargs, ignored_params=owner_frozen)  # the trainable unit


def shard_model(model: nn.Module, device_mesh, mp_policy=None) -> nn.Module:
    """Fabric's parallelize_fn: NF4 codes made shardable, every block a unit (trainable and frozen parameters in
    units of their own), then the rest of the model at the root."""
    mesh = device_mesh["data_parallel"] if device_mesh.ndim > 1 else device_mesh
    nf4_as_parameters(model)
    for block in model.blocks:
        shard_unit(block, mesh, mp_policy)
    if getattr(model.lm_head, "weight", None) is not model.wte.weight:  # untied: whole only for the lookup
        shard_unit(model.wte, mesh, mp_policy)
    shard_unit(model, mesh, mp_policy)  # the root: the final norm, the head (the loss reads its weight directly)
    return model


def fsdp_units(model: nn.Module) -> list[list[nn.Parameter]]:
    """The parameters of each FSDP unit (for tests and the start-up report)."""
    from torch.distributed.fsdp import FSDPModule

    units, seen = [], set()
    for m in model.modules():
        if isinstance(m, FSDPModule):
            group = m._get_fsdp_state()._fsdp_param_group
            if group is not None and id(group) not in seen:
                seen.add(id(group))
                units.append([fp.sharded_param for fp in group.fsdp_params])
    return units


def local_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes this rank holds of the model's parameters and buffers, bytes of the whole model)."""
    from torch.distributed.tensor import DTensor

    local = full = 0
    seen = set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        size = t.element_size()
        if isinstance(t, DTensor):
            local += t.to_local().numel() * size
        else:
            local += t.numel() * size
        full += t.numel() * size
    return local, full


def report_shards(fabric, model: nn.Module) -> None:
    """Print, per rank, the bytes of the model it holds (about 1/N of it under --strategy fsdp)."""
    if not is_sharded(model):
        return
    local, full = local_bytes(model)
    every = torch.zeros(fabric.world_size, dtype=torch.float64, device=fabric.device)
    every[fabric.global_rank] = local
    every = fabric.all_reduce(every, reduce_op="sum").tolist()  # each rank's count, everywhere
    fabric.print(f"FSDP: {len(fsdp_units(model))} units; parameter bytes per rank "
                 + ", ".join(f"{b / 2**20:.2f}" for b in every) + f" MiB of {full / 2**20:.2f} MiB "
                 f"({100 * max(every) / full:.1f}% at most on one rank)")


@contextmanager
def gathered(fabric, model: nn.Module, trainable_only: bool = True) -> Iterator[nn.Module]:
    """Inside the `with`, on rank 0, the model's sharded parameters (the trainable ones, or all) are ordinary full
    tensors on the CPU, so that save_lora / save_adapter / a state dict write the single file one process writes.
    Every rank must enter it (the all-gathers are collectives); the other ranks keep their shards. A no-op on one
    process and under DDP."""
    from torch.distributed.tensor import DTensor

    swapped, full = [], {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if not isinstance(p, DTensor) or (trainable_only and not p.requires_grad):
                continue
            if id(p) not in full:  # a tied weight is gathered once and stays tied
                tensor = p.full_tensor()  # (all-gather: every rank, in the same order)
                full[id(p)] = nn.Parameter(tensor.detach().cpu(), requires_grad=p.requires_grad) \
                    if fabric.is_global_zero else p
            swapped.append((module, name, p))
            module._parameters[name] = full[id(p)]
    try:
        yield model
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def optimizer_state(model: nn.Module, optimizer) -> dict | None:
    """The optimizer's state dict for a single-file resume state; None when it is sharded (save_sharded_state
    writes it then)."""
    return None if is_sharded(model) else optimizer.state_dict()


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def save_sharded_state(fabric, model: nn.Module, optimizer, path: Path) -> None:
    """Every rank writes its shard of the trainable parameters and of the optimizer state into `path` (a folder),
    atomically: into path.tmp, which replaces `path` once every rank has written its part."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if fabric.is_global_zero and tmp.exists():
        shutil.rmtree(tmp)
    fabric.barrier()
    names = trainable_names(model)
    state = {"model": {k: v for k, v in get_model_state_dict(model).items() if k in names},
             "optimizer": get_optimizer_state_dict(model, _unwrap(optimizer))}
    dcp.save(state, checkpoint_id=tmp)
    fabric.barrier()
    if fabric.is_global_zero:
        old = path.with_name(path.name + ".old")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        if old.exists():
            shutil.rmtree(old)
    fabric.barrier()


def load_sharded_state(fabric, model: nn.Module, optimizer, path: Path) -> None:
    """The inverse of save_sharded_state: each rank reads its shards back into `model` and `optimizer`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    path = Path(path)
    if not path.is_dir():
        raise LoraLabError(f"--resume: {path} (the sharded state of an --strategy fsdp run) does not exist: resume "
                           "with the --strategy and --devices the run started with")
    names = trainable_names(model)
    optimizer = _unwrap(optimizer)
    state = {"model": {k: v for k, v in get_model_state_dict(model).items() if k in names},
             "optimizer": get_optimizer_state_dict(model, optimizer)}
    try:
        dcp.load(state, checkpoint_id=path)
    except Exception as e:  # noqa: BLE001 (dcp raises its own CheckpointException for any mismatch)
        raise LoraLabError(f"{path} does not fit this run ({type(e).__name__}): resume with the settings, "
                           "--strategy and world size the run started with") from None
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def _unwrap(optimizer):
    return getattr(optimizer, "optimizer", optimizer)

