"""Local ports for the processes lorafleet starts (engines, gateways, fakes)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it); there is a small race until the caller binds it."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
