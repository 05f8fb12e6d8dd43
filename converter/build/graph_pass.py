"""The one shape of every graph pass: apply once, refuse a second time, undo where one exists.

Each pass lives beside its rewrite (`runtime_shapes`, `optimize`, `accelerate`, `storage`,
`partition`), as ONNX Runtime's transformers/fusion_*.py do, and tells from the graph itself
(its own node names, or what ONNX Runtime leaves behind) whether it ran, so a file carries no
extra metadata for it. `converter.pipeline.passes` lists them in the order a conversion applies
them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import onnx


class AppliedTwice(ValueError):
    """A pass applied to a graph that went through it already."""


class GraphPass(ABC):
    """One rewrite of a whole graph, configured by its subclass's fields. A subclass names
    itself, says how to see it in a graph (`applied`), rewrites (`transform`) and, where the
    rewrite has an exact inverse, reverts (`inverse`)."""

    name: ClassVar[str]

    @abstractmethod
    def applied(self, model: onnx.ModelProto) -> bool:
        """Whether `model` went through this pass, read off the graph."""

    @abstractmethod
    def transform(self, model: onnx.ModelProto) -> onnx.ModelProto | None:
        """The rewrite: in place (returns None) or into a new model (returns it)."""

    def inverse(self, model: onnx.ModelProto) -> None:
        """`transform` undone in place; only passes with an exact inverse define it."""
        raise NotImplementedError(f"{self.name} has no undo")

    @property
    def reversible(self) -> bool:
        return type(self).inverse is not GraphPass.inverse

    def apply(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """`model` after this pass (the same object where the rewrite is in place)."""
        if self.applied(model):
            raise AppliedTwice(
                f"the graph went through {self.name} already; apply each pass once, to a fresh "
                "export (converter.pipeline.passes lists them in order)"
            )
        rewritten = self.transform(model)
        return model if rewritten is None else rewritten

    def undo(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """`model` as it was before `apply`, in place."""
        if not self.applied(model):
            raise ValueError(f"the graph did not go through {self.name}; nothing to undo")
        self.inverse(model)
        return model
