"""One home per fact: the sources are scanned for a fact typed again outside its home, so a
retyped opset, I/O name, version list, session setup or tag pattern fails here, not in review.
Reads source text only (no conversion): part of the fast tier."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

from converter import facts
from converter.gate import evidence

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = sorted((ROOT / "converter").rglob("*.py"))
ENTRY_POINTS = [ROOT / "tasks.py", ROOT / "noxfile.py"]


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants: prose may name a value, code may not."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


@functools.cache
def _parsed(path: Path) -> tuple[ast.AST, set[int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return tree, _docstrings(tree)


def _code(paths: list[Path]):
    """(file, node, docstring ids) for every AST node of `paths`."""
    for path in paths:
        tree, docs = _parsed(path)
        for node in ast.walk(tree):
            yield _name(path), node, docs


def _strings(paths: list[Path]) -> list[tuple[str, str]]:
    """(file, text) of every string constant that is not a docstring (f-string parts too)."""
    return [pair for path in paths for pair in _strings_of(path)]


@functools.cache
def _strings_of(path: Path) -> list[tuple[str, str]]:
    return [
        (name, node.value)
        for name, node, docs in _code([path])
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
    ]


def _where(paths, predicate) -> list[str]:
    return sorted({name for name, node, _ in _code(paths) if predicate(node)})


def _call_name(node: ast.AST) -> str:
    if not isinstance(node, ast.Call):
        return ""
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def test_session_options_are_built_in_one_place():
    # ortcheck builds every session an app would open; optimize runs ORT's offline optimizer and
    # graphstats its BASIC folding: neither is a session of the file as shipped.
    assert _where(PACKAGE, lambda n: _call_name(n) == "SessionOptions") == [
        "converter/build/optimize.py",
        "converter/gate/ortcheck.py",
        "converter/measure/graphstats.py",
    ]


def test_opset_and_ir_version_are_not_retyped():
    def retyped(node: ast.AST) -> bool:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            targets = [t.attr for t in node.targets if isinstance(t, ast.Attribute)]
            return "ir_version" in targets and node.value.value == facts.IR_VERSION
        if _call_name(node) == "make_opsetid" and len(node.args) == 2:
            domain, version = node.args
            return isinstance(version, ast.Constant) and getattr(domain, "value", None) == ""
        if isinstance(node, ast.keyword) and node.arg == "opset_version":
            return isinstance(node.value, ast.Constant)
        return False

    assert _where(PACKAGE + ENTRY_POINTS, retyped) == []


def test_io_names_live_in_facts():
    names = {facts.SPECTRAL_OUTPUT, facts.TIME_OUTPUT, facts.MIX_INPUT}
    assert sorted({f for f, s in _strings(PACKAGE) if s in names}) == ["converter/facts.py"]


def test_version_key_sidecar_and_repo_root_have_one_home():
    defined = _where(PACKAGE, lambda n: isinstance(n, ast.FunctionDef) and n.name == "version_key")
    assert defined == ["converter/facts.py"]
    # The `sha256sum` line is parsed by metadata.parse_sidecar alone.
    parsed = _where(
        PACKAGE,
        lambda n: (
            _call_name(n) == "partition" and [getattr(a, "value", 0) for a in n.args] == ["  "]
        ),
    )
    assert parsed == ["converter/metadata.py"]
    # Where the checkout lies: facts.REPO_ROOT; the bare-venv scripts find siblings by path.
    located = _where(PACKAGE, lambda n: isinstance(n, ast.Name) and n.id == "__file__")
    assert located == [
        "converter/facts.py",
        "converter/gate/ortcheck.py",
        "converter/measure/sweep.py",
        "converter/measure/sweepcheck.py",
    ]


def test_tag_grammar_is_written_once():
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    texts = [(_name(p), p.read_text(encoding="utf-8")) for p in workflows]
    texts += list(_strings(PACKAGE + ENTRY_POINTS))
    assert sorted({name for name, text in texts if "vX.Y.Z" in text}) == ["converter/ship/tags.py"]


@pytest.mark.parametrize("version", list(evidence.contract_pins()))
def test_ort_versions_live_in_requirements_contract_txt(version):
    """The load-tested ORT versions are listed in requirements/contract.txt alone (code reads
    them through `evidence.contract_pins`, workflows install through the constraints)."""
    texts = _strings(PACKAGE + ENTRY_POINTS) + _workflow_texts()
    assert [f for f, s in texts if version in s] == []


def _workflow_texts() -> list[tuple[str, str]]:
    """(file, text) of every workflow and composite action."""
    paths = sorted((ROOT / ".github").rglob("*.yml"))
    return [(_name(path), path.read_text(encoding="utf-8")) for path in paths]


def test_workflows_type_no_package_version():
    """Every `pip install` in CI takes its versions from requirements/constraints.txt (the ORT
    and onnxruntime-directml wheels of the accelerator report included): a `NAME==X` typed in
    a workflow would go stale beside it."""
    pinned = re.compile(r"[A-Za-z][\w.-]*==\d")
    assert [(f, m) for f, text in _workflow_texts() for m in pinned.findall(text)] == []


def _explained(lines: list[str], lineno: int) -> bool:
    """A comment beside the import, or above it past other imports and blank lines."""
    if "#" in lines[lineno - 1]:
        return True
    for line in reversed(lines[: lineno - 1]):
        text = line.strip()
        if text.startswith("#"):
            return True
        if text and not text.startswith(("import ", "from ")):
            return False
    return False


def test_imports_inside_functions_say_why():
    """An import inside a function keeps torch, onnx or onnxruntime out of a light process, or
    a module one platform lacks out of the other (DEVELOPERS.md, "Import rules"); its comment
    says which."""
    silent = set()
    for path in PACKAGE:
        tree, _ = _parsed(path)
        lines = path.read_text(encoding="utf-8").splitlines()
        for function in ast.walk(tree):
            if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                silent.update(
                    f"{_name(path)}:{node.lineno}"
                    for node in ast.walk(function)
                    if isinstance(node, ast.Import | ast.ImportFrom)
                    and not _explained(lines, node.lineno)
                )
    assert sorted(silent) == []
