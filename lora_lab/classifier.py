"""An LLM as a text classifier: the same GPT with its lm_head swapped for a classification head.

    add_classification_head(model, num_labels)        # lm_head (n_embd -> vocab) becomes score (n_embd -> num_labels)
    logits = classify(model, input_ids, attention_mask, pooling="last")                 # (B, num_labels)

The math. The model maps a text's tokens to hidden states h_1 .. h_T (B, T, C) after the final norm. A classifier
reads one vector per text and scores each class with a linear layer, as Hugging Face's *ForSequenceClassification
do (`score`, Linear(n_embd, num_labels, bias=False)):

    pooling "last":  z = h_t  at the last real token t        (a causal model's only token that has read the whole text)
    pooling "mean":  z = mean of h_1 .. h_n over the real tokens
    logits = z W^T                                            W (num_labels, C), probabilities softmax(logits)

Without a bias the head is linear, so pooling then scoring equals scoring every position then pooling the logits:
h_t W^T at t, and mean(h) W^T = mean(h W^T). classify() therefore runs the model as it is (lm_head now `score`)
and pools its (B, T, num_labels) logits: nothing in lora_lab/model.py changes. (test_pool_then_head_is_head_then_pool)

Padding. Texts of one batch have different lengths. The attention mask (1 real, 0 pad) goes to the model as
segment_ids: the pad tokens form a segment of their own, each real token attends only to the real tokens before it,
and positions restart at 0 at the text's first token, so every text gets exactly the logits it gets alone, whether
the batch is padded on the right or on the left (test_padding_invariance_left_and_right). Pooling reads the last
position whose mask is 1, which is right for both sides (as Hugging Face's last non-pad token).

What trains is the method's choice (finetune/classify.py shows each one in a line):
    features  nothing in the model: pooled hidden states are extracted once and a logistic regression is fitted on
              them (logistic_regression: full-batch L-BFGS on standardised features, then folded back into W, b)
    head      the head only                       blocks   the last N blocks + the final norm + the head
    lora      LoRA adapters + the head            qlora    the same on an NF4 base (the head stays float)
    full      everything

Packing (--packing). Several texts share a row of max_seq_length: segment_ids number them 1, 2, ... along the
row (0 for the padding at its end); the model lets each token attend only to its own text with positions restarting
at its first token, and pool_segments reads each text at its own last token (or averages its own tokens), so every
text gets the logits it gets alone and the loss is the unpacked one (test_packed_loss_equals_unpacked).

Saving. A classifier folder holds classifier_config.json (labels in their fixed order, pooling, method, trained
blocks, the base model and its config, max_seq_length, LoRA and quantization settings) and classifier.safetensors
with exactly the tensors that trained (the head as `score.*`); the base model's weights are read from base_model
again (all of them are in the file for `full`). The tokenizer files are copied too. load_classifier() rebuilds the
model (test_each_method_trains_only_what_it_says_and_reloads_identically). A lora / qlora classifier also has the
usual lora_config.json + lora.safetensors, so `python -m lora_lab.export_peft` exports it (task_type SEQ_CLS,
`score` in modules_to_save);
export_hf_classifier writes head / blocks / full classifiers as a Hugging Face *ForSequenceClassification folder
(`python -m lora_lab.convert --to hf OUT HF_DIR`). Both are tested against transformers and PEFT.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_lab.adapted import load_base
from lora_lab.checkpoint import copy_tokenizer_files, load_config, read_adapter_files, save_adapter_files
from lora_lab.config import Config
from lora_lab.lora import LoRAConfig, load_lora, save_lora
from lora_lab.lora_init import BASE_CHANGING, BASE_OFFSET_FILE, residual_base, save_trained_lora
from lora_lab.model import GPT
from lora_lab.utils import LoraLabError, atomic_path, atomic_write_text

CLASSIFIER_CONFIG_FILE = "classifier_config.json"
CLASSIFIER_WEIGHTS_FILE = "classifier.safetensors"
METHODS = ("features", "head", "blocks", "lora", "qlora", "full")
POOLINGS = ("last", "mean")


def is_classifier(path: Union[str, Path]) -> bool:
    return (Path(path) / CLASSIFIER_CONFIG_FILE).is_file()


# ------------------------------------------------------------------------------------------------------------
# The head swap and the forward
# ------------------------------------------------------------------------------------------------------------
def add_classification_head(model: GPT, num_labels: int, bias: bool = False) -> nn.Linear:
    """Replace model.lm_head by a fresh Linear(n_embd, num_labels) (N(0, 0.02) as Hugging Face initialises
    `score`), float in the embedding's dtype even when the rest of the model is NF4; return it. A tied lm_head
    is untied by this: the embedding matrix stays the input embedding."""
    ref = model.wte.weight
    head = nn.Linear(model.config.n_embd, num_labels, bias=bias, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.02)
        if bias:
            head.bias.zero_()
    model.lm_head = head
    return head


def pool(x: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "last") -> torch.Tensor:
    """(B, T, K) per-position vectors -> (B, K): at the last real token, or averaged over the real tokens."""
    mask = attention_mask.to(x.device)  # (B, T)
    if pooling == "last":
        positions = torch.arange(mask.size(1), device=x.device)  # (T,)
        last = (positions * (mask > 0)).argmax(dim=1)  # (B,) the rightmost real token: left or right padding
        return x[torch.arange(x.size(0), device=x.device), last]  # (B, K)
    if pooling == "mean":
        m = (mask > 0).to(x.dtype).unsqueeze(-1)  # (B, T, 1)
        return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)  # (B, K)
    raise LoraLabError(f"--pool {pooling!r}: use one of {', '.join(POOLINGS)}")


def pool_segments(x: torch.Tensor, segment_ids: torch.Tensor, pooling: str = "last") -> torch.Tensor:
    """(R, T, K) per-position vectors of packed rows -> (N, K), one per text: each text is a run of equal
    segment ids > 0 (0 is padding), read at its own last token or averaged over its own tokens; texts in row
    order, then left to right (the order of the packed batch's labels)."""
    seg = segment_ids.to(x.device)  # (R, T)
    real = seg > 0  # (R, T)
    if pooling == "last":
        last = real.clone()  # (R, T) True at a text's last token: the next token is another text's, or none
        last[:, :-1] &= seg[:, 1:] != seg[:, :-1]
        return x[last]  # (N, K) row-major: row by row, left to right
    if pooling == "mean":
        starts = real.clone()  # (R, T) True at a text's first token
        starts[:, 1:] &= seg[:, 1:] != seg[:, :-1]
        text = starts.flatten().cumsum(0) - 1  # (R*T,) which text each token belongs to (for real tokens)
        keep = real.flatten()
        n = int(starts.sum())
        sums = x.new_zeros(n, x.size(-1)).index_add(0, text[keep], x.flatten(0, 1)[keep])  # (N, K)
        counts = torch.bincount(text[keep], minlength=n).to(x.dtype)  # (N,)
        return sums / counts[:, None]  # (N, K)
    raise LoraLabError(f"--pool {pooling!r}: use one of {', '.join(POOLINGS)}")


def classify(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "last",
             neftune_alpha: float = 0.0, segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Class logits (B, num_labels) of a model whose lm_head is a classification head; with `segment_ids`
    (packed rows, lora_lab/data/classification.py: several texts per row, 1, 2, ... and 0 for padding) the
    logits (N, num_labels) of each of the N texts, each attending only to itself and read at its own tokens."""
    if segment_ids is not None:
        logits = model(input_ids, segment_ids=segment_ids.to(input_ids.device),
                       neftune_alpha=neftune_alpha)  # (R, T, L)
        return pool_segments(logits, segment_ids, pooling)  # (N, L)
    logits = model(input_ids, segment_ids=attention_mask.to(input_ids.device), neftune_alpha=neftune_alpha)  # (B, T, L)
    return pool(logits, attention_mask, pooling)  # (B, L)


@torch.no_grad()
def pooled_hidden_states(model: GPT, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         pooling: str = "last", segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The frozen model's pooled final hidden states (B, C): the features a head (or a logistic regression) reads
    (with segment_ids, packed rows: (N, C), one per text)."""
    if segment_ids is not None:
        hidden = model.hidden_states(input_ids, segment_ids=segment_ids.to(input_ids.device))  # (R, T, C)
        return pool_segments(hidden, segment_ids, pooling).float()  # (N, C)
    hidden = model.hidden_states(input_ids, segment_ids=attention_mask.to(input_ids.device))  # (B, T, C)
    return pool(hidden, attention_mask, pooling).float()  # (B, C)


@torch.no_grad()
def extract_features(model: GPT, loader, pooling: str = "last", device=None, progress: bool = True):
    """(features (N, C) float32, labels (N,)) of every batch of `loader`, in its order, with progress."""
    xs, ys, done, shown = [], [], 0, time.perf_counter()
    total = len(getattr(loader.dataset, "dataset", loader.dataset))  # texts (packed rows hold several)
    for batch in loader:
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        xs.append(pooled_hidden_states(model, ids, mask, pooling, batch.get("segment_ids")).cpu())
        ys.append(batch["labels"])
        done += len(batch["labels"])
        if progress and (done == total or time.perf_counter() - shown > 5):
            shown = time.perf_counter()
            print(f"features: {done}/{total} texts", file=sys.stderr, flush=True)
    return torch.cat(xs), torch.cat(ys)


def logistic_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = 1e-2,
                        max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, written in torch: minimise mean cross-entropy + l2/2 ||W||^2 over
    standardised features with full-batch L-BFGS; returns (W (K, C), b (K,)) for the raw features.

    Standardising (z = (x - mu) / sigma) makes one l2 suit every model (hidden states of LLMs have a few huge
    dimensions); z V^T + c = x (V / sigma)^T + (c - (V / sigma) mu), so W = V / sigma, b = c - W mu."""
    x = x.float()
    mu, sigma = x.mean(0), x.std(0).clamp(min=1e-6)  # (C,) each
    z = (x - mu) / sigma  # (N, C)
    V = torch.zeros(num_classes, x.size(1), requires_grad=True)  # (K, C)
    c = torch.zeros(num_classes, requires_grad=True)  # (K,)
    opt = torch.optim.LBFGS([V, c], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ V.T + c, y) + 0.5 * l2 * (V * V).sum()
        loss.backward()
        return loss

    opt.step(closure)
    W = (V / sigma).detach()  # (K, C)
    return W, (c - W @ mu).detach()


# ------------------------------------------------------------------------------------------------------------
# Scores
# ------------------------------------------------------------------------------------------------------------
def classification_scores(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict:
    """Accuracy, macro-F1 (the mean over classes of 2PR / (P + R), 0 for a class never predicted nor present)
    and the confusion matrix (rows: true class, columns: predicted)."""
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    cm.index_put_((targets.long(), predictions.long()), torch.ones_like(targets, dtype=torch.long), accumulate=True)
    tp = cm.diag().double()
    precision = tp / cm.sum(0).double().clamp(min=1)
    recall = tp / cm.sum(1).double().clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
    n = int(cm.sum())
    return {"n": n, "accuracy": float(tp.sum() / max(n, 1)), "macro_f1": float(f1.mean()),
            "confusion": cm.tolist()}


def format_scores(scores: dict, labels: Sequence[str], split: str) -> str:
    """Accuracy, macro-F1 and the confusion matrix as a few readable lines."""
    width = max(8, *(len(name) for name in labels))
    lines = [f"{split}: {scores['n']} texts, accuracy {scores['accuracy']:.2%}, macro-F1 {scores['macro_f1']:.4f}",
             "  confusion (rows: true, columns: predicted)",
             "  " + " " * width + "".join(f" {name:>{width}}" for name in labels)]
    for name, row in zip(labels, scores["confusion"]):
        lines.append(f"  {name:>{width}}" + "".join(f" {v:>{width}}" for v in row))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# The classifier's files
# ------------------------------------------------------------------------------------------------------------
@dataclass
class ClassifierConfig:
    """Everything needed to rebuild a classifier and read its outputs, saved next to its weights."""

    labels: list[str] = field(default_factory=list)  # class i is labels[i]: the head's output order
    pooling: str = "last"
    method: str = "head"
    trainable_blocks: Optional[int] = None  # method "blocks": how many of the last blocks trained
    base_model: str = ""  # the base checkpoint directory
    base_config: Optional[dict] = None  # its Config.to_dict()
    max_seq_length: int = 512
    head_bias: bool = False  # `features`: the logistic regression's intercept
    lora: Optional[dict] = None  # lora / qlora: LoRAConfig fields (r, alpha, dropout, targets, ...)
    base_quantization: Optional[dict] = None  # qlora: the settings quantize_nf4 recorded (nf4.nf4_settings())
    pad_id: int = 0
    text_column: str = "text"
    label_column: str = "label"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LoraLabError(f"method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.pooling not in POOLINGS:
            raise LoraLabError(f"pooling {self.pooling!r}: use one of {', '.join(POOLINGS)}")
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise LoraLabError(f"labels {self.labels!r}: a classifier needs two or more distinct labels")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise LoraLabError(f"unknown classifier config keys {sorted(unknown)}: not written by this lora_lab "
                               f"version")
        return cls(**d)

    def lora_config(self) -> Optional[LoRAConfig]:
        if self.lora is None:
            return None
        return LoRAConfig(**self.lora, base_model=self.base_model, base_config=self.base_config,
                          base_quantization=self.base_quantization)


def _ours_to_file(name: str) -> str:
    return "score" + name[len("lm_head"):] if name.startswith("lm_head.") else name


def _file_to_ours(name: str) -> str:
    return "lm_head" + name[len("score"):] if name.startswith("score.") else name


def trained_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that train (requires_grad), under the file's names (the head as score.*)."""
    return {_ours_to_file(k): p.detach().cpu() for k, p in model.named_parameters() if p.requires_grad}


def save_classifier(out_dir: Union[str, Path], model: nn.Module, config: ClassifierConfig,
                    tokenizer_dir: Union[str, Path, None] = None) -> Path:
    """classifier_config.json + classifier.safetensors (+ the tokenizer files, + LoRA's own pair for lora/qlora,
    which `python -m lora_lab.export_peft` reads), each written atomically."""
    out_dir = Path(out_dir)
    record = getattr(model, "lora_init_record", None)  # lora_init.init_lora's: set after pissa / olora / loftq
    if config.lora is not None and record:
        # the LoRA pair converted against the untouched checkpoint (rank 2r; + lora_base.safetensors when the base
        # was W minus a low-rank product), as finetune/lora.py saves it; classifier.safetensors keeps the rank-r
        # A, B as trained, for load_classifier to put back on the rebuilt residual base
        save_trained_lora(out_dir, model, config.lora_config(), record)
        if any(".offset_" in k for k in record):
            config = replace(config, lora=dict(config.lora, init=dict(config.lora.get("init") or {},
                                                                         base_offset=BASE_OFFSET_FILE)))
    elif config.lora is not None:
        save_lora(out_dir, model, config.lora_config())
    save_adapter_files(out_dir, trained_state_dict(model), config.to_dict(), CLASSIFIER_WEIGHTS_FILE,
                       CLASSIFIER_CONFIG_FILE)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out_dir)
    return out_dir


def read_classifier(model_dir: Union[str, Path]) -> tuple[ClassifierConfig, dict[str, torch.Tensor]]:
    model_dir = Path(model_dir)
    if not is_classifier(model_dir):
        raise LoraLabError(f"{model_dir} is not a classifier (no {CLASSIFIER_CONFIG_FILE}): train one with "
                           f"`python finetune/classify.py ... --out_dir {model_dir}`")
    return read_adapter_files(model_dir / CLASSIFIER_CONFIG_FILE, model_dir / CLASSIFIER_WEIGHTS_FILE,
                              ClassifierConfig.from_dict, "classifier")


def load_classifier(model_dir: Union[str, Path], checkpoint_dir: Union[str, Path, None] = None, device=None,
                    dtype: Optional[torch.dtype] = None) -> tuple[GPT, ClassifierConfig]:
    """Rebuild a saved classifier (in eval mode): its base model (from checkpoint_dir, default the config's
    base_model; not read for `full`), quantized and adapted as in training, with the trained tensors."""
    model_dir = Path(model_dir)
    config, tensors = read_classifier(model_dir)
    base_config = Config.from_dict(config.base_config)
    lora = config.lora_config()
    if config.method == "full":
        with torch.device("meta"):
            model = GPT(base_config)
    else:
        base_dir = Path(checkpoint_dir or config.base_model)
        if not base_dir.is_dir():
            raise LoraLabError(f"{model_dir}: its base model {base_dir} does not exist here: pass --checkpoint_dir")
        if load_config(base_dir).to_dict() != base_config.to_dict():
            raise LoraLabError(f"{model_dir} was trained on another base model than {base_dir} (the configs differ)")
        residual = None
        if lora is not None and (lora.init or {}).get("method") in BASE_CHANGING:  # pissa / olora / loftq
            if config.base_quantization:  # the NF4 residual base it trained on, bit for bit, + the rank-r A, B
                residual = residual_base(model_dir, lora)
            else:  # a float base: the LoRA pair converted against the untouched W (rank 2r) is the trained model
                lora, converted = load_lora(model_dir)
                tensors = {**{k: v for k, v in tensors.items() if ".lora_" not in k}, **converted}
        model = load_base(base_dir, nf4=config.base_quantization,  # qlora: the NF4 base rebuilt as trained
                          before_quantize=residual)
    add_classification_head(model, len(config.labels), bias=config.head_bias)  # on the meta device for `full`
    if lora is not None:
        lora.inject(model)
    load_trained_state_dict(model, tensors, model_dir / CLASSIFIER_WEIGHTS_FILE, complete=config.method == "full")
    return model.to(device=device, dtype=dtype).eval(), config


def load_trained_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], source, complete: bool = False) -> None:
    """Put trained tensors (file names: the head as score.*) into a model built as in training; one line if they
    do not fit. complete: every tensor of the model must be there (`full`; loaded by assignment, e.g. from meta)."""
    state = {_file_to_ours(k): v for k, v in tensors.items()}
    expected = model.state_dict()
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and expected[k].shape != state[k].shape]
    missing = [k for k in expected if k not in state] if complete else []
    if unexpected or wrong or missing:
        what = (f"unexpected {', '.join(unexpected[:3])}" if unexpected else
                f"other shapes for {', '.join(wrong[:3])}" if wrong else f"missing {', '.join(missing[:3])}")
        raise LoraLabError(f"{source} does not fit the classifier's config ({what}): train it again")
    model.load_state_dict(state, strict=False, assign=complete)


# ------------------------------------------------------------------------------------------------------------
# Hugging Face export: a *ForSequenceClassification folder
# ------------------------------------------------------------------------------------------------------------
def export_hf_classifier(model_dir: Union[str, Path], out_dir: Union[str, Path],
                         dtype: Union[str, torch.dtype, None] = None) -> dict:
    """Write a head / blocks / full classifier as a Hugging Face folder that AutoModelForSequenceClassification
    loads: the base's architecture with ForSequenceClassification, num_labels, id2label, label2id and pad_token_id
    in config.json, the head as score.weight. Returns the config.json dict."""
    from safetensors.torch import save_file

    from lora_lab.formats.hf import _as_dtype, expected_shapes, export_hf_state_dict

    model_dir, out_dir, dtype = Path(model_dir), Path(out_dir), _as_dtype(dtype)
    config, _ = read_classifier(model_dir)
    if config.method in ("lora", "qlora"):
        raise LoraLabError(f"{model_dir} is a {config.method} classifier: export it with `python -m "
                           f"lora_lab.export_peft --adapter_dir {model_dir} --out_dir PEFT_DIR` (PEFT, SEQ_CLS)")
    if config.head_bias:
        raise LoraLabError(f"{model_dir}: a `features` classifier's head has a bias, which Hugging Face's `score` "
                           f"has not: train it with --method head to export it")
    model, config = load_classifier(model_dir)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    base_config = model.config
    for k, shape in expected_shapes(base_config).items():  # the language-model head the export expects: a placeholder
        if k.startswith("lm_head."):
            state[k] = torch.empty(shape)
    hf_config, hf_state = export_hf_state_dict(base_config, state)
    hf_state = {k: v for k, v in hf_state.items() if not k.startswith(("lm_head.", "embed_out."))}
    hf_state["score.weight"] = model.lm_head.weight.detach()
    if dtype is not None:
        hf_state = {k: v.to(dtype) for k, v in hf_state.items()}
    arch = hf_config["architectures"][0]
    hf_config.update(
        architectures=[arch.replace("ForCausalLM", "ForSequenceClassification")],
        id2label={str(i): name for i, name in enumerate(config.labels)},
        label2id={name: i for i, name in enumerate(config.labels)},
        pad_token_id=config.pad_id, problem_type="single_label_classification")
    hf_config["dtype"] = str(next(iter(hf_state.values())).dtype).removeprefix("torch.")
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in hf_state.items()}, str(tmp), metadata={"format": "pt"})
    atomic_write_text(out_dir / "config.json", json.dumps(hf_config, indent=2) + "\n")
    copy_tokenizer_files(model_dir, out_dir)
    return hf_config


def peft_classifier_parts(adapter_dir: Union[str, Path]) -> Optional[dict[str, torch.Tensor]]:
    """For export_peft: the head of a lora / qlora classifier in adapter_dir ({"score.weight": ...}), else None."""
    if not is_classifier(adapter_dir):
        return None
    config, tensors = read_classifier(adapter_dir)
    return {k: v for k, v in tensors.items() if k.startswith("score.")}


__all__ = ["CLASSIFIER_CONFIG_FILE", "CLASSIFIER_WEIGHTS_FILE", "METHODS", "POOLINGS", "ClassifierConfig",
           "add_classification_head", "classification_scores", "classify", "export_hf_classifier",
           "extract_features", "format_scores", "is_classifier", "load_classifier", "load_trained_state_dict",
           "logistic_regression", "peft_classifier_parts", "pool", "pooled_hidden_states", "read_classifier",
           "save_classifier", "trained_state_dict"]
