"""The fine-tuning scripts are one script with the method swapped: finetune/{lora,qlora,full,adapter}.py share their
options, their training loop, validation, evaluation and error handling line for line, so that a fix in one cannot
silently miss the others. Likewise generate/full.py is generate/base.py, and generate/adapter.py decodes exactly as
generate/lora.py does.

The comparison is of syntax trees (ast.dump), so line wrapping and comments may differ but code may not. What a
method may change is listed here, explicitly: the names of its own objects (RENAMES), its own statements
(METHOD_STATEMENTS), the "# ---- the model" section of main() where the method is set up, and save().

Options are compared under their flat names (`lora_r`, `learning_rate`: lora_lab/args.py's `flatten`), whether a
script takes them alone (`seed`) or in a group (`lora: LoRAArgs` -> `--lora.r`), so a group's fields, types and
defaults are checked as single options were. Every script covered: lora, qlora, full, adapter (one script with the
method swapped), classify, dpo and grpo (lora.py's loop and plumbing with another objective), each difference
stated below with its reason."""

from __future__ import annotations

import ast
import functools
import inspect
import re
from pathlib import Path

import dataclasses

import pytest

from conftest import ROOT
from lora_lab.args import flat_name, is_group

REFERENCE = "lora"
SCRIPTS = ["qlora", "full", "adapter"]

# (this script's text, lora.py's text) in names and strings: what fit() hands to save() is the method's own object
RENAMES = {
    "lora": [],
    "qlora": [],
    "adapter": [("adapter_config", "lora_config")],
    "full": [("save_as", "lora_config"), ("Model saved to", "Adapter saved to")],
}

# statements of main() that are the method's own (matched by the start of their source text): argument checks and
# loading the method's part of a resume state
METHOD_STATEMENTS = {
    "lora": ["lora_targets = normalize_targets(", 'load_lora_state_dict(gpt, saved["lora"]',
             'optimizer.load_state_dict(saved["optimizer"])'],
    "qlora": ["lora_targets = normalize_targets(", "if isinstance(nf4_blocksize, bool)",
              'load_lora_state_dict(gpt, saved["lora"]', 'optimizer.load_state_dict(saved["optimizer"])'],
    "full": ["if optimizer not in DEFAULT_LEARNING_RATES:", "if train.learning_rate is None:",
             "if router_aux_loss_coef and not load_config(", "load_full_state(gpt, optimizer, saved"],
    "adapter": ["check_adapter_settings(", 'load_adapter_state_dict(gpt, saved["adapter"]',
                'optimizer.load_state_dict(saved["optimizer"])'],
}

# setup() options (flat names) that configure the method (the rest are shared, in the same order, with the same
# types): LoRA's are its `lora` group
METHOD_ARGUMENTS = {
    "lora": ["lora_r", "lora_alpha", "lora_dropout", "lora_targets", "use_rslora", "use_dora", "lora_plus_ratio",
             "lora_init", "loftq_iter"],
    "qlora": ["quantize", "nf4_blocksize", "double_quant", "lora_r", "lora_alpha", "lora_dropout", "lora_targets",
              "use_rslora", "use_dora", "lora_plus_ratio", "lora_init", "loftq_iter"],
    "full": ["optimizer", "router_aux_loss_coef"],
    "adapter": ["adapter_prompt_length", "adapter_start_layer", "adapter_version"],
}
# shared arguments whose default (or type) suits each method differently
OWN_DEFAULTS = {"out_dir", "learning_rate", "weight_decay"}

SHARED_FUNCTIONS = ["load_data", "fit", "not_finite", "validate", "evaluate_json"]
ORDER = ["setup", "main", "load_data", "fit", "not_finite", "validate", "evaluate_json", "save"]
GROUPS = ["lora", "data", "train", "eval", "log", "hardware"]  # lora.py's groups, in its setup()'s order


def options(name: str) -> list[tuple[str, str, object, object]]:
    """finetune/{name}.py setup()'s options in order, a group's fields in its place: (flat name, flag, type,
    default), e.g. ("lora_r", "lora.r", "int", 8), ("seed", "seed", "int", 42)."""
    out = []
    for p in inspect.signature(function_object(name, "setup")).parameters.values():
        if is_group(p.default):
            out += [(flat_name(p.default, f.name), f"{p.name}.{f.name}", f.type, getattr(p.default, f.name))
                    for f in dataclasses.fields(p.default)]
        else:
            out.append((p.name, p.name, p.annotation, p.default))
    return out


def shared_options(name: str, own, own_defaults, dropped=()) -> list[tuple]:
    """The options but `own` and `dropped`, without type and default for those in `own_defaults`."""
    return [(flat, flag, None, None) if flat in own_defaults else (flat, flag, kind, default)
            for flat, flag, kind, default in options(name) if flat not in own and flat not in dropped]


def parse(path: Path) -> tuple[str, ast.Module]:
    source = path.read_text()
    return source, ast.parse(source)


@functools.lru_cache
def script_source(name: str) -> str:
    return (ROOT / "finetune" / f"{name}.py").read_text()


def script(name: str) -> tuple[str, ast.Module]:
    source = script_source(name)
    return source, ast.parse(source)


def functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}


class Normalise(ast.NodeTransformer):
    """Rename a method's own names to lora.py's and drop its own statements, so the rest can be compared."""

    def __init__(self, source: str, renames=(), drop_prefixes=(), drop_lines=(0, 0)) -> None:
        self.source, self.renames, self.drop_prefixes, self.drop_lines = source, renames, drop_prefixes, drop_lines

    def rename(self, text: str) -> str:
        for ours, theirs in self.renames:
            text = text.replace(ours, theirs)
        return text

    def visit_Name(self, node):
        node.id = self.rename(node.id)
        return node

    def visit_arg(self, node):
        node.arg = self.rename(node.arg)
        node.annotation = None
        return node

    def visit_Constant(self, node):
        if isinstance(node.value, str):
            node.value = self.rename(node.value)
        return node

    def dropped(self, stmt: ast.stmt) -> bool:
        start, end = self.drop_lines
        text = ast.get_source_segment(self.source, stmt) or ""
        return start <= stmt.lineno < end or any(text.startswith(p) for p in self.drop_prefixes)

    def generic_visit(self, node):
        for field in ("body", "orelse", "finalbody"):
            stmts = getattr(node, field, None)
            if isinstance(stmts, list) and stmts and isinstance(stmts[0], ast.stmt):
                setattr(node, field, [s for s in stmts if not self.dropped(s)])
        return super().generic_visit(node)


def normalised(name: str, function: str, drop_model_section: bool = False, source: str = "") -> str:
    """ast.dump of `function` in finetune/{name}.py (or in `source`, read as that script) with the method's names
    and statements taken out."""
    source = source or script_source(name)
    tree = ast.parse(source)
    node = functions(tree)[function]
    drop_lines = (0, 0)
    if drop_model_section:  # from the "# ---- the model" comment to the statement after the method's setup
        lines = source.splitlines()
        start = next(i for i, line in enumerate(lines, 1) if line.strip().startswith("# ---- the model"))
        end = next(i for i, line in enumerate(lines, 1) if i > start and line.strip().startswith("state = {"))
        drop_lines = (start, end)
    node = Normalise(source, RENAMES[name], METHOD_STATEMENTS[name], drop_lines).visit(node)
    node.args = ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[])  # compared apart
    return ast.dump(node, indent=1)


def assert_same(ours: str, reference: str, what: str) -> None:
    if ours != reference:
        import difflib

        diff = "\n".join(difflib.unified_diff(reference.splitlines(), ours.splitlines(), "lora.py", what, n=2,
                                              lineterm=""))
        pytest.fail(f"{what} differs from finetune/lora.py's (syntax trees, after the allowed renames):\n{diff}")


# ------------------------------------------------------------------------------------------------------------
# finetune/*.py
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("function", SHARED_FUNCTIONS)
def test_shared_functions_are_identical(name, function):
    assert_same(normalised(name, function), normalised(REFERENCE, function), f"finetune/{name}.py {function}()")


@pytest.mark.parametrize("name", SCRIPTS)
def test_main_is_identical_outside_the_method(name):
    """Argument checks, data, resume, evaluation before and after, the call of fit(): all shared."""
    assert_same(normalised(name, "main", drop_model_section=True),
                normalised(REFERENCE, "main", drop_model_section=True), f"finetune/{name}.py main()")


@pytest.mark.parametrize("name", SCRIPTS)
def test_setup_shares_every_option_but_the_methods(name):
    assert shared_options(name, METHOD_ARGUMENTS[name], OWN_DEFAULTS) == \
        shared_options(REFERENCE, METHOD_ARGUMENTS[REFERENCE], OWN_DEFAULTS)
    # the method's own options come in one block, after `resume`, as in lora.py
    names = [flat for flat, *_ in options(name)]
    i = names.index("resume") + 1
    assert names[i:i + len(METHOD_ARGUMENTS[name])] == METHOD_ARGUMENTS[name]
    # the same groups, in the same order, as lora.py's (full and adapter: no LoRA)
    groups = [p for p, v in inspect.signature(function_object(name, "setup")).parameters.items() if is_group(v.default)]
    assert groups == [g for g in GROUPS if name in ("lora", "qlora") or g != "lora"]


@pytest.mark.parametrize("name", [REFERENCE, *SCRIPTS, "classify", "dpo", "grpo"])
def test_setup_documents_every_option_and_main_takes_them_all(name):
    """setup()'s Args list every option in order (a group, then each field as `group.field: [--flat] ...`: the help
    jsonargparse shows for --group.field), and setup() hands main() every argument, groups whole: no locals()."""
    setup, main = function_object(name, "setup"), function_object(name, "main")
    params = list(inspect.signature(setup).parameters)
    documented = re.findall(r"^        ([\w.]+):", inspect.getdoc(setup).replace("\n", "\n    "), re.M)
    expected = []
    for p in params:
        default = inspect.signature(setup).parameters[p].default
        expected += [p] + ([f"{p}.{f.name}" for f in dataclasses.fields(default)] if is_group(default) else [])
    assert documented == expected, f"finetune/{name}.py: setup()'s Args do not list its options in order"
    from lora_lab.args import flag_help

    helps = flag_help(setup)
    for flat, flag, _, _ in options(name):
        if "." in flag:  # the flat flag that still works is named first in its help
            assert helps[flag].startswith(f"[--{flat}] "), (name, flag, helps[flag])
    assert list(inspect.signature(main).parameters) == ["fabric", *[p for p in params if p != "plan"]]
    call = functions(script(name)[1])["setup"].body[-1].value
    assert ast.unparse(call) == f"main({', '.join(['fabric', *[p for p in params if p != 'plan']])})"


@pytest.mark.parametrize("name", SCRIPTS)
def test_same_functions_in_the_same_order_and_same_training_imports(name):
    def order(script_name):
        return [f for f in functions(script(script_name)[1]) if f in ORDER]

    assert order(name) == order(REFERENCE) == ORDER

    def training_imports(script_name):
        tree = script(script_name)[1]
        return sorted(a.name for node in tree.body if isinstance(node, ast.ImportFrom)
                      and node.module == "lora_lab.training" for a in node.names)

    assert training_imports(name) == training_imports(REFERENCE)
    # fit() and save() take the same arguments, the method's object in the same place
    for function in ("fit", "save"):
        ours = [renamed(name, a) for a in inspect.signature(function_object(name, function)).parameters]
        assert ours == list(inspect.signature(function_object(REFERENCE, function)).parameters)
    # fit() takes the groups: fabric, the model, optimizer and data, the state, what is saved, and lora.py's
    # train / eval / log (no flat hyperparameters)
    assert list(inspect.signature(function_object(REFERENCE, "fit")).parameters) == [
        "fabric", "model", "gpt", "optimizer", "train_dl", "val_dl", "state", "lora_config", "hparams", "out_dir",
        "train", "eval", "log"]


def renamed(name: str, text: str) -> str:
    """`text` with finetune/{name}.py's own names replaced by lora.py's (RENAMES)."""
    for ours, theirs in RENAMES[name]:
        text = text.replace(ours, theirs)
    return text


def test_the_comparison_can_fail():
    """A changed line in a shared function, or a method statement the tables do not list, is caught."""
    source = script_source("adapter")
    assert normalised("adapter", "validate", source=source) == normalised(REFERENCE, "validate")
    changed = source.replace("torch.stack(losses).mean()", "torch.stack(losses).sum()")
    assert changed != source
    assert normalised("adapter", "validate", source=changed) != normalised(REFERENCE, "validate")

    saved = METHOD_STATEMENTS["adapter"]
    METHOD_STATEMENTS["adapter"] = saved[:1]  # forget that the resume line is the method's
    try:
        assert normalised("adapter", "main", True) != normalised(REFERENCE, "main", True)
    finally:
        METHOD_STATEMENTS["adapter"] = saved


def function_object(name: str, function: str):
    import importlib

    return getattr(importlib.import_module(f"finetune.{name}"), function)


# ------------------------------------------------------------------------------------------------------------
# generate/*.py
# ------------------------------------------------------------------------------------------------------------
def generate_main(name: str, renames=(), from_marker: str = "") -> tuple[str, list]:
    """ast.dump of generate/{name}.py main()'s body (from the comment line `from_marker` on, if given) and its
    parameters as (name, annotation, default)."""
    source, tree = parse(ROOT / "generate" / f"{name}.py")
    node = functions(tree)["main"]
    start = 0
    if from_marker:
        start = next(i for i, line in enumerate(source.splitlines(), 1) if line.strip().startswith(from_marker))
    body = [s for s in node.body[1:] if s.lineno >= start]  # without the docstring
    body = [Normalise(source, renames).visit(s) for s in body]
    params = [(a.arg, ast.unparse(a.annotation)) for a in node.args.args]
    defaults = [ast.unparse(d) for d in node.args.defaults]
    return "\n".join(ast.dump(s, indent=1) for s in body), [p + (d,) for p, d in zip(params, defaults)]


def test_generate_full_is_generate_base():
    full_body, full_params = generate_main("full")
    base_body, base_params = generate_main("base")
    assert_same(full_body, base_body, "generate/full.py main() vs generate/base.py")
    assert [p for p in full_params if p[0] != "checkpoint_dir"] == [p for p in base_params if p[0] != "checkpoint_dir"]


def test_generate_adapter_decodes_as_generate_lora():
    """From building the prompt to printing the answer (steps 2-4 of main) the two scripts are the same."""
    body, params = generate_main("adapter", [("adapter_config", "lora_config")], from_marker="# 2. the prompt")
    lora_body, lora_params = generate_main("lora", from_marker="# 2. the prompt")
    assert_same(body, lora_body, "generate/adapter.py main() from step 2")
    # the same options (but adapter_dir's default), with generate/base.py's --quantize (nf4 or nothing); LoRA's
    # also takes `none`, since its default follows the adapter (nf4 for a QLoRA adapter)
    _, base_params = generate_main("base")
    quantize = next(p for p in base_params if p[0] == "quantize")
    assert quantize in params
    assert next(p for p in lora_params if p[0] == "quantize")[1] == "Optional[Literal['nf4', 'none']]"
    assert [p for p in params if p[0] not in ("quantize", "adapter_dir")] == [p for p in lora_params
                                                                            if p[0] not in ("quantize", "adapter_dir")]


# ------------------------------------------------------------------------------------------------------------
# finetune/classify.py: lora.py's training loop with a classification loss
# ------------------------------------------------------------------------------------------------------------
# statements that differ because the loss is a cross-entropy over classes, not over next tokens (dropped from both)
CLASSIFY_OWN = ["logits = classify(", "loss = F.cross_entropy(", "val_loss, val_accuracy = validate(",
                "row.update(val_loss=val_loss", 'fabric.print(f"step {step}: val loss']
LORA_OWN = ['loss = model(batch["input_ids"], labels=batch["labels"]', "val_loss = validate(",
            "row.update(val_loss=val_loss", 'fabric.print(f"step {step}: val loss']
CLASSIFY_RENAMES = [("classifier_config", "lora_config"), ("Classifier saved to", "Adapter saved to")]
# shared options whose default suits classification differently (texts are short; LoRA on every block linear
# layer, as the experiment; no FSDP)
CLASSIFY_OWN_DEFAULTS = OWN_DEFAULTS | {"data", "max_seq_length", "micro_batch_size", "strategy", "lora_targets"}


def classify_normalised(function: str, script_name: str, drops: list[str], renames=()) -> str:
    source = script_source(script_name)
    node = functions(ast.parse(source))[function]
    node = Normalise(source, renames, drops).visit(node)
    node.args = ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[])
    return ast.dump(node, indent=1)


@pytest.mark.parametrize("function", ["fit", "not_finite"])
def test_classify_trains_with_loras_loop(function):
    assert_same(classify_normalised(function, "classify", CLASSIFY_OWN, CLASSIFY_RENAMES),
                classify_normalised(function, REFERENCE, LORA_OWN), f"finetune/classify.py {function}()")


def test_classify_shares_loras_options_and_shape():
    ours = {flat: (flag, kind, default) for flat, flag, kind, default in options("classify")}
    shared = [o for o in options(REFERENCE) if o[0] in ours]
    # every option of lora.py but the LoRA ones that have no meaning here and the generation / prompt ones
    assert {o[0] for o in options(REFERENCE)} - set(ours) == {"use_rslora", "use_dora", "lora_plus_ratio",
                                                              "prompt_style", "mask_prompt", "eval_samples",
                                                              # raw text has no labels
                                                              "blank_line_docs"}
    assert [o[0] for o in shared] == [n for n in ours if n in {o[0] for o in shared}]  # same order
    for flat, flag, kind, default in shared:
        assert ours[flat][0] == flag, flat  # the same nested flag
        if flat not in CLASSIFY_OWN_DEFAULTS:
            assert ours[flat][1:] == (kind, default), flat
    order = [f for f in functions(script("classify")[1]) if f in ORDER + ["evaluate"]]
    assert order == ["setup", "main", "fit", "not_finite", "validate", "evaluate", "save"]
    for function in ("fit", "save"):
        ours_args = [renamed_classify(a) for a in inspect.signature(function_object("classify", function)).parameters]
        assert ours_args == list(inspect.signature(function_object(REFERENCE, function)).parameters)


def setup_body(name: str, skip=()) -> str:
    """setup()'s statements but the docstring, the call of main() (test_setup_documents_every_option...) and those
    starting with `skip`."""
    source = script_source(name)
    return "\n".join(ast.dump(stmt) for stmt in functions(script(name)[1])["setup"].body[1:-1]
                     if not (ast.get_source_segment(source, stmt) or "").startswith(skip))


def test_classify_setup_is_loras():
    """setup() checks the arguments and fetches the default model first, then starts Fabric, as lora.py's."""
    assert setup_body("classify") == setup_body(REFERENCE)


def renamed_classify(text: str) -> str:
    for ours, theirs in CLASSIFY_RENAMES:
        text = text.replace(ours, theirs)
    return text


# ------------------------------------------------------------------------------------------------------------
# finetune/dpo.py: the same shape and plumbing, another objective (pairs of answers against a reference)
# ------------------------------------------------------------------------------------------------------------
DPO = "dpo"
RENAMES[DPO] = []
METHOD_STATEMENTS[DPO] = []
DPO_ARGUMENTS = ["adapter_dir", "beta", "loss", "quantize", "nf4_blocksize", "double_quant", *METHOD_ARGUMENTS["lora"]]
# lora.py's options that mean nothing for pairs (every other one, packing, compile, MFU, trackers and NEFTune
# included, dpo.py takes as lora.py does):
DPO_DROPPED = {"mask_prompt",  # only the answers are ever scored (answer_logps): the prompt is always masked
               "blank_line_docs"}  # raw text (continued pre-training) has no pairs of answers
DPO_OWN_DEFAULTS = OWN_DEFAULTS | {"data", "eval_samples"}


def test_dpo_setup_shares_every_option_but_its_own():
    assert shared_options(DPO, DPO_ARGUMENTS, DPO_OWN_DEFAULTS, DPO_DROPPED) == \
        shared_options(REFERENCE, METHOD_ARGUMENTS[REFERENCE], DPO_OWN_DEFAULTS, DPO_DROPPED)
    names = [flat for flat, *_ in options(DPO)]
    i = names.index("resume") + 1
    assert names[i:i + len(DPO_ARGUMENTS)] == DPO_ARGUMENTS
    assert setup_body(DPO) == setup_body(REFERENCE)


def test_dpo_same_functions_order_imports_and_shared_plumbing():
    order = [f for f in functions(script(DPO)[1]) if f in ORDER]
    # its before/after is generate_samples + validate; pairs are loaded in main (get_preference_dataloaders)
    assert order == [f for f in ORDER if f not in ("evaluate_json", "load_data")]

    def training_imports(script_name):
        return sorted(a.name for node in script(script_name)[1].body if isinstance(node, ast.ImportFrom)
                      and node.module == "lora_lab.training" for a in node.names)

    assert training_imports(DPO) == training_imports(REFERENCE)
    for function in ("not_finite", "save"):  # word for word lora.py's
        assert_same(normalised(DPO, function), normalised(REFERENCE, function), f"finetune/dpo.py {function}()")
    assert list(inspect.signature(function_object(DPO, "save")).parameters) == \
        list(inspect.signature(function_object(REFERENCE, "save")).parameters)


# dpo.py's fit() is lora.py's with the pair loss in place of the next-token loss: every statement of lora.py's loop
# but these (each side's own loss, its metrics and its lines that print them) is in dpo.py's, in the same order
DPO_FIT_OWN = ["metrics = MetricsLog(", "val = None", "sums: dict", "logps, n_tokens = answer_logps(",
               "chosen, rejected = logps.chunk(2)", "out = preference_loss(", "micro_loss = out[", "add_metrics(sums",
               "step, means = ", 'fabric.print(f"step {step}/{max_steps}', 'row = {"step": step', "val = validate(",
               'row.update({f"val_{k}"', 'fabric.print(f"step {step}: held-out', 'fabric.print(f"Trainable parameters']
LORA_FIT_OWN = ["metrics = MetricsLog(", "val_loss = None", "loss_sum = 0.0", 'loss = model(batch["input_ids"]',
                "loss_sum += loss.item()", "step, train_loss = ", "if fabric.world_size > 1:  # the loss of the global",
                'fabric.print(f"step {step}/{max_steps}', 'row = {"step": step', "val_loss = validate(",
                "row.update(val_loss=val_loss", 'fabric.print(f"step {step}: val loss', 'fabric.print(f"Trainable parameters']


def test_dpo_trains_with_loras_loop_and_plumbing():
    """Trackers and loss.png, MFU, packed rows, NEFTune: what lora.py's loop does, dpo.py's does."""
    assert_same(classify_normalised("fit", DPO, DPO_FIT_OWN, [("micro_loss", "loss")]),
                classify_normalised("fit", REFERENCE, LORA_FIT_OWN), "finetune/dpo.py fit()")
    fit = ast.get_source_segment(script_source(DPO), functions(script(DPO)[1])["fit"])
    # the statements dropped above still carry lora.py's plumbing
    for line in ("logger_name=log.logger_name", "hparams=hparams, fields=COLUMNS",
                 'batch.get("segment_ids")', "neftune_alpha)", "flops.format(throughput.elapsed())",
                 "flops.summary(throughput.elapsed())"):
        assert line in fit, line
    ours = list(inspect.signature(function_object(DPO, "fit")).parameters)
    theirs = list(inspect.signature(function_object(REFERENCE, "fit")).parameters)
    assert ours == theirs + ["beta", "loss"]


def test_dpo_compiles_and_checks_as_lora_does():
    def lines(name, function):
        source = script_source(name)
        return [ast.get_source_segment(source, s) for s in functions(ast.parse(source))[function].body]

    for statement in ("check_args(locals())", "checkpoint_dir = ensure_checkpoint(checkpoint_dir)"):
        assert statement in lines(DPO, "setup") and statement in lines(REFERENCE, "setup")
    compile_line = "if train.compile:  # torch.compile each block for training (lora_lab/compile.py)"
    assert any(s.startswith(compile_line) for s in lines(REFERENCE, "main"))
    assert any(s.startswith(compile_line) and "compile_blocks(gpt)" in s for s in lines(DPO, "main"))


# ------------------------------------------------------------------------------------------------------------
# finetune/grpo.py: the same shape and plumbing, another objective (sampled completions scored by programs)
# ------------------------------------------------------------------------------------------------------------
GRPO = "grpo"
RENAMES[GRPO] = []
METHOD_STATEMENTS[GRPO] = []
GRPO_ARGUMENTS = ["adapter_dir", "quantize", "nf4_blocksize", "double_quant",
                  # its `grpo` group (lora_lab/args.py GRPOArgs), then the `lora` group as lora.py's
                  "reward", "reward_weights", "num_generations", "max_completion_length", "temperature", "top_p",
                  "top_k", "beta", "epsilon", "epsilon_high", "loss_type", "scale_rewards", "num_iterations",
                  *METHOD_ARGUMENTS["lora"]]
# lora.py's options that mean nothing here (every other one, compile, MFU, trackers, max_time included, grpo.py
# takes as lora.py does):
GRPO_DROPPED = {"mask_prompt",  # only the completion tokens are ever scored: the prompt is always context
                "blank_line_docs",  # raw text has no prompts to answer
                "packing",  # a step's completions are scored in right-padded micro-batches, each trimmed to its
                            # longest row; packing them is not implemented (no flag that does nothing)
                "plan"}  # the memory planner (lora_lab/plan.py) has no model of GRPO's sampling batch and KV cache
# Options of the shared groups (TrainArgs, LoRAArgs) that grpo.py takes but refuses unless left at lora.py's default,
# with the reason (lora_lab/checks.py check_args, before anything slow):
GRPO_REFUSED = {
    # noise on the policy pass only would make it score another function than the sampling, old-policy and
    # reference passes (TRL's GRPOTrainer has no NEFTune)
    "neftune_alpha": (5.0, "GRPO has no NEFTune"),
    # pissa / olora / loftq move W's principal part into A, B: the base with the LoRA switched off is then not the
    # starting model, so GRPO's reference would need the swap path for every start; not wired yet (a fresh adapter
    # starts as lora.py's default, kaiming; --loftq_iter only means something with loftq)
    "lora_init": ("pissa", "GRPO starts a fresh adapter as kaiming only"),
}
# shared options with another default here: eval_samples (each answer is printed with its reward: 3, as dpo.py)
GRPO_OWN_DEFAULTS = OWN_DEFAULTS | {"eval_samples"}

# Lines of lora.py's main() and fit() that grpo.py does not have (each replaced by the method's own), matched by
# their start; every OTHER line of lora.py's main() and fit() is in grpo.py's, word for word.
GRPO_REPLACES = {
    "main": [
        # the signature (its `grpo` group, PromptDataArgs: no blank_line_docs, mask_prompt, packing)
        "train: TrainArgs, eval: EvalArgs, log: LogArgs, hardware",
        # the batch is checked in prompts per device below (check_grpo_settings), not in micro-batches
        "check_run(fabric, checkpoint_dir, out_dir, resume, train.batch_size",
        # prompts, not tokenized answers: load_instructions + prompt_rows, no data loader (step_prompts picks
        # them), no data mix to record; max_steps counts prompts per step and num_iterations
        "tokenizer, style, train_dl, val_dl, data_stats = load_data(", "train = replace(train, max_steps=max(1,",
        # data parallel only: sampling with generate_batch needs the whole model on each device, so grpo.py makes
        # its Fabric with L.Fabric (no FSDP2 sharding: make_fabric, setup_module, report_shards, sharded states)
        "model = fabric.setup_module(model)", "report_shards(fabric, gpt)",
        "optimizer = fabric.setup_optimizers(", "weight_decay=train.weight_decay, betas=(0.9, 0.95)))",
        "if is_sharded(gpt):", "load_sharded_state(fabric, gpt, optimizer",
        # the model section: an SFT adapter may be continued (as dpo.py), its LoRAConfig says trained_with grpo; no
        # --lora_init but kaiming (GRPO_REFUSED): a fresh adapter starts as lora.py's default
        "prompt_style=style.name, init=init_config(", "started = time.perf_counter()", "init_lora(model, lora.init",
        'if lora.init != "kaiming":', 'fabric.print(f"--lora_init {lora.init}',
        'if lora.init == "eva" and not resume:', "eva = eva_init(gpt, train_dl)", 'fabric.print(f"--lora_init eva:',
        "inject_lora(model, r=lora.r", "use_rslora=lora.rslora, use_dora=lora.dora)",
        'fabric.print(f"LoRA r={lora.r}', 'f"parameters of {total:,}',
        # no sampler state to resume (the prompt order is a function of the step)
        'state = {"step": 0, "micro_batches": 0', 'train_dl.batch_sampler.load_state_dict(',
        # before / after: the held-out reward of greedy answers (validate), not evaluate_json
        "eval_rows = val_dl.dataset.rows", "if eval_rows and not resume:", 'state["json_before"] = {k: v for k',
        'if k in ("valid_json", "exact_keys", "all_correct")}', 'before = state.get("json_before")', "if before:",
        "fit(fabric, model, gpt, optimizer, train_dl", "if eval_rows and not state.get(", "after = evaluate_json(",
        'fabric.print(f"JSON before -> after', "f\"{after['valid_json']", "f\"exact keys {before", "f\"all values right"],
    "fit": [
        "eval: EvalArgs, log: LogArgs) -> None:",  # fit(..., train, eval, log, grpo, tokenizer, rewards, sampling, ...)
        "hparams=hparams)",  # MetricsLog(..., fields=columns): TRL's names
        # each step samples (rollout), then its micro-batches are split_batch(rollout) instead of a data stream
        "grad_accum = train.grad_accum(", "batches = micro_batches(", "val_loss = None", "loss_sum = 0.0",
        "for i in range(grad_accum):", "batch = next(batches)",
        "with fabric.no_backward_sync(model, enabled=i < grad_accum - 1):",
        # the GRPO loss in place of the next-token loss; its metric sums in place of loss_sum
        'loss = model(batch["input_ids"], labels=', 'segment_ids=batch.get("segment_ids"))',
        "fabric.backward(loss / grad_accum)", "loss_sum += loss.item()",
        'state["tokens"] += batch["input_ids"]', 'throughput.update(batch["input_ids"]', "flops.update(batch)",
        "step, train_loss = ", "train_loss = fabric.all_reduce(", 'fabric.print(f"step {step}/{max_steps} | loss',
        'row = {"step": step, "train_loss"', '"tokens_per_sec": throughput.tokens_per_sec()}',
        # validation: the held-out reward of greedy answers
        "if val_dl is not None and (step % eval.interval", "val_loss = validate(", "row.update(val_loss=",
        'fabric.print(f"step {step}: val loss', "metrics.log(row)",
        "save(fabric, gpt, optimizer, train_dl, state",  # no data loader to save the position of
        # the final line adds the sampling time and speed, and the held-out reward
        'f"{format_seconds(state.get(\'seconds\', 0.0))} | "',
        '+ (f" | final val loss'],
}


def code_lines(name: str, function: str) -> list[str]:
    source = script_source(name)
    segment = ast.get_source_segment(source, functions(ast.parse(source))[function])
    lines = [line.split("  #")[0].strip() for line in segment.splitlines()[1:]]
    return [line for line in lines if line and not line.startswith(("#", '"""'))]


def test_grpo_setup_shares_every_option_but_its_own():
    assert shared_options(GRPO, GRPO_ARGUMENTS, GRPO_OWN_DEFAULTS, GRPO_DROPPED) == \
        shared_options(REFERENCE, METHOD_ARGUMENTS[REFERENCE], GRPO_OWN_DEFAULTS, GRPO_DROPPED)
    names = [flat for flat, *_ in options(GRPO)]
    i = names.index("resume") + 1
    assert names[i:i + len(GRPO_ARGUMENTS)] == GRPO_ARGUMENTS
    # dropout off by default (TRL's disable_dropout): the sampling, old and reference passes see the same function
    assert dict((flat, default) for flat, _, _, default in options(GRPO))["lora_dropout"] == 0.0
    # setup() checks, fetches the default model, starts Fabric and calls main, as lora.py's
    assert setup_body(GRPO, skip=("if plan:", "fabric = ")) == setup_body(REFERENCE, skip=("if plan:", "fabric = "))


def test_grpo_refuses_the_shared_options_it_does_not_support(tmp_path):
    from lora_lab.args import call_flat
    from lora_lab.utils import LoraLabError

    for flat, (value, message) in GRPO_REFUSED.items():
        with pytest.raises(LoraLabError, match=message):  # checked first: the checkpoint is never read
            call_flat(function_object(GRPO, "setup"), checkpoint_dir=tmp_path / "missing", **{flat: value})


@pytest.mark.parametrize("function", ["main", "fit"])
def test_grpo_has_every_line_of_loras_but_the_methods(function):
    """Every line of lora.py's main() / fit() is in grpo.py's, but those GRPO_REPLACES lists (with the reason)."""
    ours = set(code_lines(GRPO, function))
    missing = [line for line in code_lines(REFERENCE, function) if line not in ours]
    stated = GRPO_REPLACES[function]
    unexplained = [line for line in missing if not any(line.startswith(p) for p in stated)]
    assert not unexplained, f"finetune/grpo.py {function}() lacks lora.py's lines: {unexplained}"
    stale = [p for p in stated if not any(line.startswith(p) for line in missing)]
    assert not stale, f"GRPO_REPLACES[{function!r}] lists lines grpo.py now has (or lora.py no longer): {stale}"


def test_grpo_same_functions_order_and_shared_plumbing():
    order = [f for f in functions(script(GRPO)[1]) if f in ORDER]
    # its before/after is validate's held-out reward; prompts are loaded in main (load_instructions, prompt_rows)
    assert order == [f for f in ORDER if f not in ("evaluate_json", "load_data")]
    assert_same(normalised(GRPO, "not_finite"), normalised(REFERENCE, "not_finite"), "finetune/grpo.py not_finite()")
    # save(): lora.py's without the data loader's position (no train_dl: the prompt order is a function of the step)
    # (lora.py's sharded branch aside: grpo.py trains data-parallel only)
    ours, theirs = code_lines(GRPO, "save"), [line for line in code_lines(REFERENCE, "save") if "train_dl" not in line]
    ours = [line.replace("optimizer.state_dict()", "optimizer_state(gpt, optimizer)") for line in ours]
    assert all(line in theirs for line in ours) and ours[-1] == theirs[-1] == "fabric.barrier()"
    assert list(inspect.signature(function_object(GRPO, "save")).parameters) == \
        [p for p in inspect.signature(function_object(REFERENCE, "save")).parameters if p != "train_dl"]

    def training_imports(script_name):
        return {a.name for node in script(script_name)[1].body if isinstance(node, ast.ImportFrom)
                and node.module == "lora_lab.training" for a in node.names}

    # no data loader (micro_batches, iter_keeping_rng): prompts come from step_prompts, sampling has its own
    # seeded generator; greedy answers come from generate_batch (not generate_answers)
    assert training_imports(REFERENCE) - training_imports(GRPO) == {"micro_batches", "iter_keeping_rng",
                                                                    "generate_answers"}
    assert training_imports(GRPO) <= training_imports(REFERENCE)
