"""`invoke fingerprint FILE`: recompute a downloaded file's `openkara.model_cache_key`.

Maintainers run it on release assets (docs/releasing.md), so it needs only onnx: no torch, no
onnxruntime, nothing POSIX-only. `read_model` is also how the contract gate opens files.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from . import metadata
from .errors import UserError


def read_model(path: Path, error: type[UserError] = UserError) -> onnx.ModelProto:
    """Load the ONNX file at `path`, or raise `error` naming what it is instead."""
    if path.is_dir():
        raise error(f"{path} is a directory; pass an ONNX file (or a glob such as DIR/*.onnx)")
    if not path.is_file():
        raise error(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise error(f"{path} is empty (0 bytes), not an ONNX file; download or convert it again")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError, onnx's own errors: not ONNX at all
        raise error(f"{path} is not an ONNX file ({' '.join(str(exc).split())})") from None
    if not model.HasField("graph"):
        raise error(f"{path} is not an ONNX file (no graph in it)")
    return model


def fingerprint_report(path: Path) -> tuple[str, bool]:
    """(`<key>  <file>: <verdict>`, whether the stamped `openkara.model_cache_key` matches)."""
    model = read_model(path)
    key = metadata.fingerprint(model)
    stamped = metadata.read_metadata(model).get(metadata.CACHE_KEY)
    if stamped is None:
        verdict = "no stamped key"
    elif stamped == key:
        verdict = "matches"
    else:
        verdict = f"differs from stamped {stamped}"
    return f"{key}  {path.name}: {verdict}", stamped == key
