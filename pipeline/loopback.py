"""Ports on 127.0.0.1, the only address this tool's servers bind to."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on now (bound once and released: a later bind may still race another process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
