"""wsframes: headers both ways, the client's masked frames, and the checks of a server frame's
header."""

from __future__ import annotations

import pytest

from coding_gym import wsframes as frames


def unmask(frame: bytes) -> tuple[int, int, bytes]:
    """First header byte, 7-bit length field and unmasked payload of a client frame."""
    length = size = frame[1] & 0x7F
    start = 2
    if length >= 126:
        width = 2 if length == 126 else 8
        size, start = int.from_bytes(frame[2:2 + width], "big"), 2 + width
    mask, payload = frame[start:start + 4], frame[start + 4:]
    assert len(payload) == size, "the length in the header is the payload's"
    return frame[0], length, bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


@pytest.mark.parametrize(("size", "length_field", "header_bytes"),
                         [(0, 0, 2), (125, 125, 2), (126, 126, 4), (65535, 126, 4),
                          (65536, 127, 10)])
def test_masked_frames_carry_the_payload_behind_the_shortest_header(size, length_field,
                                                                    header_bytes):
    payload = bytes(i % 251 for i in range(size))
    frame = frames.masked_frame(frames.TEXT, payload)
    assert len(frame) == header_bytes + 4 + size
    assert frame[1] & 0x80, "client frames are masked"
    assert unmask(frame) == (0x80 | frames.TEXT, length_field, payload)


def test_every_frame_gets_a_mask_of_its_own():
    masks = {frames.masked_frame(frames.PONG, b"x")[2:6] for _ in range(20)}
    assert len(masks) > 1


@pytest.mark.parametrize(("head", "second", "length", "in_message", "words"), [
    (0x80 | frames.TEXT, 0x05, 5, False, None),
    (0x00 | frames.TEXT, 0x05, 5, False, None),  # the first fragment
    (0x80 | frames.CONT, 0x05, 5, True, None),
    (0x80 | frames.PING, 0x05, 5, True, None),  # control frames may come between fragments
    (0xC0 | frames.TEXT, 0x05, 5, False, "reserved bits"),
    (0x80 | frames.TEXT, 0x85, 5, False, "mask bit"),
    (0x80 | 0x3, 0x05, 5, False, "unknown opcode 3"),
    (0x80 | 0xB, 0x05, 5, False, "invalid control frame"),
    (0x80 | frames.PING, 0x7E, 126, False, "invalid control frame"),
    (0x00 | frames.PING, 0x05, 5, False, "invalid control frame"),
    (0x80 | frames.CONT, 0x05, 5, False, "out of order"),
    (0x80 | frames.BINARY, 0x05, 5, True, "out of order"),
])
def test_header_errors_name_what_breaks_the_protocol(head, second, length, in_message, words):
    error = frames.header_error(head, second, length, in_message=in_message, message_size=0,
                                max_size=None)
    if words is None:
        assert error is None
    else:
        assert error is not None and error[0] == 1002 and words in error[1]


@pytest.mark.parametrize(("message_size", "length", "refused"),
                         [(0, 1000, False), (0, 1001, True), (600, 400, False), (600, 401, True)])
def test_a_message_over_max_size_is_refused_from_its_header(message_size, length, refused):
    error = frames.header_error(0x80 | frames.CONT, 0x7E, length, in_message=True,
                                message_size=message_size, max_size=1000)
    assert error == ((1009, "message over 1000 bytes") if refused else None)
