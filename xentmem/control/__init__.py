"""The control protocol both daemons speak, its clients, and the server core they share."""

from __future__ import annotations

from xentmem.control.client import ControlClient, ControlConnection, default_socket_path
from xentmem.control.protocol import PROTOCOL_VERSION, ControlError

__all__ = [
    "PROTOCOL_VERSION",
    "ControlClient",
    "ControlConnection",
    "ControlError",
    "default_socket_path",
]
