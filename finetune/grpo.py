"""Reinforcement learning with verifiable rewards: GRPO on LoRA (or QLoRA). Programs score sampled answers.

    python finetune/grpo.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --data json_extraction --reward json_values --out_dir out/finetune/grpo [--adapter_dir out/finetune/lora]

Each step takes batch_size / num_generations prompts and, for each, samples num_generations completions from the
policy (the base with its LoRA on, the KV cache, every row of the step in one batch). Reward functions score
them (lora_lab/rewards.py: json_valid, json_keys, json_values, gsm8k, length, or path/to/file.py:function; summed
with --reward_weights). Each completion's advantage is its reward minus its group's mean, divided by the group's
std (lora_lab/grpo.py explains it all), and every token of it is pushed by

    l_it = -min(rho_it A_i, clip(rho_it, 1 - epsilon, 1 + epsilon_high) A_i) + beta KL_it(pi || pi_ref)

rho the ratio of the policy's probability to the sampling policy's (1 with --num_iterations 1: the plain policy
gradient). pi_ref (only with --beta > 0; TRL's default is 0) is the starting model: the base with the LoRA switched
off, or with --adapter_dir, base + that adapter as it was: never a second copy of the model. --loss_type grpo,
dr_grpo or dapo (the default, as TRL's) says how token losses are averaged. Log-probs come from the completion
tokens' logits only (GPT.forward's logits_at). Dropout is off (--lora_dropout 0.0, as TRL's disable_dropout):
the sampling, old-policy and reference passes then see the very function that trains.

--data is instruction rows (a built-in name such as json_extraction, or a .json / .jsonl / .csv file): the
prompt is the instruction (+ input) in the model's prompt style, the row's `output` the expected answer the
built-in rewards check (every column reaches a user's reward function). A held-out share (or --val_data) is
answered greedily at every eval interval: the held-out reward, and the share with full marks from every reward
function, before and after. Metrics carry TRL's names (reward, reward_std, rewards/NAME/mean, frac_reward_zero_std,
completions/mean_length, kl, clip_ratio/...) in metrics.csv, the --logger_name tracker and loss.png (reward panel).
The result is an ordinary LoRA adapter (lora_config.json says `trained_with: {method: grpo, ...}`) for
generate/lora.py, merge_lora, export_peft and the server. Ctrl-C saves the state at the end of the step in
progress; run the same command with --resume to continue exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Literal, Optional

import lightning as L
import torch
import torch.nn.functional as F

from lora_lab import GPT, Tokenizer
from lora_lab.args import (EvalArgs, GRPOArgs, HardwareArgs, LoRAArgs, LogArgs, PromptDataArgs, TrainArgs,
                           run_record, with_precision)
from lora_lab.checks import check_args
from lora_lab.checkpoint import load_config
from lora_lab.compile import compile_blocks
from lora_lab.data.instructions import load_instructions
from lora_lab.formats.download import ensure_checkpoint
from lora_lab.flops import FlopsMeter
from lora_lab.generate import generate_batch, peak_memory_bytes, reset_peak_memory
from lora_lab.grpo import (check_grpo_settings, completion_logps, group_advantages, grpo_loss, length_metrics,
                           masked_mean, pack_completions, reference_context, reward_metrics, token_weights)
from lora_lab.lora_init import save_trained_lora
from lora_lab.lora import (LoRAConfig, adapted_roles, check_adapter_fits, count_parameters, inject_lora, load_lora,
                           load_lora_state_dict, lora_plus_param_groups, lora_state_dict, mark_only_lora_trainable,
                           normalize_targets)
from lora_lab.model import IGNORE_INDEX
from lora_lab.nf4 import quantize_nf4
from lora_lab.prompts import PromptStyle
from lora_lab.rewards import compute_rewards, load_rewards
from lora_lab.training import (TRAIN_STATE_FILE, LRSchedule, MetricsLog, StopRequest, Throughput, check_run,
                               format_seconds, load_train_state, parse_duration, rng_state, save_train_state, set_lr,
                               set_rng_state)
from lora_lab.utils import LoraLabError, cli

# metrics.csv: TRL's names (the per-reward-function columns are added for the run's rewards: `columns`)
STEP_METRICS = ["loss", "reward", "reward_std", "frac_reward_zero_std", "completions/mean_length",
                "completions/min_length", "completions/max_length", "completions/clipped_ratio", "kl", "entropy",
                "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]


def setup(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    out_dir: Path = Path("out/finetune/grpo"),
    resume: bool = False,
    adapter_dir: Optional[Path] = None,
    quantize: Optional[Literal["nf4"]] = None,
    nf4_blocksize: int = 64,
    double_quant: bool = True,
    grpo: GRPOArgs = GRPOArgs(reward="json_values", num_generations=8, max_completion_length=256, beta=0.0,
                              loss_type="dapo"),
    lora: LoRAArgs = LoRAArgs(r=8, alpha=16.0, dropout=0.0, targets=("query", "value")),
    data: PromptDataArgs = PromptDataArgs(source="json_extraction", max_seq_length=512),
    train: TrainArgs = TrainArgs(batch_size=16, micro_batch_size=4, learning_rate=2e-5, weight_decay=0.0),
    eval: EvalArgs = EvalArgs(interval=25, iters=100, samples=3),
    log: LogArgs = LogArgs(save_interval=100, interval=1, logger_name="csv"),
    hardware: HardwareArgs = HardwareArgs(),
    seed: int = 42,
) -> None:
    """Reinforcement learning with verifiable rewards (GRPO) on LoRA.

    Each group's fields are nested flags (`--lora.r 16`, `--train.learning_rate 1e-3`); the flat flags in brackets
    (`--lora_r 16`, `--learning_rate 1e-3`) work as well, in a --config YAML file too.

    Args:
        checkpoint_dir: the base model (a lora_lab checkpoint: see `python -m lora_lab.download`).
        out_dir: where the adapter, its config, metrics.csv and the resume state go.
        resume: continue the interrupted run in out_dir exactly where it stopped.
        adapter_dir: an SFT LoRA adapter to start from: the policy continues it and the reference (beta > 0) is base +
            it as it is now. Default: a fresh LoRA, and the bare base as reference.
        quantize: nf4 stores the frozen base's linear layers (but lm_head) in 4-bit NF4 (QLoRA-GRPO).
        nf4_blocksize: with --quantize nf4: weights per absmax scale (64 as in QLoRA).
        double_quant: with --quantize nf4: quantize the scales too (8 bits, blocks of 256).
        grpo: GRPO: the rewards, the sampled completions, the loss.
        grpo.reward: [--reward] reward function(s), comma-separated: json_valid, json_keys, json_values, gsm8k, length
            (length:N for a target of N characters), or path/to/file.py:function.
        grpo.reward_weights: [--reward_weights] one weight per reward function, comma-separated (default 1 each); the
            reward is the sum.
        grpo.num_generations: [--num_generations] completions sampled per prompt (the group).
        grpo.max_completion_length: [--max_completion_length] at most this many new tokens per completion.
        grpo.temperature: [--temperature] sampling temperature (the log-probs are those of the tempered distribution, as
            TRL's).
        grpo.top_p: [--top_p] nucleus sampling: keep the smallest set of tokens with this much probability (1.0 = all).
        grpo.top_k: [--top_k] sample among the k most likely tokens only (default: all).
        grpo.beta: [--beta] weight of the KL term against the reference (0 = none and no reference pass, TRL's default).
        grpo.epsilon: [--epsilon] the ratio is clipped to [1 - epsilon, 1 + epsilon_high].
        grpo.epsilon_high: [--epsilon_high] the upper clipping bound's epsilon (default: epsilon; DAPO uses 0.28).
        grpo.loss_type: [--loss_type] how token losses are averaged: grpo (per completion, then over completions),
            dr_grpo (by a constant: max_completion_length), dapo (over all the step's tokens).
        grpo.scale_rewards: [--scale_rewards] divide the advantages by the std of their group (group), of the batch
            (batch) or not (none).
        grpo.num_iterations: [--num_iterations] optimizer steps on each batch of completions (mu; > 1 clips against the
            sampling policy).
        lora: LoRA: which layers get an update, its rank and scale.
        lora.r: [--lora_r] rank of the update B A (a fresh adapter only).
        lora.alpha: [--lora_alpha] the update is scaled by lora_alpha / lora_r (a fresh adapter only).
        lora.dropout: [--lora_dropout] dropout on the LoRA branch's input (0: the sampling and training passes see one
            function).
        lora.targets: [--lora_targets] layers to adapt (a fresh adapter only): query, key, value, projection, mlp,
            lm_head, experts (a mixture of experts' expert projections), or all.
        lora.rslora: [--use_rslora] scale by alpha / sqrt(r) instead of alpha / r (a fresh adapter only).
        lora.dora: [--use_dora] DoRA (weight-decomposed LoRA) (a fresh adapter only).
        lora.lora_plus_ratio: [--lora_plus_ratio] LoRA+: B learns this many times faster than A (e.g. 16).
        lora.init: [--lora_init] kaiming only (a fresh adapter: A Kaiming-uniform, B = 0): GRPO's reference is the
            base with the LoRA off, which pissa / olora / loftq would change (refused in one line).
        lora.loftq_iter: [--loftq_iter] --lora_init loftq only, which GRPO refuses.
        data: the training data.
        data.source: [--data] a built-in dataset name or a local .json/.jsonl/.csv file of instruction/input/output rows
            (the output is the expected answer the rewards check).
        data.val_data: [--val_data] a separate file of held-out rows (default: a held-out share of `data`).
        data.prompt_style: [--prompt_style] how prompts are wrapped (default: the base model's own).
        data.max_seq_length: [--max_seq_length] prompts longer than max_seq_length - max_completion_length tokens are
            left out (counted).
        data.n_train: [--n_train] use only the first n_train training rows.
        data.n_val: [--n_val] likewise for held-out rows.
        data.columns: [--columns] your file's column names, e.g. '{"instruction": "question", "output": "answer"}'
            (keys: instruction, input, output).
        train: optimisation.
        train.max_steps: [--max_steps] optimizer steps (default: `epochs` passes over the prompts).
        train.epochs: [--epochs] passes over the training prompts when max_steps is not given.
        train.batch_size: [--batch_size] completions per optimizer step over all devices (batch_size / num_generations
            prompts).
        train.micro_batch_size: [--micro_batch_size] completions per forward/backward pass on one device.
        train.learning_rate: [--learning_rate] peak learning rate, after a linear warm-up, decayed to min_lr by a
            cosine.
        train.weight_decay: [--weight_decay] AdamW weight decay on the trainable parameters.
        train.warmup_steps: [--warmup_steps] optimizer steps of linear warm-up.
        train.min_lr: [--min_lr] learning rate at the end of the cosine decay.
        train.grad_clip: [--grad_clip] clip the gradient norm to this (0 to disable).
        train.neftune_alpha: [--neftune_alpha] 0 only: GRPO has no NEFTune (noise on the policy pass only would
            score another function than the sampling, old-policy and reference passes; refused in one line).
        train.activation_checkpointing: [--activation_checkpointing] recompute activations in the backward pass: less
            memory, slower.
        train.compile: [--compile] torch.compile each transformer block for training (sampling runs eager).
        train.max_time: [--max_time] time budget (3600, 90m, 1.5h, 23:30:00): stop, evaluate and save when it is spent.
        eval: evaluation.
        eval.interval: [--eval_interval] validate every this many optimizer steps.
        eval.iters: [--eval_iters] at most this many batches of micro_batch_size held-out prompts per validation.
        eval.samples: [--eval_samples] held-out prompts whose greedy answers are printed at each validation.
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
        seed: seeds the prompt order, initialisation, sampling and dropout.
    """
    check_args(locals())  # every argument that can be judged without data or a model, before anything slow
    checkpoint_dir = ensure_checkpoint(checkpoint_dir)  # the default model is fetched once if missing
    hardware = with_precision(hardware)  # default: bf16-true on a GPU that has it, else 32-true
    fabric = L.Fabric(devices=hardware.devices, num_nodes=hardware.num_nodes, strategy=hardware.strategy,
                      precision=hardware.precision)
    fabric.launch()
    main(fabric, checkpoint_dir, out_dir, resume, adapter_dir, quantize, nf4_blocksize, double_quant, grpo, lora, data,
         train, eval, log, hardware, seed)


def main(fabric: L.Fabric, checkpoint_dir: Path, out_dir: Path, resume: bool, adapter_dir: Optional[Path],
         quantize: Optional[str], nf4_blocksize: int, double_quant: bool, grpo: GRPOArgs, lora: LoRAArgs,
         data: PromptDataArgs, train: TrainArgs, eval: EvalArgs, log: LogArgs, hardware: HardwareArgs,
         seed: int) -> None:
    hparams = run_record(locals())  # the flat arguments, for hparams.yaml and the resume state
    out_dir = Path(out_dir)
    # cheap checks first, so that a mistake is reported before minutes of data and model loading
    check_run(fabric, checkpoint_dir, out_dir, resume)  # (the batch is checked below, in prompts per device)
    check_grpo_settings(grpo.num_generations, grpo.beta, grpo.epsilon, grpo.epsilon_high, grpo.loss_type,
                        grpo.scale_rewards, grpo.num_iterations, grpo.max_completion_length, train.batch_size,
                        train.micro_batch_size * fabric.world_size)
    reward_names, reward_functions, weights = load_rewards(grpo.reward, grpo.reward_weights)  # one line for a bad one
    # the SFT adapter to continue (one line if adapter_dir is not one, or was trained on another base)
    sft_config, sft_weights = load_lora(adapter_dir) if adapter_dir is not None else (None, None)
    if sft_config is not None:
        check_adapter_fits(sft_config, load_config(checkpoint_dir), adapter_dir, checkpoint_dir)
    lora_targets = normalize_targets(lora.targets.split(",") if isinstance(lora.targets, str) else lora.targets)
    if (train.batch_size // grpo.num_generations) % fabric.world_size:
        raise LoraLabError(f"batch_size / num_generations = {train.batch_size // grpo.num_generations} prompts per "
                           f"step do not divide over {fabric.world_size} devices")
    fabric.seed_everything(seed)

    # ---- data: prompts (instruction + input in the prompt style) and the rows the rewards read ----------------
    tokenizer = Tokenizer(checkpoint_dir)
    style = PromptStyle.from_checkpoint(checkpoint_dir, data.prompt_style or (sft_config and sft_config.prompt_style))
    rows = load_instructions(data.source, data.val_data, columns=data.columns, seed=seed, n_train=data.n_train,
                             n_val=data.n_val, verbose=fabric.is_global_zero)
    max_prompt_tokens = data.max_seq_length - grpo.max_completion_length
    train_rows, val_rows = (prompt_rows(rows.train, tokenizer, style, max_prompt_tokens, "training", fabric),
                            prompt_rows(rows.val, tokenizer, style, max_prompt_tokens, "held-out", fabric))
    if not train_rows:
        raise LoraLabError(f"--data {data.source}: no training prompt fits max_seq_length - max_completion_length = "
                           f"{max_prompt_tokens} tokens: raise --max_seq_length")
    if train.max_steps is None:
        prompts_per_step = train.batch_size // grpo.num_generations
        train = replace(train, max_steps=max(1, math.ceil(train.epochs * len(train_rows) / prompts_per_step))
                        * grpo.num_iterations)
    stop_ids = list(tokenizer.eos_ids) + style.stop_tokens(tokenizer)

    # ---- the model: load the base, (quantize it,) add LoRA or the SFT adapter, freeze everything else ----------
    model = GPT.from_checkpoint(checkpoint_dir)
    if quantize == "nf4":
        quantize_nf4(model, blocksize=nf4_blocksize, double_quant=double_quant)  # every nn.Linear but lm_head -> NF4
    base_quantization = getattr(model, "base_quantization", None)  # the settings quantize_nf4 recorded, or None
    trained_with = {"method": "grpo", "reward": reward_names, "reward_weights": weights.tolist(),
                    "loss_type": grpo.loss_type, "beta": grpo.beta, "num_generations": grpo.num_generations,
                    "reference": f"base + {adapter_dir} (the starting adapter)" if sft_config else "the base model"}
    if sft_config is not None:  # continue the SFT adapter: its shape and settings, its weights
        lora_config = LoRAConfig(**{**sft_config.to_dict(), "dropout": lora.dropout,
                                    "lora_plus_ratio": lora.lora_plus_ratio,
                                    "base_model": str(checkpoint_dir), "base_config": model.config.to_dict(),
                                    "prompt_style": style.name, "base_quantization": base_quantization,
                                    "trained_with": {**trained_with, "sft_adapter": str(adapter_dir)}})
    else:
        lora_config = LoRAConfig(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, targets=list(lora_targets),
                                 use_rslora=lora.rslora, use_dora=lora.dora, lora_plus_ratio=lora.lora_plus_ratio,
                                 base_model=str(checkpoint_dir), base_config=model.config.to_dict(),
                                 prompt_style=style.name, base_quantization=base_quantization,
                                 trained_with=trained_with)
    inject_lora(model, r=lora_config.r, alpha=lora_config.alpha, dropout=lora_config.dropout,
                targets=lora_config.targets, use_rslora=lora_config.use_rslora, use_dora=lora_config.use_dora)
    if sft_weights is not None:
        load_lora_state_dict(model, sft_weights, source=adapter_dir)
    mark_only_lora_trainable(model)
    model.activation_checkpointing = train.activation_checkpointing
    # THE REFERENCE (beta > 0): a fresh LoRA is switched off for it; a continued SFT adapter's starting tensors are
    # kept (a few MB) and swapped in for the reference pass: never a second copy of the model
    start_state = ({k: v.detach().clone() for k, v in lora_state_dict(model).items()}
                   if sft_config is not None and grpo.beta else None)
    trainable, total = count_parameters(model)
    fabric.print(f"GRPO ({grpo.loss_type}, beta={grpo.beta}, {grpo.num_generations} completions per prompt, reward "
                 f"{' + '.join(f'{w:g} {n}' for w, n in zip(weights.tolist(), reward_names))}) on LoRA "
                 f"r={lora_config.r} alpha={lora_config.alpha} on {', '.join(adapted_roles(model))}"
                 + (f" continuing {adapter_dir}" if sft_config else "") + f"{' (NF4 base)' if quantize else ''}: "
                 f"{trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%)")

    if lora.lora_plus_ratio:
        param_groups = lora_plus_param_groups(model, train.learning_rate, ratio=lora.lora_plus_ratio,
                                              weight_decay=train.weight_decay)
    else:
        param_groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    optimizer = torch.optim.AdamW(param_groups, lr=train.learning_rate, weight_decay=train.weight_decay,
                                  betas=(0.9, 0.95))
    gpt = model  # the plain module, for sampling and saving
    model, optimizer = fabric.setup(model, optimizer)

    state = {"step": 0, "tokens": 0}
    if train.compile:  # torch.compile each block for training (lora_lab/compile.py); sampling runs eager
        compile_blocks(gpt)
    if resume:
        saved = load_train_state(out_dir / TRAIN_STATE_FILE)
        load_lora_state_dict(gpt, saved["lora"], source=out_dir / TRAIN_STATE_FILE)
        optimizer.load_state_dict(saved["optimizer"])
        set_rng_state(saved["rng"])
        state.update(saved["counters"])
        fabric.print(f"Resuming from step {state['step']} of {train.max_steps}")

    rewards = (reward_names, reward_functions, weights)
    sampling = dict(max_new_tokens=grpo.max_completion_length, temperature=grpo.temperature, top_k=grpo.top_k,
                    top_p=grpo.top_p, eos_ids=stop_ids, pad_id=tokenizer.eos_id or 0)
    if val_rows and not resume:  # kept with the resume state: a resumed run still says before -> after
        state["val_before"] = validate(fabric, gpt, tokenizer, val_rows, rewards, stop_ids,
                                       grpo.max_completion_length, train.micro_batch_size, eval.iters, eval.samples)
    fit(fabric, model, gpt, optimizer, train_rows, val_rows, state, lora_config, hparams, out_dir, train, eval, log,
        grpo, tokenizer, rewards, sampling, start_state, seed)
    before = state.get("val_before")
    if before and not state.get("stopped"):
        after = validate(fabric, gpt, tokenizer, val_rows, rewards, stop_ids, grpo.max_completion_length,
                         train.micro_batch_size, eval.iters, 0)
        fabric.print(f"Held-out prompts before -> after GRPO (greedy answers): reward {before['reward']:.3f} -> "
                     f"{after['reward']:.3f}, full marks {before['solved']:.1%} -> {after['solved']:.1%}")


def prompt_rows(rows, tokenizer, style, max_prompt_tokens: int, what: str, fabric) -> list[dict]:
    """The rows with their prompt text and tokens; prompts too long to leave room for a completion left out."""
    out = []
    for row in rows:
        text = style.apply(row["instruction"], row.get("input", ""))
        ids = tokenizer.encode(text)
        if len(ids) <= max_prompt_tokens:
            out.append({**row, "prompt": text, "prompt_ids": ids})
    if len(out) < len(rows):
        fabric.print(f"Left out {len(rows) - len(out)} of {len(rows)} {what} prompts longer than {max_prompt_tokens} "
                     "tokens (max_seq_length - max_completion_length)")
    return out


def step_prompts(rows: list[dict], generation: int, prompts_per_step: int, seed: int) -> list[dict]:
    """The prompts of a generation (a batch of completions): epoch after epoch through a seeded shuffle, so the
    order depends only on the seed and the generation's index (which makes --resume exact)."""
    out = []
    for k in range(generation * prompts_per_step, (generation + 1) * prompts_per_step):
        epoch, i = divmod(k, len(rows))
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + epoch))
        out.append(rows[int(order[i])])
    return out


def rollout(fabric, gpt, tokenizer, rows, rewards, sampling, start_state, seed, generation, num_generations,
            beta, scale_rewards, num_iterations, temperature, micro_batch_size) -> dict:
    """Sample num_generations completions of each prompt, score them, and everything the steps on them need."""
    names, functions, weights = rewards
    rows = rows[fabric.global_rank::fabric.world_size]  # this device's prompts
    prompts = [torch.as_tensor(r["prompt_ids"]) for r in rows for _ in range(num_generations)]  # (N,) [p0 x G, p1 x G..]
    group_rows = [r for r in rows for _ in range(num_generations)]
    # SAMPLE: the policy with its LoRA on, eval mode (no dropout), the KV cache, every completion in one batch;
    # its own generator, seeded by the run's seed and the generation's index: reproducible, resumable
    generator = torch.Generator(fabric.device).manual_seed(seed * 1_000_003 + generation)
    gpt.eval()
    completions = generate_batch(gpt, prompts, generator=generator, **sampling)
    texts = [tokenizer.decode([t for t in c if t not in sampling["eos_ids"]]) for c in completions]
    # SCORE and group-normalise
    per_func = compute_rewards(names, functions, [r["prompt"] for r in group_rows], texts,
                               [{k: v for k, v in r.items() if k not in ("prompt", "prompt_ids")} for r in group_rows])
    advantages, zero_std = group_advantages((per_func * weights).sum(dim=1), num_generations, scale_rewards)
    batch = pack_completions(prompts, completions, pad_id=sampling["pad_id"])
    batch["advantages"] = advantages
    # pi_old (num_iterations > 1: the sampling policy, scored once before it moves) and pi_ref (beta > 0)
    with torch.no_grad():
        for key, needed, context in (("old_logps", num_iterations > 1, contextlib.nullcontext),
                                     ("ref_logps", beta != 0.0, lambda: reference_context(gpt, start_state))):
            if needed:
                parts = []
                for mb in split_batch(batch, micro_batch_size):
                    with context():
                        parts.append(completion_logps(gpt, mb, temperature)[0].cpu())  # (b, C_mb)
                batch[key] = torch.cat([F.pad(p, (0, batch["mask"].size(1) - p.size(1))) for p in parts])  # (N, C)
    gpt.train()
    batch["metrics"] = {**reward_metrics(per_func, weights, names, zero_std),
                        **length_metrics(completions, sampling["eos_ids"])}
    return batch


def split_batch(batch: dict, size: int):
    """Micro-batches of a rollout, each trimmed to its own longest row."""
    n = batch["input_ids"].size(0)
    for start in range(0, n, size):
        mb = {k: v[start:start + size] for k, v in batch.items() if isinstance(v, torch.Tensor)}
        positions = torch.arange(mb["at"].size(1))
        T = int(torch.where(mb["at"], positions, -1).amax(dim=1).max()) + 2  # the longest row's last token + 1
        C = max(int(mb["mask"].sum(1).max()), 1)
        mb.update({k: mb[k][:, :T] for k in ("input_ids", "at")})
        mb.update({k: mb[k][:, :C] for k in ("completion_ids", "mask", "old_logps", "ref_logps") if k in mb})
        yield mb


def fit(fabric, model, gpt, optimizer, train_rows, val_rows, state, lora_config, hparams, out_dir, train: TrainArgs,
        eval: EvalArgs, log: LogArgs, grpo: GRPOArgs, tokenizer, rewards, sampling, start_state, seed) -> None:
    stop = StopRequest()
    names = rewards[0]
    columns = (["step", *STEP_METRICS[:3]] + [f"rewards/{n}/{s}" for n in names for s in ("mean", "std")]
               + STEP_METRICS[3:] + ["val_reward", "val_solved"] + [f"val_rewards/{n}/mean" for n in names]
               + ["lr", "tokens", "tokens_per_sec", "sampling_tokens_per_sec"])
    metrics = MetricsLog(out_dir / "metrics.csv", fabric, start_step=state["step"], logger_name=log.logger_name,
                         hparams=hparams, fields=columns)  # + hparams.yaml, an experiment tracker, loss.png
    max_steps, max_time = train.max_steps, parse_duration(train.max_time)
    prompts_per_step, micro_batch_size = train.batch_size // grpo.num_generations, train.micro_batch_size
    throughput = Throughput(state["step"], max_steps)
    # warm-up and cosine decay over max_steps, or over the --max_time budget (lora_lab/training.py)
    schedule = LRSchedule(train.learning_rate, train.warmup_steps, train.min_lr, max_steps, max_time, state,
                          sync=fabric.broadcast if fabric.world_size > 1 else None)
    earlier_seconds = state.get("seconds", 0.0)  # a resumed run's time before the interruption
    flops = FlopsMeter.for_fabric(gpt, fabric, hparams["peak_flops"])  # model FLOPs, for MFU (lora_lab/flops.py)
    reset_peak_memory(fabric.device)
    batch = state.pop("rollout", None)  # a resumed run mid-way through num_iterations steps on one batch
    sampling_time, sampled = 0.0, 0
    val = None

    while state["step"] < max_steps:
        lr = schedule.lr(state["step"])
        set_lr(optimizer, lr)
        generation = state["step"] // grpo.num_iterations
        if state["step"] % grpo.num_iterations == 0 or batch is None:
            t0 = time.perf_counter()
            batch = rollout(fabric, gpt, tokenizer, step_prompts(train_rows, generation, prompts_per_step, seed),
                            rewards, sampling, start_state, seed, generation, grpo.num_generations, grpo.beta,
                            grpo.scale_rewards, grpo.num_iterations, sampling["temperature"], micro_batch_size)
            sampling_time += time.perf_counter() - t0
            sampled += int(batch["mask"].sum())
        # the token weights of the whole step (lora_lab/grpo.py token_weights): fixed before its micro-batches
        n_tokens = float(batch["mask"].sum())
        if fabric.world_size > 1:
            n_tokens = fabric.all_reduce(torch.tensor(n_tokens, device=fabric.device), reduce_op="sum").item()
        n_tokens /= fabric.world_size
        sums: dict[str, float] = {}
        micro = list(split_batch(batch, micro_batch_size))
        for i, mb in enumerate(micro):
            # gradients are averaged over devices only at the last micro-batch of the step
            with fabric.no_backward_sync(model, enabled=i < len(micro) - 1):
                logps, entropy = completion_logps(model, mb, sampling["temperature"], with_entropy=True)  # (b, C)
                mask = mb["mask"].to(logps.device)
                weights = token_weights(mask, grpo.loss_type, batch["mask"].size(0), n_tokens,
                                        grpo.max_completion_length)
                old = mb["old_logps"].to(logps) if "old_logps" in mb else logps.detach()  # pi_old = pi: rho = 1
                ref = mb["ref_logps"].to(logps) if "ref_logps" in mb else None
                loss, parts = grpo_loss(logps, old, ref, mb["advantages"].to(logps), weights, grpo.beta, grpo.epsilon,
                                        grpo.epsilon_high)
                fabric.backward(loss)
            if not torch.isfinite(loss):
                raise not_finite("loss", loss.item(), state["step"] + 1, out_dir)
            add_sums(sums, "loss", loss.item(), 1.0 / len(micro))  # the shares add up to the step's loss
            add_sums(sums, "entropy", *masked_mean(entropy, mask))
            if "kl" in parts:
                add_sums(sums, "kl", *masked_mean(parts["kl"], mask))
            for name, part in (("low", parts["low_clipped"]), ("high", parts["high_clipped"]),
                               ("region", parts["low_clipped"] | parts["high_clipped"])):
                add_sums(sums, f"clip_ratio/{name}_mean", *masked_mean(part, mask))
            labels = mb["input_ids"].masked_fill(~F.pad(mb["at"][:, :-1], (1, 0)), IGNORE_INDEX)  # completion targets
            state["tokens"] += mb["input_ids"].numel() * fabric.world_size
            throughput.update(mb["input_ids"].numel() * fabric.world_size)
            flops.update({"input_ids": mb["input_ids"], "labels": labels})  # the policy's forward + backward
        if train.grad_clip:
            norm = fabric.clip_gradients(model, optimizer, max_norm=train.grad_clip, error_if_nonfinite=False)
            if not torch.isfinite(norm):  # a finite loss whose gradient overflowed
                raise not_finite("gradient norm", norm.item(), state["step"] + 1, out_dir)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step_done()
        state["step"] += 1
        state["seconds"] = earlier_seconds + throughput.elapsed()
        step = state["step"]
        means = {**batch["metrics"], **{k: s / n for k, (s, n) in all_reduce_sums(fabric, sums).items()}}

        if step % log.interval == 0 or step == max_steps:
            fabric.print(f"step {step}/{max_steps} | loss {means['loss']:.4f} | reward {means['reward']:.3f} "
                         f"(std {means['reward_std']:.3f}) | length {means['completions/mean_length']:.0f} | "
                         + (f"kl {means['kl']:.4f} | " if "kl" in means else "") + f"lr {lr:.2e} | "
                         f"{throughput.tokens_per_sec():,.0f} tok/s | {flops.format(throughput.elapsed())} | "
                         f"ETA {format_seconds(throughput.eta(step))}")
        row = {"step": step, **means, "lr": lr, "tokens": state["tokens"],
               "tokens_per_sec": throughput.tokens_per_sec(),
               "sampling_tokens_per_sec": sampled / max(sampling_time, 1e-9)}
        out_of_time = schedule.out_of_time()
        stop_requested = stop.requested
        if fabric.world_size > 1:
            # every device must take the same branch below (validate, save, break): a device that trained on
            # alone would wait forever for the others in its next gradient all-reduce. Each device has its own
            # clock and Ctrl-C reaches them at slightly different times, so agree: stop if any device says so
            flags = torch.tensor([out_of_time, stop_requested], dtype=torch.float32, device=fabric.device)
            out_of_time, stop_requested = (bool(f) for f in fabric.all_reduce(flags, reduce_op="sum").tolist())
        if val_rows and (step % eval.interval == 0 or step == max_steps or out_of_time):
            val = validate(fabric, gpt, tokenizer, val_rows, rewards, sampling["eos_ids"],
                           grpo.max_completion_length, micro_batch_size, eval.iters, eval.samples)
            row.update({f"val_{k}": v for k, v in val.items()})
            fabric.print(f"step {step}: held-out reward {val['reward']:.3f}, full marks {val['solved']:.1%}")
        metrics.log({k: v for k, v in row.items() if k in columns})
        if step % grpo.num_iterations:  # mid-way through one batch's steps: its completions go into the resume state
            state["rollout"] = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
            state["rollout"]["metrics"] = batch["metrics"]
        else:
            state.pop("rollout", None)
        if step % log.save_interval == 0 or step == max_steps or out_of_time or stop_requested:
            save(fabric, gpt, optimizer, state, lora_config, hparams, out_dir)
            metrics.plot()  # OUT_DIR/loss.png, up to date with what is saved
        state.pop("rollout", None)
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
                 f"{format_seconds(state.get('seconds', 0.0))} (sampling {format_seconds(sampling_time)}, "
                 f"{sampled / max(sampling_time, 1e-9):,.0f} completion tokens/s) | "
                 f"{state['tokens'] / max(state.get('seconds', 0.0), 1e-9):,.0f} tokens/s | "
                 f"{flops.summary(throughput.elapsed())} | "
                 f"peak memory {peak_memory_bytes(fabric.device) / 2**30:.2f} GiB"
                 + (f" | final held-out reward {val['reward']:.3f}" if val is not None else ""))
    fabric.print(f"Adapter saved to {out_dir}")


def add_sums(sums: dict, key: str, total: float, count: float) -> None:
    s, n = sums.get(key, (0.0, 0.0))
    sums[key] = (s + total, n + count)


def all_reduce_sums(fabric, sums: dict) -> dict:
    """The metric sums and counts of the global batch, not only of this device's share."""
    if fabric.world_size == 1:
        return sums
    total = fabric.all_reduce(torch.tensor([x for v in sums.values() for x in v], device=fabric.device),
                              reduce_op="sum").tolist()
    return {k: (total[2 * i], total[2 * i + 1]) for i, k in enumerate(sums)}


def not_finite(what: str, value: float, step: int, out_dir: Path) -> LoraLabError:
    saved = (f"; the last saved state is in {out_dir} (continue from it with --resume)"
             if (out_dir / TRAIN_STATE_FILE).is_file() else "")
    return LoraLabError(f"the {what} is {value} at step {step}: lower --learning_rate (or use --precision 32-true)"
                        + saved)


@torch.no_grad()
def validate(fabric, gpt, tokenizer, val_rows, rewards, stop_ids, max_completion_length, micro_batch_size,
             eval_iters, eval_samples) -> dict[str, float]:
    """Greedy answers to (at most eval_iters batches of) held-out prompts: the mean reward, each function's, and
    `solved`: the share with full marks (every reward function >= 1). Prints eval_samples of the answers."""
    names, functions, weights = rewards
    rows = val_rows[:eval_iters * micro_batch_size]
    gpt.eval()
    completions = []
    for start in range(0, len(rows), micro_batch_size):  # greedy: no random number drawn
        part = rows[start:start + micro_batch_size]
        completions += generate_batch(gpt, [torch.as_tensor(r["prompt_ids"]) for r in part], max_completion_length,
                                      temperature=0.0, eos_ids=stop_ids, pad_id=tokenizer.eos_id or 0)
    gpt.train()
    texts = [tokenizer.decode([t for t in c if t not in stop_ids]) for c in completions]
    per_func = compute_rewards(names, functions, [r["prompt"] for r in rows], texts,
                               [{k: v for k, v in r.items() if k not in ("prompt", "prompt_ids")} for r in rows])
    out = {"reward": (per_func * weights).sum(dim=1).mean().item(),
           "solved": (per_func >= 1).all(dim=1).float().mean().item(),
           **{f"rewards/{n}/mean": per_func[:, k].mean().item() for k, n in enumerate(names)}}
    for row, text, score in list(zip(rows, texts, (per_func * weights).sum(dim=1).tolist()))[:eval_samples]:
        fabric.print(f"\nPrompt: {row['instruction']}" + (f"\n{row['input']}" if row.get("input") else "")
                     + f"\n  answer (reward {score:.2f}): {text}")
    return out


def save(fabric, gpt, optimizer, state, lora_config, hparams, out_dir) -> None:
    """The adapter (for generate/merge/export) and the resume state, each written atomically."""
    if fabric.is_global_zero:
        save_trained_lora(out_dir, gpt, lora_config)  # (an ordinary adapter: grpo.py starts no pissa / olora)
        save_train_state(out_dir / TRAIN_STATE_FILE, {
            "lora": {k: v.detach().cpu() for k, v in lora_state_dict(gpt).items()},
            "optimizer": optimizer.state_dict(),
            "rng": rng_state(),
            "counters": {k: v for k, v in state.items() if k != "stopped"},
            "hparams": hparams,
        })
    fabric.barrier()


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    cli(setup)
