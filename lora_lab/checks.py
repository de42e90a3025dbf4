"""Cheap checks of the scripts' arguments: everything that can be judged without loading data or a model.

    check_args(locals())   # the first line of finetune/*.py's setup

A typo in a flag must cost a second, not the minutes of building a data set and loading a model that come before
the line that would otherwise notice it. Each check reads only the arguments a script has (a full fine-tuning run
has no lora_r), and raises a one-line LoraLabError naming the flag. A method's own settings (full.py's
--optimizer, adapter.py's --adapter_version) are checked by the script, in main, still before anything slow.
tests/test_early_checks.py calls every script with each mistake and asserts that no model was loaded.
Names it does not know are left alone (each script checks its own in main). One exception: a script with --beta
is finetune/dpo.py, whose --data / --val_data are preference-pair files (not dataset names), whose --adapter_dir
is a LoRA adapter to continue, and whose --beta / --loss are judged here too. A script with --num_generations is
finetune/grpo.py: instruction data, a LoRA adapter to continue, and its GRPO settings and --reward names judged here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from lora_lab.args import flatten
from lora_lab.utils import LoraLabError

# integer flags that count something and must be >= 1 (or >= 0), when a script has them and they are set
AT_LEAST_ONE = ("lora_r", "batch_size", "micro_batch_size", "max_steps", "max_seq_length", "eval_interval",
                "eval_iters", "save_interval", "log_interval", "devices", "num_nodes", "n_train", "n_val", "n_test",
                "max_new_tokens", "top_k", "nf4_blocksize")
AT_LEAST_ZERO = ("warmup_steps", "eval_samples")
POSITIVE = ("epochs", "learning_rate", "lora_alpha", "lora_plus_ratio")
NON_NEGATIVE = ("weight_decay", "min_lr", "grad_clip", "neftune_alpha", "temperature", "router_aux_loss_coef")


def check_args(args: Mapping[str, Any]) -> None:
    """Raise a one-line LoraLabError for the first argument in `args` (a script's locals()) that is wrong.

    Grouped arguments (lora_lab/args.py: `lora: LoRAArgs`, ...) are read under their flat names (`lora_r`)."""
    args = flatten(args)
    for name in AT_LEAST_ONE + AT_LEAST_ZERO:
        value = args.get(name)
        low = 1 if name in AT_LEAST_ONE else 0
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise LoraLabError(f"--{name} {value!r}: use a whole number >= {low}")
    for name in POSITIVE + NON_NEGATIVE:
        value = args.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
                                  or (name in POSITIVE and value == 0) or value != value):
            raise LoraLabError(f"--{name} {value!r}: use a number {'> 0' if name in POSITIVE else '>= 0'}")
    if args.get("lora_dropout") is not None and not 0 <= args["lora_dropout"] < 1:
        raise LoraLabError(f"--lora_dropout {args['lora_dropout']!r}: use a probability in [0, 1)")
    if args.get("top_p") is not None and not 0 < args["top_p"] <= 1:
        raise LoraLabError(f"--top_p {args['top_p']!r}: use a probability in (0, 1]")
    if args.get("batch_size") and args.get("micro_batch_size") and args["micro_batch_size"] > args["batch_size"]:
        raise LoraLabError(f"--micro_batch_size {args['micro_batch_size']} is larger than --batch_size "
                           f"{args['batch_size']}: the global batch must hold at least one micro-batch")
    if args.get("lora_targets") is not None:
        from lora_lab.lora import normalize_targets

        targets = args["lora_targets"]
        normalize_targets(targets.split(",") if isinstance(targets, str) else targets)
    if args.get("lora_init") is not None:  # a quantized base: qlora.py's --quantize nf4
        from lora_lab.lora_init import check_lora_init

        quantized = args.get("quantize") == "nf4" or args.get("method") == "qlora"
        check_lora_init(args["lora_init"], quantized, bool(args.get("use_dora")), args.get("loftq_iter", 1))
        if "label_column" in args and args["lora_init"] != "kaiming" and args.get("method") not in ("lora", "qlora"):
            raise LoraLabError(f"--lora_init {args['lora_init']} initialises LoRA adapters: use it with --method lora "
                               f"or qlora")
        if args["lora_init"] == "eva" and "label_column" in args:
            raise LoraLabError("--lora_init eva reads token labels (which tokens train), a classifier has one label "
                               "per text: use pissa, olora or loftq here")
        if args["lora_init"] == "eva" and "beta" in args:
            raise LoraLabError("--lora_init eva reads instruction batches (input_ids, labels), not preference pairs: "
                               "use it with finetune/lora.py or qlora.py")
        if args["lora_init"] == "eva" and (args.get("devices") or 1) * (args.get("num_nodes") or 1) > 1:
            raise LoraLabError("--lora_init eva runs on one device (it does not gather the inputs of several): "
                               "use --devices 1, or another --lora_init")
    if args.get("precision") is not None:
        check_precision(args["precision"], training="max_steps" in args)
    if "logger_name" in args:
        from lora_lab.loggers import check_logger_name

        check_logger_name(args["logger_name"])
    if args.get("max_time") is not None:
        from lora_lab.training import parse_duration

        parse_duration(args["max_time"])
    grpo = "num_generations" in args  # finetune/grpo.py: instruction rows as prompts, rewards, a KL beta
    preference = "beta" in args and not grpo  # finetune/dpo.py: pairs of answers, not instruction data
    if "label_column" in args:  # finetune/classify.py: labelled texts in a file, not an instruction data set
        check_classification_args(args)
        if args.get("columns") is not None:
            check_columns(args["columns"], None, fields=("text", "label"))
    else:
        for name in ("data", "val_data"):
            if args.get(name) is not None:
                (check_preference_data if preference else check_data)(args[name], name)
        if args.get("columns") is not None:
            check_columns(args["columns"], args.get("data"), preference)
    if grpo:
        from lora_lab.grpo import check_grpo_settings
        from lora_lab.rewards import check_reward_spec, check_reward_weights, split_list

        check_grpo_settings(args["num_generations"], args["beta"], args["epsilon"], args["epsilon_high"],
                            args["loss_type"], args["scale_rewards"], args["num_iterations"],
                            args["max_completion_length"], args["batch_size"], args["micro_batch_size"],
                            args["temperature"])
        specs = split_list(args["reward"])
        for spec in specs:
            check_reward_spec(spec)
        check_reward_weights(args["reward_weights"], len(specs))
        if args.get("adapter_dir") is not None:
            check_lora_adapter_dir(Path(args["adapter_dir"]))
        # grouped options that finetune/grpo.py shares with lora.py but does not support (test_scripts_consistency)
        if args.get("neftune_alpha"):
            raise LoraLabError(f"--neftune_alpha {args['neftune_alpha']!r}: GRPO has no NEFTune (noise on the "
                               "policy pass only would score another function than the sampling, old-policy and "
                               "reference passes): leave it at 0")
        if args.get("lora_init", "kaiming") != "kaiming":
            raise LoraLabError(f"--lora_init {args['lora_init']}: GRPO starts a fresh adapter as kaiming only (its "
                               "reference is the base with the LoRA off, which pissa / olora / loftq change)")
    if preference:
        from lora_lab.dpo import check_dpo_settings

        check_dpo_settings(args["beta"], args.get("loss", "sigmoid"))
        if args.get("adapter_dir") is not None:
            check_lora_adapter_dir(Path(args["adapter_dir"]))
    if args.get("out_dir") is not None and Path(args["out_dir"]).exists() and not Path(args["out_dir"]).is_dir():
        raise LoraLabError(f"--out_dir {args['out_dir']} is a file: give a directory")
    if args.get("checkpoint_dir") is not None:
        check_checkpoint_dir(Path(args["checkpoint_dir"]))


def check_precision(precision: str, training: bool = True) -> None:
    """Training takes Lightning's precision names; generation also takes dtype names (bfloat16, float32...)."""
    from lightning.fabric.connector import _PRECISION_INPUT_STR
    from typing import get_args

    names = [p for p in get_args(_PRECISION_INPUT_STR) if p != "transformer-engine" or training]
    if not training:
        from lora_lab.generate import PRECISIONS

        names = list(PRECISIONS)
    if str(precision) not in names:
        raise LoraLabError(f"--precision {precision!r}: use one of {', '.join(names)}")


def check_data(data: str, flag: str = "data") -> None:
    from lora_lab.data.instructions import BUILTIN_DATASETS, LOCAL_FILE_HELP, NAMED_DATASETS
    from lora_lab.data.mix import is_mix_file, read_mix_file

    name = str(data)
    path = Path(name).expanduser()
    if path.is_file() and is_mix_file(path):
        read_mix_file(path)  # a mix file's mistakes in one line now, before any data or model is loaded
        return
    if name in BUILTIN_DATASETS or name in NAMED_DATASETS or path.is_file() or path.is_dir():
        return  # (a folder: .txt documents for continued pre-training, read by lora_lab/data/text.py)
    choices = ", ".join((*BUILTIN_DATASETS, *NAMED_DATASETS))
    raise LoraLabError(f"--{flag} {name!r} is neither a dataset name ({choices}) nor an existing file: pass one of "
                       f"those names or a path to {LOCAL_FILE_HELP}")


def check_columns(columns: Any, data: Any, preference: bool = False, fields: tuple[str, ...] = ()) -> None:
    """--columns: {field: your column} for a file of your own, naming fields the data has (instruction rows',
    preference pairs', or `fields`)."""
    from lora_lab.data.instructions import BUILTIN_DATASETS
    from lora_lab.data.instructions import FIELDS as INSTRUCTION_FIELDS
    from lora_lab.data.preference import FIELDS as PREFERENCE_FIELDS
    from lora_lab.data.text import is_text_data

    fields = fields or (PREFERENCE_FIELDS if preference else INSTRUCTION_FIELDS)
    example = ('{"text": "review", "label": "sentiment"}' if "text" in fields else '{"chosen": "good"}' if preference
               else '{"instruction": "question", "output": "answer"}')
    if not isinstance(columns, dict) or not all(isinstance(v, str) for v in columns.values()):
        raise LoraLabError(f"--columns {columns!r}: give a JSON object from field to your column name, e.g. "
                           f"--columns '{example}'")
    unknown = sorted(set(columns) - set(fields))
    if unknown:
        raise LoraLabError(f"--columns: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: map "
                           f"some of {', '.join(fields)} to your column names, e.g. --columns '{example}'")
    if data is not None and (str(data) in BUILTIN_DATASETS or is_text_data(data)):
        raise LoraLabError(f"--columns renames the columns of a .json/.jsonl/.csv file of your own; --data {data} "
                           f"has no columns to rename: leave --columns out")


def check_classification_args(args: Mapping[str, Any]) -> None:
    """finetune/classify.py's own arguments: its data files (.csv / .json / .jsonl that exist), the held-out
    shares, the method, the pooling and the counts only it has."""
    from lora_lab.classifier import METHODS, POOLINGS
    from lora_lab.data.classification import SUFFIXES

    for flag in ("data", "val_data", "test_data"):
        value = args.get(flag)
        if value is None:
            continue
        path = Path(str(value)).expanduser()
        if path.suffix.lower() not in SUFFIXES:
            raise LoraLabError(f"--{flag} {str(value)!r}: give a .csv, .json or .jsonl file of labelled texts (a text "
                               f"and a label column)")
        if not path.is_file():
            raise LoraLabError(f"--{flag} {str(value)!r} does not exist: give a .csv, .json or .jsonl file of "
                               f"labelled texts")
    for flag in ("val_split", "test_split"):
        value = args.get(flag)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value < 1):
            raise LoraLabError(f"--{flag} {value!r}: use a share in [0, 1)")
    if (args.get("val_data") is None and args.get("test_data") is None
            and (args.get("val_split") or 0) + (args.get("test_split") or 0) >= 1):
        raise LoraLabError(f"--val_split {args['val_split']} + --test_split {args['test_split']} leave no training "
                           f"texts: their sum must be below 1")
    if args.get("method") is not None and args["method"] not in METHODS:
        raise LoraLabError(f"--method {args['method']!r}: use one of {', '.join(METHODS)}")
    if args.get("pool") is not None and args["pool"] not in POOLINGS:
        raise LoraLabError(f"--pool {args['pool']!r}: use one of {', '.join(POOLINGS)}")
    value = args.get("trainable_blocks")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise LoraLabError(f"--trainable_blocks {value!r}: use a whole number >= 1")
    for flag in ("features_l2", "head_learning_rate"):
        value = args.get(flag)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
                                  or (flag == "head_learning_rate" and value == 0) or value != value):
            raise LoraLabError(f"--{flag} {value!r}: use a number {'> 0' if flag == 'head_learning_rate' else '>= 0'}")
    if args.get("strategy") == "fsdp" and args.get("method") == "features":
        raise LoraLabError("--strategy fsdp with --method features: the features method trains nothing to shard; "
                           "run it with --strategy auto or ddp (or shard a training method: head, blocks, lora, qlora, "
                           "full)")
    labels = args.get("labels")
    if labels is not None:
        names = labels.split(",") if isinstance(labels, str) else [str(name) for name in labels]
        if any(not name.strip() for name in names):
            raise LoraLabError(f"--labels {labels!r}: a label name is empty (give them as fresh,rotten)")


def check_preference_data(data: str, flag: str = "data") -> None:
    """DPO's data: an existing .json / .jsonl / .csv file of pairs (there are no built-in preference sets)."""
    from lora_lab.data.instructions import DATA_SUFFIXES
    from lora_lab.data.preference import FILE_HELP

    path = Path(str(data)).expanduser()
    if not path.is_file():
        raise LoraLabError(f"--{flag} {str(data)!r} is not an existing file: pass {FILE_HELP}")
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise LoraLabError(f"--{flag} {str(data)!r} is not .json, .jsonl or .csv: pass {FILE_HELP}")


def check_lora_adapter_dir(adapter_dir: Path) -> None:
    """A LoRA adapter folder (its two files exist; their contents are read, and judged, by load_lora)."""
    from lora_lab.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE

    if not adapter_dir.is_dir():
        raise LoraLabError(f"--adapter_dir {adapter_dir} does not exist: pass the out_dir of a LoRA fine-tuning run "
                           f"(it holds {ADAPTER_WEIGHTS_FILE} and {ADAPTER_CONFIG_FILE})")
    for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
        if not (adapter_dir / name).is_file():
            hint = (" (it looks like a model checkpoint, not an adapter)"
                    if (adapter_dir / "model_config.json").is_file() else "")
            raise LoraLabError(f"--adapter_dir {adapter_dir} is not a LoRA adapter folder: {name} is missing{hint}")


def check_checkpoint_dir(checkpoint_dir: Path) -> None:
    """A missing checkpoint is fine only if it is the default one, which ensure_checkpoint fetches."""
    from lora_lab.checkpoint import is_checkpoint, load_config
    from lora_lab.formats.download import DEFAULT_CHECKPOINT

    if is_checkpoint(checkpoint_dir) or checkpoint_dir.absolute() == DEFAULT_CHECKPOINT.absolute():
        return
    load_config(checkpoint_dir)  # the one-line error saying what is wrong with it
