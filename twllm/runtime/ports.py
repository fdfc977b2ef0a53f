"""A loopback TCP port that is free now, for a process about to be started on it.

The race: the port is found by binding to port 0 and closing the socket, so it is free only at
the moment of the call. Anything else on the machine may take it before the caller's process
binds it; a caller that cannot afford that must retry on "address in use" (or let the process
bind port 0 itself and report the port back).
"""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` (default the IPv4 loopback) at the moment of the call; see the
    module docstring for the race between this call and the caller's bind."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
