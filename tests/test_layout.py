"""The package's shape: imports run one way (no cycles, counting imports inside functions), each
method lives in its own package, and the ground floor imports nothing above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import REPO

PACKAGE = REPO / "calora_cli"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """calora module -> the calora modules it imports anywhere in its file (top level or in functions)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # `from calora_cli.x import y`: y may itself be a module (calora_cli.x.y)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t.startswith("calora_cli") and t != name and t != "calora_cli":
                    deps.add(t)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    # models.load_model imports sharded_load inside a function only
    assert "calora_cli.sharded_load" in graph["calora_cli.models"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


GROUND = ("calora_cli.errors", "calora_cli.ranks", "calora_cli.artifacts", "calora_cli.tensor_io", "calora_cli.arch",
          "calora_cli.runtime")


@pytest.mark.parametrize("module", GROUND)
def test_ground_floor_imports_only_the_ground_floor(module):
    assert import_graph()[module] <= set(GROUND), import_graph()[module] - set(GROUND)


def test_layers_run_one_way():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("calora_cli.methods."):
            method = name.split(".")[2]
            others = {d for d in deps if d.startswith("calora_cli.methods.") and d.split(".")[2] != method}
            assert not others, f"{name} imports another method: {others}"
            assert not {d for d in deps if d.startswith("calora_cli.stages")}, name
        if name.startswith("calora_cli.stages."):
            assert not {d for d in deps if d.startswith("calora_cli.stages.")}, f"{name} imports another stage"
        if name.startswith("calora_cli.compress") or name == "calora_cli.distributed":
            assert not {d for d in deps if d.startswith(("calora_cli.methods", "calora_cli.stages"))}, name
        if name != "calora_cli.cli" and name != "calora_cli.__main__":
            assert "calora_cli.cli" not in deps, name


def test_each_method_lives_in_one_package():
    methods = {p.name for p in (PACKAGE / "methods").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert methods == {"ca_lora", "nola", "losa"}
    for name in PACKAGE.rglob("*.py"):
        rel = name.relative_to(PACKAGE).as_posix()
        if rel.startswith("methods/"):
            continue
        for word in ("nola", "losa", "recovery", "recover", "sparsify", "inherit"):
            assert word not in name.stem, f"{rel} belongs in methods/"


def test_test_model_builders_are_not_in_the_package():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert not names & {"build_tiny_llama", "train_bpe_tokenizer"}, path
