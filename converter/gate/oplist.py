"""The operators a file needs, in ONNX Runtime's reduced-build configuration format.

OpenKara's runtime is a reduced ORT build holding only the kernels its catalog's models use
(`tools/ci_build/reduce_op_kernels.py` reads this format: one `domain;opset;Op1,Op2,...` line per
domain and opset, `#` comments). We ship the list beside every file and release so the app's
runtime can be rebuilt to hold every kernel our graph needs. onnx only: no torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from converter.errors import UserError
from converter.facts import is_ai_onnx, sha256_file, walk_model
from converter.gate.fingerprint import read_model

Operators = dict[tuple[str, int], set[str]]

SUFFIX = ".required_operators.config"


def config_path(onnx_path: Path) -> Path:
    """NAME.onnx -> NAME.required_operators.config, beside it (a release asset)."""
    name = onnx_path.name.removesuffix(".onnx")
    return onnx_path.with_name(name + SUFFIX)


def _domain(domain: str) -> str:
    return "ai.onnx" if is_ai_onnx(domain) else domain


def required_operators(model) -> Operators:
    """{(domain, opset): {op types}} of every node, subgraphs and model-local functions included."""
    opsets = {_domain(i.domain): i.version for i in model.opset_import}
    local = {(f.domain, f.name) for f in model.functions}
    for function in model.functions:
        for i in function.opset_import:
            opsets.setdefault(_domain(i.domain), i.version)
    ops: Operators = {}
    for _, node in walk_model(model):
        if (node.domain, node.op_type) in local:
            continue  # a call of a model-local function, whose body is walked too
        domain = _domain(node.domain)
        if domain not in opsets:
            raise ValueError(f"node {node.name!r} ({node.op_type}) uses unimported domain {domain}")
        ops.setdefault((domain, opsets[domain]), set()).add(node.op_type)
    return ops


def union(lists: Iterable[Operators]) -> Operators:
    """The operators of several files (a release's, a catalog's)."""
    merged: Operators = {}
    for ops in lists:
        for key, names in ops.items():
            merged.setdefault(key, set()).update(names)
    return merged


def config_text(ops: Operators, header: Iterable[str] = ()) -> str:
    """The reduced-build config: `#` header lines, then `domain;opset;Op1,Op2` sorted."""
    lines = [f"# {line}" for line in header]
    for (domain, opset), names in sorted(ops.items()):
        lines.append(f"{domain};{opset};{','.join(sorted(names))}")
    return "\n".join(lines) + "\n"


def parse_config(text: str) -> Operators:
    """Read a reduced-build config back; ValueError naming the first malformed line."""
    ops: Operators = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(";")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2]:
            raise ValueError(f"line {number} is not `domain;opset;Op1,Op2,...`: {raw!r}")
        domain, opset, names = parts
        ops.setdefault((domain, int(opset)), set()).update(n.strip() for n in names.split(","))
    return ops


def files_config(paths: list[Path]) -> str:
    """The union config of the ONNX files at `paths` (a release's list), naming each file and
    its SHA-256 in the header; UserError in one line for a path that is not an ONNX file."""
    if not paths:
        raise UserError("no ONNX file given: pass one or more with --file")
    lists, header = [], ["ONNX Runtime reduced-build operator config, union of:"]
    for path in paths:
        lists.append(required_operators(read_model(path)))
        header.append(f"{path.name} sha256 {sha256_file(path)}")
    return config_text(union(lists), header)
