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
from dataclasses import replace
from pathlib import Path
from typing import Literal, Optional

import lightning as L
import torch
import torch.nn.functional as F

from lora_lab import GPT, Tokenizer
from lora_lab.args import (ClassifierLoRAArgs, HardwareArgs, LabelledDataArgs, LogArgs, TrainArgs, ValidateArgs, run_record,
                           with_precision)
from lora_lab.checks import check_args
from lora_lab.classifier import (METHODS, POOLINGS, ClassifierConfig, add_classification_head, classification_scores,
                                 classify, extract_features, format_scores, load_trained_state_dict,
                                 logistic_regression, save_classifier, trained_state_dict)
from lora_lab.compile import compile_blocks
from lora_lab.data.classification import classification_dataloaders, load_classification
from lora_lab.distributed import (SHARDS_DIR, gathered, is_sharded, load_sharded_state, make_fabric,
                                  optimizer_state, report_shards, save_sharded_state)
from lora_lab.formats.download import ensure_checkpoint
from lora_lab.flops import FlopsMeter
from lora_lab.generate import peak_memory_bytes, reset_peak_memory
from lora_lab.lora import count_parameters, inject_lora, mark_only_lora_trainable, normalize_targets
from lora_lab.lora_init import init_config, init_lora
from lora_lab.nf4 import nf4_settings, quantize_nf4
from lora_lab.plan import plan_script
from lora_lab.training import (TRAIN_STATE_FILE, LRSchedule, MetricsLog, StopRequest, Throughput, check_run,
                               format_seconds,
                               iter_keeping_rng, load_train_state, micro_batches, parse_duration, rng_state,
                               save_train_state, set_lr, set_rng_state)
from lora_lab.utils import LoraLabError, atomic_write_text, cli

SCORES_FILE = "scores.json"


def setup(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    out_dir: Path = Path("out/classify"),
    resume: bool = False,
    method: Literal["features", "head", "blocks", "lora", "qlora", "full"] = "head",
    trainable_blocks: int = 2,
    pool: Literal["last", "mean"] = "last",
    features_l2: float = 1e-2,
    head_learning_rate: Optional[float] = None,
    lora: ClassifierLoRAArgs = ClassifierLoRAArgs(r=8, alpha=16.0, dropout=0.05,
                                                  targets=("query", "key", "value", "projection", "mlp"),
                                                  init="kaiming"),
    data: LabelledDataArgs = LabelledDataArgs(source="data.csv", text_column="text", label_column="label",
                                              max_seq_length=256),
    train: TrainArgs = TrainArgs(batch_size=16, micro_batch_size=8, learning_rate=None, weight_decay=0.0),
    eval: ValidateArgs = ValidateArgs(interval=25, iters=100),
    log: LogArgs = LogArgs(save_interval=100, interval=1, logger_name="csv"),
    hardware: HardwareArgs = HardwareArgs(),
    seed: int = 42,
    plan: bool = False,
) -> None:
    """Fine-tune a classifier.

    Each group's fields are nested flags (`--lora.r 16`, `--train.learning_rate 1e-3`); the flat flags in brackets
    (`--lora_r 16`, `--learning_rate 1e-3`) work as well, in a --config YAML file too.

    Args:
        checkpoint_dir: the base model (a lora_lab checkpoint: see `python -m lora_lab.download`).
        out_dir: where the classifier, its config, scores.json, metrics.csv and the resume state go.
        resume: continue the interrupted run in out_dir exactly where it stopped.
        method: features (logistic regression on frozen features), head, blocks (the last --trainable_blocks), lora,
            qlora (LoRA on an NF4 base) or full.
        trainable_blocks: --method blocks: how many transformer blocks, counted from the output, train.
        pool: read each text at its last real token (as Hugging Face does) or average over its tokens.
        features_l2: --method features: the logistic regression's L2 penalty (on standardised features).
        head_learning_rate: the new head's peak learning rate, when pretrained weights train with it (blocks, lora,
            qlora, full): a freshly initialised head needs a larger one than they do (default 2e-3, head's).
        lora: --method lora / qlora: which layers get an update, its rank and scale.
        lora.r: [--lora_r] lora / qlora: rank of the update B A.
        lora.alpha: [--lora_alpha] the update is scaled by lora_alpha / lora_r.
        lora.dropout: [--lora_dropout] dropout on the LoRA branch's input.
        lora.targets: [--lora_targets] layers to adapt (default every linear layer of the blocks): query, key, value,
            projection, mlp, experts (a mixture of experts' expert projections).
        lora.init: [--lora_init] where A, B (and the base) start (lora_lab/lora_init.py): kaiming (A
            Kaiming-uniform, B = 0), gaussian, pissa / pissa_niter_N, olora, loftq (--method qlora only); the saved
            classifier loads back on the base it trained on (load_classifier rebuilds the residual).
        lora.loftq_iter: [--loftq_iter] --lora.init loftq: alternating quantize / SVD steps.
        data: the labelled texts: the file, its columns and classes, the held-out splits.
        data.source: [--data] a .csv / .json / .jsonl file of labelled texts.
        data.val_data: [--val_data] a separate validation file (default: a held-out share of `data`, --val_split).
        data.text_column: [--text_column] the column holding the texts.
        data.label_column: [--label_column] the column holding the labels.
        data.labels: [--labels] the classes, in order (fresh,rotten); rows with other labels are left out. Default:
            every label of the training rows, sorted.
        data.test_data: [--test_data] a separate test file (default: a held-out share of `data`, --test_split).
        data.val_split: [--val_split] share of `data` held out for validation when there is no --val_data.
        data.test_split: [--test_split] share of `data` held out for testing when there is no --test_data.
        data.max_seq_length: [--max_seq_length] longer texts are cut to their first max_seq_length tokens (and counted).
        data.n_train: [--n_train] use only the first n_train training texts.
        data.n_val: [--n_val] likewise for validation texts.
        data.n_test: [--n_test] likewise for test texts (scored once at the end: fewer is faster).
        data.columns: [--columns] your file's column names as '{"text": "review", "label": "sentiment"}' (the same as
            --text_column review --label_column sentiment).
        data.packing: [--packing] put several training texts in each row of max_seq_length (no padding; each attends
            only to itself and is read at its own last token); batch_size and micro_batch_size then count rows.
        train: optimisation.
        train.max_steps: [--max_steps] optimizer steps (default: `epochs` passes over the data).
        train.epochs: [--epochs] passes over the training data when max_steps is not given.
        train.batch_size: [--batch_size] global batch size in texts per optimizer step (over all devices).
        train.micro_batch_size: [--micro_batch_size] texts per forward/backward pass on one device; gradients accumulate
            to batch_size.
        train.learning_rate: [--learning_rate] peak learning rate, after a linear warm-up, decayed to min_lr by a cosine
            (default per method: head 2e-3, blocks 1e-4, lora / qlora 1e-3, full 5e-5).
        train.weight_decay: [--weight_decay] AdamW weight decay on the trainable parameters.
        train.warmup_steps: [--warmup_steps] optimizer steps of linear warm-up.
        train.min_lr: [--min_lr] learning rate at the end of the cosine decay.
        train.grad_clip: [--grad_clip] clip the gradient norm to this (0 to disable).
        train.neftune_alpha: [--neftune_alpha] NEFTune noise on the embeddings while training (0 = off).
        train.activation_checkpointing: [--activation_checkpointing] recompute activations in the backward pass: less
            memory, slower.
        train.compile: [--compile] torch.compile each transformer block for training (minutes to compile; fastest with
            --packing; --method features trains nothing and runs eagerly).
        train.max_time: [--max_time] time budget (3600, 90m, 1.5h, 23:30:00): the warm-up and cosine decay are laid over
            it (re-estimated from the step time) and the run stops, at min_lr, evaluated and saved, when the next step
            would not fit. The run also ends at max_steps / epochs if that comes first.
        eval: evaluation.
        eval.interval: [--eval_interval] validate every this many optimizer steps.
        eval.iters: [--eval_iters] at most this many validation batches per validation (the final scores use all).
        log: checkpoints and logging.
        log.save_interval: [--save_interval] save the classifier and resume state every this many optimizer steps.
        log.interval: [--log_interval] print progress every this many optimizer steps.
        log.logger_name: [--logger_name] where metrics and hyperparameters go besides metrics.csv and hparams.yaml: csv
            (nowhere else), tensorboard, mlflow or wandb (lora_lab/loggers.py). loss.png is drawn at every save.
        hardware: devices and number format.
        hardware.precision: [--precision] 32-true, bf16-true, bf16-mixed, 16-mixed (default: bf16-true on GPU, 32-true
            on CPU).
        hardware.peak_flops: [--peak_flops] the device's peak FLOP/s for the MFU figure (default: the GPU's datasheet,
            or a CPU probe).
        hardware.devices: [--devices] devices per node (data parallel over them).
        hardware.num_nodes: [--num_nodes] nodes, as Fabric launches them.
        hardware.strategy: [--strategy] auto, ddp, or fsdp to shard the model over GPUs (not --method features).
        seed: seeds the held-out split, data order, initialisation and dropout.
        plan: print the memory this run needs per device (python -m lora_lab.plan) and exit.
    """
    check_args(locals())  # every argument that can be judged without data or a model, before anything slow
    if plan:  # the memory plan of these arguments, and nothing else (lora_lab/plan.py)
        return plan_script(locals(), __file__)
    checkpoint_dir = ensure_checkpoint(checkpoint_dir)  # the default model is fetched once if missing
    hardware = with_precision(hardware)  # default: bf16-true on a GPU that has it, else 32-true
    fabric = make_fabric(hardware.devices, hardware.num_nodes, hardware.strategy, hardware.precision)  # fsdp: FSDP2
    fabric.launch()
    main(fabric, checkpoint_dir, out_dir, resume, method, trainable_blocks, pool, features_l2, head_learning_rate, lora,
         data, train, eval, log, hardware, seed)


def main(fabric: L.Fabric, checkpoint_dir: Path, out_dir: Path, resume: bool, method: str, trainable_blocks: int,
         pool: str, features_l2: float, head_learning_rate: Optional[float], lora: ClassifierLoRAArgs, data: LabelledDataArgs,
         train: TrainArgs, eval: ValidateArgs, log: LogArgs, hardware: HardwareArgs, seed: int) -> None:
    hparams = run_record(locals())  # the flat arguments, for hparams.yaml and the resume state
    out_dir = Path(out_dir)
    # cheap checks first, so that a mistake is reported before minutes of data and model loading
    base_config = check_run(fabric, checkpoint_dir, out_dir, resume, train.batch_size, train.micro_batch_size)
    check_classify_settings(method, pool, trainable_blocks, base_config.n_layer)
    lora_targets = normalize_targets(lora.targets.split(",") if isinstance(lora.targets, str) else lora.targets)
    labels = data.labels.split(",") if isinstance(data.labels, str) else data.labels
    if train.learning_rate is None:
        train = replace(train, learning_rate=DEFAULT_LEARNING_RATES[method])
    head_learning_rate = head_learning_rate or (train.learning_rate if method == "head" else
                                                DEFAULT_LEARNING_RATES["head"])
    fabric.seed_everything(seed)

    # ---- data --------------------------------------------------------------------------------------------------
    tokenizer = Tokenizer(checkpoint_dir)
    text_column, label_column = data.text_column, data.label_column
    if data.columns:
        text_column, label_column = data.columns.get("text", text_column), data.columns.get("label", label_column)
    rows = load_classification(data.source, text_column, label_column, labels, data.val_data, data.test_data,
                               data.val_split, data.test_split, seed=seed, n_train=data.n_train, n_val=data.n_val,
                               n_test=data.n_test)
    pad_id = tokenizer.eos_id or 0  # any id will do: the attention mask, not the id, tells the model what is padding
    train_dl, val_dl, test_dl, data_stats = classification_dataloaders(
        rows, tokenizer, max_seq_length=data.max_seq_length, micro_batch_size=train.micro_batch_size, seed=seed,
        pad_id=pad_id, verbose=fabric.is_global_zero, packing=data.packing)
    if train.max_steps is None:
        train = replace(train, max_steps=max(1, math.ceil(train.epochs * data_stats["n_train"] / train.batch_size)))

    # ---- the model: load the base, swap lm_head for a classification head, decide what trains ----------------
    model = GPT.from_checkpoint(checkpoint_dir)
    add_classification_head(model, len(rows.labels), bias=method == "features")  # lm_head -> score (n_embd -> labels)
    if method in ("lora", "qlora"):
        # LoRA first, on the float weights: the init reads W (pissa / olora / loftq change it) and, for qlora,
        # stores each LoRA layer's base in NF4 (as finetune/qlora.py); quantize_nf4 below does the other layers
        inject_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, targets=lora_targets)
        init_lora(model, lora.init, nf4=nf4_settings() if method == "qlora" else None, loftq_iter=lora.loftq_iter,
                  device=fabric.device)
    if method == "qlora":
        quantize_nf4(model)  # every other nn.Linear of the blocks -> NF4 (4-bit, frozen); the head stays float
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
    model.activation_checkpointing = train.activation_checkpointing
    classifier_config = ClassifierConfig(
        labels=rows.labels, pooling=pool, method=method,
        trainable_blocks=trainable_blocks if method == "blocks" else None, base_model=str(checkpoint_dir),
        base_config=base_config.to_dict(), max_seq_length=data.max_seq_length, head_bias=method == "features",
        lora=dict(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, targets=list(lora_targets),
                  init=init_config(lora.init, lora.loftq_iter))
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
        gpt = model  # the plain module, for evaluation and saving
        model = fabric.setup_module(model)  # fsdp shards it here, so the optimizer is made after, for the shards
        report_shards(fabric, gpt)  # fsdp: the parameter bytes each rank holds
        # the new head learns at head_learning_rate, the pretrained weights that train at learning_rate
        pretrained = [p for n, p in gpt.named_parameters() if p.requires_grad and not n.startswith("lm_head.")]
        param_groups = ([{"params": pretrained}] if pretrained else []) + [
            {"params": list(gpt.lm_head.parameters()), "lr_ratio": head_learning_rate / train.learning_rate}]
        optimizer = fabric.setup_optimizers(torch.optim.AdamW(param_groups, lr=train.learning_rate,
                                                               weight_decay=train.weight_decay, betas=(0.9, 0.95)))

        state = {"step": 0, "micro_batches": 0, "tokens": 0}
        if train.compile:  # torch.compile each block for training (lora_lab/compile.py)
            compile_blocks(gpt)
        if resume:
            saved = load_train_state(out_dir / TRAIN_STATE_FILE)
            if is_sharded(gpt):  # fsdp: every rank reads its own shard back
                load_sharded_state(fabric, gpt, optimizer, out_dir / SHARDS_DIR)
            else:
                load_trained_state_dict(gpt, saved["trained"], out_dir / TRAIN_STATE_FILE)
                optimizer.load_state_dict(saved["optimizer"])
            train_dl.batch_sampler.load_state_dict(saved["sampler"])
            set_rng_state(saved["rng"])
            state.update(saved["counters"])
            fabric.print(f"Resuming from step {state['step']} of {train.max_steps}")
        fit(fabric, model, gpt, optimizer, train_dl, val_dl, state, classifier_config, hparams, out_dir, train, eval,
            log)
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


def fit(fabric, model, gpt, optimizer, train_dl, val_dl, state, classifier_config, hparams, out_dir, train: TrainArgs,
        eval: ValidateArgs, log: LogArgs) -> None:
    stop = StopRequest()
    metrics = MetricsLog(out_dir / "metrics.csv", fabric, start_step=state["step"], logger_name=log.logger_name,
                         hparams=hparams)  # + hparams.yaml, an experiment tracker, loss.png
    max_steps, max_time = train.max_steps, parse_duration(train.max_time)
    grad_accum = train.grad_accum(fabric.world_size)  # micro-batches per optimizer step
    throughput = Throughput(state["step"], max_steps)
    # warm-up and cosine decay over max_steps, or over the --max_time budget (lora_lab/training.py)
    schedule = LRSchedule(train.learning_rate, train.warmup_steps, train.min_lr, max_steps, max_time, state,
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
                                  train.neftune_alpha, segment_ids=batch.get("segment_ids"))  # (texts, num_labels)
                loss = F.cross_entropy(logits.float(), batch["labels"].to(logits.device))
                fabric.backward(loss / grad_accum)
            if not torch.isfinite(loss):
                raise not_finite("loss", loss.item(), state["step"] + 1, out_dir)
            loss_sum += loss.item()
            state["tokens"] += batch["input_ids"].numel() * fabric.world_size
            throughput.update(batch["input_ids"].numel() * fabric.world_size)
            flops.update(batch)
        if train.grad_clip:
            norm = fabric.clip_gradients(model, optimizer, max_norm=train.grad_clip, error_if_nonfinite=False)
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

        if step % log.interval == 0 or step == max_steps:
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
        if val_dl is not None and (step % eval.interval == 0 or step == max_steps or out_of_time):
            val_loss, val_accuracy = validate(fabric, model, val_dl, eval.iters, classifier_config.pooling)
            row.update(val_loss=val_loss)
            fabric.print(f"step {step}: val loss {val_loss:.4f}, val accuracy {val_accuracy:.2%}")
        metrics.log(row)
        if step % log.save_interval == 0 or step == max_steps or out_of_time or stop_requested:
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
    if is_sharded(gpt):  # fsdp: each rank writes its shard of the resume state
        save_sharded_state(fabric, gpt, optimizer, out_dir / SHARDS_DIR)
    with gathered(fabric, gpt):  # fsdp: the whole trainable part on rank 0, for the one file
        if fabric.is_global_zero:
            save_classifier(out_dir, gpt, classifier_config, tokenizer_dir=classifier_config.base_model)
            save_train_state(out_dir / TRAIN_STATE_FILE, {
                "trained": trained_state_dict(gpt),
                "optimizer": optimizer_state(gpt, optimizer),  # None under fsdp: it is in the shards
                "sampler": train_dl.batch_sampler.state_dict(),
                "rng": rng_state(),
                "counters": {k: v for k, v in state.items() if k != "stopped"},
                "hparams": hparams,
            })
    fabric.barrier()


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    cli(setup)
