"""Preference fine-tuning with DPO on LoRA (or QLoRA): learn to prefer the chosen answer of each pair to the rejected.

    python finetune/dpo.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --data pairs.json --out_dir out/finetune/dpo [--adapter_dir out/finetune/lora] [--beta 0.1]

For a prompt x, a chosen answer y_w and a rejected one y_l, DPO (Rafailov et al. 2023; lora_lab/dpo.py explains it)
minimises, over the pairs,

    L = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

where pi is the model being trained (LoRA: only A and B of the adapted layers move) and pi_ref the same model as it
was before this run: with --adapter_dir, the base plus that (SFT) adapter, which the policy continues to train;
without it, the bare base (a fresh LoRA adds exactly nothing at the start: B = 0). log pi(y|x) sums the log-probs
of the answer's tokens only (the prompt is context). pi_ref is scored once, before the first step, on every
pair: the one line `reference_logps(...)` below. No second copy of the model is kept and no adapter is switched
off later; the scores go into the resume state, so --resume continues exactly. Dropout is off by default (as
TRL's disable_dropout=True): the reference pass runs without it, so a policy pass with it would score another
function (started from an SFT adapter, step 1's loss would be 0.69299, not ln 2); --lora_dropout still sets it. --loss ipo or hinge swaps the
loss for IPO's or SLiC's; --quantize nf4 keeps the frozen base in 4 bits (QLoRA-DPO, as finetune/qlora.py).

--packing lays the chosen and rejected sequences of a micro-batch's pairs end to end in rows of max_seq_length
(each attends only to itself; the loss is the unpacked one), --compile compiles the blocks, and every progress line
and the final one report MFU: the policy's forward + backward over both sequences of every pair (the reference
pass, forward only and done once before the first step, is timed on its own line); --logger_name sends the
metrics to tensorboard, mlflow or wandb besides metrics.csv, and loss.png draws the loss and reward accuracy.

--data is a .json / .jsonl / .csv file of pairs {instruction, input (optional), chosen, rejected} or {prompt,
chosen, rejected} (lora_lab/data/preference.py); a held-out share (or --val_data) measures the reward accuracy:
the share of pairs whose chosen answer the trained model rewards more than the rejected one. The result is an
ordinary LoRA adapter (lora_config.json says `trained_with: {method: dpo, ...}`) for generate/lora.py,
`python -m lora_lab.merge_lora` and `python -m lora_lab.export_peft`. Ctrl-C saves the state at the end of the
step in progress; run the same command with --resume to continue exactly where it stopped.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Literal, Optional

import lightning as L
import torch

from lora_lab import GPT, Tokenizer
from lora_lab.args import (EvalArgs, HardwareArgs, LoRAArgs, LogArgs, PairDataArgs, TrainArgs, run_record,
                           with_precision)
from lora_lab.checks import check_args
from lora_lab.checkpoint import load_config
from lora_lab.compile import compile_blocks
from lora_lab.data.preference import get_preference_dataloaders
from lora_lab.distributed import (SHARDS_DIR, gathered, is_sharded, load_sharded_state, make_fabric,
                                  optimizer_state, report_shards, save_sharded_state)
from lora_lab.formats.download import ensure_checkpoint
from lora_lab.dpo import (METRICS, add_metrics, answer_logps, check_dpo_settings, mean_metrics, pair_metrics,
                          preference_loss, reference_logps)
from lora_lab.flops import FlopsMeter
from lora_lab.generate import peak_memory_bytes, reset_peak_memory
from lora_lab.lora import (LoRAConfig, adapted_roles, check_adapter_fits, count_parameters, inject_lora, load_lora,
                           load_lora_state_dict, lora_plus_param_groups, lora_state_dict, mark_only_lora_trainable,
                           normalize_targets)
from lora_lab.lora_init import init_config, init_lora, save_trained_lora
from lora_lab.nf4 import nf4_settings, quantize_nf4
from lora_lab.plan import plan_script
from lora_lab.prompts import PromptStyle
from lora_lab.training import (TRAIN_STATE_FILE, LRSchedule, MetricsLog, StopRequest, Throughput, check_run,
                               format_seconds, generate_answers, iter_keeping_rng, load_train_state, micro_batches,
                               parse_duration, rng_state, save_train_state, set_lr, set_rng_state)
from lora_lab.utils import LoraLabError, cli

# metrics.csv: TRL's / torchtune's names for the training step, the same with val_ for the held-out pairs
COLUMNS = (["step", *METRICS] + ["val_" + m for m in METRICS] + ["val_prefers_chosen", "lr", "tokens",
                                                                    "tokens_per_sec"])


def setup(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    out_dir: Path = Path("out/finetune/dpo"),
    resume: bool = False,
    adapter_dir: Optional[Path] = None,
    beta: float = 0.1,
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid",
    quantize: Optional[Literal["nf4"]] = None,
    nf4_blocksize: int = 64,
    double_quant: bool = True,
    lora: LoRAArgs = LoRAArgs(r=8, alpha=16.0, dropout=0.0, targets=("query", "value"), init="kaiming"),
    data: PairDataArgs = PairDataArgs(source="pairs.json", max_seq_length=512),
    train: TrainArgs = TrainArgs(batch_size=16, micro_batch_size=4, learning_rate=5e-4, weight_decay=0.0),
    eval: EvalArgs = EvalArgs(interval=25, iters=100, samples=3),
    log: LogArgs = LogArgs(save_interval=100, interval=1, logger_name="csv"),
    hardware: HardwareArgs = HardwareArgs(),
    seed: int = 42,
    plan: bool = False,
) -> None:
    """Preference fine-tuning with DPO on LoRA.

    Each group's fields are nested flags (`--lora.r 16`, `--train.learning_rate 1e-3`); the flat flags in brackets
    (`--lora_r 16`, `--learning_rate 1e-3`) work as well, in a --config YAML file too.

    Args:
        checkpoint_dir: the base model (a lora_lab checkpoint: see `python -m lora_lab.download`).
        out_dir: where the adapter, its config, metrics.csv and the resume state go.
        resume: continue the interrupted run in out_dir exactly where it stopped.
        adapter_dir: an SFT LoRA adapter to start from: the policy continues it and the reference is base + it as it is
            now. Default: a fresh LoRA, and the bare base as reference.
        beta: the KL leash to the reference: larger keeps the policy closer (0.1 is usual).
        loss: sigmoid (DPO), ipo (IPO, on per-token mean log-probs) or hinge (SLiC).
        quantize: nf4 stores the frozen base's linear layers (but lm_head) in 4-bit NF4 (QLoRA-DPO).
        nf4_blocksize: with --quantize nf4: weights per absmax scale (64 as in QLoRA).
        double_quant: with --quantize nf4: quantize the scales too (8 bits, blocks of 256).
        lora: LoRA: which layers get an update, its rank and scale.
        lora.r: [--lora_r] rank of the update B A (a fresh adapter only).
        lora.alpha: [--lora_alpha] the update is scaled by lora_alpha / lora_r (a fresh adapter only).
        lora.dropout: [--lora_dropout] dropout on the LoRA branch's input (default 0, as TRL's disable_dropout: the
            policy pass then computes the function the reference was scored with, so step 1 from an SFT adapter is ln
            2).
        lora.targets: [--lora_targets] layers to adapt (a fresh adapter only): query, key, value, projection, mlp,
            lm_head, experts (a mixture of experts' expert projections), or all.
        lora.rslora: [--use_rslora] scale by alpha / sqrt(r) instead of alpha / r (a fresh adapter only).
        lora.dora: [--use_dora] DoRA (weight-decomposed LoRA) (a fresh adapter only).
        lora.lora_plus_ratio: [--lora_plus_ratio] LoRA+: B learns this many times faster than A (e.g. 16).
        lora.init: [--lora_init] where a new adapter's A, B (and the base) start (lora_lab/lora_init.py): kaiming,
            gaussian, pissa, pissa_niter_N, olora, loftq (with --quantize nf4 only); pissa / olora / loftq save the
            adapter converted to rank 2r against the untouched base.
        lora.loftq_iter: [--loftq_iter] --lora_init loftq: alternating quantize / SVD steps.
        data: the training data.
        data.source: [--data] a local .json/.jsonl/.csv file of preference pairs (instruction, input, chosen, rejected).
        data.val_data: [--val_data] a separate file of held-out pairs (default: a held-out share of `data`).
        data.prompt_style: [--prompt_style] how prompts are wrapped (default: the base model's own).
        data.max_seq_length: [--max_seq_length] pairs whose prompt + longer answer exceed it are left out (and counted).
        data.n_train: [--n_train] use only the first n_train training pairs.
        data.n_val: [--n_val] likewise for validation pairs.
        data.columns: [--columns] your file's column names, e.g. '{"instruction": "question", "chosen": "good"}' (keys:
            instruction, input, chosen, rejected).
        data.packing: [--packing] lay the 2 x micro_batch_size sequences of each micro-batch end to end in rows of
            max_seq_length (each attends only to itself: the same loss, less padding); batch sizes still count pairs.
        train: optimisation.
        train.max_steps: [--max_steps] optimizer steps (default: `epochs` passes over the data).
        train.epochs: [--epochs] passes over the training pairs when max_steps is not given.
        train.batch_size: [--batch_size] global batch size in PAIRS per optimizer step (over all devices).
        train.micro_batch_size: [--micro_batch_size] pairs per forward/backward pass on one device (2x as many
            sequences).
        train.learning_rate: [--learning_rate] peak learning rate, after a linear warm-up, decayed to min_lr by a
            cosine.
        train.weight_decay: [--weight_decay] AdamW weight decay on the trainable parameters.
        train.warmup_steps: [--warmup_steps] optimizer steps of linear warm-up.
        train.min_lr: [--min_lr] learning rate at the end of the cosine decay.
        train.grad_clip: [--grad_clip] clip the gradient norm to this (0 to disable).
        train.neftune_alpha: [--neftune_alpha] NEFTune noise on the policy's embeddings while training (0 = off; TRL's
            DPOTrainer takes it too); the reference is scored without it.
        train.activation_checkpointing: [--activation_checkpointing] recompute activations in the backward pass: less
            memory, slower.
        train.compile: [--compile] torch.compile each transformer block for training (minutes to compile; batch shapes
            vary, packed or not, so torch compiles again until it marks the lengths dynamic).
        train.max_time: [--max_time] time budget (3600, 90m, 1.5h, 23:30:00): the warm-up and cosine decay are laid over
            it (re-estimated from the step time) and the run stops, at min_lr, evaluated and saved, when the next step
            would not fit. The run also ends at max_steps / epochs if that comes first.
        eval: evaluation.
        eval.interval: [--eval_interval] validate every this many optimizer steps.
        eval.iters: [--eval_iters] at most this many validation batches per validation.
        eval.samples: [--eval_samples] greedy answers to this many held-out prompts, shown before and after training.
        log: checkpoints and logging.
        log.save_interval: [--save_interval] save the adapter and resume state every this many optimizer steps.
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
        hardware.strategy: [--strategy] auto, ddp, or fsdp to shard the model over GPUs.
        seed: seeds data order, initialisation and dropout.
        plan: print the memory this run needs per device (python -m lora_lab.plan) and exit.
    """
    check_args(locals())  # every argument that can be judged without data or a model, before anything slow
    if plan:  # the memory plan of these arguments, and nothing else (lora_lab/plan.py)
        return plan_script(locals(), __file__)
    checkpoint_dir = ensure_checkpoint(checkpoint_dir)  # the default model is fetched once if missing
    hardware = with_precision(hardware)  # default: bf16-true on a GPU that has it, else 32-true
    fabric = make_fabric(hardware.devices, hardware.num_nodes, hardware.strategy, hardware.precision)  # fsdp: FSDP2
    fabric.launch()
    main(fabric, checkpoint_dir, out_dir, resume, adapter_dir, beta, loss, quantize, nf4_blocksize, double_quant, lora,
         data, train, eval, log, hardware, seed)


def main(fabric: L.Fabric, checkpoint_dir: Path, out_dir: Path, resume: bool, adapter_dir: Optional[Path], beta: float,
         loss: str, quantize: Optional[str], nf4_blocksize: int, double_quant: bool, lora: LoRAArgs, data: PairDataArgs,
         train: TrainArgs, eval: EvalArgs, log: LogArgs, hardware: HardwareArgs, seed: int) -> None:
    hparams = run_record(locals())  # the flat arguments, for hparams.yaml and the resume state
    out_dir = Path(out_dir)
    # cheap checks first, so that a mistake is reported before minutes of data and model loading
    check_run(fabric, checkpoint_dir, out_dir, resume, train.batch_size, train.micro_batch_size)
    check_dpo_settings(beta, loss)
    # the SFT adapter to continue (one line if adapter_dir is not one, or was trained on another base)
    sft_config, sft_weights = load_lora(adapter_dir) if adapter_dir is not None else (None, None)
    if sft_config is not None:
        check_adapter_fits(sft_config, load_config(checkpoint_dir), adapter_dir, checkpoint_dir)
    lora_targets = normalize_targets(lora.targets.split(",") if isinstance(lora.targets, str) else lora.targets)
    if sft_config is not None and lora.init != "kaiming":
        raise LoraLabError(f"--lora_init {lora.init} starts a new adapter, but --adapter_dir continues one: leave "
                           f"one of them out")
    fabric.seed_everything(seed)

    # ---- data: pairs, the two answers of each in one batch, only answer tokens scored ------------------------
    tokenizer = Tokenizer(checkpoint_dir)
    style = PromptStyle.from_checkpoint(checkpoint_dir, data.prompt_style or (sft_config and sft_config.prompt_style))
    train_dl, val_dl, data_stats = get_preference_dataloaders(
        data.source, tokenizer, style, max_seq_length=data.max_seq_length, micro_batch_size=train.micro_batch_size,
        seed=seed, val_data=data.val_data, n_train=data.n_train, n_val=data.n_val, columns=data.columns,
        pad_id=tokenizer.eos_id or 0, verbose=fabric.is_global_zero,
        packing=data.packing)  # packed: each micro-batch's sequences end to end in rows
    if train.max_steps is None:
        train = replace(train, max_steps=max(1, math.ceil(train.epochs * data_stats["n_train"] / train.batch_size)))

    # ---- the model: load the base, add LoRA (initialise it, quantize) or the SFT adapter, freeze the rest ------
    model = GPT.from_checkpoint(checkpoint_dir)
    # the settings quantize_nf4 records (it runs below, after the LoRA init), or None for a float base
    base_quantization = nf4_settings(nf4_blocksize, double_quant) if quantize == "nf4" else None
    trained_with = {"method": "dpo", "loss": loss, "beta": beta,
                    "reference": f"base + {adapter_dir} (the starting adapter)" if sft_config else "the base model"}
    if sft_config is not None:  # continue the SFT adapter: its shape and settings, its weights
        lora_config = LoRAConfig(**{**sft_config.to_dict(), "dropout": lora.dropout,
                                    "lora_plus_ratio": lora.lora_plus_ratio,
                                    "base_model": str(checkpoint_dir), "base_config": model.config.to_dict(),
                                    "prompt_style": style.name, "base_quantization": base_quantization,
                                    "trained_with": {**trained_with, "sft_adapter": str(adapter_dir)},
                                    "init": None})  # (a converted PiSSA / LoftQ adapter continues as plain LoRA)
    else:
        lora_config = LoRAConfig(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, targets=list(lora_targets),
                                 use_rslora=lora.rslora, use_dora=lora.dora, lora_plus_ratio=lora.lora_plus_ratio,
                                 base_model=str(checkpoint_dir), base_config=model.config.to_dict(),
                                 prompt_style=style.name, base_quantization=base_quantization,
                                 trained_with=trained_with, init=init_config(lora.init, lora.loftq_iter))
    # LoRA on the float weights first: the init reads W (pissa / olora / loftq change it; lora_lab/lora_init.py)
    # and, with --quantize nf4, stores each LoRA layer's base in NF4; quantize_nf4 does the other layers. The
    # reference is the policy at step 0: for pissa / olora that is still exactly the base model
    inject_lora(model, r=lora_config.r, alpha=lora_config.alpha, dropout=lora_config.dropout,
                targets=lora_config.targets, use_rslora=lora_config.use_rslora, use_dora=lora_config.use_dora)
    init_lora(model, lora.init, nf4=base_quantization, loftq_iter=lora.loftq_iter, device=fabric.device)
    if quantize == "nf4":
        quantize_nf4(model, blocksize=nf4_blocksize, double_quant=double_quant)  # every other nn.Linear but lm_head
    if sft_weights is not None:
        load_lora_state_dict(model, sft_weights, source=adapter_dir)
    mark_only_lora_trainable(model)
    model.activation_checkpointing = train.activation_checkpointing
    trainable, total = count_parameters(model)
    fabric.print(f"DPO ({loss}, beta={beta}) on LoRA r={lora_config.r} alpha={lora_config.alpha} on "
                 f"{', '.join(adapted_roles(model))}" + (f" continuing {adapter_dir}" if sft_config else "") +
                 f"{' (NF4 base)' if quantize else ''}: {trainable:,} trainable parameters of {total:,} "
                 f"({100 * trainable / total:.2f}%)")

    gpt = model  # the plain module, for generation and saving
    model = fabric.setup_module(model)  # fsdp shards it here, so the optimizer is made after, for the shards
    report_shards(fabric, gpt)  # fsdp: the parameter bytes each rank holds
    if lora.lora_plus_ratio:
        param_groups = lora_plus_param_groups(model, train.learning_rate, ratio=lora.lora_plus_ratio,
                                              weight_decay=train.weight_decay)
    else:
        param_groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(param_groups, lr=train.learning_rate,
                                                           weight_decay=train.weight_decay, betas=(0.9, 0.95)))

    state = {"step": 0, "micro_batches": 0, "tokens": 0}
    if train.compile:  # torch.compile each block for training (lora_lab/compile.py); the reference pass runs eager
        compile_blocks(gpt)
    datasets = [dl.dataset for dl in (train_dl, val_dl) if dl is not None]
    if resume:
        saved = load_train_state(out_dir / TRAIN_STATE_FILE)
        if is_sharded(gpt):  # fsdp: every rank reads its own shard back
            load_sharded_state(fabric, gpt, optimizer, out_dir / SHARDS_DIR)
        else:
            load_lora_state_dict(gpt, saved["lora"], source=out_dir / TRAIN_STATE_FILE)
            optimizer.load_state_dict(saved["optimizer"])
        train_dl.batch_sampler.load_state_dict(saved["sampler"])
        set_rng_state(saved["rng"])
        state.update(saved["counters"])
        for ds, ref in zip(datasets, state["reference"]):  # pi_ref as scored when the run started
            ds.ref_logps = ref
        fabric.print(f"Resuming from step {state['step']} of {train.max_steps}")
    else:
        # THE REFERENCE: pi_ref is the model as it is now, before any step: score every pair's answers with it once
        # (each device scores all pairs: a device may meet any pair in a later epoch)
        t0 = time.perf_counter()
        for ds in datasets:
            ds.ref_logps = reference_logps(model, ds, train.micro_batch_size, verbose=fabric.is_global_zero)  # (N, 2)
        state["reference"] = [ds.ref_logps for ds in datasets]  # saved with the counters: --resume reuses them
        # forward only, once: timed here, not counted in the training steps' throughput and MFU
        fabric.print(f"Reference log-probs of {sum(len(ds) for ds in datasets):,} pairs scored in "
                     f"{format_seconds(time.perf_counter() - t0)} (forward only, before the first step)")

    eval_rows = val_dl.dataset.rows[:eval.samples] if val_dl is not None else []
    if val_dl is not None and not resume:
        before = validate(fabric, model, val_dl, eval.iters, beta, loss)
        before_answers = generate_samples(gpt, tokenizer, style, eval_rows)
    fit(fabric, model, gpt, optimizer, train_dl, val_dl, state, lora_config, hparams, out_dir, train, eval, log, beta,
        loss)
    if val_dl is not None and not resume and not state.get("stopped"):
        after = validate(fabric, model, val_dl, eval.iters, beta, loss)
        fabric.print(f"Held-out pairs before -> after DPO: reward accuracy {before['rewards/accuracies']:.1%} -> "
                     f"{after['rewards/accuracies']:.1%}, reward margin {before['rewards/margins']:.3f} -> "
                     f"{after['rewards/margins']:.3f}, chosen answer more likely than the rejected one "
                     f"{before['prefers_chosen']:.1%} -> {after['prefers_chosen']:.1%}")
        for row, old, new in zip(eval_rows, before_answers, generate_samples(gpt, tokenizer, style, eval_rows)):
            fabric.print(f"\nPrompt: {row['instruction']}" + (f"\n{row['input']}" if row["input"] else "") +
                         f"\n  before: {old}\n  after:  {new}")


def fit(fabric, model, gpt, optimizer, train_dl, val_dl, state, lora_config, hparams, out_dir, train: TrainArgs,
        eval: EvalArgs, log: LogArgs, beta: float, loss: str) -> None:
    stop = StopRequest()
    metrics = MetricsLog(out_dir / "metrics.csv", fabric, start_step=state["step"], logger_name=log.logger_name,
                         hparams=hparams, fields=COLUMNS)  # + hparams.yaml, an experiment tracker, loss.png
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
    val = None

    while state["step"] < max_steps:
        lr = schedule.lr(state["step"])
        set_lr(optimizer, lr)
        sums: dict[str, float] = {}
        for i in range(grad_accum):
            batch = next(batches)
            # gradients are averaged over devices only at the last micro-batch of the step
            with fabric.no_backward_sync(model, enabled=i < grad_accum - 1):
                logps, n_tokens = answer_logps(model, batch["input_ids"], batch["labels"], batch.get("segment_ids"),
                                               train.neftune_alpha)  # (2b,) each; packed rows: a segment per sequence
                chosen, rejected = logps.chunk(2)  # the batch is [b chosen; b rejected]
                out = preference_loss(chosen, rejected, batch["ref_chosen_logps"].to(logps),
                                      batch["ref_rejected_logps"].to(logps), beta, loss, *n_tokens.chunk(2))
                micro_loss = out["losses"].mean()
                fabric.backward(micro_loss / grad_accum)
            if not torch.isfinite(micro_loss):
                raise not_finite("loss", micro_loss.item(), state["step"] + 1, out_dir)
            add_metrics(sums, pair_metrics(out, chosen, rejected))
            state["tokens"] += batch["input_ids"].numel() * fabric.world_size
            throughput.update(batch["input_ids"].numel() * fabric.world_size)
            flops.update(batch)  # the policy's forward + backward over both sequences of every pair
        if train.grad_clip:
            norm = fabric.clip_gradients(model, optimizer, max_norm=train.grad_clip, error_if_nonfinite=False)
            if not torch.isfinite(norm):  # a finite loss whose gradient overflowed
                raise not_finite("gradient norm", norm.item(), state["step"] + 1, out_dir)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step_done()
        state["step"] += 1
        state["seconds"] = earlier_seconds + throughput.elapsed()
        step, means = state["step"], mean_metrics(all_reduce_sums(fabric, sums))

        if step % log.interval == 0 or step == max_steps:
            fabric.print(f"step {step}/{max_steps} | loss {means['loss']:.4f} | reward acc "
                         f"{means['rewards/accuracies']:.2f} | margin {means['rewards/margins']:.3f} | lr {lr:.2e} | "
                         f"{throughput.tokens_per_sec():,.0f} tok/s | {flops.format(throughput.elapsed())} | "
                         f"ETA {format_seconds(throughput.eta(step))}")
        row = {"step": step, **means, "lr": lr, "tokens": state["tokens"],
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
            val = validate(fabric, model, val_dl, eval.iters, beta, loss)
            row.update({f"val_{k}": v for k, v in val.items()})
            fabric.print(f"step {step}: held-out loss {val['loss']:.4f}, reward accuracy "
                         f"{val['rewards/accuracies']:.1%}, margin {val['rewards/margins']:.3f}")
        metrics.log(row)
        if step % log.save_interval == 0 or step == max_steps or out_of_time or stop_requested:
            save(fabric, gpt, optimizer, train_dl, state, lora_config, hparams, out_dir)
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
                 + (f" | final held-out reward accuracy {val['rewards/accuracies']:.1%}" if val is not None else ""))
    fabric.print(f"Adapter saved to {out_dir}")


def all_reduce_sums(fabric, sums: dict[str, float]) -> dict[str, float]:
    """The metric sums of the global batch, not only of this device's share."""
    if fabric.world_size == 1:
        return sums
    total = fabric.all_reduce(torch.tensor(list(sums.values()), device=fabric.device), reduce_op="sum")
    return dict(zip(sums, total.tolist()))


def not_finite(what: str, value: float, step: int, out_dir: Path) -> LoraLabError:
    saved = (f"; the last saved state is in {out_dir} (continue from it with --resume)"
             if (out_dir / TRAIN_STATE_FILE).is_file() else "")
    return LoraLabError(f"the {what} is {value} at step {step}: lower --learning_rate (or use --precision 32-true)"
                        + saved)


@torch.no_grad()
def validate(fabric, model, val_dl, eval_iters: int, beta: float, loss: str) -> dict[str, float]:
    """The logged metrics' means over (at most) eval_iters batches of held-out pairs, and `prefers_chosen`: the
    share of pairs whose chosen answer the policy finds more likely than the rejected one."""
    model.eval()
    sums: dict[str, float] = {}
    for i, batch in enumerate(iter_keeping_rng(val_dl)):  # validating must not change training's dropout masks
        if i >= eval_iters:
            break
        logps, n_tokens = answer_logps(model, batch["input_ids"], batch["labels"], batch.get("segment_ids"))  # (2b,)
        chosen, rejected = logps.chunk(2)
        out = preference_loss(chosen, rejected, batch["ref_chosen_logps"].to(logps),
                              batch["ref_rejected_logps"].to(logps), beta, loss, *n_tokens.chunk(2))
        add_metrics(sums, pair_metrics(out, chosen, rejected))
        add_metrics(sums, {"prefers_chosen": (chosen > rejected).float().sum().item()})
    model.train()
    sums = all_reduce_sums(fabric, sums)
    return {**mean_metrics(sums), "prefers_chosen": sums["prefers_chosen"] / sums["pairs"]}


def generate_samples(gpt, tokenizer, style, rows) -> list[str]:
    """Greedy answers to held-out prompts, to show before and after training."""
    gpt.eval()
    answers = generate_answers(gpt, tokenizer, style, rows, max_new_tokens=64)
    gpt.train()
    return answers


def save(fabric, gpt, optimizer, train_dl, state, lora_config, hparams, out_dir) -> None:
    """The adapter (for generate/merge/export) and the resume state, each written atomically."""
    if is_sharded(gpt):  # fsdp: each rank writes its shard of the resume state
        save_sharded_state(fabric, gpt, optimizer, out_dir / SHARDS_DIR)
    with gathered(fabric, gpt):  # fsdp: the whole trainable part on rank 0, for the one file
        if fabric.is_global_zero:
            save_trained_lora(out_dir, gpt, lora_config)  # pissa / olora / loftq: converted to rank 2r against the base
            save_train_state(out_dir / TRAIN_STATE_FILE, {
                "lora": {k: v.detach().cpu() for k, v in lora_state_dict(gpt).items()},
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
