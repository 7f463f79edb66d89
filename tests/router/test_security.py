"""Nothing a client sends is unpickled, evaluated or imported: the edge's modules hold no such call.

The request path is parse (protobuf) -> validate -> engine; this test keeps it that way by reading the
source of every module on that path and refusing pickle/marshal/shelve, eval/exec/compile, and
dynamic imports. Constant-time token comparison is checked the same way (hmac.compare_digest, no ==).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REQUEST_PATH = [f"router/{m}.py" for m in (
    "server", "servicer", "validation", "auth", "tls", "status_codes", "client", "engine", "llm_engine", "scheduler",
    "block_manager", "sequence", "sampler", "detokenizer", "model_runner", "config", "errors")]
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "importlib", "runpy"}
UNSAFE_CALLS = {"eval", "exec", "compile", "__import__", "import_module", "loads"}


def unsafe_uses(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(node.module)
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
            if name in UNSAFE_CALLS:
                found.append(f"{name}() on line {node.lineno}")
    return found


@pytest.mark.parametrize("path", REQUEST_PATH)
def test_request_path_never_deserialises_or_evaluates_client_data(path):
    assert unsafe_uses((ROOT / path).read_text()) == []


def test_the_checker_sees_what_it_looks_for():
    found = unsafe_uses("import pickle\nx = eval(s)\nfrom importlib import import_module\nyaml.loads(b)")
    assert sorted(found) == ["eval() on line 2", "importlib", "loads() on line 4", "pickle"]


def test_tokens_are_compared_in_constant_time():
    tree = ast.parse((ROOT / "router/auth.py").read_text())
    match = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "match")
    calls = {n.func.attr for n in ast.walk(match) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert "compare_digest" in calls
    compares = [n for n in ast.walk(match) if isinstance(n, ast.Compare)
                and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in n.ops)]
    assert compares == []  # no == on secrets: its time depends on where the first difference is
    loop = next(n for n in match.body if isinstance(n, ast.For))
    assert not any(isinstance(n, (ast.Break, ast.Return)) for n in ast.walk(loop))  # every entry compared
