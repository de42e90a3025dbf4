"""Export a LoRA adapter to llama.cpp: a GGUF adapter file, and an Ollama Modelfile next to it.

    python -m lora_lab.export_gguf --adapter_dir out/finetune/lora --out_file adapter.gguf
    llama-cli -m base.gguf --lora adapter.gguf
    ollama create my-model -f Modelfile              (FROM base.gguf, ADAPTER adapter.gguf, TEMPLATE, stops)

A LoRA adapter file (general.type = adapter, adapter.type = lora, adapter.lora.alpha) holds, per adapted
weight W of the base file, `W_name.lora_a` = A (r, in) and `W_name.lora_b` = B (out, r); llama.cpp computes
W x + (alpha / r) B (A x) with r read from A. Three facts make our adapter exact there:
  - a row permutation P of W (llama's Q/K reordering, lora_lab/formats/gguf_names.py) commutes with LoRA:
    P (W + s B A) = P W + s (P B) A, so only B's rows are permuted;
  - rsLoRA scales by alpha / sqrt(r): writing alpha' = alpha · sqrt(r) gives alpha' / r = alpha / sqrt(r);
  - a LoRA on some of q, k, v of a fused attn_qkv (or of gate, up of Phi-3's ffn_up) is a LoRA of rank k·r on the
    fused matrix (k adapted parts):
    A' = [A_q; A_v] (k r × in), B' = the blocks B_q, B_v on their rows and zeros elsewhere (lora_lab/formats/peft.py
    explains it for PEFT); llama.cpp scales it by alpha' / (k r), so B' is multiplied by k.
Qwen3-MoE's experts are stacked per layer in the base file, and so are their LoRA pairs: lora_a (n_expert, r, in),
lora_b (n_expert, out, r), which llama.cpp applies to the experts each token is routed to.
DoRA rescales each row by m / ||W + s B A||, which llama.cpp's adapter cannot do: merge such adapters instead.
The Modelfile's TEMPLATE and stops come from the adapter's prompt style (lora_lab/prompts.py).

Checked against llama.cpp itself in tests/test_export_gguf.py: adapters for q/v, all targets and rsLoRA.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

import torch

from lora_lab.adapted import adapter_kind
from lora_lab.checkpoint import load_config
from lora_lab.config import Config
from lora_lab.formats.gguf_export import write_gguf_file
from lora_lab.formats.gguf_names import (GATE_UP, QKV, Arch, gguf_architecture, gguf_module_name,
                                         halves_to_interleaved)
from lora_lab.lora import base_checkpoint_dir, check_adapter_fits, load_lora
from lora_lab.prompts import prompt_styles
from lora_lab.utils import LoraLabError, PathLike, atomic_write_text


def gguf_adapter_tensors(lora_config, adapter: dict[str, torch.Tensor], config: Config,
                         arch: Arch) -> tuple[float, list[tuple[str, torch.Tensor]]]:
    """(adapter.lora.alpha, [(GGUF name, tensor)]) of a LoRA adapter for llama.cpp (see the module docstring)."""
    if lora_config.use_dora:
        raise LoraLabError("DoRA adapters cannot be applied by llama.cpp (its LoRA adds s·B A; DoRA also rescales "
                           "every row): merge it instead, `python -m lora_lab.merge_lora --adapter_dir DIR --to gguf "
                           "--out_dir merged.gguf`")
    if "lm_head" in lora_config.targets and config.tie_embeddings and not arch.output_required:
        raise LoraLabError("a LoRA on a tied lm_head has no separate output.weight to apply to in llama.cpp: merge "
                           "it instead, `python -m lora_lab.merge_lora --adapter_dir DIR --to gguf --out_dir "
                           "merged.gguf`")
    r = lora_config.r
    alpha = lora_config.alpha * math.sqrt(r) if lora_config.use_rslora else lora_config.alpha  # alpha'/r = scaling
    modules = sorted({k.rsplit(".", 1)[0] for k in adapter}, key=_module_order)
    out: list[tuple[str, torch.Tensor]] = []
    fused: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # attn_qkv / ffn_up -> part -> (A, B)
    experts: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}  # ffn_*_exps -> expert -> (A, B)
    for module in modules:
        A, B = adapter[f"{module}.lora_A"].float(), adapter[f"{module}.lora_B"].float()  # (r, in), (out, r)
        last = module.rsplit(".", 1)[-1]
        name = gguf_module_name(module, config, arch)
        if ".mlp.experts." in module:
            experts.setdefault(name, {})[int(module.split(".")[-2])] = (A, B)
            continue
        if (arch.fused_qkv and last in QKV) or (arch.fused_gate_up and last in GATE_UP):
            fused.setdefault(name, {})[last] = (A, B)
            continue
        if arch.permute_qk and last in ("q_proj", "k_proj"):
            B = halves_to_interleaved(B, config.n_head if last == "q_proj" else config.n_query_groups)
        out += [(f"{name}.weight.lora_a", A), (f"{name}.weight.lora_b", B)]
    hs = config.head_size
    rows = {"q_proj": config.n_head * hs, "k_proj": config.n_query_groups * hs, "v_proj": config.n_query_groups * hs,
            "gate_proj": config.intermediate_size, "up_proj": config.intermediate_size}
    for name, parts in fused.items():
        order = QKV if any(p in QKV for p in parts) else GATE_UP
        k = len(parts)
        A = torch.cat([parts[p][0] for p in order if p in parts])  # (k r, in)
        B = torch.zeros(sum(rows[p] for p in order), k * r)  # (rows of the fused matrix, k r)
        row, col = 0, 0
        for p in order:
            if p in parts:
                B[row:row + rows[p], col:col + r] = parts[p][1] * k  # llama.cpp scales by alpha' / (k r)
                col += r
            row += rows[p]
        out += [(f"{name}.weight.lora_a", A), (f"{name}.weight.lora_b", B)]
    for name, by_expert in experts.items():  # stacked as the experts are: (n_expert, r, in), (n_expert, out, r)
        if len(by_expert) != config.n_expert:
            raise LoraLabError(f"a LoRA on {len(by_expert)} of the {config.n_expert} experts of {name}: llama.cpp "
                               f"adapts a layer's stacked experts together; merge it instead (merge_lora --to gguf)")
        out += [(f"{name}.weight.lora_a", torch.stack([by_expert[e][0] for e in range(config.n_expert)])),
                (f"{name}.weight.lora_b", torch.stack([by_expert[e][1] for e in range(config.n_expert)]))]
    return alpha, out


def _module_order(module: str) -> tuple:
    parts = module.split(".")
    return (int(parts[1]), ".".join(parts[2:])) if parts[0] == "blocks" else (10**9, module)


def write_gguf_adapter(adapter_dir: PathLike, out_file: PathLike, checkpoint_dir: Optional[PathLike] = None,
                       progress: bool = True) -> dict:
    """A lora_lab LoRA adapter directory -> llama.cpp's LoRA GGUF; returns a summary dict."""
    adapter_dir = Path(adapter_dir)
    if adapter_kind(adapter_dir) == "adapter":
        raise LoraLabError(f"{adapter_dir} is a LLaMA-Adapter: llama.cpp cannot apply its gated prefix attention "
                           f"and it does not merge into plain weights; export a LoRA adapter or a full fine-tune")
    lora_config, adapter = load_lora(adapter_dir)
    if checkpoint_dir is not None:
        config = load_config(checkpoint_dir)
        check_adapter_fits(lora_config, config, adapter_dir, checkpoint_dir)
    elif lora_config.base_config:
        config = Config.from_dict(lora_config.base_config)
    else:
        config = load_config(base_checkpoint_dir(lora_config, None, adapter_dir))
    arch = gguf_architecture(config)
    try:
        alpha, tensors = gguf_adapter_tensors(lora_config, adapter, config, arch)
    except LoraLabError as e:
        raise LoraLabError(f"{adapter_dir}: {e}") from None
    from gguf import GGMLQuantizationType as Q

    def metadata(w) -> None:
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(alpha))
        w.add_name(f"{config.name or 'lora_lab'} LoRA r={lora_config.r}")

    size = write_gguf_file(out_file, arch.name, metadata,
                  [(n, tuple(t.shape), Q.F32, lambda t=t: t.contiguous().numpy()) for n, t in tensors],
                  f"writing {Path(out_file).name}", progress)
    return {"arch": arch.name, "alpha": alpha, "r": lora_config.r, "bytes": size, "tensors": len(tensors),
            "prompt_style": lora_config.prompt_style, "base_model": lora_config.base_model,
            "qlora": bool(lora_config.base_quantization)}


def modelfile(base_gguf: str, adapter_gguf: Optional[str], prompt_style: str, system: Optional[str] = None) -> str:
    """An Ollama Modelfile: FROM the base GGUF, ADAPTER the LoRA GGUF, the prompt style's TEMPLATE and stops."""
    style = prompt_styles.get(prompt_style)
    lines = [f"FROM {base_gguf}"]
    if adapter_gguf:
        lines.append(f"ADAPTER {adapter_gguf}")
    lines.append(f'TEMPLATE """{(style or prompt_styles["plain"]).ollama}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for stop in getattr(style, "stop_token_names", ()) if style else ():
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"


def main(adapter_dir: Path, out_file: Path, checkpoint_dir: Optional[Path] = None,
         base_gguf: Optional[str] = None) -> None:
    """Write a LoRA adapter as llama.cpp's LoRA GGUF, and an Ollama Modelfile next to it.

    Args:
        adapter_dir: the output directory of a LoRA fine-tuning run (lora.safetensors + lora_config.json).
        out_file: the adapter GGUF to write (e.g. adapter.gguf).
        checkpoint_dir: the base checkpoint; default: the base model recorded in lora_config.json.
        base_gguf: the base model's GGUF for the Modelfile's FROM line (default: base.gguf next to out_file;
            make it with `python -m lora_lab.convert --to gguf BASE_CHECKPOINT base.gguf`).
    """
    s = write_gguf_adapter(adapter_dir, out_file, checkpoint_dir)
    base = base_gguf or "./base.gguf"
    text = modelfile(base, f"./{Path(out_file).name}", s["prompt_style"])
    if base_gguf is None:
        text = (f"# FROM: the base model as GGUF, e.g. `python -m lora_lab.convert --to gguf "
                f"{s['base_model'] or 'BASE_CHECKPOINT'} base.gguf` next to this file\n") + text
    atomic_write_text(Path(out_file).parent / "Modelfile", text)
    note = (" (QLoRA: trained on the NF4-quantized base; applied to a 16-bit base it gives close, not identical, "
            "outputs; merge_lora --to gguf merges into the dequantized base exactly)") if s["qlora"] else ""
    print(f"Wrote {out_file}: llama.cpp LoRA for {s['arch']}, r={s['r']}, alpha {s['alpha']:g}, {s['tensors']} "
          f"tensors, {s['bytes'] / 2**20:.1f} MiB, and {Path(out_file).parent / 'Modelfile'}{note}", file=sys.stderr)


if __name__ == "__main__":
    from lora_lab.utils import cli

    cli(main)
