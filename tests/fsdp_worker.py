"""Run by tests/test_distributed.py: N processes (Fabric launches them) cut a tiny model into FSDP2 units and train
one step; each rank prints one JSON line of what it holds. Not a test by itself.

    python tests/fsdp_worker.py N METHOD   (METHOD: lora, qlora, adapter, full)
"""

import json
import sys

import torch

from lora_lab.adapter import inject_adapter, mark_only_adapter_trainable
from lora_lab.config import Config
from lora_lab.distributed import fsdp_units, local_bytes, make_fabric
from lora_lab.lora import inject_lora, mark_only_lora_trainable
from lora_lab.model import GPT
from lora_lab.nf4 import quantize_nf4

CONFIG = dict(name="fsdp-test", block_size=64, vocab_size=256, n_embd=64, n_layer=3, n_head=4, n_query_groups=2,
              intermediate_size=128, norm_class="RMSNorm", mlp_class="swiglu", bias=False, tie_embeddings=True)


def main(n: int, method: str) -> None:
    fabric = make_fabric(n, 1, "fsdp", "32-true")
    fabric.launch()
    torch.manual_seed(0)
    model = GPT(Config(**CONFIG))
    if method == "qlora":
        quantize_nf4(model)
    if method in ("lora", "qlora"):
        inject_lora(model, r=4, alpha=8, targets=["query", "value", "mlp", "lm_head"])
        mark_only_lora_trainable(model)
    elif method == "adapter":
        inject_adapter(model, 4, 1)
        mark_only_adapter_trainable(model)
    gpt = model
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW([p for p in gpt.parameters() if p.requires_grad]))
    idx = torch.randint(0, 256, (2, 32))
    fabric.backward(model(idx, labels=idx))
    params = list(gpt.parameters())
    units = fsdp_units(gpt)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    grads = [p.grad for p in params if p.grad is not None]
    report = {
        "rank": fabric.global_rank,
        "units": [sorted({p.requires_grad for p in unit}) for unit in units],
        "in_units": sum(len(u) for u in units), "params": len(params),
        "frozen_with_grad": sum(p.grad is not None for p in params if not p.requires_grad),
        "grad_bytes": sum(local(g).numel() * g.element_size() for g in grads),
        "trainable_bytes": sum(local(p).numel() * p.element_size() for p in params if p.requires_grad),
        "nf4_local": sum(local(p).numel() for n, p in gpt.named_parameters() if n.endswith(".weight")
                         and p.dtype == torch.uint8),
        "nf4_full": sum(p.numel() for n, p in gpt.named_parameters() if n.endswith(".weight")
                        and p.dtype == torch.uint8),
        "local_bytes": local_bytes(gpt),
    }
    optimizer.step()
    print("REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
