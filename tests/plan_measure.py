"""Measure the peak memory of one training step on this CPU, for tests/test_plan.py (run as a subprocess).

    python tests/plan_measure.py METHOD BATCH SEQ_LEN [ckpt] [fsdp=N]   -> prints "measured BYTES"

METHOD: lora, qlora, full, adapter, or a classifier's classify-lora / classify-blocks (3 labels, the last block;
trained as finetune/classify.py does: the class logits read at each text's last token, cross-entropy).
fsdp=N: N processes (Fabric launches them, gloo) shard the model as --strategy fsdp does; the figure is the largest
rank's.

The peak is the process's resident set (VmHWM) over a steady-state training step (the second one: AdamW's state
exists), minus the resident set before the model was built. glibc is told (by the test, MALLOC_MMAP_THRESHOLD_)
to map every allocation of 16 KiB or more on its own, so freed tensors leave the resident set at once and the
high-water mark is the tensors', as on a GPU. A tiny model trains one step first, so that the kernels' code and
torch's thread pools are already in the baseline.
"""

import sys

import torch

from lora_lab.config import Config
from lora_lab.model import GPT
from lora_lab.plan import build_meta_model  # noqa: F401  (the same method set-up as the planner's)
from lora_lab.adapter import inject_adapter, mark_only_adapter_trainable
from lora_lab.classifier import add_classification_head, classify
from lora_lab.lora import inject_lora, mark_only_lora_trainable
from lora_lab.nf4 import quantize_nf4

CONFIG = dict(name="plan-test", block_size=512, vocab_size=4096, n_embd=256, n_layer=4, n_head=4,
              n_query_groups=2, intermediate_size=1024, norm_class="RMSNorm", mlp_class="swiglu", bias=False)


def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def build(config: Config, method: str, ckpt: bool) -> GPT:
    model = GPT(config)
    if method.startswith("classify-"):  # finetune/classify.py's model and what trains
        add_classification_head(model, 3)
        method = method.removeprefix("classify-")
        if method == "lora":
            inject_lora(model, r=8, alpha=16, dropout=0.05, targets=["query", "value", "mlp"])
        model.requires_grad_(False)
        if method == "lora":
            mark_only_lora_trainable(model)
        for module in ([model.blocks[-1], model.norm_f] if method == "blocks" else []) + [model.lm_head]:
            module.requires_grad_(True)
        model.activation_checkpointing = ckpt
        return model
    if method == "qlora":
        quantize_nf4(model)
    if method in ("lora", "qlora"):
        inject_lora(model, r=8, alpha=16, dropout=0.05, targets=["query", "value", "mlp"])
        mark_only_lora_trainable(model)
    elif method == "adapter":
        inject_adapter(model, 10, 2)
        mark_only_adapter_trainable(model)
    model.activation_checkpointing = ckpt
    return model


def step(model, optimizer, idx, micro_batches=2, backward=lambda loss: loss.backward(), classifier=False):
    for _ in range(micro_batches):  # gradients accumulate, as in the scripts (batch_size > micro_batch_size)
        if classifier:  # one label per text
            logits = classify(model, idx, torch.ones_like(idx))  # (B, 3)
            loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(idx)) % 3)
        else:
            loss = model(idx, labels=idx)
        backward(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main(method: str, batch: int, seq_len: int, ckpt: bool, devices: int = 1) -> None:
    fabric = None
    if devices > 1:
        from lora_lab.distributed import make_fabric

        fabric = make_fabric(devices, 1, "fsdp", "32-true")
        fabric.launch()
    torch.manual_seed(0)
    tiny = build(Config(**{**CONFIG, "n_layer": 3, "vocab_size": 256}), method, ckpt)
    step(tiny, torch.optim.AdamW([p for p in tiny.parameters() if p.requires_grad]), torch.randint(0, 256, (1, 16)),
         classifier=method.startswith("classify-"))
    del tiny
    idx = torch.randint(0, CONFIG["vocab_size"], (batch, seq_len))
    base = rss("VmRSS")
    model = build(Config(**CONFIG), method, ckpt)
    run = {}
    if fabric is not None:  # shard it (every block a unit, ...), then the optimizer over the shards
        model = fabric.setup_module(model)
        run = {"backward": fabric.backward}
    run["classifier"] = method.startswith("classify-")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    step(model, optimizer, idx, **run)
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current resident set
        f.write("5")
    step(model, optimizer, idx, **run)
    measured = rss("VmHWM") - base
    if fabric is not None:  # the largest rank's
        measured = int(fabric.all_reduce(torch.tensor(float(measured)), reduce_op="max").item())
        if fabric.global_rank:
            return
    print("measured", measured)


if __name__ == "__main__":
    flags = sys.argv[4:]
    devices = next((int(f.split("=")[1]) for f in flags if f.startswith("fsdp=")), 1)
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), "ckpt" in flags, devices)
