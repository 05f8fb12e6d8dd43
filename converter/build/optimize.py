"""Offline graph optimization with ONNX Runtime, restricted to what every official build runs.

ORT_ENABLE_EXTENDED on the CPU EP fuses GELU, MatMul+scale, LayerNorm and friends into
`com.microsoft` ops that every official CPU build registers, and its output is byte-identical
across runs and thread counts. ORT_ENABLE_ALL (layout) would add `com.microsoft.nchwc` nodes:
x86-64-only kernels whose block size depends on the CPU and which fail on Apple Silicon, so
it is never used. ORT also writes every domain it knows into `opset_import`, which older ORT
versions refuse, so unused imports are dropped here. Constant folding runs with the rest: the
graph's shape arithmetic reaches this step anchored to the input (`converter.build.runtime_shapes`),
so only true constants fold, and an app's session finds nothing left to fold at load time.

For accelerators (`fusions=False`) the passes that write `com.microsoft` ops are switched off
by name: CoreML (1.23) and XNNPACK have no kernel for any of them and DirectML none for
`FusedConv`, so each one would cut the accelerator's partition and run on the CPU EP.
"""

from __future__ import annotations

import errno
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import onnx
import onnxruntime as ort

from converter.build.graph_pass import GraphPass
from converter.errors import UserError, short_of_space
from converter.facts import COM_MICROSOFT, MAX_IR_VERSION, walk_model

log = logging.getLogger(__name__)

LEVEL = "ORT_ENABLE_EXTENDED"
# ORT's names for the passes that write com.microsoft ops (both spellings across 1.17-1.32:
# GeluFusion became GeluFusionL1/L2); an unknown name disables nothing.
COM_MICROSOFT_FUSIONS = (
    "BiasGeluFusion",
    "BiasSoftmaxFusion",
    "ConvActivationFusion",
    "FastGeluFusion",
    "GeluFusion",
    "GeluFusionL1",
    "GeluFusionL2",
    "GemmActivationFusion",
    "MatMulScaleFusion",
    "MatmulTransposeFusion",
    "QuickGeluFusion",
    "SkipLayerNormFusion",
)
FORBIDDEN_DOMAIN_PREFIXES = ("com.microsoft.nchwc", "com.ms.internal")


def used_domains(model: onnx.ModelProto) -> set[str]:
    """Domains of all nodes, including model-local functions and nested subgraphs."""
    domains = {node.domain or "" for _, node in walk_model(model)}
    return domains | {function.domain for function in model.functions}


def forbidden_domains(model: onnx.ModelProto) -> list[str]:
    """Platform-specific domains any node uses, in functions and subgraphs too."""
    return sorted(d for d in used_domains(model) if d.startswith(FORBIDDEN_DOMAIN_PREFIXES))


def prune_opset_imports(model: onnx.ModelProto) -> list[str]:
    """Drop opset_import entries no node uses; return the dropped domains."""
    used = used_domains(model)
    keep = [o for o in model.opset_import if (o.domain or "") in used]
    dropped = sorted(o.domain for o in model.opset_import if (o.domain or "") not in used)
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return dropped


def optimize(
    model: onnx.ModelProto, workdir: Path | None = None, fusions: bool = True
) -> onnx.ModelProto:
    """Run ORT's EXTENDED optimizations on the CPU EP and return the optimized, pruned model;
    without `fusions`, none of the passes that write com.microsoft ops."""
    with tempfile.TemporaryDirectory(prefix="optimize-", dir=workdir) as tmp:
        source, target = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, source)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(target)
        disabled = [] if fusions else list(COM_MICROSOFT_FUSIONS)
        log.info(
            "onnxruntime %s: optimizing at %s on the CPU EP%s",
            ort.__version__,
            LEVEL,
            "" if fusions else ", no com.microsoft fusions (accelerators have no kernels)",
        )
        try:
            ort.InferenceSession(
                str(source),
                options,
                providers=["CPUExecutionProvider"],
                disabled_optimizers=disabled,
            )
        except Exception as exc:  # ORT reports a full disk as INVALID_PROTOBUF, not ENOSPC
            if short_of_space(target.parent, source.stat().st_size):
                raise OSError(errno.ENOSPC, f"onnxruntime could not write {target}") from exc
            raise
        optimized = onnx.load(target)

    dropped = prune_opset_imports(optimized)
    log.info("dropped unused opset imports: %s", ", ".join(dropped) or "none")
    forbidden = forbidden_domains(optimized)
    if forbidden:
        raise UserError(
            f"optimization produced nodes in {forbidden}, which official ONNX Runtime builds on "
            f"other platforms cannot run; optimize at {LEVEL}, never ORT_ENABLE_ALL"
        )
    fused = sorted({n.op_type for _, n in walk_model(optimized) if n.domain == COM_MICROSOFT})
    if not fusions and fused:
        raise UserError(
            f"optimization wrote com.microsoft {fused} although its fusions were disabled; add "
            "the pass that writes them to optimize.COM_MICROSOFT_FUSIONS"
        )
    if optimized.ir_version > MAX_IR_VERSION:
        log.info("lowering ir_version %d -> %d", optimized.ir_version, MAX_IR_VERSION)
        optimized.ir_version = MAX_IR_VERSION
    ops = {}
    for node in optimized.graph.node:
        key = f"{node.domain}:{node.op_type}" if node.domain else node.op_type
        ops[key] = ops.get(key, 0) + 1
    log.info(
        "optimized graph: %d nodes (%s)",
        len(optimized.graph.node),
        ", ".join(f"{k}={v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:12]),
    )
    return optimized


@dataclass
class Optimize(GraphPass):
    """`optimize` in `workdir`, with or without the com.microsoft fusions. Seen by what ONNX
    Runtime leaves: it turns every Constant node into an initializer when it loads a graph, and
    the exporter writes its scalars and shapes as Constant nodes."""

    workdir: Path | None = None
    fusions: bool = True
    name: ClassVar[str] = "optimize"

    def applied(self, model: onnx.ModelProto) -> bool:
        return not any(node.op_type == "Constant" for node in model.graph.node)

    def transform(self, model: onnx.ModelProto) -> onnx.ModelProto:
        return optimize(model, self.workdir, self.fusions)
