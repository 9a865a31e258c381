"""WebSocket frames (RFC 6455, section 5), as both ends of ``/ws`` write and read them.

The client (:class:`~coding_gym.backends.websocket_client.BlockingWebSocket`) sends final,
masked frames and checks the server's, which come unmasked with no reserved bit set (no
extension is ever agreed). The server (:mod:`coding_gym.server.wsprotocol`) reads whole
client frames and writes unmasked ones. Both find a frame's length with :func:`read_header`
and write a header with :func:`header`.
"""

from __future__ import annotations

import os
import struct

from websockets.frames import CloseCode

try:
    from websockets.speedups import apply_mask  # 0.3 µs for a request; 2 µs in Python
except ImportError:  # websockets built without its C extension
    from websockets.utils import apply_mask

# Opcodes (section 5.2); control frames are 0x8 and up.
CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
# Bits of a header's first two bytes: FIN, RSV1-3, opcode; MASK, payload length.
FIN, RSV, OPCODE, MASK, LENGTH = 0x80, 0x70, 0x0F, 0x80, 0x7F


def header(opcode: int, length: int, mask: int = 0) -> bytes:
    """The header of a final frame of ``length`` payload bytes, in the shortest form;
    ``mask`` is :data:`MASK` for a masked frame (the mask itself follows the header)."""
    if length < 126:
        return bytes((FIN | opcode, mask | length))
    if length < 1 << 16:
        return struct.pack("!BBH", FIN | opcode, mask | 126, length)
    return struct.pack("!BBQ", FIN | opcode, mask | 127, length)


def read_header(data: bytes | bytearray, start: int) -> tuple[int, int, int, int] | None:
    """The frame at ``data[start:]``: (first byte, second byte, payload length, offset just
    past the length fields, where a mask or the payload begins); None while the header is
    not whole."""
    available = len(data) - start
    if available < 2:
        return None
    head, second = data[start], data[start + 1]
    length, offset = second & LENGTH, start + 2
    if length >= 126:
        width = 2 if length == 126 else 8
        if available < 2 + width:
            return None
        length = int.from_bytes(data[offset:offset + width], "big")
        offset += width
    return head, second, length, offset


def masked_frame(opcode: int, payload: bytes | bytearray) -> bytes:
    """A final frame carrying ``payload``, masked as every client frame must be."""
    mask = os.urandom(4)  # the RFC wants masks that no one can predict
    return b"".join((header(opcode, len(payload), MASK), mask, apply_mask(payload, mask)))


def header_error(head: int, second: int, length: int, *, in_message: bool,
                 message_size: int, max_size: int | None) -> tuple[int, str] | None:
    """Why a server frame with this header may not come now, as (close code, reason);
    None if it may.

    ``in_message``: fragments of a message came (``message_size`` bytes), not yet its last.
    A message over ``max_size`` is refused from its header, before its payload is buffered.
    """
    opcode = head & OPCODE
    if head & RSV or second & MASK:
        return CloseCode.PROTOCOL_ERROR, "reserved bits or mask bit set"
    if opcode >= CLOSE:
        if opcode > PONG or length > 125 or not head & FIN:
            return CloseCode.PROTOCOL_ERROR, f"invalid control frame (opcode {opcode})"
        return None
    if opcode > BINARY:
        return CloseCode.PROTOCOL_ERROR, f"unknown opcode {opcode}"
    if (opcode == CONT) != in_message:
        return CloseCode.PROTOCOL_ERROR, "frame out of order in a fragmented message"
    if max_size is not None and message_size + length > max_size:
        return CloseCode.MESSAGE_TOO_BIG, f"message over {max_size} bytes"
    return None
