"""Release tags: the one home of the grammar tag -> (model, tensor interface, target, file).

`invoke release`, `invoke catalog`, `invoke pin-openkara` and the release workflow all ask this
module (the workflow through `python -m converter.ship.tags TAG`), so the grammar is written once.
Standard library only: the workflow calls it before anything else is installed.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from converter.errors import UserError
from converter.facts import ACCELERATORS_TARGET, CPU_TARGET, SPECTRAL_CORE, WAVEFORM, file_stem

# Prefix -> model; `-spectral` after it selects the spectral-core interface, then
# `-accelerators` the accelerators' file (`invoke convert --target accelerators`).
_FLAVOURS = {"": "htdemucs", "ft-": "htdemucs_ft", "6s-": "htdemucs_6s"}
_NUMBER = r"(?:0|[1-9][0-9]*)"
_TAG = re.compile(
    rf"model-(?P<flavour>ft-|6s-)?(?P<spectral>spectral-)?(?P<target>{ACCELERATORS_TARGET}-)?"
    rf"v{_NUMBER}\.{_NUMBER}\.{_NUMBER}(?P<rc>-rc\.{_NUMBER})?"
)


def example(model: str, interface: str = WAVEFORM, target: str = CPU_TARGET) -> str:
    """The tag pattern of `model`'s `interface` releases for `target`, e.g.
    model-ft-spectral-vX.Y.Z, model-spectral-accelerators-vX.Y.Z."""
    flavour = {name: prefix for prefix, name in _FLAVOURS.items()}[model]
    spectral = "spectral-" if interface == SPECTRAL_CORE else ""
    accelerators = f"{target}-" if target != CPU_TARGET else ""
    return f"model-{flavour}{spectral}{accelerators}vX.Y.Z"


def either(words: list[str]) -> str:
    """ "a, b or c"."""
    return f"{', '.join(words[:-1])} or {words[-1]}" if len(words) > 1 else words[0]


GRAMMAR = (
    f"{either([f'{example(m)} ({m})' for m in _FLAVOURS.values()])} for waveform files; "
    f"{either([example(m, SPECTRAL_CORE) for m in _FLAVOURS.values()])} for spectral-core "
    f"files; -{ACCELERATORS_TARGET}- before the version for the file built with --target "
    f"{ACCELERATORS_TARGET} ({example('htdemucs', SPECTRAL_CORE, ACCELERATORS_TARGET)}); each "
    "optionally followed by -rc.N for a prerelease"
)
# What the release workflow's `on.push.tags` filter must let through; the build job's first
# step refuses whatever else matches it (tests/test_workflows.py keeps the two in step).
WORKFLOW_FILTER = "model-*"


@dataclass(frozen=True)
class Tag:
    name: str
    model: str
    prerelease: bool
    interface: str = WAVEFORM
    target: str = CPU_TARGET

    @property
    def file_name(self) -> str:
        """The released ONNX file: NAME.onnx or NAME.spectral.onnx (either target)."""
        return file_stem(self.model, self.interface) + ".onnx"


def parse_tag(tag: str) -> Tag:
    """Map a release tag to its model and interface; anything off-grammar is refused."""
    match = _TAG.fullmatch(tag)
    if not match:
        raise UserError(f"tag {tag!r} is not a model release tag: use {GRAMMAR}")
    return Tag(
        tag,
        _FLAVOURS[match["flavour"] or ""],
        prerelease=bool(match["rc"]),
        interface=SPECTRAL_CORE if match["spectral"] else WAVEFORM,
        target=ACCELERATORS_TARGET if match["target"] else CPU_TARGET,
    )


def outputs(tag: str) -> str:
    """`key=value` lines for $GITHUB_OUTPUT: model, interface, target, file (the ONNX file's
    name), prerelease."""
    parsed = parse_tag(tag)
    return (
        f"model={parsed.model}\ninterface={parsed.interface}\ntarget={parsed.target}\n"
        f"file={parsed.file_name}\n"
        f"prerelease={str(parsed.prerelease).lower()}\n"
    )


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m converter.ship.tags TAG", file=sys.stderr)
        return 2
    try:
        print(outputs(argv[0]), end="")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
