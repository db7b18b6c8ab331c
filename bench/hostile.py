"""Misbehaving HTTP/2 clients, for the overload tests and the "under load" benchmark.

No HTTP/2 library is needed for what they do: open a connection and stay silent
(``idle_connections``), or start gRPC calls and never read the answers
(``NonReadingClient``: its stream window is 0, so the server can send nothing and
has to hold every reply). Headers are HPACK literals without indexing, which
every HTTP/2 server must accept.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS = 0x0, 0x1, 0x4
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
SETTINGS_INITIAL_WINDOW_SIZE = 0x4


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream) + payload


def _literal(name: str, value: str) -> bytes:
    # "Literal Header Field without Indexing — New Name" (RFC 7541 6.2.2), lengths < 127.
    raw_name, raw_value = name.encode(), value.encode()
    assert len(raw_name) < 127 and len(raw_value) < 127
    return b"\x00" + bytes([len(raw_name)]) + raw_name + bytes([len(raw_value)]) + raw_value


def request_headers(path: str, authority: str) -> bytes:
    fields = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    return b"".join(_literal(name, value) for name, value in fields)


def idle_connections(port: int, count: int, *, timeout: float = 5.0) -> list[socket.socket]:
    """Up to ``count`` TCP connections to ``port`` that send nothing; stops early when
    the machine refuses more (out of descriptors or ports)."""
    opened: list[socket.socket] = []
    for _ in range(count):
        try:
            opened.append(socket.create_connection(("127.0.0.1", port), timeout=timeout))
        except OSError:
            break
    return opened


class NonReadingClient:
    """One HTTP/2 connection whose streams have a receive window of 0.

    ``call(path, message)`` starts a unary gRPC call; the reply never comes through
    (the server may send headers, never data). The socket itself is drained, so only
    HTTP/2 flow control holds the server back, as with a client that stopped reading.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
        self.authority = f"127.0.0.1:{port}"
        settings = struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, 0)
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0, settings))
        self.sock.setblocking(False)
        self._next_stream = 1
        self._acked = False

    def call(self, path: str, message: bytes = b"") -> None:
        stream = self._next_stream
        self._next_stream += 2
        body = struct.pack(">BI", 0, len(message)) + message
        self.sock.sendall(
            frame(HEADERS, END_HEADERS, stream, request_headers(path, self.authority))
            + frame(DATA, END_STREAM, stream, body)
        )
        self.drain()

    def calls(self, path: str, count: int, message: bytes = b"") -> None:
        for _ in range(count):
            self.call(path, message)

    def drain(self) -> int:
        """Reads whatever the server has sent (and acknowledges nothing but its SETTINGS)."""
        total = 0
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return total
            except OSError:
                return total
            if not chunk:
                return total
            total += len(chunk)
            if not self._acked:
                self._acked = True
                self.sock.setblocking(True)
                self.sock.sendall(frame(SETTINGS, ACK, 0, b""))
                self.sock.setblocking(False)

    def close(self) -> None:
        self.sock.close()


def close_all(sockets: Iterable[socket.socket | NonReadingClient]) -> None:
    for item in sockets:
        item.close()


def idle_http2_connections(port: int, count: int) -> list[NonReadingClient]:
    """Up to ``count`` connections that complete the HTTP/2 handshake (preface and
    SETTINGS both ways) and then start no call."""
    opened: list[NonReadingClient] = []
    for _ in range(count):
        try:
            opened.append(NonReadingClient(port))
        except OSError:
            break
    return opened
