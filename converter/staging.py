"""Output files that appear together or not at all, even when a run is stopped midway.

A run writes into a private `.staging-PID-*` folder beside its targets and, once everything
passed, moves the files over the targets together: each existing target is set aside first,
and any failure (or Ctrl-C / SIGTERM) puts the previous set back. A later run removes staging
folders whose process is gone (a SIGKILL leaves one behind; the PID in the name is looked up on
this machine, so two machines must not share an output folder); nothing else reads them.

A run can also hold its folder exclusively (`exclusive=True`, `invoke separate`): a second run
into the same folder is refused at once instead of racing the first one's commit, and
`replace_also` names files of the previous set that the new set does not have, so the whole set
is replaced, not only the files that share a name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from converter.errors import UserError

log = logging.getLogger(__name__)

PREFIX = ".staging-"
# The lock file of an exclusive Staging; `remove_stale` never takes it for a staging folder.
LOCK = f"{PREFIX}lock"


def check_targets(targets: Sequence[Path]) -> None:
    """Refuse targets that exist but are not files (a directory named `drums.wav`, a socket)."""
    for target in targets:
        if (target.exists() or target.is_symlink()) and not _replaceable(target):
            kind = "a directory" if target.is_dir() else "not a regular file"
            raise UserError(f"{target} is {kind}; move it away or pick another output folder")


def _replaceable(path: Path) -> bool:
    return path.is_symlink() or path.is_file()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill would terminate the process there; keep its folder
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def remove_stale(folder: Path) -> list[Path]:
    """Delete `.staging-PID-*` folders in `folder` whose process no longer runs."""
    removed = []
    for path in folder.glob(f"{PREFIX}*"):
        pid = path.name[len(PREFIX) :].split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s, left by process %s that stopped before cleaning up", path, pid)
            removed.append(path)
    return removed


def describe(targets: Sequence[Path]) -> str:
    """What a stopped run leaves: the previous files, untouched, and nothing new."""
    folder = targets[0].parent
    kept = [t.name for t in targets if t.exists()]
    if not kept:
        return f"nothing was written to {folder}"
    return f"nothing new was written; kept {', '.join(kept)} in {folder} as they were"


class FolderLock:
    """An exclusive, non-blocking lock on `folder` for one process: the OS drops it when the
    process dies (flock / msvcrt), so a killed run never blocks the next one.

    The lock file is removed on release; a run that locked a file just unlinked by another
    finds it is no longer the folder's lock file and takes the new one instead.
    """

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self.fd: int | None = None

    def acquire(self) -> int | None:
        """Take the lock; return None, or the PID recorded by the process holding it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                _lock(fd)
            except OSError:
                held = ""
                with contextlib.suppress(OSError):  # Windows: locked bytes cannot be read
                    held = os.read(fd, 32).decode("ascii", "replace").strip()
                os.close(fd)
                return int(held) if held.isdigit() else 0
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode("ascii"))
                self.fd = fd
                return None
            os.close(fd)  # unlinked by its previous holder between open and lock: retry

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self.fd)
            self.fd = None


def _lock(fd: int) -> None:
    if os.name == "nt":
        import msvcrt  # here: Windows only

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    else:
        import fcntl  # here: POSIX only

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


@contextlib.contextmanager
def note_on_interrupt(text: str) -> Iterator[None]:
    """Tell a Ctrl-C/SIGTERM on its way out what was kept, unless code inside already did."""
    try:
        yield
    except KeyboardInterrupt as exc:
        if not getattr(exc, "__notes__", None):
            exc.add_note(text)
        raise


class Staging:
    """A private folder in `folder` whose files `commit` moves over `targets` all at once.

    Entering creates `folder` (and its parents) and the staging folder, or raises a UserError
    naming `option` and `root`, the user's folder that holds `folder`; leaving removes the
    staging folder and, after a failure, the folders this run created. A stop signal on the way
    out gets a note saying what was kept. `exclusive` also locks `folder` for the run.
    """

    def __init__(
        self,
        targets: Sequence[Path],
        option: str,
        root: Path | None = None,
        exclusive: bool = False,
    ):
        self.targets = list(targets)
        self.folder = self.targets[0].parent
        self.option = f"{option} {root or self.folder}"
        self.created: list[Path] = []
        self.path = Path()
        self.committed = False
        self.lock = FolderLock(self.folder) if exclusive else None
        self.obsolete: list[Path] = []

    def __enter__(self) -> Staging:
        check_targets(self.targets)
        self.created = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        # The name is known before the folder exists, so a signal at any point cleans it up.
        self.path = self.folder / f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            holder = self.lock.acquire() if self.lock else None
            if holder is not None:
                self.lock = None  # not ours: leave it alone on the way out
                who = f"process {holder}" if holder else "another process"
                raise UserError(
                    f"{self.folder} is being written by another run ({who}); wait for it to "
                    f"finish or pass another {self.option.split()[0]}"
                )
            remove_stale(self.folder)
            self.path.mkdir(mode=0o700)
        except BaseException as exc:
            self.__exit__(type(exc), exc, None)
            if not isinstance(exc, OSError):
                raise
            where = "" if self.option.endswith(f" {self.folder}") else f" ({self.folder})"
            raise UserError(
                f"cannot write to {self.option}{where}: {exc.strerror or exc}; "
                "pass a writable folder"
            ) from None
        log.info("staging in %s", self.path)
        return self

    def staged(self, target: Path) -> Path:
        return self.path / target.name

    def replace_also(self, paths: Sequence[Path]) -> None:
        """Files of the previous set in `folder` that are not targets: `commit` removes them
        with the rest of the old set (and puts them back if it fails)."""
        self.obsolete = [p for p in paths if p not in self.targets and p.parent == self.folder]

    def __exit__(self, kind, exc, tb) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self.lock:
            self.lock.release()
        if exc is None:
            return
        for folder in self.created:  # innermost first; only if this run left them empty
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(exc, KeyboardInterrupt):
            done = (
                f"the new {', '.join(t.name for t in self.targets)} in {self.folder} are complete"
            )
            exc.add_note(done if self.committed else describe(self.targets))

    def commit(self) -> None:
        """Move every staged file over its target; on any failure restore the previous set."""
        check_targets(self.targets)
        pairs = [(self.staged(t), t) for t in self.targets]
        missing = [str(s) for s, _ in pairs if not s.is_file()]
        if missing:
            raise RuntimeError(f"nothing staged at {', '.join(missing)}")
        old = [*self.targets, *self.obsolete]
        aside = {t: self.path / f"{t.name}.previous" for t in old}
        try:
            # Set the old files aside, last target first: a `.sha256` sidecar goes before the
            # file it describes, so it never vouches for a file that is not there.
            for target in reversed(old):
                if target.exists() or target.is_symlink():
                    os.replace(target, aside[target])
            for staged, target in pairs:
                os.replace(staged, target)
        except BaseException as exc:
            self._roll_back(pairs, aside)
            for path in self.obsolete:
                if aside[path].exists() or aside[path].is_symlink():
                    os.replace(aside[path], path)
            if isinstance(exc, OSError):
                raise UserError(
                    f"could not move the new files into {self.folder} ({exc}); the previous "
                    "files were put back"
                ) from None
            raise
        self.committed = True
        log.info("wrote %s", ", ".join(str(t) for t in self.targets))
        if self.obsolete:
            log.info("removed %s of the previous set", ", ".join(p.name for p in self.obsolete))

    @staticmethod
    def _roll_back(pairs: list[tuple[Path, Path]], aside: dict[Path, Path]) -> None:
        """Undo a partial commit from what is on disk, so it is right wherever it stopped."""
        for staged, target in reversed(pairs):
            if not staged.exists() and target.exists():
                target.unlink()  # the new file got in
            if aside[target].exists() or aside[target].is_symlink():
                os.replace(aside[target], target)
