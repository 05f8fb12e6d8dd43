"""The one exception type that means "the user can fix this"; tasks print it without a traceback.

Also where a full disk becomes such an error: it is the user's to fix (free space, another
folder), and the traceback it would otherwise end in points at whatever write hit it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

# No space left, or the user's quota spent: the same fix.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class UserError(Exception):
    """Bad input or environment: the message names the problem and the fix."""


@contextlib.contextmanager
def disk_space(folder: Path, option: str) -> Iterator[None]:
    """Turn a full disk while the block writes under `folder` into one UserError naming the
    file system and the fix. Put it outside the staging or temp-file cleanup, which has then
    run: what the message promises ("as they were") is already true."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        raise UserError(disk_full(folder, option)) from None


def disk_full(folder: Path, option: str) -> str:
    """The one line for a full disk under `folder`, which `option` chose."""
    where = _existing(folder)
    mount = where
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    free = shutil.disk_usage(where).free
    return (
        f"no space left on the disk holding {folder} (file system {mount}, {free / 1e6:.1f} MB "
        f"free): free space there or pass {option} on another disk; the files in {folder} are "
        "as they were"
    )


def short_of_space(folder: Path, needed: int) -> bool:
    """Whether the disk holding `folder` has less than `needed` bytes free (what a native
    library that reports a failed write only as a failure, not as ENOSPC, likely hit)."""
    return shutil.disk_usage(_existing(folder)).free < needed


def _existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
