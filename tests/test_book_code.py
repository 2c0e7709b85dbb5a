"""Chapter 3 teaches the package's own attention code: the two must not drift apart.

The notebook defines its helpers and classes cell by cell and checks their outputs
against ``course_utils.attention`` (nbval re-runs those checks). This test compares
the code itself, without running anything: each definition below must have the same
syntax tree in the notebook as in the package, docstrings and comments aside (the
notebook explains in comments and prose what the package says in docstrings). A
change to one side that is not made to the other fails here.
"""
from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import pytest
from IPython.core.inputtransformer2 import TransformerManager

from course_utils import attention

NOTEBOOK = Path(__file__).resolve().parent.parent / "book" / "ch03_attention.ipynb"
SHARED = ["scaled_attention", "qkv_layers", "causal_mask", "SelfAttentionV1", "SelfAttentionV2",
          "CausalAttention", "MultiHeadAttentionWrapper"]


def _without_docstrings(node: ast.AST) -> ast.AST:
    for child in ast.walk(node):
        body = getattr(child, "body", None)
        if isinstance(child, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and body:
            if isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                child.body = body[1:] or [ast.Pass()]
    return node


def _definitions(source: str) -> dict[str, str]:
    tree = ast.parse(source)
    return {
        node.name: ast.dump(_without_docstrings(node), include_attributes=False)
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.ClassDef))
    }


_magics = TransformerManager()


def _notebook_definitions() -> dict[str, str]:
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    found: dict[str, str] = {}
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        code = _magics.transform_cell("".join(cell["source"]))  # IPython magics -> plain Python, as the kernel runs them
        for name, dump in _definitions(code).items():
            assert name not in found or name not in SHARED, f"the notebook defines {name} twice"
            found[name] = dump
    return found


@pytest.fixture(scope="module")
def notebook_defs() -> dict[str, str]:
    return _notebook_definitions()


@pytest.mark.parametrize("name", SHARED)
def test_notebook_definition_equals_the_package(name, notebook_defs):
    assert name in notebook_defs, f"{NOTEBOOK.name} no longer defines {name}"
    package = _definitions(inspect.getsource(getattr(attention, name)))[name]
    assert notebook_defs[name] == package, (
        f"{name} differs between {NOTEBOOK.name} and course_utils/attention.py; change both the same way"
    )


def test_the_comparison_sees_a_difference():
    a = _definitions("def f(x):\n    'doc'\n    return x + 1  # comment")
    b = _definitions("def f(x):\n    # other comment\n    return x + 1")
    c = _definitions("def f(x):\n    return x - 1")
    assert a == b and a != c
