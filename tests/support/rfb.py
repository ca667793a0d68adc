"""A minimal RFB (VNC) client over a websocket, speaking to remotecli's VNC proxy as noVNC does.

noVNC opens the websocket with the ``binary`` subprotocol and exchanges raw RFB bytes in binary
frames. This client does the RFB 3.8 handshake (security type None), sends ClientInit, reads
ServerInit, requests a framebuffer update, and sends keyboard events (X11 keysyms), the way a
person typing into the embedded view would.
"""

from __future__ import annotations

import struct
import threading
import time
from typing import Any

from websockets.sync.client import ClientConnection, connect

KEYSYMS = {"\t": 0xFF09, "\n": 0xFF0D, "Tab": 0xFF09, "Return": 0xFF0D, "Escape": 0xFF1B, "BackSpace": 0xFF08,
           "Shift_L": 0xFFE1}


class RfbError(RuntimeError):
    pass


class RfbClient:
    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.ws: ClientConnection = connect(url, subprotocols=["binary"], open_timeout=timeout,  # type: ignore[list-item]
                                            max_size=None)
        self._buffer = b""
        self._lock = threading.Lock()
        self.width = self.height = 0
        self.name = ""
        self.bytes_received = 0
        self._timeout = timeout
        self._reader: threading.Thread | None = None
        self._closed = False

    # -- reading -------------------------------------------------------------------------
    def _read(self, count: int) -> bytes:
        deadline = time.monotonic() + self._timeout
        while len(self._buffer) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RfbError(f"timed out waiting for {count} bytes")
            message = self.ws.recv(timeout=remaining)
            if isinstance(message, str):
                message = message.encode("latin-1")
            self._buffer += message
            self.bytes_received += len(message)
        data, self._buffer = self._buffer[:count], self._buffer[count:]
        return data

    def handshake(self) -> None:
        version = self._read(12)
        if not version.startswith(b"RFB "):
            raise RfbError(f"not an RFB server: {version!r}")
        self.ws.send(b"RFB 003.008\n")
        (count,) = struct.unpack("!B", self._read(1))
        if count == 0:
            (length,) = struct.unpack("!I", self._read(4))
            raise RfbError(self._read(length).decode(errors="replace"))
        types = self._read(count)
        if 1 not in types:
            raise RfbError(f"server offers no 'None' security type: {list(types)}")
        self.ws.send(bytes([1]))
        (result,) = struct.unpack("!I", self._read(4))
        if result != 0:
            raise RfbError("security handshake failed")
        self.ws.send(bytes([1]))  # ClientInit: shared
        self.width, self.height = struct.unpack("!HH", self._read(4))
        self._read(16)  # pixel format
        (name_length,) = struct.unpack("!I", self._read(4))
        self.name = self._read(name_length).decode(errors="replace")
        # Like noVNC: ask for the whole screen once, then keep draining updates in the background.
        self.ws.send(struct.pack("!BBHHHH", 3, 0, 0, 0, self.width, self.height))
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        while not self._closed:
            try:
                message = self.ws.recv(timeout=1)
            except TimeoutError:
                continue
            except Exception:
                return
            self.bytes_received += len(message)

    # -- keyboard ------------------------------------------------------------------------
    def key(self, keysym: int, delay: float = 0.05) -> None:
        self.ws.send(struct.pack("!BBxxI", 4, 1, keysym))
        time.sleep(delay)
        self.ws.send(struct.pack("!BBxxI", 4, 0, keysym))
        time.sleep(delay)

    def press(self, name: str) -> None:
        self.key(KEYSYMS[name])

    def wake_keyboard(self, settle_s: float = 0.5) -> None:
        """Press and release Shift (types nothing), then wait: under load the guest's first key event
        after a connection can be spent on giving Chromium's window the input focus (seen as a
        user name typed 'alice' arriving as 'lice'), so a text typed next would lose its first letter."""
        self.press("Shift_L")
        time.sleep(settle_s)

    def type_text(self, text: str) -> None:
        for char in text:
            self.key(KEYSYMS.get(char, ord(char)))

    def close(self) -> None:
        self._closed = True
        self.ws.close()

    def __enter__(self) -> RfbClient:
        self.handshake()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
