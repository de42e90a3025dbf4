"""Fine-tune every weight of a model (full fine-tuning), on one device or sharded over several with FSDP.

    python finetune/full.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --data json_extraction --out_dir out/finetune/full

All parameters train. The result is a whole new model, saved as a lora_lab checkpoint in out_dir (model_config.json
with the prompt style it was tuned on, model.safetensors in the base checkpoint's dtype, the base's tokenizer files):
generate/full.py, GPT.from_checkpoint and `python -m lora_lab.convert --to hf` read it like any other checkpoint.

Memory, in bytes per parameter (activations come on top, see --activation_checkpointing):

    --precision   --optimizer   weights  gradients  optimizer state                 total
    bf16-mixed    adamw            4         4      4 + 4 (moments m, v in fp32)     16   (the default on a GPU)
    32-true       adamw            4         4      4 + 4                            16   (the default on a CPU)
    bf16-true     adamw            2         2      2 + 2 (moments in bf16)           8
    bf16-true     sgd              2         2      2 (momentum)                      6
    bf16-true     adafactor        2         2      ~0 (a row and a column of v)      4

    bf16-mixed keeps float32 master weights and computes in bfloat16: the classic 2 + 2 (bf16 copies) + 4 + 4
    (fp32 moments) + 4 (fp32 master) accounting, where the bf16 weight and gradient copies are made per layer on
    the fly rather than kept. So SmolLM2-135M needs ~2.2 GB besides activations, a 1B model ~16 GB, a 7B model
    ~112 GB: more than one GPU has, hence FSDP (--strategy fsdp --devices N shards weights, gradients and
    optimizer state over N GPUs: each holds about 1/N of the 16 bytes).
    bf16-true halves that, at a price: bfloat16 keeps 8 significant bits, so an update smaller than half a step
    between neighbouring bf16 numbers is rounded away. AdamW moves a weight by about the learning rate per step;
    at 2e-5, 96% of SmolLM2-135M's weights would not change at all (tutorials/finetune_full.md shows how this was
    counted). Use bf16-true with a learning rate of 1e-4 or more, or with adafactor, whose steps are relative to
    each weight matrix's size (its --learning_rate is relative too: 1e-3 ... 1e-2).

--data is a built-in name (json_extraction: offline and synthetic; alpaca, alpaca-cleaned, alpaca-finance, dolly,
lima: downloaded once) or a local .json / .jsonl / .csv file with instruction, input (optional) and output fields.
Raw text (a .txt file or a folder of .txt files) is continued pre-training: every token a target
(tutorials/continued_pretraining.md).
Hyperparameters can also come from a YAML file: --config my_run.yaml. Ctrl-C saves the state at the end of the
step in progress; run the same command with --resume to continue exactly where it stopped.

This script is finetune/lora.py with the method swapped (`diff finetune/lora.py finetune/full.py` shows it);
tests/test_scripts_consistency.py checks that the rest stays the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from lora_lab import GPT, Config, Tokenizer
from lora_lab.args import DataArgs, EvalArgs, HardwareArgs, LogArgs, TrainArgs, run_record, with_precision
from lora_lab.checks import check_args
from lora_lab.checkpoint import load_config, save_checkpoint
from lora_lab.compile import compile_blocks
from lora_lab.data import get_dataloaders
from lora_lab.data.json_extraction import evaluate_extractions
from lora_lab.data.mix import write_mix_record
from lora_lab.distributed import (SHARDS_DIR, is_sharded, load_sharded_state, make_fabric, report_shards,
                                  save_sharded_state)
from lora_lab.formats.download import ensure_checkpoint
from lora_lab.flops import FlopsMeter
from lora_lab.generate import peak_memory_bytes, reset_peak_memory
from lora_lab.lora import count_parameters
from lora_lab.plan import plan_script
from lora_lab.prompts import PromptStyle
from lora_lab.training import (TRAIN_STATE_FILE, LRSchedule, MetricsLog, StopRequest, Throughput, check_run,
                               format_seconds, generate_answers, iter_keeping_rng, load_train_state, micro_batches,
                               parse_duration, rng_state, save_train_state, set_lr, set_rng_state)
from lora_lab.utils import LoraLabError, cli


def setup(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    out_dir: Path = Path("out/finetune/full"),
    resume: bool = False,
    optimizer: Literal["adamw", "adafactor", "sgd"] = "adamw",
    router_aux_loss_coef: float = 0.0,
    data: DataArgs = DataArgs(source="json_extraction", max_seq_length=512, mask_prompt=True),
    train: TrainArgs = TrainArgs(batch_size=16, micro_batch_size=4, learning_rate=None, weight_decay=0.0),
    eval: EvalArgs = EvalArgs(interval=25, iters=100, samples=10),
    log: LogArgs = LogArgs(save_interval=100, interval=1, logger_name="csv"),
    hardware: HardwareArgs = HardwareArgs(),
    seed: int = 42,
    plan: bool = False,
) -> None:
    """Fine-tune all the weights.

    Each group's fields are nested flags (`--lora.r 16`, `--train.learning_rate 1e-3`); the flat flags in brackets
    (`--lora_r 16`, `--learning_rate 1e-3`) work as well, in a --config YAML file too.

    Args:
        checkpoint_dir: the base model (a lora_lab checkpoint: see `python -m lora_lab.download`).
        out_dir: where the fine-tuned checkpoint, metrics.csv and the resume state go.
        resume: continue the interrupted run in out_dir exactly where it stopped.
        optimizer: adamw (two moments per weight), sgd (with momentum 0.9: one) or adafactor (factored second moment, no
            first: almost no state; torch.optim.Adafactor). The module docstring has the memory table.
        router_aux_loss_coef: a mixture-of-experts model only: add this times the load-balancing loss (Switch
            Transformer's, as transformers computes it) to the training loss, so that the router keeps every expert
            in use (Qwen3-MoE was trained with 0.001; 0 = off).
        data: the training data.
        data.source: [--data] a built-in dataset name or a local .json/.jsonl/.csv file of instruction/input/output
            rows.
        data.val_data: [--val_data] a separate validation file (default: a held-out share of `data`).
        data.prompt_style: [--prompt_style] how prompts are wrapped (default: the base model's own).
        data.max_seq_length: [--max_seq_length] longer samples are cut (and counted).
        data.n_train: [--n_train] use only the first n_train training rows (json_extraction: how many to generate).
        data.n_val: [--n_val] likewise for validation rows.
        data.columns: [--columns] your file's column names, e.g. '{"instruction": "question", "output": "answer"}'
            (keys: instruction, input, output).
        data.packing: [--packing] put several samples in each row of max_seq_length (no padding; each attends only to
            itself); batch_size and micro_batch_size then count rows.
        data.blank_line_docs: [--blank_line_docs] raw text (continued pre-training): documents are separated by blank
            lines, not one per .txt file.
        data.mask_prompt: [--mask_prompt] learn only the answer tokens, not the prompt.
        train: optimisation.
        train.max_steps: [--max_steps] optimizer steps (default: `epochs` passes over the data).
        train.epochs: [--epochs] passes over the training data when max_steps is not given.
        train.batch_size: [--batch_size] global batch size in samples per optimizer step (over all devices).
        train.micro_batch_size: [--micro_batch_size] samples per forward/backward pass on one device; gradients
            accumulate to batch_size.
        train.learning_rate: [--learning_rate] peak learning rate, after a linear warm-up, decayed to min_lr by a cosine
            (default: 2e-5 for adamw, 1e-3 for sgd, 1e-2 for adafactor, whose rate is relative to each weight's size).
        train.weight_decay: [--weight_decay] weight decay on all parameters (decoupled for adamw and adafactor).
        train.warmup_steps: [--warmup_steps] optimizer steps of linear warm-up.
        train.min_lr: [--min_lr] learning rate at the end of the cosine decay.
        train.grad_clip: [--grad_clip] clip the gradient norm to this (0 to disable).
        train.neftune_alpha: [--neftune_alpha] NEFTune noise on the embeddings while training (5 is the paper's usual
            value; 0 = off).
        train.activation_checkpointing: [--activation_checkpointing] recompute activations in the backward pass: less
            memory, slower.
        train.compile: [--compile] torch.compile each transformer block for training (minutes to compile; fastest with
            --packing).
        train.max_time: [--max_time] time budget (3600, 90m, 1.5h, 23:30:00): the warm-up and cosine decay are laid over
            it (re-estimated from the step time) and the run stops, at min_lr, evaluated and saved, when the next step
            would not fit. The run also ends at max_steps / epochs if that comes first.
        eval: evaluation.
        eval.interval: [--eval_interval] validate every this many optimizer steps.
        eval.iters: [--eval_iters] at most this many validation batches per validation.
        eval.samples: [--eval_samples] json_extraction only: greedy generations scored for JSON validity/accuracy before
            and after.
        log: checkpoints and logging.
        log.save_interval: [--save_interval] save the adapter and resume state every this many optimizer steps.
        log.interval: [--log_interval] print progress every this many optimizer steps.
        log.logger_name: [--logger_name] where metrics and hyperparameters go besides metrics.csv and hparams.yaml: csv
            (nowhere else), tensorboard, mlflow or wandb (lora_lab/loggers.py). loss.png is drawn at every save.
        hardware: devices and number format.
        hardware.precision: [--precision] 32-true, bf16-mixed, bf16-true, 16-mixed (default: bf16-mixed on GPU, 32-true
            on CPU).
        hardware.peak_flops: [--peak_flops] the device's peak FLOP/s for the MFU figure (default: the GPU's datasheet,
            or a CPU probe).
        hardware.devices: [--devices] devices per node (data parallel over them).
        hardware.num_nodes: [--num_nodes] nodes, as Fabric launches them.
        hardware.strategy: [--strategy] auto, ddp, or fsdp to shard the weights, gradients and optimizer state over
            GPUs.
        seed: seeds data order and NEFTune noise.
        plan: print the memory this run needs per device (python -m lora_lab.plan) and exit.
    """
    check_args(locals())  # every argument that can be judged without data or a model, before anything slow
    if plan:  # the memory plan of these arguments, and nothing else (lora_lab/plan.py)
        return plan_script(locals(), __file__)
    checkpoint_dir = ensure_checkpoint(checkpoint_dir)  # the default model is fetched once if missing
    # default: bf16-mixed on a GPU that has it, else 32-true. float32 master weights: bf16-true would round most
    # small updates away (see the memory table above)
    hardware = with_precision(hardware, on_gpu="bf16-mixed")
    fabric = make_fabric(hardware.devices, hardware.num_nodes, hardware.strategy, hardware.precision)  # fsdp: FSDP2
    fabric.launch()
    main(fabric, checkpoint_dir, out_dir, resume, optimizer, router_aux_loss_coef, data, train, eval, log, hardware,
         seed)


def main(fabric: L.Fabric, checkpoint_dir: Path, out_dir: Path, resume: bool, optimizer: str,
         router_aux_loss_coef: float, data: DataArgs,
         train: TrainArgs, eval: EvalArgs, log: LogArgs, hardware: HardwareArgs, seed: int) -> None:
    hparams = run_record(locals())  # the flat arguments, for hparams.yaml and the resume state
    out_dir = Path(out_dir)
    # cheap checks first, so that a mistake is reported before minutes of data and model loading
    check_run(fabric, checkpoint_dir, out_dir, resume, train.batch_size, train.micro_batch_size)
    if optimizer not in DEFAULT_LEARNING_RATES:
        raise LoraLabError(f"--optimizer {optimizer!r}: use one of {', '.join(DEFAULT_LEARNING_RATES)}")
    if train.learning_rate is None:
        train = replace(train, learning_rate=DEFAULT_LEARNING_RATES[optimizer])
    if router_aux_loss_coef and not load_config(checkpoint_dir).n_expert:
        raise LoraLabError(f"--router_aux_loss_coef {router_aux_loss_coef}: {checkpoint_dir} is not a "
                           "mixture-of-experts model (it has no router to balance): leave it at 0")
    fabric.seed_everything(seed)
    tokenizer, style, train_dl, val_dl, data_stats = load_data(fabric, checkpoint_dir, out_dir, data, train, seed)
    if train.max_steps is None:
        train = replace(train, max_steps=max(1, math.ceil(train.epochs * data_stats["n_train"] / train.batch_size)))

    # ---- the model: load the base; every parameter trains ------------------------------------------------------
    model = GPT.from_checkpoint(checkpoint_dir)
    # what is saved: the base's config with the prompt style it was tuned on, weights in the base's dtype
    save_as = SaveAs(config=replace(model.config, prompt_style=style.name,
                                    extra={**model.config.extra, "finetuned_from": str(checkpoint_dir)}),
                     dtype=model.wte.weight.dtype, tokenizer_dir=Path(checkpoint_dir))
    if hardware.precision not in ("bf16-true", "16-true"):
        # float32 master weights, even from a bfloat16 checkpoint: Fabric casts the weights only for *-true precisions
        model.float()
    model.activation_checkpointing = train.activation_checkpointing
    model.router_aux_loss_coef = router_aux_loss_coef  # MoE: + coef * load-balancing loss while training
    trainable, total = count_parameters(model)
    fabric.print(f"Full fine-tuning with {optimizer}: {trainable:,} trainable parameters of {total:,} "
                 f"({100 * trainable / total:.2f}%)")

    gpt = model  # the plain module, for generation and saving
    model = fabric.setup_module(model)  # fsdp shards it here, so the optimizer is made after, for the shards
    report_shards(fabric, gpt)  # fsdp: the parameter bytes each rank holds
    param_groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    optimizer = fabric.setup_optimizers(make_optimizer(optimizer, param_groups, train.learning_rate,
                                                       train.weight_decay))

    state = {"step": 0, "micro_batches": 0, "tokens": 0}
    if train.compile:  # torch.compile each block for training (lora_lab/compile.py)
        compile_blocks(gpt)
    if resume:
        saved = load_train_state(out_dir / TRAIN_STATE_FILE)
        if is_sharded(gpt):  # fsdp: every rank reads its own shard back
            load_sharded_state(fabric, gpt, optimizer, out_dir / SHARDS_DIR)
        else:
            load_full_state(gpt, optimizer, saved, source=out_dir / TRAIN_STATE_FILE)
        train_dl.batch_sampler.load_state_dict(saved["sampler"])
        set_rng_state(saved["rng"])
        state.update(saved["counters"])
        fabric.print(f"Resuming from step {state['step']} of {train.max_steps}")

    # the json_extraction task's real test: does the model now answer with the right JSON?
    eval_rows = val_dl.dataset.rows[:eval.samples] if data.source == "json_extraction" and val_dl is not None else []
    if eval_rows and not resume:  # kept with the resume state: a resumed run still says before -> after
        state["json_before"] = {k: v for k, v in evaluate_json(fabric, gpt, tokenizer, style, eval_rows).items()
                                if k in ("valid_json", "exact_keys", "all_correct")}
    fit(fabric, model, gpt, optimizer, train_dl, val_dl, state, save_as, hparams, out_dir, train, eval, log)
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


def fit(fabric, model, gpt, optimizer, train_dl, val_dl, state, save_as, hparams, out_dir, train: TrainArgs,
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
            save(fabric, gpt, optimizer, train_dl, state, save_as, hparams, out_dir)
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
    fabric.print(f"Model saved to {out_dir}")


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


def save(fabric, gpt, optimizer, train_dl, state, save_as, hparams, out_dir) -> None:
    """The model as a lora_lab checkpoint (for generate/full.py, GPT.from_checkpoint, convert --to hf) and the resume
    state, each written atomically.

    The resume state holds the weights too, at full precision (with bf16-mixed: the float32 master weights, which
    model.safetensors rounds to the base's dtype): one file, so weights, optimizer state and data position always
    come from the same step. Under --strategy fsdp each rank writes its own shard of the weights and optimizer state
    instead (lora_lab/distributed.py), and all take part in gathering the weights that rank 0 writes."""
    sharded = is_sharded(gpt)
    if sharded:
        save_sharded_state(fabric, gpt, optimizer, out_dir / SHARDS_DIR)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0, in CPU memory
    weights = get_model_state_dict(gpt, options=options)
    optimizer_state = None if sharded else get_optimizer_state_dict(gpt, unwrap(optimizer), options=options)
    if fabric.is_global_zero:
        save_checkpoint(out_dir, save_as.config, {k: v.to(save_as.dtype) for k, v in weights.items()},
                        tokenizer_dir=save_as.tokenizer_dir)
        save_train_state(out_dir / TRAIN_STATE_FILE, {
            "model": None if sharded else weights,
            "optimizer": optimizer_state,
            "sampler": train_dl.batch_sampler.state_dict(),
            "rng": rng_state(),
            "counters": {k: v for k, v in state.items() if k != "stopped"},
            "hparams": hparams,
        })
    fabric.barrier()


# ------------------------------------------------------------------------------------------------------------
# What full fine-tuning needs besides lora.py's plumbing
# ------------------------------------------------------------------------------------------------------------
DEFAULT_LEARNING_RATES = {"adamw": 2e-5, "sgd": 1e-3, "adafactor": 1e-2}


@dataclass
class SaveAs:
    """What save() writes besides the weights: the config, the dtype of model.safetensors, the tokenizer's source."""

    config: Config
    dtype: torch.dtype
    tokenizer_dir: Path


def make_optimizer(name: str, param_groups: list[dict], learning_rate: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """adamw: m and v per weight; sgd: a momentum per weight; adafactor: per weight matrix only a row and a column
    of second-moment statistics, and steps relative to the matrix's RMS (torch.optim.Adafactor)."""
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=learning_rate, weight_decay=weight_decay, betas=(0.9, 0.95))
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=learning_rate, momentum=0.9, weight_decay=weight_decay)
    return torch.optim.Adafactor(param_groups, lr=learning_rate, weight_decay=weight_decay)


def unwrap(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Fabric's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def load_full_state(gpt, optimizer, saved: dict, source: Path) -> None:
    """Weights and optimizer state from a resume state written by save() (under FSDP each device takes its shard)."""
    options = StateDictOptions(full_state_dict=True)
    try:
        set_model_state_dict(gpt, saved["model"], options=options)
        set_optimizer_state_dict(gpt, unwrap(optimizer), saved["optimizer"], options=options)
    except (KeyError, RuntimeError, ValueError) as e:
        raise LoraLabError(f"{source} does not fit this model or --optimizer ({type(e).__name__}): resume with the "
                           f"settings the run started with") from None


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    cli(setup)
