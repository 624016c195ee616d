"""Ctrl-C that cannot be lost.

Python raises KeyboardInterrupt wherever the main thread happens to be; when that is inside a
callback run from C (a finalizer, a hook) the exception is printed and dropped, and the run
goes on as if nothing happened. The handler also records the request, and the long loops
(evaluation batches, training steps) call `check()` to raise it again at a safe point.
"""

from __future__ import annotations

import signal

_requested = False


def _handler(signum, frame):
    global _requested
    _requested = True
    raise KeyboardInterrupt


def install() -> None:
    global _requested
    _requested = False
    signal.signal(signal.SIGINT, _handler)


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed, even if the first one was swallowed."""
    if _requested:
        raise KeyboardInterrupt
