"""A WebSocket client on a bare socket, for what a library client will not do: stop
reading with a tiny receive buffer, send invalid UTF-8 in a text frame, send raw bytes.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
from typing import Any

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8


def frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One final, masked client frame."""
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class RawWebSocket:
    """A WebSocket connection on a plain socket (`rcvbuf`: SO_RCVBUF set before
    connecting, so that a client that stops reading fills the server's buffers fast)."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str = "/v1/responses",
        *,
        rcvbuf: int | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        key = base64.b64encode(os.urandom(16)).decode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
            ).encode()
        )
        self._buf = b""
        while b"\r\n\r\n" not in self._buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            self._buf += chunk
        head, _, self._buf = self._buf.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])

    def send(self, payload: bytes | str, opcode: int = OP_TEXT) -> None:
        data = payload.encode() if isinstance(payload, str) else payload
        self.sock.sendall(frame(data, opcode))

    def send_json(self, obj: Any) -> None:
        self.send(json.dumps(obj))

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def recv_frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next server frame (unmasked, unfragmented)."""
        b0, b1 = self._read(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read(8))[0]
        return b0 & 0x0F, self._read(n)

    def recv_json(self) -> dict[str, Any]:
        """The next text frame as JSON (raises ConnectionError on a close frame)."""
        while True:
            op, payload = self.recv_frame()
            if op == OP_TEXT:
                return dict(json.loads(payload))
            if op == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                raise ConnectionError(f"close frame {code}")

    def close_code(self) -> int | None:
        """Read frames until the server's close frame; its code (None: no code, or
        the connection ended without one)."""
        try:
            while True:
                op, payload = self.recv_frame()
                if op == OP_CLOSE:
                    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
        except (ConnectionError, OSError):
            return None

    def close(self) -> None:
        self.sock.close()
