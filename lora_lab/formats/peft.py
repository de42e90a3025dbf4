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

Fused layers (GPT-NeoX, Falcon: query_key_value; Phi-3 / 4: qkv_proj and gate_up_proj). These Hugging Face
models have one layer where we have q_proj, k_proj and v_proj (or gate_proj and up_proj). LoRA on some of ours
is still exactly a LoRA on the fused layer, of a larger rank: with adapters (A_q, B_q) and (A_v, B_v) of rank r,

    delta W_qkv = s · B' A'      A' = [A_q; A_v]  (2r × in)      B' = the rows of [[B_q, 0], [0, 0], [0, B_v]]
                                                                      in the fused row order  (3 out × 2r)

because B' A' puts B_q A_q on the q rows, B_v A_v on the v rows and zeros on the k rows. So the fused layer gets
rank r' = (number of adapted parts) · r, and its alpha is scaled so that its scaling equals ours (alpha' / r' =
alpha / r, or alpha' / sqrt(r') = alpha / sqrt(r) with rsLoRA); PEFT's rank_pattern and alpha_pattern hold
both. DoRA's norms are per output row, so they split over the parts too; the rows of a part without LoRA need
the magnitude ||W|| of the base weight's rows (so that they stay unchanged), which is read from the base
checkpoint (--checkpoint_dir).

Mixture of experts (Qwen3-MoE). transformers 5 holds each layer's experts as two 3-D parameters,
mlp.experts.gate_up_proj (E, 2I, C) and mlp.experts.down_proj (E, C, I), which PEFT adapts with
`target_parameters` (its ParamWrapper: one lora_A (r·E, in) whose rows e·r ... e·r + r are expert e's A, one
lora_B (out, r·E) whose column j·E + e is column j of expert e's B). Our experts are modules of their own
(experts.{e}.gate_proj ...), so expert e's gate and up adapters become its gate_up LoRA of rank 2r as above
(A' = [A_gate; A_up], B' = [[B_gate, 0], [0, B_up]]), and its down_proj adapter goes over as it is. PEFT nests
the two wrappers on the one `experts` module: gate_up's tensors are saved under mlp.experts.base_layer.lora_*,
down's under mlp.experts.lora_* (checked with peft 0.21). PEFT's ParamWrapper has no dropout and no DoRA: the
export writes lora_dropout 0 (dropout only acts in training) and refuses DoRA on experts.

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
from lora_lab.formats.hf import FUSED_PARTS, Family, fuse, hf_family_for, module_template
from lora_lab.lora import ADAPTER_CONFIG_FILE, LoRAConfig, base_checkpoint_dir, check_adapter_fits, load_lora
from lora_lab.progress import progress
from lora_lab.utils import LoraLabError, PathLike, atomic_path, atomic_write_text, cli

PEFT_PREFIX = "base_model.model."  # PeftModel wraps a LoraModel, which wraps the transformers model
PEFT_PARAM_NAMES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}
# our layer template -> (the fused layer's template in the name tables, its part)
PART_OF = {ours: (fused, part) for fused, parts in FUSED_PARTS.items() for ours, part in parts.items()}
EXPERT_PARAMS = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}


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
    fused: dict[tuple[str, str], dict[str, dict[str, torch.Tensor]]] = {}  # (fused template, layer) -> part -> tensors
    experts: dict[str, dict[str, dict[str, dict[str, torch.Tensor]]]] = {}  # layer -> expert -> projection -> tensors
    for module, tensors in progress(list(by_module.items()), desc="Exporting", unit="layer"):
        template, i, e = module_template(module)
        if e is not None:  # an expert's projection: PEFT adapts the stacked parameters transformers holds
            experts.setdefault(i, {}).setdefault(e, {})[template.rsplit(".", 1)[-1]] = tensors
        elif template in names:
            hf = names[template].format(i=i, e=e)
            for param, tensor in tensors.items():
                state_dict[f"{PEFT_PREFIX}{hf}.{PEFT_PARAM_NAMES[param]}"] = tensor.contiguous()
        elif template in PART_OF and PART_OF[template][0] in names:
            fused_template, part = PART_OF[template]
            fused.setdefault((fused_template, i), {})[part] = tensors
        else:
            raise LoraLabError(f"{family.architecture} has no layer for the adapter's {module}: it cannot be "
                               f"exported for this architecture")

    rank_pattern, alpha_pattern = {}, {}

    def rank_for(pattern_name: str, n_parts: int) -> int:
        """The rank of a layer that stacks n_parts adapters; sets its rank and alpha patterns."""
        r_fused = n_parts * lora_config.r
        if r_fused != lora_config.r:
            rank_pattern[pattern_name] = r_fused
            # the same scaling as ours: alpha'/r' = alpha/r (rsLoRA: alpha'/sqrt(r') = alpha/sqrt(r))
            alpha_pattern[pattern_name] = lora_config.alpha * (n_parts ** 0.5 if lora_config.use_rslora else n_parts)
        return r_fused

    for fused_template in FUSED_PARTS:
        layers = {i: parts for (t, i), parts in fused.items() if t == fused_template}
        if not layers:
            continue
        fused_name = names[fused_template].rsplit(".", 1)[-1]  # "query_key_value", "gate_up_proj"
        all_parts = list(FUSED_PARTS[fused_template].values())  # ["q", "k", "v"] or ["gate", "up"]
        n_parts = {len(parts) for parts in layers.values()}
        if len(n_parts) > 1:
            raise LoraLabError(f"the adapter has LoRA on different parts of the fused {fused_name} layer in "
                               f"different layers: it cannot be written with one rank for them")
        r_fused = rank_for(fused_name, n_parts.pop())
        norms = {}
        part_module = {p: ours for ours, p in FUSED_PARTS[fused_template].items()}
        if lora_config.use_dora:
            missing = [f"{part_module[p].format(i=i)}.weight" for i, parts in layers.items() for p in all_parts
                       if p not in parts]
            if missing:
                if checkpoint_dir is None or not Path(checkpoint_dir).is_dir():
                    raise LoraLabError(f"DoRA on part of {family.architecture}'s fused {fused_name} layer needs "
                                       f"the base weights' row norms: pass --checkpoint_dir (the base checkpoint)")
                norms = _base_row_norms(Path(checkpoint_dir), missing)
        rows = {"q": config.n_head * config.head_size, "k": config.n_query_groups * config.head_size,
                "v": config.n_query_groups * config.head_size, "gate": config.intermediate_size,
                "up": config.intermediate_size}
        for i, parts in layers.items():
            hf = names[fused_template].format(i=i)
            order = [p for p in all_parts if p in parts]
            a = parts[order[0]]["lora_A"]
            A = torch.cat([parts[p]["lora_A"] for p in order])  # (r', in)
            Bs = {p: torch.zeros(rows[p], r_fused, dtype=a.dtype) for p in all_parts}  # (rows_p, r') each
            for j, p in enumerate(order):  # part p's B sits in its own block of r columns
                Bs[p][:, j * lora_config.r:(j + 1) * lora_config.r] = parts[p]["lora_B"]
            state_dict[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = A.contiguous()
            state_dict[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = fuse(Bs, config, family)  # (rows, r')
            if lora_config.use_dora:
                mags = {p: parts[p]["lora_magnitude"] if p in parts
                        else norms[f"{part_module[p].format(i=i)}.weight"].to(a.dtype) for p in all_parts}
                state_dict[f"{PEFT_PREFIX}{hf}.lora_magnitude_vector"] = fuse(mags, config, family)

    dense_mlp = [k for k in by_module if config.n_expert and re.search(r"\.mlp\.(gate|up|down)_proj$", k)]
    if dense_mlp:
        raise LoraLabError(f"PEFT (0.21) reads gate_proj / up_proj / down_proj of a {family.architecture} as its "
                           f"experts, so LoRA on its dense MLP layers ({dense_mlp[0]}) cannot be exported: train "
                           f"without the mlp target (experts covers the MoE layers)")
    target_parameters = []
    if experts:
        if lora_config.use_dora:
            raise LoraLabError("PEFT has no DoRA for mixture-of-experts parameters: export a LoRA (not DoRA) "
                               "adapter on the experts")
        target_parameters = _export_experts(experts, lora_config, config, names, state_dict, rank_for)

    # every Hugging Face module of this model (for the target_modules suffixes), and the ones we adapt
    # (transformers 5 stacks the experts in memory: their per-expert modules are not there for PEFT to match)
    all_modules = {hf.format(i=i) for hf in names.values() if "{e}" not in hf
                   for i in (range(config.n_layer) if "{i}" in hf else [None])}
    targeted = {k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in state_dict}
    experts_modules = {m for m in targeted if re.search(r"\.experts(\.base_layer)?$", m)}
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or config.known_hf_repo() or None,
        "r": lora_config.r,
        "lora_alpha": lora_config.alpha,
        "lora_dropout": lora_config.dropout,
        "target_modules": _shortest_suffixes(targeted - experts_modules, all_modules),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": lora_config.use_rslora,
        "use_dora": lora_config.use_dora,
        "bias": "none",
        **({"target_parameters": target_parameters, "lora_dropout": 0.0} if target_parameters else {}),
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return adapter_config, state_dict


def _export_experts(experts: dict, lora_config: LoRAConfig, config: Config, names: dict,
                    state_dict: dict[str, torch.Tensor], rank_for) -> list[str]:
    """Write the experts' adapters as PEFT's ParamWrapper tensors of the stacked parameters (see the docstring);
    returns target_parameters."""
    r = lora_config.r
    kinds = {frozenset(projections) for layer in experts.values() for projections in layer.values()}
    if len(kinds) > 1 or {len(layer) for layer in experts.values()} != {config.n_expert}:
        raise LoraLabError("the adapter has LoRA on some experts or projections only: PEFT adapts all experts of "
                           "a layer at once; train with --lora_targets experts")
    projections = set(kinds.pop())
    stacked = sorted({EXPERT_PARAMS[p] for p in projections})  # ["down_proj", "gate_up_proj"]
    if "gate_up_proj" in stacked and not {"gate_proj", "up_proj"} <= projections:
        raise LoraLabError("the adapter has LoRA on only one of an expert's gate_proj and up_proj: PEFT adapts "
                           "them together (gate_up_proj)")
    ranks = {"gate_up_proj": rank_for("experts.gate_up_proj", 2) if "gate_up_proj" in stacked else 0,
             "down_proj": rank_for("experts.down_proj", 1) if "down_proj" in stacked else 0}
    # PEFT wraps gate_up_proj first and down_proj around it: the inner one's tensors go under base_layer
    where = {"gate_up_proj": "experts.base_layer" if len(stacked) == 2 else "experts", "down_proj": "experts"}
    E, I = config.n_expert, config.moe_intermediate_size
    experts_module = names["blocks.{i}.mlp.router"].rsplit(".", 1)[0] + ".experts"  # model.layers.{i}.mlp.experts
    for i, layer in experts.items():
        for param in stacked:
            rank = ranks[param]
            a0 = layer["0"][next(iter(layer["0"]))]["lora_A"]
            A = torch.zeros(E * rank, config.n_embd if param == "gate_up_proj" else I, dtype=a0.dtype)
            B = torch.zeros(2 * I if param == "gate_up_proj" else config.n_embd, rank * E, dtype=a0.dtype)
            for e in range(E):
                p = layer[str(e)]
                if param == "gate_up_proj":  # rank 2r: [A_gate; A_up], B block-diagonal [[B_gate, 0], [0, B_up]]
                    A_e = torch.cat((p["gate_proj"]["lora_A"], p["up_proj"]["lora_A"]))  # (2r, C)
                    B_e = torch.zeros(2 * I, 2 * r, dtype=a0.dtype)
                    B_e[:I, :r], B_e[I:, r:] = p["gate_proj"]["lora_B"], p["up_proj"]["lora_B"]
                else:
                    A_e, B_e = p["down_proj"]["lora_A"], p["down_proj"]["lora_B"]  # (r, I), (C, r)
                A[e * rank:(e + 1) * rank] = A_e
                B[:, e::E] = B_e  # column j * E + e is B_e's column j
            prefix = f"{PEFT_PREFIX}{experts_module.format(i=i).rsplit('.', 1)[0]}.{where[param]}"
            state_dict[f"{prefix}.lora_A.weight"] = A
            state_dict[f"{prefix}.lora_B.weight"] = B
    return [f"mlp.experts.{param}" for param in stacked]


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
