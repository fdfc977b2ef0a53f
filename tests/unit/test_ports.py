"""Port helpers: a held port is out of the kernel's picks yet open to a server that reuses it."""

from __future__ import annotations

import socket

from twllm.runtime.ports import ephemeral_range, hold


def test_a_held_port_is_never_picked_but_a_reusing_server_binds_it():
    held = hold(0)
    assert held is not None
    port = held.getsockname()[1]
    try:
        picked = []
        for _ in range(2000):  # the kernel's own picks: what an outgoing connection would get
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                picked.append(sock.getsockname()[1])
        assert port not in picked
        again = hold(port)  # the supervisor may hold it again (SO_REUSEADDR both)
        assert again is not None
        again.close()
        with socket.socket() as plain:  # a program without SO_REUSEADDR is refused
            try:
                plain.bind(("127.0.0.1", port))
                raise AssertionError("a plain bind took a held port")
            except OSError:
                pass
        with socket.socket() as server:  # as uvicorn, vLLM and PostgreSQL bind
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("127.0.0.1", port))
            server.listen()
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                pass
    finally:
        held.close()


def test_a_port_another_program_serves_is_not_held():
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert hold(server.getsockname()[1]) is None


def test_ephemeral_range_reads_the_kernel_file_or_falls_back(tmp_path):
    custom = tmp_path / "range"
    custom.write_text("40000\t50000\n")
    assert ephemeral_range(custom) == (40000, 50000)
    assert ephemeral_range(tmp_path / "missing") == (32768, 60999)
    custom.write_text("garbage\n")
    assert ephemeral_range(custom) == (32768, 60999)
