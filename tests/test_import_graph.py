"""The import graph of lora_lab is one-way: no module imports, directly or through others, a module that imports it.

Every `import` / `from ... import` statement of every module under lora_lab/ counts, also those inside functions
(an import deferred into a function hides a cycle; it does not remove it). An import names a module: `from
lora_lab.lora import inject_lora` is an edge to lora_lab.lora, `from lora_lab import merge_lora` to
lora_lab.merge_lora (a submodule), `from lora_lab import GPT` to the package lora_lab itself. The parent packages a
submodule import runs implicitly (lora_lab/__init__.py for every one of them) are not edges: a package's
__init__ is run once, first, and naming it would make every module look cyclic through it."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = "lora_lab"


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """{dotted module name: file} for every .py file of the package (a package is named by its __init__.py)."""
    files = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def imported_modules(name: str, path: Path, modules: set[str]) -> dict[str, int]:
    """{module of the package: first line that imports it} for the imports anywhere in `path`'s syntax tree."""
    is_package = path.name == "__init__.py"
    found: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        while target and target not in modules:  # `import lora_lab.nf4.x` names a module that is not one: its parent
            target = target.rpartition(".")[0]
        if target and target != name:
            found.setdefault(target, line)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package (the package itself for an __init__)
                base = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            if source != PACKAGE and not source.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                add(sub if sub in modules else source, node.lineno)  # a submodule, or a name in `source`
    return found


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    files = module_files(root)
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle [a, b, ..., a] for every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for component in components:  # a shortest path back to the start, within the component, names the cycle
        start = min(component)
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            nxt = [w for w in sorted(graph[path[-1]]) if w in component]
            if start in nxt:
                cycles.append(path + [start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return cycles


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_lora_lab_has_no_import_cycle():
    graph = import_graph()
    # the parser sees the imports: at the top (merge_lora's) and inside functions (GPT.from_checkpoint's)
    assert len(graph) > 30 and "lora_lab.lora" in graph["lora_lab.formats.merge"]
    assert "lora_lab.checkpoint" in graph["lora_lab.model"]
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in lora_lab:\n" + "\n".join(describe(c, graph) for c in cycles)


def test_the_cycle_finder_finds_function_level_and_relative_imports(tmp_path):
    """A test that cannot fail is a defect: a made-up package with a cycle hidden in a function is caught."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from lora_lab.low import X\n")
    (pkg / "low.py").write_text("X = 1\n")
    (pkg / "high.py").write_text("from lora_lab.low import X\nfrom lora_lab.sub import mid\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "mid.py").write_text("def f():\n    from .. import high\n    return high\n")
    graph = import_graph(tmp_path)
    assert graph["lora_lab.high"] == {"lora_lab.low": 1, "lora_lab.sub.mid": 2}
    assert graph["lora_lab.sub.mid"] == {"lora_lab.high": 2}
    assert find_cycles(graph) == [["lora_lab.high", "lora_lab.sub.mid", "lora_lab.high"]]
    (pkg / "sub" / "mid.py").write_text("def f():\n    from lora_lab.low import X\n    return X\n")
    assert find_cycles(import_graph(tmp_path)) == []


# The layers: the core is what a reader of the method needs (the model, LoRA, NF4, the LLaMA-Adapter, tokens and
# prompts) and stands on three small utilities only; formats/ reads and writes files and never reaches into
# training, evaluation or serving. A core module that imported a format, the trainer or the server would make
# `from lora_lab.lora import ...` pull in FastAPI, lm-eval or GGUF code.
CORE = {"lora_lab.model", "lora_lab.config", "lora_lab.lora", "lora_lab.lora_init", "lora_lab.eva", "lora_lab.nf4",
        "lora_lab.adapter", "lora_lab.tokenizer", "lora_lab.prompts"}
UNDER_CORE = {"lora_lab", "lora_lab.utils", "lora_lab.args", "lora_lab.checkpoint", "lora_lab.progress"}
ABOVE_FORMATS = ("lora_lab.training", "lora_lab.evaluate", "lora_lab.serve", "lora_lab.data", "lora_lab.checks",
                 "lora_lab.loggers", "lora_lab.plot", "lora_lab.compile", "lora_lab.flops", "lora_lab.dpo")


def reachable(graph: dict[str, dict[str, int]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph.get(todo.pop(), {}):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_the_core_imports_only_the_core_and_the_utilities():
    graph = import_graph()
    assert CORE <= graph.keys()
    for module in sorted(CORE):
        outside = reachable(graph, module) - CORE - UNDER_CORE
        assert not outside, f"{module} reaches {sorted(outside)}: the core must not import formats, training, " \
                            f"evaluation or serving"


def test_formats_do_not_reach_training_evaluation_or_serving():
    graph = import_graph()
    formats = [m for m in graph if m.startswith("lora_lab.formats")]
    assert "lora_lab.formats.gguf_names" in formats
    for module in formats:
        bad = sorted(w for w in reachable(graph, module) if w.startswith(ABOVE_FORMATS))
        assert not bad, f"{module} reaches {bad}"
