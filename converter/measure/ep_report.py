"""What each ONNX Runtime execution provider takes of a converted file, as OpenKara opens it.

OpenKara registers CoreML (Apple Silicon), DirectML (Windows) or XNNPACK (Intel Mac, Linux)
before the CPU EP, each with default options, and disables ORT's graph optimization for files
stamped `openkara.optimized_by=onnxruntime`. This module opens a session that way for every
provider the running ORT has and reads the placement from ORT's own verbose log ("Node(s)
placed on [EP]", CoreML's "number of partitions supported by CoreML"), then weighs each
provider's nodes by multiply-accumulates. The static part runs ORT's mobile usability checker
(`onnxruntime.tools.mobile_helpers.usability_checker`, the partitioning `analyze_model` reports)
for CoreML NeuralNetwork and MLProgram on a copy whose value_info holds every shape: ONNX
shape inference stops at com.microsoft ops, so their shapes come from one profiled ORT run.

Needs onnx, onnxruntime and numpy only (no torch).
"""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from converter.build.runtime_shapes import inferred
from converter.errors import UserError
from converter.facts import is_ai_onnx, walk_model
from converter.gate.fingerprint import read_model
from converter.gate.ortcheck import open_session
from converter.measure.graphstats import _node_macs

log = logging.getLogger(__name__)

# OpenKara's order: the first one a platform has is registered before the CPU EP.
PROVIDERS = (
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
    "XnnpackExecutionProvider",
    "CPUExecutionProvider",
)
CPU = "CPUExecutionProvider"
# Inputs that accelerators need as constant initializers (CoreML cuts a partition at each
# computed one; DirectML fuses only nodes whose shape inputs are initializers).
SHAPE_INPUTS = {
    "Reshape": (1,),
    "Slice": (1, 2, 3, 4),
    "Expand": (1,),
    "Pad": (1, 2, 3),
    "Tile": (1,),
    "ConstantOfShape": (0,),
    "Split": (1,),
    "Unsqueeze": (1,),
    "Squeeze": (1,),
    "ReduceSum": (1,),
}
CHECKER_FORMATS = {
    "NeuralNetwork": "coreml_supported_neuralnetwork_ops.md",
    "MLProgram": "coreml_supported_mlprogram_ops.md",
}
# CoreML's ModelFormat when the provider options are left at their defaults, as OpenKara does.
APP_FORMAT = "NeuralNetwork"
_PLACED = re.compile(r"(Node\(s\)|All nodes) placed on \[(\w+)\]\. Number of nodes: (\d+)")
_NODE = re.compile(r"VerifyEachNodeIsAssignedToAnEp\]\s{3}(\S+)(?: \((.*)\))?\s*$")
_COREML = re.compile(
    r"number of partitions supported by CoreML: (\d+).*?supported by CoreML: (\d+)"
)


@dataclass
class Placement:
    """One provider's share of a session: partitions, nodes, multiply-accumulates."""

    provider: str
    partitions: int = 0
    nodes: int = 0
    total_nodes: int = 0
    macs: int = 0
    total_macs: int = 0
    coreml_log: str = ""

    def line(self) -> str:
        share = self.macs / self.total_macs if self.total_macs else 0.0
        nodes = self.nodes / self.total_nodes if self.total_nodes else 0.0
        text = (
            f"{self.provider}: {self.partitions} partitions, {self.nodes} / {self.total_nodes} "
            f"nodes ({nodes:.1%}), {share:.1%} of {self.total_macs / 1e9:.2f} GMAC"
        )
        return text + (f"; CoreML's log: {self.coreml_log}" if self.coreml_log else "")


@dataclass
class CheckerVerdict:
    """ORT's usability checker for one CoreML format."""

    format: str
    partitions: int
    supported_nodes: int
    nodes: int
    nodes_in_subgraphs: int
    unsupported_ops: list[str] = field(default_factory=list)

    def line(self) -> str:
        share = self.supported_nodes / self.nodes if self.nodes else 0.0
        return (
            f"checker CoreML {self.format}: {self.partitions} partitions, "
            f"{self.supported_nodes} / {self.nodes} nodes ({share:.1%}), "
            f"{self.nodes_in_subgraphs} nodes in subgraphs; unsupported ops: "
            f"{', '.join(self.unsupported_ops) or 'none'}"
        )


# --- the graph, statically ---------------------------------------------------------------------


def _constants(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.initializer}
    return names | {n.output[0] for n in graph.node if n.op_type == "Constant"}


def computed_shape_inputs(model: onnx.ModelProto) -> list[str]:
    """'Op name' of every node (subgraphs included) whose shape-like input is computed."""
    found = []

    def walk(graph: onnx.GraphProto, outer: set[str]) -> None:
        constant = outer | _constants(graph)
        for node in graph.node:
            positions = SHAPE_INPUTS.get(node.op_type, ()) if is_ai_onnx(node.domain) else ()
            if any(i < len(node.input) and node.input[i] not in ("", *constant) for i in positions):
                found.append(f"{node.op_type} {node.name}")
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    walk(sub, constant)

    walk(model.graph, set())
    return found


MATRIX_PRODUCTS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})


def computed_weights(model: onnx.ModelProto) -> list[str]:
    """Main-graph matrix products whose weight (input 1) is computed from stored constants
    (float16 storage's Cast): CoreML and XNNPACK take Conv/MatMul only with constant weights."""
    graph = model.graph
    constant = _constants(graph)
    derived: set[str] = set()
    for node in graph.node:  # topological order: a constant expression's inputs come first
        if node.input and all(i in constant or i in derived for i in node.input if i):
            derived.update(node.output)
    return [
        f"{n.op_type} {n.name}"
        for n in graph.node
        if n.op_type in MATRIX_PRODUCTS and len(n.input) > 1 and n.input[1] in derived
    ]


def nodes_in_subgraphs(model: onnx.ModelProto) -> int:
    return sum(1 for where, _ in walk_model(model) if where != "main graph")


def _is_static(value: onnx.ValueInfoProto) -> bool:
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return False
    return all(d.HasField("dim_value") for d in value.type.tensor_type.shape.dim)


def dynamic_values(model: onnx.ModelProto) -> list[str]:
    """Node outputs (main graph and subgraphs) whose shape ONNX shape inference cannot pin."""
    shaped = inferred(model)
    known = {v.name for v in shaped.graph.value_info if _is_static(v)}
    known |= {v.name for v in (*shaped.graph.input, *shaped.graph.output) if _is_static(v)}
    for _, node in walk_model(shaped):
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                known |= {v.name for v in (*sub.value_info, *sub.output) if _is_static(v)}
    return [o for _, n in walk_model(model) for o in n.output if o and o not in known]


# --- shapes as ORT sees them --------------------------------------------------------------------


def ort_shapes(path: Path) -> dict[str, tuple[int, list[int]]]:
    """{value: (element type, shape)} of every node output, from one profiled CPU-EP run with
    graph optimization off: ORT knows the shapes ONNX inference cannot (com.microsoft ops)."""
    with tempfile.TemporaryDirectory(prefix="ep-report-") as tmp:
        session = open_session(path, profile=str(Path(tmp) / "profile"))
        feeds = {
            i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
            for i in session.get_inputs()
        }
        session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    model = onnx.load(str(path), load_external_data=False)
    outputs = {n.name: list(n.output) for _, n in walk_model(model)}
    kinds = {"float": TensorProto.FLOAT, "int64": TensorProto.INT64, "bool": TensorProto.BOOL}
    kinds |= {"float16": TensorProto.FLOAT16, "int32": TensorProto.INT32}
    shapes = {}
    for event in events:
        args = event.get("args", {})
        name = event.get("name", "").removesuffix("_kernel_time")
        if "output_type_shape" not in args or name not in outputs:
            continue
        for value, typed in zip(outputs[name], args["output_type_shape"], strict=False):
            ((kind, dims),) = typed.items()
            if value and kind in kinds:
                shapes[value] = (kinds[kind], list(dims))
    return shapes


def with_shapes(model: onnx.ModelProto, path: Path | None = None) -> onnx.ModelProto:
    """A copy of `model` whose main graph's value_info holds a static shape for every node
    output: ONNX inference first, then (only where it stopped) ORT's shapes from a run."""
    shaped = inferred(model)
    values = {v.name: v for v in shaped.graph.value_info if _is_static(v)}
    for _, node in walk_model(shaped):
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                values |= {v.name: v for v in sub.value_info if _is_static(v)}
    outputs = {v.name for v in model.graph.output}
    missing = [
        o
        for _, n in walk_model(model)
        for o in n.output
        if o and o not in values and o not in outputs
    ]
    if missing and path is not None:
        log.info("%d values without a static ONNX shape: taking ORT's from a run", len(missing))
        for name, (kind, dims) in ort_shapes(path).items():
            if name in missing:
                values[name] = helper.make_tensor_value_info(name, kind, dims)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.value_info[:]
    result.graph.value_info.extend(v for n, v in values.items() if n not in outputs)
    return result


def _shape_table(model: onnx.ModelProto) -> dict[str, list[int]]:
    graph = model.graph
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in (*graph.value_info, *graph.input, *graph.output)
    }
    for _, node in walk_model(model):
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            shapes[node.output[0]] = list(node.attribute[0].t.dims)
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def node_macs(model: onnx.ModelProto) -> dict[str, int]:
    """{node name: multiply-accumulates per run} of a `with_shapes` model, fused ops included."""
    shapes = _shape_table(model)
    macs = {}
    for _, node in walk_model(model):
        try:
            macs[node.name] = _macs(node, shapes)
        except (KeyError, IndexError):  # a node without a shape ORT reported: no MAC counted
            macs[node.name] = 0
    return macs


def _macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    if node.op_type == "FusedMatMul":
        a, out = shapes[node.input[0]], shapes[node.output[0]]
        trans_a = any(x.name == "transA" and x.i for x in node.attribute)
        return math.prod(out) * (a[-2] if trans_a else a[-1])
    if node.op_type in ("FusedConv", "FusedGemm"):
        node = helper.make_node(node.op_type[5:], list(node.input), list(node.output))
    return _node_macs(node, shapes)


# --- the static checker -------------------------------------------------------------------------


def checker_verdicts(shaped: onnx.ModelProto) -> list[CheckerVerdict]:
    """ORT's checker on `shaped` (a `with_shapes` copy), for both CoreML formats, as
    `analyze_model(..., skip_optimize=True)` computes it."""
    # onnxruntime here: `invoke release` imports this module (through compare) without it
    from onnxruntime.tools.mobile_helpers import usability_checker as checker

    verdicts = []
    for name, table in CHECKER_FORMATS.items():
        info = checker.check_coreml_partitions(shaped, True, table)
        verdicts.append(
            CheckerVerdict(
                format=name,
                partitions=info.num_partitions,
                supported_nodes=info.num_supported_nodes,
                nodes=info.num_nodes,
                nodes_in_subgraphs=info.num_nodes_in_subgraphs,
                unsupported_ops=sorted(info.unsupported_ops),
            )
        )
    return verdicts


def app_coreml_share(path: Path) -> float | None:
    """Percent of the file's nodes ORT's checker places on CoreML in the format the app's
    default provider options build (NeuralNetwork): the share `invoke compare` budgets. None
    where the checker itself fails on the graph (it indexes a Transpose's optional `perm`)."""
    model = read_model(path)
    try:
        verdicts = checker_verdicts(with_shapes(model, path))
    except Exception as exc:  # the checker is ORT's tool, not ours: record, do not gate
        log.warning("ep-report: ORT's checker failed on %s (%r); share not measured", path, exc)
        return None
    (verdict,) = [v for v in verdicts if v.format == APP_FORMAT]
    return 100.0 * verdict.supported_nodes / verdict.nodes if verdict.nodes else 0.0


# --- placements, from ORT's log -----------------------------------------------------------------


_SESSION = """
import sys, onnxruntime as ort
options = ort.SessionOptions()
options.log_severity_level = 0
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
ort.InferenceSession(sys.argv[1], options, providers=[sys.argv[2], "CPUExecutionProvider"])
"""


def session_log(path: Path, provider: str) -> str:
    """ORT's verbose log of a session as OpenKara opens one: `provider` with default options
    before the CPU EP, graph optimization off. A child process, since ORT logs to stderr."""
    done = subprocess.run(
        [sys.executable, "-c", _SESSION, str(path), provider],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{provider} could not open {path}: {last}")
    return done.stdout + done.stderr


def parse_placements(text: str) -> dict[str, list[tuple[str, str]]]:
    """{provider: [(op type, node name)]} from ORT's verbose log; an "All nodes placed" line
    gives the count only, as [('*', '')] repeated."""
    placed: dict[str, list[tuple[str, str]]] = defaultdict(list)
    current = None
    for line in text.splitlines():
        header = _PLACED.search(line)
        if header:
            current = header.group(2)
            if header.group(1) == "All nodes":
                placed[current] += [("*", "")] * int(header.group(3))
                current = None
            continue
        entry = _NODE.search(line) if current else None
        if entry:
            placed[current].append((entry.group(1), entry.group(2) or ""))
        elif "VerifyEachNodeIsAssignedToAnEp" not in line:
            current = None
    return dict(placed)


def _components(names: set[str], model: onnx.ModelProto) -> int:
    """Connected groups among nodes `names` (edges: a value one produces and another reads)."""
    parent = {n: n for n in names}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    producer = {}
    for _, node in walk_model(model):
        if node.name in names:
            for out in node.output:
                producer[out] = node.name
    for _, node in walk_model(model):
        if node.name not in names:
            continue
        for value in node.input:
            if value in producer:
                parent[find(producer[value])] = find(node.name)
    return len({find(n) for n in names})


def placements(
    model: onnx.ModelProto, text: str, provider: str, macs: dict[str, int]
) -> list[Placement]:
    """`provider`'s and the CPU EP's shares of a session, from its log `text`."""
    graph_nodes = {n.name for _, n in walk_model(model) if n.op_type != "Constant"}
    total = len(graph_nodes)
    total_macs = sum(macs.values())
    placed = parse_placements(text)
    result = []
    cpu = {name for _, name in placed.get(CPU, []) if name in graph_nodes}
    if placed.get(CPU) and placed[CPU][0][0] == "*":
        cpu = set(graph_nodes)
    for ep in dict.fromkeys([provider, CPU]):
        entries = placed.get(ep, [])
        if ep == CPU:
            mine = cpu
            partitions = _components(mine, model) if mine else 0
        else:  # a compiling EP lists its partitions as fused nodes, a kernel EP its nodes
            mine = graph_nodes - cpu if entries else set()
            plain = {name for _, name in entries if name in graph_nodes}
            fused = sum(1 for _, name in entries if name not in graph_nodes)
            partitions = fused + (_components(plain, model) if plain else 0)
        coreml = _COREML.search(text) if ep.startswith("CoreML") else None
        result.append(
            Placement(
                provider=ep,
                partitions=partitions,
                nodes=len(mine),
                total_nodes=total,
                macs=sum(macs.get(n, 0) for n in mine),
                total_macs=total_macs,
                coreml_log=(
                    f"{coreml.group(1)} partitions, {coreml.group(2)} nodes" if coreml else ""
                ),
            )
        )
    return result


# --- the report ---------------------------------------------------------------------------------


def report(path: Path, providers: list[str] | None = None) -> dict:
    """Everything `invoke ep-report FILE` prints, as a dict (also written as JSON by the task)."""
    # onnxruntime here: `invoke release` imports this module (through compare) without it
    import onnxruntime as ort

    model = read_model(path)
    available = ort.get_available_providers()
    shaped = with_shapes(model, path)
    macs = node_macs(shaped)
    result: dict = {
        "file": str(path),
        "onnxruntime": ort.__version__,
        "nodes_in_subgraphs": nodes_in_subgraphs(model),
        "computed_shape_inputs": len(computed_shape_inputs(model)),
        "computed_weights": len(weighted := computed_weights(model)),
        "computed_weight_macs": sum(macs.get(w.split(" ", 1)[1], 0) for w in weighted),
        "total_macs": sum(macs.values()),
        "dynamic_values": len(dynamic_values(model)),
        "com_microsoft": sorted(
            {n.op_type for _, n in walk_model(model) if not is_ai_onnx(n.domain)}
        ),
        "checker": [asdict(v) for v in checker_verdicts(shaped)],
        "providers": {},
        "missing": [],
    }
    for provider in PROVIDERS if providers is None else providers:
        if provider not in available:
            result["missing"].append(provider)
            continue
        log.info("ep-report: a session on %s as OpenKara opens it", provider)
        text = session_log(path, provider)
        result["providers"][provider] = [asdict(p) for p in placements(model, text, provider, macs)]
    return result


def lines(result: dict) -> list[str]:
    """The report as text: one line per fact, one per missing provider."""
    share = result["computed_weight_macs"] / result["total_macs"] if result["total_macs"] else 0.0
    out = [
        f"{result['file']} on onnxruntime {result['onnxruntime']}",
        f"nodes in subgraphs: {result['nodes_in_subgraphs']}; computed shape inputs: "
        f"{result['computed_shape_inputs']}; values without a static shape: "
        f"{result['dynamic_values']}; com.microsoft ops: "
        f"{', '.join(result['com_microsoft']) or 'none'}",
        f"matrix products whose weight is not a constant (float16 storage's Cast): "
        f"{result['computed_weights']}, {share:.1%} of the multiply-accumulates",
    ]
    out += [CheckerVerdict(**v).line() for v in result["checker"]]
    for provider, shares in result["providers"].items():
        out += [f"session with {provider}: " + Placement(**s).line() for s in shares[:1]]
        out += ["  beside it, " + Placement(**s).line() for s in shares[1:]]
    out += [f"{p}: not in this onnxruntime build, skipped" for p in result["missing"]]
    return out
