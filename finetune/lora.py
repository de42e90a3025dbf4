"""Fine-tune a model with LoRA: the base model stays frozen, small low-rank updates of chosen layers train.

    python finetune/lora.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --data json_extraction --out_dir out/finetune/lora

Every linear layer we target computes  h = x W^T + (alpha/r) * dropout(x) A^T B^T  with W frozen and only A (r x in)
and B (out x r) trained (lora_lab/lora.py explains the math). The adapter, a few MB, is saved with its config in
out_dir and used by generate/lora.py, `python -m lora_lab.merge_lora` and `python -m lora_lab.export_peft`.
--lora_init pissa / olora start the adapter from W's own directions instead of from zero (lora_lab/lora_init.py).

--data is a built-in name (json_extraction: offline and synthetic; alpaca, alpaca-cleaned, alpaca-finance, dolly,
lima: downloaded once) or a local .json / .jsonl / .csv file with instruction, input (optional) and output fields.
Raw text (a .txt file or a folder of .txt files) is continued pre-training: every token a target
(tutorials/continued_pretraining.md).
Hyperparameters can also come from a YAML file: --config my_run.yaml. Ctrl-C saves the state at the end of the
step in progress; run the same command with --resume to continue exactly where it stopped.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch

from lora_lab import GPT, Tokenizer
from lora_lab.args import (DataArgs, EvalArgs, HardwareArgs, LoRAArgs, LogArgs, TrainArgs, run_record,
                           with_precision)
from lora_lab.checks import check_args
from lora_lab.compile import compile_blocks
from lora_lab.data import get_dataloaders
from lora_lab.data.json_extraction import evaluate_extractions
from lora_lab.data.mix import write_mix_record
from lora_lab.distributed import (SHARDS_DIR, gathered, is_sharded, load_sharded_state, make_fabric,
                                  optimizer_state, report_shards, save_sharded_state)
from lora_lab.eva import eva_init
from lora_lab.formats.download import ensure_checkpoint
from lora_lab.flops import FlopsMeter
from lora_lab.generate import peak_memory_bytes, reset_peak_memory
from lora_lab.lora import (LoRAConfig, adapted_roles, count_parameters, inject_lora, load_lora_state_dict,
                           lora_plus_param_groups, lora_state_dict, mark_only_lora_trainable, normalize_targets)
from lora_lab.lora_init import init_config, init_lora, save_trained_lora
from lora_lab.plan import plan_script
from lora_lab.prompts import PromptStyle
from lora_lab.training import (TRAIN_STATE_FILE, LRSchedule, MetricsLog, StopRequest, Throughput, check_run,
                               format_seconds, generate_answers, iter_keeping_rng, load_train_state, micro_batches,
                               parse_duration, rng_state, save_train_state, set_lr, set_rng_state)
from lora_lab.utils import LoraLabError, cli


def setup(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    out_dir: Path = Path("out/finetune/lora"),
    resume: bool = False,
    lora: LoRAArgs = LoRAArgs(r=8, alpha=16.0, dropout=0.05, targets=("query", "value"), init="kaiming"),
    data: DataArgs = DataArgs(source="json_extraction", max_seq_length=512, mask_prompt=True),
    train: TrainArgs = TrainArgs(batch_size=16, micro_batch_size=4, learning_rate=2e-3, weight_decay=0.0),
    eval: EvalArgs = EvalArgs(interval=25, iters=100, samples=10),
    log: LogArgs = LogArgs(save_interval=100, interval=1, logger_name="csv"),
    hardware: HardwareArgs = HardwareArgs(),
    seed: int = 42,
    plan: bool = False,
) -> None:
    """Fine-tune with LoRA.

    Each group's fields are nested flags (`--lora.r 16`, `--train.learning_rate 1e-3`); the flat flags in brackets
    (`--lora_r 16`, `--learning_rate 1e-3`) work as well, in a --config YAML file too.

    Args:
        checkpoint_dir: the base model (a lora_lab checkpoint: see `python -m lora_lab.download`).
        out_dir: where the adapter, its config, metrics.csv and the resume state go.
        resume: continue the interrupted run in out_dir exactly where it stopped.
        lora: LoRA: which layers get an update, its rank and scale.
        lora.r: [--lora_r] rank of the update B A.
        lora.alpha: [--lora_alpha] the update is scaled by alpha / r.
        lora.dropout: [--lora_dropout] dropout on the LoRA branch's input.
        lora.targets: [--lora_targets] layers to adapt: query, key, value, projection, mlp, lm_head, experts (each
            expert's projections in a mixture of experts), or all (one, a list [query,mlp], or query,mlp).
        lora.rslora: [--use_rslora] scale by alpha / sqrt(r) instead of alpha / r.
        lora.dora: [--use_dora] DoRA (weight-decomposed LoRA).
        lora.lora_plus_ratio: [--lora_plus_ratio] LoRA+: B learns this many times faster than A (e.g. 16).
        lora.init: [--lora_init] where A, B (and the base) start (lora_lab/lora_init.py): kaiming (A
            Kaiming-uniform, B = 0), gaussian (A ~ N(0, 1/r^2)), pissa / pissa_niter_N (the adapter holds W's r
            principal singular directions, the base the rest; N: randomized SVD's power iterations), olora (QR),
            loftq (a quantized base only: alternate NF4 and SVD so that base + adapter is closest to W), eva (A =
            each layer's principal input directions on the first training batches, B = 0). pissa / olora / loftq
            save the adapter converted to rank 2r against the untouched base.
        lora.loftq_iter: [--loftq_iter] --lora.init loftq: alternating quantize / SVD steps.
        data: the training data.
        data.source: [--data] a built-in dataset name or a local .json/.jsonl/.csv file of instruction/input/output
            rows (or raw .txt text, or a mix.yaml).
        data.val_data: [--val_data] a separate validation file (default: a held-out share of the data).
        data.prompt_style: [--prompt_style] how prompts are wrapped (default: the base model's own).
        data.max_seq_length: [--max_seq_length] longer samples are cut (and counted).
        data.n_train: [--n_train] use only the first n_train training rows (json_extraction: how many to generate).
        data.n_val: [--n_val] likewise for validation rows.
        data.columns: [--columns] your file's column names, e.g. '{"instruction": "question", "output": "answer"}'
            (keys: instruction, input, output).
        data.packing: [--packing] put several samples in each row of max_seq_length (no padding; each attends only
            to itself); batch_size and micro_batch_size then count rows.
        data.blank_line_docs: [--blank_line_docs] raw text (continued pre-training): documents are separated by
            blank lines, not one per .txt file.
        data.mask_prompt: [--mask_prompt] learn only the answer tokens, not the prompt.
        train: optimisation.
        train.max_steps: [--max_steps] optimizer steps (default: `epochs` passes over the data).
        train.epochs: [--epochs] passes over the training data when max_steps is not given.
        train.batch_size: [--batch_size] global batch size in samples per optimizer step (over all devices).
        train.micro_batch_size: [--micro_batch_size] samples per forward/backward pass on one device; gradients
            accumulate to batch_size.
        train.learning_rate: [--learning_rate] peak learning rate, after a linear warm-up, decayed to min_lr by a
            cosine.
        train.weight_decay: [--weight_decay] AdamW weight decay on the trainable parameters.
        train.warmup_steps: [--warmup_steps] optimizer steps of linear warm-up.
        train.min_lr: [--min_lr] learning rate at the end of the cosine decay.
        train.grad_clip: [--grad_clip] clip the gradient norm to this (0 to disable).
        train.neftune_alpha: [--neftune_alpha] NEFTune noise on the embeddings while training (5 is the paper's
            usual value; 0 = off).
        train.activation_checkpointing: [--activation_checkpointing] recompute activations in the backward pass:
            less memory, slower.
        train.compile: [--compile] torch.compile each transformer block for training (minutes to compile; fastest
            with --packing).
        train.max_time: [--max_time] time budget (3600, 90m, 1.5h, 23:30:00): the warm-up and cosine decay are laid
            over it (re-estimated from the step time) and the run stops, at min_lr, evaluated and saved, when the
            next step would not fit. The run also ends at max_steps / epochs if that comes first.
        eval: evaluation.
        eval.interval: [--eval_interval] validate every this many optimizer steps.
        eval.iters: [--eval_iters] at most this many validation batches per validation.
        eval.samples: [--eval_samples] json_extraction only: greedy generations scored for JSON validity/accuracy
            before and after.
        log: checkpoints and logging.
        log.save_interval: [--save_interval] save the adapter and resume state every this many optimizer steps.
        log.interval: [--log_interval] print progress every this many optimizer steps.
        log.logger_name: [--logger_name] where metrics and hyperparameters go besides metrics.csv and hparams.yaml:
            csv (nowhere else), tensorboard, mlflow or wandb (lora_lab/loggers.py). loss.png is drawn at every save.
        hardware: devices and number format.
        hardware.precision: [--precision] 32-true, bf16-true, bf16-mixed, 16-mixed (default: bf16-true on GPU,
            32-true on CPU).
        hardware.peak_flops: [--peak_flops] the device's peak FLOP/s for the MFU figure (default: the GPU's
            datasheet, or a CPU probe).
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
    main(fabric, checkpoint_dir, out_dir, resume, lora, data, train, eval, log, hardware, seed)


def main(fabric: L.Fabric, checkpoint_dir: Path, out_dir: Path, resume: bool, lora: LoRAArgs, data: DataArgs,
         train: TrainArgs, eval: EvalArgs, log: LogArgs, hardware: HardwareArgs, seed: int) -> None:
    hparams = run_record(locals())  # the flat arguments, for hparams.yaml and the resume state
    out_dir = Path(out_dir)
    # cheap checks first, so that a mistake is reported before minutes of data and model loading
    check_run(fabric, checkpoint_dir, out_dir, resume, train.batch_size, train.micro_batch_size)
    lora_targets = normalize_targets(lora.targets.split(",") if isinstance(lora.targets, str) else lora.targets)
    fabric.seed_everything(seed)
    tokenizer, style, train_dl, val_dl, data_stats = load_data(fabric, checkpoint_dir, out_dir, data, train, seed)
    if train.max_steps is None:
        train = replace(train, max_steps=max(1, math.ceil(train.epochs * data_stats["n_train"] / train.batch_size)))

    # ---- the model: load the base, add LoRA, freeze everything else ------------------------------------------
    model = GPT.from_checkpoint(checkpoint_dir)
    lora_config = LoRAConfig(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, targets=list(lora_targets),
                             use_rslora=lora.rslora, use_dora=lora.dora, lora_plus_ratio=lora.lora_plus_ratio,
                             base_model=str(checkpoint_dir), base_config=model.config.to_dict(),
                             prompt_style=style.name, init=init_config(lora.init, lora.loftq_iter))
    inject_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, targets=lora_targets,
                use_rslora=lora.rslora, use_dora=lora.dora)
    started = time.perf_counter()
    # A, B (pissa / olora: the base becomes W - s B A); the step-0 adapter stays on the model for saving
    init_lora(model, lora.init, loftq_iter=lora.loftq_iter, device=fabric.device)  # the SVD / QR on the GPU if any
    if lora.init != "kaiming":
        fabric.print(f"--lora_init {lora.init}: {time.perf_counter() - started:.2f} s")
    mark_only_lora_trainable(model)
    model.activation_checkpointing = train.activation_checkpointing
    trainable, total = count_parameters(model)
    fabric.print(f"LoRA r={lora.r} alpha={lora.alpha} on {', '.join(adapted_roles(model))}: {trainable:,} trainable "
                 f"parameters of {total:,} ({100 * trainable / total:.2f}%)")

    gpt = model  # the plain module, for generation and saving
    model = fabric.setup_module(model)  # fsdp shards it here, so the optimizer is made after, for the shards
    report_shards(fabric, gpt)  # fsdp: the parameter bytes each rank holds
    if lora.init == "eva" and not resume:  # A = each layer's principal input directions on the training data, B = 0
        eva = eva_init(gpt, train_dl)  # lora_lab/eva.py; train_dl and the RNG are left as they were
        fabric.print(f"--lora_init eva: {eva['seconds']:.2f} s ({eva['batches']} micro-batches)")
    if lora.lora_plus_ratio:
        param_groups = lora_plus_param_groups(model, train.learning_rate, ratio=lora.lora_plus_ratio,
                                              weight_decay=train.weight_decay)
    else:
        param_groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
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
            load_lora_state_dict(gpt, saved["lora"], source=out_dir / TRAIN_STATE_FILE)
            optimizer.load_state_dict(saved["optimizer"])
        train_dl.batch_sampler.load_state_dict(saved["sampler"])
        set_rng_state(saved["rng"])
        state.update(saved["counters"])
        fabric.print(f"Resuming from step {state['step']} of {train.max_steps}")

    # the json_extraction task's real test: does the model now answer with the right JSON?
    eval_rows = val_dl.dataset.rows[:eval.samples] if data.source == "json_extraction" and val_dl is not None else []
    if eval_rows and not resume:  # kept with the resume state: a resumed run still says before -> after
        state["json_before"] = {k: v for k, v in evaluate_json(fabric, gpt, tokenizer, style, eval_rows).items()
                                if k in ("valid_json", "exact_keys", "all_correct")}
    fit(fabric, model, gpt, optimizer, train_dl, val_dl, state, lora_config, hparams, out_dir, train, eval, log)
    if eval_rows and not state.get("stopped"):
        after = evaluate_json(fabric, gpt, tokenizer, style, eval_rows)
        before = state.get("json_before")
        if before:
            fabric.print(f"JSON before -> after fine-tuning: valid {before['valid_json']:.0%} -> "
                         f"{after['valid_json']:.0%}, "
                         f"exact keys {before['exact_keys']:.0%} -> {after['exact_keys']:.0%}, "
                         f"all values right {before['all_correct']:.0%} -> {after['all_correct']:.0%}")


def load_data(fabric, checkpoint_dir: Path, out_dir: Path, data: DataArgs, train: TrainArgs, seed: int):
    """The tokenizer, the prompt style, the training and validation loaders and the data's counts."""
    tokenizer = Tokenizer(checkpoint_dir)
    style = PromptStyle.from_checkpoint(checkpoint_dir, data.prompt_style)
    train_dl, val_dl, data_stats = get_dataloaders(
        data.source, tokenizer, style, max_seq_length=data.max_seq_length, micro_batch_size=train.micro_batch_size,
        seed=seed, val_data=data.val_data, n_train=data.n_train, n_val=data.n_val, columns=data.columns,
        mask_prompt=data.mask_prompt, bucket_by_length=True, pad_id=tokenizer.eos_id or 0,
        verbose=fabric.is_global_zero, packing=data.packing, blank_line_docs=data.blank_line_docs)
    if fabric.is_global_zero:
        write_mix_record(out_dir, data_stats)  # --data mix.yaml: its per-source counts, OUT_DIR/data_mix.json
    return tokenizer, style, train_dl, val_dl, data_stats


def fit(fabric, model, gpt, optimizer, train_dl, val_dl, state, lora_config, hparams, out_dir, train: TrainArgs,
        eval: EvalArgs, log: LogArgs) -> None:
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
                loss = model(batch["input_ids"], labels=batch["labels"], neftune_alpha=train.neftune_alpha,
                             segment_ids=batch.get("segment_ids"))  # packed rows: one segment per sample
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
            val_loss = validate(fabric, model, val_dl, eval.iters)
            row.update(val_loss=val_loss, val_ppl=math.exp(val_loss))
            fabric.print(f"step {step}: val loss {val_loss:.4f}, val ppl {math.exp(val_loss):.2f}")
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
                 + (f" | final val loss {val_loss:.4f}" if val_loss is not None else ""))
    fabric.print(f"Adapter saved to {out_dir}")


def not_finite(what: str, value: float, step: int, out_dir: Path) -> LoraLabError:
    saved = (f"; the last saved state is in {out_dir} (continue from it with --resume)"
             if (out_dir / TRAIN_STATE_FILE).is_file() else "")
    return LoraLabError(f"the {what} is {value} at step {step}: lower --learning_rate (or use --precision 32-true)"
                        + saved)


@torch.no_grad()
def validate(fabric, model, val_dl, eval_iters: int) -> float:
    """Mean validation loss over (at most) eval_iters batches."""
    model.eval()
    losses = []
    for i, batch in enumerate(iter_keeping_rng(val_dl)):  # validating must not change training's dropout masks
        if i >= eval_iters:
            break
        losses.append(model(batch["input_ids"], labels=batch["labels"]))
    model.train()
    return fabric.all_reduce(torch.stack(losses).mean(), reduce_op="mean").item()


def evaluate_json(fabric, gpt, tokenizer, style, rows) -> dict:
    """Greedy answers to held-out prompts, scored for valid JSON, exact keys and right values."""
    gpt.eval()
    answers = generate_answers(gpt, tokenizer, style, rows, max_new_tokens=64)
    gpt.train()
    scores = evaluate_extractions(answers, [r["output"] for r in rows])
    fabric.print(f"JSON on {len(rows)} held-out prompts: {scores['valid_json']:.0%} valid, "
                 f"{scores['exact_keys']:.0%} with exactly the keys, {scores['all_correct']:.0%} all values right")
    return scores


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
