"""`invoke fingerprint FILE`: recompute a downloaded file's `openkara.model_cache_key`.

The key covers the graph, the weights and the metadata the runtime acts on
(`metadata.fingerprint`), so an edited entry shows as a mismatch.

Maintainers run it on release assets (docs/releasing.md), so it needs only onnx: no torch, no
onnxruntime, nothing POSIX-only. `read_model` is also how the contract gate opens files.
"""

from __future__ import annotations

import stat
from pathlib import Path

import onnx

from converter import metadata
from converter.errors import UserError


def read_model(path: Path, error: type[UserError] = UserError) -> onnx.ModelProto:
    """Load the ONNX file at `path`, or raise `error` naming what it is instead."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as exc:  # a folder on the way we may not enter, a symbolic link loop
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise error(f"{path} is a directory; pass an ONNX file (or a glob such as DIR/*.onnx)")
    if not stat.S_ISREG(mode):
        raise error(f"{path} is not a regular file; pass an ONNX file")
    if path.stat().st_size == 0:
        raise error(f"{path} is empty (0 bytes), not an ONNX file; download or convert it again")
    try:
        model = onnx.load(str(path))
    except OSError as exc:  # unreadable (permissions, an I/O error), not "not ONNX"
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
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
    elif stamped == metadata.graph_fingerprint(model):
        verdict = (
            f"differs from stamped {stamped}, the key over the graph alone that files converted "
            "before the key covered the metadata carry; convert the file again"
        )
    else:
        verdict = f"differs from stamped {stamped}"
    return f"{key}  {path.name}: {verdict}", stamped == key
