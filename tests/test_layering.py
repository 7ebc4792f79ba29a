"""The house's rules, checked by reading the source (no imports run):

- stages share through `core`, never through each other's internals: plumbing → core → stages;
- every torch.distributed call lives in plumbing/dist.py (a CPU tensor all-reduced under NCCL fails
  only on the GPU run nobody here watches; code that never calls torch.distributed cannot do that).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

STAGES = ("data_prep", "trainer", "sampler", "retrieval")
# What each package may import of ours (the stages also import plumbing and core).
ALLOWED = {
    "plumbing": {"plumbing"},
    "core": {"plumbing", "core"},
    **{stage: {"plumbing", "core", stage} for stage in STAGES},
    "bench": {"plumbing", "core", "bench", *STAGES},
    "tools": {"plumbing", "core", "tools", *STAGES},
}
OURS = {"plumbing", "core", "bench", "tools", *STAGES}


def python_files(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in a file, including those inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)]
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_the_layers_below_it(package: str) -> None:
    wrong = [
        f"{path.relative_to(ROOT)}:{line}: imports {module}"
        for path in python_files(package)
        for line, module in imported_modules(path)
        if module.split(".")[0] in OURS and module.split(".")[0] not in ALLOWED[package]
    ]
    assert not wrong, "\n".join(wrong)


def test_the_scan_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from trainer.data import TrainData\n")
    assert (2, "trainer.data") in imported_modules(bad)


def distributed_calls(path: Path) -> list[str]:
    """Every use of torch.distributed in a file: imports of it, and attributes reached through it."""
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("torch.distributed"):
                    found.append(f"{where}:{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("torch.distributed") or (
                node.module == "torch" and any(a.name == "distributed" for a in node.names)
            ):
                found.append(f"{where}:{node.lineno}: from {node.module} import …")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and ast.unparse(node).startswith("torch.distributed."):
            found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_torch_distributed_outside_plumbing_dist() -> None:
    files = [p for p in python_files(*sorted(OURS)) if p != ROOT / "plumbing" / "dist.py"]
    wrong = [line for path in files for line in distributed_calls(path)]
    assert not wrong, "\n".join(wrong)


def test_the_scan_sees_a_direct_collective(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text(
        "import torch\nimport torch.distributed as dist\n\ndef f(t):\n    torch.distributed.all_reduce(t)\n"
    )
    assert len(distributed_calls(tmp_path / "m.py")) == 2


def trainer_graph() -> dict[str, set[str]]:
    """trainer's modules and the trainer modules each imports (at any depth of the file, TYPE_CHECKING
    blocks included: an import there is still a dependency a reader follows)."""
    modules = {}
    for path in python_files("trainer"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for _, module in imported_modules(path):
            # `from trainer.tasks.base import Task` lists trainer.tasks.base and trainer.tasks.base.Task
            while module and module not in modules:
                module = module.rpartition(".")[0]
            if module and module != name:
                found.add(module)
        graph[name] = found
    return graph


def a_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of the graph, as the modules along it (empty when there is none)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_trainer_imports_run_one_way() -> None:
    """No import cycle inside trainer/: trainer.config imports each section's config, and nothing
    those import imports trainer.config back (the configs are leaves; the tasks sit above them)."""
    cycle = a_cycle(trainer_graph())
    assert not cycle, " → ".join(cycle)


def test_the_configs_import_no_task_and_no_harness_above_them() -> None:
    graph = trainer_graph()
    below, todo = set(), ["trainer.config"]
    while todo:
        for module in graph[todo.pop()] - below:
            below.add(module)
            todo.append(module)
    above = {"trainer.plan", "trainer.loop", "trainer.train", "trainer.tasks", "trainer.cli"}
    tasks = {m for m in graph if m.startswith("trainer.tasks.") and not m.endswith((".config", ".base"))}
    assert not below & (above | tasks), sorted(below & (above | tasks))


def test_the_cycle_check_sees_a_cycle() -> None:
    assert a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert a_cycle({"a": {"b"}, "b": set()}) == []
