"""Fine-tune a model as a text classifier: its lm_head becomes a classification head read at the last real token.

    python finetune/classify.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --data reviews.csv --labels fresh,rotten --method blocks --trainable_blocks 2 --out_dir out/classify/blocks

Three ways to make a pretrained LLM a classifier (tutorials/classify.md compares them on real data):
    features        the frozen model's pooled hidden states feed a logistic regression (no gradient through the model)
    head            the transformer stays frozen, only the new head trains
    blocks N | full the last N transformer blocks (+ final norm + head), or every layer, update
and, in between, lora / qlora: LoRA adapters on every linear layer of the blocks (--lora_targets) + the head, on a
float or an NF4 base. The model is the same GPT with lm_head swapped for `score` = Linear(n_embd, num_labels,
bias=False), as Hugging Face's *ForSequenceClassification; lora_lab/classifier.py has the math (pooling, padding).
One visible block of lines in main() decides what trains for each method; everything else stays frozen.

--data is a .csv / .json / .jsonl file with a text and a label column (--text_column, --label_column); --labels
fixes which labels are classes, and their order (other rows are left out, counted). Validation and test texts come
from --val_data / --test_data or are held out of --data (--val_split, --test_split). At the end: accuracy, macro-F1
and the confusion matrix on both. The classifier is saved with its config in out_dir and used by
generate/classify.py, `python -m lora_lab.export_peft` (lora) and `python -m lora_lab.convert --to hf` (head, blocks,
full). Training runs as in finetune/lora.py (the same loop: Fabric, --max_time, Ctrl-C then --resume exactly,
validation, progress with MFU, metrics.csv, --logger_name trackers and loss.png, --compile, --packing).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Literal, Optional, Union

import lightning as L
import torch
import torch.nn.functional as F

from lora_lab import GPT, Tokenizer
from lora_lab.checks import check_args
from lora_lab.checkpoint import load_config
from lora_lab.classifier import (METHODS, POOLINGS, ClassifierConfig, add_classification_head, classification_scores,
                                 classify, extract_features, format_scores, load_trained_state_dict,
                                 logistic_regression, save_classifier, trained_state_dict)
from lora_lab.compile import compile_blocks
from lora_lab.data.classification import classification_dataloaders, load_classification
from lora_lab.distributed import make_fabric
from lora_lab.formats.download import ensure_checkpoint
from lora_lab.flops import FlopsMeter
from lora_lab.generate import peak_memory_bytes, reset_peak_memory
from lora_lab.lora import count_parameters, inject_lora, mark_only_lora_trainable, normalize_targets
from lora_lab.nf4 import quantize_nf4
from lora_lab.plan import plan_script
from lora_lab.training import (TRAIN_STATE_FILE, LRSchedule, MetricsLog, StopRequest, Throughput, format_seconds,
                               iter_keeping_rng, load_train_state, micro_batches, parse_duration, rng_state,
                               save_train_state, set_lr, set_rng_state)
from lora_lab.utils import LoraLabError, atomic_write_text, cli

SCORES_FILE = "scores.json"


def setup(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    data: str = "data.csv",
    out_dir: Path = Path("out/classify"),
    val_data: Optional[str] = None,
    resume: bool = False,
    # classification: the method, how a text becomes one vector, which columns and labels
    method: Literal["features", "head", "blocks", "lora", "qlora", "full"] = "head",
    trainable_blocks: int = 2,
    pool: Literal["last", "mean"] = "last",
    text_column: str = "text",
    label_column: str = "label",
    labels: Optional[Union[tuple[str, ...], str]] = None,
    test_data: Optional[str] = None,
    val_split: float = 0.1,
    test_split: float = 0.1,
    features_l2: float = 1e-2,
    head_learning_rate: Optional[float] = None,
    lora_r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.05,
    lora_targets: Union[tuple[str, ...], str] = ("query", "key", "value", "projection", "mlp"),
    # data
    max_seq_length: int = 256,
    packing: bool = False,
    n_train: Optional[int] = None,
    n_val: Optional[int] = None,
    n_test: Optional[int] = None,
    columns: Optional[dict[str, str]] = None,
    # optimisation
    max_steps: Optional[int] = None,
    epochs: float = 1.0,
    batch_size: int = 16,
    micro_batch_size: int = 8,
    learning_rate: Optional[float] = None,
    weight_decay: float = 0.0,
    warmup_steps: int = 10,
    min_lr: float = 0.0,
    grad_clip: float = 1.0,
    neftune_alpha: float = 0.0,
    activation_checkpointing: bool = False,
    compile: bool = False,
    max_time: Optional[str] = None,
    # evaluation, checkpoints, logging
    eval_interval: int = 25,
    eval_iters: int = 100,
    save_interval: int = 100,
    log_interval: int = 1,
    logger_name: Literal["csv", "tensorboard", "mlflow", "wandb"] = "csv",
    seed: int = 42,
    # hardware
    precision: Optional[str] = None,
    peak_flops: Optional[float] = None,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: Literal["auto", "ddp"] = "auto",
    plan: bool = False,
) -> None:
    """Fine-tune a classifier.

    Args:
        checkpoint_dir: the base model (a lora_lab checkpoint: see `python -m lora_lab.download`).
        data: a .csv / .json / .jsonl file of labelled texts.
        out_dir: where the classifier, its config, scores.json, metrics.csv and the resume state go.
        val_data: a separate validation file (default: a held-out share of `data`, --val_split).
        resume: continue the interrupted run in out_dir exactly where it stopped.
        method: features (logistic regression on frozen features), head, blocks (the last --trainable_blocks),
            lora, qlora (LoRA on an NF4 base) or full.
        trainable_blocks: --method blocks: how many transformer blocks, counted from the output, train.
        pool: read each text at its last real token (as Hugging Face does) or average over its tokens.
        text_column: the column holding the texts.
        label_column: the column holding the labels.
        labels: the classes, in order (fresh,rotten); rows with other labels are left out. Default: every label
            of the training rows, sorted.
        test_data: a separate test file (default: a held-out share of `data`, --test_split).
        val_split: share of `data` held out for validation when there is no --val_data.
        test_split: share of `data` held out for testing when there is no --test_data.
        features_l2: --method features: the logistic regression's L2 penalty (on standardised features).
        head_learning_rate: the new head's peak learning rate, when pretrained weights train with it (blocks, lora,
            qlora, full): a freshly initialised head needs a larger one than they do (default 2e-3, head's).
        lora_r: lora / qlora: rank of the update B A.
        lora_alpha: the update is scaled by lora_alpha / lora_r.
        lora_dropout: dropout on the LoRA branch's input.
        lora_targets: layers to adapt (default every linear layer of the blocks): query, key, value, projection,
            mlp.
        max_seq_length: longer texts are cut to their first max_seq_length tokens (and counted).
        packing: put several training texts in each row of max_seq_length (no padding; each attends only to
            itself and is read at its own last token); batch_size and micro_batch_size then count rows.
        n_train: use only the first n_train training texts.
        n_val: likewise for validation texts.
        n_test: likewise for test texts (scored once at the end: fewer is faster).
        columns: your file's column names as '{"text": "review", "label": "sentiment"}' (the same as
            --text_column review --label_column sentiment).
        max_steps: optimizer steps (default: `epochs` passes over the data).
        epochs: passes over the training data when max_steps is not given.
        batch_size: global batch size in texts per optimizer step (over all devices).
        micro_batch_size: texts per forward/backward pass on one device; gradients accumulate to batch_size.
        learning_rate: peak learning rate, after a linear warm-up, decayed to min_lr by a cosine (default per
            method: head 2e-3, blocks 1e-4, lora / qlora 1e-3, full 5e-5).
        weight_decay: AdamW weight decay on the trainable parameters.
        warmup_steps: optimizer steps of linear warm-up.
        min_lr: learning rate at the end of the cosine decay.
        grad_clip: clip the gradient norm to this (0 to disable).
        neftune_alpha: NEFTune noise on the embeddings while training (0 = off).
        activation_checkpointing: recompute activations in the backward pass: less memory, slower.
        compile: torch.compile each transformer block for training (minutes to compile; fastest with --packing;
            --method features trains nothing and runs eagerly).
        max_time: time budget (3600, 90m, 1.5h, 23:30:00): the warm-up and cosine decay are laid over it (re-estimated
            from the step time) and the run stops, at min_lr, evaluated and saved, when the next step would not
            fit. The run also ends at max_steps / epochs if that comes first.
        eval_interval: validate every this many optimizer steps.
        eval_iters: at most this many validation batches per validation (the final scores use all).
        save_interval: save the classifier and resume state every this many optimizer steps.
        log_interval: print progress every this many optimizer steps.
        logger_name: where metrics and hyperparameters go besides metrics.csv and hparams.yaml: csv (nowhere
            else), tensorboard, mlflow or wandb (lora_lab/loggers.py). loss.png is drawn at every save.
        seed: seeds the held-out split, data order, initialisation and dropout.
        precision: 32-true, bf16-true, bf16-mixed, 16-mixed (default: bf16-true on GPU, 32-true on CPU).
        peak_flops: the device's peak FLOP/s for the MFU figure (default: the GPU's datasheet, or a CPU probe).
        devices: devices per node (data parallel over them).
        num_nodes: nodes, as Fabric launches them.
        strategy: auto or ddp.
        plan: print the memory this run needs per device (python -m lora_lab.plan) and exit.
    """
    check_args(locals())  # every argument that can be judged without data or a model, before anything slow
    if plan:  # the memory plan of these arguments, and nothing else (lora_lab/plan.py)
        return plan_script(locals(), __file__)
    checkpoint_dir = ensure_checkpoint(checkpoint_dir)  # the default model is fetched once if missing
    if precision is None:
        precision = "bf16-true" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    fabric = make_fabric(devices, num_nodes, strategy, precision)  # fsdp: FSDP2 units (lora_lab/distributed.py)
    fabric.launch()
    args = dict(locals())
    del args["fabric"]
    main(fabric, **args)


def main(fabric: L.Fabric, checkpoint_dir: Path, data: str, out_dir: Path, val_data: Optional[str], resume: bool,
         method: str, trainable_blocks: int, pool: str, text_column: str, label_column: str,
         labels: Optional[Union[tuple[str, ...], str]], test_data: Optional[str], val_split: float, test_split: float,
         features_l2: float, head_learning_rate: Optional[float], lora_r: int, lora_alpha: float, lora_dropout: float,
         lora_targets: Union[tuple[str, ...], str], max_seq_length: int, packing: bool, n_train: Optional[int],
         n_val: Optional[int], n_test: Optional[int], columns: Optional[dict], max_steps: Optional[int],
         epochs: float, batch_size: int, micro_batch_size: int,
         learning_rate: Optional[float], weight_decay: float, warmup_steps: int, min_lr: float, grad_clip: float,
         neftune_alpha: float, activation_checkpointing: bool, compile: bool, max_time: Optional[str],
         eval_interval: int, eval_iters: int, save_interval: int, log_interval: int, logger_name: str, seed: int,
         precision: str, peak_flops: Optional[float], devices: int, num_nodes: int, strategy: str,
         plan: bool) -> None:
    hparams = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items() if k != "fabric"}
    out_dir = Path(out_dir)
    # cheap checks of the arguments first, so that a mistake is reported before minutes of data and model loading
    base_config = load_config(checkpoint_dir)  # one line if checkpoint_dir is not a lora_lab checkpoint
    check_classify_settings(method, pool, trainable_blocks, base_config.n_layer)
    lora_targets = normalize_targets(lora_targets.split(",") if isinstance(lora_targets, str) else lora_targets)
    labels = labels.split(",") if isinstance(labels, str) else labels
    learning_rate = DEFAULT_LEARNING_RATES[method] if learning_rate is None else learning_rate
    head_learning_rate = head_learning_rate or (learning_rate if method == "head" else DEFAULT_LEARNING_RATES["head"])
    if fabric.world_size > 1 and batch_size % (micro_batch_size * fabric.world_size):
        raise LoraLabError(f"batch_size={batch_size} is not a multiple of micro_batch_size x devices = "
                           f"{micro_batch_size * fabric.world_size}")
    grad_accum = max(1, batch_size // (micro_batch_size * fabric.world_size))
    if resume and not (out_dir / TRAIN_STATE_FILE).is_file():
        raise LoraLabError(f"--resume: {out_dir / TRAIN_STATE_FILE} does not exist: there is no interrupted run in "
                           f"{out_dir} to resume (start without --resume)")
    if not resume and (out_dir / TRAIN_STATE_FILE).is_file():
        raise LoraLabError(f"{out_dir} already holds a run: add --resume to continue it, or choose another "
                           "--out_dir")
    fabric.seed_everything(seed)

    # ---- data --------------------------------------------------------------------------------------------------
    tokenizer = Tokenizer(checkpoint_dir)
    if columns:
        text_column, label_column = columns.get("text", text_column), columns.get("label", label_column)
    rows = load_classification(data, text_column, label_column, labels, val_data, test_data, val_split, test_split,
                               seed=seed, n_train=n_train, n_val=n_val, n_test=n_test)
    pad_id = tokenizer.eos_id or 0  # any id will do: the attention mask, not the id, tells the model what is padding
    train_dl, val_dl, test_dl, data_stats = classification_dataloaders(
        rows, tokenizer, max_seq_length=max_seq_length, micro_batch_size=micro_batch_size, seed=seed, pad_id=pad_id,
        verbose=fabric.is_global_zero, packing=packing)
    if max_steps is None:
        max_steps = max(1, math.ceil(epochs * data_stats["n_train"] / batch_size))

    # ---- the model: load the base, swap lm_head for a classification head, decide what trains ----------------
    model = GPT.from_checkpoint(checkpoint_dir)
    if method == "qlora":
        quantize_nf4(model)  # every nn.Linear of the blocks -> NF4 (4-bit, frozen); the new head below stays float
    add_classification_head(model, len(rows.labels), bias=method == "features")  # lm_head -> score (n_embd -> labels)
    if method in ("lora", "qlora"):
        inject_lora(model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=lora_targets)
    # what trains, one line per method; every other parameter stays frozen, bit for bit
    model.requires_grad_(False)
    if method == "head":
        model.lm_head.requires_grad_(True)
    elif method == "blocks":
        for module in [*model.blocks[-trainable_blocks:], model.norm_f, model.lm_head]:
            module.requires_grad_(True)
    elif method in ("lora", "qlora"):
        mark_only_lora_trainable(model)
        model.lm_head.requires_grad_(True)
    elif method == "full":
        model.requires_grad_(True)
    # (features: nothing in the model trains; the head is fitted as a logistic regression below)
    model.activation_checkpointing = activation_checkpointing
    classifier_config = ClassifierConfig(
        labels=rows.labels, pooling=pool, method=method,
        trainable_blocks=trainable_blocks if method == "blocks" else None, base_model=str(checkpoint_dir),
        base_config=base_config.to_dict(), max_seq_length=max_seq_length, head_bias=method == "features",
        lora=dict(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=list(lora_targets))
        if method in ("lora", "qlora") else None,
        base_quantization=getattr(model, "base_quantization", None),  # what quantize_nf4 used (qlora), else None
        pad_id=pad_id, text_column=text_column, label_column=label_column)
    trainable, total = count_parameters(model)
    fabric.print(f"Classifier ({method}, {pool} token pooling, {len(rows.labels)} classes): {trainable:,} trainable "
                 f"parameters of {total:,} ({100 * trainable / total:.2f}%)")
    t0 = time.perf_counter()
    reset_peak_memory(fabric.device)
    if method == "features":  # no optimizer, no gradient through the model: features once, then a regression
        gpt = fabric.to_device(model)
        fit_features(fabric, gpt, train_dl, classifier_config, features_l2, out_dir)
        state = {"step": 0}
    else:
        # the new head learns at head_learning_rate, the pretrained weights that train at learning_rate
        pretrained = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("lm_head.")]
        param_groups = ([{"params": pretrained}] if pretrained else []) + [
            {"params": list(model.lm_head.parameters()), "lr_ratio": head_learning_rate / learning_rate}]
        optimizer = torch.optim.AdamW(param_groups, lr=learning_rate, weight_decay=weight_decay, betas=(0.9, 0.95))
        gpt = model  # the plain module, for evaluation and saving
        model, optimizer = fabric.setup(model, optimizer)

        state = {"step": 0, "micro_batches": 0, "tokens": 0}
        if compile:  # torch.compile each block for training (lora_lab/compile.py)
            compile_blocks(gpt)
        if resume:
            saved = load_train_state(out_dir / TRAIN_STATE_FILE)
            load_trained_state_dict(gpt, saved["trained"], out_dir / TRAIN_STATE_FILE)
            optimizer.load_state_dict(saved["optimizer"])
            train_dl.batch_sampler.load_state_dict(saved["sampler"])
            set_rng_state(saved["rng"])
            state.update(saved["counters"])
            fabric.print(f"Resuming from step {state['step']} of {max_steps}")
        fit(fabric, model, gpt, optimizer, train_dl, val_dl, state, classifier_config, hparams, out_dir, max_steps,
            grad_accum, learning_rate, warmup_steps, min_lr, grad_clip, neftune_alpha, parse_duration(max_time),
            eval_interval, eval_iters, save_interval, log_interval)
    train_seconds, peak = time.perf_counter() - t0, peak_memory_bytes(fabric.device)
    if method == "features":  # (the training methods' fit() ends with this line's figures, MFU included)
        fabric.print(f"Features of {data_stats['n_samples']:,} texts and the logistic regression in "
                     f"{format_seconds(train_seconds)} | peak memory {peak / 2**30:.2f} GiB")
    if not state.get("stopped"):
        scores = {split: evaluate(fabric, gpt, loader, classifier_config, split)
                  for split, loader in (("validation", val_dl), ("test", test_dl)) if loader is not None}
        if fabric.is_global_zero:
            atomic_write_text(out_dir / SCORES_FILE, json.dumps({
                "method": method, "pooling": pool, "labels": rows.labels, "train_seconds": train_seconds,
                "peak_memory_bytes": peak, "steps": state["step"], "trainable_parameters": trainable,
                "data": {k: v for k, v in data_stats.items() if k != "source"}, **scores}, indent=2) + "\n")


def check_classify_settings(method: str, pool: str, trainable_blocks: int, n_layer: int) -> None:
    if method not in METHODS:
        raise LoraLabError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    if pool not in POOLINGS:
        raise LoraLabError(f"--pool {pool!r}: use one of {', '.join(POOLINGS)}")
    if method == "blocks" and not 1 <= trainable_blocks <= n_layer:
        raise LoraLabError(f"--trainable_blocks {trainable_blocks}: the model has {n_layer} blocks; train 1 to "
                           f"{n_layer} of them (or --method full)")


DEFAULT_LEARNING_RATES = {"features": 0.0, "head": 2e-3, "blocks": 1e-4, "lora": 1e-3, "qlora": 1e-3, "full": 5e-5}


def fit_features(fabric, gpt, train_dl, classifier_config, l2: float, out_dir: Path) -> None:
    """The feature-based classifier: pooled hidden states of the frozen model (once, no gradient), then a
    multinomial logistic regression on them, whose weights and intercept become the head."""
    gpt.eval()
    x, y = extract_features(gpt, train_dl, classifier_config.pooling, fabric.device,
                            progress=fabric.is_global_zero)
    W, b = logistic_regression(x, y, len(classifier_config.labels), l2=l2)
    with torch.no_grad():
        gpt.lm_head.weight.copy_(W)
        gpt.lm_head.bias.copy_(b)
    gpt.lm_head.requires_grad_(True)  # what is saved: the tensors that "trained"
    fabric.print(f"Logistic regression on {x.shape[0]} x {x.shape[1]} features (L2 {l2})")
    if fabric.is_global_zero:
        save_classifier(out_dir, gpt, classifier_config, tokenizer_dir=classifier_config.base_model)
    fabric.print(f"Classifier saved to {out_dir}")


def fit(fabric, model, gpt, optimizer, train_dl, val_dl, state, classifier_config, hparams, out_dir, max_steps,
        grad_accum, learning_rate, warmup_steps, min_lr, grad_clip, neftune_alpha, max_time, eval_interval,
        eval_iters, save_interval, log_interval) -> None:
    stop = StopRequest()
    metrics = MetricsLog(out_dir / "metrics.csv", fabric, start_step=state["step"], logger_name=hparams["logger_name"],
                         hparams=hparams)  # + hparams.yaml, an experiment tracker, loss.png
    throughput = Throughput(state["step"], max_steps)
    # warm-up and cosine decay over max_steps, or over the --max_time budget (lora_lab/training.py)
    schedule = LRSchedule(learning_rate, warmup_steps, min_lr, max_steps, max_time, state,
                          sync=fabric.broadcast if fabric.world_size > 1 else None)
    earlier_seconds = state.get("seconds", 0.0)  # a resumed run's time before the interruption
    flops = FlopsMeter.for_fabric(gpt, fabric, hparams["peak_flops"])  # model FLOPs, for MFU (lora_lab/flops.py)
    reset_peak_memory(fabric.device)
    batches = micro_batches(train_dl, fabric.global_rank, fabric.world_size, state)
    val_loss = None

    while state["step"] < max_steps:
        lr = schedule.lr(state["step"])
        set_lr(optimizer, lr)
        loss_sum = 0.0
        for i in range(grad_accum):
            batch = next(batches)
            # gradients are averaged over devices only at the last micro-batch of the step
            with fabric.no_backward_sync(model, enabled=i < grad_accum - 1):
                logits = classify(model, batch["input_ids"], batch["attention_mask"], classifier_config.pooling,
                                  neftune_alpha, segment_ids=batch.get("segment_ids"))  # (texts, num_labels)
                loss = F.cross_entropy(logits.float(), batch["labels"].to(logits.device))
                fabric.backward(loss / grad_accum)
            if not torch.isfinite(loss):
                raise not_finite("loss", loss.item(), state["step"] + 1, out_dir)
            loss_sum += loss.item()
            state["tokens"] += batch["input_ids"].numel() * fabric.world_size
            throughput.update(batch["input_ids"].numel() * fabric.world_size)
            flops.update(batch)
        if grad_clip:
            norm = fabric.clip_gradients(model, optimizer, max_norm=grad_clip, error_if_nonfinite=False)
            if not torch.isfinite(norm):  # a finite loss whose gradient overflowed
                raise not_finite("gradient norm", norm.item(), state["step"] + 1, out_dir)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step_done()
        state["step"] += 1
        state["seconds"] = earlier_seconds + throughput.elapsed()
        step, train_loss = state["step"], loss_sum / grad_accum
        if fabric.world_size > 1:  # the loss of the global batch, not only of this device's share
            train_loss = fabric.all_reduce(torch.tensor(train_loss, device=fabric.device), reduce_op="mean").item()

        if step % log_interval == 0 or step == max_steps:
            fabric.print(f"step {step}/{max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | "
                         f"{throughput.tokens_per_sec():,.0f} tok/s | {flops.format(throughput.elapsed())} | "
                         f"ETA {format_seconds(throughput.eta(step))}")
        row = {"step": step, "train_loss": train_loss, "lr": lr, "tokens": state["tokens"],
               "tokens_per_sec": throughput.tokens_per_sec()}
        out_of_time = schedule.out_of_time()
        stop_requested = stop.requested
        if fabric.world_size > 1:
            # every device must take the same branch below (validate, save, break): a device that trained on
            # alone would wait forever for the others in its next gradient all-reduce. Each device has its own
            # clock and Ctrl-C reaches them at slightly different times, so agree: stop if any device says so
            flags = torch.tensor([out_of_time, stop_requested], dtype=torch.float32, device=fabric.device)
            out_of_time, stop_requested = (bool(f) for f in fabric.all_reduce(flags, reduce_op="sum").tolist())
        if val_dl is not None and (step % eval_interval == 0 or step == max_steps or out_of_time):
            val_loss, val_accuracy = validate(fabric, model, val_dl, eval_iters, classifier_config.pooling)
            row.update(val_loss=val_loss)
            fabric.print(f"step {step}: val loss {val_loss:.4f}, val accuracy {val_accuracy:.2%}")
        metrics.log(row)
        if step % save_interval == 0 or step == max_steps or out_of_time or stop_requested:
            save(fabric, gpt, optimizer, train_dl, state, classifier_config, hparams, out_dir)
            metrics.plot()  # OUT_DIR/loss.png, up to date with what is saved
        if out_of_time:
            fabric.print(f"Time budget of {format_seconds(max_time)} spent after step {step}: stopping")
            break
        if stop_requested:
            fabric.print(f"Stopped at step {step}; state saved: resume with the same command and --resume")
            state["stopped"] = True
            break
    stop.restore()  # Ctrl-C interrupts as usual again
    metrics.finish()  # the final loss.png; the tracker's files closed

    fabric.print(f"Trainable parameters {count_parameters(gpt)[0]:,} | {state['step']} steps in "
                 f"{format_seconds(state.get('seconds', 0.0))} | "
                 f"{state['tokens'] / max(state.get('seconds', 0.0), 1e-9):,.0f} tokens/s | "
                 f"{flops.summary(throughput.elapsed())} | "
                 f"peak memory {peak_memory_bytes(fabric.device) / 2**30:.2f} GiB"
                 + (f" | final val loss {val_loss:.4f}" if val_loss is not None else ""))
    fabric.print(f"Classifier saved to {out_dir}")


def not_finite(what: str, value: float, step: int, out_dir: Path) -> LoraLabError:
    saved = (f"; the last saved state is in {out_dir} (continue from it with --resume)"
             if (out_dir / TRAIN_STATE_FILE).is_file() else "")
    return LoraLabError(f"the {what} is {value} at step {step}: lower --learning_rate (or use --precision 32-true)"
                        + saved)


@torch.no_grad()
def validate(fabric, model, val_dl, eval_iters: int, pooling: str) -> tuple[float, float]:
    """Mean validation loss and accuracy over (at most) eval_iters batches."""
    model.eval()
    losses, correct, n = [], 0, 0
    for i, batch in enumerate(iter_keeping_rng(val_dl)):  # validating must not change training's dropout masks
        if i >= eval_iters:
            break
        logits = classify(model, batch["input_ids"], batch["attention_mask"], pooling)  # (B, num_labels)
        labels = batch["labels"].to(logits.device)
        losses.append(F.cross_entropy(logits.float(), labels))
        correct, n = correct + int((logits.argmax(-1) == labels).sum()), n + labels.numel()
    model.train()
    return fabric.all_reduce(torch.stack(losses).mean(), reduce_op="mean").item(), correct / max(n, 1)


@torch.no_grad()
def evaluate(fabric, gpt, loader, classifier_config, split: str) -> dict:
    """Accuracy, macro-F1 and the confusion matrix of the final classifier on every text of a split."""
    gpt.eval()
    predictions, targets = [], []
    for batch in iter_keeping_rng(loader):
        ids = batch["input_ids"].to(fabric.device)
        logits = classify(gpt, ids, batch["attention_mask"].to(fabric.device), classifier_config.pooling)
        predictions.append(logits.argmax(-1).cpu())
        targets.append(batch["labels"])
    scores = classification_scores(torch.cat(predictions), torch.cat(targets), len(classifier_config.labels))
    fabric.print(format_scores(scores, classifier_config.labels, split))
    return scores


def save(fabric, gpt, optimizer, train_dl, state, classifier_config, hparams, out_dir) -> None:
    """The classifier (for generate/classify.py and the exports) and the resume state, each written atomically."""
    if fabric.is_global_zero:
        save_classifier(out_dir, gpt, classifier_config, tokenizer_dir=classifier_config.base_model)
        save_train_state(out_dir / TRAIN_STATE_FILE, {
            "trained": trained_state_dict(gpt),
            "optimizer": optimizer.state_dict(),
            "sampler": train_dl.batch_sampler.state_dict(),
            "rng": rng_state(),
            "counters": {k: v for k, v in state.items() if k != "stopped"},
            "hparams": hparams,
        })
    fabric.barrier()


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    cli(setup)
