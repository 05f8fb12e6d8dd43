"""Ctrl-C and SIGTERM (what CI sends on cancel) stop a task the same way.

Both raise `Interrupted` where Python is, so every `finally` and staging folder cleans up as for
an error; the task then prints one line saying what was kept and exits with the shells'
status, 128 + the signal number. A signal that arrives while a long native call runs (an ONNX
Runtime session) takes effect when that call returns.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)


class Interrupted(KeyboardInterrupt):
    """A stop signal turned into an exception; code that handles Ctrl-C handles it too."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Raise `Interrupted` on the first SIGINT or SIGTERM; later ones wait for the cleanup."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping: list[int] = []

    def handler(signum: int, frame) -> None:
        if stopping:
            log.warning("%s again: still cleaning up", _name(signum))
            return
        stopping.append(signum)
        raise Interrupted(signum)

    numbers = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
    # A signal the parent chose to ignore (SIGINT of a background job) stays ignored.
    previous = {n: signal.getsignal(n) for n in numbers if signal.getsignal(n) != signal.SIG_IGN}
    for number in previous:
        signal.signal(number, handler)
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, signal.SIG_DFL if old is None else old)


def summary(exc: KeyboardInterrupt) -> tuple[str, int]:
    """(one line for the user, exit status) for a stopped task; the line ends with the last
    note the code on the way out added (what it kept)."""
    signum = getattr(exc, "signum", signal.SIGINT)
    notes = getattr(exc, "__notes__", [])
    return f"interrupted ({_name(signum)})" + (f": {notes[-1]}" if notes else ""), 128 + signum
