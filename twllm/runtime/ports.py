"""Loopback TCP ports: one free now, and holding a port until its process is started on it.

The race: a port found free is free only at that moment. Anything on the machine may take it
before the caller's process binds it, and the kernel's own pick of a port for an outgoing
connection (its ephemeral range, ``/proc/sys/net/ipv4/ip_local_port_range``) is the likeliest
taker: a deployment's engines open many connections while they load. CI once saw the gateway's
port taken in the 40 s between ``twllm deploy``'s check that it was free and the gateway's start.

``hold`` closes that window: a socket bound (not listening) to the port keeps it out of the
kernel's picks, both for outgoing connections and for other binds to port 0, and refuses
connections exactly as a free port does. The supervisor holds each component's port while the
component is not running and lets go just before starting it.
"""

from __future__ import annotations

import socket
from pathlib import Path

LOOPBACK = "127.0.0.1"
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` (default the IPv4 loopback) at the moment of the call; see the
    module docstring for the race between this call and the caller's bind."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def hold(port: int, host: str = LOOPBACK) -> socket.socket | None:
    """A socket bound to ``port`` that keeps it from being handed out, or None when the port is
    taken already (by the component's previous process still closing, or by another program: the
    component's own bind then reports it). SO_REUSEADDR lets the hold be taken while the port's
    last connections linger in TIME_WAIT, and lets the component bind while a hold is open."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        return None
    return sock


def ephemeral_range(path: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """The ports this host's kernel picks for outgoing connections (Linux's default when the file
    cannot be read)."""
    try:
        low, high = path.read_text(encoding="ascii").split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999
