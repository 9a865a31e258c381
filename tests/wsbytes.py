"""WebSocket frames built by hand (RFC 6455, section 5), for tests that choose every byte:
a server's frames for the client's tests, a client's for the server's."""

from __future__ import annotations

import os

TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


def frame(opcode: int, payload: bytes | str, *, fin: bool = True, rsv: int = 0,
          mask: bytes = b"") -> bytes:
    """A frame with any header bits: unmasked (a server's), unless ``mask`` is given."""
    data = payload.encode() if isinstance(payload, str) else payload
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    mask_bit = 0x80 if mask else 0
    if len(data) < 126:
        head += bytes([mask_bit | len(data)])
    elif len(data) < 1 << 16:
        head += bytes([mask_bit | 126]) + len(data).to_bytes(2, "big")
    else:
        head += bytes([mask_bit | 127]) + len(data).to_bytes(8, "big")
    if mask:
        data = bytes(byte ^ mask[i % 4] for i, byte in enumerate(data))
    return head + mask + data


def client_frame(payload: bytes, opcode: int = TEXT, fin: bool = True, masked: bool = True,
                 rsv: int = 0) -> bytes:
    """A frame as a client sends it: masked with a random key (unless ``masked`` is off)."""
    return frame(opcode, payload, fin=fin, rsv=rsv, mask=os.urandom(4) if masked else b"")
