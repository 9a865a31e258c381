"""WebSocket frames as a client writes them and checks the server's (RFC 6455, section 5).

The wire format under :class:`~coding_gym.backends.websocket_client.BlockingWebSocket`:
every frame the client sends is final and masked; the server's come unmasked, with no
reserved bit set (no extension is ever agreed).
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


def masked_frame(opcode: int, payload: bytes | bytearray) -> bytes:
    """A final frame carrying ``payload``, masked as every client frame must be."""
    mask = os.urandom(4)  # the RFC wants masks that no one can predict
    length = len(payload)
    if length < 126:
        head = bytes((FIN | opcode, MASK | length))
    elif length < 1 << 16:
        head = struct.pack("!BBH", FIN | opcode, MASK | 126, length)
    else:
        head = struct.pack("!BBQ", FIN | opcode, MASK | 127, length)
    return b"".join((head, mask, apply_mask(payload, mask)))


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
