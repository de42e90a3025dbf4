"""Export a lora_lab LoRA adapter in Hugging Face PEFT's format, for the base model in Hugging Face layout.

    python -m lora_lab.export_peft --adapter_dir out/finetune/lora --out_dir out/peft-adapter
    python -m lora_lab.convert --to hf CHECKPOINT_DIR out/base-hf     # the base model, if it is not on the Hub

    # then, in Python:
    model = AutoModelForCausalLM.from_pretrained("out/base-hf")       # or the Hub repo the base came from
    model = PeftModel.from_pretrained(model, "out/peft-adapter")

PEFT's LoRA format is a folder with two files:
    adapter_config.json          peft_type LORA, r, lora_alpha, target_modules (Hugging Face module names), ...
    adapter_model.safetensors    base_model.model.<HF module>.lora_A.weight  (r, in)
                                 base_model.model.<HF module>.lora_B.weight  (out, r)
                                 base_model.model.<HF module>.lora_magnitude_vector  (out,)   DoRA only
A LoRA classifier (finetune/classify.py --method lora) is exported as task_type SEQ_CLS, its head (`score`) in
modules_to_save (PEFT saves such a module whole, as base_model.model.score.weight), for
AutoModelForSequenceClassification + PeftModel.from_pretrained.

PEFT computes each adapted layer as we do (lora_lab/lora.py): x W^T + b + (alpha/r) x A^T B^T, alpha/sqrt(r)
with use_rslora, and the same DoRA formula, so the tensors are copied unchanged under the Hugging Face module
names of the base model's family (the name tables of lora_lab/formats/hf.py).

Fused q/k/v (GPT-NeoX, Falcon). These Hugging Face models have one query_key_value layer where we have q_proj,
k_proj and v_proj. LoRA on some of ours is still exactly a LoRA on the fused layer, of a larger rank: with
adapters (A_q, B_q) and (A_v, B_v) of rank r,

    delta W_qkv = s · B' A'      A' = [A_q; A_v]  (2r × in)      B' = the rows of [[B_q, 0], [0, 0], [0, B_v]]
                                                                      in the fused row order  (3 out × 2r)

because B' A' puts B_q A_q on the q rows, B_v A_v on the v rows and zeros on the k rows. So the fused layer gets
rank r' = (number of adapted parts) · r, and its alpha is scaled so that its scaling equals ours (alpha' / r' =
alpha / r, or alpha' / sqrt(r') = alpha / sqrt(r) with rsLoRA); PEFT's rank_pattern and alpha_pattern hold
both. DoRA's norms are per output row, so they split over the parts too; the rows of a part without LoRA need
the magnitude ||W|| of the base weight's rows (so that they stay unchanged), which is read from the base
checkpoint (--checkpoint_dir).

Tied embeddings: a LoRA on a tied lm_head adds its update to the output layer only, in PEFT as in lora_lab (the
embedding matrix is unchanged): PEFT warns that a tied layer is adapted, and the logits agree. But PEFT's
merge_and_unload() then merges the update into the matrix lm_head shares with the embedding, which changes the
embedding too (checked with peft 0.21): merge such an adapter with `python -m lora_lab.merge_lora --to hf`, which
gives lm_head its own weight first.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_lab.adapted import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE
from lora_lab.checkpoint import WEIGHTS_FILE, load_config
from lora_lab.classifier import peft_classifier_parts
from lora_lab.config import Config
from lora_lab.formats.hf import Family, fuse_qkv, hf_family_for
from lora_lab.lora import ADAPTER_CONFIG_FILE, LoRAConfig, base_checkpoint_dir, check_adapter_fits, load_lora
from lora_lab.progress import progress
from lora_lab.utils import LoraLabError, PathLike, atomic_path, atomic_write_text, cli

PEFT_PREFIX = "base_model.model."  # PeftModel wraps a LoraModel, which wraps the transformers model
PEFT_PARAM_NAMES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}
FUSED = "blocks.{i}.attn.qkv"  # the convert_hf tables' name for q, k and v fused into one layer
QKV_PARTS = {"blocks.{i}.attn.q_proj": "q", "blocks.{i}.attn.k_proj": "k", "blocks.{i}.attn.v_proj": "v"}


def hf_module_names(config: Config, family: Family) -> dict[str, str]:
    """Our module template -> the Hugging Face module, as transformers names it in memory (PEFT matches those).

    The convert_hf tables give the names in weight files; they differ in one place: transformers 5 calls
    GPT-NeoX's output layer `lm_head` in memory, while its files call it `embed_out` (the family's alias)."""
    names = dict(family.names_for(config))
    for in_memory, in_files in family.aliases.items():
        for ours, hf in names.items():
            if hf == in_files:
                names[ours] = in_memory
    return names


def _split_module(name: str) -> tuple[str, Optional[str]]:
    """"blocks.3.attn.q_proj" -> ("blocks.{i}.attn.q_proj", "3"); "lm_head" -> ("lm_head", None)."""
    m = re.match(r"blocks\.(\d+)\.(.+)$", name)
    return (f"blocks.{{i}}.{m.group(2)}", m.group(1)) if m else (name, None)


def _shortest_suffixes(targeted: set[str], all_modules: set[str]) -> list[str]:
    """PEFT adapts every module whose name is, or ends with "." + , an entry of target_modules. For each adapted
    module, the shortest dotted suffix of its name that picks no module we do not adapt ("q_proj", not
    "model.layers.0.self_attn.q_proj")."""
    suffixes = set()
    for name in targeted:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if {m for m in all_modules if m == suffix or m.endswith("." + suffix)} <= targeted:
                suffixes.add(suffix)
                break
    return sorted(suffixes)


def _base_row_norms(checkpoint_dir: Optional[Path], keys: list[str]) -> dict[str, torch.Tensor]:
    """||W|| of each row of the named base weights, in float32, reading only those tensors."""
    with safe_open(str(Path(checkpoint_dir) / WEIGHTS_FILE), framework="pt", device="cpu") as f:
        return {k: torch.linalg.vector_norm(f.get_tensor(k).float(), dim=1) for k in keys}


def peft_adapter(lora_config: LoRAConfig, adapter: dict[str, torch.Tensor], config: Config,
                 checkpoint_dir: Optional[PathLike] = None,
                 base_model_name_or_path: Optional[str] = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our adapter for a base model `config` -> (adapter_config.json dict, PEFT state dict).

    `checkpoint_dir` (the base checkpoint) is read only for DoRA on a fused q/k/v layer whose parts are not all
    adapted; a LoraLabError says when it is needed and missing."""
    family, _ = hf_family_for(config)
    names = hf_module_names(config, family)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter.items():
        module, _, param = key.rpartition(".")
        by_module.setdefault(module, {})[param] = tensor

    state_dict: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # layer -> part ("q", "k", "v") -> tensors
    for module, tensors in progress(list(by_module.items()), desc="Exporting", unit="layer"):
        template, i = _split_module(module)
        if template in names:
            hf = names[template].format(i=i)
            for param, tensor in tensors.items():
                state_dict[f"{PEFT_PREFIX}{hf}.{PEFT_PARAM_NAMES[param]}"] = tensor.contiguous()
        elif template in QKV_PARTS and FUSED in names:
            fused.setdefault(i, {})[QKV_PARTS[template]] = tensors
        else:
            raise LoraLabError(f"{family.architecture} has no layer for the adapter's {module}: it cannot be "
                               f"exported for this architecture")

    rank_pattern, alpha_pattern = {}, {}
    if fused:
        fused_name = names[FUSED].rsplit(".", 1)[-1]  # "query_key_value"
        n_parts = {len(parts) for parts in fused.values()}
        if len(n_parts) > 1:
            raise LoraLabError("the adapter has LoRA on different q/k/v parts in different layers: it cannot be "
                               "written with one rank for the fused query_key_value layers")
        r_fused = n_parts.pop() * lora_config.r
        if r_fused != lora_config.r:
            rank_pattern[fused_name] = r_fused
            # the same scaling as ours: alpha'/r' = alpha/r (rsLoRA: alpha'/sqrt(r') = alpha/sqrt(r))
            ratio = r_fused / lora_config.r
            alpha_pattern[fused_name] = lora_config.alpha * (ratio ** 0.5 if lora_config.use_rslora else ratio)
        norms = {}
        if lora_config.use_dora:
            missing = [f"blocks.{i}.attn.{p}_proj.weight" for i, parts in fused.items() for p in "qkv"
                       if p not in parts]
            if missing:
                if checkpoint_dir is None or not Path(checkpoint_dir).is_dir():
                    raise LoraLabError(f"DoRA on part of {family.architecture}'s fused query_key_value layer needs "
                                       f"the base weights' row norms: pass --checkpoint_dir (the base checkpoint)")
                norms = _base_row_norms(Path(checkpoint_dir), missing)
        rows = {"q": config.n_head * config.head_size, "k": config.n_query_groups * config.head_size,
                "v": config.n_query_groups * config.head_size}
        for i, parts in fused.items():
            hf = names[FUSED].format(i=i)
            order = [p for p in "qkv" if p in parts]
            a = parts[order[0]]["lora_A"]
            A = torch.cat([parts[p]["lora_A"] for p in order])  # (r', in)
            Bs = {p: torch.zeros(rows[p], r_fused, dtype=a.dtype) for p in "qkv"}  # (rows_p, r') each
            for j, p in enumerate(order):  # part p's B sits in its own block of r columns
                Bs[p][:, j * lora_config.r:(j + 1) * lora_config.r] = parts[p]["lora_B"]
            state_dict[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = A.contiguous()
            state_dict[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = fuse_qkv(Bs["q"], Bs["k"], Bs["v"], config)  # (rows, r')
            if lora_config.use_dora:
                mags = {p: parts[p]["lora_magnitude"] if p in parts
                        else norms[f"blocks.{i}.attn.{p}_proj.weight"].to(a.dtype) for p in "qkv"}
                state_dict[f"{PEFT_PREFIX}{hf}.lora_magnitude_vector"] = fuse_qkv(mags["q"], mags["k"], mags["v"],
                                                                                  config)

    # every Hugging Face module of this model (for the target_modules suffixes), and the ones we adapt
    all_modules = {hf.format(i=i) for hf in names.values()
                   for i in (range(config.n_layer) if "{i}" in hf else [None])}
    targeted = {k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in state_dict}
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or config.known_hf_repo() or None,
        "r": lora_config.r,
        "lora_alpha": lora_config.alpha,
        "lora_dropout": lora_config.dropout,
        "target_modules": _shortest_suffixes(targeted, all_modules),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": lora_config.use_rslora,
        "use_dora": lora_config.use_dora,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return adapter_config, state_dict


def export_peft(adapter_dir: PathLike, out_dir: PathLike, checkpoint_dir: Optional[PathLike] = None,
                base_model_name_or_path: Optional[str] = None) -> dict:
    """Write adapter_dir's adapter in PEFT's format to out_dir; returns the adapter_config.json dict."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    lora_config, adapter = load_lora(adapter_dir)
    if checkpoint_dir is not None:  # the base checkpoint: its config is the one the Hugging Face export has
        config = load_config(checkpoint_dir)
        check_adapter_fits(lora_config, config, adapter_dir, checkpoint_dir)
    elif lora_config.base_config:
        try:
            config = Config.from_dict(lora_config.base_config)
        except (ValueError, TypeError) as e:
            raise LoraLabError(f"{adapter_dir / ADAPTER_CONFIG_FILE}: base_config is not a valid model config ({e}): "
                               f"pass --checkpoint_dir") from None
        if lora_config.base_model and Path(lora_config.base_model).is_dir():
            checkpoint_dir = base_checkpoint_dir(lora_config, None, adapter_dir)
    else:
        checkpoint_dir = base_checkpoint_dir(lora_config, None, adapter_dir)
        config = load_config(checkpoint_dir)
    try:
        adapter_config, state_dict = peft_adapter(lora_config, adapter, config, checkpoint_dir,
                                                  base_model_name_or_path)
    except LoraLabError as e:
        raise LoraLabError(f"{adapter_dir}: {e}") from None
    head = peft_classifier_parts(adapter_dir)
    if head is not None:  # a lora / qlora classifier (finetune/classify.py): its head trained whole, PEFT's way to save it
        adapter_config.update(task_type="SEQ_CLS", modules_to_save=["score"])
        state_dict.update({f"{PEFT_PREFIX}{k}": v.contiguous() for k, v in head.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / PEFT_WEIGHTS_FILE) as tmp:
        save_file(state_dict, str(tmp), metadata={"format": "pt"})
    atomic_write_text(out_dir / PEFT_CONFIG_FILE, json.dumps(adapter_config, indent=2) + "\n")
    return adapter_config


def main(
    adapter_dir: Path,
    out_dir: Path,
    base_model_name_or_path: Optional[str] = None,
    checkpoint_dir: Optional[Path] = None,
) -> None:
    """Write a LoRA adapter as a PEFT adapter (adapter_config.json + adapter_model.safetensors).

    Args:
        adapter_dir: the output directory of a LoRA fine-tuning run (lora.safetensors + lora_config.json).
        out_dir: where the PEFT adapter goes.
        base_model_name_or_path: recorded in adapter_config.json: the Hub id of the base, or a Hugging Face folder
            of it (`python -m lora_lab.convert --to hf`), where PEFT's AutoPeftModel loads the base from (default:
            the base model's Hub repo, if known).
        checkpoint_dir: the base checkpoint; default: the adapter's base model. Only DoRA on GPT-NeoX or Falcon
            q/k/v needs it.
    """
    written = export_peft(adapter_dir, out_dir, checkpoint_dir, base_model_name_or_path)
    print(f"PEFT adapter for {', '.join(written['target_modules'])} (r={written['r']}) saved to {out_dir}",
          file=sys.stderr)
    if written["base_model_name_or_path"] is None:
        print("note: the base model's Hub id is unknown (it was converted from a local file), so PEFT's "
              "AutoPeftModelForCausalLM cannot find it: pass --base_model_name_or_path HUB_ID, or the folder of "
              "`python -m lora_lab.convert --to hf CHECKPOINT_DIR HF_DIR`", file=sys.stderr)
    lora_config, _ = load_lora(adapter_dir)
    if "lm_head" in lora_config.targets and (lora_config.base_config or {}).get("tie_embeddings"):
        print("note: lm_head shares the embedding matrix: do not merge this adapter with PEFT's merge_and_unload(), "
              "which would change the embedding too; use `python -m lora_lab.merge_lora --to hf`", file=sys.stderr)


if __name__ == "__main__":
    cli(main)
