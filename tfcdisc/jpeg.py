"""JPEG facts read from the marker segments alone, without decoding a pixel.

Every image is checked this way first (a few microseconds each), before
`tfcdisc.screen` decodes it once, so that bytes that are not a JPEG, or frames of the
wrong size, cost nothing more; the bytes kept are moved untouched. Grayscale (1 component), YCbCr (3) and CMYK/YCCK (4) baseline,
extended and progressive JPEGs are legal; the input pipeline turns them all into
RGB.
"""

from __future__ import annotations

import dataclasses

# Start-of-frame markers: C0-C3, C5-C7, C9-CB, CD-CF (C4 DHT, C8 JPG, CC DAC are not).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}
_EOI_TAIL = 64  # the end-of-image marker must be within this many final bytes


@dataclasses.dataclass(frozen=True)
class JpegInfo:
    height: int
    width: int
    channels: int
    progressive: bool


class JpegError(ValueError):
    """The bytes are not a usable JPEG; ``kind`` names the class of problem for counts."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def read_header(data: bytes) -> JpegInfo:
    """Returns the frame header of a JPEG, or raises `JpegError` saying what is wrong."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise JpegError("not_jpeg", "not a JPEG (no start-of-image marker)")
    if data.rfind(b"\xff\xd9", max(0, n - _EOI_TAIL)) < 0:
        raise JpegError("truncated", "truncated JPEG (no end-of-image marker)")
    p = 2
    while p + 4 <= n:
        if data[p] != 0xFF:
            raise JpegError("corrupt", f"corrupt JPEG (expected a marker at byte {p})")
        marker = data[p + 1]
        if marker == 0xFF:  # fill byte
            p += 1
            continue
        if marker in _STANDALONE:
            p += 2
            continue
        length = (data[p + 2] << 8) | data[p + 3]
        if length < 2 or p + 2 + length > n:
            raise JpegError("corrupt", f"corrupt JPEG (segment at byte {p} overruns the data)")
        if marker in _SOF:
            if length < 8:
                raise JpegError("corrupt", "corrupt JPEG (short frame header)")
            height = (data[p + 5] << 8) | data[p + 6]
            width = (data[p + 7] << 8) | data[p + 8]
            channels = data[p + 9]
            if not height or not width:
                raise JpegError("empty_frame", f"JPEG with an empty frame ({width}x{height})")
            if channels not in (1, 3, 4):
                raise JpegError("components", f"JPEG with {channels} colour components (1, 3 or 4 expected)")
            return JpegInfo(height, width, channels, marker in _PROGRESSIVE)
        if marker == 0xDA:  # start of scan before any frame header
            break
        p += 2 + length
    raise JpegError("corrupt", "corrupt JPEG (no frame header)")


def check(data: bytes, size: tuple[int, int] | None = None,
          max_pixels: int | None = None) -> JpegInfo:
    """`read_header`, also requiring the frame to be ``size`` (height, width) if given,
    and to hold at most ``max_pixels`` (a header may claim 60000x60000: refuse it before
    a decoder allocates for it)."""
    info = read_header(data)
    if max_pixels is not None and info.height * info.width > max_pixels:
        raise JpegError("too_large", f"JPEG of {info.width}x{info.height} declares more than "
                        f"the {max_pixels} pixels allowed")
    if size is not None and (info.height, info.width) != tuple(size):
        raise JpegError("wrong_size", f"JPEG of {info.width}x{info.height}, expected "
                        f"{size[1]}x{size[0]}")
    return info
