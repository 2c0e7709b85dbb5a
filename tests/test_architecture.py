"""The package's layers (ARCHITECTURE.md): imports go downwards only, and no module imports itself in a circle.

The import graph is read from the source (every ``import`` and ``from ... import``,
also those inside functions), so a lazy import cannot hide a circle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "course_utils"

# Bottom to top. A module may import only modules listed before it. Learner-facing
# modules come first, in the order the chapters need them; grading sits on top.
ORDER = [
    # foundations: no course imports, or only each other
    "settings", "download", "datasets", "device", "history", "toy_data",
    # chapter 2: text to tokens to batches (+ the loader helpers for several processes)
    "tokenizers", "data", "distributed",
    # chapters 3-4: attention and the model
    "kv_cache", "attention", "gpt",
    # chapter 5 and appendix D: generating, saving, training, plotting, pretrained weights
    "generate", "checkpoint", "train", "plots", "pretrained", "substitute",
    # chapters 6-7 and appendix E: what is built on a trained GPT
    "spam", "classify", "instruct", "response_scores", "judge", "chat", "lora",
    "demo",
    # instructor-facing: the grading package, core first
    "grading.core", "grading.weights", "grading.factories", "grading.modules",
    "grading.ch02", "grading.ch03", "grading.ch04", "grading.ch05", "grading.ch06", "grading.ch07",
    "grading.appendix_a", "grading.appendix_d", "grading.appendix_e",
    "grading.nbgrader_ext", "grading.demo", "grading",
]
MAX_GRADING_MODULE_LINES = 600


def _module_name(path: Path, package: Path) -> str:
    parts = list(path.with_suffix("").relative_to(package).parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the course modules it imports (names relative to course_utils)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        name = _module_name(path, root)
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        package = [p for p in package if p]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)]
                if node.module:
                    deps.add(".".join([*base, node.module]))
                else:  # from . import x
                    deps.update(".".join([*base, alias.name]) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("course_utils"):
                deps.add(node.module.removeprefix("course_utils").lstrip("."))
            elif isinstance(node, ast.Import):
                deps.update(a.name.removeprefix("course_utils").lstrip(".") for a in node.names if a.name.startswith("course_utils"))
        graph[name] = {d for d in deps if d and d != name}
    return graph


def _known(graph: dict[str, set[str]], dep: str) -> str:
    """``from .grading import ch05`` reads as grading.ch05 if that is a module, else grading."""
    return dep if dep in graph else dep.rsplit(".", 1)[0]


def test_every_module_has_a_place_in_the_layers():
    graph = import_graph()
    modules = set(graph) - {""}
    assert modules - set(ORDER) == set(), "new module(s): add them to ORDER here and to ARCHITECTURE.md"
    assert set(ORDER) - modules == set(), "ORDER names modules that no longer exist"


def test_imports_only_go_downwards():
    graph = import_graph()
    rank = {name: i for i, name in enumerate(ORDER)}
    upward = []
    for module, deps in graph.items():
        if module not in rank:
            continue
        for dep in deps:
            dep = _known(graph, dep)
            if dep in rank and rank[dep] >= rank[module]:
                upward.append(f"{module} imports {dep}")
    assert upward == []


def test_there_is_no_import_circle():
    raw = import_graph()
    graph = {m: {_known(raw, d) for d in deps} for m, deps in raw.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                circles.append(" -> ".join([*path[path.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_learner_modules_never_import_grading():
    graph = import_graph()
    learner = [m for m in graph if m and not m.startswith("grading")]
    assert [m for m in learner if any(_known(graph, d).startswith("grading") for d in graph[m])] == []


@pytest.mark.parametrize("path", sorted((PACKAGE / "grading").glob("*.py")), ids=lambda p: p.name)
def test_grading_modules_stay_small(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_GRADING_MODULE_LINES, f"{path.name} has {lines} lines; split it"


def test_the_graph_reader_sees_lazy_and_relative_imports(tmp_path):
    """The reader itself, on a fake package with a circle hidden in a function-level import."""
    fake = tmp_path / "course_utils"
    (fake / "grading").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "settings.py").write_text("from .gpt import GPTModel\n")
    (fake / "gpt.py").write_text("def f():\n    from . import settings\n")
    (fake / "grading" / "__init__.py").write_text("")
    (fake / "grading" / "ch05.py").write_text("from ..train import fit\nfrom .core import Tolerance\nimport course_utils.gpt\n")
    graph = import_graph(fake)
    assert graph["settings"] == {"gpt"} and graph["gpt"] == {"settings"}
    assert graph["grading.ch05"] == {"train", "grading.core", "gpt"}
